//! Who this node uploaded to and downloaded from, for its operator. The
//! addresses come from others (ticket holders, tree members), so the maps are
//! bounded: past [`MAX_PEERS`] entries new peers are counted under `other`.

use std::collections::BTreeMap;

/// Peers tracked by name in each direction.
pub const MAX_PEERS: usize = 1024;
const OTHER: &str = "other";

#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Transfer {
    pub bytes: u64,
    pub chunks: u64,
}

#[derive(Default)]
pub struct Ledger {
    pub uploaded_to: BTreeMap<String, Transfer>,
    pub downloaded_from: BTreeMap<String, Transfer>,
}

impl Ledger {
    pub fn uploaded(&mut self, peer: &str, bytes: u64, chunks: u64) {
        add(&mut self.uploaded_to, peer, bytes, chunks);
    }

    pub fn downloaded(&mut self, peer: &str, bytes: u64, chunks: u64) {
        add(&mut self.downloaded_from, peer, bytes, chunks);
    }
}

fn add(map: &mut BTreeMap<String, Transfer>, peer: &str, bytes: u64, chunks: u64) {
    let key = if map.contains_key(peer) || map.len() < MAX_PEERS {
        peer
    } else {
        OTHER
    };
    let t = map.entry(key.to_owned()).or_default();
    t.bytes = t.bytes.saturating_add(bytes);
    t.chunks = t.chunks.saturating_add(chunks);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_peers_end_up_under_other() {
        let mut l = Ledger::default();
        for i in 0..MAX_PEERS + 100 {
            l.uploaded(&format!("10.0.{}.{}:7070", i / 256, i % 256), 10, 1);
        }
        assert!(l.uploaded_to.len() <= MAX_PEERS + 1);
        assert_eq!(l.uploaded_to[OTHER].chunks, 100);
    }
}
