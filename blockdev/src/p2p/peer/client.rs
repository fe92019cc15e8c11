//! The node's calls to the super node (announce, leave, blob ranges,
//! traces) and to its ancestors (blob ranges, with this node's ticket). What
//! comes back is bounded before it is buffered: small answers (JSON, error
//! messages) by [`MAX_SMALL_BODY`], traces by [`MAX_TRACE_BYTES`]; blob
//! bodies are streamed to the fetcher, which reads no more than it asked for
//! and verifies every chunk.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt};
use reqwest::StatusCode;
use thiserror::Error;
use tracing::{debug, warn};

use super::{lock, PeerNode, Served};
use crate::oci::LayerId;
use crate::p2p::config::url_host;
use crate::p2p::http::{read_limited, MAX_SMALL_BODY};
use crate::p2p::wire::{auth_to_header, header, path, query, AnnounceReply, BlobId};
use crate::registry::RegistryClient;
use crate::trace::{trace_key, Trace, MAX_TRACE_BYTES};

/// A blob as the super node is asked for it: where it is, and with whose
/// registry credentials to fetch it.
#[derive(Debug, Clone)]
pub struct RegistryBlob {
    registry: String,
    repo: String,
    digest: String,
    size: u64,
    /// [`auth_to_header`] of the client's credentials ("" for anonymous).
    auth_header: String,
}

impl RegistryBlob {
    /// Blob `digest` (`size` bytes) of the repository `registry` names, with
    /// its credentials.
    pub fn new(registry: &RegistryClient, digest: &str, size: u64) -> Self {
        RegistryBlob {
            registry: registry.registry().to_owned(),
            repo: registry.repository().to_owned(),
            digest: digest.to_owned(),
            size,
            auth_header: auth_to_header(registry.auth()),
        }
    }
}

/// Why the super node did not send a blob range.
#[derive(Debug, Error)]
pub enum SupernodeError {
    /// No answer: connection trouble, a timeout, a broken body.
    #[error("super node: {0}")]
    Unreachable(String),
    #[error("super node: HTTP {status}: {message}")]
    Status { status: StatusCode, message: String },
}

impl SupernodeError {
    /// A refusal (bad credentials, unknown registry) that will not change on
    /// a retry.
    pub fn is_refusal(&self) -> bool {
        matches!(self, SupernodeError::Status { status, .. } if status.is_client_error())
    }
}

/// What an error answer says, at most [`MAX_SMALL_BODY`] of it.
async fn error_text(resp: reqwest::Response) -> String {
    match read_limited(resp, MAX_SMALL_BODY).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
        Err(e) => e,
    }
}

