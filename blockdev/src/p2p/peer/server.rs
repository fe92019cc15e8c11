//! The peer server: serves whole chunks of the layers this node holds, as
//! the blob stores them, to the holders of tickets for them, fetching
//! through the node's own sources what it does not hold yet (a child is
//! never sent away). A request reads top to bottom: token, ticket, layer,
//! range, fetch, room in the budget, then the bytes streamed piece by piece.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, StreamExt};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tracing::debug;

use super::{lock, stored, PeerNode, Served};
use crate::p2p::http::{self, Body};
use crate::p2p::ticket::MAX_TICKET_LEN;
use crate::p2p::wire::{header, path, query, BlobId, MAX_RANGE};

/// Stored bytes read from the cache at once; at most [`PIECES_AHEAD`] are
/// held per response besides the one being written.
const PIECE: u64 = 1 << 20;
const PIECES_AHEAD: usize = 2;

type Refusal = (StatusCode, String);

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
            (&Method::GET, path::BLOB) => match self.upload(&req, remote).await {
                Ok(r) => r,
                Err((status, msg)) => {
                    debug!("upload to {remote}: {msg}");
                    http::respond(status, format!("{msg}\n"))
                }
            },
            (&Method::GET, path::STATS) => http::json(&self.counters()),
            _ => http::respond(StatusCode::NOT_FOUND, "no such endpoint\n"),
        }
    }

    /// The stored bytes of whole chunks `start..end` of a layer, for the
    /// holder of a ticket for it.
    async fn upload(
        self: &Arc<Self>,
        req: &Request<Incoming>,
        remote: SocketAddr,
    ) -> Result<Response<Body>, Refusal> {
        let bad = |m: &str| (StatusCode::BAD_REQUEST, m.to_owned());
        let q = http::query(req);
        let id = BlobId::new(
            q.get(query::DIGEST).map_or("", |s| s),
            q.get(query::ANCHOR).map_or("", |s| s),
        );
        if !id.is_valid() {
            return Err(bad("bad digest or anchor"));
        }
        let ticket = req
            .headers()
            .get(header::TICKET)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= MAX_TICKET_LEN)
            .unwrap_or("");
        let claims = match self.check_ticket(ticket, &id, remote.ip()).await {
            Ok(c) => c,
            Err(e) => {
                self.counters.refused_tickets.fetch_add(1, Relaxed);
                return Err((StatusCode::FORBIDDEN, format!("{e}")));
            }
        };
        let (start, end) = range(&q)?;
        self.counters.upload_requests.fetch_add(1, Relaxed);
        let Some(served) = self.served(&id) else {
            self.counters.upload_misses.fetch_add(1, Relaxed);
            return Err((StatusCode::NOT_FOUND, "layer not held here".into()));
        };
        let index = served.layer.index();
        let chunks = index
            .chunks_in_blob_range(start, end)
            .ok_or_else(|| bad("range is not a run of whole chunks"))?;
        served
            .layer
            .ensure(&chunks)
            .await
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e))?;
        let len = end - start;
        let room = self
            .budget
            .reserve(
                len.min(PIECE * (PIECES_AHEAD as u64 + 1)),
                self.config.peer_timeout(),
            )
            .await
            .ok_or_else(|| (StatusCode::SERVICE_UNAVAILABLE, "busy".to_owned()))?;
        self.count_upload(&served, &chunks, &claims.holder, len);
        let pieces = pieces(index, &chunks);
        let node = self.clone();
        let body = stream::iter(pieces)
            .map(move |piece| {
                let (served, node) = (served.clone(), node.clone());
                async move {
                    tokio::task::spawn_blocking(move || read_piece(&served, &piece, &node.counters))
                        .await
                        .map_err(std::io::Error::other)?
                }
            })
            .buffered(PIECES_AHEAD);
        Ok(http::streamed(len, body, Some(room)))
    }

    fn count_upload(&self, served: &Served, chunks: &[u64], holder: &str, bytes: u64) {
        let c = &self.counters;
        c.uploaded_bytes.fetch_add(bytes, Relaxed);
        c.uploaded_chunks.fetch_add(chunks.len() as u64, Relaxed);
        for &chunk in chunks {
            if let Some(n) = served.uploads.get(chunk as usize) {
                let now = n.fetch_add(1, Relaxed).saturating_add(1);
                c.max_chunk_uploads.fetch_max(now, Relaxed);
            }
        }
        lock(&self.ledger).uploaded(holder, bytes, chunks.len() as u64);
    }
}

fn range(q: &HashMap<String, String>) -> Result<(u64, u64), Refusal> {
    let num = |k: &str| -> Result<u64, Refusal> {
        q.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| (StatusCode::BAD_REQUEST, format!("bad {k}")))
    };
    let (start, end) = (num(query::START)?, num(query::END)?);
    if !(start < end && end - start <= MAX_RANGE) {
        return Err((StatusCode::BAD_REQUEST, "bad range".into()));
    }
    Ok((start, end))
}

/// `chunks` (adjacent, in blob order) cut into pieces of at most [`PIECE`]
/// stored bytes (a larger chunk is a piece of its own).
fn pieces(index: &crate::format::Index, chunks: &[u64]) -> Vec<Vec<u64>> {
    let mut out: Vec<Vec<u64>> = Vec::new();
    let mut size = 0u64;
    for &c in chunks {
        let len = u64::from(index.chunks[c as usize].stored_len);
        match out.last_mut() {
            Some(p) if size + len <= PIECE => {
                p.push(c);
                size += len;
            }
            _ => {
                out.push(vec![c]);
                size = len;
            }
        }
    }
    out
}

/// The stored bytes of `piece`: kept ones as they are, the others rebuilt
/// from the image (a cache from before this node kept them). An error cuts
/// the answer short, which the asker sees and takes elsewhere.
fn read_piece(
    served: &Served,
    piece: &[u64],
    sent: &super::Counters,
) -> Result<Bytes, std::io::Error> {
    let index = served.layer.index();
    let mut out = BytesMut::new();
    for &c in piece {
        let bytes = match served.layer.stored(c).map_err(std::io::Error::other)? {
            Some(b) => {
                sent.stored_chunks_sent.fetch_add(1, Relaxed);
                b
            }
            None => {
                let data = served.layer.image_chunk(c).map_err(std::io::Error::other)?;
                let b = stored::rebuild(index, c, &data).ok_or_else(|| {
                    std::io::Error::other(format!("chunk {c}: cannot rebuild its stored bytes"))
                })?;
                sent.rebuilt_chunks_sent.fetch_add(1, Relaxed);
                b
            }
        };
        out.extend_from_slice(&bytes);
    }
    Ok(out.freeze())
}
