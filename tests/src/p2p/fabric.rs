//! The network of one P2P test: a "hub" netns with a bridge (10.213.N.1)
//! and one netns per node on it (10.213.N.(10+i)); for the benchmark also
//! the registry's side of a shaped datacenter link (10.213.N.2).

use std::process::Command;

use crate::netns::Netns;

/// The hub and node namespaces of one test, all deleted on drop (which
/// also removes the bridge and every veth inside them).
pub struct Fabric {
    pub subnet: u8,
    /// Dropped (deleted) before the hub, as they were made after it.
    pub nodes: Vec<Netns>,
    pub hub: Netns,
}

impl Fabric {
    /// The fabric on 10.213.`subnet`.0/24 with `nodes` nodes. Tests that may
    /// run at the same time take different subnets (namespace names carry it).
    pub fn new(subnet: u8, nodes: usize) -> Fabric {
        let tag = format!("lzbp2p{subnet}");
        let hub = Netns::create(&format!("{tag}-hub"));
        hub.ip(&["link", "set", "lo", "up"]);
        hub.ip(&["link", "add", "br0", "type", "bridge"]);
        let hub_cidr = format!("{}/24", hub_ip(subnet));
        hub.ip(&["addr", "add", &hub_cidr, "dev", "br0"]);
        hub.ip(&["link", "set", "br0", "up"]);
        let mut f = Fabric {
            subnet,
            nodes: Vec::new(),
            hub,
        };
        for i in 0..nodes {
            let ns = Netns::create(&format!("{tag}-n{i}"));
            f.plug(&ns, &format!("v{i}"), &f.node_ip(i));
            f.nodes.push(ns);
        }
        f
    }

    /// Connects `ns` to the hub's bridge: a veth `hub_end` on the bridge,
    /// its peer `eth0` in `ns` at `ip`/24.
    fn plug(&self, ns: &Netns, hub_end: &str, ip: &str) {
        self.hub.ip(&[
            "link", "add", hub_end, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        self.hub
            .ip(&["link", "set", hub_end, "master", "br0", "up"]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
    }

    pub fn hub_ip(&self) -> String {
        hub_ip(self.subnet)
    }

    pub fn node_ip(&self, i: usize) -> String {
        format!("10.213.{}.{}", self.subnet, 10 + i)
    }
}

fn hub_ip(subnet: u8) -> String {
    format!("10.213.{subnet}.1")
}

/// The registry's side of the datacenter link: its own netns on the bridge
/// at 10.213.N.2 whose egress is shaped with tc tbf, so both direct reads
/// and the super node's misses pay for the registry's bandwidth.
pub struct RegistryLink {
    pub ns: Netns,
    pub ip: String,
}

impl RegistryLink {
    pub fn new(f: &Fabric, rate: &str) -> RegistryLink {
        let ns = Netns::create(&format!("lzbp2p{}-reg", f.subnet));
        let ip = format!("10.213.{}.2", f.subnet);
        f.plug(&ns, "vreg", &ip);
        let out = Command::new("ip")
            .args([
                "netns", "exec", &ns.name, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
            ])
            .args(["rate", rate, "burst", "256kb", "latency", "500ms"])
            .output()
            .expect("run tc");
        assert!(
            out.status.success(),
            "tc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        RegistryLink { ns, ip }
    }
}
