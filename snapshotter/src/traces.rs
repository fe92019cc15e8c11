//! Startup traces for images on lazy layers (docs/snapshotter.md#startup-traces).
//!
//! Key: the ordered digests of the image's lazy layers, bottom first
//! ([`trace_key`]). That is what the snapshotter knows reliably both at
//! Prepare of the container snapshot (its parent chain) and at `task-start`
//! (the rootfs lower dirs); the manifest digest is only on the labels of the
//! image layers' Prepare, which a restarted snapshotter or a `ctr` unpack
//! does not repeat.
//!
//! Stored as `<root>/traces/<key>` and on the super node when `[p2p]` is
//! configured. A trace read from either is checked (size, version, bounds)
//! and refused with a log line when bad: a refused trace means no replay,
//! never a failed start.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lazybd_blockdev::oci::LayerId;
use lazybd_blockdev::p2p::PeerNode;
use lazybd_blockdev::stats::Stats;
use lazybd_blockdev::trace::{Trace, MAX_TRACE_BYTES};
use serde::Deserialize;
use tracing::{info, warn};

pub use lazybd_blockdev::trace::trace_key;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceConfig {
    /// Record a trace at the first `task-start` of an image without one.
    pub record: bool,
    /// Replay an image's trace when its container snapshot is prepared and
    /// at `task-start`.
    pub replay: bool,
    /// How long after `task-start` on-demand reads are recorded.
    pub record_secs: u64,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            record: true,
            replay: true,
            record_secs: 10,
        }
    }
}

pub struct Traces {
    dir: PathBuf,
    pub config: TraceConfig,
    /// Keys being recorded now (one recording per image at a time).
    recording: Mutex<HashSet<String>>,
}

impl Traces {
    pub fn new(dir: &Path, config: TraceConfig) -> Self {
        if let Err(e) = std::fs::create_dir_all(dir) {
            warn!(
                "creating {}: {e} (traces will not be stored)",
                dir.display()
            );
        }
        Traces {
            dir: dir.to_owned(),
            config,
            recording: Mutex::default(),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// The trace stored on this node for `key`, if any and valid.
    pub fn load_local(&self, key: &str, stats: &Stats) -> Option<Trace> {
        let path = self.path(key);
        let meta = std::fs::metadata(&path).ok()?;
        if meta.len() > MAX_TRACE_BYTES as u64 {
            warn!(
                "trace {}: {} bytes, more than {MAX_TRACE_BYTES}: ignored",
                path.display(),
                meta.len()
            );
            stats.trace.rejected.fetch_add(1, Relaxed);
            return None;
        }
        let decoded = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| Trace::decode(&b).map_err(|e| e.to_string()));
        match decoded {
            Ok(t) => Some(t),
            Err(e) => {
                warn!("trace {}: {e}: ignored", path.display());
                stats.trace.rejected.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// The local trace of `key`, else the super node's for the layer chain
    /// `chain` (whose key `key` is; then kept locally).
    pub async fn load(
        &self,
        key: &str,
        chain: &[LayerId],
        peer: Option<&PeerNode>,
        stats: &Stats,
    ) -> Option<Trace> {
        if let Some(t) = self.load_local(key, stats) {
            return Some(t);
        }
        match peer?.get_trace(chain).await {
            Ok(Some(t)) => {
                stats.trace.downloaded.fetch_add(1, Relaxed);
                info!(
                    "trace {key}: {} ranges from the super node",
                    t.range_count()
                );
                self.save(key, &t, stats);
                Some(t)
            }
            Ok(None) => None,
            Err(e) => {
                warn!("{e}: no replay");
                stats.trace.rejected.fetch_add(1, Relaxed);
                None
            }
        }
    }

    fn save(&self, key: &str, trace: &Trace, stats: &Stats) -> bool {
        let (path, tmp) = (self.path(key), self.dir.join(format!(".{key}.tmp")));
        let written =
            std::fs::write(&tmp, trace.encode()).and_then(|()| std::fs::rename(&tmp, &path));
        match written {
            Ok(()) => {
                stats.trace.stored.fetch_add(1, Relaxed);
                true
            }
            Err(e) => {
                warn!("storing trace {}: {e}", path.display());
                let _ = std::fs::remove_file(&tmp);
                false
            }
        }
    }

    /// Stores a recorded trace of the layer chain `chain` (key `key`) here
    /// and on the super node.
    pub async fn store(
        &self,
        key: &str,
        chain: &[LayerId],
        trace: &Trace,
        peer: Option<&PeerNode>,
        stats: &Stats,
    ) {
        if !self.save(key, trace, stats) {
            return;
        }
        info!("trace {key}: stored, {} chunks", trace.range_count());
        if let Some(peer) = peer {
            match peer.put_trace(chain, trace).await {
                Ok(()) => {
                    stats.trace.uploaded.fetch_add(1, Relaxed);
                }
                Err(e) => warn!("{e}"),
            }
        }
    }

    /// Claims the recording of `key`; false when one runs already. The
    /// returned guard gives it back.
    pub fn begin_recording(self: &Arc<Self>, key: &str) -> Option<RecordingGuard> {
        let mut r = self.recording.lock().unwrap_or_else(|e| e.into_inner());
        r.insert(key.to_owned()).then(|| RecordingGuard {
            traces: self.clone(),
            key: key.to_owned(),
        })
    }

    pub fn record_window(&self) -> Duration {
        Duration::from_secs(self.config.record_secs)
    }
}

pub struct RecordingGuard {
    traces: Arc<Traces>,
    key: String,
}

impl Drop for RecordingGuard {
    fn drop(&mut self) {
        self.traces
            .recording
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}
