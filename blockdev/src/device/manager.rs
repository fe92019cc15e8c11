//! Attach and detach lazy layers on a node.
//!
//! Layout under the root:
//!
//! ```text
//! root/fuse/<layer>         the FUSE file of each attached layer (one FUSE mount)
//! root/layers/<layer>/      index, image, chunks.map: the layer's cache (kept across detach)
//! root/mnt/<layer>/         the layer's EROFS mount
//! ```
//!
//! `<layer>` is the digest with `:` replaced by `-`. Attaching again after a
//! restart on the same root reuses the saved index and cache. Every attach
//! step registers its undo, so a failure at any step leaves nothing behind;
//! detach unmounts EROFS, lets the loop device clear itself, removes the
//! FUSE file and closes the cache cleanly.
//!
//! A layer whose cache is complete is *local*: its loop device reads the
//! cache's image file directly (switched with `LOOP_CHANGE_FD` once the last
//! chunk arrived, or attached that way when the cache was complete already),
//! and FUSE and this process are out of its data path.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::runtime::Handle;
use tracing::{error, info, warn};

use super::eviction::{self, EvictionReport};
use super::fuse::{FuseMount, LayerFiles};
use super::loopdev::{LoopDevice, LoopOptions};
use super::mounts;
use super::orphans::{self, Orphans};
use super::undo::Undo;
use crate::fetch::FetchConfig;
use crate::gate::PriorityGate;
use crate::layer::{LayerError, LayerSource, LazyLayer};
use crate::oci;
use crate::prefetch::Prefetcher;
use crate::stats::{Stats, StatsSnapshot};
use crate::trace::Trace;

/// In a layer's cache directory: a prefetch was asked for. A restarted
/// process resumes it on attach, so a layer under a running container does
/// not stay dependent on the daemon just because the daemon restarted.
const PREFETCH_MARKER: &str = "prefetch";

/// How long detach waits for the kernel to clear a loop device.
const LOOP_CLEAR_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Cache, FUSE mount and EROFS mounts live here; one manager per root.
    pub root: PathBuf,
    pub fetch: FetchConfig,
    /// How often new chunks' bits are made durable (a crash loses at most
    /// this much fetching, never correctness).
    pub persist_interval: Duration,
    /// Loop devices read the FUSE file with O_DIRECT: one page cache (the
    /// block device's) instead of two, and with FUSE async DIO several reads
    /// in flight; about 4x the sequential throughput of buffered loop reads
    /// when the cache is in memory (docs/benchmarks.md).
    pub loop_direct_io: bool,
    /// Readahead of each loop device in KiB (more 1 MiB reads in flight for
    /// sequential readers); 0 keeps the kernel default.
    pub read_ahead_kb: u32,
    /// FUSE request threads (reads of cached chunks run on them).
    pub fuse_threads: usize,
    /// Fault injection for tests: fail the attach right before this step.
    pub fail_attach_at: Option<AttachStep>,
    /// Bandwidth of all background prefetches together, bytes per second;
    /// 0 = unlimited. On-demand reads are never limited.
    pub prefetch_rate: u64,
    /// Complete layers read their local cache file instead of FUSE. Off only
    /// to measure the FUSE path (the read benchmark).
    pub handoff: bool,
}

impl NodeConfig {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        NodeConfig {
            root: root.into(),
            fetch: FetchConfig::default(),
            persist_interval: Duration::from_secs(1),
            loop_direct_io: true,
            read_ahead_kb: 4096,
            fuse_threads: 2,
            fail_attach_at: None,
            prefetch_rate: 0,
            handoff: true,
        }
    }
}

