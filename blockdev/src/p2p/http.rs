//! The HTTP plumbing the super node and the peers share: a bounded server
//! (optionally TLS), the cluster-token check, and the client they call each
//! other with.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::config::{Security, TlsConfig};
use super::wire::header;
use super::P2pError;

/// At most this many connections are served at once; more wait in the
/// listen backlog.
const MAX_CONNECTIONS: usize = 512;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub type Body = Full<Bytes>;
pub type HandlerFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
pub type Handler = Arc<dyn Fn(Request<Incoming>, SocketAddr) -> HandlerFuture + Send + Sync>;

/// Bounds the response bytes being assembled at once, so many concurrent
/// large range requests cannot exhaust memory: a request waits for room,
/// then gives up with 503.
pub struct ByteBudget {
    units: Semaphore,
}

const BUDGET_UNIT: u64 = 64 << 10;
/// Response bytes one server assembles at once.
pub const DEFAULT_BUDGET: u64 = 512 << 20;

impl ByteBudget {
    pub fn new(bytes: u64) -> Self {
        ByteBudget {
            units: Semaphore::new((bytes / BUDGET_UNIT).max(1) as usize),
        }
    }

    pub async fn reserve(
        &self,
        bytes: u64,
        wait: Duration,
    ) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let want = bytes.div_ceil(BUDGET_UNIT).max(1);
        let want = u32::try_from(want).ok()?;
        tokio::time::timeout(wait, self.units.acquire_many(want))
            .await
            .ok()?
            .ok()
    }
}

pub fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

pub fn json(value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(v) => {
            let mut r = respond(StatusCode::OK, v);
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

pub fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    super::wire::parse_query(req.uri().query().unwrap_or(""))
}

/// Constant-time comparison of the caller's token with ours (`None`: no
/// token required).
pub fn token_ok(req: &Request<Incoming>, expected: Option<&str>) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    let got = req
        .headers()
        .get(header::TOKEN)
        .map(|v| v.as_bytes())
        .unwrap_or(b"");
    got.len() == expected.len()
        && got
            .iter()
            .zip(expected.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn load_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, P2pError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err(path, e))?
        .collect();
    let certs = certs.map_err(|e| tls_err(path, e))?;
    if certs.is_empty() {
        return Err(tls_err(path, "no certificates in the file"));
    }
    Ok(certs)
}

fn tls_err(path: &std::path::Path, e: impl std::fmt::Display) -> P2pError {
    P2pError::Tls(format!("{}: {e}", path.display()))
}

pub fn server_tls(cfg: &TlsConfig) -> Result<TlsAcceptor, P2pError> {
    crate::registry::install_crypto_provider();
    let certs = load_certs(&cfg.cert)?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| tls_err(&cfg.key, e))?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_err(&cfg.cert, e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The client for peer and super-node calls: trusts only the cluster CA
/// when TLS is configured; no proxy (these are datacenter-local addresses).
pub fn client(security: &Security) -> Result<reqwest::Client, P2pError> {
    crate::registry::install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .pool_idle_timeout(Duration::from_secs(30))
        .no_proxy();
    if let Some(tls) = &security.tls {
        let mut roots = rustls::RootCertStore::empty();
        for cert in load_certs(&tls.ca)? {
            roots.add(cert).map_err(|e| tls_err(&tls.ca, e))?;
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        builder = builder.tls_backend_preconfigured(config);
    }
    builder
        .build()
        .map_err(|e| P2pError::Tls(format!("building the HTTP client: {e}")))
}

/// Serves `handler` on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, handler: Handler) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (stream, remote) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (tls, handler) = (tls.clone(), handler.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req, remote).await) }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30));
            let result = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => http.serve_connection(TokioIo::new(s), service).await,
                        Ok(Err(e)) => {
                            debug!("TLS handshake with {remote}: {e}");
                            return;
                        }
                        Err(_) => {
                            debug!("TLS handshake with {remote} timed out");
                            return;
                        }
                    }
                }
                None => http.serve_connection(TokioIo::new(stream), service).await,
            };
            if let Err(e) = result {
                debug!("connection from {remote}: {e}");
            }
        });
    }
}
