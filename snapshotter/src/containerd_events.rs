//! Task starts and exits from containerd itself, so a container gets its
//! lazy layers prefetched, handed off and traced whatever runtime runs it
//! (`io.containerd.runc.v2` as much as `containerd-shim-lazybd-v2`, which
//! also reports through the control API; [`crate::tasks`] acts once).
//!
//! A session: connect to containerd's socket, subscribe to `/tasks/start`
//! and `/tasks/exit`, then list the running tasks (what started while no
//! session ran is found there; the subscription comes first so nothing
//! falls between), then follow the stream. A start is mapped to its
//! container's rootfs: the containers service names the container's
//! snapshotter and snapshot key, and containerd's snapshots service that
//! snapshot's mounts (containerd keys snapshots on its side; only it knows
//! which of ours is the container's). Containers on other snapshotters are
//! left alone.
//!
//! When containerd is not there or restarts, the session ends; the next one
//! is tried after a backoff (1 s doubling to 30 s), with one log line when
//! containerd goes and one when it is back.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use containerd_client::events::{TaskExit, TaskStart};
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::namespaces_client::NamespacesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::MountsRequest;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    Envelope, GetContainerRequest, ListNamespacesRequest, ListTasksRequest, SubscribeRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Request, Status};
use containerd_client::types::v1::Status as TaskStatus;
use prost::Message;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::config::ContainerdConfig;
use crate::service::LazySnapshotter;
use crate::tasks::{self, lower_dirs, Containers, Phase, TaskStarted};

pub const TOPIC_START: &str = "/tasks/start";
pub const TOPIC_EXIT: &str = "/tasks/exit";
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Connecting, subscribing, and each lookup a start needs.
const CALL_DEADLINE: Duration = Duration::from_secs(10);
/// How long the subscription is given to reach containerd before the
/// running tasks are listed.
const SUBSCRIBE_HEAD_START: Duration = Duration::from_millis(100);
/// Starts being looked up at once; the stream waits beyond that.
const MAX_IN_FLIGHT: usize = 16;
/// Running tasks taken from one namespace's listing at a session's start.
const MAX_LISTED_TASKS: usize = 10_000;

