//! `lazybd mount IMAGE DIR`: attach every layer of a converted image as a
//! lazy block device and stack them read-only with overlayfs at DIR.
//!
//! The process that serves FUSE must keep running while DIR is mounted. By
//! default `lazybd mount` starts itself again in the background (new session,
//! log in ROOT/mounts/<id>/mount.log), waits until the mount is ready or has
//! failed, and returns; `--foreground` serves in the calling process. Either
//! way `lazybd umount DIR` unmounts everything and stops it.
//!
//! Restart and upgrade: with an fd store (`--fd-store`, a `lazybd
//! fd-holder` by default when its socket exists) the FUSE session outlives
//! the process. Running `lazybd mount` again for the same DIR after the
//! process died resumes it: reads that waited meanwhile succeed.
//! `--take-over` asks a running process to hand over to this one (a new
//! binary), without unmounting anything and without a failed read.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lazybd_blockdev::device::{mounts, FdStoreKind, LayerManager, NodeConfig};
use lazybd_blockdev::local_server::{accept_failed, bind_unix, PeerPolicy, Slot, Slots};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::image_source::OpenImage;
use crate::mount_control::{MountState, StatusReply, DEFAULT_ROOT};

/// Lazily mount every layer of a converted image, stacked read-only at DIR.
#[derive(clap::Args)]
pub struct Args {
    /// The converted image: `oci:DIR[:TAG]`, an OCI image layout directory
    /// (`DIR` or `DIR:TAG`), or a registry reference `HOST[:PORT]/REPO[:TAG]`.
    image: String,
    /// Existing directory to mount the image at.
    dir: PathBuf,
    /// State, chunk caches and the daemon's log live under ROOT/mounts/<id>/.
    #[arg(long, default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// Serve in this process (log to stderr) instead of in the background.
    #[arg(long)]
    foreground: bool,
    /// Reads that cannot be served within this many seconds (all sources
    /// down) fail with EIO instead of hanging.
    #[arg(long, default_value_t = 60)]
    read_deadline: u64,
    /// Fetch every layer fully in the background (reads go first); each
    /// complete layer's loop device then reads the local cache file, so
    /// its reads no longer depend on this process.
    #[arg(long)]
    prefetch: bool,
    /// Bandwidth of the background prefetch in bytes per second; 0 = unlimited.
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    prefetch_rate: u64,
    /// Record the image ranges every layer was read at, first read first,
    /// from the moment the mount is ready until it is unmounted; written to
    /// FILE at the unmount (docs/blockdev.md), a startup profile for
    /// `lazybd convert --profile`.
    #[arg(long, value_name = "FILE")]
    record_trace: Option<PathBuf>,
    /// Fetch the chunks of this trace (from --record-trace) first, in
    /// parallel, behind reads and ahead of --prefetch.
    #[arg(long, value_name = "FILE")]
    replay_trace: Option<PathBuf>,
    #[command(flatten)]
    registry: crate::registry_args::RegistryArgs,
    /// Take part in P2P distribution: the TOML file with the `[p2p]` table
    /// (super node, peer listen address, timeouts, token, TLS; docs/p2p.md).
    /// Registry images only.
    #[arg(long)]
    p2p_config: Option<PathBuf>,
    /// Where the FUSE session waits while no process serves it: `auto`
    /// (systemd's fd store under systemd, else the fd holder if its socket
    /// exists), `systemd`, `holder` or `none`.
    #[arg(long, default_value = "auto")]
    fd_store: String,
    /// The socket of `lazybd fd-holder`.
    #[arg(long, default_value = lazybd_blockdev::device::holder::DEFAULT_SOCKET)]
    fd_holder: PathBuf,
    /// DIR is served by a running `lazybd mount`: ask it to hand over to
    /// this process (an upgrade) instead of failing.
    #[arg(long)]
    take_over: bool,
    /// Also mount version 1 layers, which carry no content anchor: their
    /// bytes are then only as trustworthy as every source that serves them
    /// (docs/security.md).
    #[arg(long)]
    allow_unanchored: bool,
    /// Internal: the background child; reports readiness on stdout.
    #[arg(long, hide = true)]
    daemon_child: bool,
}

