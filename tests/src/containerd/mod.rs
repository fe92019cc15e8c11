//! The one private containerd 1.6 (Debian's) of the tests: own root, state,
//! sockets and config under a temp dir, built by [`ContainerdBuilder`]:
//!
//! - CRI off (the default: `ctr` drives it, in a namespace of its own) or on
//!   (driven over CRI v1 as kubelet drives it, see [`cri`]);
//! - proxy snapshotters (lazybd-snapshotter), one of which CRI may use;
//! - runtime binaries on its PATH (our shim always, as on a node);
//! - the host's network namespace or one of its own;
//! - extra config TOML.
//!
//! [`ctr`](Containerd::ctr) and its helpers run against it with a deadline.
//! Drop removes what the test left (CRI pods, or tasks and containers),
//! stops containerd, removes pod network namespaces and CNI results, kills
//! shims still serving it, deletes the runc state of its containers and
//! unmounts whatever is left under its dir, so a failing test leaks nothing.

mod config;
pub mod cri;
mod ctr;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::daemon::Daemon;

pub use ctr::{EventRecorder, LazyRun};

pub const LAZYBD_RUNTIME: &str = "io.containerd.lazybd.v2";
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// CRI always works in this containerd namespace.
pub const K8S_NAMESPACE: &str = "k8s.io";
/// Where runc keeps container state for a namespace when no runtime option
/// names another root.
const DEFAULT_RUNC_ROOT: &str = "/run/containerd/runc";
/// How long containerd may take to serve (and CRI to answer) after start.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// A snapshotter served by another process, registered as a proxy plugin.
#[derive(Debug, Clone)]
pub struct ProxySnapshotter {
    pub name: String,
    pub socket: PathBuf,
    /// Exported to containerd as the plugin's root.
    pub root: PathBuf,
    /// Its control API, told to our shim (which reports task starts there).
    pub control: Option<PathBuf>,
}

/// What CRI is configured with, when it is on.
#[derive(Debug, Clone)]
struct CriSettings {
    /// The snapshotter CRI unpacks images with and runs containers on.
    snapshotter: String,
    /// Registries (`host:port`) CRI pulls from over plain HTTP.
    plain_http_registries: Vec<String>,
    /// Pods on a CNI bridge, each in a network namespace of its own.
    pod_network: bool,
}

/// How to start a [`Containerd`]; see the module doc for the defaults.
#[derive(Default)]
pub struct ContainerdBuilder {
    namespace: Option<String>,
    proxies: Vec<ProxySnapshotter>,
    cri: Option<CriSettings>,
    runtimes: Vec<PathBuf>,
    own_netns: bool,
    extra_config: String,
    dir: Option<tempfile::TempDir>,
}

/// A directory for a containerd not started yet: its socket's path is
/// known before it runs (for a snapshotter that follows its events).
pub fn new_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lazybd-ctd-")
        .tempdir()
        .unwrap()
}

/// The gRPC socket of a containerd in `dir`.
pub fn socket_in(dir: &Path) -> PathBuf {
    dir.join("containerd.sock")
}

impl ContainerdBuilder {
    /// The containerd namespace `ctr` works in (default: one of its own, so
    /// every task, container and runc state dir in it is this harness's).
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Registers `proxy` as a snapshot proxy plugin.
    pub fn proxy_snapshotter(mut self, proxy: ProxySnapshotter) -> Self {
        self.proxies.push(proxy);
        self
    }

    /// CRI on, in namespace k8s.io, with the overlayfs snapshotter; imports
    /// the pause and busybox images at start.
    pub fn cri(mut self) -> Self {
        self.cri.get_or_insert_with(|| CriSettings {
            snapshotter: "overlayfs".into(),
            plain_http_registries: Vec::new(),
            pod_network: false,
        });
        self
    }

    /// CRI on, unpacking images with and running containers on snapshotter
    /// `name` (a proxy's name, or a built-in one), with the snapshot
    /// annotations on.
    pub fn cri_snapshotter(self, name: &str) -> Self {
        let mut b = self.cri();
        b.cri.as_mut().unwrap().snapshotter = name.into();
        b
    }

