//! The P2P wire contract: every path, header, query parameter and JSON body
//! the peers and the super node exchange, in one place for the servers
//! ([`super::peer`], [`super::supernode`]) and their clients (the node's
//! calls in [`super::peer`], used by `crate::source::{peer, supernode}`).
//! docs/p2p.md#protocol describes it for operators; changing anything here
//! changes the protocol between nodes of different versions.

use serde::{Deserialize, Serialize};

use crate::registry::RegistryAuth;

/// Endpoints. Every one but [`HEALTHZ`](path::HEALTHZ) wants the cluster
/// token when one is configured.
pub mod path {
    /// GET, both servers: `ok` (no token needed).
    pub const HEALTHZ: &str = "/healthz";
    /// GET, both servers: stored bytes `start..end` of a blob. The super node
    /// serves any blob of a registry it is configured for (query: registry,
    /// repo, digest, size, start, end); a peer serves whole chunks of a blob
    /// it holds (query: digest, anchor, start, end).
    pub const BLOB: &str = "/v1/blob";
    /// POST, super node: join a blob's tree or heartbeat (query: blob, addr);
    /// replies [`AnnounceReply`](super::AnnounceReply).
    pub const ANNOUNCE: &str = "/v1/announce";
    /// POST, super node: leave a blob's tree (query: blob, addr).
    pub const LEAVE: &str = "/v1/leave";
    /// GET or PUT, super node: the startup trace of an image (query: key; the
    /// body is `crate::trace::Trace::encode`).
    pub const TRACE: &str = "/v1/trace";
    /// GET, both servers: counters as JSON, for operators and tests.
    pub const STATS: &str = "/v1/stats";
}

/// Request headers.
pub mod header {
    /// The cluster token.
    pub const TOKEN: &str = "x-lazybd-token";
    /// The advertised address of the peer asking (for per-peer upload counters).
    pub const PEER: &str = "x-lazybd-peer";
    /// The client's registry credentials, for the super node to use on its
    /// behalf ([`auth_to_header`](super::auth_to_header)).
    pub const REGISTRY_AUTH: &str = "x-lazybd-registry-auth";
}

/// Query parameters.
pub mod query {
    /// Blob requests: the blob digest and the byte range `start..end`.
    pub const DIGEST: &str = "digest";
    pub const START: &str = "start";
    pub const END: &str = "end";
    /// Blob requests to a peer: the anchor of the layer the asker reads
    /// (absent: an unanchored version 1 layer). A peer serves only a layer
    /// with that identity.
    pub const ANCHOR: &str = "anchor";
    /// Blob requests to the super node: where the blob is, and its size.
    pub const REGISTRY: &str = "registry";
    pub const REPO: &str = "repo";
    pub const SIZE: &str = "size";
    /// Announce and leave: the blob digest and the peer's advertised address.
    pub const BLOB: &str = "blob";
    pub const ADDR: &str = "addr";
    /// Traces: the key (`crate::trace::trace_key`).
    pub const KEY: &str = "key";
}

/// Largest range one blob request may ask for (the fetcher asks for 8 MiB).
pub const MAX_RANGE: u64 = 64 << 20;

/// The reply to an announce.
#[derive(Serialize, Deserialize)]
pub struct AnnounceReply {
    /// Parent first, then its parent, ...; empty: use the super node.
    pub ancestors: Vec<String>,
    pub heartbeat_ms: u64,
}

/// The value of [`header::REGISTRY_AUTH`] for `auth` (empty for anonymous).
/// Hex keeps any byte of a password header-safe.
pub fn auth_to_header(auth: &RegistryAuth) -> String {
    match auth {
        RegistryAuth::Anonymous => String::new(),
        RegistryAuth::Basic(u, p) => format!("basic {}:{}", hex::encode(u), hex::encode(p)),
        RegistryAuth::Bearer(t) => format!("bearer {}", hex::encode(t)),
    }
}

pub fn auth_from_header(v: &str) -> Result<RegistryAuth, String> {
    let unhex = |s: &str| {
        hex::decode(s)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| "bad registry credentials header".to_owned())
    };
    if v.is_empty() {
        return Ok(RegistryAuth::Anonymous);
    }
    if let Some(rest) = v.strip_prefix("basic ") {
        let (u, p) = rest
            .split_once(':')
            .ok_or_else(|| "bad registry credentials header".to_owned())?;
        return Ok(RegistryAuth::Basic(unhex(u)?, unhex(p)?));
    }
    if let Some(t) = v.strip_prefix("bearer ") {
        return Ok(RegistryAuth::Bearer(unhex(t)?));
    }
    Err("bad registry credentials header".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_round_trip_through_the_header() {
        for auth in [
            RegistryAuth::Anonymous,
            RegistryAuth::Basic("u:ser".into(), "p\u{e4}ss\n".into()),
            RegistryAuth::Bearer("tok".into()),
        ] {
            let back = auth_from_header(&auth_to_header(&auth)).unwrap();
            assert_eq!(format!("{back:?}"), format!("{auth:?}"));
            assert_eq!(auth_to_header(&back), auth_to_header(&auth));
        }
        assert!(auth_from_header("basic zz").is_err());
    }
}
