//! The node's calls to the super node (announce, leave, blob ranges,
//! traces) and to its ancestors (blob ranges). What comes back is not
//! verified here: the fetcher does that for every chunk.

use std::ops::Range;

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt};
use reqwest::StatusCode;
use thiserror::Error;
use tracing::{debug, warn};

use super::{lock, PeerNode};
use crate::p2p::wire::{auth_to_header, header, path, query, AnnounceReply};
use crate::registry::RegistryClient;
use crate::trace::{Trace, MAX_TRACE_BYTES};

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

impl PeerNode {
    /// Exactly the stored bytes `range` of blob `digest` from `peer`, of
    /// the layer with `anchor` (`None`: unanchored).
    pub async fn blob_from_peer(
        &self,
        peer: &str,
        digest: &str,
        anchor: Option<&str>,
        range: &Range<u64>,
    ) -> Result<BoxStream<'static, Result<Bytes, String>>, String> {
        let url = format!("{}://{peer}{}", self.scheme(), path::BLOB);
        let mut params = vec![
            (query::DIGEST, digest.to_owned()),
            (query::START, range.start.to_string()),
            (query::END, range.end.to_string()),
        ];
        if let Some(anchor) = anchor {
            params.push((query::ANCHOR, anchor.to_owned()));
        }
        let resp = self
            .authed(self.client.get(url))
            .header(header::PEER, self.advertised())
            .query(&params)
            .timeout(self.config.peer_timeout())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        // The reader checks the length as the bytes arrive.
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
            .header(header::PEER, self.advertised())
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
            let body = resp.text().await.unwrap_or_default();
            return Err(SupernodeError::Status {
                status,
                message: body.trim().to_owned(),
            });
        }
        Ok(resp
            .bytes_stream()
            .map(|piece| piece.map_err(|e| SupernodeError::Unreachable(e.to_string())))
            .boxed())
    }

    /// Sends a startup trace to the super node (see p2p::supernode::traces).
    pub async fn put_trace(&self, key: &str, trace: &Trace) -> Result<(), String> {
        let url = format!("{}{}", self.config.supernode, path::TRACE);
        let r = self
            .authed(self.client.put(url))
            .query(&[(query::KEY, key)])
            .body(trace.encode())
            .timeout(self.config.supernode_timeout())
            .send()
            .await
            .map_err(|e| format!("sending trace {key} to the super node: {e}"))?;
        if !r.status().is_success() {
            return Err(format!(
                "sending trace {key} to the super node: HTTP {}",
                r.status()
            ));
        }
        Ok(())
    }

    /// The super node's trace for `key`: `Ok(None)` when it has none, an
    /// error when it cannot be asked or its answer is not a valid trace
    /// (read at most [`MAX_TRACE_BYTES`] of it).
    pub async fn get_trace(&self, key: &str) -> Result<Option<Trace>, String> {
        let url = format!("{}{}", self.config.supernode, path::TRACE);
        let ctx = |e: &dyn std::fmt::Display| format!("trace {key} from the super node: {e}");
        let mut r = self
            .authed(self.client.get(url))
            .query(&[(query::KEY, key)])
            .timeout(self.config.supernode_timeout())
            .send()
            .await
            .map_err(|e| ctx(&e))?;
        if r.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !r.status().is_success() {
            return Err(ctx(&format!("HTTP {}", r.status())));
        }
        let mut body = Vec::new();
        while let Some(part) = r.chunk().await.map_err(|e| ctx(&e))? {
            if body.len() + part.len() > MAX_TRACE_BYTES {
                return Err(ctx(&format!("answer longer than {MAX_TRACE_BYTES} bytes")));
            }
            body.extend_from_slice(&part);
        }
        Trace::decode(&body).map(Some).map_err(|e| ctx(&e))
    }

    /// Joins (or stays in) the tree of blob `digest`; remembers the
    /// ancestors the super node names.
    pub(super) async fn announce(&self, digest: &str) {
        let url = format!("{}{}", self.config.supernode, path::ANNOUNCE);
        let sent = self
            .authed(self.client.post(url))
            .query(&[(query::BLOB, digest), (query::ADDR, &self.advertised)])
            .timeout(self.config.supernode_timeout())
            .send()
            .await;
        let reply = match sent {
            Ok(r) if r.status().is_success() => r.json::<AnnounceReply>().await,
            Ok(r) => {
                warn!("announcing {digest} to the super node: HTTP {}", r.status());
                return;
            }
            Err(e) => Err(e),
        };
        match reply {
            Ok(reply) => {
                let mut chain = reply.ancestors;
                chain.retain(|a| a != &self.advertised);
                chain.truncate(self.config.max_ancestors);
                debug!("blob {digest}: ancestors {chain:?}");
                lock(&self.ancestors).insert(digest.to_owned(), chain);
            }
            Err(e) => warn!("announcing {digest} to the super node: {e}"),
        }
    }

    /// Leaves the tree of blob `digest` (best effort: the super node drops
    /// a silent member after its TTL anyway).
    pub(super) async fn leave(&self, digest: &str) {
        let url = format!("{}{}", self.config.supernode, path::LEAVE);
        let _ = self
            .authed(self.client.post(url))
            .query(&[(query::BLOB, digest), (query::ADDR, &self.advertised)])
            .timeout(self.config.supernode_timeout())
            .send()
            .await;
    }

    fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
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
