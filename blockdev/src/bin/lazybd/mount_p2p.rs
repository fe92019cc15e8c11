//! `lazybd mount --p2p-config`: the mount daemon as a P2P peer. Its layers
//! get the sources peer -> super node -> registry, and once attached they
//! are served to the peers below this node.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use lazybd_blockdev::device::LayerManager;
use lazybd_blockdev::layer::LayerSource;
use lazybd_blockdev::oci::LayerId;
use lazybd_blockdev::p2p::{P2pConfig, PeerNode, RegistryBlob};
use lazybd_blockdev::source::registry_chain;

use crate::image_source::OpenImage;

/// Starts the peer and gives each layer the P2P sources in front of its
/// registry.
pub async fn start(
    config: &Path,
    image: &OpenImage,
    layers: &mut [LayerSource],
) -> Result<Arc<PeerNode>> {
    let Some(client) = &image.registry else {
        bail!("--p2p-config needs an image from a registry");
    };
    let node = PeerNode::start(P2pConfig::load(config)?).await?;
    for layer in layers {
        layer.sources = registry_chain(
            client,
            Some(&node),
            &layer.digest,
            layer.anchor.as_deref(),
            layer.blob_size,
        );
    }
    Ok(node)
}

/// Serves an attached layer (`blob_size` bytes, of `image`'s registry) to
/// other peers.
pub async fn attached(
    peer: &Option<Arc<PeerNode>>,
    image: &OpenImage,
    manager: &LayerManager,
    id: &LayerId,
    blob_size: u64,
) {
    if let (Some(peer), Some(client), Some(layer)) = (peer, &image.registry, manager.layer(id)) {
        let origin = RegistryBlob::new(client, layer.digest(), blob_size);
        peer.serve_layer(layer, origin).await;
    }
}

pub async fn shutdown(peer: &Option<Arc<PeerNode>>) {
    if let Some(peer) = peer {
        peer.shutdown().await;
    }
}
