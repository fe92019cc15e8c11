//! `supernode`: the blob through the datacenter's super node, with this
//! node's registry credentials (the super node fetches from the registry on
//! a miss), through the node's P2P peer.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::StreamExt;

use super::{Answer, ChunkSource, SourceError};
use crate::p2p::{PeerNode, RegistryBlob};
use crate::registry::RegistryClient;

/// One blob through the super node.
pub struct SupernodeSource {
    node: Arc<PeerNode>,
    blob: RegistryBlob,
}

impl SupernodeSource {
    /// Blob `digest` (`size` bytes) of the repository `registry` names, with
    /// its credentials.
    pub fn new(node: Arc<PeerNode>, registry: &RegistryClient, digest: &str, size: u64) -> Self {
        SupernodeSource {
            node,
            blob: RegistryBlob::new(registry, digest, size),
        }
    }
}

#[async_trait]
impl ChunkSource for SupernodeSource {
    fn name(&self) -> &str {
        "supernode"
    }

    async fn read_range(&self, range: Range<u64>) -> Result<Answer, SourceError> {
        let body = self
            .node
            .blob_from_supernode(&self.blob, &range)
            .await
            .map_err(source_error)?;
        Ok(Answer::streamed(
            body.map(|piece| piece.map_err(source_error)),
        ))
    }
}

fn source_error(e: crate::p2p::SupernodeError) -> SourceError {
    // Refusals (bad credentials, unknown registry) will not change on a
    // retry; the registry itself is the next source anyway.
    if e.is_refusal() {
        SourceError::Permanent(e.to_string())
    } else {
        SourceError::Transient(e.to_string())
    }
}