/// Follows containerd's task events until the task is dropped. Returns at
/// once when `config.address` is empty.
pub async fn watch(
    config: ContainerdConfig,
    snapshotter: Arc<LazySnapshotter>,
    containers: Arc<Containers>,
) {
    if config.address.as_os_str().is_empty() {
        return info!(
            "[containerd] address is empty: only containerd-shim-lazybd-v2 reports task starts"
        );
    }
    let watcher = Watcher {
        config,
        snapshotter,
        containers,
    };
    let mut backoff = MIN_BACKOFF;
    // The last failure logged, so a containerd that stays away is one line.
    let mut down: Option<String> = None;
    loop {
        let mut connected = false;
        let ended = watcher.session(&mut connected, &mut down).await;
        let reason = match ended {
            Ok(()) => "the event stream ended".to_owned(),
            Err(e) => e,
        };
        if connected {
            backoff = MIN_BACKOFF;
        }
        if down.as_deref() != Some(reason.as_str()) {
            warn!(
                "containerd at {}: {reason}; task starts under runtimes other than \
                 containerd-shim-lazybd-v2 go unnoticed until it is back (retrying, every \
                 {MAX_BACKOFF:?} at most)",
                watcher.config.address.display()
            );
            down = Some(reason);
        } else {
            debug!(
                "containerd at {}: still {reason}",
                watcher.config.address.display()
            );
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

struct Watcher {
    config: ContainerdConfig,
    snapshotter: Arc<LazySnapshotter>,
    containers: Arc<Containers>,
}

impl Watcher {
    /// One connection: subscribe, catch up on running tasks, follow the
    /// stream. `connected` is set once connected; `down` is cleared then.
    async fn session(&self, connected: &mut bool, down: &mut Option<String>) -> Result<(), String> {
        let address = &self.config.address;
        let channel = deadline("connecting", containerd_client::connect(address))
            .await?
            .map_err(|e| format!("connecting: {}", chain(&e)))?;
        let filters = vec![
            format!("topic==\"{TOPIC_START}\""),
            format!("topic==\"{TOPIC_EXIT}\""),
        ];
        // containerd answers a subscription only with its first event (Go
        // gRPC sends the headers with the first message), which may be
        // hours away: the call runs on its own, without a deadline, while
        // the running tasks are listed. A start seen both in the listing
        // and as an event is acted on once (`tasks::started`).
        let mut events = EventsClient::new(channel.clone());
        let subscribed =
            tokio::spawn(async move { events.subscribe(SubscribeRequest { filters }).await });
        // Let the subscription reach containerd before the listing does.
        tokio::time::sleep(SUBSCRIBE_HEAD_START).await;
        *connected = true;
        let again = if down.take().is_some() {
            ", again: it is back"
        } else {
            ""
        };
        info!(
            "following task events of containerd at {} (namespaces: {}){again}",
            address.display(),
            self.namespaces_text()
        );
        let mut lookups = JoinSet::new();
        self.catch_up(&channel, &mut lookups).await;
        let mut stream = subscribed
            .await
            .map_err(|e| format!("subscribing to task events: {e}"))?
            .map_err(|e| format!("subscribing to task events: {}", e.message()))?
            .into_inner();
        loop {
            let envelope = match stream.message().await {
                Ok(Some(e)) => e,
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("the event stream failed: {}", e.message())),
            };
            while lookups.len() >= MAX_IN_FLIGHT {
                lookups.join_next().await;
            }
            // Reap finished lookups as we go, so the set stays small.
            while lookups.try_join_next().is_some() {}
            self.on_event(&channel, envelope, &mut lookups);
        }
    }

    fn namespaces_text(&self) -> String {
        if self.config.namespaces.is_empty() {
            "all".into()
        } else {
            self.config.namespaces.join(", ")
        }
    }

    fn watches(&self, namespace: &str) -> bool {
        self.config.namespaces.is_empty() || self.config.namespaces.iter().any(|n| n == namespace)
    }

    fn on_event(&self, channel: &Channel, envelope: Envelope, lookups: &mut JoinSet<()>) {
        if !self.watches(&envelope.namespace) {
            return;
        }
        let Some(event) = envelope.event else { return };
        let ns = envelope.namespace;
        match envelope.topic.as_str() {
            TOPIC_START => match TaskStart::decode(&event.value[..]) {
                Ok(start) => {
                    let lookup = self.lookup(channel, ns, start.container_id, start.pid);
                    lookups.spawn(lookup.run(Phase::Starting));
                }
                Err(e) => warn!("containerd event {TOPIC_START} in {ns}: {e}"),
            },
            TOPIC_EXIT => match TaskExit::decode(&event.value[..]) {
                // Exits of exec'd processes carry their own id.
                Ok(exit) if exit.id.is_empty() || exit.id == exit.container_id => {
                    tasks::exited(&self.containers, &ns, &exit.container_id, exit.pid)
                }
                Ok(_) => {}
                Err(e) => warn!("containerd event {TOPIC_EXIT} in {ns}: {e}"),
            },
            _ => {}
        }
    }

    fn lookup(
        &self,
        channel: &Channel,
        namespace: String,
        container_id: String,
        pid: u32,
    ) -> Lookup {
        Lookup {
            channel: channel.clone(),
            snapshotter_name: self.config.snapshotter.clone(),
            snapshotter: self.snapshotter.clone(),
            containers: self.containers.clone(),
            namespace,
            container_id,
            pid,
        }
    }

    /// Tasks that run already (started before this session, or while
    /// containerd was away) count as found running; containers this daemon
    /// thought running that no longer are, as exited.
    async fn catch_up(&self, channel: &Channel, lookups: &mut JoinSet<()>) {
        let namespaces = if self.config.namespaces.is_empty() {
            match list_namespaces(channel).await {
                Ok(n) => n,
                Err(e) => return warn!("listing containerd's namespaces: {e}"),
            }
        } else {
            self.config.namespaces.clone()
        };
        for ns in namespaces {
            let tasks = match list_tasks(channel, &ns).await {
                Ok(t) => t,
                Err(e) => {
                    warn!("listing the tasks of containerd namespace {ns}: {e}");
                    continue;
                }
            };
            let mut running = HashSet::new();
            for t in tasks.into_iter().take(MAX_LISTED_TASKS) {
                let alive = [TaskStatus::Running, TaskStatus::Paused, TaskStatus::Pausing]
                    .iter()
                    .any(|s| *s as i32 == t.status);
                if !alive {
                    continue;
                }
                // containerd 1.6 names a listed task by `id` (its
                // container's id) and leaves `container_id` empty.
                let container_id = if t.container_id.is_empty() {
                    t.id
                } else {
                    t.container_id
                };
                if container_id.is_empty() {
                    continue;
                }
                running.insert(format!("{ns}/{container_id}"));
                while lookups.len() >= MAX_IN_FLIGHT {
                    lookups.join_next().await;
                }
                let lookup = self.lookup(channel, ns.clone(), container_id, t.pid);
                lookups.spawn(lookup.run(Phase::FoundRunning));
            }
            for gone in self.containers.retain_running(&ns, &running) {
                info!("container {gone} no longer runs (its exit was missed)");
            }
        }
    }
}

/// Finds a started task's rootfs and hands the start to [`tasks`].
struct Lookup {
    channel: Channel,
    snapshotter_name: String,
    snapshotter: Arc<LazySnapshotter>,
    containers: Arc<Containers>,
    namespace: String,
    container_id: String,
    pid: u32,
}

impl Lookup {
    async fn run(self, phase: Phase) {
        let lowers = match self.rootfs_lowers().await {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                return warn!(
                    "container {}/{}: {e}; no prefetch or trace for it from containerd's events",
                    self.namespace, self.container_id
                )
            }
        };
        let started = TaskStarted {
            namespace: self.namespace,
            container_id: self.container_id,
            pid: self.pid,
            lowers,
            phase,
        };
        tasks::started(&self.snapshotter, &self.containers, started).await;
    }

    /// The overlay lower dirs of the container's rootfs; `None` when the
    /// container is on another snapshotter.
    async fn rootfs_lowers(&self) -> Result<Option<Vec<PathBuf>>, String> {
        let ns = self.namespace.as_str();
        let req = GetContainerRequest {
            id: self.container_id.clone(),
        };
        let container = deadline(
            "looking up the container",
            ContainersClient::new(self.channel.clone()).get(namespaced(req, ns)),
        )
        .await?
        .map_err(|e| format!("looking up the container: {}", e.message()))?
        .into_inner()
        .container
        .ok_or("containerd returned no container")?;
        if container.snapshotter != self.snapshotter_name || container.snapshot_key.is_empty() {
            debug!(
                "container {ns}/{}: on snapshotter {:?}, not ours",
                self.container_id, container.snapshotter
            );
            return Ok(None);
        }
        let req = MountsRequest {
            snapshotter: container.snapshotter.clone(),
            key: container.snapshot_key.clone(),
        };
        let mounts = deadline(
            "reading the rootfs mounts",
            SnapshotsClient::new(self.channel.clone()).mounts(namespaced(req, ns)),
        )
        .await?
        .map_err(|e| {
            format!(
                "reading the mounts of snapshot {:?}: {}",
                container.snapshot_key,
                e.message()
            )
        })?
        .into_inner()
        .mounts;
        Ok(Some(lower_dirs(mounts.iter().flat_map(|m| &m.options))))
    }
}

async fn list_namespaces(channel: &Channel) -> Result<Vec<String>, String> {
    let reply = deadline(
        "listing namespaces",
        NamespacesClient::new(channel.clone()).list(ListNamespacesRequest::default()),
    )
    .await?
    .map_err(|e: Status| e.message().to_owned())?;
    Ok(reply
        .into_inner()
        .namespaces
        .into_iter()
        .map(|n| n.name)
        .collect())
}

async fn list_tasks(
    channel: &Channel,
    namespace: &str,
) -> Result<Vec<containerd_client::types::v1::Process>, String> {
    let req = namespaced(ListTasksRequest::default(), namespace);
    let reply = deadline("listing tasks", TasksClient::new(channel.clone()).list(req))
        .await?
        .map_err(|e| e.message().to_owned())?;
    Ok(reply.into_inner().tasks)
}

fn namespaced<T>(message: T, namespace: &str) -> Request<T> {
    let mut req = Request::new(message);
    // containerd's namespace header; a namespace name is ASCII (containerd
    // validates it), so this never fails for names it sent us.
    if let Ok(v) = namespace.parse() {
        req.metadata_mut().insert("containerd-namespace", v);
    }
    req
}

/// `fut`, or an error naming `what` after [`CALL_DEADLINE`].
async fn deadline<T>(what: &str, fut: impl std::future::Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(CALL_DEADLINE, fut)
        .await
        .map_err(|_| format!("{what}: no answer within {CALL_DEADLINE:?}"))
}

/// An error with its sources: tonic's transport errors say little at the top.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}
