//! Startup traces (DADI's trace-based prefetch) and startup profiles: which
//! bytes of which layers a container read during its first seconds, as
//! image byte ranges in the order it first read them.
//!
//! A node records one when a container starts and stores it per image (see
//! docs/snapshotter.md#startup-traces); the next start of that image, on
//! any node, fetches those chunks ahead of the container. The same file is a
//! startup profile for `lazybd convert --profile`, which stores those chunks
//! first in each blob: layers are matched there by the source layer's
//! diff_id, which the trace carries where the node knew it.
//!
//! The encoding is JSON with a version, so a reader refuses what it does not
//! understand instead of misreading it. Everything is bounded: the encoded
//! size, the layers and the ranges, since a trace may come from another node.

mod recorder;

use std::ops::Range;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

pub use recorder::Recorder;

use crate::oci::{valid_digest, LayerId};

/// Version 1 listed chunk numbers of fixed 1 MiB chunks; ranges survive a
/// change of chunking (and a re-conversion with a profile), numbers do not.
pub const TRACE_VERSION: u32 = 2;
/// Largest encoded trace accepted (file, super node request or answer).
pub const MAX_TRACE_BYTES: usize = 4 << 20;
/// Ranges in one trace, over all layers.
pub const MAX_TRACE_RANGES: usize = 64 << 10;
/// Layers in one trace.
pub const MAX_TRACE_LAYERS: usize = 256;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TraceError {
    #[error("trace is {0} bytes, more than {MAX_TRACE_BYTES}")]
    TooLarge(usize),
    #[error("trace is not valid: {0}")]
    Malformed(String),
    #[error("trace version {0} is not supported (this build reads {TRACE_VERSION})")]
    Version(u32),
    #[error("trace has {0} ranges, more than {MAX_TRACE_RANGES}")]
    TooManyRanges(usize),
    #[error("trace has {0} layers, more than {MAX_TRACE_LAYERS}")]
    TooManyLayers(usize),
    #[error("trace names an invalid layer identity {0:?}")]
    BadDigest(String),
    #[error("trace range [{0}, +{1}) is empty or overflows")]
    BadRange(u64, u64),
}

/// What a container read of one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerTrace {
    /// The layer's identity on a node (its anchor; for an unanchored layer
    /// its blob digest in that namespace): a trace is about content.
    /// Replays match on this.
    pub layer: LayerId,
    /// The source layer's diff_id, when known: `lazybd convert --profile`
    /// matches on this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_id: Option<String>,
    /// `[offset, length]` of each range of the image read, first read first.
    pub ranges: Vec<[u64; 2]>,
    /// In a profile recorded twice (`lazybd convert --record-profile`): how
    /// many of `ranges`, from the first, the container read with at most
    /// [`NARROW_READ_AHEAD_KB`](crate::format::NARROW_READ_AHEAD_KB) of
    /// readahead; the others it read besides with more. Absent: unknown
    /// (a node's trace, read with whatever its link gave it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub narrow: Option<usize>,
}

impl LayerTrace {
    pub fn ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.ranges.iter().map(|&[o, n]| o..o + n)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trace {
    pub version: u32,
    pub layers: Vec<LayerTrace>,
}

impl Trace {
    /// A trace of these layers (empty ones left out), in this order, cut to
    /// the bounds ([`MAX_TRACE_RANGES`] over all, [`MAX_TRACE_LAYERS`]).
    pub fn new(layers: impl IntoIterator<Item = LayerTrace>) -> Self {
        let mut room = MAX_TRACE_RANGES;
        let layers = layers
            .into_iter()
            .filter(|l| !l.ranges.is_empty())
            .take(MAX_TRACE_LAYERS)
            .map_while(|mut l| {
                if room == 0 {
                    return None;
                }
                l.ranges.truncate(room);
                room -= l.ranges.len();
                l.narrow = l.narrow.map(|n| n.min(l.ranges.len()));
                Some(l)
            })
            .collect();
        Trace {
            version: TRACE_VERSION,
            layers,
        }
    }

