//! `peer`: the blob from the peers above this node in the blob's tree (the
//! parent, then the ancestors above it), through the node's P2P peer. The
//! source picks whom to ask and keeps score; it verifies nothing. The
//! fetcher verifies every answer and hands back its [`Verdict`]: a peer
//! that sent bad bytes is counted and shunned, and the fetcher asks this
//! source again at once, which then asks the next ancestor.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use tracing::{debug, warn};

use super::{Answer, ChunkSource, SourceError, Verdict};
use crate::p2p::wire::BlobId;
use crate::p2p::PeerNode;

/// A dead or slow peer is left alone this long; a lying one longer.
const SHUN_FAILED: Duration = Duration::from_secs(5);
const SHUN_LIAR: Duration = Duration::from_secs(60);

/// One layer from the peers above this node in the layer's tree.
pub struct PeerSource {
    node: Arc<PeerNode>,
    digest: String,
    /// The layer's anchor when the caller knows it; without one, the layer
    /// the node serves for the digest (if it serves exactly one).
    anchor: Option<String>,
}

impl PeerSource {
    pub fn new(node: Arc<PeerNode>, digest: &str, anchor: Option<&str>) -> Self {
        PeerSource {
            node,
            digest: digest.to_owned(),
            anchor: anchor.map(str::to_owned),
        }
    }

    fn layer(&self) -> Option<BlobId> {
        self.node.resolve(&self.digest, self.anchor.as_deref())
    }
}

#[async_trait]
impl ChunkSource for PeerSource {
    fn name(&self) -> &str {
        "peer"
    }

    async fn read_range(&self, range: Range<u64>) -> Result<Answer, SourceError> {
        // Until the layer is attached (its index still being read) the node
        // has no place in the layer's tree, and no ticket.
        let Some(id) = self.layer() else {
            return Err(SourceError::Transient(
                "no peers until the layer is attached".into(),
            ));
        };
        let ancestors = self.node.ancestors(&id);
        if ancestors.is_empty() {
            return Err(SourceError::Transient(
                "no parent peer (the super node is the parent)".into(),
            ));
        }
        let mut failures = Vec::new();
        for peer in ancestors {
            match self.node.blob_from_peer(&peer, &id, &range).await {
                Ok(body) => {
                    let body = body.map(|piece| piece.map_err(SourceError::Transient));
                    return Ok(Answer::streamed(body).from_server(peer));
                }
                Err(e) => {
                    debug!(
                        "blob {}: peer {peer} failed for {range:?}: {e}",
                        self.digest
                    );
                    self.node.peer_failed(&peer, SHUN_FAILED);
                    failures.push(format!("{peer}: {e}"));
                }
            }
        }
        Err(SourceError::Transient(failures.join("; ")))
    }

    fn verdict(&self, peer: &str, range: &Range<u64>, verdict: &Verdict) -> bool {
        match verdict {
            Verdict::Verified { chunks } => {
                self.node
                    .record_download(peer, range.end - range.start, *chunks);
                false
            }
            Verdict::Failed(reason) => {
                debug!(
                    "blob {}: peer {peer} broke off {range:?}: {reason}",
                    self.digest
                );
                self.node.peer_failed(peer, SHUN_FAILED);
                self.has_ancestors()
            }
            Verdict::Corrupt(reason) => {
                warn!(
                    "blob {}: peer {peer} sent bad data for {range:?}, skipping it: {reason}",
                    self.digest
                );
                self.node.peer_lied(peer, SHUN_LIAR);
                self.has_ancestors()
            }
        }
    }
}

impl PeerSource {
    fn has_ancestors(&self) -> bool {
        self.layer()
            .is_some_and(|id| !self.node.ancestors(&id).is_empty())
    }
}
