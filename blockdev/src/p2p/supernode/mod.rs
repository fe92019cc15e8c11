//! `lazybd-supernode`: the root of distribution in a datacenter. It serves
//! byte ranges of registry blobs out of a bounded block cache, fetching each
//! block from the registry once however many ask at once, with the asking
//! client's own registry credentials ([`blob`]); it keeps the per-layer
//! peer trees and signs the tickets peers ask for ([`members`]); and it
//! keeps startup traces ([`traces`]).
//!
//! Privacy: a cached block is only handed to a caller whose credentials the
//! registry accepted for that blob recently, and a ticket only signed for
//! one ([`access`]), so neither the cache nor the peers widen access.
//!
//! Every request reads top to bottom: token, then what the caller must show
//! (credentials, a ticket), then the work; nothing unauthenticated lists
//! digests or holders.

mod access;
mod blob;
mod block_cache;
pub mod flight;
mod members;
mod metrics;
pub mod traces;
pub mod tree;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use access::Access;
use block_cache::{BlockCache, CacheUsage};
use flight::SingleFlight;
use traces::TraceStore;
use tree::Membership;

use super::config::Security;
use super::http::{self, Body, ServerCounters};
use super::ticket::{TicketSigner, TicketVerifier};
use super::wire::{path, query, KeysReply, MAX_CHAIN};
use super::P2pError;
use crate::oci::LayerId;
use crate::trace::{trace_key, valid_key};

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
    /// The ticket signing key (PKCS#8 PEM); `None`: a fresh one per start.
    pub ticket_key: Option<PathBuf>,
    /// Public keys of earlier signing keys still accepted (SPKI PEM).
    pub ticket_verify_keys: Vec<PathBuf>,
    pub ticket_ttl: Duration,
    /// Memory held for responses at once.
    pub response_budget: u64,
    /// Registry block fetches at once.
    pub max_registry_fetches: usize,
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
    /// Size checks against the registry (once per blob) and client sizes
    /// that did not match.
    pub size_probes: AtomicU64,
    pub wrong_sizes: AtomicU64,
    pub announces: AtomicU64,
    pub tickets_signed: AtomicU64,
    /// Announce or leave for an address not the caller's own.
    pub foreign_addresses: AtomicU64,
    pub traces_stored: AtomicU64,
    pub traces_served: AtomicU64,
    pub traces_refused: AtomicU64,
}

#[derive(serde::Serialize)]
struct StatsReply<'a> {
    #[serde(flatten)]
    counters: &'a SupernodeCounters,
    #[serde(flatten)]
    server: &'a ServerCounters,
    cache: CacheUsage,
    response_budget_free: u64,
}

pub(super) type Refusal = (StatusCode, String);

pub struct Supernode {
    config: SupernodeConfig,
    token: Option<String>,
    cache: Arc<BlockCache>,
    flights: Arc<SingleFlight<block_cache::BlockKey, blob::BlockResult>>,
    /// Registry fetches at once, shared by all flights.
    registry_slots: Arc<Semaphore>,
    access: Access,
    membership: Mutex<Membership>,
    signer: TicketSigner,
    /// The signer's own keys, to recognise the tickets it signed.
    verifier: TicketVerifier,
    budget: http::ByteBudget,
    traces: TraceStore,
    server: Arc<ServerCounters>,
    pub counters: Arc<SupernodeCounters>,
}

