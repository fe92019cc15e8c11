//! Making missing chunks present: one fetch per chunk however many readers
//! want it, adjacent chunks in one request, every chunk verified before it is
//! stored, sources tried in order with retries and backoff, and a deadline so
//! no read waits forever.

mod config;
#[cfg(test)]
mod tests;
mod verified_range;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::{timeout_at, Instant};
use tracing::{error, warn};

pub use config::FetchConfig;
pub use verified_range::read_verified;

use crate::cache::{CacheError, ChunkCache};
use crate::format::Index;
use crate::gate::PriorityGate;
use crate::source::{Answer, ChunkSource, Verdict};
use crate::stats::{SourceCounters, Stats};
use crate::trace::MAX_TRACE_CHUNKS;

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
    #[error(
        "layer {layer}: fetch of chunks {first}..={last} ended without a result (task failed)"
    )]
    Aborted {
        layer: String,
        first: u64,
        last: u64,
    },
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

type FlightResult = Option<Result<(), Arc<FetchError>>>;

/// How often one round asks a source again at once after it shunned the
/// server that sent bad bytes (it has a few ancestors at most; this only
/// bounds a source that keeps claiming another server).
const MAX_REASKS: u32 = 8;

/// A fetch in progress, as the chunks it claimed see it.
#[derive(Clone)]
struct Flight {
    rx: watch::Receiver<FlightResult>,
    /// A prefetch's fetch: readers do not wait for it (they fetch the chunk
    /// themselves), so background work never delays a read.
    background: bool,
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
    /// Chunks being fetched right now, each mapped to its fetch's outcome.
    inflight: Mutex<HashMap<u64, Flight>>,
    /// Shared by the node's fetchers: background fetches yield to on-demand ones.
    gate: Arc<PriorityGate>,
    trace: Mutex<TraceState>,
}

