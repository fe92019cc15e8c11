//! `lazybd-supernode`: the root of distribution in a datacenter. It serves
//! byte ranges of registry blobs out of a bounded block cache, fetching each
//! block from the registry once however many ask at once, with the asking
//! client's own registry credentials; and it keeps the per-blob peer trees.
//!
//! Privacy: a cached block is only handed to a caller whose credentials the
//! registry accepted for that blob recently (a one-byte probe with them,
//! remembered for `auth_ttl`), so the cache never widens access.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tracing::{info, warn};

mod block_cache;
pub mod flight;
pub mod traces;
pub mod tree;

use block_cache::{BlockCache, BlockKey, CacheUsage};
use flight::SingleFlight;
use traces::TraceStore;
use tree::Membership;

use super::config::Security;
use super::http::{self, Body};
use super::wire::{auth_from_header, header, path, query, AnnounceReply, MAX_RANGE};
use super::P2pError;
use crate::oci::valid_digest;
use crate::registry::{RegistryClient, RegistryOptions};

const MAX_CLIENTS: usize = 256;
const MAX_AUTH_ENTRIES: usize = 4096;

#[derive(Debug, Clone)]
pub struct SupernodeConfig {
    pub listen: SocketAddr,
    /// Registries (`host:port`) it fetches from; anything else is refused.
    pub registries: Vec<String>,
    pub plain_http: bool,
    pub cache_dir: PathBuf,
    pub cache_capacity: u64,
    pub block_size: u64,
    pub fanout: usize,
    /// A peer not heard from for this long leaves the trees.
    pub member_ttl: Duration,
    /// How long a registry's "yes" to a client's credentials is trusted.
    pub auth_ttl: Duration,
    /// Longest wait for one block from the registry.
    pub registry_timeout: Duration,
    pub max_blobs: usize,
    pub security: Security,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct SupernodeCounters {
    pub served_requests: AtomicU64,
    pub served_bytes: AtomicU64,
    pub block_hits: AtomicU64,
    pub block_misses: AtomicU64,
    pub registry_requests: AtomicU64,
    pub registry_bytes: AtomicU64,
    pub registry_errors: AtomicU64,
    pub auth_probes: AtomicU64,
    pub auth_denied: AtomicU64,
    pub announces: AtomicU64,
    pub traces_stored: AtomicU64,
    pub traces_served: AtomicU64,
}

#[derive(serde::Serialize)]
struct StatsReply<'a> {
    #[serde(flatten)]
    counters: &'a SupernodeCounters,
    cache: CacheUsage,
}

type BlockResult = Result<Bytes, (bool, String)>;
/// Registry, repository, sha256 of the credentials header.
type ClientKey = (String, String, [u8; 32]);
/// Registry, repository, blob digest, sha256 of the credentials header.
type AuthKey = (String, String, String, [u8; 32]);

pub struct Supernode {
    config: SupernodeConfig,
    token: Option<String>,
    cache: Arc<BlockCache>,
    flights: Arc<SingleFlight<BlockKey, BlockResult>>,
    clients: Mutex<HashMap<ClientKey, Arc<RegistryClient>>>,
    /// When the registry last accepted these credentials for this blob.
    authorized: Mutex<HashMap<AuthKey, Instant>>,
    membership: Mutex<Membership>,
    budget: http::ByteBudget,
    traces: TraceStore,
    pub counters: Arc<SupernodeCounters>,
}

impl Supernode {
    pub fn new(config: SupernodeConfig) -> Result<Arc<Self>, P2pError> {
        let cache = Arc::new(BlockCache::open(
            &config.cache_dir.join("blocks"),
            config.cache_capacity,
        )?);
        let token = config.security.token()?;
        let traces_dir = config.cache_dir.join("traces");
        let traces = TraceStore::open(&traces_dir).map_err(|source| P2pError::Io {
            what: format!("creating {}", traces_dir.display()),
            source,
        })?;
        Ok(Arc::new(Supernode {
            traces,
            membership: Mutex::new(Membership::new(
                config.fanout,
                config.member_ttl,
                config.max_blobs,
            )),
            token,
            cache,
            budget: http::ByteBudget::new(http::DEFAULT_BUDGET),
            flights: Arc::default(),
            clients: Mutex::default(),
            authorized: Mutex::default(),
            counters: Arc::default(),
            config,
        }))
    }

