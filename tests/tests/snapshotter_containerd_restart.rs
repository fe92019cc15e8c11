//! A real container (containerd 1.6, `ctr run` on lazybd layers) keeps
//! reading its files while lazybd-snapshotter is SIGKILLed and restarted,
//! once its layers were prefetched and handed off to their local cache files.
//! The task-start event that the lazybd shim sends is sent here by hand (the
//! container runs under containerd's runc shim).

use std::time::{Duration, Instant};

use lazybd_tests::cli::{lazybd, ok};
use lazybd_tests::containerd_daemon::ContainerdDaemon;
use lazybd_tests::images::publish_lazy_rich;
use lazybd_tests::registry::Registry;
use lazybd_tests::require_root;
use lazybd_tests::snapshotter::SnapshotterDaemon;

fn run_ok(ctd: &ContainerdDaemon, args: &[&str]) -> String {
    let out = ctd.ctr(args);
    assert!(
        out.status.success(),
        "ctr {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctd.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn states(s: &SnapshotterDaemon) -> Vec<String> {
    s.control(&serde_json::json!({"op": "layers"}))["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["state"].as_str().unwrap().to_owned())
        .collect()
}

/// What the container sees of its files, read inside it after the page
/// caches were dropped (so the reads reach the layers' block devices).
fn checksums(ctd: &ContainerdDaemon, exec_id: &str) -> String {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    run_ok(
        ctd,
        &[
            "task",
            "exec",
            "--exec-id",
            exec_id,
            "c1",
            "/bin/sh",
            "-c",
            "md5sum /data/big /etc/hostname /data/small.txt",
        ],
    )
}

#[test]
fn a_ctr_run_container_keeps_reading_across_a_snapshotter_crash_after_handoff() {
    if !require_root("a_ctr_run_container_keeps_reading_across_a_snapshotter_crash_after_handoff") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let registry = Registry::start();
    publish_lazy_rich(t, &registry);
    let lazy = registry.reference("rich:lazy");
    let sdir = t.join("snapshotter");
    std::fs::create_dir_all(&sdir).unwrap();
    let mut snapshotter = SnapshotterDaemon::start(
        &sdir,
        &format!("[registry]\nplain_http = [\"{}\"]\n", registry.host()),
    );
    let ctd = ContainerdDaemon::start(
        &t.join("containerd"),
        &format!(
            "[proxy_plugins]\n  [proxy_plugins.lazybd]\n    type = \"snapshot\"\n    address = \"{}\"\n",
            snapshotter.socket.display()
        ),
    );
    let out = ok(&lazybd(&[
        &"pull",
        &"--plain-http",
        &"--address",
        &ctd.socket,
        &lazy,
    ]));
    assert!(out.contains("3 attached lazily"), "{out}");
    run_ok(
        &ctd,
        &[
            "run",
            "-d",
            "--snapshotter",
            "lazybd",
            &lazy,
            "c1",
            "/bin/sh",
            "-c",
            "while :; do sleep 1; done",
        ],
    );

    // The shim's task-start, with the rootfs containerd mounted.
    let mounts = run_ok(
        &ctd,
        &[
            "snapshots",
            "--snapshotter",
            "lazybd",
            "mounts",
            "/rootfs",
            "c1",
        ],
    );
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
    let deadline = Instant::now() + Duration::from_secs(120);
    while !states(&snapshotter).iter().all(|s| s == "local") {
        assert!(
            Instant::now() < deadline,
            "not local after 120 s: {:?}\n{}",
            states(&snapshotter),
            snapshotter.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = checksums(&ctd, "e1");
    assert_eq!(before.lines().count(), 3, "{before}");

    snapshotter.kill();
    assert_eq!(checksums(&ctd, "e2"), before, "reads after SIGKILL");

    snapshotter.restart();
    assert!(states(&snapshotter).iter().all(|s| s == "local"));
    let listed = ok(&lazybd(&[&"layers", &"--control", &snapshotter.control]));
    assert_eq!(listed.matches(" local ").count(), 3, "{listed}");
    assert_eq!(checksums(&ctd, "e3"), before, "reads after the restart");

    run_ok(&ctd, &["task", "kill", "-s", "KILL", "c1"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !run_ok(&ctd, &["task", "ls"]).contains("STOPPED") {
        assert!(Instant::now() < deadline, "task did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    run_ok(&ctd, &["task", "rm", "c1"]);
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
    run_ok(&ctd, &["image", "rm", &lazy]);
}
