//! lazybd-snapshotter with a running "container" (an overlay rootfs on
//! three lazy layers, reported through the control API's task-start like
//! the shim does): the task start prefetches every layer, each is handed off
//! to its local cache file, and the container keeps reading its files while
//! the snapshotter is SIGKILLed and after it restarts; `lazybd layers` shows
//! `local`. This is the "restart the snapshotter while the container runs"
//! case.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lazybd_tests::cli::{lazybd, ok};
use lazybd_tests::images::registry_with_lazy_rich;
use lazybd_tests::lazy_layers::{leftovers, wait_nothing_left, walk};
use lazybd_tests::require_root;
use lazybd_tests::snapshots_api::{attach_layers, prepare, remove};
use lazybd_tests::snapshotter::{metric, plain_http_config, Mounted, SnapshotterDaemon};

/// Every regular file's bytes under `dir`, by relative path.
fn contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    walk(dir)
        .into_iter()
        .filter(|p| {
            std::fs::symlink_metadata(dir.join(p))
                .unwrap()
                .file_type()
                .is_file()
        })
        .map(|p| {
            let data = std::fs::read(dir.join(&p)).unwrap();
            (p, data)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_keeps_reading_after_handoff_while_the_snapshotter_is_killed_and_restarted() {
    require_root!();
    let (tmp, registry, img) = registry_with_lazy_rich();
    let t = tmp.path();
    let mut daemon = SnapshotterDaemon::start(
        t,
        // A capacity of one byte: every detached layer's cache goes,
        // attached ones must stay regardless.
        &(plain_http_config(&registry)
            + "[prefetch]\non_task_start = true\n\
               [cache]\ncapacity_bytes = 1\nevict_interval_secs = 1\n"),
    );
    let mut c = daemon.client().await;
    let parent = attach_layers(&mut c, &img.image, &img, || daemon.log()).await;
    assert!(daemon.layer_states().iter().all(|s| s == "lazy"));

    let rootfs = t.join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    let mounts = prepare(&mut c, "container-1", &parent, HashMap::new())
        .await
        .unwrap();
    let container = Mounted::new(&mounts, &rootfs);
    let reply = daemon.task_start("c1", &mounts);
    assert_eq!(reply["layers"].as_array().unwrap().len(), 3, "{reply}");

    // Bounded wait for the prefetch and handoff of all three layers.
    daemon.wait_all_local(Duration::from_secs(120));
    // The kernel agrees: every loop device under the root reads a cache file.
    let (_, loops) = leftovers(&daemon.root);
    assert_eq!(loops.len(), 3, "{loops:?}");
    assert!(loops.iter().all(|(_, b)| b.ends_with("image")), "{loops:?}");
    let before = contents(&rootfs);
    assert!(before
        .iter()
        .any(|(p, d)| p.ends_with("data/big") && d.len() == 6 << 20));
    let metrics = daemon.metrics();
    let handoffs: f64 = metric(&metrics, "lazybd_handoffs_total");
    assert_eq!(handoffs, 3.0, "{metrics}");

    // The snapshotter dies; the container's reads do not need it any more.
    daemon.kill();
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert!(contents(&rootfs) == before, "reads changed after SIGKILL");
    std::fs::write(rootfs.join("written"), "upper still works\n").unwrap();

    // Restarted: complete layers come back on their cache files at once.
    daemon.restart();
    assert!(
        daemon.layer_states().iter().all(|s| s == "local"),
        "{:?}",
        daemon.layer_states()
    );
    let listed = ok(&lazybd(&[&"layers", &"--control", &daemon.control]));
    assert_eq!(listed.matches(" local ").count(), 3, "{listed}");
    let metrics = daemon.metrics();
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.starts_with("lazybd_layer_state{") && l.contains("state=\"local\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>(),
        3.0,
        "{metrics}"
    );
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let after: Vec<_> = contents(&rootfs)
        .into_iter()
        .filter(|(p, _)| p != Path::new("written"))
        .collect();
    assert!(after == before, "reads changed after the restart");

    // A new container on the restarted snapshotter reads the same files.
    let mut c = daemon.client().await;
    let rootfs2 = t.join("rootfs2");
    std::fs::create_dir(&rootfs2).unwrap();
    let mounts2 = prepare(&mut c, "container-2", &parent, HashMap::new())
        .await
        .unwrap();
    let second = Mounted::new(&mounts2, &rootfs2);
    assert!(contents(&rootfs2) == before);
    drop(second);
    drop(container);
    remove(&mut c, "container-2").await.unwrap();
    remove(&mut c, "container-1").await.unwrap();
    // Eviction: removing the top layer detaches it and its cache goes; the
    // layers below are still attached and keep theirs, over capacity or not.
    // Caches are named by the layers' anchors.
    let cache = |a: &str| daemon.root.join("lazy/layers").join(a.replace(':', "-"));
    assert!(img.anchors.iter().all(|a| cache(a).join("image").exists()));
    let chains = img.chain_ids();
    let top = img.layers.len() - 1;
    remove(&mut c, &chains[top]).await.unwrap();
    assert!(!cache(&img.anchors[top]).exists());
    // Past a periodic eviction round, the attached ones are still there.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for a in &img.anchors[..top] {
        assert!(
            cache(a).join("image").exists(),
            "{a} evicted while attached"
        );
    }
    for chain in chains[..top].iter().rev() {
        remove(&mut c, chain).await.unwrap();
    }
    assert!(img.anchors.iter().all(|a| !cache(a).exists()));
    daemon.stop();
    // The first container's loop devices (from before the kill) clear once
    // its overlay is gone; the kernel may take a moment.
    wait_nothing_left(&daemon.root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_on_lazy_layers_reads_again_once_a_killed_snapshotter_is_back() {
    require_root!();
    let (tmp, registry, img) = registry_with_lazy_rich();
    let t = tmp.path();
    // No prefetch: the layers stay lazy, on FUSE, across the crash.
    let mut daemon = SnapshotterDaemon::start(
        t,
        &(plain_http_config(&registry) + "[prefetch]\non_task_start = false\n"),
    );
    let mut c = daemon.client().await;
    let top = attach_layers(&mut c, &img.image, &img, || daemon.log()).await;
    let rootfs = t.join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    let mounts = prepare(&mut c, "container-1", &top, HashMap::new())
        .await
        .unwrap();
    let container = Mounted::new(&mounts, &rootfs);
    // The container reads a little before the crash; most chunks are missing.
    assert!(!std::fs::read(rootfs.join("etc/hostname"))
        .unwrap()
        .is_empty());
    assert!(daemon.layer_states().iter().all(|s| s == "lazy"));

    daemon.kill();
    daemon.restart();
    assert!(
        daemon.log().contains("of a previous run reads"),
        "old loop devices not switched:\n{}",
        daemon.log()
    );
    // The running container's old mounts read through the new daemon: every
    // file, fetched now, the same as a new container on the new daemon sees.
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let seen = contents(&rootfs);
    let mut c = daemon.client().await;
    let rootfs2 = t.join("rootfs2");
    std::fs::create_dir(&rootfs2).unwrap();
    let mounts2 = prepare(&mut c, "container-2", &top, HashMap::new())
        .await
        .unwrap();
    let second = Mounted::new(&mounts2, &rootfs2);
    let fresh = contents(&rootfs2);
    assert!(fresh
        .iter()
        .any(|(p, d)| p.ends_with("data/big") && d.len() == 6 << 20));
    assert!(seen == fresh, "the old container reads other data");

    drop(second);
    drop(container);
    remove(&mut c, "container-2").await.unwrap();
    remove(&mut c, "container-1").await.unwrap();
    for chain in img.chain_ids().iter().rev() {
        remove(&mut c, chain).await.unwrap();
    }
    daemon.stop();
    wait_nothing_left(&daemon.root);
}
