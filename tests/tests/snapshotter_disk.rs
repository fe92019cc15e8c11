//! What a lazy layer costs on disk, as an operator sees it through real
//! containerd: `ctr snapshots usage` reports the bytes its cache holds (little
//! after a lazy pull, more once prefetched), and removing the image detaches
//! its layers so that eviction (`[cache] capacity_bytes`) removes their
//! caches, counted in the metrics.

use std::time::Duration;

use lazybd_tests::containerd::{Containerd, LazyRun};
use lazybd_tests::lazy_node::LazyNode;
use lazybd_tests::require_root;
use lazybd_tests::snapshotter::{metric_or_zero, SnapshotterDaemon};

/// Prefetch on task start, and a capacity of one byte: every detached
/// layer's cache is evicted at the next pass (every second).
const CONFIG: &str = "[prefetch]\non_task_start = true\n\
                      [cache]\ncapacity_bytes = 1\nevict_interval_secs = 1\n";

/// The total size `ctr snapshots --snapshotter lazybd usage` reports, in
/// bytes (ctr prints binary units: "20.0 KiB").
fn usage_bytes(ctd: &Containerd) -> f64 {
    let out = ctd.ctr_ok(&["snapshots", "--snapshotter", "lazybd", "usage"]);
    out.lines()
        .skip(1)
        .map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            assert!(cols.len() >= 3, "usage line {line:?}");
            let (value, unit) = (cols[1], cols[2]);
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line:?}"));
            let scale = match unit {
                "B" => 1.0,
                "KiB" => 1024.0,
                "MiB" => 1024.0 * 1024.0,
                "GiB" => 1024.0 * 1024.0 * 1024.0,
                other => panic!("unit {other:?} in {line:?}"),
            };
            value * scale
        })
        .sum()
}

fn cache_dirs(snapshotter: &SnapshotterDaemon) -> usize {
    std::fs::read_dir(snapshotter.root.join("lazy/layers"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn usage_is_what_the_cache_holds_and_removed_images_are_evicted() {
    require_root!();
    let node = LazyNode::with_ctr(CONFIG);
    let (ctd, snapshotter, lazy) = (&node.ctd, &node.snapshotter, &node.img.image);
    node.pull(lazy);
    assert!(snapshotter.layer_states().iter().all(|s| s == "lazy"));
    let pulled = usage_bytes(ctd);
    // The rich image holds a 6 MiB file; a lazy pull fetched only indexes,
    // metadata and startup chunks.
    assert!(
        pulled < 3e6,
        "usage right after a lazy pull: {pulled} bytes"
    );
    assert_eq!(cache_dirs(snapshotter), 3);

    ctd.ctr_ok(
        &LazyRun {
            image: lazy,
            id: "disk-1",
            detach: true,
            cmd: &["/bin/busybox", "sleep", "2147483647"],
            ..LazyRun::default()
        }
        .args(),
    );
    ctd.wait_task(30, "disk-1", "RUNNING");
    snapshotter.wait_all_local(Duration::from_secs(120));
    let local = usage_bytes(ctd);
    assert!(
        local > pulled + 6e6,
        "usage once prefetched: {local} bytes (after the pull: {pulled})"
    );
    // Attached layers are never evicted, whatever the capacity.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(cache_dirs(snapshotter), 3);

    ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "disk-1"]);
    ctd.wait_for(30, "the task to stop", || {
        ctd.ctr(&["task", "rm", "disk-1"]).status.success()
    });
    ctd.ctr_ok(&["containers", "rm", "disk-1"]);
    ctd.ctr_ok(&["images", "rm", "--sync", lazy]);
    ctd.wait_for(60, "the caches of the removed image to be evicted", || {
        cache_dirs(snapshotter) == 0
    });
    let m = snapshotter.metrics();
    assert_eq!(
        metric_or_zero(&m, "lazybd_cache_evicted_layers_total"),
        3.0,
        "{m}"
    );
    assert!(
        metric_or_zero(&m, "lazybd_cache_evicted_bytes_total") > 6e6,
        "{m}"
    );
}
