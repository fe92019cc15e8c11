//! Server mode: the long-lived shim process `start` launched, serving the
//! task service on the socket it inherited as fd 3.

use std::{
    collections::HashMap,
    os::{
        fd::{FromRawFd, RawFd},
        unix::net::UnixListener,
    },
    sync::Arc,
};

use anyhow::{bail, Context};
use containerd_shim::{asynchronous::ExitSignal, publisher::RemotePublisher, Flags};
use containerd_shim_protos::{
    shim_async::{create_task, Task},
    ttrpc::r#async::{transport::Listener, Server},
};
use log::{info, warn};
use tokio::signal::unix::{signal, SignalKind};

use crate::{events::Events, hook::ControlSocketHook, reaper::Reaper, service::TaskService};

/// The listening socket `start` passes to the server.
pub const LISTENER_FD: RawFd = 3;

/// containerd 1.6/1.7 call `containerd.task.v2.Task`, 2.x `…v3.Task`; the
/// messages are the same, so the one service answers under both names.
fn task_services(
    task: Arc<dyn Task + Send + Sync>,
) -> HashMap<String, containerd_shim_protos::ttrpc::r#async::Service> {
    let v2 = create_task(task.clone())
        .into_iter()
        .map(|(name, service)| {
            (
                name.replace("containerd.task.v3.", "containerd.task.v2."),
                service,
            )
        });
    create_task(task).into_iter().chain(v2).collect()
}

pub async fn serve(flags: &Flags) -> anyhow::Result<()> {
    if let Err(e) = containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id)
    {
        eprintln!("shim log fifo unavailable: {e}");
    }
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").context("TTRPC_ADDRESS is not set")?;
    // SAFETY: `start` hands the bound socket over as this descriptor; nothing
    // else in this process uses it.
    let listener = unsafe { UnixListener::from_raw_fd(LISTENER_FD) };
    if listener.local_addr().is_err() {
        bail!("fd {LISTENER_FD} is not the shim socket: run the shim through `start`");
    }
    listener.set_nonblocking(true)?;

    let (reaper, exits) = Reaper::start().context("become a subreaper")?;
    let publisher = RemotePublisher::new(&ttrpc_address)
        .await
        .with_context(|| format!("connect to containerd events at {ttrpc_address}"))?;
    let events = Arc::new(Events::new(publisher, &flags.namespace));
    let exit = Arc::new(ExitSignal::default());
    let task = TaskService::new(
        &flags.namespace,
        reaper,
        exits,
        events,
        ControlSocketHook::from_env(),
        exit.clone(),
    );

    let mut server = Server::new()
        .add_listener(Listener::try_from(listener)?)
        .register_service(task_services(Arc::new(task)));
    server.start().await?;
    release_start_parent();
    info!("shim serving {}", flags.socket);

    // containerd stops shims with Shutdown; signals only get logged, as in
    // the Go shim, so a stray SIGTERM to the process group cannot orphan
    // running containers.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = exit.wait() => break,
            _ = term.recv() => warn!("SIGTERM ignored: containerd stops the shim with Shutdown"),
            _ = int.recv() => warn!("SIGINT ignored: containerd stops the shim with Shutdown"),
        }
    }
    info!("shutting down");
    if let Err(e) = server.shutdown().await {
        warn!("server shutdown: {e}");
    }
    let path = flags.socket.trim_start_matches("unix://");
    if let Err(e) = std::fs::remove_file(path) {
        warn!("remove socket {path}: {e}");
    }
    Ok(())
}

/// `start` reads our stdout until it closes. The ready line, then pointing
/// stdout at stderr (/dev/null), tells it the server is up; a close without
/// the line (we exited) tells it we failed. The line matters because the
/// close alone races with `start`'s check whether we have exited yet.
fn release_start_parent() {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(crate::start::SERVER_READY)
        .and_then(|()| stdout.flush())
    {
        warn!("release start: {e}");
    }
    drop(stdout);
    // SAFETY: dup2 on the process's own standard descriptors.
    if unsafe { libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) } < 0 {
        warn!("release start: {}", std::io::Error::last_os_error());
    }
}