    /// CRI on, pulling from registry `host` (`host:port`) over plain HTTP.
    pub fn plain_http_registry(self, host: &str) -> Self {
        let mut b = self.cri();
        b.cri
            .as_mut()
            .unwrap()
            .plain_http_registries
            .push(host.into());
        b
    }

    /// CRI on, pods with a network namespace of their own on a CNI bridge
    /// (Debian's plugins in /usr/lib/cni). containerd then runs in a netns of
    /// its own (it execs the CNI plugins, so the bridge and the pods' veth
    /// peers live there, not in the host's, where other tests look at
    /// links); it cannot reach registries on the host's 127.0.0.1. Without
    /// it, pods use the host network (kubelet's `hostNetwork: true`).
    pub fn pod_network(self) -> Self {
        let mut b = self.cri().own_netns();
        b.cri.as_mut().unwrap().pod_network = true;
        b
    }

    /// Puts `binary` on containerd's PATH (under its own file name), where
    /// containerd finds runtime shims by name.
    pub fn runtime_on_path(mut self, binary: &Path) -> Self {
        self.runtimes.push(binary.to_owned());
        self
    }

    /// containerd (and so its shims and CNI plugins) in a network namespace
    /// of its own (unshare(1) execs it: no fork, the child is containerd).
    pub fn own_netns(mut self) -> Self {
        self.own_netns = true;
        self
    }

    /// Runs in `dir` (from [`new_dir`]) instead of a new temp dir.
    pub fn in_dir(mut self, dir: tempfile::TempDir) -> Self {
        self.dir = Some(dir);
        self
    }

    /// TOML appended to the config (tables only).
    pub fn extra_config(mut self, toml: &str) -> Self {
        self.extra_config.push_str(toml);
        self
    }

    pub fn start(mut self) -> Containerd {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = self.dir.take().unwrap_or_else(new_dir);
        let d = dir.path();
        let (namespace, own_namespace) = match (&self.cri, &self.namespace) {
            (Some(_), Some(ns)) if ns != K8S_NAMESPACE => {
                panic!("CRI works in namespace {K8S_NAMESPACE}, not {ns}")
            }
            (Some(_), _) => (K8S_NAMESPACE.to_owned(), false),
            (None, Some(ns)) => (ns.clone(), false),
            (None, None) => {
                let n = N.fetch_add(1, Ordering::Relaxed);
                (format!("lbt{}x{n}", std::process::id()), true)
            }
        };
        std::fs::create_dir_all(d.join("bin")).unwrap();
        let mut runtimes = self.runtimes.clone();
        runtimes.push(crate::bin_path("containerd-shim-lazybd-v2"));
        for binary in &runtimes {
            let name = binary.file_name().expect("a runtime binary's name");
            std::os::unix::fs::symlink(binary, d.join("bin").join(name)).unwrap();
        }
        std::fs::write(d.join("config.toml"), config::render(d, &self)).unwrap();
        if let Some(cri) = &self.cri {
            config::write_cri_files(d, cri);
        }
        // Shims inherit containerd's environment.
        let mut env: Vec<(String, OsString)> = Vec::new();
        if let Some(control) = self.proxies.iter().find_map(|p| p.control.as_ref()) {
            env.push(("LAZYBD_CONTROL_SOCKET".into(), control.into()));
        }
        let mut ctd = Containerd {
            daemon: None,
            namespace,
            own_namespace,
            own_netns: self.own_netns,
            env,
            cri: None,
            ids: Mutex::default(),
            dir,
        };
        ctd.launch(self.cri.as_ref());
        if self.cri.is_some() {
            use crate::busybox::{busybox_archive, pause_archive, BUSYBOX_IMAGE, PAUSE_IMAGE};
            ctd.import(&pause_archive(ctd.dir()), PAUSE_IMAGE);
            ctd.import(&busybox_archive(ctd.dir()), BUSYBOX_IMAGE);
        }
        ctd
    }
}

