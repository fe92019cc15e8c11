//! Who serves whom, per blob: the peers using a blob form a tree under the
//! super node with bounded fan-out. Pure bookkeeping, no I/O, so placement
//! and expiry are tested without a network.
//!
//! A new peer hangs below the first node, in join order, that has a free
//! slot: the super node first, then the peers that joined before it. Parents
//! therefore always joined earlier, so the tree has no cycles even while
//! peers come and go, and a parent has at most `fanout` children. A peer
//! whose parent expired is placed again on its next heartbeat.
//!
//! Members are addresses the super node verified (the caller's own IP), and
//! each tree is bounded: at most [`MAX_MEMBERS`] members, at most
//! [`MAX_PER_HOST`] of them on one IP. A peer beyond that gets no place (it
//! uses the super node).

use std::collections::HashMap;
use std::net::SocketAddr;

/// Members of one tree.
pub const MAX_MEMBERS: usize = 4096;
/// Members of one tree on one IP (several nodes may share a host in tests).
pub const MAX_PER_HOST: usize = 8;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
struct Member {
    /// Join order within this blob; a parent's is always smaller.
    seq: u64,
    last_seen: Instant,
    /// `None`: directly below the super node.
    parent: Option<String>,
}

/// The tree of one blob.
#[derive(Debug, Default)]
pub struct BlobTree {
    members: HashMap<String, Member>,
    next_seq: u64,
}

impl BlobTree {
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Registers or refreshes `addr` and returns its ancestors, nearest
    /// first (empty: its parent is the super node); `None` when the tree has
    /// no room for it.
    pub fn announce(
        &mut self,
        addr: &str,
        now: Instant,
        ttl: Duration,
        fanout: usize,
    ) -> Option<Vec<String>> {
        self.expire(now, ttl);
        let fanout = fanout.max(1);
        let seq = match self.members.get_mut(addr) {
            Some(m) => {
                m.last_seen = now;
                m.seq
            }
            None => {
                if self.members.len() >= MAX_MEMBERS || self.on_host(addr) >= MAX_PER_HOST {
                    return None;
                }
                let seq = self.next_seq;
                self.next_seq += 1;
                self.members.insert(
                    addr.to_owned(),
                    Member {
                        seq,
                        last_seen: now,
                        parent: None,
                    },
                );
                let parent = self.place(seq, fanout);
                self.members.get_mut(addr).expect("just inserted").parent = parent;
                seq
            }
        };
        // A parent that expired and joined again has a later seq: keeping it
        // could close a cycle.
        let parent_gone = self.members[addr]
            .parent
            .as_ref()
            .is_some_and(|p| self.members.get(p).is_none_or(|pm| pm.seq > seq));
        if parent_gone {
            let parent = self.place(seq, fanout);
            self.members.get_mut(addr).expect("present").parent = parent;
        }
        Some(self.ancestors(addr))
    }

    /// Members on the IP of `addr`.
    fn on_host(&self, addr: &str) -> usize {
        let ip = |a: &str| a.parse::<SocketAddr>().ok().map(|a| a.ip());
        let Some(host) = ip(addr) else { return 0 };
        self.members.keys().filter(|m| ip(m) == Some(host)).count()
    }

    /// Removes `addr` (it left); its children are placed again on their
    /// next heartbeat.
    pub fn leave(&mut self, addr: &str) {
        self.members.remove(addr);
    }

    /// Drops members not seen within `ttl`.
    pub fn expire(&mut self, now: Instant, ttl: Duration) {
        self.members
            .retain(|_, m| now.saturating_duration_since(m.last_seen) <= ttl);
    }

    /// The first node with a free slot among the super node and the live
    /// members that joined before `seq`. When every slot is taken the super
    /// node takes the peer: it serves everyone as the last resort anyway.
    fn place(&self, seq: u64, fanout: usize) -> Option<String> {
        let mut children: HashMap<Option<&str>, usize> = HashMap::new();
        for m in self.members.values() {
            if m.seq != seq {
                *children.entry(m.parent.as_deref()).or_default() += 1;
            }
        }
        if children.get(&None).copied().unwrap_or(0) < fanout {
            return None;
        }
        let mut earlier: Vec<(&String, &Member)> =
            self.members.iter().filter(|(_, m)| m.seq < seq).collect();
        earlier.sort_by_key(|(_, m)| m.seq);
        earlier
            .into_iter()
            .find(|(a, _)| children.get(&Some(a.as_str())).copied().unwrap_or(0) < fanout)
            .map(|(a, _)| a.clone())
    }

    /// Parent, grandparent, ... up to (not including) the super node.
    pub fn ancestors(&self, addr: &str) -> Vec<String> {
        let mut chain = Vec::new();
        let mut cur = self.members.get(addr).and_then(|m| m.parent.clone());
        // Bounded by the member count: parents joined earlier, so no cycles,
        // but a bound costs nothing.
        while let Some(p) = cur {
            if chain.len() > self.members.len() {
                break;
            }
            cur = self.members.get(&p).and_then(|m| m.parent.clone());
            chain.push(p);
        }
        chain
    }

    /// How many members have `addr` as their parent (`None`: the super node).
    pub fn children_of(&self, addr: Option<&str>) -> usize {
        self.members
            .values()
            .filter(|m| m.parent.as_deref() == addr)
            .count()
    }
}

/// The trees of all blobs, with a bound on how many blobs are tracked.
#[derive(Debug)]
pub struct Membership {
    trees: HashMap<String, BlobTree>,
    pub fanout: usize,
    pub ttl: Duration,
    pub max_blobs: usize,
}

