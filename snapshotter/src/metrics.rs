//! Prometheus metrics of the lazy layers, read from the blockdev counters
//! at scrape time (so there is one source of truth), served over HTTP.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use lazybd_blockdev::device::{LayerManager, LayerState, LayerStatus};
use lazybd_blockdev::local_server::{accept_failed, Slots};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::service::LazySnapshotter;

#[derive(Debug)]
struct LazyLayerCollector(Arc<LazySnapshotter>);

type Labels = Vec<(&'static str, String)>;
type SourceCounter = fn(&lazybd_blockdev::stats::SourceSnapshot) -> u64;
type TransferCounter = fn(&lazybd_blockdev::p2p::peer::Transfer) -> u64;

impl Collector for LazyLayerCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let manager: &LayerManager = self.0.remote().manager();
        let s = manager.stats();
        let per_source: [(&str, &str, SourceCounter); 5] = [
            (
                "lazybd_source_requests",
                "Range requests sent to a source",
                |x| x.requests,
            ),
            ("lazybd_source_bytes", "Bytes fetched from a source", |x| {
                x.bytes
            }),
            (
                "lazybd_source_chunks",
                "Chunks fetched from a source",
                |x| x.chunks,
            ),
            ("lazybd_source_errors", "Failed requests to a source", |x| {
                x.errors
            }),
            (
                "lazybd_source_corrupt_chunks",
                "Chunks from a source that failed verification",
                |x| x.corrupt_chunks,
            ),
        ];
        for (name, help, get) in per_source {
            let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for src in &s.sources {
                let labels: Labels = vec![("source", src.name.clone())];
                ConstCounter::new(get(src)).encode(family.encode_family(&labels)?)?;
            }
        }
        if let Some(peer) = self.0.remote().peer() {
            let p = peer.stats();
            let uploads: [(&str, &str, TransferCounter); 2] = [
                (
                    "lazybd_p2p_uploaded_bytes",
                    "Bytes this node uploaded to a peer",
                    |t| t.bytes,
                ),
                (
                    "lazybd_p2p_uploaded_chunks",
                    "Chunks this node uploaded to a peer",
                    |t| t.chunks,
                ),
            ];
            for (name, help, get) in uploads {
                let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
                for (to, t) in &p.uploaded_to {
                    let labels: Labels = vec![("peer", to.clone())];
                    ConstCounter::new(get(t)).encode(family.encode_family(&labels)?)?;
                }
            }
            let c = &p.counters;
            let p2p_counters: [(&str, &str, u64); 7] = [
                (
                    "lazybd_p2p_corrupt_from_peers",
                    "Peer answers that failed verification (the peer was skipped)",
                    c.corrupt_from_peers,
                ),
                (
                    "lazybd_p2p_peer_failures",
                    "Peer requests that failed or timed out",
                    c.peer_failures,
                ),
                (
                    "lazybd_p2p_refused_tickets",
                    "Peer requests refused for a missing, bad or foreign ticket",
                    c.refused_tickets,
                ),
                (
                    "lazybd_p2p_stored_chunks_sent",
                    "Chunks sent to peers as the stored bytes this node kept",
                    c.stored_chunks_sent,
                ),
                (
                    "lazybd_p2p_rebuilt_chunks_sent",
                    "Chunks sent to peers rebuilt from the image (cached before P2P kept stored bytes)",
                    c.rebuilt_chunks_sent,
                ),
                (
                    "lazybd_p2p_refused_connections",
                    "Peer server connections closed at once: over the limits",
                    c.refused_connections,
                ),
                (
                    "lazybd_p2p_slow_readers_dropped",
                    "Peer server connections dropped: a response not read in time",
                    c.slow_readers_dropped,
                ),
            ];
            for (name, help, value) in p2p_counters {
                counter(&mut enc, name, help, value)?;
            }
            ConstGauge::new(i64::from(c.max_chunk_uploads)).encode(enc.encode_descriptor(
                "lazybd_p2p_max_chunk_uploads",
                "Most copies of any one chunk this node uploaded",
                None,
                MetricType::Gauge,
            )?)?;
        }
        counter(
            &mut enc,
            "lazybd_cache_hits",
            "Chunk reads served from the cache",
            s.cache_hits,
        )?;
        counter(
            &mut enc,
            "lazybd_cache_misses",
            "Chunk reads that needed a fetch",
            s.cache_misses,
        )?;
        let lookups = s.cache_hits + s.cache_misses;
        let ratio = if lookups == 0 {
            1.0
        } else {
            s.cache_hits as f64 / lookups as f64
        };
        ConstGauge::new(ratio).encode(enc.encode_descriptor(
            "lazybd_cache_hit_ratio",
            "Cache hits over all chunk reads since start",
            None,
            MetricType::Gauge,
        )?)?;
        counter(
            &mut enc,
            "lazybd_read_bytes",
            "Bytes read from lazy layers",
            s.bytes_read,
        )?;
        counter(
            &mut enc,
            "lazybd_read_errors",
            "Reads of lazy layers that failed (EIO)",
            s.read_errors,
        )?;
        counter(
            &mut enc,
            "lazybd_cache_rehashed_chunks",
            "Cached chunks re-hashed to verify a cache left open before a reboot",
            s.rehashed_chunks,
        )?;

        // The blockdev histogram keeps per-bucket counts; Prometheus wants
        // cumulative ones, in seconds.
        let h = &s.read_latency;
        let mut cumulative = 0;
        let mut buckets = Vec::new();
        for (i, count) in h.counts.iter().enumerate() {
            cumulative += count;
            let bound = h
                .bounds_us
                .get(i)
                .map_or(f64::INFINITY, |b| *b as f64 / 1e6);
            buckets.push((bound, cumulative));
        }
        enc.encode_descriptor(
            "lazybd_read_latency_seconds",
            "Latency of reads of lazy layers",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<Labels>(h.sum_us as f64 / 1e6, cumulative, &buckets, None)?;

        ConstGauge::new(s.waiting_reads as i64).encode(enc.encode_descriptor(
            "lazybd_waiting_reads",
            "Reads blocked on a fetch right now",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(s.oldest_waiting_ms as f64 / 1e3).encode(enc.encode_descriptor(
            "lazybd_oldest_waiting_read_seconds",
            "Age of the oldest read blocked on a fetch: the hang detector",
            None,
            MetricType::Gauge,
        )?)?;

        let layers = manager.layers();
        ConstGauge::new(layers.len() as i64).encode(enc.encode_descriptor(
            "lazybd_attached_layers",
            "Lazy layers attached",
            None,
            MetricType::Gauge,
        )?)?;
        let mut present = enc.encode_descriptor(
            "lazybd_layer_chunks_present",
            "Chunks of an attached layer in the local cache",
            None,
            MetricType::Gauge,
        )?;
        for l in &layers {
            ConstGauge::new(l.chunks_present as i64).encode(present.encode_family(&layer(l))?)?;
        }
        let mut total = enc.encode_descriptor(
            "lazybd_layer_chunks",
            "Chunks of an attached layer",
            None,
            MetricType::Gauge,
        )?;
        for l in &layers {
            ConstGauge::new(l.chunks_total as i64).encode(total.encode_family(&layer(l))?)?;
        }
        // One series per state, 1 for the layer's current one: the usual
        // encoding of an enum, so `sum by (state)` counts layers per state.
        let mut state = enc.encode_descriptor(
            "lazybd_layer_state",
            "State of an attached layer: lazy (FUSE, on demand), fetching (prefetch running), local (reads the local cache file)",
            None,
            MetricType::Gauge,
        )?;
        for l in &layers {
            for st in [LayerState::Lazy, LayerState::Fetching, LayerState::Local] {
                let mut labels = layer(l);
                labels.push(("state", st.as_str().to_owned()));
                ConstGauge::new(i64::from(l.state == st)).encode(state.encode_family(&labels)?)?;
            }
        }
        let p = &s.prefetch;
        for (name, help, value) in [
            (
                "lazybd_prefetch_requests",
                "Background prefetch requests sent",
                p.background_fetches,
            ),
            (
                "lazybd_prefetch_chunks",
                "Chunks stored by background prefetch",
                p.background_chunks,
            ),
            (
                "lazybd_prefetch_yields",
                "Times a background prefetch held back for on-demand reads",
                p.background_yields,
            ),
            (
                "lazybd_prefetch_demand_waited",
                "Reads that waited for a background fetch (0 unless priority is broken)",
                p.demand_waited_on_background,
            ),
            (
                "lazybd_handoffs",
                "Loop devices switched to the local cache file",
                p.handoffs,
            ),
            (
                "lazybd_handoff_failures",
                "Failed switches to the local cache file",
                p.handoff_failures,
            ),
            (
                "lazybd_attaches",
                "Lazy layers attached (each Prepare of a new lazy layer)",
                s.attach.attaches,
            ),
            (
                "lazybd_attach_index_milliseconds",
                "Attach time spent reading and checking indexes and opening caches",
                s.attach.index_ms,
            ),
            (
                "lazybd_attach_expose_milliseconds",
                "Attach time spent on FUSE files, loop devices and EROFS mounts",
                s.attach.expose_ms,
            ),
            (
                "lazybd_warmed_layers",
                "Lazy layers whose startup part was read into the page cache ahead of their container",
                s.attach.warmed_layers,
            ),
            (
                "lazybd_warmed_bytes",
                "Bytes of startup parts read into the page cache ahead of containers",
                s.attach.warmed_bytes,
            ),
            (
                "lazybd_cache_evicted_layers",
                "Caches of detached layers removed to stay within [cache] capacity_bytes",
                s.eviction.evicted_layers,
            ),
            (
                "lazybd_cache_evicted_bytes",
                "Bytes freed by removing caches of detached layers",
                s.eviction.evicted_bytes,
            ),
        ] {
            counter(&mut enc, name, help, value)?;
        }
        ConstGauge::new(s.eviction.cache_bytes as i64).encode(enc.encode_descriptor(
            "lazybd_cache_bytes",
            "Bytes all chunk caches took at the last eviction pass",
            None,
            MetricType::Gauge,
        )?)?;
        let t = &s.trace;
        for (name, help, value) in [
            (
                "lazybd_trace_recorded_ranges",
                "Image ranges recorded into startup traces (what containers read in a record window)",
                t.recorded_ranges,
            ),
            (
                "lazybd_traces_stored",
                "Startup traces stored on this node",
                t.stored,
            ),
            (
                "lazybd_traces_uploaded",
                "Startup traces sent to the super node",
                t.uploaded,
            ),
            (
                "lazybd_traces_downloaded",
                "Startup traces got from the super node",
                t.downloaded,
            ),
            (
                "lazybd_traces_rejected",
                "Startup traces refused (corrupt, too large, super node errors)",
                t.rejected,
            ),
            (
                "lazybd_trace_replayed_chunks",
                "Chunks fetched by trace replays",
                t.replayed_chunks,
            ),
            (
                "lazybd_trace_replays",
                "Layer trace replays run to their end",
                t.replays,
            ),
            (
                "lazybd_trace_demand_misses",
                "On-demand misses on chunks of a replayed trace (about 0 when replay works)",
                t.demand_misses_traced,
            ),
        ] {
            counter(&mut enc, name, help, value)?;
        }
        Ok(())
    }
}

/// The labels of an attached layer's series: its blob digest and its
/// anchor (one digest may be attached with several anchors).
fn layer(l: &LayerStatus) -> Labels {
    vec![
        ("layer", l.digest.clone()),
        ("anchor", l.anchor.clone().unwrap_or_else(|| "none".into())),
    ]
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(value).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// The text exposition of every metric.
pub fn render(snapshotter: Arc<LazySnapshotter>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(LazyLayerCollector(snapshotter)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

/// Connections at once; a new one pushes out the oldest still waiting for
/// its request (a scraper needs one or two).
const MAX_CONNECTIONS: usize = 64;
/// A request's head must arrive within this (hyper's own timeout).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection (one request, no keep-alive) is closed after this,
/// whatever it does: a slow reader cannot hold a response forever.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);
/// Largest request head buffered (a scraper's is a few hundred bytes;
/// hyper's default would let each half-sent request hold 400 KiB).
const MAX_HEAD: usize = 16 << 10;

/// Serves `GET /metrics` until the task is dropped. Bounded against local
/// floods (docs/snapshotter.md#metrics): accept errors are logged and
/// waited out, never fatal.
pub async fn serve(
    listener: TcpListener,
    snapshotter: Arc<LazySnapshotter>,
) -> std::io::Result<()> {
    info!("metrics on http://{}/metrics", listener.local_addr()?);
    let slots = Slots::new(MAX_CONNECTIONS);
    let last_error_log = Mutex::new(None);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                accept_failed("metrics", &e, &slots, &last_error_log).await;
                continue;
            }
        };
        // Every connection busy answering: this one is closed at once.
        let Some(mut slot) = slots.admit() else {
            continue;
        };
        let snapshotter = snapshotter.clone();
        tokio::spawn(async move {
            let eviction = slot.eviction();
            let slot = Arc::new(slot);
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                slot.busy();
                let snapshotter = snapshotter.clone();
                async move { Ok::<_, Infallible>(respond(&req, snapshotter)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                served = tokio::time::timeout(CONNECTION_DEADLINE, conn) => match served {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!("metrics connection: {e}"),
                    Err(_) => debug!("metrics connection: closed after {CONNECTION_DEADLINE:?}"),
                },
                _ = eviction.wait() => debug!("metrics connection: closed, waiting for its request, to make room"),
            }
        });
    }
}

fn respond(req: &Request<hyper::body::Incoming>, s: Arc<LazySnapshotter>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found; try /metrics\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    let mut r = Response::new(Full::new(Bytes::from(render(s))));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    r
}