pub struct Containerd {
    daemon: Option<Daemon>,
    pub namespace: String,
    /// The namespace is this harness's alone (generated).
    own_namespace: bool,
    own_netns: bool,
    env: Vec<(String, OsString)>,
    cri: Option<cri::Cri>,
    /// Every pod and container id made through this harness, to find their
    /// runc state where other runs keep theirs too.
    ids: Mutex<Vec<String>>,
    /// Last: removed after Drop has unmounted everything under it.
    dir: tempfile::TempDir,
}

impl Containerd {
    pub fn builder() -> ContainerdBuilder {
        ContainerdBuilder::default()
    }

    /// CRI off, a namespace of its own, our shim on its PATH.
    pub fn start() -> Containerd {
        Self::builder().start()
    }

    /// Spawns containerd and waits until it serves (and CRI answers).
    fn launch(&mut self, cri: Option<&CriSettings>) {
        let d = self.dir.path();
        let mut cmd = if self.own_netns {
            let mut cmd = Command::new("unshare");
            cmd.args(["--net", "--", "containerd"]);
            cmd
        } else {
            Command::new("containerd")
        };
        // Our shim first on PATH: containerd finds `containerd-shim-lazybd-v2`
        // for runtime type io.containerd.lazybd.v2 by name, as on a node.
        let path = format!(
            "{}:{}",
            d.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        cmd.arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut daemon = Daemon::spawn("containerd", cmd, &d.join("containerd.log"));
        let (socket, namespace) = (self.socket(), self.namespace.clone());
        daemon.wait_ready(START_DEADLINE, "`ctr version` answered", || {
            ctr::command(&socket, &namespace, &["version"])
                .output()
                .is_ok_and(|out| out.status.success())
        });
        self.daemon = Some(daemon);
        if let Some(settings) = cri {
            self.cri = Some(cri::Cri::connect(self, settings));
        }
    }

    /// Stops containerd (not its shims) and starts it again on the same state.
    pub fn restart(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.stop();
        }
        let settings = self.cri.take().map(|c| c.settings);
        self.launch(settings.as_ref());
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        socket_in(self.dir())
    }

    /// `lazybd pull --plain-http` of `image` into this containerd, in the
    /// namespace its `ctr` calls use; returns what it printed, panics if it
    /// failed.
    pub fn lazybd_pull(&self, image: &str) -> String {
        crate::cli::ok(&crate::cli::lazybd(&[
            &"pull",
            &"--plain-http",
            &"--address",
            &self.socket(),
            &"-n",
            &self.namespace,
            &image,
        ]))
    }

