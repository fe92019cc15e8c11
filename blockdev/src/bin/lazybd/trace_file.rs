//! Startup trace files (lazybd_blockdev::trace): `lazybd mount
//! --record-trace FILE` / `--replay-trace FILE` for a plain mount (e.g. to
//! benchmark a cold start with and without a replay; the recording runs
//! from the moment the mount is ready until it is unmounted, the file is
//! written then), and `lazybd convert --profile FILE`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lazybd_blockdev::device::LayerManager;
use lazybd_blockdev::oci::LayerId;
use lazybd_blockdev::trace::{Trace, MAX_TRACE_BYTES};
use tracing::{info, warn};

/// Reads and checks a trace file (bounded; a bad file fails the mount: the
/// user asked for this replay explicitly).
pub fn load(path: &Path) -> Result<Trace> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("trace {}", path.display()))?
        .len();
    if len > MAX_TRACE_BYTES as u64 {
        bail!(
            "trace {}: {len} bytes, more than {MAX_TRACE_BYTES}",
            path.display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading trace {}", path.display()))?;
    Trace::decode(&bytes).with_context(|| format!("trace {}", path.display()))
}

/// Starts replaying `trace` on the attached layers.
pub fn replay(manager: &LayerManager, trace: &Trace, path: &Path) {
    let started = manager.replay_trace(trace);
    info!(
        "replaying trace {} ({} ranges) on {started} layers",
        path.display(),
        trace.range_count()
    );
}

/// Ends the recording of layers `ids` and writes it to `path` (atomically);
/// a failure is logged, the unmount goes on.
pub fn save(manager: &LayerManager, ids: &[LayerId], path: &Path) {
    let trace = manager.stop_trace(ids);
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let written = std::fs::write(&tmp, trace.encode()).and_then(|()| std::fs::rename(&tmp, path));
    match written {
        Ok(()) => info!(
            "trace of {} ranges written to {}",
            trace.range_count(),
            path.display()
        ),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            warn!("writing trace {}: {e}", path.display());
        }
    }
}
