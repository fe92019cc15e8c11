//! Startup traces (DADI's trace-based prefetch): which chunks of which
//! layers a container read on demand during its first seconds. Stored per
//! image (see docs/snapshotter.md#startup-traces) and replayed ahead of the
//! full background prefetch on the next start.
//!
//! The encoding is JSON with a version, so a reader refuses what it does not
//! understand instead of misreading it. Everything is bounded: the encoded
//! size, the layers and the chunks, since a trace may come from another node.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The only encoding version so far.
pub const TRACE_VERSION: u32 = 1;
/// Largest encoded trace accepted (file, super node request or answer).
pub const MAX_TRACE_BYTES: usize = 1 << 20;
/// Chunks in one trace, over all layers (with 1 MiB chunks: 16 GiB).
pub const MAX_TRACE_CHUNKS: usize = 16 << 10;
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
    #[error("trace has {0} chunks, more than {MAX_TRACE_CHUNKS}")]
    TooManyChunks(usize),
    #[error("trace has {0} layers, more than {MAX_TRACE_LAYERS}")]
    TooManyLayers(usize),
    #[error("trace names an invalid layer identity {0:?}")]
    BadDigest(String),
}

/// The chunks read of one layer, sorted and without duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerTrace {
    /// The layer's identity ([`crate::oci::LayerId`] as text: its anchor),
    /// not its blob digest: a trace is about content.
    pub digest: String,
    pub chunks: Vec<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trace {
    pub version: u32,
    pub layers: Vec<LayerTrace>,
}

impl Trace {
    /// A trace of the given layers' chunks, normalised (see [`merge`](Self::merge)).
    pub fn new(layers: impl IntoIterator<Item = (String, Vec<u64>)>) -> Self {
        let mut t = Trace {
            version: TRACE_VERSION,
            layers: Vec::new(),
        };
        for (digest, chunks) in layers {
            t.merge(&Trace {
                version: TRACE_VERSION,
                layers: vec![LayerTrace { digest, chunks }],
            });
        }
        t
    }

    pub fn chunk_count(&self) -> usize {
        self.layers.iter().map(|l| l.chunks.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.chunk_count() == 0
    }

    pub fn chunks_of(&self, digest: &str) -> &[u64] {
        self.layers
            .iter()
            .find(|l| l.digest == digest)
            .map_or(&[], |l| &l.chunks)
    }

    /// Adds `other`'s chunks: layers keep their first-seen order, chunks are
    /// sorted and deduplicated, and the total stays within
    /// [`MAX_TRACE_CHUNKS`] (what does not fit is dropped, last layers first).
    pub fn merge(&mut self, other: &Trace) {
        let mut room = MAX_TRACE_CHUNKS.saturating_sub(self.chunk_count());
        for theirs in &other.layers {
            let pos = match self.layers.iter().position(|l| l.digest == theirs.digest) {
                Some(p) => p,
                None if self.layers.len() < MAX_TRACE_LAYERS => {
                    self.layers.push(LayerTrace {
                        digest: theirs.digest.clone(),
                        chunks: Vec::new(),
                    });
                    self.layers.len() - 1
                }
                None => continue,
            };
            let mine = &mut self.layers[pos];
            let mut set: BTreeSet<u64> = mine.chunks.iter().copied().collect();
            for &c in &theirs.chunks {
                if room == 0 {
                    break;
                }
                if set.insert(c) {
                    room -= 1;
                }
            }
            mine.chunks = set.into_iter().collect();
        }
        self.layers.retain(|l| !l.chunks.is_empty());
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain data serialises")
    }

    /// Parses and checks a trace from an untrusted source; normalises it.
    pub fn decode(bytes: &[u8]) -> Result<Self, TraceError> {
        if bytes.len() > MAX_TRACE_BYTES {
            return Err(TraceError::TooLarge(bytes.len()));
        }
        // The version first, so a newer format is reported as such and not
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
        let raw: Trace =
            serde_json::from_slice(bytes).map_err(|e| TraceError::Malformed(e.to_string()))?;
        if raw.layers.len() > MAX_TRACE_LAYERS {
            return Err(TraceError::TooManyLayers(raw.layers.len()));
        }
        if raw.chunk_count() > MAX_TRACE_CHUNKS {
            return Err(TraceError::TooManyChunks(raw.chunk_count()));
        }
        if let Some(l) = raw
            .layers
            .iter()
            .find(|l| crate::oci::LayerId::parse(&l.digest).is_err())
        {
            return Err(TraceError::BadDigest(l.digest.clone()));
        }
        let mut t = Trace::new(std::iter::empty());
        t.merge(&raw);
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
        .is_some_and(|hex| crate::oci::valid_digest(&format!("sha256:{hex}")))
}

#[cfg(test)]
mod tests;
