//! A node's part in P2P distribution: it serves the chunks of the layers it
//! has attached to the peers below it (`server.rs`), relaying through its own
//! fetcher (and so its own parent) what it does not hold yet, and it tells
//! the super node which blobs it holds, learning its ancestors per blob in
//! return (`client.rs`). The chunk sources `peer` and `supernode`
//! (`crate::source`) fetch through it and report back how the peers did.

mod client;
mod server;
mod stored;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::info;

pub use client::{RegistryBlob, SupernodeError};

use super::config::P2pConfig;
use super::{http, P2pError};
use crate::format::Index;
use crate::oci::LayerId;

/// What the peer server needs of a layer it serves: the blob's index, and
/// reads of the uncompressed image that fetch what is missing through the
/// node's own sources (`crate::layer::LazyLayer` is one).
#[async_trait]
pub trait ServedLayer: Send + Sync {
    /// The blob digest (its tree at the super node).
    fn digest(&self) -> &str;
    /// What the layer is (its anchor): a peer asks for a blob's chunks
    /// under the identity it reads, and is served only a layer of it.
    fn id(&self) -> &LayerId;
    fn index(&self) -> &Index;
    /// `size` image bytes at `offset`, fetched first if missing.
    async fn read(&self, offset: u64, size: u32) -> Result<Vec<u8>, String>;
}

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
    config: P2pConfig,
    token: Option<String>,
    client: reqwest::Client,
    advertised: String,
    /// By identity: one blob digest may be held with several anchors (other
    /// images' bytes under the same digest), each in the blob's one tree.
    layers: Mutex<HashMap<LayerId, Arc<dyn ServedLayer>>>,
    ancestors: Mutex<HashMap<String, Vec<String>>>,
    /// Peers not to ask until the given time (dead, slow or lying).
    shunned: Mutex<HashMap<String, Instant>>,
    ledger: Mutex<Ledger>,
    uploaded_bytes: AtomicU64,
    uploaded_chunks: AtomicU64,
    upload_requests: AtomicU64,
    upload_misses: AtomicU64,
    corrupt_from_peers: AtomicU64,
    peer_failures: AtomicU64,
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

    /// Serves `layer` to other peers and joins its blob's tree.
    pub async fn serve_layer(&self, layer: Arc<dyn ServedLayer>) {
        let digest = layer.digest().to_owned();
        lock(&self.layers).insert(layer.id().clone(), layer);
        self.announce(&digest).await;
    }

    /// Stops serving the layer; leaves its blob's tree unless another layer
    /// of the blob is still served.
    pub async fn forget_layer(&self, id: &LayerId) {
        let digest = {
            let mut layers = lock(&self.layers);
            let Some(layer) = layers.remove(id) else {
                return;
            };
            let digest = layer.digest().to_owned();
            if layers.values().any(|l| l.digest() == digest) {
                return;
            }
            digest
        };
        lock(&self.ancestors).remove(&digest);
        self.leave(&digest).await;
    }

    /// Leaves every tree and stops the server.
    pub async fn shutdown(&self) {
        let ids: Vec<LayerId> = lock(&self.layers).keys().cloned().collect();
        for id in ids {
            self.forget_layer(&id).await;
        }
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }

    /// Whether this node serves a layer of blob `digest` (attached here, so
    /// the node has a place in the blob's tree).
    pub fn serves(&self, digest: &str) -> bool {
        lock(&self.layers).values().any(|l| l.digest() == digest)
    }

    /// The ancestors worth asking now, parent first.
    pub fn ancestors(&self, digest: &str) -> Vec<String> {
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

    /// A request to `peer` failed or timed out: counted, and the peer is not
    /// asked for `shun` (the next ancestor is).
    pub fn peer_failed(&self, peer: &str, shun: Duration) {
        self.peer_failures.fetch_add(1, Relaxed);
        self.shun(peer, shun);
    }

    /// `peer` sent bytes that failed verification: counted, and the peer is
    /// not asked for `shun`.
    pub fn peer_lied(&self, peer: &str, shun: Duration) {
        self.corrupt_from_peers.fetch_add(1, Relaxed);
        self.shun(peer, shun);
    }

    /// `peer` sent `bytes` that verified as `chunks` chunks.
    pub fn record_download(&self, peer: &str, bytes: u64, chunks: u64) {
        let mut l = lock(&self.ledger);
        let t = l.downloaded_from.entry(peer.to_owned()).or_default();
        t.bytes += bytes;
        t.chunks += chunks;
    }

    fn shun(&self, peer: &str, for_: Duration) {
        let mut s = lock(&self.shunned);
        let now = Instant::now();
        s.retain(|_, until| *until > now);
        s.insert(peer.to_owned(), now + for_);
    }

    /// The served layer `id` (of whichever blob with that content).
    fn layer(&self, id: &LayerId) -> Option<Arc<dyn ServedLayer>> {
        lock(&self.layers).get(id).cloned()
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
        let digests: std::collections::BTreeSet<String> = lock(&n.layers)
            .values()
            .map(|l| l.digest().to_owned())
            .collect();
        for d in digests {
            n.announce(&d).await;
        }
    }
}
