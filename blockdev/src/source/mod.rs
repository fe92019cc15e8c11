//! Where chunk bytes come from. A layer has an ordered list of sources (later:
//! peers, then the super node, then the registry); the fetcher asks them in
//! order and verifies whatever they return, so a source is never trusted.

mod file;
mod registry;

use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;
use thiserror::Error;

pub use file::FileSource;
pub use registry::RegistrySource;

/// One place that can serve byte ranges of one layer blob.
#[async_trait]
pub trait ChunkSource: Send + Sync {
    /// Short, stable name for logs and counters, e.g. `registry`.
    fn name(&self) -> &str;

    /// Returns exactly the blob bytes `range` (stored, still compressed).
    async fn read_range(&self, range: Range<u64>) -> Result<Bytes, SourceError>;
}

#[derive(Debug, Error)]
pub enum SourceError {
    /// Worth asking again later: network trouble, 5xx, overload.
    #[error("{0}")]
    Transient(String),
    /// Asking again will not help: not found, unauthorized, bad request.
    #[error("{0}")]
    Permanent(String),
}

impl SourceError {
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Transient(_))
    }
}
