//! The `eni` CNI plugin against real network namespaces: ADD/CHECK/DEL round
//! trips per spec version, result JSON, and clear CNI errors for bad input.

use lazybd_tests::eni::{
    addresses, assert_parked, link_by_mac, link_by_name, parking_name, pod_netns, tag, unique_mac,
    with_prev, Call, Eni, OnePod, StandIn,
};
use lazybd_tests::require_root;
use serde_json::{json, Value};

fn round_trip(version: &str) {
    let pod = OnePod::create();
    let (eni, ns, mac, nic, call) = (&pod.eni, &pod.ns, &pod.mac, &pod.nic, &pod.call);
    let conf = eni.conf(version, "rt", mac, "10.91.0.0/24");

    let result = eni.call("ADD", &conf, call).ok();
    assert_eq!(result["cniVersion"], version);
    let iface = &result["interfaces"][0];
    assert_eq!(iface["name"], "eth0");
    assert_eq!(iface["mac"], mac.as_str());
    assert_eq!(iface["sandbox"], ns.path().to_str().unwrap());
    assert_eq!(result["ips"][0]["address"], "10.91.0.2/24");
    assert_eq!(result["ips"][0]["gateway"], "10.91.0.1");
    assert_eq!(result["ips"][0]["interface"], 0);
    assert_eq!(result["routes"][0]["dst"], "0.0.0.0/0");
    match version {
        "0.4.0" => {
            assert_eq!(result["ips"][0]["version"], "4");
            assert!(iface.get("mtu").is_none(), "mtu is a 1.1.0 field");
        }
        "1.0.0" => assert!(result["ips"][0].get("version").is_none()),
        _ => assert_eq!(iface["mtu"], 1500),
    }

    // The NIC is in the pod, named eth0, up, addressed, with the route.
    assert!(
        link_by_name(None, &nic.name).is_none(),
        "ENI still in the host"
    );
    let inside = link_by_mac(Some(&ns.name), mac).expect("ENI in the pod");
    assert_eq!(inside.name, "eth0");
    assert!(inside.up);
    assert_eq!(
        addresses(&ns.name, "eth0"),
        vec!["10.91.0.2/24".to_string()]
    );
    let routes = lazybd_tests::netns::ip(&["-n", &ns.name, "route", "show", "default"]);
    assert!(routes.contains("via 10.91.0.1 dev eth0"), "{routes}");
    // Traffic to the pod's own address works (busybox-static is a test dep).
    lazybd_tests::netns::ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
    let ping = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "busybox",
            "ping",
            "-c1",
            "-W2",
            "10.91.0.2",
        ])
        .output()
        .unwrap();
    assert!(ping.status.success(), "ping own address: {ping:?}");
    assert_eq!(eni.records().len(), 1);
    assert_eq!(eni.records()[0]["phase"], "attached");
    assert_eq!(eni.ipam_allocations("rt"), 1);

    eni.call("CHECK", &with_prev(&conf, &result), call).ok();

    eni.call("DEL", &with_prev(&conf, &result), call).ok();
    let home = link_by_mac(None, mac).expect("ENI back in the host");
    assert_eq!(home.name, parking_name(mac));
    assert!(!home.up, "a parked ENI stays down");
    assert!(link_by_mac(Some(&ns.name), mac).is_none());
    assert!(eni.records().is_empty());
    assert_eq!(
        eni.ipam_allocations("rt"),
        0,
        "host-local allocation released"
    );

    // CHECK after DEL is a clear failure, not a panic or a pass.
    let after = eni.call("CHECK", &with_prev(&conf, &result), call);
    assert_eq!(after.code(), 103);
}

#[test]
fn eni_round_trip_1_1_0() {
    require_root!();
    round_trip("1.1.0");
}

#[test]
fn eni_round_trip_1_0_0() {
    require_root!();
    round_trip("1.0.0");
}

#[test]
fn eni_round_trip_0_4_0() {
    require_root!();
    round_trip("0.4.0");
}

#[test]
fn eni_macvlan_stand_in_and_static_addressing() {
    require_root!();
    let t = tag();
    let eni = Eni::new();
    let ns = pod_netns(&t);
    let mac = unique_mac();
    let _nic = StandIn::macvlan(&format!("{t}v"), &mac);
    let mut conf = eni.conf("1.1.0", "st", &mac, "10.92.0.0/24");
    conf.as_object_mut().unwrap().remove("ipam");
    conf["mtu"] = json!(1400);
    conf["addresses"] = json!([{"address": "10.92.0.7/24", "gateway": "10.92.0.1"}]);
    conf["routes"] = json!([{"dst": "10.200.0.0/16", "gw": "10.92.0.254"}]);
    conf["dns"] = json!({"nameservers": ["10.92.0.53"]});
    let call = Call::new(&format!("{t}-pod"), &ns);

    let result = eni.call("ADD", &conf, &call).ok();
    assert_eq!(result["interfaces"][0]["mtu"], 1400);
    assert_eq!(result["ips"][0]["address"], "10.92.0.7/24");
    assert_eq!(result["routes"][0]["gw"], "10.92.0.254");
    assert_eq!(result["dns"]["nameservers"][0], "10.92.0.53");
    assert_eq!(
        addresses(&ns.name, "eth0"),
        vec!["10.92.0.7/24".to_string()]
    );
    let routes = lazybd_tests::netns::ip(&["-n", &ns.name, "route"]);
    assert!(
        routes.contains("10.200.0.0/16 via 10.92.0.254 dev eth0"),
        "{routes}"
    );

    // CHECK notices an address the pod lost.
    let prev_conf = with_prev(&conf, &result);
    eni.call("CHECK", &prev_conf, &call).ok();
    lazybd_tests::netns::ip(&["-n", &ns.name, "addr", "del", "10.92.0.7/24", "dev", "eth0"]);
    let broken = eni.call("CHECK", &prev_conf, &call);
    assert_eq!(broken.code(), 103);
    assert!(broken.msg().contains("10.92.0.7/24"), "{}", broken.msg());

    eni.call("DEL", &prev_conf, &call).ok();
    assert_parked(&mac);
}

