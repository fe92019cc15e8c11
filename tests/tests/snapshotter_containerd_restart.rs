//! A real container (containerd 1.6, `ctr run` on lazybd layers) keeps
//! reading its files while lazybd-snapshotter is SIGKILLed and restarted,
//! once its layers were prefetched and handed off to their local cache files.
//! The task-start event that the lazybd shim sends is sent here by hand (the
//! container runs under containerd's runc shim).

use std::time::{Duration, Instant};

use lazybd_tests::cli::{lazybd, ok};
use lazybd_tests::containerd::{Containerd, LazyRun};
use lazybd_tests::lazy_node::LazyNode;
use lazybd_tests::require_root;

/// What the container sees of its files, read inside it after the page
/// caches were dropped (so the reads reach the layers' block devices).
fn checksums(ctd: &Containerd, exec_id: &str) -> String {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    ctd.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        exec_id,
        "c1",
        "/bin/sh",
        "-c",
        "md5sum /data/big /etc/hostname /data/small.txt",
    ])
}

#[test]
fn a_ctr_run_container_keeps_reading_across_a_snapshotter_crash_after_handoff() {
    require_root!();
    let mut node = LazyNode::with_ctr("");
    let lazy = node.img.image.clone();
    let out = node.pull(&lazy);
    let (ctd, snapshotter) = (&node.ctd, &mut node.snapshotter);
    assert!(out.contains("3 attached lazily"), "{out}");
    ctd.ctr_ok(
        &LazyRun {
            image: &lazy,
            id: "c1",
            detach: true,
            cmd: &["/bin/sh", "-c", "while :; do sleep 1; done"],
            ..LazyRun::default()
        }
        .args(),
    );

    // The shim's task-start, with the rootfs containerd mounted.
    let mounts = ctd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "lazybd",
        "mounts",
        "/rootfs",
        "c1",
    ]);
    let options = mounts
        .split_whitespace()
        .skip_while(|w| *w != "-o")
        .nth(1)
        .unwrap_or_else(|| panic!("no mount options in {mounts:?}"))
        .to_owned();
    let reply = snapshotter.control(&serde_json::json!({
        "event": "task-start", "namespace": "default", "container_id": "c1",
        "rootfs": [{"type": "overlay", "source": "overlay", "options": options.split(',').collect::<Vec<_>>()}],
    }));
    assert_eq!(reply["layers"].as_array().unwrap().len(), 3, "{reply}");
    snapshotter.wait_all_local(Duration::from_secs(120));
    let before = checksums(ctd, "e1");
    assert_eq!(before.lines().count(), 3, "{before}");

    snapshotter.kill();
    assert_eq!(checksums(ctd, "e2"), before, "reads after SIGKILL");

    snapshotter.restart();
    assert!(snapshotter.layer_states().iter().all(|s| s == "local"));
    let listed = ok(&lazybd(&[&"layers", &"--control", &snapshotter.control]));
    assert_eq!(listed.matches(" local ").count(), 3, "{listed}");
    assert_eq!(checksums(ctd, "e3"), before, "reads after the restart");

    ctd.ctr_ok(&["task", "kill", "-s", "KILL", "c1"]);
    ctd.wait_task(30, "c1", "STOPPED");
    ctd.ctr_ok(&["task", "rm", "c1"]);
    // containerd's connection to the restarted snapshotter may still be in
    // its reconnect backoff: retry, bounded.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = ctd.ctr(&["container", "rm", "c1"]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "container rm: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    ctd.ctr_ok(&["image", "rm", &lazy]);
}
