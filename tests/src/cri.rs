//! A private containerd 1.6 with its CRI plugin on, driven over CRI v1 the
//! way kubelet drives it: RunPodSandbox, CreateContainer, ExecSync, ...
//!
//! Everything is private to a temp dir: root, state, sockets, runc's
//! state for the runc runtime (its `Root` option; CRI passes no runc
//! options to other runtime types, so our shim's runc state is under the
//! default /run/containerd/runc/k8s.io), the CRI registry hosts dir, CNI
//! conf dir and IPAM state, pod logs. Runtimes: `runc` (io.containerd.runc.v2) and `lazybd`
//! (io.containerd.lazybd.v2, our shim on containerd's PATH). Snapshotter:
//! overlayfs or the lazybd proxy plugin, with the snapshot annotations on.
//!
//! Pods use the host network (kubelet's `hostNetwork: true`) unless
//! [`CriOptions::pod_network`] asks for a CNI bridge (Debian's plugins in
//! /usr/lib/cni): then containerd runs in a network namespace of its own,
//! so the bridge and the veth peers never appear in the host's, where the
//! other tests on this machine (the eni plugin's among them) look at links.
//!
//! Drop stops and removes every pod (and so every container), stops
//! containerd, removes pod network namespaces CRI left, kills shims still
//! serving it, deletes our containers' runc state and unmounts whatever is
//! left under its dir, so a failing test leaks nothing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use containerd_client::tonic::{self, transport::Channel};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;

use crate::cri_images::{busybox_archive, pause_archive, BUSYBOX_IMAGE, PAUSE_IMAGE};

/// CRI always works in this containerd namespace.
pub const K8S_NAMESPACE: &str = "k8s.io";
/// The runtime handler of our shim in this harness's config.
pub const LAZYBD_HANDLER: &str = "lazybd";
/// Any single CRI call that takes longer has hung.
const CALL_DEADLINE: Duration = Duration::from_secs(120);
const CTR_DEADLINE_SECS: &str = "120";

/// Which snapshotter CRI unpacks images with and runs containers on.
pub enum CriSnapshotter {
    Overlayfs,
    /// The `lazybd` proxy plugin served at `socket`, its control API at
    /// `control` (told to our shim, which reports task starts there).
    Lazybd {
        socket: PathBuf,
        root: PathBuf,
        control: PathBuf,
    },
}

impl CriSnapshotter {
    fn name(&self) -> &'static str {
        match self {
            CriSnapshotter::Overlayfs => "overlayfs",
            CriSnapshotter::Lazybd { .. } => "lazybd",
        }
    }
}

pub struct CriOptions {
    pub snapshotter: CriSnapshotter,
    /// Registries (`host:port`) CRI pulls from over plain HTTP.
    pub plain_http_registries: Vec<String>,
    /// Pods get their own network namespace on a CNI bridge. containerd
    /// then runs in a network namespace of its own (it execs the CNI
    /// plugins, so the bridge and the pods' veth peers live there, not in
    /// the host's); it cannot reach registries on the host's 127.0.0.1.
    /// Without it, pods use the host network.
    pub pod_network: bool,
}

/// The pods' subnet with `pod_network`: only inside containerd's netns.
pub const POD_SUBNET: &str = "10.233.70.0/24";

impl Default for CriOptions {
    fn default() -> Self {
        CriOptions {
            snapshotter: CriSnapshotter::Overlayfs,
            plain_http_registries: Vec::new(),
            pod_network: false,
        }
    }
}

/// A pod made by [`CriContainerd::run_pod`]: its id and the config
/// CreateContainer needs again.
pub struct Pod {
    pub id: String,
    pub config: cri::PodSandboxConfig,
    /// The pod's network namespace (bind mount), with `pod_network`.
    pub netns: Option<PathBuf>,
}

pub struct CriContainerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    snapshotter: &'static str,
    /// Every pod and container id this harness made, to find their runc
    /// state in the shared default runc root.
    ids: std::sync::Mutex<Vec<String>>,
    pod_network: bool,
    /// Network namespaces CRI made for our pods, removed on Drop if CRI
    /// did not.
    netns: std::sync::Mutex<Vec<PathBuf>>,
}

/// Where libcni keeps ADD results, named `<network>-<container id>-<ifname>`.
const CNI_CACHE_DIR: &str = "/var/lib/cni/results";
/// runc's state root for k8s.io when the runtime options name none.
const DEFAULT_RUNC_ROOT: &str = "/run/containerd/runc/k8s.io";

