//! The one place that orders the sources of a layer in a registry.

use std::sync::Arc;

use super::{ChunkSource, PeerSource, RegistrySource, SupernodeSource};
use crate::p2p::PeerNode;
use crate::registry::RegistryClient;

/// The sources of blob `digest` (`blob_size` bytes) of the repository
/// `registry` names, in the order the fetcher asks them: with this node's
/// P2P peer, the peers above it (for the layer with `anchor`), then the
/// super node, then the registry itself; without one, the registry alone.
pub fn registry_chain(
    registry: &Arc<RegistryClient>,
    peer: Option<&Arc<PeerNode>>,
    digest: &str,
    anchor: Option<&str>,
    blob_size: u64,
) -> Vec<Arc<dyn ChunkSource>> {
    let mut sources: Vec<Arc<dyn ChunkSource>> = Vec::new();
    if let Some(peer) = peer {
        sources.push(Arc::new(PeerSource::new(peer.clone(), digest, anchor)));
        sources.push(Arc::new(SupernodeSource::new(
            peer.clone(),
            registry,
            digest,
            blob_size,
        )));
    }
    sources.push(Arc::new(RegistrySource::new(registry.clone(), digest)));
    sources
}
