//! A node that keeps containerd's stock runtime, `io.containerd.runc.v2`:
//! lazybd-snapshotter learns of task starts and exits from containerd's
//! events (`[containerd] address`), so a container on lazy layers gets the
//! same background prefetch, handoff to the local cache files and startup
//! trace as under containerd-shim-lazybd-v2. Through `ctr run` and through
//! CRI, with real containerd 1.6 and runc. Under our shim both reporters
//! see the start; it is acted on once.

use std::time::Duration;

use lazybd_tests::cli::{lazybd, ok};
use lazybd_tests::containerd::{LazyRun, RUNC_RUNTIME};
use lazybd_tests::lazy_node::LazyNode;
use lazybd_tests::require_root;
use lazybd_tests::snapshotter::{metric, metric_or_zero, SnapshotterDaemon};

/// A short trace window; the full prefetch starts when it ends.
const CONFIG: &str = "[trace]\nrecord_secs = 2\n";
/// Startup reads a second after the start: the task-start event reaches the
/// snapshotter a moment after the process runs (with either reporter), and
/// a container's real startup reads last longer than that.
const STARTUP: &str =
    "sleep 1; cat /etc/hostname /data/small.txt /data/added >/dev/null; exec sleep 2147483647";

/// The containers `lazybd layers --json` lists on each attached layer.
fn containers_on_layers(snapshotter: &SnapshotterDaemon) -> Vec<Vec<String>> {
    let out = ok(&lazybd(&[
        &"layers",
        &"--control",
        &snapshotter.control,
        &"--json",
    ]));
    let reply: serde_json::Value = serde_json::from_str(&out).expect("layers --json");
    reply["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            l["containers"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .filter_map(|c| c.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect()
}

/// Waits (bounded) until the snapshotter's log has `line`.
fn wait_log(snapshotter: &SnapshotterDaemon, line: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !snapshotter.log().contains(line) {
        assert!(
            std::time::Instant::now() < deadline,
            "no {line:?} in the snapshotter's log:\n{}",
            snapshotter.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the startup trace is stored and every layer is local.
fn wait_trace_and_handoff(snapshotter: &SnapshotterDaemon) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while metric_or_zero(&snapshotter.metrics(), "lazybd_traces_stored_total") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no startup trace stored after 60 s; the snapshotter's log:\n{}",
            snapshotter.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    snapshotter.wait_all_local(Duration::from_secs(120));
    let m = snapshotter.metrics();
    assert_eq!(metric(&m, "lazybd_traces_stored_total"), 1.0, "{m}");
    assert!(
        metric(&m, "lazybd_trace_recorded_ranges_total") > 0.0,
        "{m}"
    );
    assert_eq!(metric(&m, "lazybd_handoffs_total"), 3.0, "{m}");
}

#[test]
fn ctr_run_under_runc_v2_gets_prefetch_handoff_and_a_trace() {
    require_root!();
    let node = LazyNode::with_ctr(CONFIG);
    let (ctd, snapshotter, lazy) = (&node.ctd, &node.snapshotter, &node.img.image);
    wait_log(snapshotter, "following task events of containerd at");
    let out = node.pull(lazy);
    assert!(out.contains("3 layers: 3 attached lazily"), "{out}");
    assert!(snapshotter.layer_states().iter().all(|s| s == "lazy"));

    ctd.ctr_ok(
        &LazyRun {
            image: lazy,
            id: "stock-1",
            detach: true,
            runtime: Some(RUNC_RUNTIME),
            cmd: &["/bin/sh", "-c", STARTUP],
            ..LazyRun::default()
        }
        .args(),
    );
    ctd.wait_task(30, "stock-1", "RUNNING");
    // runc's shim runs it, not ours: the start came from containerd's events.
    let shims = ctd.shims();
    assert!(
        !shims.is_empty() && shims.iter().all(|(_, n)| n == "containerd-shim-runc-v2"),
        "{shims:?}"
    );
    wait_trace_and_handoff(snapshotter);
    assert_eq!(
        containers_on_layers(snapshotter),
        vec![vec!["default/stock-1".to_string()]; 3]
    );

    // The exit event: the container no longer counts on its layers.
    ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "stock-1"]);
    ctd.wait_for(30, "the exit to reach the snapshotter", || {
        containers_on_layers(snapshotter)
            .iter()
            .all(|c| c.is_empty())
    });
    ctd.ctr_ok(&["task", "rm", "stock-1"]);
    ctd.ctr_ok(&["containers", "rm", "stock-1"]);
}

/// Our shim reports the start on the control socket and containerd
/// publishes it too: one recording, one start acted on; and the control
/// API says so when told again.
#[test]
fn a_start_reported_by_both_the_shim_and_containerd_is_acted_on_once() {
    require_root!();
    let node = LazyNode::with_ctr(CONFIG);
    let (ctd, snapshotter, lazy) = (&node.ctd, &node.snapshotter, &node.img.image);
    node.pull(lazy);
    ctd.ctr_ok(
        &LazyRun {
            image: lazy,
            id: "both-1",
            detach: true,
            runtime: Some(lazybd_tests::containerd::LAZYBD_RUNTIME),
            cmd: &["/bin/sh", "-c", STARTUP],
            ..LazyRun::default()
        }
        .args(),
    );
    ctd.wait_task(30, "both-1", "RUNNING");
    wait_trace_and_handoff(snapshotter);
    let log = snapshotter.log();
    assert_eq!(
        log.matches("container default/both-1 started on 3 lazy layers")
            .count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches("recording the startup trace").count(),
        1,
        "{log}"
    );

    // A third report of the same task changes nothing and says so.
    let pid = ctd
        .ctr_ok(&["task", "ls"])
        .lines()
        .find(|l| l.starts_with("both-1 "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u32>().ok())
        .expect("the task's pid");
    let reply = snapshotter.control(&serde_json::json!({
        "event": "task-start", "namespace": "default", "container_id": "both-1",
        "pid": pid, "rootfs": [],
    }));
    assert_eq!(reply["duplicate"], true, "{reply}");
    assert_eq!(reply["layers"].as_array().map(Vec::len), Some(3), "{reply}");
    ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "both-1"]);
    ctd.wait_for(30, "the exit to reach the snapshotter", || {
        containers_on_layers(snapshotter)
            .iter()
            .all(|c| c.is_empty())
    });
}

