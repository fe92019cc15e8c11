//! Attach: open the layer (its index and cache), then the blocking steps
//! that expose it: FUSE file, loop device, EROFS mount. Every step registers
//! its undo, so a failure at any step leaves nothing behind.

use std::fs::File;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::config::LOOP_CLEAR_WAIT;
use super::detach::close_layer;
use super::fuse::LayerFiles;
use super::loopdev::{LoopDevice, LoopOptions};
use super::mounts;
use super::orphans;
use super::prefetch::PREFETCH_MARKER;
use super::resume::{self, Adopted};
use super::table::{Attached, AttachedLayer};
use super::undo::Undo;
use super::{AttachStep, DeviceError, LayerManager, NodeConfig};
use crate::cache::CacheError;
use crate::layer::{LayerError, LayerSource, LazyLayer};
use crate::oci::{LayerId, OciError};

impl LayerManager {
    /// Attaches the layer (idempotent: a layer already attached with the
    /// same identity, i.e. the same anchor, is returned as is; one of the
    /// same blob digest with another anchor is another layer).
    pub async fn attach(&self, src: LayerSource) -> Result<AttachedLayer, DeviceError> {
        self.attach_reporting(src, None).await
    }

    /// [`attach`](Self::attach), sending on `opened` once the layer's
    /// index is verified and its cache open (or it was attached already),
    /// before the FUSE file, loop device and EROFS mount: what depends on
    /// the layer's content being its anchor's can go on from there.
    pub async fn attach_reporting(
        &self,
        src: LayerSource,
        opened: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<AttachedLayer, DeviceError> {
        let id = layer_id(&src)?;
        let digest = src.digest.clone();
        let report = move || {
            if let Some(tx) = opened {
                let _ = tx.send(());
            }
        };
        // Registered under `ops`: an eviction (which holds it throughout)
        // either sees this layer and spares its cache, or ends first.
        let opening = {
            let _op = self.shared.ops.lock().await;
            self.shared.opening.enter(&id)
        };
        let _this_layer = opening.lock.lock().await;
        if let Some(a) = self.shared.table.lock().get(&id) {
            report();
            return Ok(a.info.clone());
        }
        let name = id.file_name();
        let started = Instant::now();
        let layer = Arc::new(self.open_layer(&name, src).await?);
        report();
        let opened = started.elapsed();
        let held = self.shared.ops.clone().lock_owned().await;
        let exposing = Exposing {
            held: Some(held),
            config: self.config.clone(),
            files: self.shared.files.clone(),
            name: name.clone(),
            layer: layer.clone(),
            orphans: self.orphans.take(&name),
            restoring: self.shared.files.is_restoring(),
            lazy_read_ahead_kb: self.lazy_read_ahead_kb(&layer),
        };
        // Blocking work, and mounting EROFS reads the superblock through our
        // FUSE file, whose misses are fetched on this runtime: never block it.
        let exposed = tokio::task::spawn_blocking(move || exposing.run())
            .await
            .map_err(|e| DeviceError::Task(e.to_string()))?;
        // The table changes under `ops`: detach, handoff and eviction read
        // it there.
        let _op = self.shared.ops.lock().await;
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
                        .cache_dir(&attached.name)
                        .join(PREFETCH_MARKER)
                        .exists();
                if !attached.local {
                    let (mnt, dev) = (info.mountpoint.clone(), info.loop_device.clone());
                    self.warm(&id, attached.layer.clone(), mnt, dev);
                }
                self.shared.table.lock().insert(id.clone(), attached);
                let exposed = started.elapsed() - opened;
                let c = &self.shared.stats.attach;
                c.attaches.fetch_add(1, Relaxed);
                c.index_ms.fetch_add(opened.as_millis() as u64, Relaxed);
                c.expose_ms.fetch_add(exposed.as_millis() as u64, Relaxed);
                info!(
                    "attached layer {digest} (identity {id}) at {} via {} on {how} in {:?} \
                     (index and cache {opened:?}, FUSE file, loop and EROFS {exposed:?})",
                    info.mountpoint.display(),
                    info.loop_device.display(),
                    started.elapsed()
                );
                if resume {
                    info!("layer {digest}: resuming the prefetch asked for before");
                    self.prefetch(&id)?;
                }
                if layer.needs_verify() {
                    self.verify_in_background(layer);
                }
                Ok(info)
            }
            Err(e) => {
                close_layer(layer);
                Err(e)
            }
        }
    }
}

impl LayerManager {
    /// Fetches and verifies the index of a layer to be attached soon, into
    /// its cache directory, where its attach finds it
    /// ([`LazyLayer::fetch_index`]). Nothing else of the layer is touched.
    pub async fn fetch_index(&self, src: LayerSource) -> Result<(), DeviceError> {
        let dir = self.config.cache_dir(&layer_id(&src)?.file_name());
        LazyLayer::fetch_index(&dir, &src, &self.node.fetch)
            .await
            .map_err(DeviceError::from)
    }

