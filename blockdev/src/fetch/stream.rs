//! Streams: chunks known to be needed soon, fetched ahead of the readers as
//! long ranges at demand priority, which readers join (see the module docs
//! of `fetch`).
//!
//! Two things are streamed. The startup stream is a blob's prefetch area,
//! which a profiled conversion filled with what the container reads first,
//! in that order: one range (two with a narrow part, see
//! [`ChunkFetcher::start_stream`]). A trace replay is what a node saw an image's
//! container read, in a blob converted without that profile: the chunks are
//! scattered, and fetching each on its own costs a round trip per chunk (the
//! python image's replay sent 190 requests for 9 MiB). So a replay fills
//! the gaps: two wanted chunks whose gap in the blob transfers in less than
//! half a round trip
//! ([`LinkEstimate::worth_along`](super::LinkEstimate::worth_along)) go in one
//! range with the chunks between them, and a few ranges are in flight at
//! once (two), the first read first.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tracing::{info, warn};

use super::{claim, ChunkFetcher, Flight, Kind};
use crate::format::NARROW_READ_AHEAD_KB;

/// Ranges a trace replay keeps in flight per layer: one streaming while
/// the next one's request is on its way, so the link does not idle for a
/// round trip between ranges. More would share the link between ranges
/// and delay the one read first (measured: 4 made the python image's start
/// at 100 Mbit/s slower than one request per chunk).
const REPLAY_PARALLEL: usize = 2;
/// The gap a replay fills while the link has no estimate yet: the largest
/// gap worth filling on a 100 Mbit/s link to a registry a millisecond
/// away, and a quarter of the largest chunk.
const REPLAY_GAP_UNKNOWN: u64 = 16 << 10;
/// The largest gap a replay fills, however fast the link: beyond this the
/// bytes a gap costs are better spent by the full prefetch.
const REPLAY_GAP_MAX: u64 = 1 << 20;

/// How long a startup stream waits for the node's earlier ones
/// ([`PriorityGate::startup_turn`](crate::gate::PriorityGate::startup_turn)):
/// at 100 Mbit/s, 60 MB of them. Readers meanwhile fetch what they need.
const STARTUP_TURN_WAIT: Duration = Duration::from_secs(5);

/// Says, once, whether a startup stream brought its narrow part: when told
/// so, or as not when the stream's task ends (or is aborted) before.
struct NarrowReport(Arc<ChunkFetcher>);

impl NarrowReport {
    fn streamed(&self) {
        self.settle(true);
    }

    /// The first word stands.
    fn settle(&self, streamed: bool) {
        self.0.narrow.send_if_modified(|s| {
            let first = s.is_none();
            if first {
                *s = Some(streamed);
            }
            first
        });
    }
}

impl Drop for NarrowReport {
    fn drop(&mut self) {
        self.settle(false);
    }
}

/// How a stream cuts its chunks into ranges and sends them.
#[derive(Debug, Clone, Copy)]
struct Plan {
    kind: Kind,
    /// Stored bytes between two wanted chunks that one range fills in.
    gap: u64,
    /// Stored bytes of one range at most.
    max_bytes: u64,
    /// Ranges in flight at once.
    parallel: usize,
}

impl ChunkFetcher {
    /// Starts fetching the blob's startup chunks (its prefetch area) as one
    /// streamed range per run of missing ones, at demand priority; readers
    /// join it. The narrow part first; the rest of the area in a later turn,
    /// and only if the node's lazy devices read ahead further than the
    /// narrow part was recorded with: a node on a slow link reads none of
    /// it. Returns the task, or `None` when there is nothing to fetch.
    pub fn start_stream(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let (narrow, wide) = self.index.prefetch_parts();
        let missing = |chunks: Vec<u64>| -> Vec<u64> {
            chunks
                .into_iter()
                .filter(|&c| !self.cache.is_present(c))
                .collect()
        };
        let (narrow, wide) = (missing(narrow), missing(wide));
        if narrow.is_empty() && wide.is_empty() {
            self.narrow.send_replace(Some(false));
            return None;
        }
        let fetcher = self.clone();
        let demand = self.gate.demand();
        info!(
            "layer {}: streaming {} startup chunks{}",
            self.layer,
            narrow.len(),
            match wide.len() {
                0 => String::new(),
                n =>
                    format!(", then {n} more if its readahead is above {NARROW_READ_AHEAD_KB} KiB"),
            }
        );
        let plan = Plan {
            kind: Kind::Stream,
            gap: 0,
            max_bytes: u64::MAX,
            parallel: 1,
        };
        Some(tokio::spawn(async move {
            let _demand = demand;
            // Reports a stream stopped before its narrow part as not streamed.
            let report = NarrowReport(fetcher.clone());
            if !narrow.is_empty() {
                let _turn = fetcher.gate.startup_turn(STARTUP_TURN_WAIT).await;
                fetcher.stream(&narrow, plan).await;
            }
            report.streamed();
            if wide.is_empty() {
                return;
            }
            // Behind the other layers' narrow parts, which began meanwhile:
            // what every node reads first, and more time for the estimate.
            let _turn = fetcher.gate.startup_turn(STARTUP_TURN_WAIT).await;
            let kb = fetcher.read_ahead.kb(&fetcher.link, true);
            if kb > NARROW_READ_AHEAD_KB {
                fetcher.stream(&wide, plan).await;
            } else {
                info!(
                    "layer {}: readahead {kb} KiB: the other {} startup chunks are left to readers",
                    fetcher.layer,
                    wide.len()
                );
            }
        }))
    }

