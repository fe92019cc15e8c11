//! The chunk sources P2P adds in front of the registry: `peer` (the parent,
//! then the ancestors above it) and `supernode`.

use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tracing::{debug, warn};

use super::peer::{chunks_exactly, PeerNode};
use super::wire::{auth_to_header, header, path, query};
use crate::layer::LazyLayer;
use crate::registry::RegistryClient;
use crate::source::{ChunkSource, SourceError};

/// A dead or slow peer is left alone this long; a lying one longer.
const SHUN_FAILED: Duration = Duration::from_secs(5);
const SHUN_LIAR: Duration = Duration::from_secs(60);

/// One blob from the peers above this node in the blob's tree.
pub struct PeerSource {
    node: Arc<PeerNode>,
    digest: String,
}

impl PeerSource {
    pub fn new(node: Arc<PeerNode>, digest: &str) -> Self {
        PeerSource {
            node,
            digest: digest.to_owned(),
        }
    }

    async fn ask(&self, peer: &str, range: &Range<u64>) -> Result<Bytes, String> {
        let url = format!("{}://{peer}{}", self.node.scheme(), path::BLOB);
        let resp = self
            .node
            .authed(self.node.client.get(url))
            .header(header::PEER, self.node.advertised())
            .query(&[
                (query::DIGEST, self.digest.clone()),
                (query::START, range.start.to_string()),
                (query::END, range.end.to_string()),
            ])
            .timeout(self.node.config.peer_timeout())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
        if bytes.len() as u64 != range.end - range.start {
            return Err(format!("{} bytes for {range:?}", bytes.len()));
        }
        Ok(bytes)
    }
}

#[async_trait]
impl ChunkSource for PeerSource {
    fn name(&self) -> &str {
        "peer"
    }

    async fn read_range(&self, range: Range<u64>) -> Result<Bytes, SourceError> {
        // Until the layer is attached (its index still being read) there is
        // no tree position and nothing to check peers' chunks against.
        if self.node.layer(&self.digest).is_none() {
            return Err(SourceError::Transient(
                "no peers until the layer is attached".into(),
            ));
        }
        let ancestors = self.node.ancestors(&self.digest);
        if ancestors.is_empty() {
            return Err(SourceError::Transient(
                "no parent peer (the super node is the parent)".into(),
            ));
        }
        let mut failures = Vec::new();
        for peer in ancestors {
            let outcome = match self.ask(&peer, &range).await {
                Ok(bytes) => {
                    // Verified here too, so a lying peer is skipped and
                    // shunned instead of failing the whole source.
                    let verify = match self.node.layer(&self.digest) {
                        Some(layer) => {
                            let (r, b) = (range.clone(), bytes.clone());
                            tokio::task::spawn_blocking(move || verify(&layer, &r, &b))
                                .await
                                .unwrap_or_else(|e| Err(format!("verification task: {e}")))
                        }
                        None => Err("layer detached".into()),
                    };
                    match verify {
                        Ok(chunks) => {
                            self.node.record_download(&peer, bytes.len() as u64, chunks);
                            return Ok(bytes);
                        }
                        Err(e) => {
                            self.node.corrupt_from_peers.fetch_add(1, Relaxed);
                            warn!(
                                "blob {}: peer {peer} sent bad data for {range:?}, \
                                 skipping it: {e}",
                                self.digest
                            );
                            self.node.shun(&peer, SHUN_LIAR);
                            format!("{peer}: corrupt: {e}")
                        }
                    }
                }
                Err(e) => {
                    self.node.peer_failures.fetch_add(1, Relaxed);
                    debug!(
                        "blob {}: peer {peer} failed for {range:?}: {e}",
                        self.digest
                    );
                    self.node.shun(&peer, SHUN_FAILED);
                    format!("{peer}: {e}")
                }
            };
            failures.push(outcome);
        }
        Err(SourceError::Transient(failures.join("; ")))
    }
}

/// Checks every chunk in `bytes` (the stored bytes `range`) against the
/// index; returns how many chunks there were.
fn verify(layer: &LazyLayer, range: &Range<u64>, bytes: &Bytes) -> Result<u64, String> {
    let index = layer.index();
    let chunks = chunks_exactly(index, range.start, range.end)
        .ok_or_else(|| "range is not a run of whole chunks".to_owned())?;
    for c in chunks.clone() {
        let r = index.chunks[c as usize].stored_range();
        let at = (r.start - range.start) as usize..(r.end - range.start) as usize;
        index
            .decode_chunk(c, &bytes[at])
            .map_err(|e| format!("chunk {c}: {e}"))?;
    }
    Ok(chunks.end - chunks.start)
}

/// One blob through the super node, with this node's registry credentials.
pub struct SupernodeSource {
    node: Arc<PeerNode>,
    registry: String,
    repo: String,
    digest: String,
    size: u64,
    auth_header: String,
}

impl SupernodeSource {
    pub fn new(node: Arc<PeerNode>, registry: &RegistryClient, digest: &str, size: u64) -> Self {
        SupernodeSource {
            node,
            registry: registry.registry().to_owned(),
            repo: registry.repository().to_owned(),
            digest: digest.to_owned(),
            size,
            auth_header: auth_to_header(registry.auth()),
        }
    }
}

#[async_trait]
impl ChunkSource for SupernodeSource {
    fn name(&self) -> &str {
        "supernode"
    }

    async fn read_range(&self, range: Range<u64>) -> Result<Bytes, SourceError> {
        let url = format!("{}{}", self.node.config.supernode, path::BLOB);
        let mut rb = self
            .node
            .authed(self.node.client.get(url))
            .header(header::PEER, self.node.advertised())
            .query(&[
                (query::REGISTRY, self.registry.clone()),
                (query::REPO, self.repo.clone()),
                (query::DIGEST, self.digest.clone()),
                (query::SIZE, self.size.to_string()),
                (query::START, range.start.to_string()),
                (query::END, range.end.to_string()),
            ])
            .timeout(self.node.config.supernode_timeout());
        if !self.auth_header.is_empty() {
            rb = rb.header(header::REGISTRY_AUTH, &self.auth_header);
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| SourceError::Transient(format!("super node: {e}")))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let msg = format!("super node: HTTP {status}: {}", body.trim());
            // Refusals (bad credentials, unknown registry) will not change on
            // a retry; the registry itself is the next source anyway.
            return Err(if status.is_client_error() {
                SourceError::Permanent(msg)
            } else {
                SourceError::Transient(msg)
            });
        }
        resp.bytes()
            .await
            .map_err(|e| SourceError::Transient(format!("super node: {e}")))
    }
}
