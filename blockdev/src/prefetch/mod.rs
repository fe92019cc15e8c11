//! Background full prefetch of a layer: every missing chunk, in blob order,
//! at low priority. Before each request the job waits until no on-demand fetch
//! runs on the node ([`PriorityGate`]) and until the node's rate limit
//! allows the bytes ([`RateLimiter`]); readers that need a chunk the job has
//! claimed fetch it themselves instead of waiting.

mod rate;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tracing::{info, warn};

pub use rate::{RateLimiter, TokenBucket};

use crate::fetch::FetchError;
use crate::gate::{JobGuard, PriorityGate};
use crate::layer::LazyLayer;

/// Stored bytes per background request at most: small requests let readers
/// in between.
const BYTES_PER_REQUEST: u64 = 1 << 20;
/// After this long waiting for on-demand fetches, log and keep waiting.
const YIELD_LOG_AFTER: Duration = Duration::from_secs(60);
/// A failing prefetch is retried this many times (with the fetcher's own
/// retries and deadline inside each) before the job gives up.
const PASSES: u32 = 3;

#[derive(Debug, Error)]
pub enum PrefetchError {
    #[error("prefetch of layer {layer} gave up after {PASSES} passes: {source}")]
    Failed {
        layer: String,
        #[source]
        source: Arc<FetchError>,
    },
}

/// `chunks` in groups of up to [`BYTES_PER_REQUEST`] stored bytes, in order
/// (the fetcher sends one request per run of them adjacent in the blob).
fn windows(layer: &LazyLayer, chunks: impl Iterator<Item = u64>) -> Vec<Vec<u64>> {
    let index = layer.index();
    let mut out: Vec<Vec<u64>> = Vec::new();
    let mut bytes = 0;
    for c in chunks {
        let len = u64::from(index.chunks[c as usize].stored_len);
        match out.last_mut() {
            Some(w) if bytes + len <= BYTES_PER_REQUEST => {
                w.push(c);
                bytes += len;
            }
            _ => {
                out.push(vec![c]);
                bytes = len;
            }
        }
    }
    out
}

/// Shared by every prefetch job of a node.
#[derive(Debug)]
pub struct Prefetcher {
    pub gate: Arc<PriorityGate>,
    pub limiter: RateLimiter,
}

impl Prefetcher {
    /// `rate` in bytes per second for all background fetches together; 0 = unlimited.
    pub fn new(gate: Arc<PriorityGate>, rate: u64) -> Arc<Self> {
        Arc::new(Prefetcher {
            gate,
            limiter: RateLimiter::new(rate),
        })
    }

    /// Fetches every missing chunk of `layer`; returns when the cache is
    /// complete. Cancel it by dropping (aborting) the task. `_job` (from
    /// [`PriorityGate::job`], taken before the task is spawned, so reads
    /// right after the start already count as "during a prefetch") is held
    /// until the job ends.
    pub async fn run(&self, layer: &LazyLayer, _job: JobGuard) -> Result<(), PrefetchError> {
        let total = layer.index().chunk_count();
        let windows = windows(layer, layer.index().blob_order());
        let mut last_err = None;
        for pass in 0..PASSES {
            for window in &windows {
                let missing = layer.missing_stored_bytes(window);
                if missing == 0 {
                    continue;
                }
                let waited = self.limiter.acquire(missing).await;
                let counters = &layer.stats().prefetch;
                counters
                    .rate_limited_ms
                    .fetch_add(waited.as_millis() as u64, Relaxed);
                self.yield_to_demand(layer).await;
                if let Err(e) = layer.fetcher().fetch_background(window).await {
                    warn!(
                        "prefetch of layer {} (pass {}): {e}; continuing",
                        layer.digest(),
                        pass + 1
                    );
                    last_err = Some(e);
                }
            }
            if layer.chunks_present() == total {
                info!("prefetch of layer {} complete", layer.digest());
                return Ok(());
            }
        }
        Err(PrefetchError::Failed {
            layer: layer.digest().to_owned(),
            source: last_err.unwrap_or_else(|| {
                Arc::new(FetchError::Aborted {
                    layer: layer.digest().to_owned(),
                    chunk: 0,
                })
            }),
        })
    }

    /// Waits until no on-demand fetch and no trace replay runs, so the
    /// chunks a container is known to need come first.
    async fn yield_to_demand(&self, layer: &LazyLayer) {
        loop {
            let (waited, idle) = self.gate.wait_idle_for_full(YIELD_LOG_AFTER).await;
            if waited {
                layer
                    .stats()
                    .prefetch
                    .background_yields
                    .fetch_add(1, Relaxed);
            }
            if idle {
                return;
            }
            warn!(
                "prefetch of layer {}: on-demand fetches kept it waiting for {YIELD_LOG_AFTER:?}; still waiting",
                layer.digest()
            );
        }
    }
}
