//! `lazybd-supernode`: one per datacenter, the root of lazybd's P2P
//! distribution (see docs/p2p.md).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use lazybd_blockdev::p2p::{Security, Supernode, SupernodeConfig, TlsConfig};
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

/// Serve lazybd blob chunks to a datacenter's nodes and keep their peer trees.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// Registry (`host[:port]`) it may fetch from; repeat for several.
    #[arg(long = "registry", required = true)]
    registries: Vec<String>,
    /// Talk plain HTTP to the registries (loopback or trusted networks only).
    #[arg(long)]
    plain_http: bool,
    /// Directory for the block cache (its `blocks/` subdirectory is cleared
    /// at start).
    #[arg(long, default_value = "/var/cache/lazybd-supernode")]
    cache_dir: PathBuf,
    /// Cache capacity in MiB; least recently used blocks go first.
    #[arg(long, default_value_t = 10240)]
    cache_mib: u64,
    /// Cache and registry request granularity in KiB.
    #[arg(long, default_value_t = 1024)]
    block_kib: u64,
    /// Children per node in each blob's peer tree (the super node included).
    #[arg(long, default_value_t = 4)]
    fanout: usize,
    /// Peers silent for this many milliseconds leave the trees.
    #[arg(long, default_value_t = 15_000)]
    member_ttl_ms: u64,
    /// How long a registry's yes to a client's credentials is trusted, ms.
    #[arg(long, default_value_t = 60_000)]
    auth_ttl_ms: u64,
    /// Longest wait for one block from the registry, ms.
    #[arg(long, default_value_t = 30_000)]
    registry_timeout_ms: u64,
    /// Most blobs with peer trees at once (more: peers use the super node).
    #[arg(long, default_value_t = 100_000)]
    max_blobs: usize,
    /// Shared secret peers must send (X-Lazybd-Token); read from this file.
    /// Required (with TLS) unless --listen is loopback or --allow-insecure.
    #[arg(long)]
    cluster_token_file: Option<PathBuf>,
    /// Serve plain HTTP and/or without a token on an address off loopback:
    /// registry credentials and tickets then cross the network in clear.
    /// Only for test beds and networks trusted as a whole; logged loudly.
    #[arg(long)]
    allow_insecure: bool,
    /// Ed25519 private key (PKCS#8 PEM: `openssl genpkey -algorithm
    /// ed25519`) that signs the peers' tickets. Without it, a new key is
    /// made at every start (nodes fetch it from /v1/keys).
    #[arg(long)]
    ticket_key: Option<PathBuf>,
    /// Public key (SPKI PEM: `openssl pkey -pubout`) of an earlier
    /// --ticket-key whose tickets are still accepted (key rotation);
    /// repeatable.
    #[arg(long = "ticket-verify-key")]
    ticket_verify_keys: Vec<PathBuf>,
    /// How long a ticket is valid, seconds (renewed at every heartbeat
    /// after half of it).
    #[arg(long, default_value_t = 600)]
    ticket_ttl_secs: u64,
    /// Memory for responses being written at once, MiB.
    #[arg(long, default_value_t = 512)]
    response_budget_mib: u64,
    /// Registry requests (block fetches and access checks) at once.
    #[arg(long, default_value_t = 64)]
    max_registry_fetches: usize,
    /// PEM certificate chain for TLS (with --tls-key and --tls-ca).
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let tls = match (a.tls_cert, a.tls_key, a.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(TlsConfig { cert, key, ca }),
        _ => None,
    };
    let config = SupernodeConfig {
        listen: a.listen,
        registries: a.registries,
        plain_http: a.plain_http,
        cache_dir: a.cache_dir,
        cache_capacity: a.cache_mib << 20,
        block_size: (a.block_kib << 10).max(4096),
        fanout: a.fanout.max(1),
        member_ttl: Duration::from_millis(a.member_ttl_ms),
        auth_ttl: Duration::from_millis(a.auth_ttl_ms),
        registry_timeout: Duration::from_millis(a.registry_timeout_ms),
        max_blobs: a.max_blobs,
        security: Security {
            cluster_token: None,
            cluster_token_file: a.cluster_token_file,
            tls,
            allow_insecure: a.allow_insecure,
        },
        ticket_key: a.ticket_key,
        ticket_verify_keys: a.ticket_verify_keys,
        ticket_ttl: Duration::from_secs(a.ticket_ttl_secs.max(10)),
        response_budget: a.response_budget_mib.max(1) << 20,
        max_registry_fetches: a.max_registry_fetches.max(1),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let node = Supernode::new(config).context("starting the super node")?;
        let (addr, server) = node.start().await?;
        // Tests and scripts wait for this line.
        println!("listening on {addr}");
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        server.abort();
        info!("super node stopped");
        anyhow::Ok(())
    })
}
