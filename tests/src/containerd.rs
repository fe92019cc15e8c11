//! A private containerd 1.6 for runtime-shim tests: own root, state, sockets
//! and namespace under a temp dir, CRI disabled, our shim on its PATH; a
//! busybox rootfs and image built here from Debian's busybox-static.
//!
//! Drop kills every task left in its namespace, removes the containers,
//! stops containerd, kills shims still serving it, deletes runc state and
//! unmounts whatever is left under its dirs, so a failing test leaks nothing.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::images::{write_image, Compression, TarLayer};

/// Applets the test images link to busybox.
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "true", "false", "stty", "ls", "head", "dd", "kill", "tail",
];
/// Any ctr call that takes longer has hung.
const CTR_DEADLINE_SECS: &str = "120";

pub const LAZYBD_RUNTIME: &str = "io.containerd.lazybd.v2";
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";

pub struct Containerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub namespace: String,
}

fn busybox() -> Vec<u8> {
    std::fs::read("/bin/busybox").expect("busybox-static (hack/install-deps.sh)")
}

impl Containerd {
    /// Starts containerd with `containerd-shim-lazybd-v2` on its PATH.
    pub fn start() -> Containerd {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = tempfile::Builder::new()
            .prefix("lazybd-ctd-")
            .tempdir()
            .unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(
            crate::bin_path("containerd-shim-lazybd-v2"),
            bin.join("containerd-shim-lazybd-v2"),
        )
        .unwrap();
        let namespace = format!(
            "lbt{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/c.sock"
[ttrpc]
  address = "{d}/c.sock.ttrpc"
[debug]
  level = "debug"
"#,
            d = dir.path().display()
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let mut ctd = Containerd {
            dir,
            child: None,
            namespace,
        };
        ctd.launch();
        ctd
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("containerd.log"))
            .unwrap();
        let path = format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd (hack/install-deps.sh)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.ctr_raw(&["version"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("containerd did not come up:\n{}", self.log());
    }

    /// Stops containerd (not its shims) and starts it again on the same state.
    pub fn restart(&mut self) {
        self.stop_daemon();
        self.launch();
    }

    fn stop_daemon(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    /// The bundle containerd made for task `id`.
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.dir
            .path()
            .join("state/io.containerd.runtime.v2.task")
            .join(&self.namespace)
            .join(id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("timeout");
        cmd.args(["-k", "5", CTR_DEADLINE_SECS, "ctr", "-a"])
            .arg(self.socket())
            .args(["-n", &self.namespace])
            .args(args);
        cmd
    }

    fn ctr_raw(&self, args: &[&str]) -> Output {
        self.ctr_command(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs ctr; returns its output whatever the exit status.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_raw(args)
    }

    /// Runs ctr (a `ctr run` of task `id`) and writes `stdin` to it once the
    /// task runs, then closes it. ctr turns that EOF into CloseIO only once
    /// it has the task: input that ends earlier leaves the process's stdin
    /// open under the Go shim as under ours (the shim holds the fifo, as
    /// containerd expects, until CloseIO).
    pub fn ctr_with_input(&self, args: &[&str], id: &str, stdin: &[u8]) -> Output {
        use std::io::Write;
        let mut child = self
            .ctr_command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.wait_for(60, &format!("{id} running"), || {
            self.tasks()
                .iter()
                .any(|(t, st)| t == id && st == "RUNNING")
        });
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin).unwrap();
        drop(input);
        child.wait_with_output().unwrap()
    }

    /// A ctr command to spawn as the caller likes (e.g. on a pty).
    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        self.ctr_command(args)
    }

    /// Runs ctr and returns stdout; panics with stderr and the log on failure.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<_> = log.lines().rev().take(40).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// A busybox root filesystem for `ctr run --rootfs`.
    pub fn rootfs(&self) -> PathBuf {
        let root = self.dir.path().join("busybox-rootfs");
        if !root.exists() {
            let bin = root.join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            std::fs::write(bin.join("busybox"), busybox()).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(bin.join("busybox"), std::fs::Permissions::from_mode(0o755))
                .unwrap();
            for applet in APPLETS {
                std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
            }
        }
        root
    }

    /// Imports a busybox image as `name` (unpacked by containerd's overlayfs
    /// snapshotter, so the shim gets real rootfs mounts).
    pub fn import_busybox(&self, name: &str) {
        let mut layer = TarLayer::new();
        layer
            .dir("bin", 0o755)
            .file("bin/busybox", 0o755, &busybox());
        for applet in APPLETS {
            layer.symlink(&format!("bin/{applet}"), "busybox");
        }
        for dir in ["proc", "sys", "dev", "tmp", "etc"] {
            layer.dir(dir, 0o755);
        }
        let file_name = name.replace(['/', ':'], "_");
        let layout = self.dir.path().join(format!("layout-{file_name}"));
        write_image(&layout, name, &[layer.finish()], &[Compression::Gzip]);
        let archive = self.dir.path().join(format!("{file_name}.tar"));
        let mut tar = tar::Builder::new(std::fs::File::create(&archive).unwrap());
        tar.append_dir_all(".", &layout).unwrap();
        tar.finish().unwrap();
        drop(tar);
        // Named by the layout's ref annotation alone: `--index-name` would make
        // a second image of the same name, whose update to the manifest lets
        // containerd's GC collect the index while the import still reads it.
        self.ctr_ok(&["images", "import", archive.to_str().unwrap()]);
    }

    /// Sets task `id`'s memory limit through containerd's Tasks.Update (ctr
    /// 1.6 has no `task update`), as CRI's UpdateContainerResources does.
    pub fn update_memory_limit(&self, id: &str, bytes: i64) {
        use containerd_client::{
            services::v1::{tasks_client::TasksClient, UpdateTaskRequest},
            tonic::Request,
            with_namespace,
        };
        let resources = serde_json::json!({"memory": {"limit": bytes}});
        let req = UpdateTaskRequest {
            container_id: id.to_string(),
            resources: Some(prost_types::Any {
                // containerd's type URL for runtime-spec types, JSON-encoded.
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
                value: serde_json::to_vec(&resources).unwrap(),
            }),
            annotations: Default::default(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let channel = containerd_client::connect(self.socket()).await.unwrap();
            let req = with_namespace!(req, self.namespace.as_str());
            TasksClient::new(channel)
                .update(req)
                .await
                .unwrap_or_else(|e| panic!("update {id}: {e}\n{}", self.log_tail()));
        });
    }

    /// Pids of shim processes serving this containerd.
    pub fn shim_pids(&self) -> Vec<u32> {
        let needle = format!("-address\0{}\0", self.socket().display());
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("containerd-shim") && cmdline.contains(&needle) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Mounts under this containerd's dirs (rootfs of tasks, snapshots).
    pub fn mounts(&self) -> Vec<String> {
        let prefix = self.dir.path().to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|mount| mount.starts_with(&prefix))
            .map(str::to_owned)
            .collect()
    }

    /// runc state dirs of containers in this namespace.
    pub fn runc_containers(&self) -> Vec<String> {
        std::fs::read_dir(self.runc_root())
            .map(|dir| {
                dir.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn runc_root(&self) -> PathBuf {
        Path::new("/run/containerd/runc").join(&self.namespace)
    }

    /// Task ids `ctr task ls` shows.
    pub fn tasks(&self) -> Vec<(String, String)> {
        self.ctr_ok(&["task", "ls"])
            .lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<_> = line.split_whitespace().collect();
                (fields.len() >= 3).then(|| (fields[0].to_string(), fields[2].to_string()))
            })
            .collect()
    }

    /// Waits up to `secs` for `cond`.
    pub fn wait_for(&self, secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out waiting for {what}\n{}", self.log_tail());
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            for (id, _) in self.ctr_output_tasks() {
                self.ctr(&["task", "kill", "-a", "-s", "SIGKILL", &id]);
                for _ in 0..50 {
                    if self.ctr(&["task", "rm", "-f", &id]).status.success() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            let containers =
                String::from_utf8_lossy(&self.ctr(&["containers", "ls", "-q"]).stdout).into_owned();
            for id in containers.lines() {
                self.ctr(&["containers", "rm", id]);
            }
        }
        self.stop_daemon();
        for pid in self.shim_pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for id in self.runc_containers() {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(self.runc_root())
                .args(["delete", "--force", &id])
                .output();
        }
        let _ = std::fs::remove_dir_all(self.runc_root());
        let mut mounts = self.mounts();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mount in mounts {
            let _ = nix::mount::umount2(mount.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

impl Containerd {
    /// Task list that tolerates a dead daemon (for Drop).
    fn ctr_output_tasks(&self) -> Vec<(String, String)> {
        let out = self.ctr(&["task", "ls"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|line| {
                line.split_whitespace()
                    .next()
                    .map(|id| (id.to_string(), String::new()))
            })
            .collect()
    }
}

/// `ctr events` recording in the background until dropped.
pub struct EventRecorder {
    child: Child,
    out: PathBuf,
}

impl EventRecorder {
    pub fn start(ctd: &Containerd, name: &str) -> EventRecorder {
        let out = ctd.dir().join(format!("events-{name}.txt"));
        let file = std::fs::File::create(&out).unwrap();
        let child = Command::new("ctr")
            .arg("-a")
            .arg(ctd.socket())
            .arg("events")
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // ctr subscribes asynchronously; give it a moment before events flow.
        std::thread::sleep(Duration::from_millis(300));
        EventRecorder { child, out }
    }

    /// `(topic, container_id, json)` of the task events seen so far for `id`.
    pub fn task_events(&self, namespace: &str, id: &str) -> Vec<(String, serde_json::Value)> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                // "<date> <time> <zone> <zone> <namespace> <topic> <json>"
                let mut parts = line.splitn(7, ' ');
                let ns = parts.nth(4)?;
                let topic = parts.next()?;
                let json: serde_json::Value = serde_json::from_str(parts.next()?).ok()?;
                (ns == namespace && topic.starts_with("/tasks/") && json["container_id"] == id)
                    .then(|| (topic.to_string(), json))
            })
            .collect()
    }

    pub fn topics(&self, namespace: &str, id: &str) -> Vec<String> {
        self.task_events(namespace, id)
            .into_iter()
            .map(|(topic, _)| topic)
            .collect()
    }
}

impl Drop for EventRecorder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
