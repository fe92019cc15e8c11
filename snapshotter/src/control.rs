//! The control API (docs/snapshotter.md#control-api): one JSON request per
//! line on a unix socket, one JSON reply line. The shim reports task starts
//! and exits (`containerd-shim-lazybd-v2`'s hook); `lazybd layers` lists
//! the attached layers, their fetch state and the containers using them.
//! The background prefetch and the startup traces (record, replay) act on
//! the same events.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lazybd_blockdev::oci::LayerId;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use crate::service::LazySnapshotter;
use crate::traces::trace_key;

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
        #[serde(default)]
        rootfs: Vec<RootfsMount>,
    },
    TaskExit {
        namespace: String,
        container_id: String,
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

/// Running containers and the lazy layers under them.
#[derive(Default)]
pub struct Containers {
    layers: Mutex<HashMap<String, Vec<LayerId>>>,
    /// A task start prefetches the container's lazy layers.
    prefetch_on_start: bool,
    /// Where `handover` and `shutdown` requests go.
    stop: Option<tokio::sync::watch::Sender<Option<Stop>>>,
}

impl Containers {
    pub fn new(prefetch_on_start: bool) -> Self {
        Containers {
            layers: Mutex::default(),
            prefetch_on_start,
            stop: None,
        }
    }

    /// `handover` and `shutdown` requests are sent to `stop`.
    pub fn with_stop(mut self, stop: tokio::sync::watch::Sender<Option<Stop>>) -> Self {
        self.stop = Some(stop);
        self
    }

    /// Running containers by the layers under them.
    pub fn by_layer(&self) -> BTreeMap<LayerId, Vec<String>> {
        let mut out: BTreeMap<LayerId, Vec<String>> = BTreeMap::new();
        for (container, ids) in self.layers.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            for id in ids {
                out.entry(id.clone()).or_default().push(container.clone());
            }
        }
        for v in out.values_mut() {
            v.sort();
        }
        out
    }
}

pub async fn serve(
    listener: UnixListener,
    snapshotter: Arc<LazySnapshotter>,
    containers: Arc<Containers>,
) -> std::io::Result<()> {
    info!("control API on {:?}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let (s, c) = (snapshotter.clone(), containers.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(CONNECTION_DEADLINE, handle(stream, &s, &c)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!("control connection: {e}"),
                Err(_) => warn!("control connection: no request within {CONNECTION_DEADLINE:?}"),
            }
        });
    }
}

async fn handle(
    stream: UnixStream,
    snapshotter: &Arc<LazySnapshotter>,
    containers: &Containers,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(MAX_LINE)).lines();
    while let Some(line) = lines.next_line().await? {
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => answer(req, snapshotter, containers).await,
            Err(e) => serde_json::json!({ "error": format!("bad request: {e}") }),
        };
        write.write_all(format!("{reply}\n").as_bytes()).await?;
    }
    Ok(())
}

async fn answer(
    req: Request,
    snapshotter: &Arc<LazySnapshotter>,
    containers: &Containers,
) -> serde_json::Value {
    match req {
        Request::Op {
            op: op @ (Op::Handover | Op::Shutdown),
        } => {
            let Some(stop) = &containers.stop else {
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
            rootfs,
        }) => {
            let layers = lazy_layers_of(snapshotter, &rootfs);
            let id = format!("{namespace}/{container_id}");
            info!("container {id} started on {} lazy layers", layers.len());
            let lowers = lower_dirs(&rootfs);
            let chain = snapshotter
                .remote()
                .lazy_chain(lowers.iter().map(|d| Path::new(*d)));
            // Only the local trace here, to answer at once. A trace on the
            // super node is looked for by the recording task.
            let replayed = snapshotter.remote().replay_trace(&chain, false).await;
            let recording = !replayed && start_recording(snapshotter, &id, &chain, containers);
            if containers.prefetch_on_start && !recording {
                match snapshotter.remote().traces().filter(|_| replayed) {
                    // The replay fetches what the trace says the startup
                    // reads; what else it reads still misses, and a full
                    // prefetch now would take the link from those misses.
                    // So it waits for the startup window, as after a
                    // recording.
                    Some(traces) => {
                        prefetch_after(snapshotter, &id, &layers, traces.record_window())
                    }
                    None => prefetch(snapshotter, &id, &layers),
                }
            }
            containers
                .layers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, layers.clone());
            serde_json::json!({ "ok": true, "layers": layers })
        }
        Request::Event(TaskEvent::TaskExit {
            namespace,
            container_id,
        }) => {
            let id = format!("{namespace}/{container_id}");
            if containers
                .layers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id)
                .is_some()
            {
                info!("container {id} exited");
            }
            serde_json::json!({ "ok": true })
        }
    }
}