/// The steps of an attach, in order (for fault injection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachStep {
    /// Adding the layer's file to the FUSE directory.
    FuseFile,
    /// Attaching the loop device.
    Loop,
    /// Mounting EROFS.
    Mount,
    /// After everything succeeded (tests the final rollback).
    Register,
}

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("invalid layer digest {0:?}: expected sha256:<64 lowercase hex digits>")]
    BadDigest(String),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error("layer {digest}: {step}: {source}")]
    Step {
        digest: String,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {digest}: injected failure before {step:?}")]
    Injected { digest: String, step: AttachStep },
    #[error("layer {digest}: loop device {device} still attached {LOOP_CLEAR_WAIT:?} after unmount (held open by another process?)")]
    LoopStillAttached { digest: String, device: PathBuf },
    #[error("setting up {root}: {source}")]
    Setup {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("background task failed: {0}")]
    Task(String),
    #[error("layer {0} is not attached")]
    NotAttached(String),
}

/// What the caller gets back from an attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedLayer {
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
    pub digest: String,
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

/// What starting a prefetch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefetchStart {
    Started,
    AlreadyRunning,
    /// Nothing to fetch: the layer is local already.
    AlreadyLocal,
}

struct Attached {
    info: AttachedLayer,
    layer: Arc<LazyLayer>,
    loop_dev: LoopDevice,
    /// What the loop device reads now (the FUSE file, or the image file).
    backing: PathBuf,
    local: bool,
    /// A handoff failed: the periodic check does not retry it (every second
    /// a warning); the next attach tries again.
    handoff_failed: bool,
    name: String,
    /// Loop devices a previous run left on this layer's FUSE file, still
    /// under a running container's EROFS mount; switched along with ours.
    orphans: Vec<LoopDevice>,
}

/// What the manager shares with its background tasks.
#[derive(Clone)]
struct Shared {
    files: Arc<LayerFiles>,
    layers: Arc<Mutex<HashMap<String, Attached>>>,
    /// Serialises attach, detach, handoff and eviction, which span awaits.
    ops: Arc<tokio::sync::Mutex<()>>,
    stats: Arc<Stats>,
    /// [`NodeConfig::handoff`].
    handoff: bool,
}