impl Membership {
    pub fn new(fanout: usize, ttl: Duration, max_blobs: usize) -> Self {
        Membership {
            trees: HashMap::new(),
            fanout,
            ttl,
            max_blobs,
        }
    }

    /// `None` when the blob is new and `max_blobs` are tracked already (the
    /// peer then goes straight to the super node).
    pub fn announce(&mut self, blob: &str, addr: &str, now: Instant) -> Option<Vec<String>> {
        if !self.trees.contains_key(blob) {
            let ttl = self.ttl;
            self.trees.retain(|_, t| {
                t.expire(now, ttl);
                !t.is_empty()
            });
            if self.trees.len() >= self.max_blobs {
                return None;
            }
        }
        let tree = self.trees.entry(blob.to_owned()).or_default();
        tree.announce(addr, now, self.ttl, self.fanout)
    }

    pub fn leave(&mut self, blob: &str, addr: &str) {
        if let Some(t) = self.trees.get_mut(blob) {
            t.leave(addr);
            if t.is_empty() {
                self.trees.remove(blob);
            }
        }
    }

    pub fn tree(&self, blob: &str) -> Option<&BlobTree> {
        self.trees.get(blob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    fn peer(i: usize) -> String {
        format!("10.0.0.{i}:7000")
    }

    #[test]
    fn fills_breadth_first_with_bounded_fanout() {
        let mut t = BlobTree::default();
        let now = Instant::now();
        let chains: Vec<Vec<String>> = (0..8)
            .map(|i| t.announce(&peer(i), now, TTL, 2).unwrap())
            .collect();
        assert!(chains[0].is_empty() && chains[1].is_empty());
        assert_eq!(chains[2], vec![peer(0)]);
        assert_eq!(chains[3], vec![peer(0)]);
        assert_eq!(chains[4], vec![peer(1)]);
        assert_eq!(chains[6], vec![peer(2), peer(0)]);
        assert!(t.children_of(None) <= 2);
        for i in 0..8 {
            assert!(t.children_of(Some(&peer(i))) <= 2, "peer {i}");
        }
    }

    #[test]
    fn parents_joined_earlier_and_heartbeats_keep_the_place() {
        let mut t = BlobTree::default();
        let now = Instant::now();
        for i in 0..20 {
            t.announce(&peer(i), now, TTL, 3);
        }
        for i in 0..20 {
            let again = t.announce(&peer(i), now, TTL, 3).unwrap();
            assert_eq!(again, t.ancestors(&peer(i)));
            for a in &again {
                let a_idx: usize = a[7..a.len() - 5].parse().unwrap();
                assert!(a_idx < i);
            }
        }
    }

    #[test]
    fn expired_parent_is_replaced_on_next_heartbeat() {
        let mut t = BlobTree::default();
        let start = Instant::now();
        for i in 0..4 {
            t.announce(&peer(i), start, TTL, 1);
        }
        // chain: 0 <- 1 <- 2 <- 3
        assert_eq!(t.ancestors(&peer(3)), vec![peer(2), peer(1), peer(0)]);
        // Everyone but peer 1 keeps heartbeating.
        let later = start + TTL + Duration::from_secs(1);
        t.announce(&peer(0), start + TTL, TTL, 1);
        t.announce(&peer(2), start + TTL, TTL, 1);
        t.announce(&peer(3), start + TTL, TTL, 1);
        let chain2 = t.announce(&peer(2), later, TTL, 1);
        assert_eq!(t.len(), 3, "peer 1 expired");
        // Peer 2 takes the slot below peer 0 that peer 1 left.
        assert_eq!(chain2, Some(vec![peer(0)]));
        assert_eq!(
            t.announce(&peer(3), later, TTL, 1),
            Some(vec![peer(2), peer(0)])
        );
    }

    #[test]
    fn leave_and_full_tree_fall_back_to_the_super_node() {
        let mut m = Membership::new(2, TTL, 1);
        let now = Instant::now();
        assert_eq!(m.announce("sha256:a", &peer(0), now), Some(vec![]));
        assert_eq!(m.announce("sha256:b", &peer(0), now), None, "max_blobs");
        m.leave("sha256:a", &peer(0));
        assert!(m.tree("sha256:a").is_none());
        assert_eq!(m.announce("sha256:b", &peer(0), now), Some(vec![]));
    }

    #[test]
    fn full_of_orphans_go_to_the_root() {
        // fanout 1 and the only earlier member is busy: root takes it.
        let mut t = BlobTree::default();
        let now = Instant::now();
        t.announce(&peer(0), now, TTL, 1);
        t.announce(&peer(1), now, TTL, 1);
        t.leave(&peer(0));
        // peer 1's parent left: placed again, under the root.
        assert_eq!(t.announce(&peer(1), now, TTL, 1), Some(vec![]));
    }

    #[test]
    fn one_host_gets_a_bounded_number_of_places() {
        let mut t = BlobTree::default();
        let now = Instant::now();
        for port in 0..MAX_PER_HOST {
            assert!(t
                .announce(&format!("10.0.0.1:{port}"), now, TTL, 2)
                .is_some());
        }
        assert_eq!(t.announce("10.0.0.1:9999", now, TTL, 2), None);
        assert!(t.announce("10.0.0.2:1", now, TTL, 2).is_some());
        assert_eq!(t.len(), MAX_PER_HOST + 1);
    }
}