#[test]
fn eni_production_matching_ignores_virtual_links() {
    require_root!();
    // Without standInLinkKinds only physical links count: a veth with the
    // right MAC is not an ENI.
    let pod = OnePod::create();
    let (eni, mac, nic, call) = (&pod.eni, &pod.mac, &pod.nic, &pod.call);
    let mut conf = eni.conf("1.1.0", "pm", mac, "10.93.0.0/24");
    conf.as_object_mut().unwrap().remove("standInLinkKinds");
    conf["nicWaitMs"] = json!(200);
    let out = eni.call("ADD", &conf, call);
    assert_eq!(out.code(), 11);
    assert!(out.msg().contains(mac.as_str()), "{}", out.msg());
    assert!(link_by_name(None, &nic.name).is_some(), "veth untouched");
    assert_eq!(eni.ipam_allocations("pm"), 0);
}

#[test]
fn eni_clear_errors_for_bad_input() {
    require_root!();
    let pod = OnePod::create();
    let t = &pod.t;
    let (eni, ns, mac, nic, call) = (&pod.eni, &pod.ns, &pod.mac, &pod.nic, &pod.call);
    let conf = eni.conf("1.1.0", "be", mac, "10.94.0.0/24");
    let untouched = || {
        let l = link_by_mac(None, mac).expect("ENI still in the host");
        assert_eq!(l.name, nic.name);
        assert!(eni.records().is_empty());
        assert_eq!(eni.ipam_allocations("be"), 0);
    };

    // Wrong MAC: waited for (bounded), then "try again later".
    let mut wrong = conf.clone();
    wrong["mac"] = json!(unique_mac());
    let started = std::time::Instant::now();
    let out = eni.call("ADD", &wrong, call);
    assert_eq!(out.code(), 11);
    assert!(started.elapsed() >= std::time::Duration::from_millis(500));
    assert!(out.stderr.contains("waiting"), "{}", out.stderr);
    untouched();

    // Missing netns.
    let mut gone = call.clone();
    gone.netns = Some(format!("/run/netns/lzbeni-{t}-missing").into());
    let out = eni.call("ADD", &conf, &gone);
    assert_eq!(out.code(), 4);
    assert!(out.msg().contains("does not exist"), "{}", out.msg());
    untouched();

    // A regular file is not a netns.
    let file = eni.dir.path().join("not-a-netns");
    std::fs::write(&file, b"").unwrap();
    let mut notns = call.clone();
    notns.netns = Some(file);
    assert_eq!(eni.call("ADD", &conf, &notns).code(), 4);

    // Bad configs: not JSON, unknown version, no MAC, bad MAC, both IPAM and static.
    let mut bad_version = conf.clone();
    bad_version["cniVersion"] = json!("0.2.0");
    let mut no_mac = conf.clone();
    no_mac.as_object_mut().unwrap().remove("mac");
    let mut bad_mac = conf.clone();
    bad_mac["mac"] = json!("00:00:00:00:00:00");
    let mut both = conf.clone();
    both["addresses"] = json!([{"address": "10.94.0.9/24"}]);
    let mut no_ipam_plugin = conf.clone();
    no_ipam_plugin["ipam"]["type"] = json!("no-such-ipam");
    for (what, c, code) in [
        ("bad version", bad_version, 1),
        ("no mac", no_mac, 7),
        ("bad mac", bad_mac, 7),
        ("ipam and static", both, 7),
        ("missing ipam plugin", no_ipam_plugin, 7),
    ] {
        let out = eni.call("ADD", &c, call);
        assert_eq!(out.code(), code, "{what}: {}", out.json);
        assert_eq!(out.json["cniVersion"], c["cniVersion"], "{what}");
        assert!(!out.msg().is_empty(), "{what}");
    }
    let out = {
        let mut cmd = std::process::Command::new(&eni.bin);
        cmd.env_clear()
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", "x")
            .env("CNI_NETNS", ns.path())
            .env("CNI_IFNAME", "eth0");
        lazybd_tests::eni::CniOutput {
            success: false,
            json: {
                use std::io::Write;
                let mut child = cmd
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                child.stdin.take().unwrap().write_all(b"{not json").unwrap();
                let o = child.wait_with_output().unwrap();
                assert!(!o.status.success());
                serde_json::from_slice::<Value>(&o.stdout).unwrap()
            },
            stderr: String::new(),
        }
    };
    assert_eq!(out.code(), 6);
    let mut no_cmd = call.clone();
    no_cmd.ifname = "this-name-is-too-long".into();
    assert_eq!(eni.call("ADD", &conf, &no_cmd).code(), 4);
    untouched();

    // CNI_IFNAME already taken in the pod: refused before anything moves.
    lazybd_tests::netns::ip(&[
        "-n", &ns.name, "link", "add", "eth0", "type", "veth", "peer", "name", "x0",
    ]);
    let out = eni.call("ADD", &conf, call);
    assert_eq!(out.code(), 102);
    untouched();

    // VERSION.
    let v = eni
        .call("VERSION", &json!({"cniVersion": "1.0.0"}), call)
        .ok();
    assert_eq!(
        v,
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]})
    );
    // STATUS and GC are 1.1.0 verbs.
    let mut old = conf.clone();
    old["cniVersion"] = json!("1.0.0");
    assert_eq!(eni.call("STATUS", &old, call).code(), 1);
    eni.call("STATUS", &conf, call).ok();
}

