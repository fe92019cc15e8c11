//! A private `lazybd-snapshotter` on a temp root and socket, and a gRPC
//! client to it (containerd's own Snapshots API client).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::tonic::transport::Channel;
use serde_json::{json, Value};

use crate::bin_path;
use crate::daemon::{Daemon, Stopped};
use crate::registry::Registry;

/// What the daemon logs once it serves the Snapshots API.
const SERVING: &str = "serving snapshots on";

/// How long the daemon may take to detach its lazy layers on SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(30);

pub struct SnapshotterDaemon {
    daemon: Daemon,
    pub root: PathBuf,
    pub socket: PathBuf,
    pub control: PathBuf,
    config: PathBuf,
    log: PathBuf,
    metrics_address: String,
    /// The network namespace it runs in (the test's own when None).
    netns: Option<String>,
    /// Started as systemd would, with this stand-in as its fd store.
    systemd: Option<std::sync::Arc<crate::fdstore::SystemdStore>>,
}

impl SnapshotterDaemon {
    /// Starts the daemon under `dir` (its root is `dir/root`) with
    /// `config_toml` as its config file (written next to it).
    pub fn start(dir: &Path, config_toml: &str) -> SnapshotterDaemon {
        Self::launch(dir, config_toml, None, "127.0.0.1:0", None)
    }

    /// [`SnapshotterDaemon::start`] as systemd starts a `Type=notify`
    /// service with an fd store (`store`, the stand-in).
    pub fn start_under_systemd(
        dir: &Path,
        config_toml: &str,
        store: std::sync::Arc<crate::fdstore::SystemdStore>,
    ) -> SnapshotterDaemon {
        Self::launch(dir, config_toml, None, "127.0.0.1:0", Some(store))
    }

    /// [`SnapshotterDaemon::start`] inside network namespace `netns`, its
    /// metrics on `metrics_address` there.
    pub fn start_in_netns(
        dir: &Path,
        config_toml: &str,
        netns: &str,
        metrics_address: &str,
    ) -> SnapshotterDaemon {
        Self::launch(dir, config_toml, Some(netns), metrics_address, None)
    }

    fn launch(
        dir: &Path,
        config_toml: &str,
        netns: Option<&str>,
        metrics_address: &str,
        systemd: Option<std::sync::Arc<crate::fdstore::SystemdStore>>,
    ) -> SnapshotterDaemon {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("snapshotter.toml");
        std::fs::write(&config, config_toml).unwrap();
        let paths = (
            dir.join("root"),
            dir.join("snapshotter.sock"),
            dir.join("control.sock"),
        );
        let log = dir.join("snapshotter.log");
        let daemon = spawn(
            &paths,
            &config,
            &log,
            netns,
            metrics_address,
            systemd.as_deref(),
        );
        SnapshotterDaemon {
            daemon,
            root: paths.0,
            socket: paths.1,
            control: paths.2,
            config,
            log,
            metrics_address: metrics_address.to_owned(),
            netns: netns.map(str::to_owned),
            systemd,
        }
    }

    /// SIGTERM and wait: the daemon detaches its lazy layers and exits.
    /// Panics if it ignores SIGTERM.
    pub fn stop(&mut self) {
        if self.daemon.stop() == Stopped::Killed {
            panic!(
                "lazybd-snapshotter ignored SIGTERM for {STOP_GRACE:?}:\n{}",
                self.log()
            );
        }
    }

