//! Where chunk bytes come from. A layer has an ordered list of sources (the
//! peers, then the super node, then the registry: [`registry_chain`]); the
//! fetcher asks them in order and verifies whatever they return, so a
//! source is never trusted.
//!
//! A source that picks among several servers (the peers) names the one that
//! answered; the fetcher tells it what verification found ([`Verdict`]), so
//! it can shun a server that sent bad bytes and be asked again at once.

mod chain;
mod file;
mod peer;
mod registry;
mod supernode;

use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;
use thiserror::Error;

pub use chain::registry_chain;
pub use file::FileSource;
pub use peer::PeerSource;
pub use registry::RegistrySource;
pub use supernode::SupernodeSource;

/// One place that can serve byte ranges of one layer blob.
#[async_trait]
pub trait ChunkSource: Send + Sync {
    /// Short, stable name for logs and counters, e.g. `registry`.
    fn name(&self) -> &str;

    /// Returns exactly the blob bytes `range` (stored, still compressed).
    async fn read_range(&self, range: Range<u64>) -> Result<Answer, SourceError>;

    /// What the fetcher found in an answer that named its `server`. Returns
    /// whether asking this source again right away may reach another server
    /// (the fetcher then does, before moving on to the next source). Sources
    /// with a single server never get a verdict.
    fn verdict(&self, _server: &str, _range: &Range<u64>, _verdict: &Verdict) -> bool {
        false
    }
}

/// What a source returned for a range.
#[derive(Debug)]
pub struct Answer {
    /// The bytes, not verified yet.
    pub bytes: Bytes,
    /// The server behind the source that sent them, when the source picks
    /// among several; the fetcher's [`Verdict`] on them goes back to it.
    pub server: Option<String>,
}

impl From<Bytes> for Answer {
    fn from(bytes: Bytes) -> Self {
        Answer {
            bytes,
            server: None,
        }
    }
}

/// The fetcher's verification of one [`Answer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every chunk in it verified (0 for a range that is not chunks, like
    /// the index).
    Verified { chunks: u64 },
    /// At least one chunk failed verification; why, for the log.
    Corrupt(String),
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
