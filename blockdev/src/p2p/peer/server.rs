//! The peer server: serves the stored bytes of whole chunks of the blobs
//! this node holds to the peers below it, fetching through the node's own
//! sources what it does not hold yet (a child is never sent away).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tracing::debug;

use super::{lock, stored, PeerNode};
use crate::oci::{valid_digest, LayerId};
use crate::p2p::http::{self, Body};
use crate::p2p::wire::{header, path, query, MAX_RANGE};

impl PeerNode {
    pub(super) async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        remote: SocketAddr,
    ) -> Response<Body> {
        if req.uri().path() == path::HEALTHZ {
            return http::respond(StatusCode::OK, "ok\n");
        }
        if !http::token_ok(&req, self.token.as_deref()) {
            return http::respond(StatusCode::UNAUTHORIZED, "cluster token missing or wrong\n");
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET, path::BLOB) => {
                let asker = req
                    .headers()
                    .get(header::PEER)
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| v.len() <= 256)
                    .map(str::to_owned)
                    .unwrap_or_else(|| remote.ip().to_string());
                let q = http::query(&req);
                match self.upload(&q, &asker).await {
                    Ok(b) => http::respond(StatusCode::OK, b),
                    Err((status, msg)) => {
                        debug!("upload to {asker}: {msg}");
                        http::respond(status, msg)
                    }
                }
            }
            (&Method::GET, path::STATS) => http::json(&self.stats()),
            _ => http::respond(StatusCode::NOT_FOUND, "no such endpoint\n"),
        }
    }

    /// The stored bytes of whole chunks `start..end` of a blob, relayed
    /// through this node's own fetcher for chunks not held yet.
    async fn upload(
        &self,
        q: &HashMap<String, String>,
        asker: &str,
    ) -> Result<Bytes, (StatusCode, String)> {
        let bad = |m: &str| (StatusCode::BAD_REQUEST, format!("{m}\n"));
        let digest = q
            .get(query::DIGEST)
            .filter(|d| valid_digest(d))
            .ok_or_else(|| bad("bad digest"))?;
        let num = |k: &str| -> Result<u64, (StatusCode, String)> {
            q.get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(&format!("bad {k}")))
        };
        let (start, end) = (num(query::START)?, num(query::END)?);
        if !(start < end && end - start <= MAX_RANGE) {
            return Err(bad("bad range"));
        }
        // The layer the asker reads: its anchor, else the unanchored blob.
        // Another layer under the same digest is not served for it.
        let id = LayerId::of(digest, q.get(query::ANCHOR).map(String::as_str))
            .map_err(|_| bad("bad anchor"))?;
        self.upload_requests.fetch_add(1, Relaxed);
        let Some(layer) = self.layer(&id) else {
            self.upload_misses.fetch_add(1, Relaxed);
            return Err((StatusCode::NOT_FOUND, "blob not held here\n".into()));
        };
        let chunks = layer
            .index()
            .chunks_in_blob_range(start, end)
            .ok_or_else(|| bad("range is not a run of whole chunks"))?;
        let image_len: u64 = chunks
            .iter()
            .map(|&c| u64::from(layer.index().chunk_len(c)))
            .sum();
        // The decoded chunks and their rebuilt stored form, both in memory.
        let _room = self
            .budget
            .reserve(image_len + (end - start), self.config.peer_timeout())
            .await
            .ok_or_else(|| (StatusCode::SERVICE_UNAVAILABLE, "busy\n".to_owned()))?;
        let mut data = Vec::with_capacity(chunks.len());
        for &c in &chunks {
            let r = layer.index().image_range(c);
            let bytes = layer
                .read(r.start, (r.end - r.start) as u32)
                .await
                .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")))?;
            data.push(bytes);
        }
        let rebuilt = {
            let layer = layer.clone();
            let chunks = chunks.clone();
            tokio::task::spawn_blocking(move || {
                let index = layer.index();
                let mut out = BytesMut::with_capacity((end - start) as usize);
                for (c, data) in chunks.into_iter().zip(data) {
                    out.extend_from_slice(&stored::rebuild(index, c, &data)?);
                }
                Some(out.freeze())
            })
            .await
        };
        let bytes = rebuilt
            .ok()
            .flatten()
            .filter(|b| b.len() as u64 == end - start)
            .ok_or_else(|| {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cannot rebuild the stored chunks here\n".to_owned(),
                )
            })?;
        let n = chunks.len() as u64;
        self.uploaded_bytes.fetch_add(bytes.len() as u64, Relaxed);
        self.uploaded_chunks.fetch_add(n, Relaxed);
        let mut l = lock(&self.ledger);
        let t = l.uploaded_to.entry(asker.to_owned()).or_default();
        t.bytes += bytes.len() as u64;
        t.chunks += n;
        for c in chunks {
            *l.chunk_uploads.entry((digest.clone(), c)).or_default() += 1;
        }
        Ok(bytes)
    }
}