pub fn run(args: Args) -> Result<()> {
    if !args.foreground && !args.daemon_child {
        return daemonize(&args);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let daemon_child = args.daemon_child;
    let result = runtime.block_on(serve(args));
    if let (true, Err(e)) = (daemon_child, &result) {
        // The waiting parent shows this line to the user.
        println!("error: {e:#}");
    }
    result
}

/// Starts the background child and waits for its first line: `ready`, or
/// nothing (it failed; its log says why).
fn daemonize(args: &Args) -> Result<()> {
    let state = MountState::for_target(&args.root, &args.dir)?;
    std::fs::create_dir_all(&state.dir)
        .with_context(|| format!("creating {}", state.dir.display()))?;
    let log = std::fs::File::create(state.log())
        .with_context(|| format!("creating {}", state.log().display()))?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("mount")
        .arg("--daemon-child")
        .arg("--root")
        .arg(&args.root)
        .arg("--read-deadline")
        .arg(args.read_deadline.to_string())
        .arg("--prefetch-rate")
        .arg(args.prefetch_rate.to_string())
        .arg("--fd-store")
        .arg(&args.fd_store)
        .arg("--fd-holder")
        .arg(&args.fd_holder)
        .args(args.take_over.then_some("--take-over"))
        .args(args.prefetch.then_some("--prefetch"))
        .args(args.allow_unanchored.then_some("--allow-unanchored"))
        .args(
            args.record_trace
                .iter()
                .flat_map(|p| ["--record-trace".as_ref(), p.as_os_str()]),
        )
        .args(
            args.replay_trace
                .iter()
                .flat_map(|p| ["--replay-trace".as_ref(), p.as_os_str()]),
        )
        .args(args.registry.to_args())
        .args(
            args.p2p_config
                .iter()
                .flat_map(|p| ["--p2p-config".as_ref(), p.as_os_str()]),
        )
        .arg(&args.image)
        .arg(&args.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the child from our
    // terminal and process group so it outlives this command.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(Into::into));
    }
    let mut child = cmd.spawn().context("starting the mount daemon")?;
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped stdout");
    BufReader::new(stdout).read_line(&mut line)?;
    let line = line.trim_end();
    if line == "ready" {
        println!(
            "mounted {} at {} (daemon pid {}, log {}); stop it with `lazybd umount {}`",
            args.image,
            args.dir.display(),
            child.id(),
            state.log().display(),
            args.dir.display()
        );
        return Ok(());
    }
    let status = child.wait()?;
    let reason = line.strip_prefix("error: ").unwrap_or("no reason given");
    bail!(
        "mount failed ({status}): {reason}\n(log: {})",
        state.log().display()
    )
}

async fn serve(args: Args) -> Result<()> {
    let state = MountState::for_target(&args.root, &args.dir)?;
    let target = args.dir.canonicalize()?;
    let fd_store =
        FdStoreKind::parse(&args.fd_store, &args.fd_holder).map_err(anyhow::Error::msg)?;
    if let Some(status) = state.request("stats", Duration::from_secs(2))? {
        if !args.take_over {
            bail!("{} is already lazily mounted", target.display());
        }
        take_over(&state, &status)?;
    }
    // A stack left by a previous process of this DIR (it died, or handed
    // over) stays: its layers are attached again below it.
    let ours = std::fs::read(state.dir.join("target"))
        .is_ok_and(|t| t == target.as_os_str().as_encoded_bytes());
    let stack_left = mounts::is_mount_point(&target)?;
    if stack_left && !ours {
        bail!("{} is already a mount point", target.display());
    }
    // Checked before anything is mounted; absolute, for the background child.
    let replay = match &args.replay_trace {
        Some(p) => Some((crate::trace_file::load(p)?, p.clone())),
        None => None,
    };
    let record = args
        .record_trace
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .context("--record-trace")?;
    let image = OpenImage::open(&args.image, &args.registry).await?;
    let mut layers = image.lazy_layers(&args.image, args.allow_unanchored)?;
    let peer = match &args.p2p_config {
        Some(path) => Some(crate::mount_p2p::start(path, &image, &mut layers).await?),
        None => None,
    };
    std::fs::create_dir_all(&state.dir)?;
    let mut config = NodeConfig::new(state.node_root());
    config.fetch.read_deadline = Duration::from_secs(args.read_deadline);
    config.prefetch_rate = args.prefetch_rate;
    config.fd_store = fd_store;
    // A peer sends the stored bytes it was sent: keep them.
    config.fetch.keep_stored = peer.is_some();
    let manager = LayerManager::new(config)?;

    let mut ids = Vec::new();
    let mounted = async {
        let mut lowers = Vec::new();
        for layer in layers {
            let blob_size = layer.blob_size;
            let attached = manager.attach(layer).await?;
            crate::mount_p2p::attached(&peer, &image, &manager, &attached.id, blob_size).await;
            ids.push(attached.id);
            lowers.push(attached.mountpoint);
        }
        // The replay first: a prefetch started after it waits for it.
        if let Some((trace, path)) = &replay {
            crate::trace_file::replay(&manager, trace, path);
        }
        manager.end_restore().await;
        if args.prefetch {
            for id in &ids {
                manager.prefetch(id)?;
            }
        }
        lowers.reverse(); // overlayfs wants the top layer first
        if stack_left {
            info!(
                "{} stays mounted from before; serving it again",
                target.display()
            );
        } else {
            mounts::mount_stack(&lowers, &target)?;
        }
        anyhow::Ok(lowers.len())
    }
    .await;
    if record.is_some() {
        manager.start_trace(&ids);
    }
    let layer_count = match mounted {
        Ok(n) => n,
        Err(e) => {
            crate::mount_p2p::shutdown(&peer).await;
            if let Err(e) = manager.shutdown().await {
                error!("cleaning up after the failed mount: {e}");
            }
            return Err(e);
        }
    };
    // Root and this process's user only (0600, callers checked).
    let listener = bind_unix(&state.socket(), 0o600)?;
    std::fs::write(
        state.dir.join("target"),
        target.as_os_str().as_encoded_bytes(),
    )?;
    info!(
        "mounted {} ({layer_count} layers) at {}",
        args.image,
        target.display()
    );
    if args.daemon_child {
        println!("ready");
        std::io::stdout().flush()?;
        // Nobody reads our stdout any more.
        let devnull = std::fs::File::open("/dev/null")?;
        nix::unistd::dup2_stdout(devnull)?;
    }

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let (requests_tx, mut requests) = tokio::sync::mpsc::channel(MAX_CONNECTIONS);
    let acceptor = tokio::spawn(accept_requests(listener, requests_tx));
    let requester = loop {
        tokio::select! {
            Some(request) = requests.recv() => {
                let Request { line, stream, slot } = request;
                match answer(&line, &args.image, &target, &manager, &peer) {
                    Answer::Reply(text) => spawn_reply(stream, slot, text),
                    Answer::HandOver => {
                        acceptor.abort();
                        let _ = std::fs::remove_file(state.socket());
                        manager.hand_over().await;
                        reply(stream, "ok").await;
                        info!("handed {} over; exiting", target.display());
                        // Nothing may unmount on the way out.
                        std::process::exit(0);
                    }
                    // A shutdown request: unmount the stack first; if it is
                    // busy, say so and keep serving.
                    Answer::Shutdown => match mounts::unmount(&target, false) {
                        Ok(()) => break Some(stream),
                        Err(e) => spawn_reply(stream, slot, format!("error: {e}")),
                    },
                }
            }
            _ = sigterm.recv() => break None,
            _ = sigint.recv() => break None,
        }
    };
    // Stops accepting; the listener goes with the task.
    acceptor.abort();
    let _ = acceptor.await;
    if requester.is_none() {
        // A signal: the stack may be busy; detach it lazily so the layers
        // below can go.
        if let Err(e) = mounts::unmount(&target, false) {
            warn!("{e}; detaching lazily");
            let _ = mounts::unmount(&target, true);
        }
    }
    let _ = std::fs::remove_file(state.socket());
    if let Some(path) = &record {
        crate::trace_file::save(&manager, &ids, path);
    }
    crate::mount_p2p::shutdown(&peer).await;
    let result = manager.shutdown().await;
    let _ = std::fs::remove_file(state.dir.join("target"));
    info!("unmounted {}", target.display());
    if let Some(stream) = requester {
        let text = match &result {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("error: {e}"),
        };
        reply(stream, &text).await;
    }
    result.map_err(Into::into)
}

/// Control connections at once; a new one pushes out the oldest that has
/// not sent its request yet.
const MAX_CONNECTIONS: usize = 16;
/// Requests are one word; a longer line is cut here, never buffered.
const MAX_REQUEST_LINE: u64 = 256;
/// The request line must arrive within this, and a reply be taken.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// One request line and the connection to answer on.
struct Request {
    line: String,
    stream: UnixStream,
    slot: Slot,
}

enum Answer {
    Reply(String),
    Shutdown,
    /// A planned upgrade: leave everything to the next process.
    HandOver,
}

/// Accepts control connections (root and this process's user only), reads
/// each one's request line concurrently, and hands it to the main loop,
/// which owns the layer manager. Accept errors are logged and waited out.
async fn accept_requests(listener: UnixListener, to_main: tokio::sync::mpsc::Sender<Request>) {
    let slots = Slots::new(MAX_CONNECTIONS);
    let peers = PeerPolicy::root_and_self();
    let last_error_log = std::sync::Mutex::new(None);
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                accept_failed("control socket", &e, &slots, &last_error_log).await;
                continue;
            }
        };
        if let Err(why) = peers.check(&stream) {
            warn!("control socket: refused a caller: {why}");
            continue;
        }
        let Some(mut slot) = slots.admit() else {
            continue;
        };
        let to_main = to_main.clone();
        tokio::spawn(async move {
            let eviction = slot.eviction();
            let read = tokio::time::timeout(REQUEST_DEADLINE, read_request(&mut stream));
            let line = tokio::select! {
                line = read => line,
                _ = eviction.wait() => return,
            };
            match line {
                Ok(Ok(line)) => {
                    slot.busy();
                    let _ = to_main.send(Request { line, stream, slot }).await;
                }
                Ok(Err(e)) => warn!("control request: {e}"),
                Err(_) => warn!("control request: no request line within {REQUEST_DEADLINE:?}"),
            }
        });
    }
}

