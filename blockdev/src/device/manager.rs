//! [`LayerManager`]: the facade over one node root. It owns the FUSE mount,
//! the attachment table, the node's priority gate and prefetcher, and the
//! background tasks; the operations are in their own files ([`super::attach`],
//! [`super::detach`], [`super::prefetch`], [`super::trace`],
//! [`super::handoff`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use tokio::runtime::Handle;
use tracing::{info, warn};

use super::eviction::{self, EvictionReport};
use super::fuse::{FuseMount, LayerFiles};
use super::handoff::persist_periodically;
use super::mounts;
use super::orphans::Orphans;
use super::prefetch::{running, Jobs};
use super::table::{lock, LayerStatus, Shared, Table};
use super::{DeviceError, NodeConfig};
use crate::gate::PriorityGate;
use crate::layer::{LazyLayer, NodeContext};
use crate::oci::LayerId;
use crate::prefetch::Prefetcher;
use crate::stats::{Stats, StatsSnapshot};

pub struct LayerManager {
    pub(super) config: NodeConfig,
    pub(super) shared: Shared,
    pub(super) fuse: Mutex<Option<FuseMount>>,
    /// What the layers share: counters, fetch settings, gate, link.
    pub(super) node: NodeContext,
    pub(super) prefetcher: Arc<Prefetcher>,
    pub(super) jobs: Jobs,
    persister: tokio::task::JoinHandle<()>,
    /// [`Orphans`] of the previous run, until their layers are attached.
    pub(super) orphans: Orphans,
}

impl LayerManager {
    /// Mounts the FUSE directory under `config.root`, after unmounting
    /// whatever a previous process left mounted there. Must run inside a
    /// multi-threaded tokio runtime: fetches run on it.
    pub fn new(config: NodeConfig) -> Result<Self, DeviceError> {
        let root = config.root.clone();
        let setup = |source| DeviceError::Setup {
            root: root.clone(),
            source,
        };
        let orphans = Orphans::adopt(&root.join("fuse"));
        cleanup_stale_mounts(&root);
        for dir in ["fuse", "layers", "mnt"] {
            std::fs::create_dir_all(root.join(dir)).map_err(setup)?;
        }
        let files = LayerFiles::new(Handle::current());
        let fuse = FuseMount::mount(&root.join("fuse"), files.clone(), config.fuse_threads)
            .map_err(setup)?;
        let shared = Shared {
            files,
            table: Table::default(),
            ops: Arc::default(),
            stats: Arc::new(Stats::default()),
            handoff: config.handoff,
            read_ahead_kb: config.read_ahead_kb,
        };
        let persister = tokio::spawn(persist_periodically(
            shared.clone(),
            config.persist_interval,
        ));
        let node = NodeContext {
            stats: shared.stats.clone(),
            ..NodeContext::new(config.fetch.clone())
        };
        let prefetcher = Prefetcher::new(node.gate.clone(), config.prefetch_rate);
        info!("lazy layer manager ready at {}", root.display());
        Ok(LayerManager {
            config,
            shared,
            fuse: Mutex::new(Some(fuse)),
            node,
            prefetcher,
            jobs: Jobs::default(),
            persister,
            orphans,
        })
    }

    /// Changes the prefetch bandwidth limit (bytes/s, 0 = unlimited).
    pub fn set_prefetch_rate(&self, rate: u64) {
        self.prefetcher.limiter.set_rate(rate);
    }

    /// Removes the caches of detached layers, least recently used first,
    /// until all caches together take at most `capacity` bytes. Caches of
    /// attached layers are never touched (they may exceed the capacity).
    pub async fn evict_caches(&self, capacity: u64) -> EvictionReport {
        let _op = self.shared.ops.lock().await;
        let attached: HashSet<String> = self
            .shared
            .table
            .lock()
            .values()
            .map(|a| a.name.clone())
            .collect();
        let dir = self.config.root.join("layers");
        let report =
            tokio::task::spawn_blocking(move || eviction::evict(&dir, &attached, capacity))
                .await
                .unwrap_or_else(|e| {
                    warn!("cache eviction task failed: {e}");
                    EvictionReport::default()
                });
        let c = &self.shared.stats.eviction;
        c.evicted_layers
            .fetch_add(report.evicted.len() as u64, Relaxed);
        c.evicted_bytes.fetch_add(report.freed_bytes, Relaxed);
        c.cache_bytes.store(report.remaining_bytes, Relaxed);
        report
    }

    /// Where the cache of layer `id` lives (also after it is detached,
    /// until it is evicted): what the layer takes on this node's disk.
    pub fn cache_dir(&self, id: &LayerId) -> PathBuf {
        self.config.root.join("layers").join(id.file_name())
    }

    pub fn root(&self) -> &Path {
        &self.config.root
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// The node's live counters (the snapshotter adds its trace counts).
    pub fn counters(&self) -> &Arc<Stats> {
        &self.shared.stats
    }

    pub fn gate(&self) -> &Arc<PriorityGate> {
        &self.node.gate
    }

    /// The attached layer itself: the P2P peer server reads and relays
    /// chunks through it.
    pub fn layer(&self, id: &LayerId) -> Option<Arc<LazyLayer>> {
        self.shared.table.lock().get(id).map(|a| a.layer.clone())
    }

    pub fn layers(&self) -> Vec<LayerStatus> {
        // Jobs before the table, the order the prefetch path takes them in.
        let jobs = lock(&self.jobs.prefetch);
        let layers = self.shared.table.lock();
        let mut out: Vec<LayerStatus> = layers
            .values()
            .map(|a| a.status(running(&jobs, &a.info.id)))
            .collect();
        out.sort_by(|a, b| (&a.digest, &a.id).cmp(&(&b.digest, &b.id)));
        out
    }
}

impl Drop for LayerManager {
    /// Last resort when [`shutdown`](Self::shutdown) was not called (a panic,
    /// an early return): lazily unmount everything so nothing stays mounted.
    fn drop(&mut self) {
        self.persister.abort();
        self.jobs.abort_all();
        let layers = std::mem::take(&mut *self.shared.table.lock());
        for (_, a) in layers {
            let _ = mounts::unmount(&a.info.mountpoint, true);
            drop(a.loop_dev);
            super::detach::close_layer(a.layer);
        }
        if let Some(fuse) = lock(&self.fuse).take() {
            let mountpoint = fuse.mountpoint().to_owned();
            if fuse.unmount().is_err() {
                let _ = mounts::unmount(&mountpoint, true);
            }
        }
    }
}

/// Unmounts what a previous process left under `root` (it died with its
/// FUSE connection, so those mounts only return errors now).
fn cleanup_stale_mounts(root: &Path) {
    match mounts::mounts_under(root) {
        Ok(stale) => {
            for m in stale {
                warn!("unmounting stale mount {} from a previous run", m.display());
                if let Err(e) = mounts::unmount(&m, true) {
                    warn!("{e}");
                }
            }
        }
        Err(e) => warn!("reading mountinfo: {e}"),
    }
}
