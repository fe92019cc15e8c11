//! The super node's disk cache: fixed-size, aligned blocks of blobs, one
//! file each, least recently used evicted beyond a byte capacity. The cache
//! starts empty on every start (its directory is cleared): what it holds is
//! only ever a copy of the registry, and a partial write from a crash must
//! never be served.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::p2p::P2pError;

/// A block of a blob, named by nothing a client chooses freely: the digest
/// (content-addressed; any repository of one registry holds the same bytes
/// under it, and access is checked per client before a block is handed
/// out) and the registry it came from (a registry is trusted for its own
/// blobs only, so one cannot plant blocks for another's).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub registry: String,
    pub digest: String,
    pub block: u64,
}

impl BlockKey {
    fn file_name(&self) -> String {
        let mut h = Sha256::new();
        for part in [&self.registry, &self.digest] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        h.update(self.block.to_le_bytes());
        hex::encode(h.finalize())
    }
}

struct Entry {
    len: u64,
    last_used: u64,
}

struct State {
    entries: HashMap<BlockKey, Entry>,
    used: u64,
    tick: u64,
}

pub struct BlockCache {
    dir: PathBuf,
    capacity: u64,
    state: Mutex<State>,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct CacheUsage {
    pub blocks: u64,
    pub bytes: u64,
    pub capacity: u64,
}

impl BlockCache {
    pub fn open(dir: &Path, capacity: u64) -> Result<Self, P2pError> {
        let io = |e: std::io::Error| P2pError::Io {
            what: format!("preparing the cache directory {}", dir.display()),
            source: e,
        };
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io)?;
        }
        std::fs::create_dir_all(dir).map_err(io)?;
        Ok(BlockCache {
            dir: dir.to_owned(),
            capacity,
            state: Mutex::new(State {
                entries: HashMap::new(),
                used: 0,
                tick: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The block if it is cached (and its file still readable).
    pub async fn get(&self, key: &BlockKey) -> Option<Bytes> {
        {
            let mut s = self.lock();
            s.tick += 1;
            let tick = s.tick;
            s.entries.get_mut(key)?.last_used = tick;
        }
        // Evicted between the lookup and the read: a miss, fetched again.
        tokio::fs::read(self.dir.join(key.file_name()))
            .await
            .ok()
            .map(Bytes::from)
    }

    /// Stores a block, evicting least recently used ones to stay within the
    /// capacity; a block larger than the capacity is not stored.
    pub async fn put(&self, key: BlockKey, data: &Bytes) -> Result<(), P2pError> {
        let len = data.len() as u64;
        if len > self.capacity {
            return Ok(());
        }
        let name = key.file_name();
        let tmp = self.dir.join(format!("{name}.tmp"));
        let io = |e: std::io::Error| P2pError::Io {
            what: format!("writing cache block {name}"),
            source: e,
        };
        tokio::fs::write(&tmp, data).await.map_err(io)?;
        tokio::fs::rename(&tmp, self.dir.join(&name))
            .await
            .map_err(io)?;
        let victims = {
            let mut s = self.lock();
            s.tick += 1;
            let tick = s.tick;
            if let Some(old) = s.entries.insert(
                key,
                Entry {
                    len,
                    last_used: tick,
                },
            ) {
                s.used -= old.len;
            }
            s.used += len;
            let mut victims = Vec::new();
            while s.used > self.capacity {
                let Some(oldest) = s
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                let e = s.entries.remove(&oldest).expect("present");
                s.used -= e.len;
                victims.push(oldest.file_name());
            }
            victims
        };
        for v in victims {
            let _ = tokio::fs::remove_file(self.dir.join(v)).await;
        }
        Ok(())
    }

    pub fn usage(&self) -> CacheUsage {
        let s = self.lock();
        CacheUsage {
            blocks: s.entries.len() as u64,
            bytes: s.used,
            capacity: self.capacity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(block: u64) -> BlockKey {
        BlockKey {
            registry: "r".into(),
            digest: "sha256:a".into(),
            block,
        }
    }

    #[tokio::test]
    async fn evicts_least_recently_used_beyond_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(&dir.path().join("c"), 30).unwrap();
        let ten = Bytes::from(vec![1u8; 10]);
        for b in 0..3 {
            cache.put(key(b), &ten).await.unwrap();
        }
        assert!(cache.get(&key(0)).await.is_some()); // 0 is now the newest
        cache.put(key(3), &ten).await.unwrap();
        assert!(cache.get(&key(1)).await.is_none(), "1 was the oldest");
        assert!(cache.get(&key(0)).await.is_some());
        assert_eq!(cache.usage().bytes, 30);
        assert_eq!(std::fs::read_dir(dir.path().join("c")).unwrap().count(), 3);
        // Too large for the cache: served, not stored.
        cache
            .put(key(9), &Bytes::from(vec![0u8; 31]))
            .await
            .unwrap();
        assert!(cache.get(&key(9)).await.is_none());
    }
}
