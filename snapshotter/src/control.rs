//! The control API (docs/snapshotter.md#control-api): one JSON request per
//! line on a unix socket, one JSON reply line. The shim reports task starts
//! and exits (`containerd-shim-lazybd-v2`'s hook; what they do is in
//! [`crate::tasks`]); `lazybd layers` lists the attached layers, their
//! fetch state and the containers using them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lazybd_blockdev::local_server::{accept_failed, PeerPolicy, Slot, Slots};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use crate::service::LazySnapshotter;
use crate::tasks::{self, lower_dirs, Containers, Outcome, Phase, TaskStarted};

/// What one connection may send in all: requests are small (a task-start
/// names a rootfs of at most a page of mount options); past it the
/// connection ends, nothing longer is buffered.
const MAX_INPUT: u64 = 64 << 10;
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// Connections at once; a new one pushes out the oldest that has not sent
/// its first request (the shim connects once per task event).
const MAX_CONNECTIONS: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Request {
    Op { op: Op },
    Event(TaskEvent),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Op {
    Layers,
    /// Planned upgrade: stop and leave everything to the next daemon.
    Handover,
    /// Stop and detach every layer no container uses (the FUSE session
    /// ends: lazy layers under running containers fail until a next start).
    Shutdown,
}

/// How the daemon stops (a signal or the control API says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Leave everything attached and the FUSE session in the fd store.
    HandOver,
    /// Detach what no container uses and unmount.
    Detach,
}

/// What the shim sends (the shim's `hook::TaskEvent`).
#[derive(Debug, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
enum TaskEvent {
    TaskStart {
        namespace: String,
        container_id: String,
        /// 0 when absent: any report of the container is then the same task.
        #[serde(default)]
        pid: u32,
        #[serde(default)]
        rootfs: Vec<RootfsMount>,
    },
    TaskExit {
        namespace: String,
        container_id: String,
        #[serde(default)]
        pid: u32,
    },
}

#[derive(Debug, Deserialize)]
struct RootfsMount {
    #[serde(default)]
    options: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerState {
    /// The blob digest the layer was attached as.
    pub digest: String,
    /// The anchor its index was checked against (`null`: an unanchored
    /// version 1 layer the operator allowed). One digest may be attached
    /// with several anchors: they are different layers.
    pub anchor: Option<String>,
    pub mountpoint: String,
    /// `lazy` (through FUSE, fetched on demand), `fetching` (a background
    /// prefetch runs) or `local` (complete; the loop device reads the local
    /// cache file, this process is out of the data path).
    pub state: String,
    pub chunks_present: u64,
    pub chunks_total: u64,
    /// `namespace/container` of running containers on this layer.
    pub containers: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LayersReply {
    pub layers: Vec<LayerState>,
}

/// What the control API acts on.
pub struct Control {
    pub snapshotter: Arc<LazySnapshotter>,
    pub containers: Arc<Containers>,
    /// Where `handover` and `shutdown` requests go (`None`: refused).
    pub stop: Option<tokio::sync::watch::Sender<Option<Stop>>>,
}

/// Serves the control API on `listener` to the callers `peers` allows.
/// Accept errors are logged and waited out, never fatal.
pub async fn serve(
    listener: UnixListener,
    control: Arc<Control>,
    peers: PeerPolicy,
) -> std::io::Result<()> {
    info!("control API on {:?}", listener.local_addr()?);
    let slots = Slots::new(MAX_CONNECTIONS);
    let last_error_log = Mutex::new(None);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                accept_failed("control API", &e, &slots, &last_error_log).await;
                continue;
            }
        };
        if let Err(why) = peers.check(&stream) {
            warn!("control API: refused a caller: {why}");
            continue;
        }
        let Some(mut slot) = slots.admit() else {
            continue;
        };
        let c = control.clone();
        tokio::spawn(async move {
            let eviction = slot.eviction();
            tokio::select! {
                handled = tokio::time::timeout(CONNECTION_DEADLINE, handle(stream, &slot, &c)) => match handled {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!("control connection: {e}"),
                    Err(_) => warn!("control connection: not done within {CONNECTION_DEADLINE:?}"),
                },
                _ = eviction.wait() => debug!("control connection: closed before its first request to make room"),
            }
        });
    }
}

async fn handle(stream: UnixStream, slot: &Slot, control: &Control) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(MAX_INPUT)).lines();
    while let Some(line) = lines.next_line().await? {
        slot.busy();
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => answer(req, control).await,
            Err(e) => serde_json::json!({ "error": format!("bad request: {e}") }),
        };
        write.write_all(format!("{reply}\n").as_bytes()).await?;
    }
    Ok(())
}

async fn answer(req: Request, control: &Control) -> serde_json::Value {
    let (snapshotter, containers) = (&control.snapshotter, &*control.containers);
    match req {
        Request::Op {
            op: op @ (Op::Handover | Op::Shutdown),
        } => {
            let Some(stop) = &control.stop else {
                return serde_json::json!({ "error": "this daemon cannot be stopped from here" });
            };
            let how = if let Op::Handover = op {
                if !snapshotter.remote().manager().can_hand_over() {
                    return serde_json::json!({
                        "error": "no fd store keeps the FUSE session: a handover would fail \
                                  reads of lazy layers (configure [restart], docs/operations.md)"
                    });
                }
                Stop::HandOver
            } else {
                Stop::Detach
            };
            info!("control API: stopping ({how:?})");
            let _ = stop.send(Some(how));
            serde_json::json!({ "ok": true })
        }
        Request::Op { op: Op::Layers } => {
            // The layers Prepares are attaching behind their commits count
            // as attached: listed once those attaches ended.
            snapshotter.remote().settle().await;
            let users = containers.by_layer();
            let layers = snapshotter
                .remote()
                .manager()
                .layers()
                .into_iter()
                .map(|l| LayerState {
                    state: l.state.as_str().into(),
                    containers: users.get(&l.id).cloned().unwrap_or_default(),
                    mountpoint: l.mountpoint.display().to_string(),
                    anchor: l.anchor,
                    digest: l.digest,
                    chunks_present: l.chunks_present,
                    chunks_total: l.chunks_total,
                })
                .collect();
            serde_json::to_value(LayersReply { layers }).expect("plain data")
        }
        Request::Event(TaskEvent::TaskStart {
            namespace,
            container_id,
            pid,
            rootfs,
        }) => {
            let started = TaskStarted {
                namespace,
                container_id,
                pid,
                lowers: lower_dirs(rootfs.iter().flat_map(|m| &m.options)),
                phase: Phase::Starting,
            };
            let outcome = tasks::started(snapshotter, containers, started).await;
            serde_json::json!({
                "ok": true,
                "layers": outcome.layers(),
                "duplicate": !matches!(outcome, Outcome::Started(_)),
            })
        }
        Request::Event(TaskEvent::TaskExit {
            namespace,
            container_id,
            pid,
        }) => {
            tasks::exited(containers, &namespace, &container_id, pid);
            serde_json::json!({ "ok": true })
        }
    }
}
