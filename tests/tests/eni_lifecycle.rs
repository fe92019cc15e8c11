//! The `eni` plugin's promise: no NIC is lost. The name-collision scenario
//! step by step, a pod netns that vanishes before DEL, repeated DEL, crash
//! recovery from the on-disk state, GC, and 20 pods at once; ownership: a
//! NIC another pod is adding, or one eni never moved, is left alone.

use lazybd_tests::eni::{
    assert_parked, ip, link_by_mac, link_by_name, parking_name, pod_netns, tag, unique_mac,
    with_prev, Call, Eni, OnePod, StandIn,
};
use lazybd_tests::netns::Netns;
use lazybd_tests::require_root;
use serde_json::json;

#[test]
fn eni_collision_on_the_old_name_loses_nothing() {
    require_root!();
    let t = tag();
    let eni = Eni::new();
    let ns = pod_netns(&t);
    let mac = unique_mac();
    // 1. Pod A's ENI arrives in the host as "<tag>eth1".
    let old_name = format!("{t}eth1");
    let _nic = StandIn::veth(&old_name, &mac);
    let conf = eni.conf("1.1.0", "col", &mac, "10.81.0.0/24");
    let a = Call::new(&format!("{t}-a"), &ns);

    // 2. ADD for pod A: the ENI leaves the host, its old name is free.
    let result = eni.call("ADD", &conf, &a).ok();
    assert!(link_by_name(None, &old_name).is_none());

    // 3. A new NIC is hot-plugged and gets A's old name.
    let newcomer_mac = unique_mac();
    let _newcomer = StandIn::veth(&old_name, &newcomer_mac);
    assert_eq!(link_by_name(None, &old_name).unwrap().mac, newcomer_mac);

    // 4. DEL for pod A succeeds; A's ENI is home under its MAC-derived name.
    eni.call("DEL", &with_prev(&conf, &result), &a).ok();
    let home = link_by_mac(None, &mac).expect("A's ENI is back in the host");
    assert_eq!(home.name, parking_name(&mac));
    assert!(
        link_by_mac(Some(&ns.name), &mac).is_none(),
        "nothing left in the pod"
    );
    // The newcomer kept its name and MAC.
    assert_eq!(link_by_name(None, &old_name).unwrap().mac, newcomer_mac);
    // State is up to date.
    assert!(eni.records().is_empty());
    assert_eq!(eni.ipam_allocations("col"), 0);

    // 5. The next start of pod A finds its ENI by MAC.
    let again = eni.call("ADD", &conf, &a).ok();
    assert_eq!(again["interfaces"][0]["mac"], mac.as_str());
    assert_eq!(link_by_mac(Some(&ns.name), &mac).unwrap().name, "eth0");
    eni.call("DEL", &with_prev(&conf, &again), &a).ok();
    assert_parked(&mac);
}

#[test]
fn eni_netns_gone_before_del_device_returned_as_dev_n() {
    require_root!();
    let pod = OnePod::create();
    let (eni, ns, mac, call) = (&pod.eni, &pod.ns, &pod.mac, &pod.call);
    let conf = eni.conf("1.1.0", "gone", mac, "10.82.0.0/24");
    let result = eni.call("ADD", &conf, call).ok();

    // What the kernel does to a physical NIC when its netns is destroyed:
    // it lands in init_net as dev<ifindex> (veth would be destroyed instead,
    // so the test does the return itself), then the netns goes away.
    let dev_name = format!("dev{}", 90000 + (std::process::id() % 9999));
    ip(&[
        "-n", &ns.name, "link", "set", "eth0", "netns", "1", "name", &dev_name,
    ]);
    ns.delete();

    // DEL with the vanished netns path, and again with CNI_NETNS unset
    // (containerd's case once the netns is closed): both succeed.
    eni.call("DEL", &with_prev(&conf, &result), call).ok();
    let home = link_by_mac(None, mac).expect("ENI in the host");
    assert_eq!(home.name, parking_name(mac), "renamed from {dev_name}");
    assert!(eni.records().is_empty());
    assert_eq!(eni.ipam_allocations("gone"), 0);
    eni.call("DEL", &with_prev(&conf, &result), &call.without_netns())
        .ok();
    eni.call("DEL", &conf, call).ok();
    assert_parked(mac);
}

