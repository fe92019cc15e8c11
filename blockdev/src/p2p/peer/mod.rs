//! A node's part in P2P distribution: it serves the chunks of the layers it
//! has attached to the peers below it that hold a ticket for them
//! (`server.rs`), relaying through its own fetcher (and so its own parent)
//! what it does not hold yet, and it tells the super node which layers it
//! holds, learning its ancestors and getting its own tickets per layer in
//! return (`client.rs`). The chunk sources `peer` and `supernode`
//! (`crate::source`) fetch through it and report back how the peers did.

mod client;
mod keys;
mod ledger;
mod server;
mod stored;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::info;

pub use client::{RegistryBlob, SupernodeError};
pub use ledger::Transfer;

use super::config::P2pConfig;
use super::http::{self, ServerCounters};
use super::wire::BlobId;
use super::P2pError;
use crate::format::{sha256, Index};
use crate::oci::LayerId;
use ledger::Ledger;

/// What the peer server needs of a layer it serves: the blob's index, and
/// its chunks as stored, fetched first through the node's own sources when
/// missing (`crate::layer::LazyLayer` is one).
#[async_trait]
pub trait ServedLayer: Send + Sync {
    /// The blob digest.
    fn digest(&self) -> &str;
    fn index(&self) -> &Index;
    /// Makes `chunks` present, fetching the missing ones.
    async fn ensure(&self, chunks: &[u64]) -> Result<(), String>;
    /// The stored bytes of present chunk `chunk` as the blob holds them;
    /// `None` when this node did not keep them (its cache predates P2P).
    fn stored(&self, chunk: u64) -> Result<Option<Vec<u8>>, String>;
    /// The uncompressed bytes of present chunk `chunk`.
    fn image_chunk(&self, chunk: u64) -> Result<Vec<u8>, String>;
    /// The layer's anchor: `sha256:` of its index bytes.
    fn anchor(&self) -> String {
        format!("sha256:{}", hex::encode(sha256(&self.index().to_bytes())))
    }
}

/// Aggregate counters, what `/v1/stats` shows anyone with the token: no
/// digests, no addresses.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PeerCounters {
    pub uploaded_bytes: u64,
    pub uploaded_chunks: u64,
    pub upload_requests: u64,
    /// Requests for layers this node does not hold (the asker moved on).
    pub upload_misses: u64,
    /// Requests refused for a missing, bad or foreign ticket.
    pub refused_tickets: u64,
    /// Chunks sent as their kept stored bytes, and rebuilt from the image
    /// (a cache from before this node kept stored bytes).
    pub stored_chunks_sent: u64,
    pub rebuilt_chunks_sent: u64,
    /// The most copies of any one chunk this node uploaded.
    pub max_chunk_uploads: u32,
    /// Chunks from peers that failed verification (the peer is then skipped).
    pub corrupt_from_peers: u64,
    /// Peer requests that failed or timed out.
    pub peer_failures: u64,
    pub layers_served: u64,
    pub refused_connections: u64,
    pub slow_readers_dropped: u64,
}

/// Everything, for the node's own operator (control socket, metrics).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PeerStats {
    #[serde(flatten)]
    pub counters: PeerCounters,
    /// This node's address in the trees, as the super node verified it.
    pub member: Option<String>,
    /// By the holder of the asker's ticket (at most [`ledger::MAX_PEERS`],
    /// then `other`).
    pub uploaded_to: BTreeMap<String, Transfer>,
    /// By the serving peer's address (verified chunks only).
    pub downloaded_from: BTreeMap<String, Transfer>,
    /// Current ancestors per layer (`digest` or `digest@anchor`), parent first.
    pub ancestors: BTreeMap<String, Vec<String>>,
}

/// One layer this node serves, and its place in the layer's tree.
struct Served {
    layer: Arc<dyn ServedLayer>,
    origin: RegistryBlob,
    /// Uploads of each chunk.
    uploads: Vec<AtomicU32>,
    tree: Mutex<TreeState>,
}

#[derive(Default)]
struct TreeState {
    ancestors: Vec<String>,
    /// This node's ticket for the layer, shown to its ancestors.
    ticket: Option<String>,
}

#[derive(Default)]
struct Counters {
    uploaded_bytes: AtomicU64,
    uploaded_chunks: AtomicU64,
    upload_requests: AtomicU64,
    upload_misses: AtomicU64,
    refused_tickets: AtomicU64,
    stored_chunks_sent: AtomicU64,
    rebuilt_chunks_sent: AtomicU64,
    max_chunk_uploads: AtomicU32,
    corrupt_from_peers: AtomicU64,
    peer_failures: AtomicU64,
}

