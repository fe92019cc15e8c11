//! Where chunk bytes come from. A layer has an ordered list of sources (the
//! peers, then the super node, then the registry: [`registry_chain`]); the
//! fetcher asks them in order and verifies whatever they return, so a
//! source is never trusted.
//!
//! An answer is a stream of the range's bytes ([`Body`]): the fetcher
//! verifies and stores each chunk as soon as its bytes are in, so a reader
//! waits for its chunk, not for a whole multi-megabyte range, and never more
//! than the range is read from the network.
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
use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, BoxStream, StreamExt};
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

    /// Starts answering with the blob bytes `range` (stored, still
    /// compressed); the body may still fail, or hold too few or too many
    /// bytes: the caller checks.
    async fn read_range(&self, range: Range<u64>) -> Result<Answer, SourceError>;

    /// What the fetcher found in an answer that named its `server`. Returns
    /// whether asking this source again right away may reach another server
    /// (the fetcher then does, before moving on to the next source). Sources
    /// with a single server never get a verdict.
    fn verdict(&self, _server: &str, _range: &Range<u64>, _verdict: &Verdict) -> bool {
        false
    }
}

/// The bytes of an answer, in order, as they arrive; not verified yet.
pub type Body = BoxStream<'static, Result<Bytes, SourceError>>;

/// What a source returned for a range.
pub struct Answer {
    pub body: Body,
    /// The server behind the source that sent them, when the source picks
    /// among several; the fetcher's [`Verdict`] on them goes back to it.
    pub server: Option<String>,
}

impl Answer {
    /// An answer whose bytes are all here.
    pub fn whole(bytes: Bytes) -> Self {
        Answer::streamed(stream::once(async move { Ok(bytes) }))
    }

    pub fn streamed(
        body: impl futures_util::Stream<Item = Result<Bytes, SourceError>> + Send + 'static,
    ) -> Self {
        Answer {
            body: body.boxed(),
            server: None,
        }
    }

    pub fn from_server(mut self, server: String) -> Self {
        self.server = Some(server);
        self
    }

    /// The whole body, which must be exactly `len` bytes; reading stops as
    /// soon as it is longer (a source that sends more than it was asked for
    /// is not believed, and not buffered).
    pub async fn collect(mut self, len: u64) -> Result<Bytes, SourceError> {
        let mut out = BytesMut::new();
        while let Some(piece) = self.body.next().await {
            let piece = piece?;
            if (out.len() + piece.len()) as u64 > len {
                return Err(SourceError::Permanent(format!(
                    "answer is longer than the {len} bytes asked for"
                )));
            }
            out.extend_from_slice(&piece);
        }
        if out.len() as u64 != len {
            return Err(SourceError::Transient(format!(
                "answer ended after {} of {len} bytes",
                out.len()
            )));
        }
        Ok(out.freeze())
    }
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("server", &self.server)
            .finish_non_exhaustive()
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
    /// The answer broke off or stalled before its end (the chunks that came
    /// were good); why, for the log.
    Failed(String),
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
