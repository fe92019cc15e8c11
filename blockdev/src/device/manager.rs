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

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::runtime::Handle;
use tracing::{error, info, warn};

use super::fuse::{FuseMount, LayerFiles};
use super::loopdev::{LoopDevice, LoopOptions};
use super::mounts;
use super::undo::Undo;
use crate::fetch::FetchConfig;
use crate::layer::{LayerError, LayerSource, LazyLayer};
use crate::stats::{Stats, StatsSnapshot};

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
    #[error("invalid layer digest {0:?}: expected <algorithm>:<hex>")]
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

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerStatus {
    pub digest: String,
    pub mountpoint: PathBuf,
    pub loop_device: PathBuf,
    pub chunks_present: u64,
    pub chunks_total: u64,
    pub image_size: u64,
}

struct Attached {
    info: AttachedLayer,
    layer: Arc<LazyLayer>,
    loop_dev: LoopDevice,
    fuse_file: PathBuf,
    name: String,
}

pub struct LayerManager {
    config: NodeConfig,
    files: Arc<LayerFiles>,
    fuse: Mutex<Option<FuseMount>>,
    layers: Arc<Mutex<HashMap<String, Attached>>>,
    /// Serialises attach and detach, which span awaits.
    ops: tokio::sync::Mutex<()>,
    stats: Arc<Stats>,
    persister: tokio::task::JoinHandle<()>,
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
        cleanup_stale_mounts(&root);
        for dir in ["fuse", "layers", "mnt"] {
            std::fs::create_dir_all(root.join(dir)).map_err(setup)?;
        }
        let files = LayerFiles::new(Handle::current());
        let fuse = FuseMount::mount(&root.join("fuse"), files.clone(), config.fuse_threads)
            .map_err(setup)?;
        let layers: Arc<Mutex<HashMap<String, Attached>>> = Arc::default();
        let persister = tokio::spawn(persist_periodically(
            layers.clone(),
            config.persist_interval,
        ));
        info!("lazy layer manager ready at {}", root.display());
        Ok(LayerManager {
            config,
            files,
            fuse: Mutex::new(Some(fuse)),
            layers,
            ops: tokio::sync::Mutex::new(()),
            stats: Arc::new(Stats::default()),
            persister,
        })
    }

    pub fn root(&self) -> &Path {
        &self.config.root
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The attached layer itself: the P2P peer server reads and relays
    /// chunks through it.
    pub fn layer(&self, digest: &str) -> Option<Arc<LazyLayer>> {
        let layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        layers.get(digest).map(|a| a.layer.clone())
    }

    pub fn layers(&self) -> Vec<LayerStatus> {
        let layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<LayerStatus> = layers
            .values()
            .map(|a| LayerStatus {
                digest: a.info.digest.clone(),
                mountpoint: a.info.mountpoint.clone(),
                loop_device: a.info.loop_device.clone(),
                chunks_present: a.layer.chunks_present(),
                chunks_total: a.layer.index().chunk_count(),
                image_size: a.info.image_size,
            })
            .collect();
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        out
    }

    /// Attaches the layer (idempotent: an attached layer is returned as is).
    pub async fn attach(&self, src: LayerSource) -> Result<AttachedLayer, DeviceError> {
        let _op = self.ops.lock().await;
        let digest = src.digest.clone();
        if let Some(a) = self
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
                self.stats.clone(),
                self.config.fetch.clone(),
            )
            .await?,
        );
        let exposing = Exposing {
            config: self.config.clone(),
            files: self.files.clone(),
            name: name.clone(),
            layer: layer.clone(),
        };
        // Blocking work, and mounting EROFS reads the superblock through our
        // FUSE file, whose misses are fetched on this runtime: never block it.
        let exposed = tokio::task::spawn_blocking(move || exposing.run())
            .await
            .map_err(|e| DeviceError::Task(e.to_string()))?;
        match exposed {
            Ok(attached) => {
                let info = attached.info.clone();
                self.layers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(digest.clone(), attached);
                info!(
                    "attached layer {digest} at {} via {}",
                    info.mountpoint.display(),
                    info.loop_device.display()
                );
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
        let _op = self.ops.lock().await;
        let Some(attached) = self
            .layers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest)
        else {
            return Ok(());
        };
        let files = self.files.clone();
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
                self.layers
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
        let layers = std::mem::take(&mut *self.layers.lock().unwrap_or_else(|e| e.into_inner()));
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

        inject(AttachStep::FuseFile)?;
        self.files
            .add(&self.name, self.layer.clone())
            .map_err(step_err("add FUSE file"))?;
        let (files, name) = (self.files.clone(), self.name.clone());
        undo.push("remove FUSE file", move || files.remove(&name));

        inject(AttachStep::Loop)?;
        let fuse_file = self.config.root.join("fuse").join(&self.name);
        let backing = File::open(&fuse_file).map_err(step_err("open FUSE file"))?;
        let image_size = self.layer.image_size();
        let opts = LoopOptions {
            direct_io: self.config.loop_direct_io,
            block_size: if image_size % 4096 == 0 { 4096 } else { 512 },
        };
        let loop_dev = LoopDevice::attach(&backing, &fuse_file, opts)
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
        let (undo_slot, undo_file) = (slot.clone(), fuse_file.clone());
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
        Ok(Attached {
            info: AttachedLayer {
                digest,
                mountpoint,
                loop_device: loop_path,
                image_size,
            },
            layer: self.layer,
            loop_dev,
            fuse_file,
            name: self.name,
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
    let cleared = a.loop_dev.release(&a.fuse_file, LOOP_CLEAR_WAIT);
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

async fn persist_periodically(layers: Arc<Mutex<HashMap<String, Attached>>>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let open: Vec<Arc<LazyLayer>> = layers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|a| a.layer.clone())
            .collect();
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

/// `sha256:ab12..` -> `sha256-ab12..`; anything else is refused, so a digest
/// can never name a path outside the root.
fn layer_name(digest: &str) -> Result<String, DeviceError> {
    let bad = || DeviceError::BadDigest(digest.to_owned());
    let (algo, hex) = digest.split_once(':').ok_or_else(bad)?;
    let algo_ok = !algo.is_empty()
        && algo
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let hex_ok = hex.len() >= 32
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    if !algo_ok || !hex_ok {
        return Err(bad());
    }
    Ok(format!("{algo}-{hex}"))
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
        ] {
            assert!(layer_name(bad).is_err(), "{bad}");
        }
    }
}
