//! Node-side counters: what was fetched from where, cache hits, read latency,
//! and the reads that are waiting right now (the hang detector).
//!
//! Plain atomics so the read path pays a few relaxed increments; readers take a
//! [`StatsSnapshot`], which the `lazybd stats` command prints and the
//! snapshotter turns into Prometheus metrics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Upper bounds (inclusive, microseconds) of the read-latency histogram
/// buckets; a last, unbounded bucket catches the rest. Spans a page-cache hit
/// (tens of µs) up to a read stuck for its whole deadline.
pub const LATENCY_BUCKETS_US: [u64; 8] = [
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    60_000_000,
    300_000_000,
];

/// Counters of one chunk source (registry, peer, super node), summed over all
/// layers that use a source of that name.
#[derive(Debug, Default)]
pub struct SourceCounters {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    pub chunks: AtomicU64,
    pub errors: AtomicU64,
    /// Chunks that failed verification (digest, length, decompression).
    pub corrupt_chunks: AtomicU64,
    /// Answers that went on past the range asked for (cut off, not believed).
    pub overlong_answers: AtomicU64,
}

#[derive(Debug, Default)]
pub struct Stats {
    sources: Mutex<BTreeMap<String, Arc<SourceCounters>>>,
    /// Chunks a read found present in the cache.
    pub cache_hits: AtomicU64,
    /// Chunks a read had to wait for (fetched, or joined another reader's fetch).
    pub cache_misses: AtomicU64,
    /// Reads that failed (EIO to the reader).
    pub read_errors: AtomicU64,
    pub bytes_read: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    latency_sum_us: AtomicU64,
    inflight: Mutex<InFlight>,
    pub prefetch: PrefetchCounters,
    pub trace: TraceCounters,
    pub eviction: EvictionCounters,
    pub attach: AttachCounters,
    /// Cached chunks re-hashed to verify a cache left open before a reboot
    /// (a restart in the same boot, or of a complete layer, hashes nothing).
    pub rehashed_chunks: AtomicU64,
    /// ... of those, chunks that did not match (dropped, fetched again).
    pub rehash_dropped: AtomicU64,
}

