//! What a container's task start and exit do to its lazy layers: the
//! background prefetch (and so the handoff to the local cache file), and
//! the startup trace (replayed when the image has one, else recorded).
//!
//! Two reporters feed it: `containerd-shim-lazybd-v2` through the control
//! API ([`crate::control`]), and containerd's own task events
//! ([`crate::containerd_events`]), which cover containers under any
//! runtime, `io.containerd.runc.v2` included. A container under our shim is
//! reported by both, in either order, so every report is idempotent: the
//! first report of a task (container and pid) acts, the others only answer
//! with its layers; a start reported after that task's exit is ignored.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lazybd_blockdev::oci::LayerId;
use tracing::{debug, info, warn};

use crate::service::LazySnapshotter;
use crate::traces::trace_key;

/// Exits remembered so a late duplicate start of the same task is
/// recognised; older ones are forgotten first.
const REMEMBERED_EXITS: usize = 4096;

/// A task start, from either reporter.
#[derive(Debug, Clone)]
pub struct TaskStarted {
    pub namespace: String,
    pub container_id: String,
    /// The task's init pid; 0 when the reporter does not know it (then any
    /// report for the container counts as the same task).
    pub pid: u32,
    /// The overlay lower dirs of the container's rootfs, top first.
    pub lowers: Vec<PathBuf>,
    /// Whether the start is happening now, or the task was found running
    /// (by a reconnect to containerd, or after a restart of this daemon):
    /// then its startup is over, and only the prefetch is left to do.
    pub phase: Phase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting,
    FoundRunning,
}

/// What a start report led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The first report of this task: its layers, acted on.
    Started(Vec<LayerId>),
    /// The task was reported already: its layers, nothing done again.
    AlreadyKnown(Vec<LayerId>),
    /// The task exited already (a late report): nothing done.
    Exited,
}

impl Outcome {
    pub fn layers(&self) -> &[LayerId] {
        match self {
            Outcome::Started(l) | Outcome::AlreadyKnown(l) => l,
            Outcome::Exited => &[],
        }
    }
}

struct Running {
    pid: u32,
    layers: Vec<LayerId>,
}

#[derive(Default)]
struct Table {
    /// By `namespace/container`.
    running: HashMap<String, Running>,
    exited: VecDeque<(String, u32)>,
}

/// Running containers and the lazy layers under them.
#[derive(Default)]
pub struct Containers {
    table: Mutex<Table>,
    /// A task start prefetches the container's lazy layers.
    prefetch_on_start: bool,
}

/// Two reports name the same task when their pids agree, or one does not
/// know the pid.
fn same_task(a: u32, b: u32) -> bool {
    a == b || a == 0 || b == 0
}