pub struct LayerManager {
    config: NodeConfig,
    shared: Shared,
    fuse: Mutex<Option<FuseMount>>,
    gate: Arc<PriorityGate>,
    prefetcher: Arc<Prefetcher>,
    /// Running (or finished) prefetch jobs by digest.
    jobs: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// Running (or finished) trace replays by digest.
    replays: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    persister: tokio::task::JoinHandle<()>,
    /// [`Orphans`] of the previous run, until their layers are attached.
    orphans: Orphans,
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
            layers: Arc::default(),
            ops: Arc::default(),
            stats: Arc::new(Stats::default()),
            handoff: config.handoff,
        };
        let persister = tokio::spawn(persist_periodically(
            shared.clone(),
            config.persist_interval,
        ));
        let gate = PriorityGate::new();
        let prefetcher = Prefetcher::new(gate.clone(), config.prefetch_rate);
        info!("lazy layer manager ready at {}", root.display());
        Ok(LayerManager {
            config,
            shared,
            fuse: Mutex::new(Some(fuse)),
            gate,
            prefetcher,
            jobs: Mutex::default(),
            replays: Mutex::default(),
            persister,
            orphans,
        })
    }

    /// Changes the prefetch bandwidth limit (bytes/s, 0 = unlimited).
    pub fn set_prefetch_rate(&self, rate: u64) {
        self.prefetcher.limiter.set_rate(rate);
    }

    /// Starts fetching every missing chunk of an attached layer in the
    /// background (on-demand reads go first); when it is complete, the loop
    /// device is switched to the local cache file.
    pub fn prefetch(&self, digest: &str) -> Result<PrefetchStart, DeviceError> {
        let (layer, name) = {
            let layers = self.shared.layers.lock().unwrap_or_else(|e| e.into_inner());
            let a = layers
                .get(digest)
                .ok_or_else(|| DeviceError::NotAttached(digest.to_owned()))?;
            if a.local {
                return Ok(PrefetchStart::AlreadyLocal);
            }
            (a.layer.clone(), a.name.clone())
        };
        let marker = self
            .config
            .root
            .join("layers")
            .join(name)
            .join(PREFETCH_MARKER);
        if let Err(e) = std::fs::write(&marker, b"") {
            warn!(
                "layer {digest}: writing {}: {e} (a restart will not resume the prefetch)",
                marker.display()
            );
        }
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if jobs.get(digest).is_some_and(|h| !h.is_finished()) {
            return Ok(PrefetchStart::AlreadyRunning);
        }
        let (prefetcher, shared, d) = (
            self.prefetcher.clone(),
            self.shared.clone(),
            digest.to_owned(),
        );
        info!("layer {digest}: background prefetch started");
        let job = self.gate.job();
        jobs.insert(
            digest.to_owned(),
            tokio::spawn(async move {
                match prefetcher.run(&layer, job).await {
                    Ok(()) => {
                        drop(layer);
                        handoff(&shared, &d).await;
                    }
                    Err(e) => error!("{e}"),
                }
            }),
        );
        Ok(PrefetchStart::Started)
    }

    /// Starts recording the on-demand misses of these attached layers
    /// (unknown digests are skipped) for a startup trace.
    pub fn start_trace(&self, digests: &[String]) {
        for d in digests {
            if let Some(l) = self.layer(d) {
                l.fetcher().start_recording();
            }
        }
    }

    /// Ends the recordings of [`start_trace`](Self::start_trace): the trace
    /// of these layers, in this order (layers detached meanwhile are missing).
    pub fn stop_trace(&self, digests: &[String]) -> Trace {
        Trace::new(digests.iter().filter_map(|d| {
            self.layer(d)
                .map(|l| (d.clone(), l.fetcher().stop_recording()))
        }))
    }

    /// Fetches the trace's chunks of the attached layers in the background,
    /// in parallel, behind on-demand reads and ahead of full prefetches.
    /// Returns the layers a replay was started for (one running replay per
    /// layer; complete layers and layers not attached are skipped).
    pub fn replay_trace(&self, trace: &Trace) -> usize {
        let mut replays = self.replays.lock().unwrap_or_else(|e| e.into_inner());
        let mut started = 0;
        for lt in &trace.layers {
            let Some(layer) = self.layer(&lt.digest) else {
                continue;
            };
            if layer.is_complete() || replays.get(&lt.digest).is_some_and(|h| !h.is_finished()) {
                continue;
            }
            let (prefetcher, chunks) = (self.prefetcher.clone(), lt.chunks.clone());
            // Taken now, so a full prefetch started right after already waits.
            let guard = self.gate.replay();
            info!(
                "layer {}: replaying a trace of {} chunks",
                lt.digest,
                chunks.len()
            );
            replays.insert(
                lt.digest.clone(),
                tokio::spawn(async move {
                    prefetcher.replay(&layer, &chunks, guard).await;
                }),
            );
            started += 1;
        }
        started
    }

    /// Stops the layer's prefetch job and trace replay, if any, and waits
    /// (bounded) until they have let go of the layer.
    async fn stop_prefetch(&self, digest: &str) {
        let replay = self
            .replays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest);
        let job = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest);
        for job in replay.into_iter().chain(job) {
            job.abort();
            if tokio::time::timeout(LOOP_CLEAR_WAIT, job).await.is_err() {
                warn!("layer {digest}: prefetch job did not stop within {LOOP_CLEAR_WAIT:?}");
            }
        }
    }

    /// Removes the caches of detached layers, least recently used first,
    /// until all caches together take at most `capacity` bytes. Caches of
    /// attached layers are never touched (they may exceed the capacity).
    pub async fn evict_caches(&self, capacity: u64) -> EvictionReport {
        let _op = self.shared.ops.lock().await;
        let attached: HashSet<String> = self
            .shared
            .layers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|a| a.name.clone())
            .collect();
        let dir = self.config.root.join("layers");
        tokio::task::spawn_blocking(move || eviction::evict(&dir, &attached, capacity))
            .await
            .unwrap_or_else(|e| {
                warn!("cache eviction task failed: {e}");
                EvictionReport::default()
            })
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
        &self.gate
    }

    /// The attached layer itself: the P2P peer server reads and relays
    /// chunks through it.
    pub fn layer(&self, digest: &str) -> Option<Arc<LazyLayer>> {
        let layers = self.shared.layers.lock().unwrap_or_else(|e| e.into_inner());
        layers.get(digest).map(|a| a.layer.clone())
    }

    pub fn layers(&self) -> Vec<LayerStatus> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let layers = self.shared.layers.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<LayerStatus> = layers
            .values()
            .map(|a| LayerStatus {
                digest: a.info.digest.clone(),
                mountpoint: a.info.mountpoint.clone(),
                loop_device: a.info.loop_device.clone(),
                chunks_present: a.layer.chunks_present(),
                chunks_total: a.layer.index().chunk_count(),
                image_size: a.info.image_size,
                state: if a.local {
                    LayerState::Local
                } else if jobs.get(&a.info.digest).is_some_and(|h| !h.is_finished()) {
                    LayerState::Fetching
                } else {
                    LayerState::Lazy
                },
                backing_file: a.backing.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        out
    }

    /// Attaches the layer (idempotent: an attached layer is returned as is).
    pub async fn attach(&self, src: LayerSource) -> Result<AttachedLayer, DeviceError> {
        let _op = self.shared.ops.lock().await;
        let digest = src.digest.clone();
        if let Some(a) = self
            .shared
            .layers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&digest)
        {
            return Ok(a.info.clone());
        }
        let name = layer_name(&digest)?;
        let layer = Arc::new(
            LazyLayer::open(
                &self.config.root.join("layers").join(&name),
                src,
                self.shared.stats.clone(),
                self.config.fetch.clone(),
                self.gate.clone(),
            )
            .await?,
        );
        let exposing = Exposing {
            config: self.config.clone(),
            files: self.shared.files.clone(),
            name: name.clone(),
            layer: layer.clone(),
            orphans: self.orphans.take(&name),
        };
        // Blocking work, and mounting EROFS reads the superblock through our
        // FUSE file, whose misses are fetched on this runtime: never block it.
        let exposed = tokio::task::spawn_blocking(move || exposing.run())
            .await
            .map_err(|e| DeviceError::Task(e.to_string()))?;
        match exposed {
            Ok(attached) => {
                let info = attached.info.clone();
                let how = if attached.local {
                    "the local cache file"
                } else {
                    "FUSE"
                };
                let resume = !attached.local
                    && self
                        .config
                        .root
                        .join("layers")
                        .join(&attached.name)
                        .join(PREFETCH_MARKER)
                        .exists();
                self.shared
                    .layers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(digest.clone(), attached);
                info!(
                    "attached layer {digest} at {} via {} on {how}",
                    info.mountpoint.display(),
                    info.loop_device.display()
                );
                if resume {
                    info!("layer {digest}: resuming the prefetch asked for before");
                    self.prefetch(&digest)?;
                }
                Ok(info)
            }
            Err(e) => {
                close_layer(layer);
                Err(e)
            }
        }
    }

    /// Unmounts and forgets the layer; its cache stays for a later attach.
    /// Detaching an unknown layer is a no-op.
    pub async fn detach(&self, digest: &str) -> Result<(), DeviceError> {
        self.stop_prefetch(digest).await;
        let _op = self.shared.ops.lock().await;
        let Some(attached) = self
            .shared
            .layers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest)
        else {
            return Ok(());
        };
        let files = self.shared.files.clone();
        let result = tokio::task::spawn_blocking(move || teardown(attached, &files))
            .await
            .map_err(|e| DeviceError::Task(e.to_string()))?;
        match result.map_err(|b| *b) {
            Ok(()) => {
                info!("detached layer {digest}");
                Ok(())
            }
            Err((e, Some(still_mounted))) => {
                // Busy: it stays attached and can be detached again later.
                self.shared
                    .layers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(digest.to_owned(), still_mounted);
                Err(e)
            }
            Err((e, None)) => Err(e),
        }
    }

    /// Detaches every layer and unmounts the FUSE directory.
    pub async fn shutdown(self) -> Result<(), DeviceError> {
        let digests: Vec<String> = self
            .shared
            .layers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut first_err = None;
        for d in digests {
            if let Err(e) = self.detach(&d).await {
                error!("shutdown: {e}");
                first_err.get_or_insert(e);
            }
        }
        let fuse = self.fuse.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(fuse) = fuse {
            let root = self.config.root.clone();
            tokio::task::spawn_blocking(move || fuse.unmount())
                .await
                .map_err(|e| DeviceError::Task(e.to_string()))?
                .map_err(|source| DeviceError::Setup { root, source })?;
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for LayerManager {
    /// Last resort when [`shutdown`](Self::shutdown) was not called (a panic,
    /// an early return): lazily unmount everything so nothing stays mounted.
    fn drop(&mut self) {
        self.persister.abort();
        for (_, job) in self.jobs.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            job.abort();
        }
        for (_, job) in self
            .replays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            job.abort();
        }
        let layers =
            std::mem::take(&mut *self.shared.layers.lock().unwrap_or_else(|e| e.into_inner()));
        for (_, a) in layers {
            let _ = mounts::unmount(&a.info.mountpoint, true);
            drop(a.loop_dev);
            close_layer(a.layer);
        }
        if let Some(fuse) = self.fuse.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let mountpoint = fuse.mountpoint().to_owned();
            if fuse.unmount().is_err() {
                let _ = mounts::unmount(&mountpoint, true);
            }
        }
    }
}