async fn read_request(stream: &mut UnixStream) -> std::io::Result<String> {
    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(stream, MAX_REQUEST_LINE))
        .read_line(&mut line)
        .await?;
    Ok(line)
}

/// The answer to one request line.
fn answer(
    line: &str,
    image: &str,
    target: &Path,
    manager: &LayerManager,
    peer: &Option<std::sync::Arc<lazybd_blockdev::p2p::PeerNode>>,
) -> Answer {
    let json =
        |v: serde_json::Result<String>| Answer::Reply(v.unwrap_or_else(|e| format!("error: {e}")));
    match line.trim_end() {
        "stats" => json(serde_json::to_string(&StatusReply {
            image: image.to_owned(),
            target: target.to_owned(),
            pid: std::process::id(),
            layers: manager.layers(),
            stats: manager.stats(),
        })),
        "p2p-stats" => match peer {
            Some(p) => json(serde_json::to_string(&p.stats())),
            None => Answer::Reply("error: not taking part in P2P".to_owned()),
        },
        "shutdown" => Answer::Shutdown,
        "handover" if manager.can_hand_over() => Answer::HandOver,
        "handover" => {
            Answer::Reply("error: no fd store keeps the FUSE session (see --fd-store)".to_owned())
        }
        other => {
            let shown: String = other.chars().take(64).collect();
            Answer::Reply(format!("error: unknown request {shown:?}"))
        }
    }
}

/// Asks the running process to hand over, and waits (bounded) until it
/// has exited: its caches are ours to open then.
fn take_over(state: &MountState, status: &str) -> Result<()> {
    let pid = serde_json::from_str::<StatusReply>(status)
        .context("the running process's status")?
        .pid;
    match state.request("handover", Duration::from_secs(60))? {
        Some(r) if r == "ok" => {}
        Some(r) => bail!("the running process refused to hand over: {r}"),
        None => return Ok(()),
    }
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while nix::sys::signal::kill(pid, None).is_ok() {
        if std::time::Instant::now() > deadline {
            bail!("process {pid} handed over but did not exit within 30s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    info!("process {pid} handed over; taking over");
    Ok(())
}

/// Writes the reply in the background (a slow reader holds only its own
/// slot, until the deadline).
fn spawn_reply(stream: UnixStream, slot: Slot, text: String) {
    tokio::spawn(async move {
        reply(stream, &text).await;
        drop(slot);
    });
}

async fn reply(mut stream: UnixStream, text: &str) {
    let line = format!("{text}\n");
    let _ = tokio::time::timeout(REQUEST_DEADLINE, stream.write_all(line.as_bytes())).await;
}