    /// SIGKILL, as a crash would: nothing is detached or unmounted.
    pub fn kill(&mut self) {
        self.daemon.kill();
    }

    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Starts it again on the same root, config and sockets (after
    /// [`kill`](Self::kill) or [`stop`](Self::stop)), and waits until its
    /// Snapshots socket accepts connections.
    pub fn start_again(&mut self) {
        let paths = (self.root.clone(), self.socket.clone(), self.control.clone());
        self.daemon = spawn(
            &paths,
            &self.config,
            &self.log,
            self.netns.as_deref(),
            &self.metrics_address,
            self.systemd.as_deref(),
        );
    }

    /// Replaces the config file; the next [`restart`](Self::restart) reads it.
    pub fn rewrite_config(&self, config_toml: &str) {
        std::fs::write(&self.config, config_toml).unwrap();
    }

    pub async fn client(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(containerd_client::connect(&self.socket).await.unwrap())
    }

    /// How containerd's config names it as a proxy plugin.
    pub fn proxy(&self) -> crate::containerd::ProxySnapshotter {
        crate::containerd::ProxySnapshotter {
            name: "lazybd".into(),
            socket: self.socket.clone(),
            root: self.root.clone(),
            control: Some(self.control.clone()),
        }
    }

    /// Whether the daemon runs (it was not killed or stopped).
    pub fn running(&self) -> bool {
        self.daemon.pid().is_some()
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.daemon.pid().expect("the snapshotter runs")
    }

    /// `host:port` of its metrics server (the one the daemon logged last).
    pub fn metrics_address(&self) -> String {
        let log = self.log();
        log.rsplit("metrics on http://")
            .next()
            .and_then(|rest| rest.split('/').next())
            .filter(|_| log.contains("metrics on http://"))
            .expect("the daemon logs its metrics address")
            .to_owned()
    }

    /// `GET /metrics` (the address is the one the daemon logged last).
    pub fn metrics(&self) -> String {
        let addr = self.metrics_address();
        let (status, body) =
            crate::http::request(self.netns.as_deref(), "GET", &addr, "/metrics", &[], b"");
        let body = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, 200, "{body}");
        body
    }

    /// One request line to the control API, its reply parsed.
    pub fn control(&self, request: &Value) -> Value {
        use std::io::{BufRead, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(&self.control).unwrap();
        writeln!(stream, "{request}").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&stream)
            .read_line(&mut line)
            .unwrap();
        serde_json::from_str(&line).unwrap()
    }

    /// The shim's `task-start` of container `id` (pid 1, bundle /b) on the
    /// overlay rootfs `mounts` the snapshotter returned.
    pub fn task_start(&self, id: &str, mounts: &[containerd_client::types::Mount]) -> Value {
        self.control(&json!({
            "event": "task-start", "namespace": "default", "container_id": id, "pid": 1,
            "bundle": "/b", "rootfs": [{"type": "overlay", "source": "overlay", "options": mounts[0].options}],
        }))
    }

    /// The state (`lazy`, `local`, ...) of every attached layer.
    pub fn layer_states(&self) -> Vec<String> {
        self.layer_fields("state")
    }

    /// Field `key` (`digest`, `anchor`, `state`, ...) of every attached
    /// layer, as the control API's `layers` lists them.
    pub fn layer_fields(&self, key: &str) -> Vec<String> {
        let reply = self.control(&json!({"op": "layers"}));
        reply["layers"]
            .as_array()
            .unwrap_or_else(|| panic!("no layers in {reply}"))
            .iter()
            .map(|l| {
                l[key]
                    .as_str()
                    .unwrap_or_else(|| panic!("layer without a {key:?} string: {l}"))
                    .to_owned()
            })
            .collect()
    }