pub struct PeerNode {
    config: P2pConfig,
    token: Option<String>,
    client: reqwest::Client,
    advertised: String,
    member: Mutex<Option<String>>,
    layers: Mutex<HashMap<BlobId, Arc<Served>>>,
    /// Peers not to ask until the given time (dead, slow or lying).
    shunned: Mutex<HashMap<String, Instant>>,
    ledger: Mutex<Ledger>,
    keys: keys::Keys,
    counters: Counters,
    server: Arc<ServerCounters>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    budget: http::ByteBudget,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Most peers remembered as shunned (their addresses come from the trees).
const MAX_SHUNNED: usize = 4096;

impl PeerNode {
    /// Starts the peer server and the heartbeat; layers are added with
    /// [`serve_layer`](Self::serve_layer) once attached. Refuses a server off
    /// loopback without TLS and a token unless `allow_insecure` says so.
    pub async fn start(config: P2pConfig) -> Result<Arc<Self>, P2pError> {
        let security = config.security();
        let token = security.token()?;
        security.check_listener("the P2P peer server", config.listen, token.as_deref())?;
        let client = http::client(&security)?;
        let tls = match &security.tls {
            Some(t) => Some(http::server_tls(t)?),
            None => None,
        };
        let keys = keys::Keys::new(config.ticket_keys_file.as_deref())?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| P2pError::Io {
                what: format!("binding the peer server to {}", config.listen),
                source,
            })?;
        let node = Arc::new(PeerNode {
            advertised: config.advertised(),
            budget: http::ByteBudget::new(config.response_budget()),
            config,
            token,
            client,
            member: Mutex::default(),
            layers: Mutex::default(),
            shunned: Mutex::default(),
            ledger: Mutex::default(),
            keys,
            counters: Counters::default(),
            server: Arc::default(),
            tasks: Mutex::default(),
        });
        if node.keys.is_empty() {
            // Not fatal: the heartbeat tries again; until then nothing is
            // served (no ticket can be checked).
            if let Err(e) = node.refresh_keys().await {
                tracing::warn!("ticket keys from the super node: {e}; retrying every heartbeat");
            }
        }
        let me = node.clone();
        let handler: http::Handler = Arc::new(move |req, remote| {
            let me = me.clone();
            Box::pin(async move { me.handle(req, remote).await })
        });
        info!(
            "peer server on {} (advertised as {}), super node {}",
            node.config.listen, node.advertised, node.config.supernode
        );
        let server = tokio::spawn(http::serve(
            listener,
            tls,
            handler,
            http::Limits::default(),
            node.server.clone(),
        ));
        let heartbeat = tokio::spawn(heartbeat(Arc::downgrade(&node)));
        lock(&node.tasks).extend([server, heartbeat]);
        Ok(node)
    }

    pub fn advertised(&self) -> &str {
        &self.advertised
    }

    /// Serves `layer` (fetched from `origin`) to the peers that hold a
    /// ticket for it and joins its tree.
    pub async fn serve_layer(&self, layer: Arc<dyn ServedLayer>, origin: RegistryBlob) {
        let for_anchor = layer.clone();
        let anchor = tokio::task::spawn_blocking(move || for_anchor.anchor())
            .await
            .unwrap_or_default();
        let id = BlobId::new(layer.digest(), &anchor);
        let uploads = (0..layer.index().chunk_count())
            .map(|_| AtomicU32::new(0))
            .collect();
        let served = Arc::new(Served {
            layer,
            origin,
            uploads,
            tree: Mutex::default(),
        });
        lock(&self.layers).insert(id.clone(), served.clone());
        self.announce(&id, &served).await;
    }

    /// Stops serving layer `id` and leaves its tree.
    pub async fn forget_layer(&self, id: &LayerId) {
        let gone: Vec<BlobId> = {
            let mut layers = lock(&self.layers);
            let ids: Vec<BlobId> = layers
                .keys()
                .filter(|k| match (id.anchor(), id.unanchored_blob()) {
                    (Some(anchor), _) => k.anchor == anchor,
                    (None, Some(blob)) => k.digest == blob,
                    (None, None) => false,
                })
                .cloned()
                .collect();
            for k in &ids {
                layers.remove(k);
            }
            ids
        };
        for k in gone {
            self.leave(&k).await;
        }
    }

    /// Leaves every tree and stops the server.
    pub async fn shutdown(&self) {
        let all: Vec<BlobId> = lock(&self.layers).drain().map(|(k, _)| k).collect();
        for k in all {
            self.leave(&k).await;
        }
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }

