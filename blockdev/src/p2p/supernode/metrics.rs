//! `GET /metrics`: the super node's counters in Prometheus text format,
//! named as the snapshotter's are (`lazybd_` prefix, `_total` counters), so
//! one dashboard and the alerts in docs/operations.md cover both. Read from
//! the same counters as `/v1/stats` at scrape time.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering::Relaxed;

use super::block_cache::CacheUsage;
use super::SupernodeCounters;
use crate::p2p::http::ServerCounters;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One scrape's values, copied out of the live counters.
#[derive(Debug)]
struct Scrape {
    counters: Vec<(&'static str, &'static str, u64)>,
    cache: CacheUsage,
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, value) in &self.counters {
            ConstCounter::new(*value).encode(enc.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        for (name, help, value) in [
            (
                "lazybd_supernode_cache_bytes",
                "Bytes the block cache holds",
                self.cache.bytes,
            ),
            (
                "lazybd_supernode_cache_capacity_bytes",
                "The block cache's bound (--cache-mib)",
                self.cache.capacity,
            ),
            (
                "lazybd_supernode_cache_blocks",
                "Blocks the block cache holds",
                self.cache.blocks,
            ),
        ] {
            ConstGauge::new(value as i64).encode(enc.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

/// The text exposition of every metric.
pub fn render(c: &SupernodeCounters, server: &ServerCounters, cache: CacheUsage) -> String {
    let counters = vec![
        (
            "lazybd_supernode_served_requests",
            "Blob range requests answered",
            c.served_requests.load(Relaxed),
        ),
        (
            "lazybd_supernode_served_bytes",
            "Blob bytes sent to nodes",
            c.served_bytes.load(Relaxed),
        ),
        (
            "lazybd_supernode_block_hits",
            "Blocks served from the block cache",
            c.block_hits.load(Relaxed),
        ),
        (
            "lazybd_supernode_block_misses",
            "Blocks fetched from a registry first",
            c.block_misses.load(Relaxed),
        ),
        (
            "lazybd_supernode_registry_requests",
            "Range requests sent to registries",
            c.registry_requests.load(Relaxed),
        ),
        (
            "lazybd_supernode_registry_bytes",
            "Bytes fetched from registries (the egress P2P saves)",
            c.registry_bytes.load(Relaxed),
        ),
        (
            "lazybd_supernode_registry_errors",
            "Registry requests that failed",
            c.registry_errors.load(Relaxed),
        ),
        (
            "lazybd_supernode_auth_probes",
            "Checks of a caller's registry credentials",
            c.auth_probes.load(Relaxed),
        ),
        (
            "lazybd_supernode_auth_denied",
            "Callers the registry refused",
            c.auth_denied.load(Relaxed),
        ),
        (
            "lazybd_supernode_size_probes",
            "Blob sizes checked against the registry",
            c.size_probes.load(Relaxed),
        ),
        (
            "lazybd_supernode_wrong_sizes",
            "Requests naming a blob size the registry does not confirm",
            c.wrong_sizes.load(Relaxed),
        ),
        (
            "lazybd_supernode_announces",
            "Announces and heartbeats",
            c.announces.load(Relaxed),
        ),
        (
            "lazybd_supernode_tickets_signed",
            "Tickets signed",
            c.tickets_signed.load(Relaxed),
        ),
        (
            "lazybd_supernode_foreign_addresses",
            "Announces or leaves naming an address not the caller's",
            c.foreign_addresses.load(Relaxed),
        ),
        (
            "lazybd_supernode_traces_stored",
            "Startup traces stored",
            c.traces_stored.load(Relaxed),
        ),
        (
            "lazybd_supernode_traces_served",
            "Startup traces served",
            c.traces_served.load(Relaxed),
        ),
        (
            "lazybd_supernode_traces_refused",
            "Startup trace reads or writes refused",
            c.traces_refused.load(Relaxed),
        ),
        (
            "lazybd_supernode_refused_connections",
            "Connections closed at once: over the connection caps",
            server.refused_connections.load(Relaxed),
        ),
        (
            "lazybd_supernode_slow_readers_dropped",
            "Connections dropped for not reading a response in time",
            server.slow_readers_dropped.load(Relaxed),
        ),
        (
            "lazybd_supernode_accept_errors",
            "Failed accepts (survived)",
            server.accept_errors.load(Relaxed),
        ),
    ];
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape { counters, cache }));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}