    /// The bundle containerd made for task `id`.
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.dir()
            .join("state/io.containerd.runtime.v2.task")
            .join(&self.namespace)
            .join(id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("containerd.log")).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        match &self.daemon {
            Some(daemon) => daemon.log_tail(),
            None => self.log(),
        }
    }

    /// Waits up to `secs` for `cond`, then panics with `what` and the log.
    pub fn wait_for(&self, secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out after {secs} s waiting for {what}\n{}",
            self.log_tail()
        );
    }

    /// A busybox root filesystem for `ctr run --rootfs`.
    pub fn rootfs(&self) -> PathBuf {
        crate::busybox::rootfs(self.dir())
    }

    /// Imports a busybox image as `name`, unpacked by the default snapshotter
    /// (overlayfs: the shim gets real rootfs mounts).
    pub fn import_busybox(&self, name: &str) {
        self.import(
            &crate::busybox::archive(self.dir(), name, &["/bin/sh"]),
            name,
        );
    }

    /// Imports an OCI archive whose layout tags the image `name`; with CRI,
    /// unpacked for CRI's snapshotter, and waits until CRI's image store
    /// (fed by containerd's image events) has it.
    pub fn import(&self, archive: &Path, name: &str) {
        let archive = archive.to_str().expect("UTF-8 archive path");
        match &self.cri {
            None => {
                self.ctr_ok(&["images", "import", archive]);
            }
            Some(cri) => {
                self.ctr_ok(&[
                    "images",
                    "import",
                    "--snapshotter",
                    &cri.settings.snapshotter,
                    archive,
                ]);
                self.wait_for(30, &format!("CRI to see imported {name}"), || {
                    self.image_status(name).is_some()
                });
            }
        }
    }

    /// Shim processes serving this containerd, with their binary name
    /// (`containerd-shim-lazybd-v2`, `containerd-shim-runc-v2`).
    pub fn shims(&self) -> Vec<(u32, String)> {
        shims_of(&self.socket())
    }

    pub fn shim_pids(&self) -> Vec<u32> {
        self.shims().into_iter().map(|(pid, _)| pid).collect()
    }

    /// Mounts under this containerd's dir (task rootfs, snapshots, sandbox
    /// shm, ...), deepest first.
    pub fn mounts(&self) -> Vec<PathBuf> {
        lazybd_blockdev::device::mounts::mounts_under(self.dir()).unwrap_or_default()
    }

    /// The task rootfs mounts (under the runtime v2 state dir).
    pub fn task_mounts(&self) -> Vec<PathBuf> {
        let tasks = self.dir().join("state/io.containerd.runtime.v2.task");
        self.mounts()
            .into_iter()
            .filter(|m| m.starts_with(&tasks))
            .collect()
    }

    /// `(runc root, id)` of the runc state left for this harness's
    /// containers: the runc runtime's private root (CRI configures one) and
    /// the default root, where our shim keeps its runc state. In a
    /// namespace of its own, every container there is this harness's;
    /// elsewhere, only the ids it made or saw.
    pub fn runc_containers(&self) -> Vec<(PathBuf, String)> {
        let ids = self.ids.lock().unwrap().clone();
        let mut left = Vec::new();
        for root in self.runc_roots() {
            let Ok(entries) = std::fs::read_dir(&root) else {
                continue;
            };
            for entry in entries.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                if self.own_namespace || ids.contains(&id) {
                    left.push((root.clone(), id));
                }
            }
        }
        left
    }

    fn runc_roots(&self) -> [PathBuf; 2] {
        [
            self.dir().join("runc").join(&self.namespace),
            Path::new(DEFAULT_RUNC_ROOT).join(&self.namespace),
        ]
    }

    fn remember_id(&self, id: &str) {
        self.ids.lock().unwrap().push(id.to_owned());
    }

    /// Removes what the test left while containerd still runs: CRI pods
    /// (and so their containers), or tasks and containers.
    fn remove_leftovers(&self) {
        if self.cri.is_some() {
            self.remove_all_pods();
            return;
        }
        for id in self.ctr_lines(&["task", "ls", "-q"]) {
            self.remember_id(&id);
            self.ctr(&["task", "kill", "-a", "-s", "SIGKILL", &id]);
            for _ in 0..50 {
                if self.ctr(&["task", "rm", "-f", &id]).status.success() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        for id in self.ctr_lines(&["containers", "ls", "-q"]) {
            self.remember_id(&id);
            self.ctr(&["containers", "rm", &id]);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.daemon.as_mut().is_some_and(Daemon::is_running) {
            self.remove_leftovers();
        }
        if let Some(mut daemon) = self.daemon.take() {
            daemon.stop();
        }
        if let Some(cri) = &self.cri {
            cri.remove_network_leftovers(&self.ids.lock().unwrap());
        }
        for pid in self.shim_pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for (root, id) in self.runc_containers() {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(root)
                .args(["delete", "--force", &id])
                .output();
        }
        if self.own_namespace {
            for root in self.runc_roots() {
                let _ = std::fs::remove_dir_all(root);
            }
        }
        for mount in self.mounts() {
            let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Shim processes started for the containerd at `socket`: every shim gets
/// `-address <socket>` on its command line.
pub fn shims_of(socket: &Path) -> Vec<(u32, String)> {
    let needle = format!("-address\0{}\0", socket.display());
    crate::leaks::command_lines()
        .filter(|(_, cmdline)| cmdline.contains(&needle))
        .filter_map(|(pid, cmdline)| {
            let argv0 = cmdline.split('\0').next().unwrap_or("");
            let name = Path::new(argv0)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.starts_with("containerd-shim").then_some((pid, name))
        })
        .collect()
}
