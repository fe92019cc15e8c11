//! Starting where the previous daemon on this root stopped: resuming its
//! FUSE session from the fd store, adopting its EROFS mounts and loop
//! devices as the layers are attached again, and handing over to the next
//! daemon.
//!
//! # Rules
//!
//! 1. The daemon touches `root/serving` every persist interval while it
//!    serves (and once more when it hands over). A session is resumed only
//!    if that heartbeat is younger than the read deadline: reads waiting
//!    longer than that must fail, not be answered late, and a daemon that
//!    crash-loops before it serves never touches the heartbeat, so the
//!    loop ends in EIO after the read deadline instead of hanging readers.
//! 2. A session that is not resumed is removed from the store and closed:
//!    the kernel aborts it, waiting reads fail, and the node recovers as
//!    without a store (`orphans.rs`): nothing is worse than before.
//! 3. While resuming, nothing under the root is unmounted. A layer attached
//!    again adopts its EROFS mount and the loop device under it (they still
//!    read the layer's FUSE file, or its cache file once local); containers'
//!    overlays never notice. When the restore ends, mounts no layer adopted
//!    are detached lazily and requests for their files fail.
//! 4. Handing over (SIGTERM, or `handover` on the control socket) persists
//!    every cache, touches the heartbeat and exits without unmounting or
//!    detaching anything; requests in flight are resent to the next daemon.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::runtime::Handle;
use tracing::{info, warn};

use super::fdstore::FdStore;
use super::fuse::{FuseMount, LayerFiles};
use super::loopdev::{self, LoopDevice};
use super::mounts;
use super::NodeConfig;

/// The heartbeat file under the root.
pub(super) const HEARTBEAT: &str = "serving";

pub(super) fn touch_heartbeat(root: &Path) {
    let path = root.join(HEARTBEAT);
    let touched = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(e) = touched {
        warn!("touching {}: {e}", path.display());
    }
}

/// How long ago the last daemon on `root` said it served.
fn heartbeat_age(root: &Path) -> Option<Duration> {
    let modified = std::fs::metadata(root.join(HEARTBEAT))
        .and_then(|m| m.modified())
        .ok()?;
    Some(
        SystemTime::now()
            .duration_since(modified)
            .unwrap_or_default(),
    )
}

/// Resumes the session the previous daemon left in the store (`held`, by
/// name), or discards it (rule 2) and returns `None`.
pub(super) fn resume_session(
    config: &NodeConfig,
    store: &FdStore,
    held: BTreeMap<String, OwnedFd>,
) -> Option<(Arc<LayerFiles>, FuseMount)> {
    let names: Vec<String> = held.keys().cloned().collect();
    let deadline = config.fetch.read_deadline;
    let resumed = match heartbeat_age(&config.root) {
        None => Err("no heartbeat of the previous daemon".to_owned()),
        Some(age) if age > deadline => Err(format!(
            "the previous daemon stopped serving {age:?} ago, more than the read \
             deadline of {deadline:?}"
        )),
        Some(_) => {
            let files = LayerFiles::restoring(Handle::current());
            let held: HashMap<String, OwnedFd> = held.into_iter().collect();
            FuseMount::resume(&config.fuse_dir(), files.clone(), config.fuse_threads, held)
                .map(|fuse| (files, fuse))
        }
    };
    match resumed {
        Ok(r) => Some(r),
        Err(reason) => {
            warn!(
                "not resuming the FUSE session of {}: {reason}; discarding it \
                 (reads waiting on it fail; containers read again once their \
                 layers are attached)",
                config.root.display()
            );
            for name in names {
                store.remove(&name);
            }
            None
        }
    }
}

/// An EROFS mount and its loop device that a previous daemon left for a layer.
pub(super) struct Adopted {
    pub loop_dev: LoopDevice,
    pub backing: PathBuf,
    /// The loop device reads the layer's cache file, not FUSE.
    pub local: bool,
}

/// The intact EROFS mount of layer `name` at its mountpoint, on a loop
/// device that reads the layer's FUSE file or cache file (rule 3).
pub(super) fn adopt(config: &NodeConfig, name: &str) -> Option<Adopted> {
    let mountpoint = config.mountpoint(name);
    let (fstype, source) = mounts::mount_info(&mountpoint)?;
    let number: u32 = source.strip_prefix("/dev/loop")?.parse().ok()?;
    if fstype != "erofs" {
        return None;
    }
    let backing = loopdev::backing_file(number)?;
    let fuse_file = config.fuse_file(name);
    let image = config.cache_dir(name).join(crate::cache::IMAGE_FILE);
    if backing != fuse_file && backing != image {
        warn!(
            "{}: loop{number} reads {}, not this layer's files; not adopted",
            mountpoint.display(),
            backing.display()
        );
        return None;
    }
    match LoopDevice::open_existing(number) {
        Ok(loop_dev) => Some(Adopted {
            loop_dev,
            local: backing == image,
            backing,
        }),
        Err(e) => {
            warn!("{}: loop{number}: {e}", mountpoint.display());
            None
        }
    }
}

/// After the restore: lazily unmounts the EROFS mounts under `mnt` (the
/// layers' mounts directory) that no attached layer adopted (their layers
/// were not attached again).
pub(super) fn unmount_unadopted(mnt: &Path, attached: &HashSet<String>) {
    let Ok(found) = mounts::mounts_under(mnt) else {
        return;
    };
    for m in found {
        let name = m.strip_prefix(mnt).ok().and_then(|n| n.to_str());
        if name.is_some_and(|n| !n.is_empty() && !attached.contains(n)) {
            info!(
                "{} was not attached again after the restart; detaching it lazily",
                m.display()
            );
            if let Err(e) = mounts::unmount(&m, true) {
                warn!("{e}");
            }
        }
    }
}