/// The blocking part of an attach: FUSE file, loop device, EROFS mount.
struct Exposing {
    config: NodeConfig,
    files: Arc<LayerFiles>,
    name: String,
    layer: Arc<LazyLayer>,
    orphans: Vec<LoopDevice>,
}

impl Exposing {
    fn run(self) -> Result<Attached, DeviceError> {
        let digest = self.layer.digest().to_owned();
        let step_err = |step: &'static str| {
            let digest = digest.clone();
            move |source| DeviceError::Step {
                digest,
                step,
                source,
            }
        };
        let inject = |step: AttachStep| match self.config.fail_attach_at {
            Some(s) if s == step => Err(DeviceError::Injected {
                digest: digest.clone(),
                step,
            }),
            _ => Ok(()),
        };
        let mut undo = Undo::new();
        // A complete cache needs neither FUSE nor this process: the loop
        // device reads the image file (every chunk in it was verified when
        // stored, or re-hashed when the cache was opened after a crash).
        let local = self.config.handoff && self.layer.is_complete();

        inject(AttachStep::FuseFile)?;
        let backing_path = if local {
            self.layer.image_path()
        } else {
            self.files
                .add(&self.name, self.layer.clone())
                .map_err(step_err("add FUSE file"))?;
            let (files, name) = (self.files.clone(), self.name.clone());
            undo.push("remove FUSE file", move || files.remove(&name));
            self.config.root.join("fuse").join(&self.name)
        };