#[test]
fn eni_del_without_netns_or_mac_uses_state_and_is_idempotent() {
    require_root!();
    let pod = OnePod::create();
    let (eni, mac, call) = (&pod.eni, &pod.mac, &pod.call);
    // The MAC comes from CNI_ARGS on ADD only; DEL must find it in state.
    let mut conf = eni.conf("1.1.0", "st", mac, "10.83.0.0/24");
    conf.as_object_mut().unwrap().remove("mac");
    conf["allowedMacs"] = json!([mac]);
    let mut call = call.clone();
    let plain = call.clone();
    call.args = format!("IgnoreUnknown=1;ENI_MAC={mac}");
    eni.call("ADD", &conf, &call).ok();

    // DEL with neither a MAC in config/CNI_ARGS nor a prevResult: the
    // record for (container, ifname) names the ENI.
    eni.call("DEL", &conf, &plain).ok();
    assert_parked(mac);
    assert!(eni.records().is_empty());
    for _ in 0..2 {
        eni.call("DEL", &conf, &plain).ok();
        eni.call("DEL", &conf, &plain.without_netns()).ok();
    }
    assert_eq!(eni.ipam_allocations("st"), 0);
}

#[test]
fn eni_virtual_stand_in_destroyed_with_netns_del_succeeds() {
    require_root!();
    let pod = OnePod::create();
    let (eni, ns, mac, call) = (&pod.eni, &pod.ns, &pod.mac, &pod.call);
    let conf = eni.conf("1.1.0", "vd", mac, "10.84.0.0/24");
    let result = eni.call("ADD", &conf, call).ok();
    ns.delete();
    eni.call("DEL", &with_prev(&conf, &result), call).ok();
    assert!(
        link_by_mac(None, mac).is_none(),
        "a veth dies with its netns"
    );
    assert!(eni.records().is_empty());
    assert_eq!(eni.ipam_allocations("vd"), 0);
}

/// Writes the record an ADD that crashed after the move would have left.
fn crashed_add_record(eni: &Eni, mac: &str, container: &str, ns: &Netns, host_name: &str) {
    let dir = eni.state_dir().join("enis");
    std::fs::create_dir_all(&dir).unwrap();
    let rec = json!({
        "mac": mac, "network": "cr", "containerID": container, "ifname": "eth0",
        "netns": ns.path(), "phase": "adding", "hostName": host_name,
    });
    std::fs::write(
        dir.join(format!("{}.json", mac.replace(':', ""))),
        rec.to_string(),
    )
    .unwrap();
}

#[test]
fn eni_crash_mid_add_is_recovered_by_del_or_a_retried_add() {
    require_root!();
    let t = tag();
    let eni = Eni::new();
    let ns = pod_netns(&t);
    let mac = unique_mac();
    let name = format!("{t}e0");
    let _nic = StandIn::veth(&name, &mac);
    let conf = eni.conf("1.1.0", "cr", &mac, "10.85.0.0/24");
    let call = Call::new(&format!("{t}-pod"), &ns);

    // Crash right after the move: the ENI sits in the pod under its parking
    // name, the record says "adding". The runtime's DEL brings it home.
    ip(&[
        "link",
        "set",
        &name,
        "netns",
        &ns.name,
        "name",
        &parking_name(&mac),
    ]);
    crashed_add_record(&eni, &mac, &call.container, &ns, &name);
    eni.call("DEL", &conf, &call).ok();
    assert_parked(&mac);
    assert!(eni.records().is_empty());

    // Same crash, but the runtime retries ADD: it resumes from the pod.
    ip(&["link", "set", &parking_name(&mac), "netns", &ns.name]);
    crashed_add_record(&eni, &mac, &call.container, &ns, &name);
    let result = eni.call("ADD", &conf, &call).ok();
    assert_eq!(link_by_mac(Some(&ns.name), &mac).unwrap().name, "eth0");
    assert_eq!(eni.records()[0]["phase"], "attached");
    eni.call("CHECK", &with_prev(&conf, &result), &call).ok();
    eni.call("DEL", &with_prev(&conf, &result), &call).ok();
    assert_parked(&mac);

    // Crash before the move (record written, ENI still under its udev
    // name, netns already gone): DEL parks it in the host.
    let gone = pod_netns(&format!("{t}g"));
    crashed_add_record(&eni, &mac, &call.container, &gone, &name);
    ip(&["link", "set", &parking_name(&mac), "name", &name]);
    gone.delete();
    eni.call(
        "DEL",
        &conf,
        &Call {
            netns: Some(gone.path()),
            ..call.clone()
        },
    )
    .ok();
    assert_parked(&mac);
    assert!(eni.records().is_empty());
    assert_eq!(eni.ipam_allocations("cr"), 0);
}

