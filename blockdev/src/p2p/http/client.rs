//! The client for peer and super-node calls, and reading an answer's body
//! without ever holding more than the caller expects of it.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::tls::client_tls;
use crate::p2p::config::Security;
use crate::p2p::P2pError;

/// Most bytes read of a small answer (JSON, an error message).
pub const MAX_SMALL_BODY: usize = 16 << 10;

/// Trusts only the cluster CA when TLS is configured; no proxy (these are
/// datacenter-local addresses). Idle connections are closed before the
/// servers' header deadline would close them under a new request.
pub fn client(security: &Security) -> Result<reqwest::Client, P2pError> {
    crate::registry::install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .pool_idle_timeout(Duration::from_secs(5))
        .no_proxy();
    if let Some(tls) = &security.tls {
        builder = builder.tls_backend_preconfigured(client_tls(&tls.ca)?);
    }
    builder
        .build()
        .map_err(|e| P2pError::Tls(format!("building the HTTP client: {e}")))
}

/// The body of `resp`, at most `max` bytes: an answer announcing or sending
/// more is refused as soon as that shows, before it is buffered.
pub async fn read_limited(mut resp: reqwest::Response, max: usize) -> Result<Bytes, String> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(format!("answer longer than {max} bytes"));
    }
    let mut out = BytesMut::new();
    while let Some(piece) = resp.chunk().await.map_err(|e| e.to_string())? {
        if out.len() + piece.len() > max {
            return Err(format!("answer longer than {max} bytes"));
        }
        out.extend_from_slice(&piece);
    }
    Ok(out.freeze())
}
