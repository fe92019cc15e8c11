//! Making missing chunks present: one fetch per chunk however many readers
//! want it, chunks adjacent in the blob in one request, every chunk verified
//! before it is stored, sources tried in order with retries and backoff, and
//! a deadline so no read waits forever.
//!
//! Three kinds of fetch claim chunks, and a reader joins a claim only where
//! waiting is the fastest way to its chunk:
//!
//! - **demand**: a reader missed chunks. Its request also takes the chunks
//!   stored right after them in the blob, up to the link's window
//!   ([`link`]), since those are often read next. Readers join it.
//! - **stream**: chunks known to be read soon, at demand priority: the
//!   blob's startup chunks (its prefetch area: what the container read at
//!   start, in that order), fetched as one range as soon as the layer is
//!   attached ([`ChunkFetcher::start_stream`]), and a replayed trace's
//!   chunks, gaps filled, a few ranges at once ([`ChunkFetcher::replay`]).
//!   A reader joins a stream unless it is still more than
//!   [`FetchConfig::lookahead`] bytes away from its chunk; then it fetches
//!   the chunk itself.
//! - **background**: a prefetch. Readers never wait for one: they fetch the
//!   chunk themselves at once (storing the same verified bytes twice is
//!   harmless).
//!
//! Answers are streams: each chunk is verified and stored as soon as its
//! bytes are in ([`receive`]), so a reader waits for its chunk, not for the
//! end of a long range.

mod config;
mod link;
mod read_ahead;
mod receive;
mod retry;
mod stream;
#[cfg(test)]
mod tests;
mod verified_range;

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::watch;
use tokio::time::{timeout_at, Instant};
use tracing::{error, warn};

pub use config::FetchConfig;
pub use link::LinkEstimate;
pub use read_ahead::LazyReadAhead;
pub use verified_range::read_verified;

use crate::cache::{CacheError, ChunkCache};
use crate::format::Index;
use crate::gate::PriorityGate;
use crate::source::ChunkSource;
use crate::stats::{SourceCounters, Stats};
use crate::trace::MAX_TRACE_RANGES;

#[derive(Debug, Error)]
pub enum FetchError {
    #[error("layer {layer}: chunks {first}..={last} unavailable after {elapsed:?}: {failures}")]
    Unavailable {
        layer: String,
        first: u64,
        last: u64,
        elapsed: Duration,
        /// What each source did, e.g. `registry: timed out after 2s (3 attempts)`.
        failures: String,
    },
    #[error("layer {layer}: storing chunk {chunk}: {source}")]
    Cache {
        layer: String,
        chunk: u64,
        #[source]
        source: CacheError,
    },
    #[error("layer {layer}: the fetch of chunk {chunk} ended without storing it")]
    Aborted { layer: String, chunk: u64 },
}

#[derive(Debug, Error)]
pub enum ReadError {
    #[error(transparent)]
    Fetch(Arc<FetchError>),
    #[error(
        "layer {layer}: chunks {chunks:?} not present within the read deadline of {deadline:?}"
    )]
    Deadline {
        layer: String,
        chunks: Range<u64>,
        deadline: Duration,
    },
    #[error("layer {layer}: {source}")]
    Cache {
        layer: String,
        #[source]
        source: CacheError,
    },
}

type Outcome = Result<(), Arc<FetchError>>;

/// How a fetch is going, as the readers waiting on it see it.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// The blob offset its answer has been stored up to.
    position: u64,
    /// Set when it ended.
    outcome: Option<Outcome>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Demand,
    /// The startup stream ([`stream`]).
    Stream,
    /// A trace replay: a stream of scattered chunks ([`stream`]).
    Replay,
    Background,
}

impl Kind {
    /// Readers join it unless it is still far from their chunk.
    fn is_stream(self) -> bool {
        matches!(self, Kind::Stream | Kind::Replay)
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::Demand => "on-demand fetch",
            Kind::Stream => "startup stream",
            Kind::Replay => "trace replay",
            Kind::Background => "prefetch",
        }
    }
}

/// A fetch in progress, as the chunks it claimed see it.
#[derive(Clone)]
struct Flight {
    rx: watch::Receiver<Progress>,
    kind: Kind,
}

/// A source together with its counters.
struct Slot {
    source: Arc<dyn ChunkSource>,
    counters: Arc<SourceCounters>,
}

