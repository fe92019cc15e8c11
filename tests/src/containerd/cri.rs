//! CRI v1 against the harness's containerd (built with CRI on), driven the
//! way kubelet drives it: RunPodSandbox, CreateContainer, ExecSync, ...
//!
//! Runtimes: `runc` (io.containerd.runc.v2, its runc state under the
//! harness's dir through its `Root` option; CRI passes no runc options to
//! other runtime types) and [`LAZYBD_HANDLER`] (io.containerd.lazybd.v2, our
//! shim, its runc state under the default /run/containerd/runc/k8s.io).
//! Pods use the host network (kubelet's `hostNetwork: true`) unless the
//! harness has a pod network ([`super::ContainerdBuilder::pod_network`]).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use containerd_client::tonic::{self, transport::Channel};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;

use super::{Containerd, CriSettings, START_DEADLINE};

pub use super::config::{LAZYBD_HANDLER, POD_SUBNET};
pub use super::K8S_NAMESPACE;

/// Any single CRI call that takes longer has hung.
const CALL_DEADLINE: Duration = Duration::from_secs(120);
/// Where libcni keeps ADD results, named `<network>-<container id>-<ifname>`.
const CNI_CACHE_DIR: &str = "/var/lib/cni/results";

/// A pod made by [`Containerd::run_pod`]: its id and the config
/// CreateContainer needs again.
pub struct Pod {
    pub id: String,
    pub config: cri::PodSandboxConfig,
    /// The pod's network namespace (bind mount), with a pod network.
    pub netns: Option<PathBuf>,
}

/// The CRI clients of a running containerd.
pub(super) struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    pub(super) settings: CriSettings,
    /// Network namespaces CRI made for our pods, removed on Drop if CRI
    /// did not.
    netns: Mutex<Vec<PathBuf>>,
}

