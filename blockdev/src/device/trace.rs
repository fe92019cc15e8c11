//! Startup traces of attached layers (`crate::trace`): recording what the
//! container reads, and replaying a trace's chunks in the background.

use tracing::info;

use super::prefetch::running;
use super::table::lock;
use super::LayerManager;
use crate::oci::LayerId;
use crate::trace::Trace;

impl LayerManager {
    /// Starts recording the reads of these attached layers (unknown ones
    /// are skipped) for a startup trace.
    pub fn start_trace(&self, ids: &[LayerId]) {
        for id in ids {
            if let Some(l) = self.layer(id) {
                l.start_recording();
            }
        }
    }

    /// Ends the recordings of [`start_trace`](Self::start_trace): the trace
    /// of these layers (named by identity), in this order (layers detached
    /// meanwhile are missing).
    pub fn stop_trace(&self, ids: &[LayerId]) -> Trace {
        Trace::new(
            ids.iter()
                .filter_map(|id| self.layer(id).map(|l| l.stop_recording())),
        )
    }

    /// Fetches the trace's chunks of the attached layers ahead of their
    /// readers, at demand priority and ahead of full prefetches
    /// ([`ChunkFetcher::replay`](crate::fetch::ChunkFetcher::replay)).
    /// Returns the layers a replay was started for (one running replay per
    /// layer; complete layers and layers not attached are skipped).
    pub fn replay_trace(&self, trace: &Trace) -> usize {
        let mut replays = lock(&self.jobs.replays);
        let mut started = 0;
        for lt in &trace.layers {
            let Some(layer) = self.layer(&lt.layer) else {
                continue;
            };
            if layer.is_complete() || running(&replays, &lt.layer) {
                continue;
            }
            let chunks = layer.chunks_of(lt);
            // Taken now, so a full prefetch started right after already waits.
            let guard = self.node.gate.replay();
            info!(
                "layer {}: replaying a trace of {} chunks",
                lt.layer,
                chunks.len()
            );
            replays.insert(
                lt.layer.clone(),
                tokio::spawn(async move {
                    let _replay = guard;
                    let stored = layer.fetcher().replay(&chunks).await;
                    info!(
                        "layer {}: trace replay: {stored} chunks fetched",
                        layer.id()
                    );
                }),
            );
            started += 1;
        }
        started
    }
}
