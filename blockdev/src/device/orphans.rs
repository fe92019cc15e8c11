//! Loop devices a previous run of this node left behind on its FUSE files.
//!
//! When the daemon dies, a container that was reading a lazy layer keeps its
//! EROFS mount and the loop device under it, but that device's backing file
//! is a FUSE file of a connection nobody serves any more: every read fails.
//! Such a device is still read-only and the layer's image has the same size
//! in the next run, so `LOOP_CHANGE_FD` can point it at the new run's backing
//! file (its FUSE file, or the local cache file once complete), and the
//! container's reads work again without remounting anything.
//!
//! They must be found before the stale FUSE mount is detached: until then
//! sysfs names their backing file by its full path under this node's root,
//! which is what tells them apart from another node's devices for the same
//! layer on this machine.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use tracing::{info, warn};

use super::loopdev::{self, LoopDevice};

#[derive(Default)]
pub struct Orphans(Mutex<HashMap<String, Vec<LoopDevice>>>);

impl Orphans {
    /// Holds every loop device whose backing file is a file directly in
    /// `fuse_dir`, by that file's name (the layer's name).
    pub fn adopt(fuse_dir: &Path) -> Orphans {
        let mut found: HashMap<String, Vec<LoopDevice>> = HashMap::new();
        for (number, backing) in loopdev::attached_under(fuse_dir) {
            let Some(name) = backing
                .strip_prefix(fuse_dir)
                .ok()
                .and_then(|rest| rest.to_str())
                .filter(|rest| !rest.is_empty() && !rest.contains('/'))
            else {
                continue;
            };
            match LoopDevice::open_existing(number) {
                Ok(dev) => {
                    info!(
                        "loop{number} still reads {} from a previous run: kept for its layer",
                        backing.display()
                    );
                    found.entry(name.to_owned()).or_default().push(dev);
                }
                Err(e) => warn!("loop{number} of a previous run: {e}"),
            }
        }
        Orphans(Mutex::new(found))
    }

    /// The devices left behind for layer `name`, now the caller's.
    pub fn take(&self, name: &str) -> Vec<LoopDevice> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .unwrap_or_default()
    }
}

/// Points each of `devices` at `backing`; false if any could not be
/// switched (it keeps reading what it read, which the caller must keep).
pub fn switch_all(devices: &[LoopDevice], backing: &Path, layer: &str) -> bool {
    if devices.is_empty() {
        return true;
    }
    let file = match std::fs::File::open(backing) {
        Ok(f) => f,
        Err(e) => {
            warn!(
                "layer {layer}: opening {} for old loop devices: {e}",
                backing.display()
            );
            return false;
        }
    };
    let mut all = true;
    for dev in devices {
        match dev.change_backing(&file) {
            Ok(()) => info!(
                "layer {layer}: {} of a previous run reads {}",
                dev.path().display(),
                backing.display()
            ),
            Err(e) => {
                all = false;
                warn!(
                    "layer {layer}: {} of a previous run not switched: {e}",
                    dev.path().display()
                );
            }
        }
    }
    all
}