impl Cri {
    /// Connects to `ctd` (serving already) and waits until CRI, which
    /// registers after containerd's own services, answers Version.
    pub(super) fn connect(ctd: &Containerd, settings: &CriSettings) -> Cri {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let channel = rt
            .block_on(containerd_client::connect(ctd.socket()))
            .unwrap_or_else(|e| panic!("connect to containerd: {e}\n{}", ctd.log_tail()));
        let cri = Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            rt,
            settings: settings.clone(),
            netns: Mutex::default(),
        };
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let mut client = cri.runtime.clone();
            let version = cri.try_call(client.version(cri::VersionRequest {
                version: "v1".into(),
            }));
            match version {
                Ok(_) => return cri,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "CRI did not answer Version in {START_DEADLINE:?}: {e}\n{}",
                    ctd.log_tail()
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs one CRI call with a deadline.
    fn try_call<T, F>(&self, fut: F) -> Result<T, String>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
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

    /// What CRI leaves of pods when it cannot finish (Drop, containerd
    /// stopped): their network namespaces, and libcni's cached ADD results
    /// of pods `ids` (a fixed dir: containerd 1.6 has no setting for it).
    pub(super) fn remove_network_leftovers(&self, ids: &[String]) {
        for netns in self.netns.lock().unwrap().iter() {
            if netns.exists() {
                let _ = nix::mount::umount2(netns, nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_file(netns);
            }
        }
        if let Ok(cache) = std::fs::read_dir(CNI_CACHE_DIR) {
            for entry in cache.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if ids.iter().any(|id| name.contains(id.as_str())) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

impl Containerd {
    fn cri_api(&self) -> &Cri {
        self.cri
            .as_ref()
            .expect("CRI is off in this containerd (Containerd::builder().cri())")
    }

    /// One RuntimeService call with a deadline; panics with the call's error
    /// and containerd's log (a harness: a failed call fails the test).
    fn runtime_call<T, F>(
        &self,
        what: &str,
        call: impl FnOnce(RuntimeServiceClient<Channel>) -> F,
    ) -> T
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let cri = self.cri_api();
        cri.try_call(call(cri.runtime.clone()))
            .unwrap_or_else(|e| panic!("CRI {what}: {e}\n{}", self.log_tail()))
    }

    /// One ImageService call, as [`Containerd::runtime_call`].
    fn image_call<T, F>(&self, what: &str, call: impl FnOnce(ImageServiceClient<Channel>) -> F) -> T
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let cri = self.cri_api();
        cri.try_call(call(cri.images.clone()))
            .unwrap_or_else(|e| panic!("CRI {what}: {e}\n{}", self.log_tail()))
    }

    /// RunPodSandbox `name` with `handler` (e.g. [`LAZYBD_HANDLER`]), on
    /// the host network or the CNI bridge, logs under this harness's dir.
    pub fn run_pod(&self, name: &str, handler: &str) -> Pod {
        let pod_network = self.cri_api().settings.pod_network;
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
            hostname: if pod_network {
                name.into()
            } else {
                String::new()
            },
            log_directory: log_directory.to_string_lossy().into_owned(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: if pod_network {
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
        let request = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        };
        let id = self
            .runtime_call("RunPodSandbox", |mut c| async move {
                c.run_pod_sandbox(request).await
            })
            .pod_sandbox_id;
        self.remember_id(&id);
        let netns = pod_network.then(|| self.pod_netns(&id));
        if let Some(netns) = &netns {
            self.cri_api().netns.lock().unwrap().push(netns.clone());
        }
        Pod { id, config, netns }
    }

    /// The network namespace path in the sandbox's OCI spec (verbose
    /// PodSandboxStatus `info`).
    fn pod_netns(&self, id: &str) -> PathBuf {
        let request = cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        };
        let reply = self.runtime_call("PodSandboxStatus", |mut c| async move {
            c.pod_sandbox_status(request).await
        });
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
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        };
        let id = self
            .runtime_call("CreateContainer", |mut c| async move {
                c.create_container(request).await
            })
            .container_id;
        self.remember_id(&id);
        id
    }

    pub fn start_container(&self, id: &str) {
        let request = cri::StartContainerRequest {
            container_id: id.into(),
        };
        self.runtime_call("StartContainer", |mut c| async move {
            c.start_container(request).await
        });
    }

    /// ExecSync: `(exit code, stdout, stderr)`.
    pub fn exec_sync(&self, id: &str, cmd: &[&str]) -> (i32, String, String) {
        let request = cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        };
        let reply = self.runtime_call(
            "ExecSync",
            |mut c| async move { c.exec_sync(request).await },
        );
        (
            reply.exit_code,
            String::from_utf8_lossy(&reply.stdout).into_owned(),
            String::from_utf8_lossy(&reply.stderr).into_owned(),
        )
    }

    pub fn container_status(&self, id: &str) -> cri::ContainerStatus {
        let request = cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        self.runtime_call("ContainerStatus", |mut c| async move {
            c.container_status(request).await
        })
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
        let request = cri::StopContainerRequest {
            container_id: id.into(),
            timeout,
        };
        self.runtime_call("StopContainer", |mut c| async move {
            c.stop_container(request).await
        });
    }

    pub fn remove_container(&self, id: &str) {
        let request = cri::RemoveContainerRequest {
            container_id: id.into(),
        };
        self.runtime_call("RemoveContainer", |mut c| async move {
            c.remove_container(request).await
        });
    }

    pub fn stop_pod(&self, id: &str) {
        let request = cri::StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.runtime_call("StopPodSandbox", |mut c| async move {
            c.stop_pod_sandbox(request).await
        });
    }

    pub fn remove_pod(&self, id: &str) {
        let request = cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.runtime_call("RemovePodSandbox", |mut c| async move {
            c.remove_pod_sandbox(request).await
        });
    }

    /// Pod ids CRI knows, with their state.
    pub fn pods(&self) -> Vec<(String, cri::PodSandboxState)> {
        let request = cri::ListPodSandboxRequest { filter: None };
        self.runtime_call("ListPodSandbox", |mut c| async move {
            c.list_pod_sandbox(request).await
        })
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
        let request = cri::ListContainersRequest { filter: None };
        self.runtime_call("ListContainers", |mut c| async move {
            c.list_containers(request).await
        })
        .containers
        .into_iter()
        .map(|c| c.id)
        .collect()
    }

    /// PullImage; returns the image ref (`sha256:...` of its config).
    pub fn pull_image(&self, image: &str) -> String {
        self.try_pull_image(image)
            .unwrap_or_else(|e| panic!("CRI PullImage: {e}\n{}", self.log_tail()))
    }

    /// PullImage, which may fail: the image ref, or the status.
    pub fn try_pull_image(&self, image: &str) -> Result<String, String> {
        let request = cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: None,
        };
        let cri = self.cri_api();
        cri.try_call(cri.images.clone().pull_image(request))
            .map(|r| r.image_ref)
    }

    pub fn image_status(&self, image: &str) -> Option<cri::Image> {
        let request = cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            verbose: false,
        };
        self.image_call("ImageStatus", |mut c| async move {
            c.image_status(request).await
        })
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

    /// Stops and removes every pod CRI knows, tolerating errors (Drop).
    pub(super) fn remove_all_pods(&self) {
        let cri = self.cri_api();
        let mut client = cri.runtime.clone();
        let Ok(reply) =
            cri.try_call(client.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }))
        else {
            return;
        };
        for pod in reply.items {
            let mut client = cri.runtime.clone();
            if let Err(e) = cri.try_call(client.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            })) {
                eprintln!("cri cleanup: StopPodSandbox {}: {e}", pod.id);
            }
            let mut client = cri.runtime.clone();
            if let Err(e) = cri.try_call(client.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            })) {
                eprintln!("cri cleanup: RemovePodSandbox {}: {e}", pod.id);
            }
        }
    }
}
