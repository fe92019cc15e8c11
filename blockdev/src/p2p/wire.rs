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
    /// serves any blob of a registry it is configured for to a caller whose
    /// registry credentials it checked (query: registry, repo, digest, size,
    /// start, end); a peer serves whole chunks of a layer it holds to the
    /// holder of a ticket for it (query: digest, anchor, start, end; header
    /// [`TICKET`](super::header::TICKET)).
    pub const BLOB: &str = "/v1/blob";
    /// POST, super node: join a blob's tree or heartbeat (query: registry,
    /// repo, blob, anchor, addr); replies [`AnnounceReply`](super::AnnounceReply)
    /// to a caller the registry lets read the blob, or that presents a
    /// ticket for it.
    pub const ANNOUNCE: &str = "/v1/announce";
    /// POST, super node: leave a blob's tree (query: blob, anchor, addr).
    pub const LEAVE: &str = "/v1/leave";
    /// GET or PUT, super node: the startup trace of an image (query: key,
    /// chain; the body is `crate::trace::Trace::encode`).
    pub const TRACE: &str = "/v1/trace";
    /// GET, super node: the public keys tickets are signed with
    /// ([`KeysReply`](super::KeysReply)).
    pub const KEYS: &str = "/v1/keys";
    /// GET, both servers: aggregate counters as JSON (no digests, no
    /// addresses), for operators and tests.
    pub const STATS: &str = "/v1/stats";
    /// GET, super node: the same counters for Prometheus (text format,
    /// `lazybd_supernode_*`); the token also as `Authorization: Bearer`.
    pub const METRICS: &str = "/metrics";
}

/// Request headers.
pub mod header {
    /// The cluster token.
    pub const TOKEN: &str = "x-lazybd-token";
    /// A ticket (`crate::p2p::ticket`): to a peer for its blob, to the super
    /// node on announce (then no registry check is needed while it is fresh).
    pub const TICKET: &str = "x-lazybd-ticket";
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
    /// Blob requests to a peer, announce and leave: the layer's anchor
    /// (`sha256:` of its index; empty for layers without one), so two layers
    /// with one blob digest but different indexes are never mixed up.
    pub const ANCHOR: &str = "anchor";
    /// Blob requests to the super node and announce: where the blob is.
    pub const REGISTRY: &str = "registry";
    pub const REPO: &str = "repo";
    /// Blob requests to the super node: the blob's size as the client knows
    /// it (checked against the registry).
    pub const SIZE: &str = "size";
    /// Announce and leave: the blob digest and the peer's address
    /// (`ip:port`; the IP must be the one the super node sees the request
    /// come from, or unspecified, `0.0.0.0`, for "that one").
    pub const BLOB: &str = "blob";
    pub const ADDR: &str = "addr";
    /// Traces: the key (`crate::trace::trace_key`) and the layer chain it
    /// is the key of (the layers' identities, `crate::oci::LayerId`,
    /// comma-separated), whose tickets the caller must hold.
    pub const KEY: &str = "key";
    pub const CHAIN: &str = "chain";
}

/// Largest range one blob request may ask for (the fetcher asks for 8 MiB).
pub const MAX_RANGE: u64 = 64 << 20;
/// Longest layer chain a trace request may name.
pub const MAX_CHAIN: usize = crate::trace::MAX_TRACE_LAYERS;

/// One layer as P2P names it: its blob digest and its anchor (`sha256:` of
/// its index; empty for a layer without one). Trees, tickets and the layers
/// a peer serves are keyed by both, so two layers that share a blob digest
/// but not their content are never mixed up.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId {
    pub digest: String,
    pub anchor: String,
}

impl BlobId {
    pub fn new(digest: &str, anchor: &str) -> Self {
        BlobId {
            digest: digest.to_owned(),
            anchor: anchor.to_owned(),
        }
    }

    /// Whether both parts are well formed (the anchor may be empty).
    pub fn is_valid(&self) -> bool {
        crate::oci::valid_digest(&self.digest)
            && (self.anchor.is_empty() || crate::oci::valid_digest(&self.anchor))
    }
}

impl std::fmt::Display for BlobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.anchor.is_empty() {
            write!(f, "{}", self.digest)
        } else {
            write!(f, "{} (anchor {})", self.digest, self.anchor)
        }
    }
}

/// Query parameters read of one request: every endpoint has fewer, and a
/// caller cannot make a server hold more.
pub const MAX_QUERY_PAIRS: usize = 16;

/// The parameters of a query string (percent-decoded; for a repeated
/// name, the last wins), at most [`MAX_QUERY_PAIRS`] of them.
pub fn parse_query(query: &str) -> std::collections::HashMap<String, String> {
    form_urlencoded::parse(query.as_bytes())
        .take(MAX_QUERY_PAIRS)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The reply to an announce.
#[derive(Debug, Serialize, Deserialize)]
pub struct AnnounceReply {
    /// Parent first, then its parent, ...; empty: use the super node.
    pub ancestors: Vec<String>,
    pub heartbeat_ms: u64,
    /// The caller's address in the tree, as the super node verified it.
    pub member: String,
    /// The caller's ticket for the blob (present it to the ancestors).
    pub ticket: String,
}

/// The reply to [`path::KEYS`].
#[derive(Debug, Serialize, Deserialize)]
pub struct KeysReply {
    /// The signing key first, then older ones still accepted.
    pub keys: Vec<super::ticket::PublishedKey>,
    pub ticket_ttl_secs: u64,
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
    fn queries_are_decoded_and_bounded() {
        let q = parse_query("digest=sha256%3Aab&start=0&end=10&start=5");
        assert_eq!(q["digest"], "sha256:ab");
        assert_eq!(q["start"], "5");
        let many: Vec<String> = (0..1000).map(|i| format!("k{i}=v")).collect();
        assert_eq!(parse_query(&many.join("&")).len(), MAX_QUERY_PAIRS);
    }

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
