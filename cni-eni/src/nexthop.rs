//! Nexthop objects (`ip nexthop`): which links each id leaves through, so a
//! route that names a nexthop id (`RTA_NH_ID`) instead of a device can be
//! tied to its link. netlink-packet-route 0.34 has no nexthop messages, so
//! this is a small hand-written `RTM_GETNEXTHOP` dump (`struct nhmsg` and the
//! `NHA_*` attributes of include/uapi/linux/nexthop.h) on the crate's socket.

use std::collections::HashMap;
use std::time::Duration;

use rtnetlink::packet_core::{
    parse_u32, NetlinkBuffer, NlasIterator, NLMSG_DONE, NLMSG_ERROR, NLM_F_DUMP, NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
};
use rtnetlink::sys::protocols::NETLINK_ROUTE;
use rtnetlink::sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};

use crate::error::{CniError, Result};
use crate::log;

const RTM_NEWNEXTHOP: u16 = 104;
const RTM_GETNEXTHOP: u16 = 106;
const NHA_ID: u16 = 1;
const NHA_GROUP: u16 = 2;
const NHA_OIF: u16 = 5;
/// `struct nhmsg`: family, scope, protocol, reserved (u8 each), flags (u32).
const NHMSG_LEN: usize = 8;
/// `struct nexthop_grp`: id (u32), weight, weight_high (u8), reserved (u16).
const NH_GRP_LEN: usize = 8;
const NLMSG_HDR_LEN: usize = 16;
/// A dump of a few nexthops takes microseconds; this bounds a kernel that
/// never answers.
const DUMP_TIMEOUT: Duration = Duration::from_secs(5);
/// A dump the kernel marks inconsistent (`NLM_F_DUMP_INTR`) is repeated.
const ATTEMPTS: usize = 3;

/// One nexthop as dumped: a single one has an `oif` (none if blackhole), a
/// group lists member ids.
#[derive(Debug, Default, PartialEq, Eq)]
struct Raw {
    id: u32,
    oif: Option<u32>,
    group: Vec<u32>,
}

/// Nexthop id -> the links it leaves through, in the netns this process
/// runs in (the host's: the plugin never leaves it on this thread).
pub async fn links_by_id() -> Result<HashMap<u32, Vec<u32>>> {
    for attempt in 1..=ATTEMPTS {
        match tokio::time::timeout(DUMP_TIMEOUT, dump()).await {
            Ok(Ok(Some(raw))) => return Ok(resolve(&raw)),
            Ok(Ok(None)) => log(format!(
                "nexthop dump {attempt}/{ATTEMPTS} was interrupted by a change; repeating"
            )),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(CniError::TryAgainLater(format!(
                    "the kernel did not finish the nexthop dump within {DUMP_TIMEOUT:?}"
                )))
            }
        }
    }
    Err(CniError::TryAgainLater(format!(
        "nexthops kept changing during {ATTEMPTS} dumps"
    )))
}

/// Ok(None): the dump was interrupted.
async fn dump() -> Result<Option<Vec<Raw>>> {
    let io = |what: &str, e| CniError::io(format!("nexthop dump: {what}"), e);
    let mut sock = TokioSocket::new(NETLINK_ROUTE).map_err(|e| io("socket", e))?;
    sock.socket_mut().bind_auto().map_err(|e| io("bind", e))?;
    sock.send_to(&request(), &SocketAddr::new(0, 0))
        .await
        .map_err(|e| io("send", e))?;
    let mut out = Vec::new();
    let mut interrupted = false;
    loop {
        let (datagram, _) = sock.recv_from_full().await.map_err(|e| io("recv", e))?;
        match parse(&datagram, &mut out)? {
            Step::More { intr } => interrupted |= intr,
            Step::Done { intr } => return Ok((!(interrupted || intr)).then_some(out)),
        }
    }
}

fn request() -> Vec<u8> {
    let len = NLMSG_HDR_LEN + NHMSG_LEN;
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&RTM_GETNEXTHOP.to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    b.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    b.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel fills ours
    b.extend_from_slice(&[0u8; NHMSG_LEN]); // AF_UNSPEC, no filters
    b
}

#[derive(Debug, PartialEq, Eq)]
enum Step {
    More { intr: bool },
    Done { intr: bool },
}

fn decode(reason: impl std::fmt::Display) -> CniError {
    CniError::Decode {
        what: "nexthop dump".into(),
        reason: reason.to_string(),
    }
}

