//! `lazybd-snapshotter`: serves containerd's Snapshots API on a unix socket.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use lazybd_blockdev::device::{LayerManager, NodeConfig};
use lazybd_blockdev::local_server::{bind_unix, PeerPolicy};
use lazybd_snapshotter::config::Config;
use lazybd_snapshotter::control::Stop;
use lazybd_snapshotter::remote::Remote;
use lazybd_snapshotter::service::LazySnapshotter;
use lazybd_snapshotter::{containerd_events, control, metrics, tasks};
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{error, info, warn};

/// containerd snapshotter (proxy plugin) that mounts lazybd layers lazily
/// and behaves like the overlayfs snapshotter for all other layers.
///
/// Settings come from --config (TOML, see docs/snapshotter.md), then the
/// flags, which override it.
#[derive(Parser)]
#[command(name = "lazybd-snapshotter", version)]
struct Args {
    /// Snapshots, metadata and lazy layer caches [default: /var/lib/lazybd-snapshotter].
    #[arg(long)]
    root: Option<PathBuf>,
    /// Unix socket for containerd's proxy plugin [default: /run/lazybd/snapshotter.sock].
    #[arg(long)]
    address: Option<PathBuf>,
    /// Unix socket of the control API [default: /run/lazybd/control.sock].
    #[arg(long)]
    control_address: Option<PathBuf>,
    /// HOST:PORT for Prometheus metrics at /metrics; "" for none [default: 127.0.0.1:9880].
    #[arg(long)]
    metrics_address: Option<String>,
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(root) = args.root {
        config.root = root;
    }
    if let Some(address) = args.address {
        config.address = address;
    }
    if let Some(address) = args.control_address {
        config.control_address = address;
    }
    if let Some(address) = args.metrics_address {
        config.metrics_address = address;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(config))
}

