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
use super::fdstore::{session_key, FdStore};
use super::fuse::{FuseMount, LayerFiles};
use super::handoff::persist_periodically;
use super::mounts;
use super::orphans::Orphans;
use super::prefetch::{running, Jobs};
use super::readahead;
use super::resume;
use super::table::{lock, LayerStatus, Shared, Table};
use super::{DeviceError, NodeConfig};
use crate::fetch::LazyReadAhead;
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
    /// Sets lazy layers' readahead as the link estimate changes.
    read_ahead: Option<tokio::task::JoinHandle<()>>,
    /// [`Orphans`] of the previous run, until their layers are attached.
    pub(super) orphans: Orphans,
    /// Where the FUSE session's descriptors outlive this process.
    pub(super) store: FdStore,
    /// Bounds cache verifications running at once (they hash whole caches).
    pub(super) verifiers: Arc<tokio::sync::Semaphore>,
    /// Set by [`hand_over`](Self::hand_over): dropping leaves everything.
    handed_over: std::sync::atomic::AtomicBool,
}

impl LayerManager {
    /// Mounts the FUSE directory under `config.root`, after unmounting
    /// whatever a previous process left mounted there; or, if the fd store
    /// holds that process's FUSE session, resumes it and leaves its mounts
    /// for [`attach`](Self::attach) to adopt (then call
    /// [`end_restore`](Self::end_restore) once every layer is attached
    /// again). Must run inside a multi-threaded tokio runtime: fetches run
    /// on it.
    pub fn new(config: NodeConfig) -> Result<Self, DeviceError> {
        let root = config.root.clone();
        let setup = |source| DeviceError::Setup {
            root: root.clone(),
            source,
        };
        std::fs::create_dir_all(&root).map_err(setup)?;
        let store = FdStore::open(
            config.fd_store.clone(),
            &session_key(&root),
            config.fetch.read_deadline,
        );
        let held = store.take_inherited();
        let resumed = if held.is_empty() {
            None
        } else {
            resume::resume_session(&config, &store, held)
        };
        let (files, fuse, orphans) = match resumed {
            Some((files, fuse)) => (files, fuse, Orphans::default()),
            None => {
                let orphans = Orphans::adopt(&config.fuse_dir());
                cleanup_stale_mounts(&root);
                for dir in [config.fuse_dir(), config.caches_dir(), config.mounts_dir()] {
                    std::fs::create_dir_all(dir).map_err(setup)?;
                }
                let files = LayerFiles::new(Handle::current());
                let fuse = FuseMount::mount(&config.fuse_dir(), files.clone(), config.fuse_threads)
                    .map_err(setup)?;
                (files, fuse, orphans)
            }
        };
        if store.configured() {
            for (name, fd) in fuse.held_fds() {
                if let Err(e) = store.put(&name, fd) {
                    warn!("fd store: keeping {name}: {e}");
                }
            }
            store.serving();
        }
        resume::touch_heartbeat(&root);
        let shared = Shared {
            files,
            table: Table::default(),
            ops: Arc::default(),
            opening: Default::default(),
            stats: Arc::new(Stats::default()),
            handoff: config.handoff,
            root: root.clone(),
            read_ahead_kb: config.read_ahead_kb,
        };
        let persister = tokio::spawn(persist_periodically(
            shared.clone(),
            config.persist_interval,
        ));
        if shared.files.is_restoring() {
            // Bounded: requests of layers nobody attaches again fail then.
            let (files, within) = (shared.files.clone(), config.fetch.read_deadline);
            tokio::spawn(async move {
                tokio::time::sleep(within).await;
                if files.is_restoring() {
                    warn!("restore not ended after {within:?}: failing what still waits");
                    files.end_restore();
                }
            });
        }
        let node = NodeContext {
            stats: shared.stats.clone(),
            read_ahead: LazyReadAhead {
                max_kb: config.lazy_read_ahead_kb,
                follows_link: config.lazy_read_ahead_follows_link,
                warms_narrow: config.warm_startup,
            },
            ..NodeContext::new(config.fetch.clone())
        };
        let prefetcher = Prefetcher::new(node.gate.clone(), config.prefetch_rate);
        let read_ahead = (config.lazy_read_ahead_follows_link && config.lazy_read_ahead_kb > 0)
            .then(|| {
                tokio::spawn(readahead::follow_link(
                    shared.clone(),
                    node.link.clone(),
                    node.read_ahead,
                ))
            });
        info!(
            "lazy layer manager ready at {}{}",
            root.display(),
            if shared.files.is_restoring() {
                " (resumed the previous daemon's FUSE session)"
            } else {
                ""
            }
        );
        let verifiers = Arc::new(tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        ));
        Ok(LayerManager {
            config,
            shared,
            fuse: Mutex::new(Some(fuse)),
            node,
            prefetcher,
            jobs: Jobs::default(),
            persister,
            read_ahead,
            orphans,
            store,
            verifiers,
            handed_over: Default::default(),
        })
    }

    /// Whether this manager resumed a previous daemon's FUSE session and
    /// still waits for its layers to be attached again.
    pub fn is_restoring(&self) -> bool {
        self.shared.files.is_restoring()
    }

    /// Every layer that was attached before the restart is attached again:
    /// requests for the others fail now, and their leftover mounts are
    /// detached lazily. A no-op without a resumed session.
    pub async fn end_restore(&self) {
        if !self.shared.files.is_restoring() {
            return;
        }
        let _op = self.shared.ops.lock().await;
        self.shared.files.end_restore();
        let mut attached: HashSet<String> = self
            .shared
            .table
            .lock()
            .values()
            .map(|a| a.name.clone())
            .collect();
        // An attach mounts outside `ops`: its new mount is not a leftover.
        attached.extend(self.shared.opening.names());
        let mounts = self.config.mounts_dir();
        let _ = tokio::task::spawn_blocking(move || resume::unmount_unadopted(&mounts, &attached))
            .await;
        info!("restore ended: every layer is attached again");
    }

    /// Whether the FUSE session outlives this process (an fd store keeps
    /// it), so that [`hand_over`](Self::hand_over) leaves nothing failing.
    pub fn can_hand_over(&self) -> bool {
        self.store.keeps_fds()
    }

    /// Hands everything over to the next daemon on this root (rule 4 of
    /// `resume.rs`): stops the background jobs, persists every cache and
    /// returns without detaching or unmounting anything. The caller exits
    /// the process next; the FUSE threads serve until then, and what they
    /// leave unanswered is resent to the next daemon.
    pub async fn hand_over(&self) {
        self.persister.abort();
        if let Some(task) = &self.read_ahead {
            task.abort();
        }
        self.jobs.abort_all();
        let layers: Vec<Arc<LazyLayer>> = self
            .shared
            .table
            .lock()
            .values()
            .map(|a| a.layer.clone())
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for layer in layers {
                if let Err(e) = layer.persist() {
                    warn!("layer {}: persisting cache: {e}", layer.digest());
                }
            }
        })
        .await;
        resume::touch_heartbeat(&self.config.root);
        self.handed_over
            .store(true, std::sync::atomic::Ordering::Relaxed);
        info!(
            "handed over {}: {} layers stay attached for the next daemon",
            self.config.root.display(),
            self.shared.table.lock().len()
        );
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
        let mut attached: HashSet<String> = self
            .shared
            .table
            .lock()
            .values()
            .map(|a| a.name.clone())
            .collect();
        attached.extend(self.shared.opening.names());
        let dir = self.config.caches_dir();
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
        self.config.cache_dir(&id.file_name())
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
        if let Some(task) = &self.read_ahead {
            task.abort();
        }
        self.jobs.abort_all();
        if *self.handed_over.get_mut() || self.store.keeps_fds() {
            // The next daemon resumes all of it (a panic counts as a crash).
            return;
        }
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
