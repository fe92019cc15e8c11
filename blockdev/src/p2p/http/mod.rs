//! The HTTP plumbing the super node and the peers share: the bounded server
//! ([`server`]), the response memory budget ([`budget`]), TLS ([`tls`]),
//! the client they call each other with and its bounded reads ([`client`]),
//! and the cluster-token check.

pub mod budget;
pub mod client;
pub mod server;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};

pub use budget::{ByteBudget, Reservation, DEFAULT_BUDGET};
pub use client::{client, read_limited, MAX_SMALL_BODY};
pub use server::{serve, Limits, ServerCounters};
pub use tls::server_tls;

use super::wire::header;

pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;
pub type HandlerFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
pub type Handler = Arc<dyn Fn(Request<Incoming>, SocketAddr) -> HandlerFuture + Send + Sync>;

pub fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r
}

/// A 200 with `body` of type `content_type`.
pub fn respond_typed(content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = respond(StatusCode::OK, body);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
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

/// A 200 answer of exactly `len` bytes produced by `body` as they come;
/// `room` (the response's share of the memory budget) is held until the
/// body is done or dropped. A body that fails midway cuts the connection,
/// so the client sees a short answer, never a wrong one.
pub fn streamed(
    len: u64,
    body: impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    room: Option<Reservation>,
) -> Response<Body> {
    let frames = body.map(move |piece| {
        let _held = &room;
        piece.map(Frame::data)
    });
    let mut r = Response::new(StreamBody::new(frames).boxed_unsync());
    r.headers_mut().insert(
        hyper::header::CONTENT_LENGTH,
        hyper::header::HeaderValue::from(len),
    );
    r
}

pub fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    crate::p2p::wire::parse_query(req.uri().query().unwrap_or(""))
}

/// Constant-time comparison of the caller's token with ours (`None`: no
/// token required).
pub fn token_ok(req: &Request<Incoming>, expected: Option<&str>) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    // `Authorization: Bearer` too, which is what Prometheus sends from a
    // scrape config's `authorization: {credentials_file: ...}`.
    let headers = req.headers();
    let bearer = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    let got = headers
        .get(header::TOKEN)
        .map(|v| v.as_bytes())
        .or(bearer)
        .unwrap_or(b"");
    got.len() == expected.len()
        && got
            .iter()
            .zip(expected.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}
