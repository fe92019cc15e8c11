//! P2P distribution of layer chunks inside a datacenter: a super node per
//! datacenter ([`supernode`], with its per-blob peer trees) and in every
//! node a peer ([`peer`]) that serves the chunks it holds and calls the super
//! node and its ancestors for the chunk sources `peer` and `supernode`
//! (`crate::source`), which go in front of the registry. Both speak the
//! contract in [`wire`] over the plumbing in [`http`].
//!
//! It sits below the fetcher and the layer: the peer server reads the
//! layers it serves through [`ServedLayer`]. Peers are never trusted: the
//! fetcher verifies every chunk against the index's digest.

pub mod config;
pub mod http;
pub mod peer;
pub mod supernode;
pub mod ticket;
pub mod wire;

use std::path::PathBuf;

use thiserror::Error;

pub use config::{P2pConfig, Security, TlsConfig};
pub use peer::{PeerNode, RegistryBlob, ServedLayer, SupernodeError};
pub use supernode::{Supernode, SupernodeConfig};

#[derive(Debug, Error)]
pub enum P2pError {
    #[error("p2p config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("refusing insecure P2P transport: {0}")]
    Insecure(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
