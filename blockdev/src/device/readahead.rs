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

/// How often the readahead follows the estimate at most.
const SETTLE: Duration = Duration::from_millis(50);

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
        // Samples come with every answer: look at them at most this often.
        tokio::time::sleep(SETTLE).await;
        let (plain, split) = (rule.kb(&link, false), rule.kb(&link, true));
        // Serialised with the handoff, which raises a completed layer's
        // readahead: that must not be lowered again here.
        let _op = shared.ops.lock().await;
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
        if changed > 0 {
            debug!(
                "readahead of {changed} lazy layers now {plain} KiB, {split} KiB with a \
                 split profile (follows the link)"
            );
        }
    }
}