impl Containers {
    pub fn new(prefetch_on_start: bool) -> Self {
        Containers {
            table: Mutex::default(),
            prefetch_on_start,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the start of task `pid` of container `id` on `layers`,
    /// unless it is known already or exited; atomic, so two reporters
    /// racing on one start act once.
    fn claim(&self, id: &str, pid: u32, layers: Vec<LayerId>) -> Outcome {
        let mut t = self.table();
        if let Some(r) = t.running.get(id) {
            if same_task(r.pid, pid) {
                return Outcome::AlreadyKnown(r.layers.clone());
            }
        }
        if pid != 0 && t.exited.iter().any(|(e, p)| e == id && *p == pid) {
            return Outcome::Exited;
        }
        // A new pid for a known container: its task was started again.
        t.running.insert(
            id.to_owned(),
            Running {
                pid,
                layers: layers.clone(),
            },
        );
        Outcome::Started(layers)
    }

    /// Records the exit of task `pid` of container `id`; whether it was
    /// running.
    pub fn exited(&self, id: &str, pid: u32) -> bool {
        let mut t = self.table();
        let was_running = t.running.get(id).is_some_and(|r| same_task(r.pid, pid));
        if was_running {
            t.running.remove(id);
        }
        if pid != 0 && !t.exited.iter().any(|(e, p)| e == id && *p == pid) {
            if t.exited.len() >= REMEMBERED_EXITS {
                t.exited.pop_front();
            }
            t.exited.push_back((id.to_owned(), pid));
        }
        was_running
    }

    /// Forgets the running containers of `namespace` that are not in
    /// `running` (`namespace/container`): their exits were missed.
    pub fn retain_running(&self, namespace: &str, running: &HashSet<String>) -> Vec<String> {
        let prefix = format!("{namespace}/");
        let mut t = self.table();
        let gone: Vec<String> = t
            .running
            .keys()
            .filter(|id| id.starts_with(&prefix) && !running.contains(*id))
            .cloned()
            .collect();
        for id in &gone {
            t.running.remove(id);
        }
        gone
    }

    /// Running containers by the layers under them.
    pub fn by_layer(&self) -> BTreeMap<LayerId, Vec<String>> {
        let mut out: BTreeMap<LayerId, Vec<String>> = BTreeMap::new();
        for (container, r) in self.table().running.iter() {
            for id in &r.layers {
                out.entry(id.clone()).or_default().push(container.clone());
            }
        }
        for v in out.values_mut() {
            v.sort();
        }
        out
    }
}

/// A task started (or was found running): prefetch its container's lazy
/// layers and replay or record the image's startup trace, once per task.
pub async fn started(
    snapshotter: &Arc<LazySnapshotter>,
    containers: &Containers,
    ev: TaskStarted,
) -> Outcome {
    let id = format!("{}/{}", ev.namespace, ev.container_id);
    let layers = lazy_layers_of(snapshotter, &ev.lowers);
    let outcome = containers.claim(&id, ev.pid, layers.clone());
    match &outcome {
        Outcome::Started(_) => {}
        Outcome::AlreadyKnown(_) => {
            debug!("container {id} (pid {}): start reported again", ev.pid);
            return outcome;
        }
        Outcome::Exited => {
            debug!(
                "container {id} (pid {}): start reported after its exit",
                ev.pid
            );
            return outcome;
        }
    }
    if ev.phase == Phase::FoundRunning {
        info!(
            "container {id} found running on {} lazy layers",
            layers.len()
        );
        if containers.prefetch_on_start {
            prefetch(snapshotter, &id, &layers);
        }
        return outcome;
    }
    info!("container {id} started on {} lazy layers", layers.len());
    let chain = snapshotter
        .remote()
        .lazy_chain(ev.lowers.iter().map(PathBuf::as_path));
    // Only the local trace here, to answer at once. A trace on the super
    // node is looked for by the recording task.
    let replayed = snapshotter.remote().replay_trace(&chain, false).await;
    let recording = !replayed && start_recording(snapshotter, &id, &chain, containers);
    if containers.prefetch_on_start && !recording {
        match snapshotter.remote().traces().filter(|_| replayed) {
            // The replay fetches what the trace says the startup reads;
            // what else it reads still misses, and a full prefetch now
            // would take the link from those misses. So it waits for the
            // startup window, as after a recording.
            Some(traces) => prefetch_after(snapshotter, &id, &layers, traces.record_window()),
            None => prefetch(snapshotter, &id, &layers),
        }
    }
    outcome
}

/// A task exited: its container no longer counts as running on its layers.
pub fn exited(containers: &Containers, namespace: &str, container_id: &str, pid: u32) {
    let id = format!("{namespace}/{container_id}");
    if containers.exited(&id, pid) {
        info!("container {id} exited");
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

/// The overlay lower dirs in the options of a rootfs mount, top first.
pub fn lower_dirs<'a>(options: impl IntoIterator<Item = &'a String>) -> Vec<PathBuf> {
    options
        .into_iter()
        .filter_map(|o| o.strip_prefix("lowerdir="))
        .flat_map(|l| l.split(':'))
        .map(PathBuf::from)
        .collect()
}

/// The attached layers whose EROFS mounts are among `lowers`.
fn lazy_layers_of(snapshotter: &LazySnapshotter, lowers: &[PathBuf]) -> Vec<LayerId> {
    snapshotter
        .remote()
        .manager()
        .layers()
        .into_iter()
        .filter(|l| lowers.iter().any(|d| Path::new(d) == l.mountpoint))
        .map(|l| l.id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8) -> LayerId {
        LayerId::anchored(&format!("sha256:{}", hex_of(n))).unwrap()
    }

    fn hex_of(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    #[test]
    fn a_start_reported_twice_acts_once() {
        let c = Containers::new(true);
        let layers = vec![layer(1), layer(2)];
        assert_eq!(
            c.claim("k8s.io/a", 42, layers.clone()),
            Outcome::Started(layers.clone())
        );
        // The other reporter, with or without the pid.
        assert_eq!(
            c.claim("k8s.io/a", 42, layers.clone()),
            Outcome::AlreadyKnown(layers.clone())
        );
        assert_eq!(
            c.claim("k8s.io/a", 0, vec![]),
            Outcome::AlreadyKnown(layers.clone())
        );
        assert_eq!(c.by_layer()[&layer(1)], ["k8s.io/a"]);
    }

    #[test]
    fn a_start_reported_after_the_exit_is_ignored_and_a_restart_acts() {
        let c = Containers::new(true);
        assert!(matches!(
            c.claim("ns/a", 7, vec![layer(1)]),
            Outcome::Started(_)
        ));
        assert!(c.exited("ns/a", 7));
        // One reporter is late with the start, and with the exit.
        assert_eq!(c.claim("ns/a", 7, vec![layer(1)]), Outcome::Exited);
        assert!(!c.exited("ns/a", 7));
        assert!(c.by_layer().is_empty());
        // The container's task is started again: a new pid.
        assert!(matches!(
            c.claim("ns/a", 8, vec![layer(1)]),
            Outcome::Started(_)
        ));
        // An exit of another pid is not this task's.
        assert!(!c.exited("ns/a", 9));
        assert_eq!(c.by_layer()[&layer(1)], ["ns/a"]);
    }

    #[test]
    fn remembered_exits_are_bounded() {
        let c = Containers::new(false);
        for pid in 1..=(REMEMBERED_EXITS as u32 + 10) {
            c.exited("ns/x", pid);
        }
        assert_eq!(c.table().exited.len(), REMEMBERED_EXITS);
        // The oldest ones were forgotten: such a start acts again.
        assert!(matches!(c.claim("ns/x", 1, vec![]), Outcome::Started(_)));
    }

    #[test]
    fn missed_exits_are_dropped_per_namespace() {
        let c = Containers::new(false);
        c.claim("a/1", 1, vec![layer(1)]);
        c.claim("a/2", 2, vec![layer(1)]);
        c.claim("b/1", 3, vec![layer(1)]);
        let still: HashSet<String> = ["a/2".to_string()].into();
        assert_eq!(c.retain_running("a", &still), ["a/1"]);
        assert_eq!(c.by_layer()[&layer(1)], ["a/2", "b/1"]);
    }

    #[test]
    fn lower_dirs_of_overlay_options() {
        let opts: Vec<String> = vec![
            "index=off".into(),
            "workdir=/w".into(),
            "upperdir=/u".into(),
            "lowerdir=/l1:/l2".into(),
        ];
        assert_eq!(
            lower_dirs(&opts),
            [PathBuf::from("/l1"), PathBuf::from("/l2")]
        );
    }
}
