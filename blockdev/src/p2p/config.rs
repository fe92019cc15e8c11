//! The `[p2p]` table of a node's TOML config, the TLS/token settings the
//! super node shares with the peers, and the transport rule both follow:
//! off loopback, P2P traffic (registry credentials, the token, tickets)
//! goes only over TLS with a token, unless the operator explicitly allows
//! plain HTTP (`allow_insecure`), which is then logged loudly.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::P2pError;

/// How a node takes part in P2P distribution.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct P2pConfig {
    /// The datacenter's super node, `http://host:port` or `https://...`.
    pub supernode: String,
    /// Where this node's peer server listens, e.g. `0.0.0.0:7070`.
    pub listen: SocketAddr,
    /// `host:port` other peers use to reach this node (default: `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Longest wait for one parent or ancestor peer before the next one up.
    #[serde(default = "default_peer_timeout_ms")]
    pub peer_timeout_ms: u64,
    /// Longest wait for the super node before the registry.
    #[serde(default = "default_supernode_timeout_ms")]
    pub supernode_timeout_ms: u64,
    /// How often the node tells the super node it still holds its blobs; the
    /// super node forgets it after a few missed heartbeats.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// How many ancestors to try (parent first) before the super node.
    #[serde(default = "default_max_ancestors")]
    pub max_ancestors: usize,
    /// Shared secret: sent in `X-Lazybd-Token` and required from callers.
    #[serde(default)]
    pub cluster_token: Option<String>,
    /// File holding the shared secret (first line), instead of inline.
    #[serde(default)]
    pub cluster_token_file: Option<PathBuf>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Plain HTTP and no token off loopback (a test bed or a network that is
    /// trusted as a whole): credentials and tickets then cross it in clear.
    #[serde(default)]
    pub allow_insecure: bool,
    /// The super node's ticket public keys (SPKI PEM, one or more); absent:
    /// fetched from the super node (over TLS) at start and when a ticket
    /// names a key not known yet.
    #[serde(default)]
    pub ticket_keys_file: Option<PathBuf>,
    /// Memory the peer server holds for responses at once, MiB.
    #[serde(default = "default_response_budget_mib")]
    pub response_budget_mib: u64,
}

/// Shared by the super node and the peers.
#[derive(Debug, Clone, Default)]
pub struct Security {
    pub cluster_token: Option<String>,
    pub cluster_token_file: Option<PathBuf>,
    pub tls: Option<TlsConfig>,
    /// See [`P2pConfig::allow_insecure`].
    pub allow_insecure: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain this server presents.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA certificates that peers' and the super node's certificates are
    /// checked against (clients use it as their only trust root).
    pub ca: PathBuf,
}

fn default_peer_timeout_ms() -> u64 {
    3000
}
fn default_supernode_timeout_ms() -> u64 {
    10_000
}
fn default_heartbeat_ms() -> u64 {
    5000
}
fn default_max_ancestors() -> usize {
    3
}
fn default_response_budget_mib() -> u64 {
    512
}

