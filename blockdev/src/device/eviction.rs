//! Keeping the chunk caches under a capacity: the caches of detached layers
//! go, least recently used first; an attached layer's cache is never
//! touched. "Used" is the newest mtime in the cache directory: the bitmap is
//! written while a layer is attached and when it is detached, so this
//! survives restarts without any extra bookkeeping.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::SystemTime;

use tracing::{info, warn};

/// One layer's cache directory as eviction sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    /// The directory name under `root/layers` (`sha256-<hex>`).
    pub name: String,
    /// Disk space it takes (allocated blocks: the image file is sparse).
    pub bytes: u64,
    pub last_used: SystemTime,
    pub attached: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct EvictionReport {
    /// Caches removed, and the bytes that freed.
    pub evicted: Vec<String>,
    pub freed_bytes: u64,
    /// Bytes all caches take afterwards (may exceed the capacity when
    /// attached layers alone do).
    pub remaining_bytes: u64,
}

/// Which caches to remove so the total fits `capacity`: detached ones,
/// oldest use first, only as many as needed. Attached ones never.
pub fn choose(entries: &[CacheEntry], capacity: u64) -> Vec<String> {
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
    let mut candidates: Vec<&CacheEntry> = entries.iter().filter(|e| !e.attached).collect();
    // Oldest first; the name breaks ties so the choice is deterministic.
    candidates.sort_by(|a, b| (a.last_used, &a.name).cmp(&(b.last_used, &b.name)));
    let mut out = Vec::new();
    for e in candidates {
        if total <= capacity {
            break;
        }
        total -= e.bytes;
        out.push(e.name.clone());
    }
    out
}

/// Scans `layers_dir`, removes what [`choose`] picks; `attached` holds the
/// directory names of attached layers. `capacity` 0 means unlimited.
pub fn evict(layers_dir: &Path, attached: &HashSet<String>, capacity: u64) -> EvictionReport {
    let entries = match scan(layers_dir, attached) {
        Ok(e) => e,
        Err(e) => {
            warn!("cache eviction: reading {}: {e}", layers_dir.display());
            return EvictionReport::default();
        }
    };
    let total: u64 = entries.iter().map(|e| e.bytes).sum();
    if capacity == 0 {
        return EvictionReport {
            remaining_bytes: total,
            ..EvictionReport::default()
        };
    }
    let mut report = EvictionReport {
        remaining_bytes: total,
        ..EvictionReport::default()
    };
    for name in choose(&entries, capacity) {
        let Some(entry) = entries.iter().find(|e| e.name == name) else {
            continue;
        };
        let dir = layers_dir.join(&name);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                info!("evicted the cache of layer {name} ({} bytes)", entry.bytes);
                report.freed_bytes += entry.bytes;
                report.remaining_bytes -= entry.bytes;
                report.evicted.push(name);
            }
            Err(e) => warn!("cache eviction: removing {}: {e}", dir.display()),
        }
    }
    if report.remaining_bytes > capacity {
        warn!(
            "chunk caches take {} bytes, over the capacity of {capacity}: the rest belongs to attached layers",
            report.remaining_bytes
        );
    }
    report
}

fn scan(layers_dir: &Path, attached: &HashSet<String>) -> std::io::Result<Vec<CacheEntry>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(layers_dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let (mut bytes, mut last_used) = (0u64, SystemTime::UNIX_EPOCH);
        for f in std::fs::read_dir(entry.path())? {
            let meta = f?.metadata()?;
            bytes += meta.blocks() * 512;
            last_used = last_used.max(meta.modified()?);
        }
        out.push(CacheEntry {
            attached: attached.contains(&name),
            name,
            bytes,
            last_used,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(name: &str, bytes: u64, age_secs: u64, attached: bool) -> CacheEntry {
        CacheEntry {
            name: name.into(),
            bytes,
            last_used: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age_secs),
            attached,
        }
    }

    #[test]
    fn under_capacity_evicts_nothing() {
        let e = [entry("a", 10, 5, false), entry("b", 10, 1, false)];
        assert!(choose(&e, 20).is_empty());
    }

    #[test]
    fn least_recently_used_detached_go_first_and_only_as_many_as_needed() {
        let e = [
            entry("new", 10, 1, false),
            entry("old", 10, 100, false),
            entry("mid", 10, 50, false),
        ];
        assert_eq!(choose(&e, 20), ["old"]);
        assert_eq!(choose(&e, 10), ["old", "mid"]);
        assert_eq!(choose(&e, 0), ["old", "mid", "new"]);
    }

    #[test]
    fn attached_layers_are_never_evicted_even_when_over_capacity() {
        let e = [
            entry("busy-old", 100, 1000, true),
            entry("idle", 10, 1, false),
            entry("busy", 50, 500, true),
        ];
        assert_eq!(choose(&e, 0), ["idle"]);
        assert_eq!(choose(&e, 150), ["idle"]);
        assert!(choose(&e, 160).is_empty());
    }

    #[test]
    fn removes_chosen_directories() {
        let tmp = tempfile::tempdir().unwrap();
        for (name, len) in [("sha256-aa", 64 << 10), ("sha256-bb", 64 << 10)] {
            std::fs::create_dir(tmp.path().join(name)).unwrap();
            std::fs::write(tmp.path().join(name).join("image"), vec![1u8; len]).unwrap();
        }
        let attached: HashSet<String> = ["sha256-bb".to_string()].into();
        let report = evict(tmp.path(), &attached, 1);
        assert_eq!(report.evicted, ["sha256-aa"]);
        assert!(!tmp.path().join("sha256-aa").exists());
        assert!(tmp.path().join("sha256-bb/image").exists());
        assert!(report.remaining_bytes >= 64 << 10);
        // Unlimited: nothing goes.
        assert!(evict(tmp.path(), &HashSet::new(), 0).evicted.is_empty());
    }
}
