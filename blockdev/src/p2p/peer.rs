//! A node's part in P2P distribution: it serves the chunks of the layers it
//! has attached to the peers below it, relaying through its own fetcher (and
//! so its own parent) what it does not hold yet, and it tells the super node
//! which blobs it holds, learning its ancestors per blob in return.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::config::P2pConfig;
use super::http::{self, Body};
use super::wire::{header, path, query, AnnounceReply, MAX_RANGE};
use super::{stored, P2pError};
use crate::layer::LazyLayer;
use crate::oci::valid_digest;
use crate::trace::{Trace, MAX_TRACE_BYTES};

#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Transfer {
    pub bytes: u64,
    pub chunks: u64,
}

#[derive(Default)]
struct Ledger {
    /// Uploads by the asking peer's advertised address.
    uploaded_to: BTreeMap<String, Transfer>,
    /// Downloads by the serving peer's address (verified chunks only).
    downloaded_from: BTreeMap<String, Transfer>,
    /// How often each (blob, chunk) was uploaded.
    chunk_uploads: HashMap<(String, u64), u32>,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PeerStats {
    pub uploaded_bytes: u64,
    pub uploaded_chunks: u64,
    pub upload_requests: u64,
    /// Requests for blobs this node does not hold (the asker moved on).
    pub upload_misses: u64,
    /// The most copies of any one chunk this node uploaded.
    pub max_chunk_uploads: u32,
    pub uploaded_to: BTreeMap<String, Transfer>,
    pub downloaded_from: BTreeMap<String, Transfer>,
    /// Chunks from peers that failed verification (the peer is then skipped).
    pub corrupt_from_peers: u64,
    /// Peer requests that failed or timed out.
    pub peer_failures: u64,
    /// Current ancestors per blob, parent first.
    pub ancestors: BTreeMap<String, Vec<String>>,
}

pub struct PeerNode {
    pub(super) config: P2pConfig,
    pub(super) token: Option<String>,
    pub(super) client: reqwest::Client,
    advertised: String,
    layers: Mutex<HashMap<String, Arc<LazyLayer>>>,
    ancestors: Mutex<HashMap<String, Vec<String>>>,
    /// Peers not to ask until the given time (dead, slow or lying).
    shunned: Mutex<HashMap<String, Instant>>,
    ledger: Mutex<Ledger>,
    uploaded_bytes: AtomicU64,
    uploaded_chunks: AtomicU64,
    upload_requests: AtomicU64,
    upload_misses: AtomicU64,
    pub(super) corrupt_from_peers: AtomicU64,
    pub(super) peer_failures: AtomicU64,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    budget: http::ByteBudget,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PeerNode {
    /// Starts the peer server and the heartbeat; layers are added with
    /// [`serve_layer`](Self::serve_layer) once attached.
    pub async fn start(config: P2pConfig) -> Result<Arc<Self>, P2pError> {
        let security = config.security();
        let token = security.token()?;
        let client = http::client(&security)?;
        let tls = match &security.tls {
            Some(t) => Some(http::server_tls(t)?),
            None => None,
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| P2pError::Io {
                what: format!("binding the peer server to {}", config.listen),
                source,
            })?;
        let node = Arc::new(PeerNode {
            advertised: config.advertised(),
            config,
            token,
            client,
            layers: Mutex::default(),
            ancestors: Mutex::default(),
            shunned: Mutex::default(),
            ledger: Mutex::default(),
            uploaded_bytes: AtomicU64::new(0),
            uploaded_chunks: AtomicU64::new(0),
            upload_requests: AtomicU64::new(0),
            upload_misses: AtomicU64::new(0),
            corrupt_from_peers: AtomicU64::new(0),
            peer_failures: AtomicU64::new(0),
            tasks: Mutex::default(),
            budget: http::ByteBudget::new(http::DEFAULT_BUDGET),
        });
        let me = node.clone();
        let handler: http::Handler = Arc::new(move |req, remote| {
            let me = me.clone();
            Box::pin(async move { me.handle(req, remote).await })
        });
        info!(
            "peer server on {} (advertised as {}), super node {}",
            node.config.listen, node.advertised, node.config.supernode
        );
        let server = tokio::spawn(http::serve(listener, tls, handler));
        let heartbeat = tokio::spawn(heartbeat(Arc::downgrade(&node)));
        lock(&node.tasks).extend([server, heartbeat]);
        Ok(node)
    }

    pub fn advertised(&self) -> &str {
        &self.advertised
    }

    pub(super) fn scheme(&self) -> &'static str {
        if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Serves `layer` to other peers and joins its blob's tree.
    pub async fn serve_layer(&self, layer: Arc<LazyLayer>) {
        let digest = layer.digest().to_owned();
        lock(&self.layers).insert(digest.clone(), layer);
        self.announce(&digest).await;
    }

    /// Stops serving the blob and leaves its tree.
    pub async fn forget_layer(&self, digest: &str) {
        lock(&self.layers).remove(digest);
        lock(&self.ancestors).remove(digest);
        let url = format!("{}{}", self.config.supernode, path::LEAVE);
        let _ = self
            .authed(self.client.post(url))
            .query(&[(query::BLOB, digest), (query::ADDR, &self.advertised)])
            .timeout(self.config.supernode_timeout())
            .send()
            .await;
    }

    /// Sends a startup trace to the super node (see p2p::traces).
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
        if r.status() == reqwest::StatusCode::NOT_FOUND {
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

    /// Leaves every tree and stops the server.
    pub async fn shutdown(&self) {
        let digests: Vec<String> = lock(&self.layers).keys().cloned().collect();
        for d in digests {
            self.forget_layer(&d).await;
        }
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }

    pub(super) fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.header(header::TOKEN, t),
            None => rb,
        }
    }