/// Parses one datagram of the dump into `out`.
fn parse(mut datagram: &[u8], out: &mut Vec<Raw>) -> Result<Step> {
    let mut intr = false;
    while !datagram.is_empty() {
        let msg = NetlinkBuffer::new_checked(datagram).map_err(decode)?;
        intr |= msg.flags() & NLM_F_DUMP_INTR != 0;
        let payload = msg.payload();
        match msg.message_type() {
            NLMSG_DONE => return Ok(Step::Done { intr }),
            NLMSG_ERROR => {
                let errno = payload
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or_else(|| decode("short error message"))?;
                return Err(CniError::io(
                    "nexthop dump",
                    std::io::Error::from_raw_os_error(errno.abs()),
                ));
            }
            RTM_NEWNEXTHOP => out.push(parse_nexthop(payload)?),
            _ => {}
        }
        let step = (msg.length() as usize).next_multiple_of(4);
        datagram = datagram.get(step..).unwrap_or_default();
    }
    Ok(Step::More { intr })
}

fn parse_nexthop(payload: &[u8]) -> Result<Raw> {
    let attrs = payload
        .get(NHMSG_LEN..)
        .ok_or_else(|| decode("short nhmsg"))?;
    let mut nh = Raw::default();
    for nla in NlasIterator::new(attrs) {
        let nla = nla.map_err(decode)?;
        let value = nla.value();
        match nla.kind() {
            NHA_ID => nh.id = parse_u32(value).map_err(decode)?,
            NHA_OIF => nh.oif = Some(parse_u32(value).map_err(decode)?),
            NHA_GROUP => {
                for g in value.chunks_exact(NH_GRP_LEN) {
                    nh.group.push(parse_u32(&g[..4]).map_err(decode)?);
                }
            }
            _ => {}
        }
    }
    Ok(nh)
}

/// Groups stand for their members' links (groups do not nest).
fn resolve(raw: &[Raw]) -> HashMap<u32, Vec<u32>> {
    let single: HashMap<u32, Option<u32>> = raw.iter().map(|n| (n.id, n.oif)).collect();
    raw.iter()
        .map(|n| {
            let links = if n.group.is_empty() {
                n.oif.into_iter().collect()
            } else {
                n.group
                    .iter()
                    .filter_map(|m| single.get(m).copied().flatten())
                    .collect()
            };
            (n.id, links)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut b = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(value);
        b.resize(b.len().next_multiple_of(4), 0);
        b
    }

    fn message(kind: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = ((NLMSG_HDR_LEN + payload.len()) as u32)
            .to_ne_bytes()
            .to_vec();
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&[0u8; 8]);
        b.extend_from_slice(payload);
        b
    }

    fn nexthop(attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut p = vec![0u8; NHMSG_LEN];
        attrs.iter().for_each(|a| p.extend_from_slice(a));
        message(RTM_NEWNEXTHOP, 2, &p)
    }

    #[test]
    fn request_is_a_dump_of_all_families() {
        let r = request();
        assert_eq!(r.len(), 24);
        let b = NetlinkBuffer::new_checked(&r[..]).unwrap();
        assert_eq!(b.message_type(), RTM_GETNEXTHOP);
        assert_eq!(b.flags(), NLM_F_REQUEST | NLM_F_DUMP);
    }

    #[test]
    fn parses_singles_groups_and_done() {
        let mut grp = Vec::new();
        for id in [7u32, 8] {
            grp.extend_from_slice(&id.to_ne_bytes());
            grp.extend_from_slice(&[1, 0, 0, 0]);
        }
        let mut d = nexthop(&[
            nla(NHA_ID, &7u32.to_ne_bytes()),
            nla(NHA_OIF, &3u32.to_ne_bytes()),
        ]);
        d.extend(nexthop(&[
            nla(NHA_ID, &8u32.to_ne_bytes()),
            nla(NHA_OIF, &4u32.to_ne_bytes()),
        ]));
        d.extend(nexthop(&[
            nla(NHA_ID, &9u32.to_ne_bytes()),
            nla(NHA_GROUP, &grp),
        ]));
        d.extend(nexthop(&[nla(NHA_ID, &10u32.to_ne_bytes())])); // blackhole
        let mut out = Vec::new();
        assert_eq!(parse(&d, &mut out).unwrap(), Step::More { intr: false });
        let done = message(NLMSG_DONE, NLM_F_DUMP_INTR, &0u32.to_ne_bytes());
        assert_eq!(parse(&done, &mut out).unwrap(), Step::Done { intr: true });
        let links = resolve(&out);
        assert_eq!(links[&7], vec![3]);
        assert_eq!(links[&9], vec![3, 4]);
        assert!(links[&10].is_empty());
    }

    #[test]
    fn errors_and_garbage_are_errors() {
        let mut out = Vec::new();
        let err = message(NLMSG_ERROR, 0, &(-nix::libc::EOPNOTSUPP).to_ne_bytes());
        assert_eq!(parse(&err, &mut out).unwrap_err().code(), 5);
        assert_eq!(parse(&[1, 2, 3], &mut out).unwrap_err().code(), 6);
        let short = message(RTM_NEWNEXTHOP, 0, &[0u8; 4]);
        assert_eq!(parse(&short, &mut out).unwrap_err().code(), 6);
    }
}
