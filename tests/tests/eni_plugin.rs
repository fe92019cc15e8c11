//! The `eni` CNI plugin against real network namespaces: ADD/CHECK/DEL round
//! trips per spec version, result JSON, clear CNI errors for bad input, and
//! the trust rule: only NICs the operator offered, never one the host uses.

use lazybd_tests::eni::{
    addresses, assert_parked, ip, link_by_mac, link_by_name, parking_name, pod_netns, tag,
    unique_mac, with_prev, Call, CniOutput, Eni, OnePod, StandIn,
};
use lazybd_tests::netns::Netns;
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

// --- Trust: `eni` takes only NICs the operator offered, never one the host
// uses, and a pod annotation names a NIC only where the config allows it.

/// Offers `mac` to the plugin the way a hot-plug agent does: one JSON object
/// written under a temporary name and renamed to `available/<12 hex>`.
fn offer(eni: &Eni, mac: &str, entry: &Value) {
    let dir = eni.state_dir().join("available");
    std::fs::create_dir_all(&dir).unwrap();
    let tmp = dir.join(".offer.tmp");
    std::fs::write(&tmp, entry.to_string()).unwrap();
    std::fs::rename(&tmp, dir.join(mac.replace(':', ""))).unwrap();
}

fn withdraw(eni: &Eni, mac: &str) {
    let _ = std::fs::remove_file(eni.state_dir().join("available").join(mac.replace(':', "")));
}

/// `conf` with the MAC named only by the pod annotation (containerd's
/// `io.kubernetes.cri.pod-annotations` capability), as a pod author sets it.
fn annotated(conf: &Value, mac: &str) -> Value {
    let mut c = conf.clone();
    c.as_object_mut().unwrap().remove("mac");
    c["runtimeConfig"] =
        json!({"io.kubernetes.cri.pod-annotations": {"lazybd.io/eni-mac": mac, "other": "x"}});
    c
}

