//! P2P distribution of layer chunks inside a datacenter: a super node per
//! datacenter ([`supernode`], with its per-blob peer trees) and in every
//! node a peer ([`peer`]) that serves the chunks it holds and adds the chunk
//! sources `peer` and `supernode` in front of the registry. Both speak the
//! contract in [`wire`] over the plumbing in [`http`]. Peers are never
//! trusted: every chunk is verified against the index's digest, by the
//! receiving peer and again by the fetcher.

pub mod config;
pub mod http;
pub mod peer;
pub mod sources;
mod stored;
pub mod supernode;
pub mod wire;

use std::path::PathBuf;

use thiserror::Error;

pub use config::{P2pConfig, Security, TlsConfig};
pub use peer::PeerNode;
pub use supernode::{Supernode, SupernodeConfig};

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