    /// Binds and serves until the returned task is aborted.
    pub async fn start(
        self: &Arc<Self>,
    ) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), P2pError> {
        let listener = TcpListener::bind(self.config.listen)
            .await
            .map_err(|source| P2pError::Io {
                what: format!("binding {}", self.config.listen),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| P2pError::Io {
            what: "local address".into(),
            source,
        })?;
        let tls = match &self.config.security.tls {
            Some(t) => Some(http::server_tls(t)?),
            None => None,
        };
        let me = self.clone();
        let handler: http::Handler = Arc::new(move |req, remote| {
            let me = me.clone();
            Box::pin(async move { me.handle(req, remote).await })
        });
        info!(
            "super node listening on {addr}{} for registries {:?}",
            if tls.is_some() { " (TLS)" } else { "" },
            self.config.registries
        );
        Ok((addr, tokio::spawn(http::serve(listener, tls, handler))))
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        _remote: SocketAddr,
    ) -> Response<Body> {
        if req.uri().path() == path::HEALTHZ {
            return http::respond(StatusCode::OK, "ok\n");
        }
        if !http::token_ok(&req, self.token.as_deref()) {
            return http::respond(StatusCode::UNAUTHORIZED, "cluster token missing or wrong\n");
        }
        let q = http::query(&req);
        match (req.method(), req.uri().path()) {
            (&Method::GET, path::BLOB) => {
                let auth = req
                    .headers()
                    .get(header::REGISTRY_AUTH)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                match self.blob(&q, &auth).await {
                    Ok(b) => {
                        self.counters.served_requests.fetch_add(1, Relaxed);
                        self.counters
                            .served_bytes
                            .fetch_add(b.len() as u64, Relaxed);
                        http::respond(StatusCode::OK, b)
                    }
                    Err((status, msg)) => {
                        warn!("blob request {q:?}: {msg}");
                        http::respond(status, msg)
                    }
                }
            }
            (&Method::POST, path::ANNOUNCE) => {
                let (Some(blob), Some(addr)) = (q.get(query::BLOB), q.get(query::ADDR)) else {
                    return http::respond(StatusCode::BAD_REQUEST, "blob and addr required\n");
                };
                if !valid_digest(blob) || addr.len() > 256 {
                    return http::respond(StatusCode::BAD_REQUEST, "bad blob or addr\n");
                }
                self.counters.announces.fetch_add(1, Relaxed);
                let ancestors = self
                    .membership
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .announce(blob, addr, Instant::now())
                    .unwrap_or_default();
                http::json(&AnnounceReply {
                    ancestors,
                    heartbeat_ms: (self.config.member_ttl.as_millis() / 3) as u64,
                })
            }
            (&Method::POST, path::LEAVE) => {
                if let (Some(blob), Some(addr)) = (q.get(query::BLOB), q.get(query::ADDR)) {
                    self.membership
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .leave(blob, addr);
                }
                http::respond(StatusCode::OK, "")
            }
            (&Method::GET, path::TRACE) => {
                let (status, body) = self.traces.get(q.get(query::KEY).map_or("", |k| k)).await;
                if status.is_success() {
                    self.counters.traces_served.fetch_add(1, Relaxed);
                }
                http::respond(status, body)
            }
            (&Method::PUT, path::TRACE) => {
                let key = q.get(query::KEY).cloned().unwrap_or_default();
                let (status, body) = self.traces.put(&key, req.into_body()).await;
                if status.is_success() {
                    self.counters.traces_stored.fetch_add(1, Relaxed);
                }
                http::respond(status, body)
            }
            (&Method::GET, path::STATS) => http::json(&StatsReply {
                counters: &self.counters,
                cache: self.cache.usage(),
            }),
            _ => http::respond(StatusCode::NOT_FOUND, "no such endpoint\n"),
        }
    }

    async fn blob(
        &self,
        q: &HashMap<String, String>,
        auth_header: &str,
    ) -> Result<Bytes, (StatusCode, String)> {
        let bad = |m: &str| (StatusCode::BAD_REQUEST, format!("{m}\n"));
        let get = |k: &str| q.get(k).ok_or_else(|| bad(&format!("missing {k}")));
        let num = |k: &str| -> Result<u64, (StatusCode, String)> {
            get(k)?.parse().map_err(|_| bad(&format!("bad {k}")))
        };
        let (registry, repo, digest) = (
            get(query::REGISTRY)?,
            get(query::REPO)?,
            get(query::DIGEST)?,
        );
        let (size, start, end) = (num(query::SIZE)?, num(query::START)?, num(query::END)?);
        if !self.config.registries.iter().any(|r| r == registry) {
            return Err((
                StatusCode::FORBIDDEN,
                format!("registry {registry} is not served here\n"),
            ));
        }
        if !valid_digest(digest) || repo.is_empty() || repo.len() > 256 {
            return Err(bad("bad digest or repo"));
        }
        if !(start < end && end <= size && end - start <= MAX_RANGE) {
            return Err(bad("bad range"));
        }
        let auth = auth_from_header(auth_header).map_err(|e| bad(&e))?;
        let _room = self
            .budget
            .reserve(end - start, self.config.registry_timeout)
            .await
            .ok_or_else(|| {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "busy, try again\n".to_owned(),
                )
            })?;
        let cred: [u8; 32] = Sha256::digest(auth_header.as_bytes()).into();
        let client = self.client(registry, repo, auth, cred)?;
        self.authorize(registry, repo, digest, cred, &client)
            .await?;

        let bs = self.config.block_size;
        let blocks = start / bs..end.div_ceil(bs);
        let parts = futures_util::future::join_all(blocks.clone().map(|b| {
            let key = BlockKey {
                registry: registry.clone(),
                repo: repo.clone(),
                digest: digest.clone(),
                size,
                block: b,
            };
            self.block(key, client.clone())
        }))
        .await;
        let mut out = BytesMut::with_capacity((end - start) as usize);
        for (b, part) in blocks.zip(parts) {
            let part = part.map_err(|(transient, msg)| {
                let status = if transient {
                    StatusCode::BAD_GATEWAY
                } else {
                    StatusCode::FORBIDDEN
                };
                (status, format!("{msg}\n"))
            })?;
            let block_start = b * bs;
            let from = start.max(block_start) - block_start;
            let to = end.min(block_start + part.len() as u64) - block_start;
            if from > to || to as usize > part.len() {
                return Err((StatusCode::BAD_GATEWAY, "short block\n".into()));
            }
            out.extend_from_slice(&part[from as usize..to as usize]);
        }
        Ok(out.freeze())
    }

    fn client(
        &self,
        registry: &str,
        repo: &str,
        auth: crate::registry::RegistryAuth,
        cred: [u8; 32],
    ) -> Result<Arc<RegistryClient>, (StatusCode, String)> {
        let key = (registry.to_owned(), repo.to_owned(), cred);
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let opts = RegistryOptions {
            plain_http: self.config.plain_http,
            read_timeout: self.config.registry_timeout,
            ..RegistryOptions::default()
        };
        let client = RegistryClient::with_auth(&format!("{registry}/{repo}"), &opts, auth)
            .map(Arc::new)
            .map_err(|e| (StatusCode::BAD_REQUEST, format!("{e}\n")))?;
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Passes when the registry recently let these credentials read this
    /// blob; else asks it (one byte) now.
    async fn authorize(
        &self,
        registry: &str,
        repo: &str,
        digest: &str,
        cred: [u8; 32],
        client: &RegistryClient,
    ) -> Result<(), (StatusCode, String)> {
        let key = (
            registry.to_owned(),
            repo.to_owned(),
            digest.to_owned(),
            cred,
        );
        let now = Instant::now();
        {
            let mut a = self.authorized.lock().unwrap_or_else(|e| e.into_inner());
            if a.get(&key)
                .is_some_and(|t| now.duration_since(*t) < self.config.auth_ttl)
            {
                return Ok(());
            }
            if a.len() >= MAX_AUTH_ENTRIES {
                let ttl = self.config.auth_ttl;
                a.retain(|_, t| now.duration_since(*t) < ttl);
                if a.len() >= MAX_AUTH_ENTRIES {
                    a.clear();
                }
            }
        }
        self.counters.auth_probes.fetch_add(1, Relaxed);
        let probe = tokio::time::timeout(
            self.config.registry_timeout,
            client.blob_range(digest, 0..1),
        )
        .await;
        match probe {
            Ok(Ok(_)) => {
                self.authorized
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, now);
                Ok(())
            }
            Ok(Err(e)) if !e.is_transient() => {
                self.counters.auth_denied.fetch_add(1, Relaxed);
                Err((StatusCode::FORBIDDEN, format!("registry refused: {e}\n")))
            }
            Ok(Err(e)) => Err((StatusCode::BAD_GATEWAY, format!("registry: {e}\n"))),
            Err(_) => Err((StatusCode::GATEWAY_TIMEOUT, "registry timed out\n".into())),
        }
    }

    async fn block(&self, key: BlockKey, client: Arc<RegistryClient>) -> BlockResult {
        if let Some(b) = self.cache.get(&key).await {
            self.counters.block_hits.fetch_add(1, Relaxed);
            return Ok(b);
        }
        let bs = self.config.block_size;
        let range = key.block * bs..((key.block + 1) * bs).min(key.size);
        let timeout = self.config.registry_timeout;
        let (cache, counters) = (self.cache.clone(), self.counters.clone());
        let (result, leader) = self
            .flights
            .run(key.clone(), timeout + Duration::from_secs(1), || {
                async move {
                    // A flight that ended between our lookup and now stored it.
                    if let Some(b) = cache.get(&key).await {
                        return Ok(b);
                    }
                    counters.block_misses.fetch_add(1, Relaxed);
                    counters.registry_requests.fetch_add(1, Relaxed);
                    let fetched =
                        tokio::time::timeout(timeout, client.blob_range(&key.digest, range)).await;
                    let result = match fetched {
                        Ok(Ok(b)) => Ok(b),
                        Ok(Err(e)) => Err((e.is_transient(), e.to_string())),
                        Err(_) => Err((true, format!("registry timed out after {timeout:?}"))),
                    };
                    match &result {
                        // Stored before the flight ends, so a request arriving
                        // just after finds it cached instead of fetching again.
                        Ok(b) => {
                            counters.registry_bytes.fetch_add(b.len() as u64, Relaxed);
                            if let Err(e) = cache.put(key, b).await {
                                warn!("{e}");
                            }
                        }
                        Err(_) => {
                            counters.registry_errors.fetch_add(1, Relaxed);
                        }
                    }
                    result
                }
            })
            .await;
        if !leader {
            self.counters.block_hits.fetch_add(1, Relaxed);
        }
        result.unwrap_or_else(|e| Err((true, format!("block fetch: {e:?}"))))
    }
}