pub struct ChunkFetcher {
    layer: String,
    index: Arc<Index>,
    cache: Arc<ChunkCache>,
    sources: Vec<Slot>,
    stats: Arc<Stats>,
    config: FetchConfig,
    /// Chunks being fetched right now, each mapped to its fetch.
    inflight: Mutex<HashMap<u64, Flight>>,
    /// Shared by the node's fetchers: background fetches yield to on-demand ones.
    gate: Arc<PriorityGate>,
    /// Shared by the node's fetchers: sizes demand windows.
    link: Arc<LinkEstimate>,
    /// How far the node's lazy devices read ahead: which part of the
    /// prefetch area the startup stream fetches.
    read_ahead: LazyReadAhead,
    /// Chunks of replayed traces: a miss on one is counted.
    replayed: Mutex<HashSet<u64>>,
    /// Whether the startup stream brought the narrow part of the prefetch
    /// area (`None` while it has not ended; [`narrow_streamed`](Self::narrow_streamed)).
    narrow: tokio::sync::watch::Sender<Option<bool>>,
}

impl ChunkFetcher {
    pub fn new(
        layer: &str,
        index: Arc<Index>,
        cache: Arc<ChunkCache>,
        sources: Vec<Arc<dyn ChunkSource>>,
        stats: Arc<Stats>,
        config: FetchConfig,
    ) -> Self {
        let sources = sources
            .into_iter()
            .map(|source| Slot {
                counters: stats.source(source.name()),
                source,
            })
            .collect();
        ChunkFetcher {
            layer: layer.to_owned(),
            index,
            cache,
            sources,
            stats,
            config,
            inflight: Mutex::new(HashMap::new()),
            gate: PriorityGate::new(),
            link: Arc::default(),
            read_ahead: LazyReadAhead::default(),
            replayed: Mutex::default(),
            narrow: tokio::sync::watch::Sender::new(None),
        }
    }

    /// Uses the node's priority gate, link estimate and readahead instead
    /// of private ones.
    pub fn on_node(
        mut self,
        gate: Arc<PriorityGate>,
        link: Arc<LinkEstimate>,
        read_ahead: LazyReadAhead,
    ) -> Self {
        self.gate = gate;
        self.link = link;
        self.read_ahead = read_ahead;
        self
    }

    pub fn gate(&self) -> &Arc<PriorityGate> {
        &self.gate
    }

    /// Returns once every chunk in `chunks` is present in the cache, or fails
    /// after the read deadline.
    pub async fn ensure(self: &Arc<Self>, chunks: Range<u64>) -> Result<(), ReadError> {
        let missing: Vec<u64> = chunks
            .clone()
            .filter(|&c| !self.cache.is_present(c))
            .collect();
        let total = chunks.end.saturating_sub(chunks.start);
        self.stats
            .cache_hits
            .fetch_add(total - missing.len() as u64, Relaxed);
        if missing.is_empty() {
            return Ok(());
        }
        self.stats
            .cache_misses
            .fetch_add(missing.len() as u64, Relaxed);
        self.count_replayed_misses(&missing);
        let _waiting = self.stats.waiting_read();
        let deadline = Instant::now() + self.config.read_deadline;
        for (chunk, flight) in self.join_or_start(&missing) {
            self.wait_for(chunk, flight, deadline)
                .await
                .map_err(|e| match e {
                    WaitError::Failed(e) => ReadError::Fetch(e),
                    WaitError::Deadline => {
                        let err = ReadError::Deadline {
                            layer: self.layer.clone(),
                            chunks: chunks.clone(),
                            deadline: self.config.read_deadline,
                        };
                        warn!("{err}");
                        err
                    }
                })?;
        }
        Ok(())
    }

    /// Waits until `chunk` is present or its fetch failed.
    async fn wait_for(
        &self,
        chunk: u64,
        mut flight: Flight,
        deadline: Instant,
    ) -> Result<(), WaitError> {
        if flight.kind == Kind::Background {
            // Counted where that wait would happen, so a change that breaks
            // the rule (readers never wait for a prefetch) shows up.
            let counters = &self.stats.prefetch;
            counters.demand_waited_on_background.fetch_add(1, Relaxed);
        }
        loop {
            // Seen before the presence check: a chunk stored after it is
            // followed by a change that wakes us.
            let progress = flight.rx.borrow_and_update().clone();
            if self.cache.is_present(chunk) {
                return Ok(());
            }
            if let Some(outcome) = progress.outcome {
                outcome.map_err(WaitError::Failed)?;
                return Err(self.aborted(chunk));
            }
            match timeout_at(deadline, flight.rx.changed()).await {
                Err(_elapsed) => return Err(WaitError::Deadline),
                Ok(Err(_fetch_gone)) if self.cache.is_present(chunk) => return Ok(()),
                Ok(Err(_fetch_gone)) => return Err(self.aborted(chunk)),
                Ok(Ok(())) => {}
            }
        }
    }