async fn serve(mut config: Config) -> Result<()> {
    // Signals first: a restart must be stoppable at any point, also while
    // it attaches its layers again.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(None::<Stop>);
    let keychain = match &config.cri_keychain {
        Some(_) => {
            // The root as the snapshotter makes it; only the keychain's
            // own directory is 0700.
            std::fs::create_dir_all(&config.root)
                .with_context(|| format!("creating {}", config.root.display()))?;
            let dir = config.root.join("cri-keychain");
            let keychain = lazybd_snapshotter::cri_keychain::Keychain::open(&dir)
                .with_context(|| format!("opening the CRI keychain in {}", dir.display()))?;
            Some(Arc::new(keychain))
        }
        None => None,
    };
    config.registry.keychain = keychain.clone();
    let mut node = NodeConfig::new(config.root.join("lazy"));
    node.fetch.read_deadline = config.read_deadline();
    node.prefetch_rate = config.prefetch.rate_bytes_per_sec;
    node.lazy_read_ahead_kb = config.lazy_read_ahead_kb;
    node.warm_startup = config.warm_startup;
    // A P2P peer sends the stored bytes it was sent: keep them.
    node.fetch.keep_stored = config.p2p.is_some();
    node.fd_store = config.restart.fd_store()?;
    // Resumes the previous run's FUSE session if the fd store kept it:
    // reads that waited through the restart are served from here on.
    let manager = LayerManager::new(node).context("setting up the lazy layer manager")?;
    if config.remote.allow_unanchored_layers {
        warn!(
            "[remote] allow_unanchored_layers: version 1 layers are attached without a content \
             anchor; every registry, mirror, super node and peer serving them is trusted \
             (docs/security.md)"
        );
    }
    let mut remote = Remote::new(manager, config.registry.clone())
        .with_unanchored_layers(config.remote.allow_unanchored_layers)
        .with_cache_capacity(config.cache.capacity_bytes)
        .with_traces(Arc::new(lazybd_snapshotter::traces::Traces::new(
            &config.root.join("traces"),
            config.trace.clone(),
        )));
    if let Some(p2p) = &config.p2p {
        let peer = lazybd_blockdev::p2p::PeerNode::start(p2p.clone())
            .await
            .context("starting the P2P peer")?;
        remote = remote.with_peer(peer);
    }
    let snapshotter = Arc::new(
        LazySnapshotter::open_store(&config.root, remote)
            .with_context(|| format!("opening {}", config.root.display()))?,
    );

    let mut side_tasks = tokio::task::JoinSet::new();
    if !config.metrics_address.is_empty() {
        let addr: std::net::SocketAddr = config
            .metrics_address
            .parse()
            .with_context(|| format!("metrics_address {:?}", config.metrics_address))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics address {addr}"))?;
        side_tasks.spawn(metrics::serve(listener, snapshotter.clone()));
    }
    let peers = PeerPolicy {
        extra_uids: config.control_allowed_uids.clone(),
    };
    let control_listener = bind_unix(&config.control_address, peers.socket_mode())?;
    let containers = Arc::new(tasks::Containers::new(config.prefetch.on_task_start));
    let control = control::Control {
        snapshotter: snapshotter.clone(),
        containers: containers.clone(),
        stop: Some(stop_tx.clone()),
    };
    side_tasks.spawn(control::serve(control_listener, Arc::new(control), peers));
    let (ctd, s, c) = (config.containerd.clone(), snapshotter.clone(), containers);
    side_tasks.spawn(async move {
        containerd_events::watch(ctd, s, c).await;
        Ok(())
    });
    if let (Some(kc), Some(keychain)) = (&config.cri_keychain, keychain) {
        side_tasks.spawn(serve_cri_keychain(kc.clone(), keychain).await?);
    }
    // Only containerd (root) speaks the Snapshots API. Bound now, served
    // after the restore: containerd's requests wait in the backlog instead
    // of seeing layers that are not attached yet.
    let listener = bind_unix(&config.address, 0o600)?;

    let signals = async {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = int.recv() => info!("SIGINT: stopping"),
            _ = stop_rx.wait_for(Option::is_some) => {}
        }
    };
    tokio::pin!(signals);
    let restored = tokio::select! {
        r = restore(&snapshotter) => { r?; true }
        _ = &mut signals => false,
    };
    if restored {
        if config.cache.capacity_bytes > 0 {
            let (s, every) = (
                snapshotter.clone(),
                std::time::Duration::from_secs(config.cache.evict_interval_secs.max(1)),
            );
            side_tasks.spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    s.remote().evict().await;
                }
            });
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        info!(
            "serving snapshots on {} (root {})",
            config.address.display(),
            config.root.display()
        );
        containerd_snapshots::tonic::transport::Server::builder()
            .add_service(containerd_snapshots::server(snapshotter.clone()))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signals)
            .await
            .context("serving the Snapshots API")?;
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let manager = snapshotter.remote().manager();
    // A signal hands over when the FUSE session outlives us; the control
    // API's `shutdown` (or no fd store) detaches as before.
    let how = stop_tx.borrow().unwrap_or(if manager.can_hand_over() {
        Stop::HandOver
    } else {
        Stop::Detach
    });
    if how == Stop::HandOver {
        side_tasks.abort_all();
        manager.hand_over().await;
        // Nothing may unmount or detach on the way out: exit right here.
        std::process::exit(0);
    }
    side_tasks.shutdown().await;
    let _ = std::fs::remove_file(&config.address);
    let _ = std::fs::remove_file(&config.control_address);
    if let Some(kc) = &config.cri_keychain {
        let _ = std::fs::remove_file(&kc.listen);
    }
    // The gRPC server has stopped accepting, but the handlers of requests
    // it had accepted (a Remove, a Mounts) still hold the service for a
    // moment: wait for them, bounded, or the layers would stay attached
    // with nobody serving them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while Arc::strong_count(&snapshotter) > 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let manager = match Arc::try_unwrap(snapshotter) {
        Ok(s) => s.into_remote().into_manager().await,
        Err(_) => None,
    };
    match manager {
        Some(m) => {
            if let Err(e) = m.shutdown().await {
                error!("detaching lazy layers: {e}");
            }
        }
        None => error!("requests or attaches still running at shutdown; lazy layers stay attached"),
    }
    Ok(())
}

/// Attaches every lazy layer committed before (adopting what a resumed
/// session left mounted) and ends the restore.
async fn restore(snapshotter: &LazySnapshotter) -> Result<()> {
    let started = std::time::Instant::now();
    snapshotter
        .reattach()
        .await
        .context("attaching the committed lazy layers again")?;
    snapshotter.remote().manager().end_restore().await;
    info!("lazy layers attached again in {:?}", started.elapsed());
    Ok(())
}

/// Binds the CRI keychain's socket now (a bad path stops the daemon before
/// it serves); the returned future serves it.
async fn serve_cri_keychain(
    kc: lazybd_snapshotter::cri_keychain::CriKeychainConfig,
    keychain: Arc<lazybd_snapshotter::cri_keychain::Keychain>,
) -> Result<impl std::future::Future<Output = std::io::Result<()>>> {
    use k8s_cri::v1::image_service_server::ImageServiceServer;
    use lazybd_snapshotter::cri_keychain::ImageProxy;
    // Only kubelet (root) speaks CRI to it.
    let listener = bind_unix(&kc.listen, 0o600).context("cri_keychain.listen")?;
    info!(
        "CRI image service on {} (forwarded to {})",
        kc.listen.display(),
        kc.containerd_cri.display()
    );
    let proxy = ImageProxy::new(&kc, keychain);
    Ok(async move {
        let served = containerd_snapshots::tonic::transport::Server::builder()
            .add_service(ImageServiceServer::new(proxy))
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await;
        served.map_err(|e| {
            error!("CRI image service on {}: {e}", kc.listen.display());
            std::io::Error::other(e)
        })
    })
}
