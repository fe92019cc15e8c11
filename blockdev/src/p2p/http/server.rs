//! The accept loop the super node and the peers share, bounded against
//! hostile clients: a cap on connections in all and per client address
//! (more are closed at once, so the listen backlog keeps draining and one
//! host cannot take every slot), a short deadline for the TLS handshake and
//! for each request's headers (idle keep-alive connections included), a
//! deadline for writing each response (a reader too slow for it loses the
//! connection, and with it the response's share of the memory budget), and
//! accept errors (EMFILE) that are logged and survived.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, SizeHint};
use hyper::Response;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::{Body, Handler};

/// Bounds of one server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub connections: usize,
    /// Connections served at once from one client address.
    pub per_client: usize,
    /// Longest wait for a request's headers (and for the next request on an
    /// idle keep-alive connection).
    pub header_timeout: Duration,
    pub handshake_timeout: Duration,
    /// A response gets this long plus its length at [`Limits::min_rate`].
    pub response_base: Duration,
    /// Bytes per second a reader must at least take.
    pub min_rate: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: 1024,
            per_client: 64,
            header_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            response_base: Duration::from_secs(10),
            min_rate: 1 << 20,
        }
    }
}

/// What the server refused or cut off, for `/v1/stats` and the logs.
#[derive(Debug, Default, serde::Serialize)]
pub struct ServerCounters {
    /// Connections closed at once: over the cap, in all or for one address.
    pub refused_connections: AtomicU64,
    /// Connections dropped because a response was not read in time.
    pub slow_readers_dropped: AtomicU64,
    pub accept_errors: AtomicU64,
}

/// Connections per client address, bounded in total.
struct Slots {
    limits: Limits,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Slots {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per) = &mut *open;
        let mine = per.get(&ip).copied().unwrap_or(0);
        if *total >= self.limits.connections || mine >= self.limits.per_client {
            return None;
        }
        *total += 1;
        per.insert(ip, mine + 1);
        Some(Slot {
            slots: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per) = &mut *open;
        *total -= 1;
        if let Some(n) = per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
    }
}

/// When the response being written on a connection must be done.
#[derive(Default)]
struct Watchdog {
    deadline: Mutex<Option<Instant>>,
    changed: Notify,
}

impl Watchdog {
    fn set(&self, deadline: Option<Instant>) {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner()) = deadline;
        self.changed.notify_one();
    }

    fn get(&self) -> Option<Instant> {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A response body that arms its connection's watchdog while it is being
/// written.
struct Watched {
    inner: Body,
    watchdog: Arc<Watchdog>,
}

impl hyper::body::Body for Watched {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.watchdog.set(None);
    }
}

/// Serves `handler` on `listener` until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Handler,
    limits: Limits,
    counters: Arc<ServerCounters>,
) {
    let slots = Arc::new(Slots {
        limits,
        open: Mutex::default(),
    });
    let mut last_refusal_log: Option<Instant> = None;
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: wait for connections to end, go on.
                counters.accept_errors.fetch_add(1, Relaxed);
                warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = slots.take(remote.ip()) else {
            counters.refused_connections.fetch_add(1, Relaxed);
            if last_refusal_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                warn!(
                    "refusing connections over the limits ({} in all, {} per address); \
                     latest from {remote}",
                    limits.connections, limits.per_client
                );
                last_refusal_log = Some(Instant::now());
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (tls, handler, counters) = (tls.clone(), handler.clone(), counters.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let watchdog = Arc::new(Watchdog::default());
            let dog = watchdog.clone();
            let service = hyper::service::service_fn(move |req| {
                let (handler, dog) = (handler.clone(), dog.clone());
                async move {
                    let resp = handler(req, remote).await;
                    Ok::<_, Infallible>(watch(resp, &dog, &limits))
                }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(64 << 10);
            match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(s)) => {
                            let conn = http.serve_connection(TokioIo::new(s), service);
                            guard(conn, &watchdog, remote, &counters).await
                        }
                        Ok(Err(e)) => debug!("TLS handshake with {remote}: {e}"),
                        Err(_) => debug!("TLS handshake with {remote} timed out"),
                    }
                }
                None => {
                    let conn = http.serve_connection(TokioIo::new(stream), service);
                    guard(conn, &watchdog, remote, &counters).await
                }
            }
        });
    }
}

/// Arms `dog` for the time `resp` may take to write, until its body is done.
fn watch(resp: Response<Body>, dog: &Arc<Watchdog>, limits: &Limits) -> Response<Body> {
    let len = resp.body().size_hint().upper().unwrap_or_else(|| {
        resp.headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    let per_byte = Duration::from_secs_f64(len as f64 / limits.min_rate.max(1) as f64);
    dog.set(Some(Instant::now() + limits.response_base + per_byte));
    resp.map(|inner| {
        Watched {
            inner,
            watchdog: dog.clone(),
        }
        .boxed_unsync()
    })
}

/// Runs `conn` until it ends or a response outlives its deadline (then the
/// connection, and the response with its reservation, is dropped).
async fn guard<F, E>(conn: F, dog: &Watchdog, remote: SocketAddr, counters: &ServerCounters)
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    loop {
        let deadline = dog.get();
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!("connection from {remote}: {e}");
                }
                return;
            }
            () = dog.changed.notified() => {}
            () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)),
                if deadline.is_some() =>
            {
                if dog.get().is_some_and(|d| d <= Instant::now()) {
                    counters.slow_readers_dropped.fetch_add(1, Relaxed);
                    debug!("{remote} did not read its response in time: connection dropped");
                    return;
                }
            }
        }
    }
}