    /// A profile recorded twice: per layer, what `narrow` read (with at
    /// most [`NARROW_READ_AHEAD_KB`](crate::format::NARROW_READ_AHEAD_KB)
    /// of readahead), then what `wide` read besides, marked as such
    /// ([`LayerTrace::narrow`]); `wide`'s other layers after these. Cut to
    /// the bounds like [`Trace::new`].
    pub fn narrow_then_wide(narrow: Trace, wide: Trace) -> Trace {
        let mut layers = narrow.layers;
        for l in &mut layers {
            l.narrow = Some(l.ranges.len());
        }
        for w in wide.layers {
            match layers.iter_mut().find(|l| l.layer == w.layer) {
                Some(l) => {
                    l.ranges.extend(w.ranges);
                    l.diff_id = l.diff_id.take().or(w.diff_id);
                }
                None => layers.push(LayerTrace {
                    narrow: Some(0),
                    ..w
                }),
            }
        }
        Trace::new(layers)
    }

    pub fn range_count(&self) -> usize {
        self.layers.iter().map(|l| l.ranges.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.range_count() == 0
    }

    pub fn layer(&self, layer: &str) -> Option<&LayerTrace> {
        self.layers.iter().find(|l| l.layer.as_str() == layer)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain data serialises")
    }

    /// Parses and checks a trace from an untrusted source.
    pub fn decode(bytes: &[u8]) -> Result<Self, TraceError> {
        if bytes.len() > MAX_TRACE_BYTES {
            return Err(TraceError::TooLarge(bytes.len()));
        }
        // The version first, so another format is reported as such and not
        // as a parse error of fields this build does not know.
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let v: Versioned =
            serde_json::from_slice(bytes).map_err(|e| TraceError::Malformed(e.to_string()))?;
        if v.version != TRACE_VERSION {
            return Err(TraceError::Version(v.version));
        }
        let t: Trace =
            serde_json::from_slice(bytes).map_err(|e| TraceError::Malformed(e.to_string()))?;
        if t.layers.len() > MAX_TRACE_LAYERS {
            return Err(TraceError::TooManyLayers(t.layers.len()));
        }
        if t.range_count() > MAX_TRACE_RANGES {
            return Err(TraceError::TooManyRanges(t.range_count()));
        }
        for l in &t.layers {
            // `layer` was checked as it was parsed (a LayerId).
            if let Some(bad) = l.diff_id.as_ref().filter(|d| !valid_digest(d)) {
                return Err(TraceError::BadDigest(bad.clone()));
            }
            if let Some(&[o, n]) = l
                .ranges
                .iter()
                .find(|&&[o, n]| n == 0 || o.checked_add(n).is_none())
            {
                return Err(TraceError::BadRange(o, n));
            }
            if let Some(n) = l.narrow.filter(|&n| n > l.ranges.len()) {
                return Err(TraceError::Malformed(format!(
                    "layer {} marks {n} of its {} ranges narrow",
                    l.layer.as_str(),
                    l.ranges.len()
                )));
            }
        }
        Ok(t)
    }
}

/// The key a trace is stored under: the sha256 of the image's ordered layer
/// identities (bottom first, one per line: their anchors, so the key is
/// about content, not about what a registry calls it), as `sha256-<hex>` (a
/// file name and a URL path segment as is).
pub fn trace_key<S: AsRef<str>>(layers: &[S]) -> String {
    let mut h = Sha256::new();
    for l in layers {
        h.update(l.as_ref().as_bytes());
        h.update(b"\n");
    }
    format!("sha256-{}", hex::encode(h.finalize()))
}

/// Whether `key` has the shape [`trace_key`] makes (checked before it names
/// a file).
pub fn valid_key(key: &str) -> bool {
    key.strip_prefix("sha256-")
        .is_some_and(|h| valid_digest(&format!("sha256:{h}")))
}

#[cfg(test)]
mod tests;