impl P2pConfig {
    /// Reads the `[p2p]` table of the TOML file at `path`.
    pub fn load(path: &Path) -> Result<Self, P2pError> {
        let text = std::fs::read_to_string(path).map_err(|e| P2pError::Config {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Self::parse(&text).map_err(|message| P2pError::Config {
            path: path.to_owned(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct File {
            p2p: P2pConfig,
        }
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        file.p2p.check()?;
        Ok(file.p2p)
    }

    fn check(&self) -> Result<(), String> {
        if !(self.supernode.starts_with("http://") || self.supernode.starts_with("https://")) {
            return Err(format!(
                "supernode {:?}: must be an http:// or https:// URL",
                self.supernode
            ));
        }
        if self.tls.is_some() != self.supernode.starts_with("https://") {
            return Err("supernode must be https:// exactly when [p2p.tls] is set".into());
        }
        if self.heartbeat_ms == 0 || self.peer_timeout_ms == 0 || self.supernode_timeout_ms == 0 {
            return Err("timeouts and heartbeat must be positive".into());
        }
        if self.response_budget_mib == 0 {
            return Err("response_budget_mib must be positive".into());
        }
        if let Some(a) = &self.advertise {
            if a.parse::<SocketAddr>().is_err() {
                return Err(format!(
                    "advertise {a:?}: must be ip:port (the super node checks the IP)"
                ));
            }
        }
        let host = url_host(&self.supernode);
        if self.supernode.starts_with("http://") && !self.allow_insecure && !is_loopback_host(host)
        {
            return Err(format!(
                "supernode {:?}: plain HTTP to a host off loopback would send registry \
                 credentials, the token and tickets in clear; use https:// with [p2p.tls], \
                 or set allow_insecure = true",
                self.supernode
            ));
        }
        Ok(())
    }

    pub fn advertised(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    pub fn security(&self) -> Security {
        Security {
            cluster_token: self.cluster_token.clone(),
            cluster_token_file: self.cluster_token_file.clone(),
            tls: self.tls.clone(),
            allow_insecure: self.allow_insecure,
        }
    }

    pub fn response_budget(&self) -> u64 {
        self.response_budget_mib.saturating_mul(1 << 20)
    }

    pub fn peer_timeout(&self) -> Duration {
        Duration::from_millis(self.peer_timeout_ms)
    }
    pub fn supernode_timeout(&self) -> Duration {
        Duration::from_millis(self.supernode_timeout_ms)
    }
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
}

impl Security {
    /// The token, read from the file if one is named.
    pub fn token(&self) -> Result<Option<String>, P2pError> {
        if let Some(path) = &self.cluster_token_file {
            let text = std::fs::read_to_string(path).map_err(|e| P2pError::Config {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let token = text.lines().next().unwrap_or("").trim().to_owned();
            if token.is_empty() {
                return Err(P2pError::Config {
                    path: path.clone(),
                    message: "empty cluster token".into(),
                });
            }
            return Ok(Some(token));
        }
        Ok(self.cluster_token.clone().filter(|t| !t.is_empty()))
    }

    /// A server listening on `addr` off loopback needs TLS and a token,
    /// unless insecure operation is allowed (then it says so, loudly).
    pub fn check_listener(
        &self,
        what: &str,
        addr: SocketAddr,
        token: Option<&str>,
    ) -> Result<(), P2pError> {
        if addr.ip().is_loopback() {
            return Ok(());
        }
        let missing = match (self.tls.is_some(), token.is_some()) {
            (true, true) => return Ok(()),
            (false, true) => "TLS",
            (true, false) => "a cluster token",
            (false, false) => "TLS and a cluster token",
        };
        if self.allow_insecure {
            tracing::warn!(
                "INSECURE: {what} listens on {addr} without {missing} (allow_insecure): anyone \
                 on the network can read and alter P2P traffic, registry credentials and \
                 tickets included"
            );
            return Ok(());
        }
        Err(P2pError::Insecure(format!(
            "{what} on {addr} (not loopback) needs {missing}; configure them, listen on \
             loopback, or allow insecure operation explicitly"
        )))
    }

    /// Whether credentials may be sent to `host` (an IP or a name) over plain
    /// HTTP: on loopback, or when insecure operation is allowed.
    pub fn plain_http_ok(&self, host: &str) -> bool {
        self.allow_insecure || is_loopback_host(host)
    }
}

/// The host of an `http(s)://host[:port][/...]` URL, or of `host:port`.
pub fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or("");
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

pub fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let c = P2pConfig::parse(
            r#"
            [p2p]
            supernode = "https://10.1.0.1:7443"
            listen = "0.0.0.0:7070"
            advertise = "10.1.0.7:7070"
            peer_timeout_ms = 2000
            cluster_token_file = "/etc/lazybd/cluster-token"
            [p2p.tls]
            cert = "/etc/lazybd/node.pem"
            key = "/etc/lazybd/node.key"
            ca = "/etc/lazybd/ca.pem"
            "#,
        )
        .unwrap();
        assert_eq!(c.advertised(), "10.1.0.7:7070");
        assert_eq!(c.peer_timeout(), Duration::from_secs(2));
        assert_eq!(c.heartbeat(), Duration::from_secs(5));
        assert!(c.tls.is_some());
    }

    #[test]
    fn rejects_https_without_tls_and_unknown_keys() {
        let e = P2pConfig::parse("[p2p]\nsupernode = \"https://a:1\"\nlisten = \"0.0.0.0:1\"\n")
            .unwrap_err();
        assert!(e.contains("https"), "{e}");
        let e = P2pConfig::parse(
            "[p2p]\nsupernode = \"http://a:1\"\nlisten = \"0.0.0.0:1\"\nfanout = 3\n",
        )
        .unwrap_err();
        assert!(e.contains("fanout"), "{e}");
    }

    #[test]
    fn plain_http_off_loopback_needs_the_explicit_override() {
        let base = "[p2p]\nsupernode = \"http://10.1.0.1:7443\"\nlisten = \"0.0.0.0:7070\"\n";
        let e = P2pConfig::parse(base).unwrap_err();
        assert!(e.contains("allow_insecure"), "{e}");
        assert!(P2pConfig::parse(&format!("{base}allow_insecure = true\n")).is_ok());
        let local = "[p2p]\nsupernode = \"http://127.0.0.1:7443\"\nlisten = \"127.0.0.1:7070\"\n";
        assert!(P2pConfig::parse(local).is_ok());
        let e = P2pConfig::parse(&format!("{local}advertise = \"node7:7070\"\n")).unwrap_err();
        assert!(e.contains("ip:port"), "{e}");
    }

    #[test]
    fn listeners_off_loopback_need_tls_and_a_token() {
        let tls = TlsConfig {
            cert: "c".into(),
            key: "k".into(),
            ca: "a".into(),
        };
        let open: SocketAddr = "0.0.0.0:7070".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let mut s = Security::default();
        assert!(s.check_listener("peer", local, None).is_ok());
        let e = s
            .check_listener("peer", open, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("TLS and a cluster token"), "{e}");
        s.tls = Some(tls);
        assert!(s.check_listener("peer", open, None).is_err());
        assert!(s.check_listener("peer", open, Some("t")).is_ok());
        let insecure = Security {
            allow_insecure: true,
            ..Security::default()
        };
        assert!(insecure.check_listener("peer", open, None).is_ok());
        assert_eq!(url_host("http://[::1]:7443/x"), "::1");
        assert_eq!(url_host("https://sn.example:7443"), "sn.example");
        assert_eq!(url_host("10.0.0.1:7070"), "10.0.0.1");
    }
}
