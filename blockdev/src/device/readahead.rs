//! The readahead of lazy layers' loop devices follows the link, by the
//! node's rule ([`LazyReadAhead`](crate::fetch::LazyReadAhead), which says
//! why).
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
use crate::fetch::{LazyReadAhead, LinkEstimate};
use crate::layer::LazyLayer;

/// How often the readahead follows the estimate at most. Short: at
/// 1 Gbit/s a startup stream says the link is fast (its first 2 MiB,
/// `LinkEstimate::sustained_rate`) some 20 ms in, and a container opens
/// most of its files within the next 100 ms.
const SETTLE: Duration = Duration::from_millis(10);

impl LayerManager {
    /// The readahead `layer`'s device gets if it attaches lazily now.
    pub(super) fn lazy_read_ahead_kb(&self, layer: &LazyLayer) -> u32 {
        let split = layer.index().is_split();
        self.node.read_ahead.kb(&self.node.link, split)
    }
}

/// Sets every lazy layer's readahead after each change of the estimate.
/// Runs until the manager aborts it.
pub(super) async fn follow_link(shared: Shared, link: Arc<LinkEstimate>, rule: LazyReadAhead) {
    loop {
        link.sampled().await;
        let (plain, split) = (rule.kb(&link, false), rule.kb(&link, true));
        // Serialised with the handoff, which raises a completed layer's
        // readahead: that must not be lowered again here.
        let op = shared.ops.lock().await;
        let changed = set_lazy_layers(&shared, plain, split);
        drop(op);
        if changed > 0 {
            debug!(
                "readahead of {changed} lazy layers now {plain} KiB, {split} KiB with a \
                 split profile (follows the link)"
            );
        }
        // Samples come with every answer and every piece of a long one:
        // look at them at most this often.
        tokio::time::sleep(SETTLE).await;
    }
}

/// Sets the readahead of every lazy layer, `split` for those whose
/// profile has a narrow part; returns how many changed.
fn set_lazy_layers(shared: &Shared, plain: u32, split: u32) -> usize {
    let mut layers = shared.table.lock();
    let mut changed = 0;
    for a in layers.values_mut().filter(|a| !a.local) {
        let kb = if a.layer.index().is_split() {
            split
        } else {
            plain
        };
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
    changed
}