    fn aborted(&self, chunk: u64) -> WaitError {
        WaitError::Failed(Arc::new(FetchError::Aborted {
            layer: self.layer.clone(),
            chunk,
        }))
    }

    /// Remembers chunks a replay is about to fetch, so later misses on them
    /// are counted as the replay's misses.
    fn mark_replayed(&self, chunks: &[u64]) {
        let mut replayed = self.replayed.lock().unwrap_or_else(|e| e.into_inner());
        for &c in chunks {
            if replayed.len() >= MAX_TRACE_RANGES {
                break;
            }
            replayed.insert(c);
        }
    }

    fn count_replayed_misses(&self, missing: &[u64]) {
        let replayed = self.replayed.lock().unwrap_or_else(|e| e.into_inner());
        if replayed.is_empty() {
            return;
        }
        let traced = missing.iter().filter(|c| replayed.contains(c)).count() as u64;
        let counters = &self.stats.trace;
        counters.demand_misses_traced.fetch_add(traced, Relaxed);
    }

    /// For each missing chunk, the fetch to wait for: a running one it can
    /// join, or a new demand fetch started here for the chunks nobody
    /// fetches yet (with the window after them).
    fn join_or_start(self: &Arc<Self>, missing: &[u64]) -> Vec<(u64, Flight)> {
        let counters = &self.stats.prefetch;
        let mut waits = Vec::new();
        let mut unclaimed = Vec::new();
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        for &c in missing {
            // Checked under the lock: a fetch marks chunks present before it
            // leaves the map, so a chunk is present, in flight, or ours.
            if self.cache.is_present(c) {
                continue;
            }
            match inflight.get(&c) {
                Some(f) if f.kind == Kind::Background => {
                    counters.demand_overtook_background.fetch_add(1, Relaxed);
                    unclaimed.push(c);
                }
                Some(f) if f.kind.is_stream() && self.stream_is_far(f, c) => {
                    counters.demand_overtook_stream.fetch_add(1, Relaxed);
                    unclaimed.push(c);
                }
                Some(f) => waits.push((c, f.clone())),
                None => unclaimed.push(c),
            }
        }
        let window = self.link.window(self.config.window_max);
        let wanted: HashSet<u64> = unclaimed.iter().copied().collect();
        for run in self.plan(&unclaimed, self.config.max_request_bytes, window, &inflight) {
            let flight = claim(&mut inflight, &self.index, &run, Kind::Demand);
            waits.extend(
                run.iter()
                    .filter(|c| wanted.contains(c))
                    .map(|&c| (c, flight.0.clone())),
            );
            let extra = run.iter().filter(|c| !wanted.contains(c)).count();
            counters.window_chunks.fetch_add(extra as u64, Relaxed);
            counters.demand_fetches.fetch_add(1, Relaxed);
            if self.gate.prefetching() {
                counters
                    .demand_fetches_while_prefetching
                    .fetch_add(1, Relaxed);
            }
            // Active from the claim on, so a prefetch checking the gate
            // after this point holds back.
            let demand = self.gate.demand();
            let fetcher = self.clone();
            tokio::spawn(async move {
                let _demand = demand;
                // The readers see the outcome through the flight.
                let _ = fetcher.fetch_run(run, flight.1, Kind::Demand).await;
            });
        }
        waits
    }

    /// Whether the stream `f` is still more than the lookahead away
    /// from chunk `c`.
    fn stream_is_far(&self, f: &Flight, c: u64) -> bool {
        let position = f.rx.borrow().position;
        self.index.chunks[c as usize].offset > position.saturating_add(self.config.lookahead)
    }