    async fn announce(&self, digest: &str) {
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

    /// The ancestors worth asking now, parent first.
    pub(super) fn ancestors(&self, digest: &str) -> Vec<String> {
        let chain = lock(&self.ancestors)
            .get(digest)
            .cloned()
            .unwrap_or_default();
        let now = Instant::now();
        let shunned = lock(&self.shunned);
        chain
            .into_iter()
            .filter(|a| shunned.get(a).is_none_or(|until| *until <= now))
            .collect()
    }

    pub(super) fn shun(&self, peer: &str, for_: Duration) {
        let mut s = lock(&self.shunned);
        let now = Instant::now();
        s.retain(|_, until| *until > now);
        s.insert(peer.to_owned(), now + for_);
    }

    pub(super) fn layer(&self, digest: &str) -> Option<Arc<LazyLayer>> {
        lock(&self.layers).get(digest).cloned()
    }

    pub(super) fn record_download(&self, peer: &str, bytes: u64, chunks: u64) {
        let mut l = lock(&self.ledger);
        let t = l.downloaded_from.entry(peer.to_owned()).or_default();
        t.bytes += bytes;
        t.chunks += chunks;
    }

    pub fn stats(&self) -> PeerStats {
        let l = lock(&self.ledger);
        PeerStats {
            uploaded_bytes: self.uploaded_bytes.load(Relaxed),
            uploaded_chunks: self.uploaded_chunks.load(Relaxed),
            upload_requests: self.upload_requests.load(Relaxed),
            upload_misses: self.upload_misses.load(Relaxed),
            max_chunk_uploads: l.chunk_uploads.values().copied().max().unwrap_or(0),
            uploaded_to: l.uploaded_to.clone(),
            downloaded_from: l.downloaded_from.clone(),
            corrupt_from_peers: self.corrupt_from_peers.load(Relaxed),
            peer_failures: self.peer_failures.load(Relaxed),
            ancestors: lock(&self.ancestors)
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, remote: SocketAddr) -> Response<Body> {
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
        self.upload_requests.fetch_add(1, Relaxed);
        let Some(layer) = self.layer(digest) else {
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
pub(super) fn chunks_exactly(
    index: &crate::format::Index,
    start: u64,
    end: u64,
) -> Option<std::ops::Range<u64>> {
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

/// Re-announces every held blob each heartbeat; ends with the node.
async fn heartbeat(node: std::sync::Weak<PeerNode>) {
    loop {
        let every = match node.upgrade() {
            Some(n) => n.config.heartbeat(),
            None => return,
        };
        tokio::time::sleep(every).await;
        let Some(n) = node.upgrade() else { return };
        let digests: Vec<String> = lock(&n.layers).keys().cloned().collect();
        for d in digests {
            n.announce(&d).await;
        }
    }
}