    /// Waits (at most `within`) until every attached layer is local.
    pub fn wait_all_local(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.layer_states().iter().all(|s| s == "local") {
            assert!(
                Instant::now() < deadline,
                "not local after {within:?}: {:?}\n{}",
                self.layer_states(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Nothing is attached: under the root, only the layer manager's own
    /// FUSE mount, no EROFS mount and no loop device.
    #[track_caller]
    pub fn assert_only_fuse_left(&self) {
        let (mounts, loops) = crate::lazy_layers::leftovers(&self.root);
        assert!(
            mounts.iter().all(|m| m.ends_with("lazy/fuse")) && loops.is_empty(),
            "{mounts:?} {loops:?}"
        );
    }

    pub fn log(&self) -> String {
        self.daemon.log()
    }
}

impl Drop for SnapshotterDaemon {
    fn drop(&mut self) {
        // SIGTERM hands over when an fd store keeps the session, leaving
        // every mount for a next daemon that will not come: shut down.
        if self.daemon.pid().is_some() {
            if let Ok(mut stream) = std::os::unix::net::UnixStream::connect(&self.control) {
                use std::io::Write;
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = writeln!(stream, "{}", json!({"op": "shutdown"}));
                let _ = std::io::Read::read(&mut stream, &mut [0u8; 64]);
            }
        }
        let stopped = self.daemon.stop();
        if stopped == Stopped::Killed && !std::thread::panicking() {
            panic!("lazybd-snapshotter ignored SIGTERM:\n{}", self.log());
        }
    }
}

/// `[registry]` of a snapshotter config that reads `registry` over plain HTTP.
pub fn plain_http_config(registry: &Registry) -> String {
    format!("[registry]\nplain_http = [\"{}\"]\n", registry.host())
}

/// Spawns the daemon on `(root, socket, control)` and waits until it serves.
fn spawn(
    (root, socket, control): &(PathBuf, PathBuf, PathBuf),
    config: &Path,
    log: &Path,
    netns: Option<&str>,
    metrics_address: &str,
    systemd: Option<&crate::fdstore::SystemdStore>,
) -> Daemon {
    let mut cmd = match systemd {
        Some(store) => {
            let mut cmd = store.command(&bin_path("lazybd-snapshotter"));
            store.prepare(&mut cmd);
            cmd
        }
        None => Command::new(bin_path("lazybd-snapshotter")),
    };
    cmd.arg("--root")
        .arg(root)
        .arg("--address")
        .arg(socket)
        .arg("--control-address")
        .arg(control)
        .args(["--metrics-address", metrics_address])
        .arg("--config")
        .arg(config);
    if let Some(ns) = netns {
        crate::netns::enter_netns(&mut cmd, ns);
    }
    // The log is appended to across restarts: this start's line is one more.
    let served = |log: &Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches(SERVING)
            .count()
    };
    let before = served(log);
    let mut daemon = Daemon::spawn("lazybd-snapshotter", cmd, log).with_grace(STOP_GRACE);
    // The socket is bound before the layers are attached again, and served
    // after: ready is the log line that says it serves.
    daemon.wait_ready(Duration::from_secs(60), "snapshots served", || {
        served(log) > before && std::os::unix::net::UnixStream::connect(socket).is_ok()
    });
    daemon
}

/// The value of the sample `name` (with its labels) in a metrics text.
pub fn metric(metrics: &str, name: &str) -> f64 {
    sample(metrics, name).unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
}

/// The value of the sample `name`, 0 when the daemon has not exported it
/// (a counter never touched).
pub fn metric_or_zero(metrics: &str, name: &str) -> f64 {
    sample(metrics, name).unwrap_or(0.0)
}

fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The sum of every sample whose line starts with `prefix`.
pub fn metric_sum(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Mounts what a snapshotter returned at `target`, as containerd would;
/// unmounted on drop.
pub struct Mounted {
    target: PathBuf,
}

impl Mounted {
    pub fn new(mounts: &[containerd_client::types::Mount], target: &Path) -> Mounted {
        use nix::mount::{mount, MsFlags};
        assert_eq!(mounts.len(), 1, "{mounts:?}");
        let m = &mounts[0];
        let read_only = m.options.iter().any(|o| o == "ro");
        match m.r#type.as_str() {
            "bind" => {
                mount(
                    Some(m.source.as_str()),
                    target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .unwrap();
                if read_only {
                    mount(
                        None::<&str>,
                        target,
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                        None::<&str>,
                    )
                    .unwrap();
                }
            }
            "overlay" => {
                let data: Vec<&str> = m
                    .options
                    .iter()
                    .map(String::as_str)
                    .filter(|o| *o != "ro" && *o != "rw")
                    .collect();
                let flags = if read_only {
                    MsFlags::MS_RDONLY
                } else {
                    MsFlags::empty()
                };
                mount(
                    Some("overlay"),
                    target,
                    Some("overlay"),
                    flags,
                    Some(data.join(",").as_str()),
                )
                .unwrap_or_else(|e| panic!("mount {m:?}: {e}"));
            }
            other => panic!("unexpected mount type {other}"),
        }
        Mounted {
            target: target.to_owned(),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH);
    }
}