/// Runs the plugin inside `node`, a private netns that plays the node's
/// host netns: there the test can give an uplink a default route without
/// touching the machine's own network.
fn call_in(node: &Netns, eni: &Eni, command: &str, conf: &Value, call: &Call) -> CniOutput {
    use std::io::Write;
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &node.name])
        .arg(&eni.bin)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", "/usr/lib/cni")
        .env("CNI_CONTAINERID", &call.container)
        .env("CNI_IFNAME", &call.ifname)
        .env("CNI_ARGS", &call.args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(n) = &call.netns {
        cmd.env("CNI_NETNS", n);
    }
    let mut child = cmd.spawn().expect("spawn ip netns exec eni");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("wait eni");
    CniOutput {
        success: out.status.success(),
        json: serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A veth end `name` with `mac` inside `node`, its peer `<name>p` there too
/// (both die with the netns).
fn node_nic(node: &Netns, name: &str, mac: &str) {
    let peer = format!("{name}p");
    ip(&[
        "-n", &node.name, "link", "add", name, "address", mac, "type", "veth", "peer", "name",
        &peer,
    ]);
}

#[test]
fn eni_pod_annotation_cannot_take_the_uplink() {
    require_root!();
    let t = tag();
    let eni = Eni::new();
    let node = Netns::create(&format!("{t}n"));
    let pod = Netns::create(&format!("{t}p"));
    // The node's uplink: up, the node's address, the node's default route.
    let up_mac = unique_mac();
    node_nic(&node, "uplink0", &up_mac);
    for dev in ["uplink0", "uplink0p"] {
        ip(&["-n", &node.name, "link", "set", dev, "up"]);
    }
    ip(&[
        "-n",
        &node.name,
        "addr",
        "add",
        "10.66.0.2/24",
        "dev",
        "uplink0",
    ]);
    ip(&[
        "-n",
        &node.name,
        "route",
        "add",
        "default",
        "via",
        "10.66.0.1",
        "dev",
        "uplink0",
    ]);
    let conf = annotated(
        &eni.conf("1.1.0", "ul", &unique_mac(), "10.71.0.0/24"),
        &up_mac,
    );
    let call = Call::new(&format!("{t}-pod"), &pod);
    let untouched = |what: &str| {
        let l = link_by_mac(Some(&node.name), &up_mac)
            .unwrap_or_else(|| panic!("{what}: the uplink left the node"));
        assert_eq!(l.name, "uplink0", "{what}");
        assert!(l.up, "{what}: uplink down");
        let global: Vec<_> = addresses(&node.name, "uplink0")
            .into_iter()
            .filter(|a| !a.starts_with("fe80:"))
            .collect();
        assert_eq!(global, vec!["10.66.0.2/24".to_string()], "{what}");
        let routes = ip(&["-n", &node.name, "route", "show", "default"]);
        assert!(
            routes.contains("via 10.66.0.1 dev uplink0"),
            "{what}: {routes}"
        );
        assert!(link_by_mac(Some(&pod.name), &up_mac).is_none(), "{what}");
        assert!(eni.records().is_empty(), "{what}");
        assert_eq!(eni.ipam_allocations("ul"), 0, "{what}");
    };

    // The annotation is not a MAC source unless the config says so.
    let out = call_in(&node, &eni, "ADD", &conf, &call);
    assert_eq!(out.code(), 105, "{}", out.json);
    assert!(out.msg().contains("allowPodAnnotation"), "{}", out.msg());
    untouched("opt-in off");

    // Allowed, but nobody offered the uplink to eni.
    let mut on = conf.clone();
    on["allowPodAnnotation"] = json!(true);
    let out = call_in(&node, &eni, "ADD", &on, &call);
    assert_eq!(out.code(), 105, "{}", out.json);
    assert!(out.msg().contains(&up_mac), "{}", out.msg());
    untouched("not offered");

    // Even offered by mistake (allowlist, then registry), it carries the
    // node's address and default route: refused.
    let mut listed = on.clone();
    listed["allowedMacs"] = json!([up_mac]);
    let out = call_in(&node, &eni, "ADD", &listed, &call);
    assert_eq!(out.code(), 106, "{}", out.json);
    assert!(out.msg().contains("10.66.0.2/24"), "{}", out.msg());
    untouched("allowlisted");
    offer(&eni, &up_mac, &json!({}));
    let out = call_in(&node, &eni, "ADD", &on, &call);
    assert_eq!(out.code(), 106, "{}", out.json);
    untouched("registered");

    // The runtime's DEL after the refused ADD, and a GC, leave it alone.
    call_in(&node, &eni, "DEL", &on, &call).ok();
    call_in(&node, &eni, "DEL", &on, &call.without_netns()).ok();
    let mut gc = on.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    call_in(&node, &eni, "GC", &gc, &call.without_netns()).ok();
    untouched("after DEL and GC");
}

#[test]
fn eni_refuses_a_listed_nic_that_carries_host_traffic() {
    require_root!();
    let t = tag();
    let eni = Eni::new();
    let node = Netns::create(&format!("{t}n"));
    let pod = Netns::create(&format!("{t}p"));
    let mac = unique_mac();
    node_nic(&node, "nic0", &mac);
    // The network's own `mac`: offered by the operator, yet refused while
    // the host uses it.
    let conf = eni.conf("1.1.0", "hu", &mac, "10.72.0.0/24");
    let call = Call::new(&format!("{t}-pod"), &pod);
    let n = |args: &[&str]| {
        let mut v = vec!["-n", node.name.as_str()];
        v.extend(args);
        ip(&v);
    };
    let refused = |what: &str, needle: &str| {
        let out = call_in(&node, &eni, "ADD", &conf, &call);
        assert_eq!(out.code(), 106, "{what}: {}", out.json);
        assert!(out.msg().contains(needle), "{what}: {}", out.msg());
        let l = link_by_mac(Some(&node.name), &mac).expect("NIC still in the node");
        assert_eq!(l.name, "nic0", "{what}");
        assert!(link_by_mac(Some(&pod.name), &mac).is_none(), "{what}");
        assert!(eni.records().is_empty(), "{what}");
        assert_eq!(eni.ipam_allocations("hu"), 0, "{what}");
    };

    n(&["addr", "add", "10.73.0.2/24", "dev", "nic0"]);
    refused("IPv4 address", "10.73.0.2/24");
    n(&["addr", "flush", "dev", "nic0"]);
    n(&["addr", "add", "fd00:73::2/64", "dev", "nic0", "nodad"]);
    refused("IPv6 address", "fd00:73::2/64");
    n(&["addr", "flush", "dev", "nic0"]);

    // Up with carrier: the kernel gives it an IPv6 link-local address and
    // fe80::/64 / multicast routes, which alone do not count (checked by
    // the successful ADD below).
    n(&["link", "set", "nic0p", "up"]);
    n(&["link", "set", "nic0", "up"]);
    n(&["route", "add", "10.74.0.0/24", "dev", "nic0"]);
    refused("main-table route", "10.74.0.0/24");
    n(&["route", "del", "10.74.0.0/24", "dev", "nic0"]);
    n(&["route", "add", "default", "dev", "nic0", "table", "170"]);
    refused("default route in table 170", "table 170");
    n(&["route", "del", "default", "dev", "nic0", "table", "170"]);
    n(&["nexthop", "add", "id", "4242", "dev", "nic0"]);
    n(&["route", "add", "10.75.0.0/24", "nhid", "4242"]);
    refused("route via a nexthop object", "10.75.0.0/24");
    n(&["route", "del", "10.75.0.0/24"]);
    n(&["nexthop", "del", "id", "4242"]);
    n(&["link", "add", "br0", "type", "bridge"]);
    n(&["link", "set", "nic0", "master", "br0"]);
    refused("bridge port", "br0");
    n(&["link", "set", "nic0", "nomaster"]);
    n(&["link", "del", "br0"]);
    n(&[
        "link", "add", "link", "nic0", "name", "nic0mv", "type", "macvlan",
    ]);
    refused("lower device of a macvlan", "nic0mv");
    n(&["link", "del", "nic0mv"]);

    // Nothing of the host left on it: the normal flow works.
    let result = call_in(&node, &eni, "ADD", &conf, &call).ok();
    assert_eq!(link_by_mac(Some(&pod.name), &mac).unwrap().name, "eth0");
    call_in(&node, &eni, "DEL", &with_prev(&conf, &result), &call).ok();
    assert_eq!(
        link_by_mac(Some(&node.name), &mac).unwrap().name,
        parking_name(&mac)
    );
    assert!(eni.records().is_empty());
}

#[test]
fn eni_takes_only_offered_nics() {
    require_root!();
    let t = tag();
    let eni = Eni::new();
    let ns = Netns::create(&t);
    let mac = unique_mac();
    let nic = StandIn::veth(&format!("{t}e0"), &mac);
    // The MAC comes per call (CNI_ARGS); the config offers nothing itself.
    let mut conf = eni.conf("1.1.0", "of", &mac, "10.76.0.0/24");
    conf.as_object_mut().unwrap().remove("mac");
    let mut call = Call::new(&format!("{t}-pod"), &ns);
    call.args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_UID=uid-1;ENI_MAC={mac}"
    );
    let lock = eni
        .state_dir()
        .join("locks")
        .join(format!("{}.lock", mac.replace(':', "")));
    let refused = |what: &str, needle: &str| {
        let out = eni.call("ADD", &conf, &call);
        assert_eq!(out.code(), 105, "{what}: {}", out.json);
        assert!(out.msg().contains(needle), "{what}: {}", out.msg());
        let l = link_by_mac(None, &mac).expect("NIC still in the host");
        assert_eq!(l.name, nic.name, "{what}");
        assert!(link_by_mac(Some(&ns.name), &mac).is_none(), "{what}");
        assert!(eni.records().is_empty(), "{what}");
        assert_eq!(eni.ipam_allocations("of"), 0, "{what}");
        assert!(!lock.exists(), "{what}: refused before taking a lock");
    };

    refused("not offered", &mac);
    offer(&eni, &mac, &json!({"podUID": "uid-2"}));
    refused("offered to another pod (uid)", "uid-2");
    offer(
        &eni,
        &mac,
        &json!({"podNamespace": "shop", "podName": "web-2"}),
    );
    refused("offered to another pod (name)", "web-2");
    offer(&eni, &mac, &json!({"podUID": "uid-1", "pod": "typo"}));
    refused("entry with an unknown key", "pod");
    // A torn write (the agent did not rename a complete file) fails closed.
    std::fs::write(
        eni.state_dir().join("available").join(mac.replace(':', "")),
        b"",
    )
    .unwrap();
    refused("empty entry", "available");

    // Offered to this pod: the normal flow.
    offer(
        &eni,
        &mac,
        &json!({"podUID": "uid-1", "podNamespace": "shop", "podName": "web-1"}),
    );
    let result = eni.call("ADD", &conf, &call).ok();
    assert_eq!(link_by_mac(Some(&ns.name), &mac).unwrap().name, "eth0");
    eni.call("DEL", &with_prev(&conf, &result), &call).ok();
    assert_eq!(link_by_mac(None, &mac).unwrap().name, parking_name(&mac));

    // The allowlist in the config offers it as well.
    withdraw(&eni, &mac);
    let mut listed = conf.clone();
    listed["allowedMacs"] = json!([mac]);
    let result = eni.call("ADD", &listed, &call).ok();
    assert_eq!(link_by_mac(Some(&ns.name), &mac).unwrap().name, "eth0");
    eni.call("DEL", &with_prev(&listed, &result), &call).ok();
    assert_eq!(link_by_mac(None, &mac).unwrap().name, parking_name(&mac));
    assert!(eni.records().is_empty());
    assert_eq!(eni.ipam_allocations("of"), 0);
}

#[test]
fn eni_pod_annotation_is_refused_without_the_opt_in() {
    require_root!();
    let t = tag();
    let eni = Eni::new();
    let ns = Netns::create(&t);
    let (mac_a, mac_b) = (unique_mac(), unique_mac());
    let nic_a = StandIn::veth(&format!("{t}a0"), &mac_a);
    let nic_b = StandIn::veth(&format!("{t}b0"), &mac_b);
    // The network's own NIC is A; B is offered too. The pod asks for B.
    let mut conf = eni.conf("1.1.0", "an", &mac_a, "10.77.0.0/24");
    conf["allowedMacs"] = json!([mac_b]);
    conf["runtimeConfig"] =
        json!({"io.kubernetes.cri.pod-annotations": {"lazybd.io/eni-mac": mac_b}});
    let call = Call::new(&format!("{t}-pod"), &ns);

    let out = eni.call("ADD", &conf, &call);
    assert_eq!(out.code(), 105, "{}", out.json);
    assert!(out.msg().contains("lazybd.io/eni-mac"), "{}", out.msg());
    assert_eq!(link_by_mac(None, &mac_a).unwrap().name, nic_a.name);
    assert_eq!(link_by_mac(None, &mac_b).unwrap().name, nic_b.name);
    assert!(eni.records().is_empty());
    assert_eq!(eni.ipam_allocations("an"), 0);
    eni.call("DEL", &conf, &call).ok();

    // With the opt-in the annotation picks B; A stays where it is.
    conf["allowPodAnnotation"] = json!(true);
    let result = eni.call("ADD", &conf, &call).ok();
    assert_eq!(result["interfaces"][0]["mac"], mac_b.as_str());
    assert_eq!(link_by_mac(Some(&ns.name), &mac_b).unwrap().name, "eth0");
    assert_eq!(link_by_mac(None, &mac_a).unwrap().name, nic_a.name);
    eni.call("CHECK", &with_prev(&conf, &result), &call).ok();
    eni.call("DEL", &with_prev(&conf, &result), &call).ok();
    assert_eq!(
        link_by_mac(None, &mac_b).unwrap().name,
        parking_name(&mac_b)
    );
    assert!(eni.records().is_empty());
}

#[test]
fn eni_own_record_is_no_licence_to_take_a_nic_the_host_now_uses() {
    require_root!();
    let t = tag();
    let eni = Eni::new();
    let node = Netns::create(&format!("{t}n"));
    let pod = Netns::create(&format!("{t}p"));
    let mac = unique_mac();
    node_nic(&node, "nic0", &mac);
    let conf = eni.conf("1.1.0", "ru", &mac, "10.78.0.0/24");
    let call = Call::new(&format!("{t}-pod"), &pod);
    // This attachment's ADD stopped after recording the ENI, before moving
    // it; since then the node has put its own address on the NIC.
    let enis = eni.state_dir().join("enis");
    std::fs::create_dir_all(&enis).unwrap();
    let rec = json!({
        "mac": mac, "network": "ru", "containerID": call.container, "ifname": "eth0",
        "netns": pod.path(), "phase": "adding", "hostName": "nic0",
    });
    std::fs::write(
        enis.join(format!("{}.json", mac.replace(':', ""))),
        rec.to_string(),
    )
    .unwrap();
    ip(&[
        "-n",
        &node.name,
        "addr",
        "add",
        "10.79.0.2/24",
        "dev",
        "nic0",
    ]);
    let untouched = |what: &str| {
        let l = link_by_mac(Some(&node.name), &mac).expect("NIC still in the node");
        assert_eq!(l.name, "nic0", "{what}");
        assert_eq!(
            addresses(&node.name, "nic0"),
            vec!["10.79.0.2/24".to_string()],
            "{what}"
        );
        assert!(link_by_mac(Some(&pod.name), &mac).is_none(), "{what}");
    };

    let out = call_in(&node, &eni, "ADD", &conf, &call);
    assert_eq!(out.code(), 106, "{}", out.json);
    untouched("retried ADD");
    // The runtime's DEL drops the record and leaves the host's NIC as it is
    // (no parking rename).
    call_in(&node, &eni, "DEL", &conf, &call).ok();
    untouched("DEL");
    assert!(eni.records().is_empty());
    assert_eq!(eni.ipam_allocations("ru"), 0);
}
