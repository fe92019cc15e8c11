//! Background prefetch of attached layers: one job per layer fetches every
//! missing chunk behind on-demand reads, then hands the layer off to its
//! local cache file. The job tables also hold the trace replays
//! ([`super::trace`]), so detach stops both.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::config::LOOP_CLEAR_WAIT;
use super::handoff::handoff;
use super::table::lock;
use super::warm::WarmJob;
use super::{DeviceError, LayerManager};
use crate::oci::LayerId;

/// In a layer's cache directory: a prefetch was asked for. A restarted
/// process resumes it on attach, so a layer under a running container does
/// not stay dependent on the daemon just because the daemon restarted.
pub(super) const PREFETCH_MARKER: &str = "prefetch";

/// What starting a prefetch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefetchStart {
    Started,
    AlreadyRunning,
    /// Nothing to fetch: the layer is local already.
    AlreadyLocal,
}

/// The background work running per layer.
#[derive(Default)]
pub(super) struct Jobs {
    /// Running (or finished) prefetch jobs by layer.
    pub prefetch: Mutex<HashMap<LayerId, JoinHandle<()>>>,
    /// Running (or finished) trace replays by layer.
    pub replays: Mutex<HashMap<LayerId, JoinHandle<()>>>,
    /// Running (or finished) page-cache warming by layer.
    pub warms: Mutex<HashMap<LayerId, WarmJob>>,
}

impl Jobs {
    /// Aborts every job without waiting (the manager is going away).
    pub fn abort_all(&self) {
        for table in [&self.prefetch, &self.replays] {
            for (_, job) in lock(table).drain() {
                job.abort();
            }
        }
        for (_, warm) in lock(&self.warms).drain() {
            warm.stop().abort();
        }
    }
}

pub(super) fn running(jobs: &HashMap<LayerId, JoinHandle<()>>, id: &LayerId) -> bool {
    jobs.get(id).is_some_and(|h| !h.is_finished())
}

impl LayerManager {
    /// Starts fetching every missing chunk of an attached layer in the
    /// background (on-demand reads go first); when it is complete, the loop
    /// device is switched to the local cache file.
    pub fn prefetch(&self, id: &LayerId) -> Result<PrefetchStart, DeviceError> {
        let (layer, name) = {
            let layers = self.shared.table.lock();
            let a = layers
                .get(id)
                .ok_or_else(|| DeviceError::NotAttached(id.to_string()))?;
            if a.local {
                return Ok(PrefetchStart::AlreadyLocal);
            }
            (a.layer.clone(), a.name.clone())
        };
        let digest = layer.digest().to_owned();
        let marker = self.config.cache_dir(&name).join(PREFETCH_MARKER);
        if let Err(e) = std::fs::write(&marker, b"") {
            warn!(
                "layer {digest}: writing {}: {e} (a restart will not resume the prefetch)",
                marker.display()
            );
        }
        let mut jobs = lock(&self.jobs.prefetch);
        if running(&jobs, id) {
            return Ok(PrefetchStart::AlreadyRunning);
        }
        let (prefetcher, shared, d) = (self.prefetcher.clone(), self.shared.clone(), id.clone());
        info!("layer {digest}: background prefetch started");
        let job = self.node.gate.job();
        jobs.insert(
            id.clone(),
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

    /// Stops the layer's prefetch job, trace replay and warming, if any,
    /// and waits (bounded) until they have let go of the layer (the
    /// warming, of its files, which would keep its mount busy).
    pub(super) async fn stop_prefetch(&self, id: &LayerId) {
        let replay = lock(&self.jobs.replays).remove(id);
        let job = lock(&self.jobs.prefetch).remove(id);
        let mut stopping: Vec<JoinHandle<()>> = replay.into_iter().chain(job).collect();
        for job in &stopping {
            job.abort();
        }
        // Not aborted: cancelled, it ends by itself, its files closed.
        stopping.extend(lock(&self.jobs.warms).remove(id).map(WarmJob::stop));
        for job in stopping {
            if tokio::time::timeout(LOOP_CLEAR_WAIT, job).await.is_err() {
                warn!("layer {id}: background job did not stop within {LOOP_CLEAR_WAIT:?}");
            }
        }
    }
}
