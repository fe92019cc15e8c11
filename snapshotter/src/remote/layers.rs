//! What the remote path needs from this node's lazy layers: attach and
//! detach them, find their EROFS mounts, hand them to the P2P peer, keep
//! their caches within capacity and replay startup traces on them.
//! [`LayerManager`] is the real one (FUSE, loop devices, EROFS: root
//! only); the unit tests of the remote path and the service use an
//! in-memory table instead.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use lazybd_blockdev::device::{DeviceError, LayerManager};
use lazybd_blockdev::layer::{LayerSource, LazyLayer};
use lazybd_blockdev::oci::LayerId;
use lazybd_blockdev::stats::Stats;
use lazybd_blockdev::trace::Trace;
use tokio::sync::oneshot;

#[async_trait]
pub trait LazyLayers: Send + Sync + 'static {
    /// Attaches the layer (idempotent); returns its EROFS mount. Sends on
    /// `opened` once its index is verified against its anchor.
    async fn attach(
        &self,
        source: LayerSource,
        opened: Option<oneshot::Sender<()>>,
    ) -> Result<PathBuf, DeviceError>;

    async fn detach(&self, id: &LayerId) -> Result<(), DeviceError>;

    /// Fetches and verifies the layer's index ahead of its attach, where
    /// the attach finds it.
    async fn fetch_index(&self, source: LayerSource) -> Result<(), DeviceError>;

    /// `(identity, EROFS mount)` of every attached layer.
    fn mountpoints(&self) -> Vec<(LayerId, PathBuf)>;

    /// An attached layer, to serve it to peers.
    fn layer(&self, id: &LayerId) -> Option<Arc<LazyLayer>>;

    /// Removes least recently used caches of detached layers while they
    /// take more than `capacity` bytes.
    async fn evict_caches(&self, capacity: u64);

    /// The directory that holds layer `id`'s cache (what the layer takes
    /// on disk); `None` where layers take no disk.
    fn cache_dir(&self, id: &LayerId) -> Option<PathBuf>;

    /// The counters trace loads are accounted to.
    fn counters(&self) -> &Stats;

    /// Starts replaying `trace` on the attached layers it names; how many.
    fn replay_trace(&self, trace: &Trace) -> usize;
}

#[async_trait]
impl LazyLayers for LayerManager {
    async fn attach(
        &self,
        source: LayerSource,
        opened: Option<oneshot::Sender<()>>,
    ) -> Result<PathBuf, DeviceError> {
        Ok(LayerManager::attach_reporting(self, source, opened)
            .await?
            .mountpoint)
    }

    async fn detach(&self, id: &LayerId) -> Result<(), DeviceError> {
        LayerManager::detach(self, id).await
    }

    async fn fetch_index(&self, source: LayerSource) -> Result<(), DeviceError> {
        LayerManager::fetch_index(self, source).await
    }

    fn mountpoints(&self) -> Vec<(LayerId, PathBuf)> {
        self.layers()
            .into_iter()
            .map(|l| (l.id, l.mountpoint))
            .collect()
    }

    fn layer(&self, id: &LayerId) -> Option<Arc<LazyLayer>> {
        LayerManager::layer(self, id)
    }

    async fn evict_caches(&self, capacity: u64) {
        // The report is logged where it is made.
        LayerManager::evict_caches(self, capacity).await;
    }

    fn cache_dir(&self, id: &LayerId) -> Option<PathBuf> {
        Some(LayerManager::cache_dir(self, id))
    }

    fn counters(&self) -> &Stats {
        LayerManager::counters(self)
    }

    fn replay_trace(&self, trace: &Trace) -> usize {
        LayerManager::replay_trace(self, trace)
    }
}