#[test]
fn eni_busy_and_repeated_add_leave_the_owner_alone() {
    require_root!();
    let t = tag();
    let eni = Eni::new();
    let (ns_a, ns_b) = (pod_netns(&format!("{t}a")), pod_netns(&format!("{t}b")));
    let mac = unique_mac();
    let _nic = StandIn::veth(&format!("{t}e0"), &mac);
    let conf = eni.conf("1.1.0", "bz", &mac, "10.95.0.0/24");
    let a = Call::new(&format!("{t}-a"), &ns_a);
    let b = Call::new(&format!("{t}-b"), &ns_b);
    let result = eni.call("ADD", &conf, &a).ok();

    let out = eni.call("ADD", &conf, &b);
    assert_eq!(out.code(), 100);
    assert!(out.msg().contains(&a.container), "{}", out.msg());
    // A DEL for B (the runtime cleans up a failed ADD) must not steal A's NIC.
    eni.call("DEL", &conf, &b).ok();
    // Nor does a second ADD for A tear A down.
    assert_eq!(eni.call("ADD", &conf, &a).code(), 102);
    assert_eq!(link_by_mac(Some(&ns_a.name), &mac).unwrap().name, "eth0");
    eni.call("CHECK", &with_prev(&conf, &result), &a).ok();

    eni.call("DEL", &with_prev(&conf, &result), &a).ok();
    let r = eni.call("ADD", &conf, &b).ok();
    assert_eq!(r["interfaces"][0]["sandbox"], ns_b.path().to_str().unwrap());
    eni.call("DEL", &with_prev(&conf, &r), &b).ok();
    assert!(eni.records().is_empty());
    assert_eq!(eni.ipam_allocations("bz"), 0);
}

#[test]
fn eni_waits_for_a_nic_that_is_hot_plugged_late() {
    require_root!();
    let t = tag();
    let eni = Eni::new();
    let ns = pod_netns(&t);
    let mac = unique_mac();
    let mut conf = eni.conf("1.1.0", "hp", &mac, "10.96.0.0/24");
    conf["nicWaitMs"] = json!(5000);
    let call = Call::new(&format!("{t}-pod"), &ns);
    let name = format!("{t}e0");
    let (m2, n2) = (mac.clone(), name.clone());
    let plug = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(400));
        StandIn::veth(&n2, &m2)
    });
    let out = eni.call("ADD", &conf, &call);
    let _nic = plug.join().unwrap();
    let result = out.ok();
    assert_eq!(result["interfaces"][0]["mac"], mac.as_str());
    eni.call("DEL", &with_prev(&conf, &result), &call).ok();
    assert_parked(&mac);
}

#[test]
fn eni_failed_add_undoes_every_step() {
    require_root!();
    let pod = OnePod::create();
    let (eni, ns, mac, call) = (&pod.eni, &pod.ns, &pod.mac, &pod.call);
    // The IPAM plugin hands out a route whose gateway is not on the link:
    // the kernel refuses it after the move, the address and the allocation.
    let mut conf = eni.conf("1.1.0", "ud", mac, "10.97.0.0/24");
    conf["ipam"]["routes"] = json!([{"dst": "10.200.0.0/16", "gw": "192.0.2.1"}]);
    let out = eni.call("ADD", &conf, call);
    assert_eq!(out.code(), 101, "{}", out.json);
    assert!(out.msg().contains("10.200.0.0/16"), "{}", out.msg());

    let home = link_by_mac(None, mac).expect("ENI back in the host");
    assert_eq!(home.name, parking_name(mac));
    assert!(link_by_mac(Some(&ns.name), mac).is_none());
    assert!(eni.records().is_empty());
    assert_eq!(eni.ipam_allocations("ud"), 0, "IPAM allocation undone");
    // The runtime's DEL after a failed ADD is harmless.
    eni.call("DEL", &conf, call).ok();
    assert_parked(mac);
}
