//! Whether a link in the host netns carries the host's own traffic. `eni`
//! never moves such a link, however it was offered: moving the node's
//! uplink, a bond or bridge port, or the lower device of a VLAN cuts the
//! node (and every pod on it) off.
//!
//! A link is in host use when, in the host netns, it has
//! * an address of global or site scope (IPv4 or IPv6);
//! * a route leaving through it in any table but `local` (directly, as a
//!   multipath leg, or through a nexthop object), which covers the default
//!   route; IPv6 link-local and multicast routes do not count, the kernel
//!   adds them to every link that is up;
//! * a controller: it is a port of a bridge, bond or VRF;
//! * an upper device stacked on it (VLAN, macvlan, ipvlan, ...).
//!
//! A parked ENI (down, no addresses) passes, and so does a freshly
//! hot-plugged one as long as the host's network manager leaves it alone.

use std::collections::HashMap;

use ipnet::IpNet;

use crate::error::{CniError, Result};
use crate::link::{Addr, Link, Netlink, RouteEntry};
use crate::mac::Mac;
use crate::nexthop;

const RT_TABLE_LOCAL: u32 = 255;
const RT_TABLE_MAIN: u32 = 254;

/// What the host netns looks like at one moment.
#[derive(Debug, Default)]
pub struct HostView {
    pub links: Vec<Link>,
    pub addrs: Vec<Addr>,
    pub routes: Vec<RouteEntry>,
    /// Nexthop id -> links; read only when a route uses nexthop objects.
    pub nexthops: HashMap<u32, Vec<u32>>,
}

/// Refuses (code 106) if `eni` carries the host's traffic.
pub async fn refuse_if_used(host_nl: &Netlink, eni: &Link, mac: Mac) -> Result<()> {
    let view = HostView::read(host_nl).await?;
    let why = view.uses(eni);
    if why.is_empty() {
        return Ok(());
    }
    Err(CniError::HostInUse {
        link: eni.name.clone(),
        mac: mac.to_string(),
        why: why.join("; "),
    })
}

impl HostView {
    pub async fn read(host_nl: &Netlink) -> Result<HostView> {
        let routes = host_nl.all_routes().await?;
        let nexthops = if routes.iter().any(|r| r.nh_id.is_some()) {
            nexthop::links_by_id().await?
        } else {
            HashMap::new()
        };
        Ok(HostView {
            links: host_nl.links().await?,
            addrs: host_nl.all_addresses().await?,
            routes,
            nexthops,
        })
    }

    /// Every way the host uses `eni`; empty if it does not.
    pub fn uses(&self, eni: &Link) -> Vec<String> {
        let mut why: Vec<String> = self
            .addrs
            .iter()
            .filter(|a| a.index == eni.index && a.global)
            .map(|a| format!("address {}", a.net))
            .collect();
        for r in &self.routes {
            if r.table == RT_TABLE_LOCAL || kernel_link_route(r.dst) {
                continue;
            }
            let table = match r.table {
                RT_TABLE_MAIN => "main".to_string(),
                t => t.to_string(),
            };
            if r.oifs.contains(&eni.index) {
                why.push(format!("route {} (table {table})", r.dst));
            }
            match r.nh_id.map(|id| (id, self.nexthops.get(&id))) {
                Some((_, Some(links))) if links.contains(&eni.index) => {
                    why.push(format!("route {} (table {table})", r.dst))
                }
                // Vanished between the two dumps: it could be via this link.
                Some((id, None)) => why.push(format!(
                    "route {} (table {table}) via nexthop {id}, which could not be resolved",
                    r.dst
                )),
                _ => {}
            }
        }
        if let Some(c) = eni.controller {
            why.push(format!("port of {}", self.describe(c)));
        }
        for upper in &self.links {
            // A veth's IFLA_LINK is its peer, not a device stacked on it.
            let stacked = upper.lower == Some(eni.index)
                && upper.index != eni.index
                && upper.kind.as_deref() != Some("veth");
            if stacked {
                why.push(format!("lower device of {}", self.describe(upper.index)));
            }
        }
        why
    }