        inject(AttachStep::Loop)?;
        let backing = File::open(&backing_path).map_err(step_err("open backing file"))?;
        let image_size = self.layer.image_size();
        let opts = LoopOptions {
            direct_io: self.config.loop_direct_io,
            block_size: if image_size % 4096 == 0 { 4096 } else { 512 },
        };
        let loop_dev = LoopDevice::attach(&backing, &backing_path, opts)
            .map_err(step_err("attach loop device"))?;
        drop(backing);
        if self.config.read_ahead_kb > 0 {
            if let Err(e) = loop_dev.set_read_ahead_kb(self.config.read_ahead_kb) {
                warn!("layer {digest}: setting loop readahead: {e}");
            }
        }
        let loop_path = loop_dev.path().to_owned();
        // Until the attach is committed the loop device is ours to release;
        // the undo closure gets it back through this slot.
        let slot = Arc::new(Mutex::new(Some(loop_dev)));
        let (undo_slot, undo_file) = (slot.clone(), backing_path.clone());
        undo.push("release loop device", move || {
            if let Some(dev) = undo_slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                dev.release(&undo_file, LOOP_CLEAR_WAIT);
            }
        });

        inject(AttachStep::Mount)?;
        let mountpoint = self.config.root.join("mnt").join(&self.name);
        std::fs::create_dir_all(&mountpoint).map_err(step_err("create mountpoint"))?;
        let mp = mountpoint.clone();
        undo.push("remove mountpoint", move || {
            let _ = std::fs::remove_dir(&mp);
        });
        mounts::mount_erofs(&loop_path, &mountpoint).map_err(step_err("mount EROFS"))?;
        let mp = mountpoint.clone();
        undo.push("unmount EROFS", move || {
            let _ = mounts::unmount(&mp, false).or_else(|_| mounts::unmount(&mp, true));
        });

        inject(AttachStep::Register)?;
        let loop_dev = slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("loop device still in its slot");
        undo.commit();
        // A container from before a crash reads again, through this run.
        orphans::switch_all(&self.orphans, &backing_path, &digest);
        Ok(Attached {
            info: AttachedLayer {
                digest,
                mountpoint,
                loop_device: loop_path,
                image_size,
            },
            layer: self.layer,
            loop_dev,
            backing: backing_path,
            local,
            handoff_failed: false,
            name: self.name,
            orphans: self.orphans,
        })
    }
}