/// Where attach time goes (a Prepare of a lazy layer waits for all of it):
/// reading and checking the index and opening the cache, then the FUSE
/// file, loop device and EROFS mount. Cold-start breakdowns read these.
#[derive(Debug, Default)]
pub struct AttachCounters {
    pub attaches: AtomicU64,
    pub index_ms: AtomicU64,
    pub expose_ms: AtomicU64,
    /// Layers whose startup part was read into the page cache ahead of
    /// their container (`device::warm`), and the bytes read so.
    pub warmed_layers: AtomicU64,
    pub warmed_bytes: AtomicU64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachSnapshot {
    pub attaches: u64,
    pub index_ms: u64,
    pub expose_ms: u64,
    #[serde(default)]
    pub warmed_layers: u64,
    #[serde(default)]
    pub warmed_bytes: u64,
}

impl AttachCounters {
    pub fn snapshot(&self) -> AttachSnapshot {
        AttachSnapshot {
            attaches: self.attaches.load(Relaxed),
            index_ms: self.index_ms.load(Relaxed),
            expose_ms: self.expose_ms.load(Relaxed),
            warmed_layers: self.warmed_layers.load(Relaxed),
            warmed_bytes: self.warmed_bytes.load(Relaxed),
        }
    }
}

/// Chunk cache eviction (`LayerManager::evict_caches`).
#[derive(Debug, Default)]
pub struct EvictionCounters {
    /// Caches of detached layers removed, and the bytes that freed.
    pub evicted_layers: AtomicU64,
    pub evicted_bytes: AtomicU64,
    /// Bytes all caches took after the last eviction pass.
    pub cache_bytes: AtomicU64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictionSnapshot {
    pub evicted_layers: u64,
    pub evicted_bytes: u64,
    pub cache_bytes: u64,
}

impl EvictionCounters {
    pub fn snapshot(&self) -> EvictionSnapshot {
        EvictionSnapshot {
            evicted_layers: self.evicted_layers.load(Relaxed),
            evicted_bytes: self.evicted_bytes.load(Relaxed),
            cache_bytes: self.cache_bytes.load(Relaxed),
        }
    }
}

/// Startup traces (crate::trace): recorded, stored and replayed.
#[derive(Debug, Default)]
pub struct TraceCounters {
    /// Ranges recordings took in (what containers read during a record window).
    pub recorded_ranges: AtomicU64,
    /// Traces saved locally, sent to the super node, got from it.
    pub stored: AtomicU64,
    pub uploaded: AtomicU64,
    pub downloaded: AtomicU64,
    /// Trace files or super node answers refused (corrupt, too large, ...).
    pub rejected: AtomicU64,
    /// Chunks a replay stored.
    pub replayed_chunks: AtomicU64,
    /// Layer replays that ran to their end.
    pub replays: AtomicU64,
    /// On-demand misses on chunks of a replayed trace: what the replay did
    /// not fetch in time (about 0 when it works).
    pub demand_misses_traced: AtomicU64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceSnapshot {
    #[serde(default)]
    pub recorded_ranges: u64,
    pub stored: u64,
    pub uploaded: u64,
    pub downloaded: u64,
    pub rejected: u64,
    pub replayed_chunks: u64,
    pub replays: u64,
    pub demand_misses_traced: u64,
}

impl TraceCounters {
    pub fn snapshot(&self) -> TraceSnapshot {
        TraceSnapshot {
            recorded_ranges: self.recorded_ranges.load(Relaxed),
            stored: self.stored.load(Relaxed),
            uploaded: self.uploaded.load(Relaxed),
            downloaded: self.downloaded.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            replayed_chunks: self.replayed_chunks.load(Relaxed),
            replays: self.replays.load(Relaxed),
            demand_misses_traced: self.demand_misses_traced.load(Relaxed),
        }
    }
}

/// Background prefetch and handoff. The priority counters let a test prove
/// that readers go first without measuring time.
#[derive(Debug, Default)]
pub struct PrefetchCounters {
    /// On-demand fetches started (a reader needed missing chunks).
    pub demand_fetches: AtomicU64,
    /// ... of those, while a prefetch job was running on the node.
    pub demand_fetches_while_prefetching: AtomicU64,
    /// Reads that waited for a background fetch. Readers never join a
    /// background fetch, so this stays 0; it is counted where that wait would
    /// happen, so a change that breaks the rule shows up.
    pub demand_waited_on_background: AtomicU64,
    /// Chunks a reader fetched itself although a background fetch had
    /// claimed them (instead of waiting behind it).
    pub demand_overtook_background: AtomicU64,
    /// Chunks a reader fetched itself because the startup stream that had
    /// claimed them was still more than the lookahead away from them.
    pub demand_overtook_stream: AtomicU64,
    /// Chunks the startup stream stored (the blob's prefetch area, fetched
    /// in one range when the layer is attached).
    pub startup_chunks: AtomicU64,
    /// Chunks stored because they followed a missed chunk in the blob
    /// (the demand window), before any reader asked for them.
    pub window_chunks: AtomicU64,
    /// Background requests sent and the chunks they stored.
    pub background_fetches: AtomicU64,
    pub background_chunks: AtomicU64,
    /// Times a background fetch held back because on-demand fetches ran.
    pub background_yields: AtomicU64,
    /// Time background fetches slept for the rate limit, in milliseconds.
    pub rate_limited_ms: AtomicU64,
    /// Loop devices switched to the local cache file, and failed attempts.
    pub handoffs: AtomicU64,
    pub handoff_failures: AtomicU64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchSnapshot {
    pub demand_fetches: u64,
    pub demand_fetches_while_prefetching: u64,
    pub demand_waited_on_background: u64,
    pub demand_overtook_background: u64,
    #[serde(default)]
    pub demand_overtook_stream: u64,
    #[serde(default)]
    pub startup_chunks: u64,
    #[serde(default)]
    pub window_chunks: u64,
    pub background_fetches: u64,
    pub background_chunks: u64,
    pub background_yields: u64,
    pub rate_limited_ms: u64,
    pub handoffs: u64,
    pub handoff_failures: u64,
}

impl PrefetchCounters {
    pub fn snapshot(&self) -> PrefetchSnapshot {
        PrefetchSnapshot {
            demand_fetches: self.demand_fetches.load(Relaxed),
            demand_fetches_while_prefetching: self.demand_fetches_while_prefetching.load(Relaxed),
            demand_waited_on_background: self.demand_waited_on_background.load(Relaxed),
            demand_overtook_background: self.demand_overtook_background.load(Relaxed),
            demand_overtook_stream: self.demand_overtook_stream.load(Relaxed),
            startup_chunks: self.startup_chunks.load(Relaxed),
            window_chunks: self.window_chunks.load(Relaxed),
            background_fetches: self.background_fetches.load(Relaxed),
            background_chunks: self.background_chunks.load(Relaxed),
            background_yields: self.background_yields.load(Relaxed),
            rate_limited_ms: self.rate_limited_ms.load(Relaxed),
            handoffs: self.handoffs.load(Relaxed),
            handoff_failures: self.handoff_failures.load(Relaxed),
        }
    }
}

#[derive(Debug, Default)]
struct InFlight {
    next_id: u64,
    started: BTreeMap<u64, Instant>,
}

impl Stats {
    /// Counters for the source called `name`; call once per layer and source,
    /// not per read.
    pub fn source(&self, name: &str) -> Arc<SourceCounters> {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        sources.entry(name.to_owned()).or_default().clone()
    }

    pub fn record_read(&self, elapsed: Duration, bytes: u64, ok: bool) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency[bucket].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(us, Relaxed);
        if ok {
            self.bytes_read.fetch_add(bytes, Relaxed);
        } else {
            self.read_errors.fetch_add(1, Relaxed);
        }
    }

