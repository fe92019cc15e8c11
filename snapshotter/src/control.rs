//! The control API (docs/snapshotter.md#control-api): one JSON request per
//! line on a unix socket, one JSON reply line. The shim reports task starts
//! and exits (`containerd-shim-lazybd-v2`'s hook; what they do is in
//! [`crate::tasks`]); `lazybd layers` lists the attached layers, their
//! fetch state and the containers using them.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use crate::service::LazySnapshotter;
use crate::tasks::{self, lower_dirs, Containers, Outcome, Phase, TaskStarted};

/// Requests are small; a longer line is refused, not buffered.
const MAX_LINE: u64 = 1 << 20;
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

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

pub async fn serve(listener: UnixListener, control: Arc<Control>) -> std::io::Result<()> {
    info!("control API on {:?}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let c = control.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(CONNECTION_DEADLINE, handle(stream, &c)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!("control connection: {e}"),
                Err(_) => warn!("control connection: no request within {CONNECTION_DEADLINE:?}"),
            }
        });
    }
}

async fn handle(stream: UnixStream, control: &Control) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(MAX_LINE)).lines();
    while let Some(line) = lines.next_line().await? {
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