#[test]
fn eni_gc_releases_attachments_the_runtime_no_longer_lists() {
    require_root!();
    let t = tag();
    let eni = Eni::new();
    let (ns_keep, ns_lost) = (pod_netns(&format!("{t}k")), pod_netns(&format!("{t}l")));
    let (mac_keep, mac_lost) = (unique_mac(), unique_mac());
    let _n1 = StandIn::veth(&format!("{t}k0"), &mac_keep);
    let _n2 = StandIn::veth(&format!("{t}l0"), &mac_lost);
    let keep = Call::new(&format!("{t}-keep"), &ns_keep);
    let lost = Call::new(&format!("{t}-lost"), &ns_lost);
    let conf_keep = eni.conf("1.1.0", "gc", &mac_keep, "10.86.0.0/24");
    let conf_lost = eni.conf("1.1.0", "gc", &mac_lost, "10.86.0.0/24");
    let r_keep = eni.call("ADD", &conf_keep, &keep).ok();
    eni.call("ADD", &conf_lost, &lost).ok();
    assert_eq!(eni.ipam_allocations("gc"), 2);

    eni.call("STATUS", &conf_keep, &keep).ok();

    // The runtime lost "lost" without a DEL; GC lists only "keep".
    let mut gc = conf_keep.clone();
    gc.as_object_mut().unwrap().remove("mac");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": keep.container, "ifname": "eth0"}]);
    let gc_call = Call {
        container: String::new(),
        netns: None,
        ifname: String::new(),
        args: String::new(),
    };
    eni.call("GC", &gc, &gc_call).ok();

    assert_eq!(
        link_by_mac(None, &mac_lost).unwrap().name,
        parking_name(&mac_lost)
    );
    assert_eq!(
        link_by_mac(Some(&ns_keep.name), &mac_keep).unwrap().name,
        "eth0"
    );
    let recs = eni.records();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["containerID"], keep.container.as_str());
    assert_eq!(eni.ipam_allocations("gc"), 1);
    eni.call("CHECK", &with_prev(&conf_keep, &r_keep), &keep)
        .ok();

    // A GC for another network leaves ours alone; an empty list releases it.
    let mut other = gc.clone();
    other["name"] = json!("other-net");
    other["cni.dev/valid-attachments"] = json!([]);
    eni.call("GC", &other, &gc_call).ok();
    assert_eq!(eni.records().len(), 1);
    gc["cni.dev/valid-attachments"] = json!([]);
    eni.call("GC", &gc, &gc_call).ok();
    assert!(eni.records().is_empty());
    assert_eq!(
        link_by_mac(None, &mac_keep).unwrap().name,
        parking_name(&mac_keep)
    );
    assert_eq!(eni.ipam_allocations("gc"), 0);
}

#[test]
fn eni_twenty_pods_concurrently_without_leaks() {
    require_root!();
    const PODS: usize = 20;
    let eni = Eni::new();
    let pods: Vec<_> = (0..PODS)
        .map(|i| {
            let t = tag();
            let mac = unique_mac();
            let nic = StandIn::veth(&format!("{t}e0"), &mac);
            let ns = pod_netns(&t);
            let call = Call::new(&format!("{t}-pod{i}"), &ns);
            (mac, nic, ns, call)
        })
        .collect();
    std::thread::scope(|s| {
        for (mac, _, ns, call) in &pods {
            let eni = &eni;
            s.spawn(move || {
                // One network, one shared host-local pool and state dir.
                let conf = eni.conf("1.1.0", "many", mac, "10.87.0.0/24");
                let r = eni.call("ADD", &conf, call).ok();
                assert_eq!(link_by_mac(Some(&ns.name), mac).unwrap().name, "eth0");
                eni.call("CHECK", &with_prev(&conf, &r), call).ok();
                eni.call("DEL", &with_prev(&conf, &r), call).ok();
            });
        }
    });
    for (mac, _, ns, _) in &pods {
        assert_eq!(link_by_mac(None, mac).unwrap().name, parking_name(mac));
        assert!(link_by_mac(Some(&ns.name), mac).is_none());
    }
    assert!(eni.records().is_empty());
    assert_eq!(eni.ipam_allocations("many"), 0);
}

