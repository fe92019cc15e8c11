//! The peer server: serves the stored bytes of whole chunks of the blobs
//! this node holds to the peers below it, fetching through the node's own
//! sources what it does not hold yet (a child is never sent away).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tracing::debug;

use super::{lock, stored, PeerNode};
use crate::format::Index;
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
        let chunks = chunks_exactly(layer.index(), start, end)
            .ok_or_else(|| bad("range is not a run of whole chunks"))?;
        let image = layer.index().image_range(chunks.start).start
            ..layer.index().image_range(chunks.end - 1).end;
        // The decoded chunks and their rebuilt stored form, both in memory.
        let _room = self
            .budget
            .reserve(
                image.end - image.start + (end - start),
                self.config.peer_timeout(),
            )
            .await
            .ok_or_else(|| (StatusCode::SERVICE_UNAVAILABLE, "busy\n".to_owned()))?;
        let data = layer
            .read(image.start, (image.end - image.start) as u32)
            .await
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")))?;
        let rebuilt = {
            let layer = layer.clone();
            let chunks = chunks.clone();
            tokio::task::spawn_blocking(move || {
                let index = layer.index();
                let mut out = BytesMut::with_capacity((end - start) as usize);
                for c in chunks {
                    let r = index.image_range(c);
                    let at = (r.start - image.start) as usize..(r.end - image.start) as usize;
                    out.extend_from_slice(&stored::rebuild(index, c, &data[at])?);
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
        let n = chunks.end - chunks.start;
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

/// The chunks whose stored bytes are exactly `start..end`.
fn chunks_exactly(index: &Index, start: u64, end: u64) -> Option<Range<u64>> {
    let first = index.chunks.partition_point(|e| e.offset < start);
    let entry = index.chunks.get(first)?;
    if entry.offset != start {
        return None;
    }
    let mut last = first;
    while index.chunks[last].stored_range().end < end {
        last += 1;
        if last >= index.chunks.len() {
            return None;
        }
    }
    (index.chunks[last].stored_range().end == end).then_some(first as u64..last as u64 + 1)
}
