//! The attachment table: what the manager holds for each attached layer,
//! shared with its background tasks (handoff, periodic persist, prefetch
//! jobs), and the status it reports about them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use super::fuse::LayerFiles;
use super::loopdev::LoopDevice;
use crate::layer::LazyLayer;
use crate::oci::LayerId;
use crate::stats::Stats;

/// What the caller gets back from an attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedLayer {
    /// What the layer is (its anchor): the key of every call about it.
    pub id: LayerId,
    /// The blob digest it was attached as (what its sources are asked for).
    pub digest: String,
    /// The read-only EROFS mount of the layer.
    pub mountpoint: PathBuf,
    pub loop_device: PathBuf,
    pub image_size: u64,
}

/// Where an attached layer's data comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerState {
    /// Through FUSE; missing chunks are fetched when read.
    #[default]
    Lazy,
    /// Through FUSE, and a background prefetch is fetching the rest.
    Fetching,
    /// Complete: the loop device reads the local cache file, FUSE is out.
    Local,
}

impl LayerState {
    pub fn as_str(self) -> &'static str {
        match self {
            LayerState::Lazy => "lazy",
            LayerState::Fetching => "fetching",
            LayerState::Local => "local",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerStatus {
    /// The layer's identity (its anchor, or `unanchored:` + blob digest).
    pub id: LayerId,
    /// The blob digest it was attached as.
    pub digest: String,
    /// The anchor its index was checked against; `None`: an unanchored
    /// (version 1) layer its operator allowed.
    pub anchor: Option<String>,
    pub mountpoint: PathBuf,
    pub loop_device: PathBuf,
    pub chunks_present: u64,
    pub chunks_total: u64,
    pub image_size: u64,
    #[serde(default)]
    pub state: LayerState,
    /// The loop device's backing file: the FUSE file, or the cache's image
    /// file once local.
    #[serde(default)]
    pub backing_file: PathBuf,
}

/// One attached layer.
pub(super) struct Attached {
    pub info: AttachedLayer,
    pub layer: Arc<LazyLayer>,
    pub loop_dev: LoopDevice,
    /// What the loop device reads now (the FUSE file, or the image file).
    pub backing: PathBuf,
    pub local: bool,
    /// The loop device's readahead while lazy, in KiB, as last set
    /// ([`readahead`](super::readahead)).
    pub read_ahead_kb: u32,
    /// A handoff failed: the periodic check does not retry it (every second
    /// a warning); the next attach tries again.
    pub handoff_failed: bool,
    /// The identity as a file name ([`LayerId::file_name`]): the layer's
    /// FUSE file, cache directory and mountpoint.
    pub name: String,
    /// Loop devices a previous run left on this layer's FUSE file, still
    /// under a running container's EROFS mount; switched along with ours.
    pub orphans: Vec<LoopDevice>,
}

impl Attached {
    /// `prefetching`: a prefetch job of the layer is running.
    pub fn status(&self, prefetching: bool) -> LayerStatus {
        LayerStatus {
            id: self.info.id.clone(),
            digest: self.info.digest.clone(),
            anchor: self.info.id.anchor().map(str::to_owned),
            mountpoint: self.info.mountpoint.clone(),
            loop_device: self.info.loop_device.clone(),
            chunks_present: self.layer.chunks_present(),
            chunks_total: self.layer.index().chunk_count(),
            image_size: self.info.image_size,
            state: if self.local {
                LayerState::Local
            } else if prefetching {
                LayerState::Fetching
            } else {
                LayerState::Lazy
            },
            backing_file: self.backing.clone(),
        }
    }
}

/// The attached layers by identity.
#[derive(Clone, Default)]
pub(super) struct Table(Arc<Mutex<HashMap<LayerId, Attached>>>);

impl Table {
    pub fn lock(&self) -> MutexGuard<'_, HashMap<LayerId, Attached>> {
        lock(&self.0)
    }
}

/// The layers being opened, each with the lock its attaches take in turn.
#[derive(Clone, Default)]
pub(super) struct Opening(Arc<Mutex<HashMap<LayerId, Arc<tokio::sync::Mutex<()>>>>>);

impl Opening {
    /// Registers `id` as being opened; the guard unregisters it once no
    /// attach of it holds or waits for its lock.
    pub fn enter(&self, id: &LayerId) -> OpeningGuard {
        let lock = lock(&self.0).entry(id.clone()).or_default().clone();
        OpeningGuard {
            opening: self.clone(),
            id: id.clone(),
            lock,
        }
    }

    /// The cache names of the layers being opened.
    pub fn names(&self) -> Vec<String> {
        lock(&self.0).keys().map(LayerId::file_name).collect()
    }
}

pub(super) struct OpeningGuard {
    opening: Opening,
    id: LayerId,
    pub lock: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for OpeningGuard {
    fn drop(&mut self) {
        let mut map = lock(&self.opening.0);
        // Clones are made under the map's lock: ours and the map's are the
        // last two unless another attach of the layer holds one.
        if Arc::strong_count(&self.lock) <= 2 {
            map.remove(&self.id);
        }
    }
}

/// What the manager shares with its background tasks.
#[derive(Clone)]
pub(super) struct Shared {
    pub files: Arc<LayerFiles>,
    pub table: Table,
    /// Serialises attach, detach, handoff and eviction, which span awaits.
    /// An attach holds it to register its layer in `opening`, for the FUSE
    /// file and loop device, and to enter the layer in the table; the index
    /// fetch and the EROFS mount (which reads through the lazy path, so
    /// waits for the network) run without it: one layer's fetches overlap
    /// another's devices, and a layer whose source hangs holds up no other.
    pub ops: Arc<tokio::sync::Mutex<()>>,
    /// The layers an attach is opening: their caches are in use though
    /// not attached yet. One attach per layer at a time: the others wait on
    /// its lock.
    pub opening: Opening,
    pub stats: Arc<Stats>,
    /// [`NodeConfig::handoff`](super::NodeConfig::handoff).
    pub handoff: bool,
    /// The root, whose heartbeat the periodic persist touches.
    pub root: std::path::PathBuf,
    /// [`NodeConfig::read_ahead_kb`](super::NodeConfig::read_ahead_kb): set
    /// at the handoff.
    pub read_ahead_kb: u32,
}

/// A poisoned lock still guards consistent data here (every update is a
/// single insert, remove or field store), so it is used as is.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