#[test]
fn eni_another_pods_eni_in_its_adding_phase_is_not_taken() {
    require_root!();
    let t = tag();
    let eni = Eni::new();
    let (ns_a, ns_b) = (
        Netns::create(&format!("{t}a")),
        Netns::create(&format!("{t}b")),
    );
    let mac = unique_mac();
    let name = format!("{t}e0");
    let _nic = StandIn::veth(&name, &mac);
    let conf = eni.conf("1.1.0", "cr", &mac, "10.88.0.0/24");
    let a = Call::new(&format!("{t}-a"), &ns_a);
    let b = Call::new(&format!("{t}-b"), &ns_b);
    // Pod A's ADD stopped after recording the ENI, before moving it.
    crashed_add_record(&eni, &mac, &a.container, &ns_a, &name);

    let out = eni.call("ADD", &conf, &b);
    assert_eq!(out.code(), 100, "{}", out.json);
    assert!(out.msg().contains(&a.container), "{}", out.msg());
    eni.call("DEL", &conf, &b).ok();
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": a.container, "ifname": "eth0"}]);
    eni.call("GC", &gc, &b.without_netns()).ok();
    assert_eq!(link_by_mac(None, &mac).unwrap().name, name, "untouched");
    assert!(link_by_mac(Some(&ns_b.name), &mac).is_none());
    let recs = eni.records();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["containerID"], a.container.as_str());
    assert_eq!(recs[0]["phase"], "adding");
    assert_eq!(eni.ipam_allocations("cr"), 0);

    // A's retried ADD completes; its DEL brings the ENI home.
    let result = eni.call("ADD", &conf, &a).ok();
    assert_eq!(link_by_mac(Some(&ns_a.name), &mac).unwrap().name, "eth0");
    eni.call("DEL", &with_prev(&conf, &result), &a).ok();
    assert_eq!(link_by_mac(None, &mac).unwrap().name, parking_name(&mac));
    assert!(eni.records().is_empty());
}

#[test]
fn eni_leaves_a_nic_it_did_not_move_alone() {
    require_root!();
    // Another plugin (say an SR-IOV VF) put a NIC into the pod. A DEL or ADD
    // that names its MAC must not take it: eni acts only on what it recorded.
    let t = tag();
    let eni = Eni::new();
    let ns = Netns::create(&t);
    let mac = unique_mac();
    let name = format!("{t}vf");
    let _nic = StandIn::veth(&name, &mac);
    ip(&["link", "set", &name, "netns", &ns.name, "name", "net1"]);
    let mut conf = eni.conf("1.1.0", "nm", &mac, "10.89.0.0/24");
    conf.as_object_mut().unwrap().remove("mac");
    conf["allowedMacs"] = json!([mac]);
    let mut call = Call::new(&format!("{t}-pod"), &ns);
    call.args = format!("IgnoreUnknown=1;ENI_MAC={mac}");
    let prev = json!({
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "eth0", "mac": mac, "sandbox": ns.path()}],
    });
    let untouched = |what: &str| {
        let l = link_by_mac(Some(&ns.name), &mac).expect("NIC still in the pod");
        assert_eq!(l.name, "net1", "{what}");
        assert!(link_by_mac(None, &mac).is_none(), "{what}");
        assert!(eni.records().is_empty(), "{what}");
    };

    eni.call("DEL", &with_prev(&conf, &prev), &call).ok();
    untouched("DEL with prevResult and ENI_MAC");
    eni.call("DEL", &conf, &call).ok();
    untouched("DEL with ENI_MAC");
    let out = eni.call("ADD", &conf, &call);
    assert_eq!(out.code(), 105, "{}", out.json);
    untouched("ADD");
    assert_eq!(eni.ipam_allocations("nm"), 0);
}