impl CriContainerd {
    /// Starts containerd with CRI, imports the pause and busybox images
    /// (unpacked for the configured snapshotter) and waits until CRI sees
    /// them.
    pub fn start(options: CriOptions) -> CriContainerd {
        let dir = tempfile::Builder::new()
            .prefix("lazybd-cri-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        for sub in ["bin", "cni/net.d", "certs.d", "pods", "runc"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::os::unix::fs::symlink(
            crate::bin_path("containerd-shim-lazybd-v2"),
            d.join("bin/containerd-shim-lazybd-v2"),
        )
        .unwrap();
        std::fs::write(
            d.join("cni/net.d/10-lazybd-test.conflist"),
            cni_conflist(d, options.pod_network),
        )
        .unwrap();
        for host in &options.plain_http_registries {
            let hosts_dir = d.join("certs.d").join(host);
            std::fs::create_dir_all(&hosts_dir).unwrap();
            std::fs::write(
                hosts_dir.join("hosts.toml"),
                format!(
                    "server = \"http://{host}\"\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
                ),
            )
            .unwrap();
        }
        std::fs::write(d.join("config.toml"), config_toml(d, &options.snapshotter)).unwrap();

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let control = match &options.snapshotter {
            CriSnapshotter::Lazybd { control, .. } => Some(control.as_path()),
            CriSnapshotter::Overlayfs => None,
        };
        let child = spawn_containerd(d, control, options.pod_network);
        let socket = d.join("c.sock");
        let channel = rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if socket.exists() {
                    if let Ok(channel) = containerd_client::connect(&socket).await {
                        return channel;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "containerd did not serve in 30 s:\n{}",
                    read_log(d)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let ctd = CriContainerd {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            rt,
            child: Some(child),
            dir,
            snapshotter: options.snapshotter.name(),
            ids: Default::default(),
            pod_network: options.pod_network,
            netns: Default::default(),
        };
        // CRI registers after containerd's own services: wait for it.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut client = ctd.runtime.clone();
            let reply = ctd.rt.block_on(async {
                tokio::time::timeout(
                    CALL_DEADLINE,
                    client.version(cri::VersionRequest {
                        version: "v1".into(),
                    }),
                )
                .await
            });
            match reply {
                Ok(Ok(_)) => break,
                other => assert!(
                    Instant::now() < deadline,
                    "CRI did not answer Version in 30 s: {other:?}\n{}",
                    ctd.log_tail()
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        ctd.import(&pause_archive(ctd.dir()), PAUSE_IMAGE);
        ctd.import(&busybox_archive(ctd.dir()), BUSYBOX_IMAGE);
        ctd
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir().join("c.sock")
    }

    pub fn log(&self) -> String {
        read_log(self.dir())
    }

    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<_> = log.lines().rev().take(30).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// `ctr` against this containerd in the k8s.io namespace.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["-k", "5", CTR_DEADLINE_SECS, "ctr", "-a"])
            .arg(self.socket())
            .args(["-n", K8S_NAMESPACE])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Imports an OCI archive whose layout tags the image `name`, unpacked
    /// for CRI's snapshotter, and waits until CRI's image store (fed by
    /// containerd's image events) has it.
    pub fn import(&self, archive: &Path, name: &str) {
        // Named by the layout's ref annotation alone: `--index-name` would make
        // a second image of the same name, whose update to the manifest lets
        // containerd's GC collect the index while the import still reads it
        // (CI saw "content digest ...: not found").
        self.ctr_ok(&[
            "images",
            "import",
            "--snapshotter",
            self.snapshotter,
            archive.to_str().unwrap(),
        ]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.image_status(name).is_none() {
            assert!(
                Instant::now() < deadline,
                "CRI does not see imported {name} after 30 s\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs one CRI call with a deadline; panics with the call's error and
    /// containerd's log (a harness: a failed call fails the test).
    fn call<T, F>(&self, what: &str, fut: F) -> T
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match self.try_call(fut) {
            Ok(reply) => reply,
            Err(e) => panic!("CRI {what}: {e}\n{}", self.log_tail()),
        }
    }

    fn try_call<T, F>(&self, fut: F) -> Result<T, String>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match self
            .rt
            .block_on(async { tokio::time::timeout(CALL_DEADLINE, fut).await })
        {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Err(format!("no reply in {CALL_DEADLINE:?}")),
        }
    }

    /// RunPodSandbox `name` with `handler` (e.g. [`LAZYBD_HANDLER`]), on
    /// the host network or the CNI bridge ([`CriOptions::pod_network`]),
    /// logs under this harness's dir.
    pub fn run_pod(&self, name: &str, handler: &str) -> Pod {
        let log_directory = self.dir().join("pods").join(name);
        std::fs::create_dir_all(&log_directory).unwrap();
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "lazybd-test".into(),
                attempt: 0,
            }),
            // As kubelet does for hostNetwork pods: no UTS namespace of
            // their own, so no hostname (runc refuses one without it).
            hostname: if self.pod_network {
                name.into()
            } else {
                String::new()
            },
            log_directory: log_directory.to_string_lossy().into_owned(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: if self.pod_network {
                            cri::NamespaceMode::Pod as i32
                        } else {
                            cri::NamespaceMode::Node as i32
                        },
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut client = self.runtime.clone();
        let reply = self.call(
            "RunPodSandbox",
            client.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            }),
        );
        let id = reply.pod_sandbox_id;
        self.ids.lock().unwrap().push(id.clone());
        let netns = self.pod_network.then(|| self.pod_netns(&id));
        if let Some(netns) = &netns {
            self.netns.lock().unwrap().push(netns.clone());
        }
        Pod { id, config, netns }
    }

    /// The network namespace path in the sandbox's OCI spec (verbose
    /// PodSandboxStatus `info`).
    fn pod_netns(&self, id: &str) -> PathBuf {
        let mut client = self.runtime.clone();
        let reply = self.call(
            "PodSandboxStatus",
            client.pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            }),
        );
        let info: serde_json::Value = reply
            .info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or_else(|| panic!("no verbose info for pod {id}: {:?}", reply.info));
        info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|nss| nss.iter().find(|ns| ns["type"] == "network"))
            .and_then(|ns| ns["path"].as_str())
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("pod {id} has no network namespace path: {info}"))
    }

    /// CreateContainer `name` in `pod` from `image`, running `command`;
    /// its log goes to `<pod log dir>/<name>.log`.
    pub fn create_container(&self, pod: &Pod, name: &str, image: &str, command: &[&str]) -> String {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            // Kubelet repeats the pod's namespace modes for each container.
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: pod
                        .config
                        .linux
                        .as_ref()
                        .and_then(|l| l.security_context.as_ref())
                        .and_then(|s| s.namespace_options.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut client = self.runtime.clone();
        let id = self
            .call(
                "CreateContainer",
                client.create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: pod.id.clone(),
                    config: Some(config),
                    sandbox_config: Some(pod.config.clone()),
                }),
            )
            .container_id;
        self.ids.lock().unwrap().push(id.clone());
        id
    }

    pub fn start_container(&self, id: &str) {
        let mut client = self.runtime.clone();
        self.call(
            "StartContainer",
            client.start_container(cri::StartContainerRequest {
                container_id: id.into(),
            }),
        );
    }

    /// ExecSync: `(exit code, stdout, stderr)`.
    pub fn exec_sync(&self, id: &str, cmd: &[&str]) -> (i32, String, String) {
        let mut client = self.runtime.clone();
        let reply = self.call(
            "ExecSync",
            client.exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 60,
            }),
        );
        (
            reply.exit_code,
            String::from_utf8_lossy(&reply.stdout).into_owned(),
            String::from_utf8_lossy(&reply.stderr).into_owned(),
        )
    }

    pub fn container_status(&self, id: &str) -> cri::ContainerStatus {
        let mut client = self.runtime.clone();
        self.call(
            "ContainerStatus",
            client.container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            }),
        )
        .status
        .expect("ContainerStatus without a status")
    }

    /// The container's state (running, exited, ...).
    pub fn container_state(&self, id: &str) -> cri::ContainerState {
        cri::ContainerState::from_i32(self.container_status(id).state)
            .unwrap_or(cri::ContainerState::ContainerUnknown)
    }

    /// StopContainer with `timeout` seconds of grace (0: SIGKILL at once).
    pub fn stop_container(&self, id: &str, timeout: i64) {
        let mut client = self.runtime.clone();
        self.call(
            "StopContainer",
            client.stop_container(cri::StopContainerRequest {
                container_id: id.into(),
                timeout,
            }),
        );
    }

    pub fn remove_container(&self, id: &str) {
        let mut client = self.runtime.clone();
        self.call(
            "RemoveContainer",
            client.remove_container(cri::RemoveContainerRequest {
                container_id: id.into(),
            }),
        );
    }

    pub fn stop_pod(&self, id: &str) {
        let mut client = self.runtime.clone();
        self.call(
            "StopPodSandbox",
            client.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            }),
        );
    }

    pub fn remove_pod(&self, id: &str) {
        let mut client = self.runtime.clone();
        self.call(
            "RemovePodSandbox",
            client.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            }),
        );
    }

    /// Pod ids CRI knows, with their state.
    pub fn pods(&self) -> Vec<(String, cri::PodSandboxState)> {
        let mut client = self.runtime.clone();
        self.call(
            "ListPodSandbox",
            client.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }),
        )
        .items
        .into_iter()
        .map(|p| {
            let state = cri::PodSandboxState::from_i32(p.state)
                .unwrap_or(cri::PodSandboxState::SandboxNotready);
            (p.id, state)
        })
        .collect()
    }

    /// Container ids CRI knows.
    pub fn containers(&self) -> Vec<String> {
        let mut client = self.runtime.clone();
        self.call(
            "ListContainers",
            client.list_containers(cri::ListContainersRequest { filter: None }),
        )
        .containers
        .into_iter()
        .map(|c| c.id)
        .collect()
    }

    /// PullImage; returns the image ref (`sha256:...` of its config).
    pub fn pull_image(&self, image: &str) -> String {
        let mut client = self.images.clone();
        self.call(
            "PullImage",
            client.pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                auth: None,
                sandbox_config: None,
            }),
        )
        .image_ref
    }

    pub fn image_status(&self, image: &str) -> Option<cri::Image> {
        let mut client = self.images.clone();
        self.call(
            "ImageStatus",
            client.image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                verbose: false,
            }),
        )
        .image
    }

    /// What the container wrote to stdout and stderr, from its CRI log file
    /// (`<time> <stream> <P|F> <text>` lines), as `(stdout, stderr)`.
    pub fn container_log(&self, pod: &Pod, name: &str) -> (String, String) {
        let path = Path::new(&pod.config.log_directory).join(format!("{name}.log"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let (mut out, mut err) = (String::new(), String::new());
        for line in text.lines() {
            let mut fields = line.splitn(4, ' ');
            let (Some(_time), Some(stream), Some(tag), rest) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let target = if stream == "stderr" {
                &mut err
            } else {
                &mut out
            };
            target.push_str(rest.unwrap_or(""));
            // "F" ends a line; "P" is a partial line continued next.
            if tag == "F" {
                target.push('\n');
            }
        }
        (out, err)
    }

    /// Waits up to `secs` for `cond`, then panics with `what`.
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

    /// Pids of shim processes serving this containerd, with their binary
    /// name (`containerd-shim-lazybd-v2`, `containerd-shim-runc-v2`).
    pub fn shims(&self) -> Vec<(u32, String)> {
        shims_of(&self.socket())
    }

    /// Mounts under this harness's dir (container rootfs, sandbox shm, ...).
    pub fn mounts(&self) -> Vec<PathBuf> {
        lazybd_blockdev::device::mounts::mounts_under(self.dir()).unwrap_or_default()
    }

    /// `(runc root, id)` of runc state left for this harness's pods and
    /// containers: runc's own runtime uses the private root, ours the
    /// default one (see the config).
    pub fn runc_containers(&self) -> Vec<(PathBuf, String)> {
        let roots = [
            self.dir().join("runc").join(K8S_NAMESPACE),
            PathBuf::from(DEFAULT_RUNC_ROOT),
        ];
        let ids = self.ids.lock().unwrap().clone();
        let mut left = Vec::new();
        for root in roots {
            for id in &ids {
                if root.join(id).exists() {
                    left.push((root.clone(), id.clone()));
                }
            }
        }
        left
    }

    /// Stops and removes every pod CRI knows, tolerating errors (Drop).
    fn remove_all_pods(&self) {
        let mut client = self.runtime.clone();
        let Ok(reply) =
            self.try_call(client.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }))
        else {
            return;
        };
        for pod in reply.items {
            let mut client = self.runtime.clone();
            if let Err(e) = self.try_call(client.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            })) {
                eprintln!("cri cleanup: StopPodSandbox {}: {e}", pod.id);
            }
            let mut client = self.runtime.clone();
            if let Err(e) = self.try_call(client.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            })) {
                eprintln!("cri cleanup: RemovePodSandbox {}: {e}", pod.id);
            }
        }
    }

    fn stop_daemon(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("cri cleanup: containerd ignored SIGTERM for 15 s; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for CriContainerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.remove_all_pods();
        }
        self.stop_daemon();
        for netns in self.netns.lock().unwrap().iter() {
            if netns.exists() {
                let _ = nix::mount::umount2(netns, nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_file(netns);
            }
        }
        // libcni caches each ADD result under a fixed dir (containerd 1.6
        // has no setting for it); a DEL CRI never got to do leaves one.
        let ids = self.ids.lock().unwrap().clone();
        if let Ok(cache) = std::fs::read_dir(CNI_CACHE_DIR) {
            for entry in cache.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if ids.iter().any(|id| name.contains(id.as_str())) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        for (pid, _) in self.shims() {
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
        let mut mounts = self.mounts();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
        for mount in mounts {
            let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
}

fn spawn_containerd(dir: &Path, control: Option<&Path>, own_netns: bool) -> Child {
    let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
    // Our shim first on PATH: containerd finds `containerd-shim-lazybd-v2`
    // for runtime type io.containerd.lazybd.v2 by name, as on a node.
    let path = format!(
        "{}:{}",
        dir.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // unshare(1) execs containerd (no fork), so the child is containerd.
    let mut cmd = if own_netns {
        let mut cmd = Command::new("unshare");
        cmd.args(["--net", "--", "containerd"]);
        cmd
    } else {
        Command::new("containerd")
    };
    // Shims inherit containerd's environment.
    if let Some(control) = control {
        cmd.env("LAZYBD_CONTROL_SOCKET", control);
    }
    cmd.arg("--config")
        .arg(dir.join("config.toml"))
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start containerd (hack/install-deps.sh installs it)")
}

/// A bridge network on [`POD_SUBNET`] (host-local IPAM with its state in
/// `d`, no masquerading), or loopback only: with host-network pods CNI is
/// never called, but CRI wants a network config to report NetworkReady.
fn cni_conflist(d: &Path, pod_network: bool) -> String {
    let plugins = if pod_network {
        serde_json::json!([{
            "type": "bridge",
            "bridge": "lbtcni0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": POD_SUBNET}]],
                "dataDir": d.join("cni/ipam"),
            },
        }])
    } else {
        serde_json::json!([{"type": "loopback"}])
    };
    serde_json::json!({"cniVersion": "1.0.0", "name": "lazybd-test", "plugins": plugins})
        .to_string()
}

/// The config: a node's CRI config (docs/containerd.md) on private paths.
fn config_toml(d: &Path, snapshotter: &CriSnapshotter) -> String {
    let proxy = match snapshotter {
        CriSnapshotter::Overlayfs => String::new(),
        CriSnapshotter::Lazybd { socket, root, .. } => format!(
            "[proxy_plugins]\n  [proxy_plugins.lazybd]\n    type = \"snapshot\"\n    address = \"{}\"\n    [proxy_plugins.lazybd.exports]\n      root = \"{}\"\n",
            socket.display(),
            root.display()
        ),
    };
    let cri = r#"plugins."io.containerd.grpc.v1.cri""#;
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/c.sock"
[ttrpc]
  address = "{d}/c.sock.ttrpc"
[debug]
  level = "debug"
{proxy}
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # Loading containerd's AppArmor profile would change the host's policy.
  disable_apparmor = true
  # Tests may run in a container without CAP_SYS_RESOURCE, where the
  # sandbox's oom_score_adj of -998 is refused: cap it at containerd's own.
  restrict_oom_score_adj = true
  [{cri}.containerd]
    snapshotter = "{snap}"
    disable_snapshot_annotations = false
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        Root = "{d}/runc"
    # CRI decodes `options` into runc's Options only for io.containerd.runc.*
    # runtime types; for ours it sends runtimeoptions.v1.Options, dropping
    # BinaryName/Root: our shim runs `runc` from PATH with its state under
    # /run/containerd/runc/k8s.io (Drop cleans up our containers there).
    [{cri}.containerd.runtimes.{LAZYBD_HANDLER}]
      runtime_type = "io.containerd.lazybd.v2"
  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni/net.d"
    max_conf_num = 1
  [{cri}.registry]
    config_path = "{d}/certs.d"
"#,
        d = d.display(),
        snap = snapshotter.name(),
    )
}

/// Shim processes started for the containerd at `socket`: every shim gets
/// `-address <socket>` on its command line.
pub fn shims_of(socket: &Path) -> Vec<(u32, String)> {
    let needle = format!("-address\0{}\0", socket.display());
    let mut shims = Vec::new();
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return shims;
    };
    for entry in proc_dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if !cmdline.contains(&needle) {
            continue;
        }
        let argv0 = cmdline.split('\0').next().unwrap_or("");
        let name = Path::new(argv0)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with("containerd-shim") {
            shims.push((pid, name));
        }
    }
    shims
}
