//! The readahead of lazy layers' loop devices follows the link.
//!
//! Readahead turns a reader's small reads into larger ones, and starts the
//! next ones before the reader asks (the kernel's async readahead), so a
//! container's start makes fewer FUSE requests and, for what is missing,
//! fewer round trips. It also fetches blocks that are never read. Which
//! wins depends on the link, as for the demand window (`fetch::link`):
//! measured with the python and node images, 128 KiB of readahead cut the
//! start without a profile at 1 Gbit/s from 1.13 s to 0.65 s (python) and
//! 1.27 s to 0.80 s (node), and cost time at 100 Mbit/s, where the extra
//! bytes (+40%) are what the container waits for (docs/benchmarks.md). So a
//! lazy device reads ahead what the link moves in half a round trip, in
//! powers of two from 16 KiB, at most `NodeConfig::lazy_read_ahead_kb`,
//! and nothing until the link has an estimate.
//!
//! The kernel copies a device's readahead into each file when it is opened:
//! a change reaches the files opened after it. The estimate exists moments
//! after the first layer attaches (its startup stream), before a container
//! opens its files.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use super::table::Shared;
use super::LayerManager;
use crate::fetch::LinkEstimate;

/// How often the readahead follows the estimate at most.
const SETTLE: Duration = Duration::from_millis(50);
/// Below this the readahead is none: a request's own round trip dominates.
const MIN_KB: u32 = 16;

/// The readahead of a lazy device on this link, in KiB, at most `max_kb`.
pub(super) fn lazy_read_ahead_kb(link: &LinkEstimate, max_kb: u32) -> u32 {
    let worth = link.worth_along(u64::from(max_kb) << 10).unwrap_or(0) >> 10;
    let kb = u32::try_from(worth).unwrap_or(max_kb).min(max_kb);
    if kb < MIN_KB {
        return 0;
    }
    // The nearest power of two: the estimate moves with every answer, the
    // devices' setting only when it about halves or doubles.
    let lower = 1 << kb.ilog2();
    let nearest = if kb - lower >= lower * 2 - kb {
        lower * 2
    } else {
        lower
    };
    nearest.min(max_kb)
}

impl LayerManager {
    /// The readahead a layer's device gets if it attaches lazily now.
    pub(super) fn lazy_read_ahead_kb(&self) -> u32 {
        let max_kb = self.config.lazy_read_ahead_kb;
        if self.config.lazy_read_ahead_follows_link {
            lazy_read_ahead_kb(&self.node.link, max_kb)
        } else {
            max_kb
        }
    }
}

/// Sets every lazy layer's readahead after each change of the estimate.
/// Runs until the manager aborts it.
pub(super) async fn follow_link(shared: Shared, link: Arc<LinkEstimate>, max_kb: u32) {
    loop {
        link.sampled().await;
        // Samples come with every answer: look at them at most this often.
        tokio::time::sleep(SETTLE).await;
        let kb = lazy_read_ahead_kb(&link, max_kb);
        // Serialised with the handoff, which raises a completed layer's
        // readahead: that must not be lowered again here.
        let _op = shared.ops.lock().await;
        let mut layers = shared.table.lock();
        let mut changed = 0;
        for a in layers.values_mut().filter(|a| !a.local) {
            if a.read_ahead_kb == kb {
                continue;
            }
            match a.loop_dev.set_read_ahead_kb(kb) {
                Ok(()) => {
                    a.read_ahead_kb = kb;
                    changed += 1;
                }
                Err(e) => warn!("layer {}: setting loop readahead: {e}", a.info.digest),
            }
        }
        if changed > 0 {
            debug!("readahead of {changed} lazy layers now {kb} KiB (follows the link)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(rate_bytes_per_sec: u64, rtt: Duration) -> LinkEstimate {
        let link = LinkEstimate::default();
        let bytes = rate_bytes_per_sec / 10;
        link.sample(link.send(), rtt, bytes, Duration::from_millis(100));
        link
    }

    #[test]
    fn the_readahead_is_half_a_round_trip_of_the_link_in_powers_of_two() {
        let unknown = LinkEstimate::default();
        assert_eq!(lazy_read_ahead_kb(&unknown, 128), 0, "no estimate, none");
        let ms = Duration::from_millis;
        // 1 Gbit/s, 2 ms: 125 KB worth along -> 128 KiB.
        assert_eq!(lazy_read_ahead_kb(&link(125_000_000, ms(2)), 128), 128);
        // 1 Gbit/s, 1 ms: 62.5 KB -> 64 KiB.
        assert_eq!(lazy_read_ahead_kb(&link(125_000_000, ms(1)), 128), 64);
        // 1 Gbit/s, 4 ms: 250 KB, capped at 128 KiB.
        assert_eq!(lazy_read_ahead_kb(&link(125_000_000, ms(4)), 128), 128);
        // 100 Mbit/s, 2 ms: 12.5 KB: none.
        assert_eq!(lazy_read_ahead_kb(&link(12_500_000, ms(2)), 128), 0);
        // 100 Mbit/s, 8 ms: 50 KB -> 64 KiB; 5 ms: 31 KB -> 32 KiB.
        assert_eq!(lazy_read_ahead_kb(&link(12_500_000, ms(8)), 128), 64);
        assert_eq!(lazy_read_ahead_kb(&link(12_500_000, ms(5)), 128), 32);
        assert_eq!(lazy_read_ahead_kb(&link(125_000_000, ms(4)), 0), 0, "off");
    }
}