    /// Waits until the startup stream has brought the narrow part of the
    /// prefetch area (or the whole area, if it has no narrow part): `true`,
    /// or `false` if the layer had no stream or it stopped before.
    pub async fn narrow_streamed(&self) -> bool {
        let mut rx = self.narrow.subscribe();
        let ended = rx.wait_for(Option::is_some).await.map(|s| *s);
        matches!(ended, Ok(Some(true)))
    }

    /// Fetches a replayed trace's chunks (`wanted`, first read first) that
    /// are missing, at demand priority, gaps filled, a few ranges at once;
    /// readers join. One pass: a chunk that fails is left to the reader or
    /// the full prefetch. Returns the chunks stored.
    pub async fn replay(self: &Arc<Self>, wanted: &[u64]) -> u64 {
        self.mark_replayed(wanted);
        let _demand = self.gate.demand();
        let plan = Plan {
            kind: Kind::Replay,
            gap: self
                .link
                .worth_along(REPLAY_GAP_MAX)
                .unwrap_or(REPLAY_GAP_UNKNOWN),
            max_bytes: self.config.max_request_bytes,
            parallel: REPLAY_PARALLEL,
        };
        let stored = self.stream(wanted, plan).await;
        let counters = &self.stats.trace;
        counters.replayed_chunks.fetch_add(stored, Relaxed);
        counters.replays.fetch_add(1, Relaxed);
        stored
    }

    /// Fetches the missing chunks of `wanted` as `plan` says. Each range is
    /// claimed when it starts: until then a reader simply fetches what it
    /// needs, which the stream then skips. Returns the chunks of its ranges
    /// present when each ended.
    async fn stream(self: &Arc<Self>, wanted: &[u64], plan: Plan) -> u64 {
        let ranges = {
            let inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            self.stream_ranges(wanted, &plan, &inflight)
        };
        let mut stored = 0;
        let mut running = JoinSet::new();
        let mut pending = ranges.into_iter();
        loop {
            while running.len() < plan.parallel {
                let Some(range) = pending.next() else { break };
                let (range, tx) = {
                    let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
                    let free: Vec<u64> = range
                        .into_iter()
                        .filter(|c| !self.cache.is_present(*c) && !inflight.contains_key(c))
                        .collect();
                    if free.is_empty() {
                        continue;
                    }
                    let flight = claim(&mut inflight, &self.index, &free, plan.kind);
                    (free, flight.1)
                };
                let fetcher = self.clone();
                running.spawn(async move {
                    let outcome = fetcher
                        .clone()
                        .fetch_run(range.clone(), tx, plan.kind)
                        .await;
                    // Counted whatever the outcome: a range that failed
                    // part way kept the chunks verified before.
                    let present = range.iter().filter(|&&c| fetcher.cache.is_present(c));
                    (present.count() as u64, outcome)
                });
            }
            match running.join_next().await {
                Some(Ok((n, outcome))) => {
                    stored += n;
                    if let Err(e) = outcome {
                        let what = plan.kind.describe();
                        warn!("layer {}: {what}: {e}; readers fetch the rest", self.layer);
                    }
                }
                Some(Err(e)) => warn!("layer {}: stream task failed: {e}", self.layer),
                None => break,
            }
        }
        stored
    }

    /// The ranges to fetch `wanted` in: its free chunks (neither present
    /// nor claimed) in blob order, cut into runs of chunks adjacent in the
    /// blob, where a gap of at most `plan.gap` free stored bytes joins two
    /// runs with the chunks between them, each run at most
    /// `plan.max_bytes`. Ordered by the first wanted chunk each holds.
    fn stream_ranges(
        &self,
        wanted: &[u64],
        plan: &Plan,
        inflight: &HashMap<u64, Flight>,
    ) -> Vec<Vec<u64>> {
        let entry = |c: u64| &self.index.chunks[c as usize];
        let free = |c: u64| !self.cache.is_present(c) && !inflight.contains_key(&c);
        let mut rank: HashMap<u64, usize> = HashMap::new();
        for (i, &c) in wanted.iter().enumerate() {
            rank.entry(c).or_insert(i);
        }
        let mut sorted: Vec<u64> = rank.keys().copied().filter(|&c| free(c)).collect();
        sorted.sort_by_key(|&c| entry(c).offset);
        // (rank of the first wanted chunk, the run)
        let mut runs: Vec<(usize, Vec<u64>)> = Vec::new();
        for c in sorted {
            if let Some((first, run)) = runs.last_mut() {
                let start = entry(run[0]).offset;
                let last = *run.last().expect("runs are never empty");
                if entry(c).stored_range().end - start <= plan.max_bytes {
                    if let Some(between) = self.gap_between(last, c, plan.gap, &free) {
                        run.extend(between);
                        run.push(c);
                        *first = (*first).min(rank[&c]);
                        continue;
                    }
                }
            }
            runs.push((rank[&c], vec![c]));
        }
        runs.sort_by_key(|(first, _)| *first);
        runs.into_iter().map(|(_, run)| run).collect()
    }

    /// The chunks stored between `from` and `to` (which comes later in the
    /// blob), if they are all free and at most `gap` stored bytes.
    fn gap_between(
        &self,
        from: u64,
        to: u64,
        gap: u64,
        free: &impl Fn(u64) -> bool,
    ) -> Option<Vec<u64>> {
        let mut between = Vec::new();
        let mut bytes = 0u64;
        let mut at = self.index.next_in_blob(from)?;
        while at != to {
            bytes += u64::from(self.index.chunks[at as usize].stored_len);
            if bytes > gap || !free(at) {
                return None;
            }
            between.push(at);
            at = self.index.next_in_blob(at)?;
        }
        Some(between)
    }
}
