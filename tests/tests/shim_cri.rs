//! containerd-shim-lazybd-v2 under CRI, driven as kubelet drives it: a pod
//! sandbox and two containers with runtime handler `lazybd`, all served by
//! one shim process (grouped by `io.kubernetes.cri.sandbox-id`), their
//! output in the CRI log files and through ExecSync, then everything
//! stopped and removed with no shim, mount or runc state left.

use lazybd_tests::busybox::BUSYBOX_IMAGE;
use lazybd_tests::containerd::cri::{LAZYBD_HANDLER, POD_SUBNET};
use lazybd_tests::containerd::Containerd;
use lazybd_tests::require_root;

use k8s_cri::v1::ContainerState;

const LAZYBD_SHIM: &str = "containerd-shim-lazybd-v2";
const RUNC_SHIM: &str = "containerd-shim-runc-v2";

fn shims_named(ctd: &Containerd, shim: &str) -> Vec<u32> {
    ctd.shims()
        .into_iter()
        .filter(|(_, name)| name == shim)
        .map(|(pid, _)| pid)
        .collect()
}

/// After the last RemovePodSandbox: no pod, container, shim, mount or runc
/// state is left.
fn assert_nothing_left(ctd: &Containerd) {
    assert!(ctd.pods().is_empty() && ctd.containers().is_empty());
    ctd.wait_for(30, "the shim to exit", || ctd.shims().is_empty());
    ctd.wait_for(30, "mounts to go", || ctd.mounts().is_empty());
    assert!(
        ctd.runc_containers().is_empty(),
        "runc state: {:?}",
        ctd.runc_containers()
    );
}

#[test]
fn one_shim_serves_a_pod_and_its_two_containers() {
    require_root!();
    pod_with_two_containers(LAZYBD_HANDLER, LAZYBD_SHIM);
}

/// The same scenario on containerd's own runc v2 shim: the expectations
/// are containerd's behaviour, not ours.
#[test]
fn runc_v2_passes_the_same_pod_scenario() {
    require_root!();
    pod_with_two_containers("runc", RUNC_SHIM);
}

fn pod_with_two_containers(handler: &str, shim: &str) {
    let ctd = Containerd::builder().cri().start();
    let pod_shims = |ctd: &Containerd| shims_named(ctd, shim);
    let pod = ctd.run_pod("pod-two", handler);
    let sandbox_shims = pod_shims(&ctd);
    assert_eq!(
        sandbox_shims.len(),
        1,
        "shims after RunPodSandbox: {:?}",
        ctd.shims()
    );

    let mut ids = Vec::new();
    for name in ["alpha", "beta"] {
        let script =
            format!("echo hello from {name}; echo {name} to stderr >&2; exec sleep 2147483647");
        let id = ctd.create_container(&pod, name, BUSYBOX_IMAGE, &["/bin/sh", "-c", &script]);
        ctd.start_container(&id);
        ids.push((name, id));
    }
    for (name, id) in &ids {
        assert_eq!(
            ctd.container_state(id),
            ContainerState::ContainerRunning,
            "{name}"
        );
        ctd.wait_for(30, &format!("{name}'s log"), || {
            let (out, err) = ctd.container_log(&pod, name);
            !out.is_empty() && !err.is_empty()
        });
        let (out, err) = ctd.container_log(&pod, name);
        assert_eq!(out, format!("hello from {name}\n"));
        assert_eq!(err, format!("{name} to stderr\n"));

        let (code, out, err) = ctd.exec_sync(
            id,
            &[
                "/bin/sh",
                "-c",
                "cat /proc/1/cmdline | tr '\\0' ' '; echo; echo oops >&2; exit 3",
            ],
        );
        assert_eq!(code, 3, "{name}: stdout {out:?} stderr {err:?}");
        assert!(
            out.starts_with("sleep 2147483647"),
            "{name}: pid 1 is {out:?}"
        );
        assert_eq!(err, "oops\n", "{name}");
        let (code, out, _) = ctd.exec_sync(id, &["/bin/echo", "exec", name]);
        assert_eq!((code, out), (0, format!("exec {name}\n")));
    }

    // The sandbox's shim took both containers: still one process, the same.
    assert_eq!(pod_shims(&ctd), sandbox_shims, "shims: {:?}", ctd.shims());
    assert!(
        ctd.shims().iter().all(|(_, name)| name == shim),
        "another shim was started: {:?}",
        ctd.shims()
    );

    for (name, id) in &ids {
        ctd.stop_container(id, 0);
        assert_eq!(
            ctd.container_state(id),
            ContainerState::ContainerExited,
            "{name}"
        );
        ctd.remove_container(id);
    }
    assert_eq!(
        pod_shims(&ctd),
        sandbox_shims,
        "the pod's shim outlives its containers"
    );
    ctd.stop_pod(&pod.id);
    ctd.remove_pod(&pod.id);
    assert_nothing_left(&ctd);
}