    fn describe(&self, index: u32) -> String {
        match self.links.iter().find(|l| l.index == index) {
            Some(l) => match &l.kind {
                Some(k) => format!("{} ({k})", l.name),
                None => l.name.clone(),
            },
            None => format!("ifindex {index}"),
        }
    }
}

/// IPv6 link-local (fe80::/10) and multicast (ff00::/8) routes, which the
/// kernel puts on every link that is up.
fn kernel_link_route(dst: IpNet) -> bool {
    match dst {
        IpNet::V6(n) => {
            let first = n.network().segments()[0];
            (n.prefix_len() >= 10 && first & 0xffc0 == 0xfe80)
                || (n.prefix_len() >= 8 && first & 0xff00 == 0xff00)
        }
        IpNet::V4(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str) -> Link {
        Link {
            index,
            name: name.into(),
            mac: None,
            perm_mac: None,
            kind: None,
            up: false,
            mtu: 1500,
            controller: None,
            lower: None,
        }
    }

    fn route(table: u32, dst: &str, oifs: &[u32], nh_id: Option<u32>) -> RouteEntry {
        RouteEntry {
            table,
            dst: dst.parse().unwrap(),
            gw: None,
            oifs: oifs.to_vec(),
            nh_id,
        }
    }

    fn addr(index: u32, net: &str, global: bool) -> Addr {
        Addr {
            index,
            net: net.parse().unwrap(),
            global,
        }
    }

    #[test]
    fn a_clean_link_is_free_even_when_up_with_ipv6_link_local() {
        let eni = link(5, "eth1");
        let view = HostView {
            links: vec![link(2, "eth0"), eni.clone()],
            addrs: vec![addr(5, "fe80::1/64", false), addr(2, "10.0.0.2/24", true)],
            routes: vec![
                route(254, "fe80::/64", &[5], None),
                route(255, "ff00::/8", &[5], None),
                route(255, "10.0.0.2/32", &[5], None),
                route(254, "0.0.0.0/0", &[2], None),
            ],
            nexthops: HashMap::new(),
        };
        assert!(view.uses(&eni).is_empty(), "{:?}", view.uses(&eni));
    }

    #[test]
    fn every_kind_of_host_use_is_named() {
        let mut eni = link(5, "eth1");
        eni.controller = Some(9);
        let mut bridge = link(9, "br0");
        bridge.kind = Some("bridge".into());
        let mut vlan = link(10, "eth1.5");
        vlan.kind = Some("vlan".into());
        vlan.lower = Some(5);
        let mut peer = link(11, "peer");
        peer.kind = Some("veth".into());
        peer.lower = Some(5);
        let view = HostView {
            links: vec![eni.clone(), bridge, vlan, peer],
            addrs: vec![addr(5, "2001:db8::5/64", true)],
            routes: vec![
                route(254, "10.1.0.0/16", &[5], None),
                route(170, "0.0.0.0/0", &[5], None),
                route(254, "10.2.0.0/16", &[3, 5], None),
                route(254, "10.3.0.0/16", &[], Some(42)),
                route(254, "10.4.0.0/16", &[], Some(43)),
                route(254, "10.5.0.0/16", &[], Some(44)),
            ],
            nexthops: HashMap::from([(42, vec![5]), (43, vec![3])]),
        };
        let why = view.uses(&eni).join("; ");
        for needle in [
            "address 2001:db8::5/64",
            "route 10.1.0.0/16 (table main)",
            "route 0.0.0.0/0 (table 170)",
            "route 10.2.0.0/16",
            "route 10.3.0.0/16",
            "nexthop 44",
            "port of br0 (bridge)",
            "lower device of eth1.5 (vlan)",
        ] {
            assert!(why.contains(needle), "{needle} missing from {why}");
        }
        assert!(!why.contains("10.4.0.0/16"), "{why}");
        assert!(!why.contains("peer"), "a veth peer is not an upper: {why}");
    }
}