/// Startup-trace bookkeeping of one layer; touched only on cache misses.
#[derive(Default)]
struct TraceState {
    /// Missed chunks while a recording runs (bounded by `MAX_TRACE_CHUNKS`).
    recording: Option<BTreeSet<u64>>,
    /// Chunks of replayed traces: a miss on one is counted.
    replayed: HashSet<u64>,
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
            trace: Mutex::default(),
        }
    }

    /// Uses the node's priority gate instead of a private one.
    pub fn with_gate(mut self, gate: Arc<PriorityGate>) -> Self {
        self.gate = gate;
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
        self.trace_misses(&missing);
        let _waiting = self.stats.waiting_read();
        let deadline = Instant::now() + self.config.read_deadline;
        let flights = self.join_or_start(&missing);
        let behind_background = flights.iter().filter(|f| f.background).count() as u64;
        self.stats
            .prefetch
            .demand_waited_on_background
            .fetch_add(behind_background, Relaxed);
        for Flight { rx: mut flight, .. } in flights {
            match timeout_at(deadline, flight.wait_for(Option::is_some)).await {
                Ok(Ok(outcome)) => {
                    if let Some(Err(e)) = &*outcome {
                        return Err(ReadError::Fetch(e.clone()));
                    }
                }
                Ok(Err(_sender_gone)) => {
                    return Err(ReadError::Fetch(Arc::new(FetchError::Aborted {
                        layer: self.layer.clone(),
                        first: chunks.start,
                        last: chunks.end - 1,
                    })))
                }
                Err(_elapsed) => {
                    let err = ReadError::Deadline {
                        layer: self.layer.clone(),
                        chunks,
                        deadline: self.config.read_deadline,
                    };
                    warn!("{err}");
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Starts (or restarts, empty) recording this layer's on-demand misses.
    pub fn start_recording(&self) {
        self.trace
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .recording = Some(BTreeSet::new());
    }

    /// Ends the recording; the chunks it saw, sorted (empty if none ran).
    pub fn stop_recording(&self) -> Vec<u64> {
        let mut t = self.trace.lock().unwrap_or_else(|e| e.into_inner());
        t.recording
            .take()
            .map_or_else(Vec::new, |s| s.into_iter().collect())
    }

    /// Remembers chunks a replay is about to fetch, so later misses on them
    /// are counted as the replay's misses.
    pub fn mark_replayed(&self, chunks: &[u64]) {
        let mut t = self.trace.lock().unwrap_or_else(|e| e.into_inner());
        for &c in chunks {
            if t.replayed.len() >= MAX_TRACE_CHUNKS {
                break;
            }
            t.replayed.insert(c);
        }
    }

    fn trace_misses(&self, missing: &[u64]) {
        let mut t = self.trace.lock().unwrap_or_else(|e| e.into_inner());
        let traced = missing.iter().filter(|c| t.replayed.contains(c)).count() as u64;
        let counters = &self.stats.trace;
        counters.demand_misses_traced.fetch_add(traced, Relaxed);
        if let Some(rec) = &mut t.recording {
            for &c in missing {
                if rec.len() >= MAX_TRACE_CHUNKS {
                    break;
                }
                if rec.insert(c) {
                    counters.recorded_chunks.fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// Joins the fetches already running for some of `missing` and starts one
    /// fetch per run of adjacent chunks nobody fetches yet.
    fn join_or_start(self: &Arc<Self>, missing: &[u64]) -> Vec<Flight> {
        let counters = &self.stats.prefetch;
        let mut flights: Vec<Flight> = Vec::new();
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        let mut unclaimed = Vec::new();
        for &c in missing {
            // Checked under the lock: a fetch marks chunks present before it
            // leaves the map, so a chunk is present, in flight, or ours.
            if self.cache.is_present(c) {
                continue;
            }
            match inflight.get(&c) {
                // Never queue behind a prefetch (it may be about to be rate
                // limited or yield): fetch the chunk now; storing the same
                // verified bytes twice is harmless.
                Some(f) if f.background => {
                    counters.demand_overtook_background.fetch_add(1, Relaxed);
                    unclaimed.push(c);
                }
                Some(f) => {
                    if !flights.iter().any(|g| g.rx.same_channel(&f.rx)) {
                        flights.push(f.clone());
                    }
                }
                None => unclaimed.push(c),
            }
        }
        for run in self.runs(&unclaimed) {
            let (tx, rx) = watch::channel(None);
            for &c in &run {
                inflight.insert(
                    c,
                    Flight {
                        rx: rx.clone(),
                        background: false,
                    },
                );
            }
            flights.push(Flight {
                rx,
                background: false,
            });
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
                fetcher.fetch_run(run, tx).await
            });
        }
        flights
    }

    /// Fetches the missing chunks of `chunks` that nobody is fetching, as
    /// background work: the caller has waited for the gate and the rate
    /// limit. Readers that need one of these chunks meanwhile fetch it
    /// themselves. Returns the chunks this call stored.
    pub async fn fetch_background(
        self: &Arc<Self>,
        chunks: Range<u64>,
    ) -> Result<u64, Arc<FetchError>> {
        let (tx, rx) = watch::channel(None);
        let claimed: Vec<u64> = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            let claimed: Vec<u64> = chunks
                .filter(|c| !self.cache.is_present(*c) && !inflight.contains_key(c))
                .collect();
            for &c in &claimed {
                inflight.insert(
                    c,
                    Flight {
                        rx: rx.clone(),
                        background: true,
                    },
                );
            }
            claimed
        };
        if claimed.is_empty() {
            return Ok(0);
        }
        let counters = &self.stats.prefetch;
        counters.background_fetches.fetch_add(1, Relaxed);
        let guard = FlightGuard {
            fetcher: self,
            chunks: &claimed,
            rx: &rx,
        };
        let result = self.fetch_chunks(claimed.clone()).await;
        drop(guard);
        let _ = tx.send(Some(Ok(())));
        result.map_err(Arc::new)?;
        counters
            .background_chunks
            .fetch_add(claimed.len() as u64, Relaxed);
        Ok(claimed.len() as u64)
    }

    /// Splits sorted chunk numbers into runs of consecutive chunks whose
    /// stored bytes fit one request.
    fn runs(&self, chunks: &[u64]) -> Vec<Vec<u64>> {
        let mut runs: Vec<Vec<u64>> = Vec::new();
        for &c in chunks {
            let extend = runs.last().is_some_and(|run| {
                let first = self.index.chunks[run[0] as usize].offset;
                let end = self.index.chunks[c as usize].stored_range().end;
                run.last() == Some(&(c - 1)) && end - first <= self.config.max_request_bytes
            });
            match runs.last_mut() {
                Some(run) if extend => run.push(c),
                _ => runs.push(vec![c]),
            }
        }
        runs
    }

    async fn fetch_run(self: Arc<Self>, run: Vec<u64>, tx: watch::Sender<FlightResult>) {
        // Leaves the in-flight map even if this task panics, so later readers
        // start a new fetch instead of joining a dead one.
        let rx = tx.subscribe();
        let guard = FlightGuard {
            fetcher: &self,
            chunks: &run,
            rx: &rx,
        };
        let result = self.fetch_chunks(run.clone()).await;
        if let Err(e) = &result {
            error!("{e}");
        }
        drop(guard);
        let _ = tx.send(Some(result.map_err(Arc::new)));
    }

    /// Tries the sources in order, then again after a backoff, until every
    /// chunk is stored, every source failed for good, or the deadline passed.
    async fn fetch_chunks(&self, mut pending: Vec<u64>) -> Result<(), FetchError> {
        let (first, last) = (pending[0], pending[pending.len() - 1]);
        let started = Instant::now();
        let deadline = started + self.config.read_deadline;
        let mut reports: Vec<SourceReport> = self
            .sources
            .iter()
            .map(|s| SourceReport::new(&*s.source))
            .collect();
        let mut backoff = self.config.backoff_initial;
        loop {
            for (slot, report) in self.sources.iter().zip(&mut reports) {
                if report.given_up {
                    continue;
                }
                pending = self.fetch_from(slot, report, pending, deadline).await?;
                if pending.is_empty() {
                    return Ok(());
                }
            }
            let now = Instant::now();
            let out_of_time = now + backoff >= deadline;
            if out_of_time || reports.iter().all(|r| r.given_up) {
                return Err(FetchError::Unavailable {
                    layer: self.layer.clone(),
                    first,
                    last,
                    elapsed: now - started,
                    failures: describe(&reports),
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
    }

    /// Asks one source for the pending chunks (one request per run of
    /// adjacent chunks); returns the chunks still missing afterwards.
    async fn fetch_from(
        &self,
        slot: &Slot,
        report: &mut SourceReport,
        pending: Vec<u64>,
        deadline: Instant,
    ) -> Result<Vec<u64>, FetchError> {
        let mut still_missing = Vec::new();
        let mut queue: VecDeque<Vec<u64>> = self.runs(&pending).into();
        let mut reasks = 0;
        while let Some(segment) = queue.pop_front() {
            if report.given_up {
                still_missing.extend(segment);
                continue;
            }
            let range = self.index.chunks[segment[0] as usize].offset
                ..self.index.chunks[segment[segment.len() - 1] as usize]
                    .stored_range()
                    .end;
            report.attempts += 1;
            slot.counters.requests.fetch_add(1, Relaxed);
            let timeout = self.config.request_timeout;
            let answer = match timeout_at(
                deadline.min(Instant::now() + timeout),
                slot.source.read_range(range.clone()),
            )
            .await
            {
                Ok(Ok(answer)) if answer.bytes.len() as u64 == range.end - range.start => answer,
                Ok(Ok(answer)) => {
                    report.fail(
                        format!("returned {} bytes for range {range:?}", answer.bytes.len()),
                        false,
                    );
                    slot.counters.errors.fetch_add(1, Relaxed);
                    still_missing.extend(segment);
                    continue;
                }
                Ok(Err(e)) => {
                    report.fail(e.to_string(), e.is_transient());
                    slot.counters.errors.fetch_add(1, Relaxed);
                    still_missing.extend(segment);
                    continue;
                }
                Err(_elapsed) => {
                    report.fail(format!("timed out after {timeout:?}"), true);
                    slot.counters.errors.fetch_add(1, Relaxed);
                    still_missing.extend(segment);
                    continue;
                }
            };
            let judged = self.judge(slot, &range, segment, answer).await?;
            if judged.corrupt.is_empty() {
                continue;
            }
            let ask_again = judged.routed && reasks < MAX_REASKS;
            let from = judged
                .server
                .as_deref()
                .map_or(String::new(), |s| format!(" (server {s})"));
            for (chunk, reason) in &judged.corrupt {
                warn!(
                    "layer {}: chunk {chunk} from source {}{from} failed verification, \
                     not used; {}: {reason}",
                    self.layer,
                    slot.source.name(),
                    if ask_again {
                        "asking the source again"
                    } else {
                        "trying the next source"
                    }
                );
            }
            let chunks: Vec<u64> = judged.corrupt.iter().map(|(c, _)| *c).collect();
            if ask_again {
                reasks += 1;
                for run in self.runs(&chunks).into_iter().rev() {
                    queue.push_front(run);
                }
                continue;
            }
            // A source that served bad bytes is not asked again for this
            // fetch (it may well serve them again), unless it answers from
            // several servers: then it stays in for the next round.
            if let Some((chunk, reason)) = judged.corrupt.last() {
                report.fail(
                    format!("chunk {chunk} corrupt: {reason}"),
                    judged.server.is_some(),
                );
            }
            still_missing.extend(chunks);
        }
        still_missing.sort_unstable();
        Ok(still_missing)
    }

    /// Verifies and stores the chunks of `segment` in `answer` (the bytes of
    /// `range`), counts them, and gives the source its verdict when the
    /// answer names the server that sent it.
    async fn judge(
        &self,
        slot: &Slot,
        range: &Range<u64>,
        segment: Vec<u64>,
        answer: Answer,
    ) -> Result<Judged, FetchError> {
        slot.counters
            .bytes
            .fetch_add(answer.bytes.len() as u64, Relaxed);
        let mut corrupt = Vec::new();
        let mut stored = 0;
        let outcomes = self
            .verify_and_store(segment, range.start, answer.bytes)
            .await;
        for (chunk, outcome) in outcomes {
            match outcome {
                Ok(()) => {
                    slot.counters.chunks.fetch_add(1, Relaxed);
                    stored += 1;
                }
                Err(Rejected::Corrupt(reason)) => {
                    slot.counters.corrupt_chunks.fetch_add(1, Relaxed);
                    corrupt.push((chunk, reason));
                }
                Err(Rejected::Cache(source)) => {
                    return Err(FetchError::Cache {
                        layer: self.layer.clone(),
                        chunk,
                        source,
                    })
                }
            }
        }
        let verdict = match corrupt.first() {
            None => Verdict::Verified { chunks: stored },
            Some((_, reason)) => Verdict::Corrupt(reason.clone()),
        };
        let routed = answer
            .server
            .as_deref()
            .is_some_and(|server| slot.source.verdict(server, range, &verdict));
        Ok(Judged {
            corrupt,
            server: answer.server,
            routed,
        })
    }

    /// Decodes and verifies each chunk of `segment` out of `bytes` (which start
    /// at blob offset `base`) and stores the good ones. Off the async threads:
    /// zstd and sha256 of a 1 MiB chunk take milliseconds.
    async fn verify_and_store(
        &self,
        segment: Vec<u64>,
        base: u64,
        bytes: Bytes,
    ) -> Vec<(u64, Result<(), Rejected>)> {
        let index = self.index.clone();
        let cache = self.cache.clone();
        let work = segment.clone();
        let result = tokio::task::spawn_blocking(move || {
            work.into_iter()
                .map(|c| {
                    let entry = index.chunks[c as usize];
                    let start = (entry.offset - base) as usize;
                    let stored = &bytes[start..start + entry.stored_len as usize];
                    let outcome = match index.decode_chunk(c, stored) {
                        Ok(data) => cache
                            .store(c, index.image_range(c).start, &data)
                            .map_err(Rejected::Cache),
                        Err(e) => Err(Rejected::Corrupt(e.to_string())),
                    };
                    (c, outcome)
                })
                .collect()
        })
        .await;
        result.unwrap_or_else(|e| {
            segment
                .into_iter()
                .map(|c| {
                    (
                        c,
                        Err(Rejected::Corrupt(format!("verification task failed: {e}"))),
                    )
                })
                .collect()
        })
    }
}

enum Rejected {
    Corrupt(String),
    Cache(CacheError),
}

/// What verifying one answer found.
struct Judged {
    /// The chunks that failed verification, and why.
    corrupt: Vec<(u64, String)>,
    /// The server behind the source that sent the answer, if it named one.
    server: Option<String>,
    /// The source shunned that server for bad bytes and has another one to
    /// ask: asking it again at once may get good ones.
    routed: bool,
}

struct SourceReport {
    source: String,
    attempts: u32,
    last_error: Option<String>,
    /// Failed in a way retrying will not fix; skipped for the rest of this fetch.
    given_up: bool,
}

impl SourceReport {
    fn new(source: &dyn ChunkSource) -> Self {
        SourceReport {
            source: source.name().to_owned(),
            attempts: 0,
            last_error: None,
            given_up: false,
        }
    }

    fn fail(&mut self, error: String, transient: bool) {
        self.last_error = Some(error);
        self.given_up |= !transient;
    }
}

/// One line naming what every source did, for the log and the error.
fn describe(reports: &[SourceReport]) -> String {
    let mut out = String::new();
    for r in reports {
        if !out.is_empty() {
            out.push_str("; ");
        }
        let _ = write!(
            out,
            "{}: {} ({} attempts)",
            r.source,
            r.last_error.as_deref().unwrap_or("not tried"),
            r.attempts
        );
    }
    if out.is_empty() {
        out.push_str("no sources configured");
    }
    out
}

struct FlightGuard<'a> {
    fetcher: &'a ChunkFetcher,
    chunks: &'a [u64],
    /// Only this flight's entries go: a reader may have replaced a
    /// background claim with its own fetch.
    rx: &'a watch::Receiver<FlightResult>,
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