    /// Opens the layer's index and cache. While a resumed session is being
    /// restored, the previous daemon may still be exiting and hold the
    /// cache's lock: that is waited for, bounded.
    async fn open_layer(&self, name: &str, src: LayerSource) -> Result<LazyLayer, DeviceError> {
        let deadline = Instant::now() + CACHE_LOCK_WAIT;
        loop {
            let opened =
                LazyLayer::open(&self.config.cache_dir(name), src.clone(), &self.node).await;
            match opened {
                Err(LayerError::Cache {
                    source: CacheError::Locked(_),
                    ..
                }) if self.shared.files.is_restoring() && Instant::now() < deadline => {
                    info!(
                        "layer {}: cache still held by the previous daemon; waiting",
                        src.digest
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return Ok(other?),
            }
        }
    }

    /// Re-hashes what an unclean cache claimed (see `crate::cache`), off
    /// the read path, a few layers at a time; counted in the stats.
    fn verify_in_background(&self, layer: Arc<LazyLayer>) {
        let (permits, stats) = (self.verifiers.clone(), self.shared.stats.clone());
        tokio::spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            let digest = layer.digest().to_owned();
            let verified = tokio::task::spawn_blocking(move || layer.verify_pending()).await;
            match verified {
                Ok(Ok(r)) => {
                    stats.rehashed_chunks.fetch_add(r.hashed, Relaxed);
                    stats.rehash_dropped.fetch_add(r.dropped, Relaxed);
                    info!(
                        "layer {digest}: verified {} cached chunks ({} did not match and \
                         are fetched again)",
                        r.hashed, r.dropped
                    );
                }
                Ok(Err(e)) => warn!("layer {digest}: verifying its cache: {e}"),
                Err(e) => warn!("layer {digest}: verification task: {e}"),
            }
        });
    }
}

/// The layer's identity, or why its digests name none.
fn layer_id(src: &LayerSource) -> Result<LayerId, DeviceError> {
    src.id().map_err(|e| match e {
        OciError::BadDigest(d) => DeviceError::BadDigest(d),
        other => DeviceError::BadDigest(other.to_string()),
    })
}

/// How long an attach during a restore waits for the previous daemon to
/// release a layer's cache.
const CACHE_LOCK_WAIT: Duration = Duration::from_secs(15);

/// The blocking part of an attach: FUSE file, loop device, EROFS mount.
struct Exposing {
    /// The manager's `ops`, held for the FUSE file and the loop device and
    /// let go before the EROFS mount.
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
    config: NodeConfig,
    files: Arc<LayerFiles>,
    name: String,
    layer: Arc<LazyLayer>,
    orphans: Vec<LoopDevice>,
    /// A resumed session: the previous daemon's mount may be adopted.
    restoring: bool,
    /// The loop device's readahead if the layer is not complete.
    lazy_read_ahead_kb: u32,
}

impl Exposing {
    /// Takes over the EROFS mount and loop device the previous daemon left
    /// for this layer: only the FUSE file is added again (if the layer is
    /// not local), under the inode the kernel knows.
    fn adopt(self, adopted: Adopted) -> Result<Attached, DeviceError> {
        let digest = self.layer.digest().to_owned();
        if !adopted.local {
            self.files
                .add(&self.name, self.layer.clone())
                .map_err(|source| DeviceError::Step {
                    digest: digest.clone(),
                    step: "add FUSE file",
                    source,
                })?;
        }
        info!(
            "layer {digest}: adopted {} and its EROFS mount from the previous daemon",
            adopted.loop_dev.path().display()
        );
        Ok(Attached {
            info: AttachedLayer {
                id: self.layer.id().clone(),
                digest,
                mountpoint: self.config.mountpoint(&self.name),
                loop_device: adopted.loop_dev.path().to_owned(),
                image_size: self.layer.image_size(),
            },
            layer: self.layer,
            loop_dev: adopted.loop_dev,
            backing: adopted.backing,
            local: adopted.local,
            // Unknown: set at the next change of the link estimate.
            read_ahead_kb: u32::MAX,
            handoff_failed: false,
            name: self.name,
            orphans: self.orphans,
        })
    }

    fn run(mut self) -> Result<Attached, DeviceError> {
        if self.restoring {
            if let Some(adopted) = resume::adopt(&self.config, &self.name) {
                return self.adopt(adopted);
            }
        }
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
            self.config.fuse_file(&self.name)
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
        let read_ahead_kb = if self.layer.is_complete() {
            self.config.read_ahead_kb
        } else {
            self.lazy_read_ahead_kb
        };
        let keep_default = read_ahead_kb == 0 && self.layer.is_complete();
        if !keep_default {
            if let Err(e) = loop_dev.set_read_ahead_kb(read_ahead_kb) {
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
        // Mounting reads the image through the lazy path: its superblock,
        // its root inode and whatever else the image's superblock asks for.
        // On a new cache that waits for the network, up to the read
        // deadline if the registry (or the image's author, who may be a
        // stranger) makes it hang. No other layer's attach, detach or
        // handoff waits for that: `opening` keeps this layer's cache from
        // eviction and from the restore's sweep meanwhile.
        drop(self.held.take());
        let mountpoint = self.config.mountpoint(&self.name);
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
                id: self.layer.id().clone(),
                digest,
                mountpoint,
                loop_device: loop_path,
                image_size,
            },
            layer: self.layer,
            loop_dev,
            backing: backing_path,
            local,
            read_ahead_kb,
            handoff_failed: false,
            name: self.name,
            orphans: self.orphans,
        })
    }
}