    /// The layer this node serves for blob `digest` (with `anchor` when the
    /// caller knows it; without, only if exactly one layer has the digest).
    pub fn resolve(&self, digest: &str, anchor: Option<&str>) -> Option<BlobId> {
        let layers = lock(&self.layers);
        if let Some(a) = anchor {
            let id = BlobId::new(digest, a);
            return layers.contains_key(&id).then_some(id);
        }
        let mut matching = layers.keys().filter(|k| k.digest == digest);
        match (matching.next(), matching.next()) {
            (Some(id), None) => Some(id.clone()),
            _ => None,
        }
    }

    /// The ancestors worth asking now for layer `id`, parent first.
    pub fn ancestors(&self, id: &BlobId) -> Vec<String> {
        let chain = match self.served(id) {
            Some(s) => lock(&s.tree).ancestors.clone(),
            None => return Vec::new(),
        };
        let now = Instant::now();
        let shunned = lock(&self.shunned);
        chain
            .into_iter()
            .filter(|a| shunned.get(a).is_none_or(|until| *until <= now))
            .collect()
    }

    /// A request to `peer` failed or timed out: counted, and the peer is not
    /// asked for `shun` (the next ancestor is).
    pub fn peer_failed(&self, peer: &str, shun: Duration) {
        self.counters.peer_failures.fetch_add(1, Relaxed);
        self.shun(peer, shun);
    }

    /// `peer` sent bytes that failed verification: counted, and the peer is
    /// not asked for `shun`.
    pub fn peer_lied(&self, peer: &str, shun: Duration) {
        self.counters.corrupt_from_peers.fetch_add(1, Relaxed);
        self.shun(peer, shun);
    }

    /// `peer` sent `bytes` that verified as `chunks` chunks.
    pub fn record_download(&self, peer: &str, bytes: u64, chunks: u64) {
        lock(&self.ledger).downloaded(peer, bytes, chunks);
    }

    fn shun(&self, peer: &str, for_: Duration) {
        let mut s = lock(&self.shunned);
        let now = Instant::now();
        s.retain(|_, until| *until > now);
        if s.len() < MAX_SHUNNED {
            s.insert(peer.to_owned(), now + for_);
        }
    }

    fn served(&self, id: &BlobId) -> Option<Arc<Served>> {
        lock(&self.layers).get(id).cloned()
    }

    pub fn counters(&self) -> PeerCounters {
        let c = &self.counters;
        PeerCounters {
            uploaded_bytes: c.uploaded_bytes.load(Relaxed),
            uploaded_chunks: c.uploaded_chunks.load(Relaxed),
            upload_requests: c.upload_requests.load(Relaxed),
            upload_misses: c.upload_misses.load(Relaxed),
            refused_tickets: c.refused_tickets.load(Relaxed),
            stored_chunks_sent: c.stored_chunks_sent.load(Relaxed),
            rebuilt_chunks_sent: c.rebuilt_chunks_sent.load(Relaxed),
            max_chunk_uploads: c.max_chunk_uploads.load(Relaxed),
            corrupt_from_peers: c.corrupt_from_peers.load(Relaxed),
            peer_failures: c.peer_failures.load(Relaxed),
            layers_served: lock(&self.layers).len() as u64,
            refused_connections: self.server.refused_connections.load(Relaxed),
            slow_readers_dropped: self.server.slow_readers_dropped.load(Relaxed),
        }
    }

    pub fn stats(&self) -> PeerStats {
        let (uploaded_to, downloaded_from) = {
            let l = lock(&self.ledger);
            (l.uploaded_to.clone(), l.downloaded_from.clone())
        };
        let ancestors = lock(&self.layers)
            .iter()
            .map(|(id, s)| {
                let name = if id.anchor.is_empty() {
                    id.digest.clone()
                } else {
                    format!("{}@{}", id.digest, id.anchor)
                };
                (name, lock(&s.tree).ancestors.clone())
            })
            .collect();
        PeerStats {
            counters: self.counters(),
            member: lock(&self.member).clone(),
            uploaded_to,
            downloaded_from,
            ancestors,
        }
    }
}

/// Re-announces every held layer each heartbeat (refreshing its ticket);
/// fetches the ticket keys while it has none; ends with the node.
async fn heartbeat(node: std::sync::Weak<PeerNode>) {
    loop {
        let every = match node.upgrade() {
            Some(n) => n.config.heartbeat(),
            None => return,
        };
        tokio::time::sleep(every).await;
        let Some(n) = node.upgrade() else { return };
        if n.keys.is_empty() {
            if let Err(e) = n.refresh_keys().await {
                tracing::warn!("ticket keys from the super node: {e}");
            }
        }
        let layers: Vec<(BlobId, Arc<Served>)> = lock(&n.layers)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, served) in layers {
            n.announce(&id, &served).await;
        }
    }
}