    /// Marks a read that waits for a fetch; the guard unmarks it when dropped.
    /// Only waiting reads are tracked: reads served from the cache file cannot
    /// hang on the network, and skipping them keeps the fast path lock-free.
    pub fn waiting_read(self: &Arc<Self>) -> WaitingRead {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        let id = inflight.next_id;
        inflight.next_id += 1;
        inflight.started.insert(id, Instant::now());
        WaitingRead {
            stats: self.clone(),
            id,
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let sources = self
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, c)| SourceSnapshot {
                name: name.clone(),
                requests: c.requests.load(Relaxed),
                bytes: c.bytes.load(Relaxed),
                chunks: c.chunks.load(Relaxed),
                errors: c.errors.load(Relaxed),
                corrupt_chunks: c.corrupt_chunks.load(Relaxed),
                overlong_answers: c.overlong_answers.load(Relaxed),
            })
            .collect();
        let (waiting_reads, oldest_waiting_ms) = {
            let inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            let oldest = inflight.started.values().min().map(|t| t.elapsed());
            (
                inflight.started.len() as u64,
                oldest.map_or(0, |d| d.as_millis() as u64),
            )
        };
        StatsSnapshot {
            sources,
            cache_hits: self.cache_hits.load(Relaxed),
            cache_misses: self.cache_misses.load(Relaxed),
            read_errors: self.read_errors.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            rehashed_chunks: self.rehashed_chunks.load(Relaxed),
            rehash_dropped: self.rehash_dropped.load(Relaxed),
            read_latency: LatencyHistogram {
                bounds_us: LATENCY_BUCKETS_US.to_vec(),
                counts: self.latency.iter().map(|c| c.load(Relaxed)).collect(),
                sum_us: self.latency_sum_us.load(Relaxed),
            },
            waiting_reads,
            oldest_waiting_ms,
            prefetch: self.prefetch.snapshot(),
            trace: self.trace.snapshot(),
            eviction: self.eviction.snapshot(),
            attach: self.attach.snapshot(),
        }
    }
}

/// A read waiting for chunks; dropping it ends the wait in the counters.
pub struct WaitingRead {
    stats: Arc<Stats>,
    id: u64,
}

impl Drop for WaitingRead {
    fn drop(&mut self) {
        let mut inflight = self
            .stats
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        inflight.started.remove(&self.id);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceSnapshot {
    pub name: String,
    pub requests: u64,
    pub bytes: u64,
    pub chunks: u64,
    pub errors: u64,
    pub corrupt_chunks: u64,
    #[serde(default)]
    pub overlong_answers: u64,
}

/// Per-bucket (not cumulative) counts; `counts` has one more entry than
/// `bounds_us`, for reads slower than the last bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    pub bounds_us: Vec<u64>,
    pub counts: Vec<u64>,
    pub sum_us: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    pub sources: Vec<SourceSnapshot>,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub read_errors: u64,
    pub bytes_read: u64,
    pub read_latency: LatencyHistogram,
    /// Reads waiting for a fetch right now, and how long the oldest has waited:
    /// a growing age means IO is hanging on the network.
    pub waiting_reads: u64,
    pub oldest_waiting_ms: u64,
    #[serde(default)]
    pub prefetch: PrefetchSnapshot,
    #[serde(default)]
    pub trace: TraceSnapshot,
    #[serde(default)]
    pub eviction: EvictionSnapshot,
    #[serde(default)]
    pub attach: AttachSnapshot,
    #[serde(default)]
    pub rehashed_chunks: u64,
    #[serde(default)]
    pub rehash_dropped: u64,
}

impl StatsSnapshot {
    pub fn source(&self, name: &str) -> Option<&SourceSnapshot> {
        self.sources.iter().find(|s| s.name == name)
    }

    /// Chunks fetched from every source together.
    pub fn chunks_fetched(&self) -> u64 {
        self.sources.iter().map(|s| s.chunks).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_its_bucket() {
        let stats = Stats::default();
        stats.record_read(Duration::from_micros(50), 10, true);
        stats.record_read(Duration::from_micros(1_000), 10, true);
        stats.record_read(Duration::from_secs(3600), 0, false);
        let s = stats.snapshot();
        assert_eq!(s.read_latency.counts[0], 1);
        assert_eq!(s.read_latency.counts[1], 1);
        assert_eq!(*s.read_latency.counts.last().unwrap(), 1);
        assert_eq!(s.bytes_read, 20);
        assert_eq!(s.read_errors, 1);
    }

    #[test]
    fn waiting_reads_are_counted_until_dropped() {
        let stats = Arc::new(Stats::default());
        let a = stats.waiting_read();
        let b = stats.waiting_read();
        assert_eq!(stats.snapshot().waiting_reads, 2);
        drop(a);
        drop(b);
        let s = stats.snapshot();
        assert_eq!((s.waiting_reads, s.oldest_waiting_ms), (0, 0));
    }

    #[test]
    fn sources_are_shared_by_name() {
        let stats = Stats::default();
        stats.source("registry").chunks.fetch_add(2, Relaxed);
        stats.source("registry").chunks.fetch_add(3, Relaxed);
        assert_eq!(stats.snapshot().source("registry").unwrap().chunks, 5);
        assert_eq!(stats.snapshot().chunks_fetched(), 5);
    }
}