#[test]
fn a_cri_pod_under_runc_gets_prefetch_handoff_and_a_trace() {
    require_root!();
    let node = LazyNode::with_cri(CONFIG);
    let (ctd, snapshotter, lazy) = (&node.ctd, &node.snapshotter, &node.img.image);
    // A start before the snapshotter follows containerd is only found
    // running later, too late to trace its startup.
    wait_log(snapshotter, "following task events of containerd at");
    ctd.pull_image(lazy);
    assert!(snapshotter.layer_states().iter().all(|s| s == "lazy"));
    let pod = ctd.run_pod("stock-pod", "runc");
    let id = ctd.create_container(&pod, "app", lazy, &["/bin/sh", "-c", STARTUP]);
    ctd.start_container(&id);
    wait_trace_and_handoff(snapshotter);
    let on_layers = containers_on_layers(snapshotter);
    assert!(
        on_layers
            .iter()
            .all(|c| c.contains(&format!("k8s.io/{id}"))),
        "{on_layers:?}"
    );
    assert!(
        ctd.shims()
            .iter()
            .all(|(_, n)| n == "containerd-shim-runc-v2"),
        "{:?}",
        ctd.shims()
    );
    ctd.stop_pod(&pod.id);
    ctd.wait_for(30, "the exit to reach the snapshotter", || {
        containers_on_layers(snapshotter)
            .iter()
            .all(|c| c.is_empty())
    });
    ctd.remove_pod(&pod.id);
}

/// containerd restarts under a running container: the snapshotter says
/// so, reconnects, and still sees the container's exit afterwards.
#[test]
fn the_snapshotter_follows_containerd_across_its_restart() {
    require_root!();
    let mut node = LazyNode::with_ctr("[prefetch]\non_task_start = false\n");
    let lazy = node.img.image.clone();
    node.pull(&lazy);
    node.ctd.ctr_ok(
        &LazyRun {
            image: &lazy,
            id: "restart-1",
            detach: true,
            cmd: &["/bin/busybox", "sleep", "2147483647"],
            ..LazyRun::default()
        }
        .args(),
    );
    let (ctd, snapshotter) = (&node.ctd, &node.snapshotter);
    ctd.wait_for(30, "the start to reach the snapshotter", || {
        containers_on_layers(snapshotter)
            .iter()
            .all(|c| c == &["default/restart-1"])
    });
    node.ctd.restart();
    let (ctd, snapshotter) = (&node.ctd, &node.snapshotter);
    wait_log(snapshotter, "again: it is back");
    let log = snapshotter.log();
    assert!(
        log.contains("task starts under runtimes other than"),
        "{log}"
    );
    // Still on its layers (found running at the reconnect, not doubled).
    assert_eq!(
        containers_on_layers(snapshotter),
        vec![vec!["default/restart-1".to_string()]; 3]
    );
    ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "restart-1"]);
    ctd.wait_for(30, "the exit to reach the snapshotter", || {
        containers_on_layers(snapshotter)
            .iter()
            .all(|c| c.is_empty())
    });
}