impl Supernode {
    pub fn new(config: SupernodeConfig) -> Result<Arc<Self>, P2pError> {
        let token = config.security.token()?;
        config
            .security
            .check_listener("the super node", config.listen, token.as_deref())?;
        let signer = match &config.ticket_key {
            Some(path) => {
                let previous: Vec<&std::path::Path> = config
                    .ticket_verify_keys
                    .iter()
                    .map(PathBuf::as_path)
                    .collect();
                TicketSigner::load(path, &previous)?
            }
            None => {
                info!(
                    "no --ticket-key: signing tickets with a key made for this run \
                     (nodes fetch it; a restart invalidates tickets, which nodes renew)"
                );
                TicketSigner::generate()?
            }
        };
        let verifier = TicketVerifier::from_published(signer.published()).map_err(P2pError::Tls)?;
        let cache = Arc::new(BlockCache::open(
            &config.cache_dir.join("blocks"),
            config.cache_capacity,
        )?);
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
            budget: http::ByteBudget::new(config.response_budget),
            registry_slots: Arc::new(Semaphore::new(config.max_registry_fetches.max(1))),
            flights: Arc::default(),
            access: Access::default(),
            signer,
            verifier,
            server: Arc::default(),
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
            "super node listening on {addr}{} for registries {:?}; ticket key {}",
            if tls.is_some() { " (TLS)" } else { "" },
            self.config.registries,
            self.signer.kid()
        );
        let server = tokio::spawn(http::serve(
            listener,
            tls,
            handler,
            http::Limits::default(),
            self.server.clone(),
        ));
        Ok((addr, server))
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, remote: SocketAddr) -> Response<Body> {
        if req.uri().path() == path::HEALTHZ {
            return http::respond(StatusCode::OK, "ok\n");
        }
        if !http::token_ok(&req, self.token.as_deref()) {
            return http::respond(StatusCode::UNAUTHORIZED, "cluster token missing or wrong\n");
        }
        let q = http::query(&req);
        let result = match (req.method(), req.uri().path()) {
            (&Method::GET, path::BLOB) => self.blob(&req, &q).await,
            (&Method::POST, path::ANNOUNCE) => self.announce(&req, &q, remote).await,
            (&Method::POST, path::LEAVE) => self.leave(&q, remote),
            (&Method::GET, path::TRACE) => self.get_trace(&q, remote).await,
            (&Method::PUT, path::TRACE) => self.put_trace(req, &q, remote).await,
            (&Method::GET, path::KEYS) => Ok(http::json(&KeysReply {
                keys: self.signer.published().to_vec(),
                ticket_ttl_secs: self.config.ticket_ttl.as_secs(),
            })),
            (&Method::GET, path::METRICS) => Ok(http::respond_typed(
                metrics::CONTENT_TYPE,
                metrics::render(&self.counters, &self.server, self.cache.usage()),
            )),
            (&Method::GET, path::STATS) => Ok(http::json(&StatsReply {
                counters: &self.counters,
                server: &self.server,
                cache: self.cache.usage(),
                response_budget_free: self.budget.available(),
            })),
            _ => Err((StatusCode::NOT_FOUND, "no such endpoint".into())),
        };
        result.unwrap_or_else(|(status, msg)| {
            if status.is_server_error() {
                warn!("{} {} from {remote}: {msg}", req_line(&q), status);
            }
            http::respond(status, format!("{msg}\n"))
        })
    }

    async fn get_trace(
        &self,
        q: &HashMap<String, String>,
        remote: SocketAddr,
    ) -> Result<Response<Body>, Refusal> {
        let key = self.trace_access(q, remote)?;
        let (status, body) = self.traces.get(&key).await;
        if status.is_success() {
            self.counters.traces_served.fetch_add(1, Relaxed);
        }
        Ok(http::respond(status, body))
    }

    async fn put_trace(
        &self,
        req: Request<Incoming>,
        q: &HashMap<String, String>,
        remote: SocketAddr,
    ) -> Result<Response<Body>, Refusal> {
        // Checked before a byte of the body is read.
        let key = self.trace_access(q, remote)?;
        let ip = remote.ip();
        let held = |t: &crate::trace::Trace| {
            t.layers
                .iter()
                .all(|l| self.access.holds_layer(ip, &l.layer))
        };
        let (status, body) = self.traces.put(&key, ip, req.into_body(), held).await;
        if status.is_success() {
            self.counters.traces_stored.fetch_add(1, Relaxed);
        } else {
            self.counters.traces_refused.fetch_add(1, Relaxed);
        }
        Ok(http::respond(status, body))
    }

    /// The trace key of a request whose caller holds tickets for every
    /// layer of the chain the key is made of.
    fn trace_access(
        &self,
        q: &HashMap<String, String>,
        remote: SocketAddr,
    ) -> Result<String, Refusal> {
        let bad = |m: &str| (StatusCode::BAD_REQUEST, m.to_owned());
        let key = q.get(query::KEY).map_or("", |k| k);
        if !valid_key(key) {
            return Err(bad("bad trace key"));
        }
        let chain: Vec<&str> = q
            .get(query::CHAIN)
            .map_or("", |c| c)
            .split(',')
            .filter(|c| !c.is_empty())
            .collect();
        if chain.is_empty() || chain.len() > MAX_CHAIN {
            return Err(bad("bad layer chain"));
        }
        let Ok(ids) = chain
            .iter()
            .map(|c| LayerId::parse(c))
            .collect::<Result<Vec<_>, _>>()
        else {
            return Err(bad("bad layer chain"));
        };
        if trace_key(&chain) != key {
            return Err(bad("the key is not the chain's"));
        }
        if !ids.iter().all(|l| self.access.holds_layer(remote.ip(), l)) {
            self.counters.traces_refused.fetch_add(1, Relaxed);
            return Err((
                StatusCode::FORBIDDEN,
                "no ticket for every layer of this image".into(),
            ));
        }
        Ok(key.to_owned())
    }
}

/// What a request was, for a log line (no credentials: those are headers).
fn req_line(q: &HashMap<String, String>) -> String {
    let mut parts: Vec<String> = q
        .iter()
        .filter(|(k, _)| k.as_str() != query::CHAIN)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    parts.sort();
    parts.join("&")
}