/// StopPodSandbox with its container still running (kubelet's path when a
/// pod is killed as a whole): the container stops, the shim exits after
/// RemovePodSandbox, nothing is left.
#[test]
fn stopping_a_pod_stops_its_running_container() {
    require_root!();
    let ctd = Containerd::builder().cri().start();
    let pod = ctd.run_pod("pod-stop", LAZYBD_HANDLER);
    let id = ctd.create_container(
        &pod,
        "sleeper",
        BUSYBOX_IMAGE,
        &["/bin/sleep", "2147483647"],
    );
    ctd.start_container(&id);
    assert_eq!(ctd.container_state(&id), ContainerState::ContainerRunning);
    ctd.stop_pod(&pod.id);
    assert_eq!(ctd.container_state(&id), ContainerState::ContainerExited);
    let status = ctd.container_status(&id);
    assert_eq!(status.exit_code, 137, "SIGKILLed: {status:?}");
    ctd.remove_pod(&pod.id);
    assert_nothing_left(&ctd);
}

/// Pods with a network of their own (CNI bridge + host-local, inside
/// containerd's private network namespace): both containers of the pod
/// see the pod's one address; the pod's netns goes with RemovePodSandbox.
#[test]
fn a_pod_on_a_cni_bridge_shares_one_network_namespace() {
    require_root!();
    let ctd = Containerd::builder().pod_network().start();
    let pod = ctd.run_pod("pod-net", LAZYBD_HANDLER);
    let netns = pod.netns.clone().expect("pod netns");
    assert!(netns.exists(), "{}", netns.display());
    let mut addrs = Vec::new();
    for name in ["one", "two"] {
        let id = ctd.create_container(&pod, name, BUSYBOX_IMAGE, &["/bin/sleep", "2147483647"]);
        ctd.start_container(&id);
        let (code, out, err) =
            ctd.exec_sync(&id, &["/bin/ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        assert_eq!(code, 0, "{name}: {err}");
        let (code, host, _) = ctd.exec_sync(&id, &["/bin/hostname"]);
        assert_eq!((code, host.as_str()), (0, "pod-net\n"), "{name}");
        addrs.push(out);
    }
    let prefix = POD_SUBNET.trim_end_matches("0/24");
    assert!(addrs[0].contains(&format!("inet {prefix}")), "{addrs:?}");
    assert_eq!(addrs[0], addrs[1], "one pod, one network namespace");
    // The bridge is in containerd's network namespace, not the host's.
    assert!(!std::path::Path::new("/sys/class/net/lbtcni0").exists());

    ctd.stop_pod(&pod.id);
    ctd.remove_pod(&pod.id);
    assert!(!netns.exists(), "pod netns left: {}", netns.display());
    let cached: Vec<_> = std::fs::read_dir("/var/lib/cni/results")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(&pod.id))
        .map(|e| e.path())
        .collect();
    assert!(cached.is_empty(), "CNI results left: {cached:?}");
    ctd.wait_for(30, "the shim to exit", || ctd.shims().is_empty());
    ctd.wait_for(30, "mounts to go", || ctd.mounts().is_empty());
}
