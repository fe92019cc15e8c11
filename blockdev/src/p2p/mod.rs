//! P2P distribution of layer chunks inside a datacenter: a super node per
//! datacenter ([`supernode`]) at the root of per-blob peer trees
//! ([`tree`]), and in every node a peer ([`peer`]) that serves the chunks it
//! holds and adds the chunk sources `peer` and `supernode` in front of the
//! registry. Peers are never trusted: every chunk is verified against the
//! index's digest, by the receiving peer and again by the fetcher.

mod block_cache;
pub mod config;
pub mod flight;
pub mod http;
pub mod peer;
pub mod sources;
mod stored;
pub mod supernode;
pub mod traces;
pub mod tree;

use std::path::PathBuf;

use thiserror::Error;

pub use config::{P2pConfig, Security, TlsConfig};
pub use peer::PeerNode;
pub use supernode::{Supernode, SupernodeConfig};

use crate::registry::RegistryAuth;

#[derive(Debug, Error)]
pub enum P2pError {
    #[error("p2p config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// The value of the registry-credentials header for `auth` (empty for
/// anonymous). Hex keeps any byte of a password header-safe.
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