    /// Splits `chunks` into runs of chunks adjacent in the blob, each at
    /// most `max_bytes` of stored bytes, then extends each run with up to
    /// `window` bytes of the chunks stored after it that are neither present
    /// nor claimed. Runs are in blob order.
    fn plan(
        &self,
        chunks: &[u64],
        max_bytes: u64,
        window: u64,
        inflight: &HashMap<u64, Flight>,
    ) -> Vec<Vec<u64>> {
        let entry = |c: u64| &self.index.chunks[c as usize];
        let mut sorted: Vec<u64> = chunks.to_vec();
        sorted.sort_by_key(|&c| entry(c).offset);
        sorted.dedup();
        let mut runs: Vec<Vec<u64>> = Vec::new();
        for c in sorted {
            let extends = runs.last().is_some_and(|run| {
                let last = *run.last().expect("runs are never empty");
                let first = entry(run[0]).offset;
                entry(last).stored_range().end == entry(c).offset
                    && entry(c).stored_range().end - first <= max_bytes
            });
            match runs.last_mut() {
                Some(run) if extends => run.push(c),
                _ => runs.push(vec![c]),
            }
        }
        if window == 0 {
            return runs;
        }
        let taken: HashSet<u64> = runs.iter().flatten().copied().collect();
        for run in &mut runs {
            let first = entry(run[0]).offset;
            let mut extra = 0u64;
            while let Some(next) = self.index.next_in_blob(*run.last().expect("non-empty")) {
                let e = entry(next);
                let free = !self.cache.is_present(next)
                    && !inflight.contains_key(&next)
                    && !taken.contains(&next);
                extra += u64::from(e.stored_len);
                if !free || extra > window || e.stored_range().end - first > max_bytes {
                    break;
                }
                run.push(next);
            }
        }
        runs
    }

    /// Fetches the missing chunks among `chunks` that nobody is fetching, as
    /// background work: the caller has waited for the gate and the rate
    /// limit. Readers that need one of these chunks meanwhile fetch it
    /// themselves. Returns the chunks this call stored.
    pub async fn fetch_background(
        self: &Arc<Self>,
        chunks: &[u64],
    ) -> Result<u64, Arc<FetchError>> {
        let runs = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            let free: Vec<u64> = chunks
                .iter()
                .copied()
                .filter(|c| !self.cache.is_present(*c) && !inflight.contains_key(c))
                .collect();
            let runs = self.plan(&free, self.config.max_request_bytes, 0, &inflight);
            runs.into_iter()
                .map(|run| {
                    let flight = claim(&mut inflight, &self.index, &run, Kind::Background);
                    (run, flight.1)
                })
                .collect::<Vec<_>>()
        };
        let counters = &self.stats.prefetch;
        let mut stored = 0;
        let mut first_err = None;
        for (run, tx) in runs {
            counters.background_fetches.fetch_add(1, Relaxed);
            let n = run.len() as u64;
            match self.clone().fetch_run(run, tx, Kind::Background).await {
                Ok(()) => stored += n,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        counters.background_chunks.fetch_add(stored, Relaxed);
        first_err.map_or(Ok(stored), Err)
    }

    /// Fetches one claimed run and publishes its outcome.
    async fn fetch_run(
        self: Arc<Self>,
        run: Vec<u64>,
        tx: watch::Sender<Progress>,
        kind: Kind,
    ) -> Outcome {
        // Leaves the in-flight map even if this task panics, so later readers
        // start a new fetch instead of joining a dead one.
        let rx = tx.subscribe();
        let guard = FlightGuard {
            fetcher: &self,
            chunks: &run,
            rx: &rx,
        };
        let result = self
            .fetch_chunks(run.clone(), &tx, kind)
            .await
            .map_err(Arc::new);
        if let Err(e) = &result {
            if kind != Kind::Background {
                error!("{e}");
            }
        }
        drop(guard);
        tx.send_modify(|p| p.outcome = Some(result.clone()));
        result
    }
}

enum WaitError {
    Failed(Arc<FetchError>),
    Deadline,
}

/// Claims `run` for a new fetch of `kind`; returns the flight readers wait
/// on and the sender the fetch reports on.
fn claim(
    inflight: &mut HashMap<u64, Flight>,
    index: &Index,
    run: &[u64],
    kind: Kind,
) -> (Flight, watch::Sender<Progress>) {
    let (tx, rx) = watch::channel(Progress {
        position: index.chunks[run[0] as usize].offset,
        outcome: None,
    });
    let flight = Flight { rx, kind };
    for &c in run {
        inflight.insert(c, flight.clone());
    }
    (flight, tx)
}

struct FlightGuard<'a> {
    fetcher: &'a ChunkFetcher,
    chunks: &'a [u64],
    /// Only this flight's entries go: a reader may have replaced a
    /// background or stream claim with its own fetch.
    rx: &'a watch::Receiver<Progress>,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let mut inflight = self
            .fetcher
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for c in self.chunks {
            if inflight.get(c).is_some_and(|f| f.rx.same_channel(self.rx)) {
                inflight.remove(c);
            }
        }
    }
}