/// Unmounts EROFS, waits for the loop device to clear, removes the FUSE file
/// and closes the cache. A busy mount hands the layer back untouched.
fn teardown(a: Attached, files: &LayerFiles) -> Result<(), Box<(DeviceError, Option<Attached>)>> {
    if let Err(source) = mounts::unmount(&a.info.mountpoint, false) {
        let err = DeviceError::Step {
            digest: a.info.digest.clone(),
            step: "unmount EROFS",
            source,
        };
        return Err(Box::new((err, Some(a))));
    }
    let _ = std::fs::remove_dir(&a.info.mountpoint);
    let cleared = a.loop_dev.release(&a.backing, LOOP_CLEAR_WAIT);
    files.remove(&a.name);
    close_layer(a.layer);
    if !cleared {
        return Err(Box::new((
            DeviceError::LoopStillAttached {
                digest: a.info.digest,
                device: a.info.loop_device,
            },
            None,
        )));
    }
    Ok(())
}

fn close_layer(layer: Arc<LazyLayer>) {
    // The FUSE directory and in-flight reads may still hold a reference for
    // a moment; then the cache is simply persisted, and re-verified on the
    // next open, which is always safe.
    match Arc::try_unwrap(layer) {
        Ok(layer) => {
            let digest = layer.digest().to_owned();
            if let Err(e) = layer.close() {
                warn!("layer {digest}: closing cache: {e}");
            }
        }
        Err(layer) => {
            if let Err(e) = layer.persist() {
                warn!("layer {}: persisting cache: {e}", layer.digest());
            }
        }
    }
}

