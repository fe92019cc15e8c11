//! The super node's disk cache: fixed-size, aligned blocks of blobs, one
//! file each, least recently used evicted beyond a byte capacity.
//!
//! It survives a restart, so a restarted super node does not send every
//! node back to the registry. Crash rules:
//!
//! 1. A block is written to `<name>.tmp`, synced, then renamed to `<name>`:
//!    a file with a final name is complete, after a process crash (rename
//!    is atomic) and after a power loss (the data was durable first).
//! 2. At start, `*.tmp` files (writes a crash interrupted) are removed and
//!    every complete block is indexed from the directory listing (size and
//!    mtime, the least recently *written* going first), then the capacity
//!    is enforced. Nothing is read or hashed: a start costs one listing.
//! 3. Blocks are copies of registry blobs, and every node verifies each
//!    chunk against the layer's index (sha256) before using it; a block
//!    damaged behind our back costs the node a retry with the next source,
//!    never a wrong byte in a container.

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
    /// By file name (the key's hash): what a restart can rebuild.
    entries: HashMap<String, Entry>,
    used: u64,
    tick: u64,
}

impl State {
    /// Forgets least recently used blocks until at most `capacity` bytes
    /// remain; returns their file names (for the caller to remove).
    fn evict(&mut self, capacity: u64) -> Vec<String> {
        let mut victims = Vec::new();
        while self.used > capacity {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            let e = self.entries.remove(&oldest).expect("present");
            self.used -= e.len;
            victims.push(oldest);
        }
        victims
    }
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
    /// Opens the cache in `dir`, keeping the complete blocks a previous
    /// run left (rule 2).
    pub fn open(dir: &Path, capacity: u64) -> Result<Self, P2pError> {
        let io = |e: std::io::Error| P2pError::Io {
            what: format!("preparing the cache directory {}", dir.display()),
            source: e,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut found = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io)? {
            let e = e.map_err(io)?;
            let name = e.file_name().to_string_lossy().into_owned();
            let is_block = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
            if !is_block {
                // A write a crash interrupted, or not ours.
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            let meta = e.metadata().map_err(io)?;
            let written = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            found.push((written, name, meta.len()));
        }
        found.sort();
        let mut state = State {
            entries: HashMap::new(),
            used: 0,
            tick: 0,
        };
        for (_, name, len) in found {
            state.tick += 1;
            state.used += len;
            let last_used = state.tick;
            state.entries.insert(name, Entry { len, last_used });
        }
        let cache = BlockCache {
            dir: dir.to_owned(),
            capacity,
            state: Mutex::new(state),
        };
        for v in cache.lock().evict(capacity) {
            let _ = std::fs::remove_file(dir.join(v));
        }
        let usage = cache.usage();
        if usage.blocks > 0 {
            tracing::info!(
                "block cache {}: kept {} blocks ({} bytes) from the previous run",
                dir.display(),
                usage.blocks,
                usage.bytes
            );
        }
        Ok(cache)
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
            s.entries.get_mut(&key.file_name())?.last_used = tick;
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
        // Rule 1: complete and durable before it has its name.
        let written = async {
            let mut f = tokio::fs::File::create(&tmp).await?;
            tokio::io::AsyncWriteExt::write_all(&mut f, data).await?;
            f.sync_data().await?;
            tokio::fs::rename(&tmp, self.dir.join(&name)).await
        };
        if let Err(e) = written.await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(io(e));
        }
        let victims = {
            let mut s = self.lock();
            s.tick += 1;
            let tick = s.tick;
            if let Some(old) = s.entries.insert(
                name,
                Entry {
                    len,
                    last_used: tick,
                },
            ) {
                s.used -= old.len;
            }
            s.used += len;
            s.evict(self.capacity)
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

    #[tokio::test]
    async fn blocks_survive_a_restart_and_torn_writes_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("c");
        let cache = BlockCache::open(&c, 100).unwrap();
        cache
            .put(key(0), &Bytes::from(vec![7u8; 10]))
            .await
            .unwrap();
        cache
            .put(key(1), &Bytes::from(vec![8u8; 20]))
            .await
            .unwrap();
        drop(cache);
        // A write a crash interrupted.
        std::fs::write(c.join(format!("{}.tmp", key(2).file_name())), b"torn").unwrap();

        let cache = BlockCache::open(&c, 100).unwrap();
        assert_eq!(cache.get(&key(0)).await.unwrap(), vec![7u8; 10]);
        assert_eq!(cache.get(&key(1)).await.unwrap(), vec![8u8; 20]);
        assert!(cache.get(&key(2)).await.is_none());
        assert_eq!((cache.usage().blocks, cache.usage().bytes), (2, 30));
        assert_eq!(
            std::fs::read_dir(&c).unwrap().count(),
            2,
            "the .tmp is gone"
        );
        drop(cache);
        // A smaller capacity at the next start evicts the oldest written.
        let cache = BlockCache::open(&c, 25).unwrap();
        assert!(cache.get(&key(0)).await.is_none());
        assert!(cache.get(&key(1)).await.is_some());
    }
}