fn prefetch(snapshotter: &LazySnapshotter, id: &str, layers: &[LayerId]) {
    let manager = snapshotter.remote().manager();
    for l in layers {
        if let Err(e) = manager.prefetch(l) {
            warn!("container {id}: prefetching layer {l}: {e}");
        }
    }
}

/// `prefetch` once `delay` has passed, unless the snapshotter shuts down
/// meanwhile (only a Weak is held until then).
fn prefetch_after(
    snapshotter: &Arc<LazySnapshotter>,
    id: &str,
    layers: &[LayerId],
    delay: Duration,
) {
    let (weak, id, layers) = (Arc::downgrade(snapshotter), id.to_owned(), layers.to_vec());
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        if let Some(s) = weak.upgrade() {
            prefetch(&s, &id, &layers);
        }
    });
}

/// Records the image's startup trace if it has none and no recording of it
/// runs: the on-demand misses of the next `record_secs`, then stored (and
/// uploaded). The full prefetch, if wanted, starts when the window ends:
/// chunks it fetched first would not show up as misses, and the trace would
/// miss what the container needs. Returns whether it records.
fn start_recording(
    snapshotter: &Arc<LazySnapshotter>,
    id: &str,
    chain: &[LayerId],
    containers: &Containers,
) -> bool {
    let Some(traces) = snapshotter.remote().traces().filter(|t| t.config.record) else {
        return false;
    };
    if chain.is_empty() {
        return false;
    }
    let key = trace_key(chain);
    let Some(guard) = traces.begin_recording(&key) else {
        return false;
    };
    let manager = snapshotter.remote().manager();
    manager.start_trace(chain);
    info!(
        "container {id}: recording the startup trace {key} for {:?}",
        traces.record_window()
    );
    // The task holds the snapshotter only for moments (a Weak otherwise):
    // a shutdown during the window must still be able to detach the layers.
    let (weak, traces, peer, stats) = (
        Arc::downgrade(snapshotter),
        traces.clone(),
        snapshotter.remote().peer().cloned(),
        manager.counters().clone(),
    );
    let (id, chain, prefetch_after) = (id.to_owned(), chain.to_vec(), containers.prefetch_on_start);
    let end = tokio::time::Instant::now() + traces.record_window();
    tokio::spawn(async move {
        let _guard = guard;
        // The Prepare may have missed the super node's trace (it waits for
        // it only briefly): if it has one, replay that and drop the recording.
        let found = match &peer {
            Some(p) => traces.load(&key, &chain, Some(p), &stats).await,
            None => None,
        };
        if found.is_none() {
            tokio::time::sleep_until(end).await;
        }
        let Some(s) = weak.upgrade() else {
            return info!("container {id}: shutting down; trace {key} not stored");
        };
        let manager = s.remote().manager();
        let recorded = manager.stop_trace(&chain);
        if let Some(t) = &found {
            let started = manager.replay_trace(t);
            info!("container {id}: replaying the super node's trace {key} on {started} layers; recording dropped");
        }
        if prefetch_after {
            prefetch(&s, &id, &chain);
        }
        drop(s);
        if found.is_some() {
            return;
        }
        if recorded.is_empty() {
            info!("container {id}: no on-demand reads in the trace window; nothing stored");
        } else {
            traces
                .store(&key, &chain, &recorded, peer.as_deref(), &stats)
                .await;
        }
    });
    true
}

/// The overlay lower dirs of the rootfs, top first.
fn lower_dirs(rootfs: &[RootfsMount]) -> Vec<&str> {
    rootfs
        .iter()
        .flat_map(|m| &m.options)
        .filter_map(|o| o.strip_prefix("lowerdir="))
        .flat_map(|l| l.split(':'))
        .collect()
}

/// The attached layers whose EROFS mounts are lower dirs of the rootfs.
fn lazy_layers_of(snapshotter: &LazySnapshotter, rootfs: &[RootfsMount]) -> Vec<LayerId> {
    let lowers = lower_dirs(rootfs);
    snapshotter
        .remote()
        .manager()
        .layers()
        .into_iter()
        .filter(|l| lowers.iter().any(|d| Path::new(d) == l.mountpoint))
        .map(|l| l.id)
        .collect()
}
