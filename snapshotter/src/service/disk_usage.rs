//! Disk usage of a snapshot directory, measured like `du`.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::SnapshotError;
use crate::store::Usage;

/// Allocated bytes and inodes under `dir`, hardlinks counted once.
pub(super) fn disk_usage(dir: &Path) -> Result<Usage, SnapshotError> {
    fn walk(p: &Path, seen: &mut HashSet<(u64, u64)>, u: &mut Usage) -> std::io::Result<()> {
        let md = std::fs::symlink_metadata(p)?;
        if seen.insert((md.dev(), md.ino())) {
            u.inodes += 1;
            u.size += md.blocks() as i64 * 512;
        }
        if md.is_dir() {
            for entry in std::fs::read_dir(p)? {
                walk(&entry?.path(), seen, u)?;
            }
        }
        Ok(())
    }
    let mut usage = Usage::default();
    walk(dir, &mut HashSet::new(), &mut usage)
        .map_err(SnapshotError::io(format!("measuring {}", dir.display())))?;
    Ok(usage)
}
