//! Detach: unmount EROFS, let the loop device clear itself, remove the FUSE
//! file and close the cache cleanly (it stays for a later attach); and
//! shutdown, which detaches everything and unmounts the FUSE directory.

use std::sync::Arc;

use tracing::{error, info, warn};

use super::config::LOOP_CLEAR_WAIT;
use super::fuse::LayerFiles;
use super::mounts;
use super::table::{lock, Attached};
use super::{DeviceError, LayerManager};
use crate::layer::LazyLayer;
use crate::oci::LayerId;

impl LayerManager {
    /// Unmounts and forgets the layer; its cache stays for a later attach.
    /// Detaching an unknown layer is a no-op.
    pub async fn detach(&self, id: &LayerId) -> Result<(), DeviceError> {
        self.stop_prefetch(id).await;
        let _op = self.shared.ops.lock().await;
        let Some(attached) = self.shared.table.lock().remove(id) else {
            return Ok(());
        };
        let digest = attached.info.digest.clone();
        let files = self.shared.files.clone();
        let result = tokio::task::spawn_blocking(move || teardown(attached, &files))
            .await
            .map_err(|e| DeviceError::Task(e.to_string()))?;
        match result.map_err(|b| *b) {
            Ok(()) => {
                info!("detached layer {digest} (identity {id})");
                Ok(())
            }
            Err((e, Some(still_mounted))) => {
                // Busy: it stays attached and can be detached again later.
                self.shared.table.lock().insert(id.clone(), still_mounted);
                Err(e)
            }
            Err((e, None)) => Err(e),
        }
    }

    /// Detaches every layer and unmounts the FUSE directory.
    pub async fn shutdown(self) -> Result<(), DeviceError> {
        let ids: Vec<LayerId> = self.shared.table.lock().keys().cloned().collect();
        let mut first_err = None;
        for id in ids {
            if let Err(e) = self.detach(&id).await {
                error!("shutdown: {e}");
                first_err.get_or_insert(e);
            }
        }
        let fuse = lock(&self.fuse).take();
        if let Some(fuse) = fuse {
            let root = self.config.root.clone();
            tokio::task::spawn_blocking(move || fuse.unmount())
                .await
                .map_err(|e| DeviceError::Task(e.to_string()))?
                .map_err(|source| DeviceError::Setup { root, source })?;
        }
        // Unmounted: nothing is left to resume.
        self.store.remove_all();
        first_err.map_or(Ok(()), Err)
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

/// Closes the cache of a layer leaving the table (persisted, marked clean
/// when nothing else holds it).
pub(super) fn close_layer(layer: Arc<LazyLayer>) {
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