impl PeerNode {
    /// Exactly the stored bytes `range` of layer `id` from `peer`, showing
    /// this node's ticket for it.
    pub async fn blob_from_peer(
        &self,
        peer: &str,
        id: &BlobId,
        range: &Range<u64>,
    ) -> Result<BoxStream<'static, Result<Bytes, String>>, String> {
        let ticket = self
            .served(id)
            .and_then(|s| lock(&s.tree).ticket.clone())
            .ok_or("no ticket for this layer yet")?;
        let scheme = self.scheme();
        if scheme == "http" && !self.config.security().plain_http_ok(url_host(peer)) {
            // Checked here too: an ancestor's address comes from the super node.
            return Err(format!(
                "refusing to send a ticket to {peer} over plain HTTP (allow_insecure is off)"
            ));
        }
        let url = format!("{scheme}://{peer}{}", path::BLOB);
        let resp = self
            .authed(self.client.get(url))
            .header(header::TICKET, ticket)
            .query(&[
                (query::DIGEST, id.digest.clone()),
                (query::ANCHOR, id.anchor.clone()),
                (query::START, range.start.to_string()),
                (query::END, range.end.to_string()),
            ])
            .timeout(self.config.peer_timeout())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("HTTP {status}: {}", error_text(resp).await));
        }
        // The fetcher checks the length as the bytes arrive.
        Ok(resp
            .bytes_stream()
            .map(|piece| piece.map_err(|e| e.to_string()))
            .boxed())
    }

    /// The bytes `range` of `blob` from the super node, which fetches them
    /// from the registry with the blob's credentials if it has to.
    pub async fn blob_from_supernode(
        &self,
        blob: &RegistryBlob,
        range: &Range<u64>,
    ) -> Result<BoxStream<'static, Result<Bytes, SupernodeError>>, SupernodeError> {
        let url = format!("{}{}", self.config.supernode, path::BLOB);
        let mut rb = self
            .authed(self.client.get(url))
            .query(&[
                (query::REGISTRY, blob.registry.clone()),
                (query::REPO, blob.repo.clone()),
                (query::DIGEST, blob.digest.clone()),
                (query::SIZE, blob.size.to_string()),
                (query::START, range.start.to_string()),
                (query::END, range.end.to_string()),
            ])
            .timeout(self.config.supernode_timeout());
        if !blob.auth_header.is_empty() {
            rb = rb.header(header::REGISTRY_AUTH, &blob.auth_header);
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| SupernodeError::Unreachable(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(SupernodeError::Status {
                status,
                message: error_text(resp).await,
            });
        }
        Ok(resp
            .bytes_stream()
            .map(|piece| piece.map_err(|e| SupernodeError::Unreachable(e.to_string())))
            .boxed())
    }

    /// Sends the startup trace of the image with layer chain `chain` to the
    /// super node (see p2p::supernode::traces), which takes it only if this
    /// node holds tickets for every layer.
    pub async fn put_trace(&self, chain: &[LayerId], trace: &Trace) -> Result<(), String> {
        let key = trace_key(chain);
        let url = format!("{}{}", self.config.supernode, path::TRACE);
        let ctx = |e: &dyn std::fmt::Display| format!("sending trace {key} to the super node: {e}");
        let r = self
            .authed(self.client.put(url))
            .query(&[(query::KEY, key.clone()), (query::CHAIN, chain_text(chain))])
            .body(trace.encode())
            .timeout(self.config.supernode_timeout())
            .send()
            .await
            .map_err(|e| ctx(&e))?;
        let status = r.status();
        if !status.is_success() {
            return Err(ctx(&format!("HTTP {status}: {}", error_text(r).await)));
        }
        Ok(())
    }

    /// The super node's trace of the image with layer chain `chain`:
    /// `Ok(None)` when it has none, an error when it cannot be asked or its
    /// answer is not a valid trace (read at most [`MAX_TRACE_BYTES`] of it).
    pub async fn get_trace(&self, chain: &[LayerId]) -> Result<Option<Trace>, String> {
        let key = trace_key(chain);
        let url = format!("{}{}", self.config.supernode, path::TRACE);
        let ctx = |e: &dyn std::fmt::Display| format!("trace {key} from the super node: {e}");
        let r = self
            .authed(self.client.get(url))
            .query(&[(query::KEY, key.clone()), (query::CHAIN, chain_text(chain))])
            .timeout(self.config.supernode_timeout())
            .send()
            .await
            .map_err(|e| ctx(&e))?;
        let status = r.status();
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(ctx(&format!("HTTP {status}: {}", error_text(r).await)));
        }
        let body = read_limited(r, MAX_TRACE_BYTES)
            .await
            .map_err(|e| ctx(&e))?;
        Trace::decode(&body).map(Some).map_err(|e| ctx(&e))
    }

    /// Joins (or stays in) the tree of layer `id`, showing the registry
    /// credentials it was fetched with and the current ticket; remembers the
    /// ancestors and the new ticket the super node names.
    pub(super) async fn announce(&self, id: &BlobId, served: &Arc<Served>) {
        let url = format!("{}{}", self.config.supernode, path::ANNOUNCE);
        let origin = &served.origin;
        let mut rb = self
            .authed(self.client.post(url))
            .query(&[
                (query::REGISTRY, origin.registry.as_str()),
                (query::REPO, origin.repo.as_str()),
                (query::BLOB, id.digest.as_str()),
                (query::ANCHOR, id.anchor.as_str()),
                (query::ADDR, self.advertised.as_str()),
            ])
            .timeout(self.config.supernode_timeout());
        if !origin.auth_header.is_empty() {
            rb = rb.header(header::REGISTRY_AUTH, &origin.auth_header);
        }
        if let Some(t) = lock(&served.tree).ticket.clone() {
            rb = rb.header(header::TICKET, t);
        }
        let reply = match rb.send().await {
            Ok(r) if r.status().is_success() => {
                read_limited(r, MAX_SMALL_BODY).await.and_then(|b| {
                    serde_json::from_slice::<AnnounceReply>(&b).map_err(|e| e.to_string())
                })
            }
            Ok(r) => Err(format!("HTTP {}: {}", r.status(), error_text(r).await)),
            Err(e) => Err(e.to_string()),
        };
        match reply {
            Ok(reply) => {
                let mut chain = reply.ancestors;
                chain.retain(|a| a != &reply.member);
                chain.truncate(self.config.max_ancestors);
                debug!("layer {id}: ancestors {chain:?}");
                let mut tree = lock(&served.tree);
                tree.ancestors = chain;
                tree.ticket = Some(reply.ticket);
                *lock(&self.member) = Some(reply.member);
            }
            Err(e) => warn!("announcing layer {id} to the super node: {e}"),
        }
    }

    /// Leaves the tree of layer `id` (best effort: the super node drops a
    /// silent member after its TTL anyway).
    pub(super) async fn leave(&self, id: &BlobId) {
        let url = format!("{}{}", self.config.supernode, path::LEAVE);
        let _ = self
            .authed(self.client.post(url))
            .query(&[
                (query::BLOB, id.digest.as_str()),
                (query::ANCHOR, id.anchor.as_str()),
                (query::ADDR, self.advertised.as_str()),
            ])
            .timeout(self.config.supernode_timeout())
            .send()
            .await;
    }

    pub(super) fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.header(header::TOKEN, t),
            None => rb,
        }
    }

    fn scheme(&self) -> &'static str {
        if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// The `chain` query value: the layers' identities, comma-separated.
fn chain_text(chain: &[LayerId]) -> String {
    let ids: Vec<&str> = chain.iter().map(LayerId::as_str).collect();
    ids.join(",")
}
