//! Links, addresses and routes of one netns, over a netlink socket.

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::error::{CniError, Result};
use crate::mac::Mac;
use crate::netns::Netns;

/// A link as seen in one netns at one moment. The index is only good for
/// the current operation: it can change when the link changes netns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<Mac>,
    pub perm_mac: Option<Mac>,
    /// `IFLA_INFO_KIND`; physical NICs have none.
    pub kind: Option<String>,
    pub up: bool,
    pub mtu: u32,
    /// `IFLA_MASTER`: the bridge, bond or VRF this link is a port of.
    pub controller: Option<u32>,
    /// `IFLA_LINK` when it names a link in the same netns: the lower device
    /// of a VLAN/macvlan/ipvlan, or a veth's peer.
    pub lower: Option<u32>,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Link {
        let mut l = Link {
            index: m.header.index,
            name: String::new(),
            mac: None,
            perm_mac: None,
            kind: None,
            up: m.header.flags.contains(LinkFlags::Up),
            mtu: 0,
            controller: None,
            lower: None,
        };
        let mut other_netns = false;
        for a in &m.attributes {
            match a {
                LinkAttribute::Controller(i) => l.controller = Some(*i).filter(|i| *i != 0),
                LinkAttribute::Link(i) => l.lower = Some(*i).filter(|i| *i != 0),
                LinkAttribute::LinkNetNsId(_) => other_netns = true,
                LinkAttribute::IfName(n) => l.name = n.clone(),
                LinkAttribute::Address(b) => l.mac = Mac::from_bytes(b),
                LinkAttribute::PermAddress(b) => l.perm_mac = Mac::from_bytes(b),
                LinkAttribute::Mtu(v) => l.mtu = *v,
                LinkAttribute::LinkInfo(infos) => {
                    l.kind = infos.iter().find_map(|i| match i {
                        LinkInfo::Kind(k) => Some(k.to_string()),
                        _ => None,
                    })
                }
                _ => {}
            }
        }
        if other_netns {
            l.lower = None;
        }
        l
    }

    /// Whether this link can be the ENI with `mac`. Only physical links
    /// count (virtual children such as ipvlan/macvlan/VLAN/bond share or copy
    /// their parent's MAC), plus the stand-in kinds a test config names.
    fn is_eni(&self, mac: Mac, stand_in_kinds: &[String]) -> bool {
        let kind_ok = match &self.kind {
            None => true,
            Some(k) => stand_in_kinds.iter().any(|s| s == k),
        };
        kind_ok && (self.mac == Some(mac) || self.perm_mac == Some(mac))
    }
}

/// Netlink requests against one netns.
pub struct Netlink {
    handle: Handle,
    label: String,
}

impl Netlink {
    pub fn new(handle: Handle, label: String) -> Netlink {
        Netlink { handle, label }
    }

    fn ctx(&self, what: impl std::fmt::Display) -> String {
        format!("{what} (netns {})", self.label)
    }

