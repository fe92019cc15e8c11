//! The handoff of a complete layer to its local cache file, and the
//! periodic task that persists every cache and hands off the layers that
//! reads alone completed.

use std::fs::File;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::loopdev::LoopDevice;
use super::orphans;
use super::table::Shared;
use crate::layer::LazyLayer;
use crate::oci::LayerId;

/// Switches a complete layer's loop device from its FUSE file to the cache's
/// image file (`LOOP_CHANGE_FD`: the device is read-only and both files have
/// the image's size), then removes the FUSE file. Failures are logged and
/// counted; the layer simply stays on FUSE.
pub(super) async fn handoff(shared: &Shared, id: &LayerId) {
    if !shared.handoff {
        return;
    }
    let _op = shared.ops.lock().await;
    let found = {
        let layers = shared.table.lock();
        layers
            .get(id)
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
    let digest = layer.digest().to_owned();
    let layer_digest = digest.clone();
    let read_ahead_kb = shared.read_ahead_kb;
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
        // Nothing is left to fetch: read ahead like any local device.
        if read_ahead_kb > 0 {
            if let Err(e) = dev.set_read_ahead_kb(read_ahead_kb) {
                warn!("layer {layer_digest}: raising loop readahead: {e}");
            }
        }
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
            let mut layers = shared.table.lock();
            if let Some(a) = layers.get_mut(id) {
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
            if let Some(a) = shared.table.lock().get_mut(id) {
                a.handoff_failed = true;
            }
            warn!("layer {digest}: handoff to the local cache file failed, staying on FUSE: {e}");
        }
    }
}

/// Every `every`: hands off the layers that became complete and persists
/// every cache. Runs until the manager aborts it.
pub(super) async fn persist_periodically(shared: Shared, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (open, complete): (Vec<Arc<LazyLayer>>, Vec<LayerId>) = {
            let layers = shared.table.lock();
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
        for id in complete {
            handoff(&shared, &id).await;
        }
        super::resume::touch_heartbeat(&shared.root);
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