/// Switches a complete layer's loop device from its FUSE file to the cache's
/// image file (`LOOP_CHANGE_FD`: the device is read-only and both files have
/// the image's size), then removes the FUSE file. Failures are logged and
/// counted; the layer simply stays on FUSE.
async fn handoff(shared: &Shared, digest: &str) {
    if !shared.handoff {
        return;
    }
    let _op = shared.ops.lock().await;
    let found = {
        let layers = shared.layers.lock().unwrap_or_else(|e| e.into_inner());
        layers
            .get(digest)
            .filter(|a| !a.local && a.layer.is_complete())
            .map(|a| {
                let orphans: std::io::Result<Vec<_>> =
                    a.orphans.iter().map(LoopDevice::try_clone).collect();
                (a.layer.clone(), a.loop_dev.try_clone(), orphans)
            })
    };
    let Some((layer, dev, orphans)) = found else {
        return;
    };
    let layer_digest = digest.to_owned();
    let counters = &shared.stats.prefetch;
    let image = layer.image_path();
    let path = image.clone();
    // Durable first: after the switch the file is the layer, also for the
    // next process that attaches it.
    let switched = tokio::task::spawn_blocking(move || -> Result<bool, String> {
        let dev = dev.map_err(|e| format!("duplicating the loop device fd: {e}"))?;
        layer.persist().map_err(|e| e.to_string())?;
        let file = File::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        dev.change_backing(&file).map_err(|e| e.to_string())?;
        // Old devices that cannot follow still need the FUSE file.
        Ok(match orphans {
            Ok(orphans) => orphans::switch_all(&orphans, &path, &layer_digest),
            Err(e) => {
                warn!("layer {layer_digest}: old loop devices not switched: {e}");
                false
            }
        })
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    match switched {
        Ok(orphans_switched) => {
            let mut layers = shared.layers.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(a) = layers.get_mut(digest) {
                a.backing = image;
                a.local = true;
                // The kernel released it at the switch; no reader is left.
                if orphans_switched {
                    shared.files.remove(&a.name);
                }
            }
            counters.handoffs.fetch_add(1, Relaxed);
            info!("layer {digest}: complete; loop device now reads the local cache file");
        }
        Err(e) => {
            counters.handoff_failures.fetch_add(1, Relaxed);
            if let Some(a) = shared
                .layers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(digest)
            {
                a.handoff_failed = true;
            }
            warn!("layer {digest}: handoff to the local cache file failed, staying on FUSE: {e}");
        }
    }
}

async fn persist_periodically(shared: Shared, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (open, complete): (Vec<Arc<LazyLayer>>, Vec<String>) = {
            let layers = shared.layers.lock().unwrap_or_else(|e| e.into_inner());
            (
                layers.values().map(|a| a.layer.clone()).collect(),
                layers
                    .iter()
                    .filter(|(_, a)| !a.local && !a.handoff_failed && a.layer.is_complete())
                    .map(|(d, _)| d.clone())
                    .collect(),
            )
        };
        // Reads alone can complete a layer, too.
        for digest in complete {
            handoff(&shared, &digest).await;
        }
        let _ = tokio::task::spawn_blocking(move || {
            for layer in open {
                if let Err(e) = layer.persist() {
                    warn!("layer {}: persisting cache: {e}", layer.digest());
                }
            }
        })
        .await;
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

/// `sha256:ab12..` -> `sha256-ab12..`; anything but a valid digest
/// ([`oci::digest_hex`]) is refused, so a digest can never name a path
/// outside the root.
fn layer_name(digest: &str) -> Result<String, DeviceError> {
    let hex = oci::digest_hex(digest).map_err(|_| DeviceError::BadDigest(digest.to_owned()))?;
    Ok(format!("sha256-{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_are_safe() {
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            layer_name(&d).unwrap(),
            format!("sha256-{}", "ab".repeat(32))
        );
        for bad in [
            "",
            "sha256",
            "sha256:../../etc",
            "SHA:abcd",
            &format!("sha256:{}", "AB".repeat(32)),
            &format!("sha256:{}", "ab".repeat(16)),
            &format!("sha512:{}", "ab".repeat(32)),
        ] {
            assert!(layer_name(bad).is_err(), "{bad}");
        }
    }
}