    pub async fn links(&self) -> Result<Vec<Link>> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| CniError::netlink(self.ctx("list links"), e))?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    /// The ENI with `mac` in this netns, if it is here. Two candidates mean
    /// the MAC does not identify one NIC, which is refused.
    pub async fn find_eni(&self, mac: Mac, stand_in_kinds: &[String]) -> Result<Option<Link>> {
        let mut found: Vec<Link> = self
            .links()
            .await?
            .into_iter()
            .filter(|l| l.is_eni(mac, stand_in_kinds))
            .collect();
        match found.len() {
            0 | 1 => Ok(found.pop()),
            _ => Err(CniError::AmbiguousMac(format!(
                "{mac} matches several links in netns {}: {}",
                self.label,
                found
                    .iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    pub async fn by_name(&self, name: &str) -> Result<Option<Link>> {
        Ok(self.links().await?.into_iter().find(|l| l.name == name))
    }

    async fn set(&self, what: String, msg: LinkMessage) -> Result<()> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| CniError::netlink(self.ctx(what), e))
    }

    pub async fn set_up(&self, link: &Link, up: bool) -> Result<()> {
        let b = LinkUnspec::new_with_index(link.index);
        let b = if up { b.up() } else { b.down() };
        let what = format!("set {} {}", link.name, if up { "up" } else { "down" });
        self.set(what, b.build()).await
    }

    pub async fn rename(&self, link: &Link, name: &str) -> Result<()> {
        let msg = LinkUnspec::new_with_index(link.index).name(name).build();
        self.set(format!("rename {} to {name}", link.name), msg)
            .await
    }

    pub async fn set_mtu(&self, link: &Link, mtu: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(link.index).mtu(mtu).build();
        self.set(format!("set mtu {mtu} on {}", link.name), msg)
            .await
    }

    /// Moves `link` into `target` under `name`, in one RTM_SETLINK. The
    /// kernel does both under RTNL, so nobody can take `name` in between; it
    /// fails with EEXIST if `name` is already taken in `target`.
    pub async fn move_to(&self, link: &Link, target: &Netns, name: &str) -> Result<()> {
        let msg = LinkUnspec::new_with_index(link.index)
            .setns_by_fd(target.raw_fd())
            .name(name)
            .build();
        let what = format!(
            "move {} to netns {} as {name}",
            link.name,
            target.path().display()
        );
        self.set(what, msg).await
    }

    pub async fn addresses(&self, link: &Link) -> Result<Vec<IpNet>> {
        Ok(self
            .all_addresses()
            .await?
            .into_iter()
            .filter(|a| a.index == link.index)
            .map(|a| a.net)
            .collect())
    }

    /// Every address of this netns.
    pub async fn all_addresses(&self) -> Result<Vec<Addr>> {
        let msgs: Vec<AddressMessage> =
            self.handle
                .address()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(|e| CniError::netlink(self.ctx("list addresses"), e))?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                let net = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => IpNet::new(*ip, m.header.prefix_len).ok(),
                    _ => None,
                })?;
                Some(Addr {
                    index: m.header.index,
                    net,
                    global: matches!(m.header.scope, AddressScope::Universe | AddressScope::Site),
                })
            })
            .collect())
    }

    /// Adds (or replaces, so a retried ADD is harmless) an address.
    pub async fn add_address(&self, link: &Link, net: IpNet) -> Result<()> {
        self.handle
            .address()
            .add(link.index, net.addr(), net.prefix_len())
            .replace()
            .execute()
            .await
            .map_err(|e| CniError::netlink(self.ctx(format!("add {net} to {}", link.name)), e))
    }

    /// Routes of the main table that leave through `link`: (dst, gateway).
    pub async fn routes(&self, link: &Link) -> Result<Vec<(IpNet, Option<IpAddr>)>> {
        Ok(self
            .all_routes()
            .await?
            .into_iter()
            .filter(|r| {
                r.table == u32::from(RouteHeader::RT_TABLE_MAIN) && r.oifs.contains(&link.index)
            })
            .map(|r| (r.dst, r.gw))
            .collect())
    }

    /// Every IPv4 and IPv6 route of this netns, in all tables.
    pub async fn all_routes(&self) -> Result<Vec<RouteEntry>> {
        let mut out = Vec::new();
        for req in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let msgs: Vec<RouteMessage> = self
                .handle
                .route()
                .get(req)
                .execute()
                .try_collect()
                .await
                .map_err(|e| CniError::netlink(self.ctx("list routes"), e))?;
            out.extend(msgs.iter().filter_map(RouteEntry::from_message));
        }
        Ok(out)
    }

    /// Adds (or replaces) a main-table route through `link`.
    pub async fn add_route(&self, link: &Link, dst: IpNet, gw: Option<IpAddr>) -> Result<()> {
        let what = || {
            let via = gw.map(|g| format!(" via {g}")).unwrap_or_default();
            self.ctx(format!("add route {dst}{via} dev {}", link.name))
        };
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .map_err(|e| CniError::InvalidConfig(format!("{}: {e}", what())))?
            .output_interface(link.index);
        if let Some(g) = gw {
            b = b
                .gateway(g)
                .map_err(|e| CniError::InvalidConfig(format!("{}: {e}", what())))?;
        }
        self.handle
            .route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .map_err(|e| CniError::netlink(what(), e))
    }
}

/// An address as the kernel lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addr {
    pub index: u32,
    pub net: IpNet,
    /// Scope global (universe) or site: an address others reach the host by.
    pub global: bool,
}

/// A route as the kernel lists it, with every way it can name its links.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    pub table: u32,
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
    /// `RTA_OIF`, and the links of `RTA_MULTIPATH` legs.
    pub oifs: Vec<u32>,
    /// `RTA_NH_ID`: the route leaves through a nexthop object instead.
    pub nh_id: Option<u32>,
}

impl RouteEntry {
    fn from_message(m: &RouteMessage) -> Option<RouteEntry> {
        let mut r = RouteEntry {
            table: m.header.table.into(),
            dst: IpNet::new(unspecified(m), m.header.destination_prefix_length).ok()?,
            gw: None,
            oifs: vec![],
            nh_id: None,
        };
        for a in &m.attributes {
            match a {
                RouteAttribute::Table(t) => r.table = *t,
                RouteAttribute::Oif(i) => r.oifs.push(*i),
                RouteAttribute::MultiPath(hops) => {
                    r.oifs.extend(hops.iter().map(|h| h.interface_index))
                }
                RouteAttribute::NhId(id) => r.nh_id = Some(*id),
                RouteAttribute::Destination(d) => {
                    r.dst = IpNet::new(ip_of(d)?, m.header.destination_prefix_length).ok()?
                }
                RouteAttribute::Gateway(g) => r.gw = ip_of(g),
                _ => {}
            }
        }
        Some(r)
    }
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn unspecified(m: &RouteMessage) -> IpAddr {
    match m.header.address_family {
        rtnetlink::packet_route::AddressFamily::Inet6 => {
            IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
        }
        _ => IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
    }
}
