//! lazybd-snapshotter through containerd's Snapshots gRPC API, as
//! containerd's proxy plugin calls it: overlayfs-snapshotter semantics for
//! ordinary snapshots, persistence across restarts, and the remote path
//! (CRI labels on the Prepare of a lazybd layer -> attached lazily,
//! committed, AlreadyExists) with fallback for ordinary images.

use std::collections::HashMap;
use std::path::Path;

use containerd_client::services::v1::snapshots::{
    CleanupRequest, CommitSnapshotRequest, MountsRequest, StatSnapshotRequest,
    UpdateSnapshotRequest, UsageRequest, ViewSnapshotRequest,
};
use containerd_client::tonic::Code;
use lazybd_blockdev::oci::OciLayout;
use lazybd_tests::cli::{lazybd, ok};
use lazybd_tests::images::{registry_with_lazy_rich, rich_layers, write_image, Compression};
use lazybd_tests::registry::Registry;
use lazybd_tests::require_root;
use lazybd_tests::snapshots_api::{cri_labels, list, prepare, remove, Client};
use lazybd_tests::snapshotter::{metric, plain_http_config, Mounted, SnapshotterDaemon};

async fn commit(c: &mut Client, name: &str, key: &str) {
    c.commit(CommitSnapshotRequest {
        snapshotter: "lazybd".into(),
        name: name.into(),
        key: key.into(),
        labels: HashMap::new(),
    })
    .await
    .unwrap();
}

async fn stat_kind(c: &mut Client, key: &str) -> Result<i32, Code> {
    c.stat(StatSnapshotRequest {
        snapshotter: "lazybd".into(),
        key: key.into(),
    })
    .await
    .map(|r| r.into_inner().info.unwrap().kind)
    .map_err(|s| s.code())
}

fn mnt(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(&p).unwrap();
    p
}

const COMMITTED: i32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_snapshots_behave_like_overlayfs_and_survive_a_restart() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let mut daemon = SnapshotterDaemon::start(t, "");
    let mut c = daemon.client().await;

    // Base layer: a bind mount of an empty dir, written, committed.
    let mounts = prepare(&mut c, "base-extract", "", HashMap::new())
        .await
        .unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    {
        let _m = Mounted::new(&mounts, &mnt(t, "m1"));
        std::fs::write(t.join("m1/base.txt"), "base\n").unwrap();
        std::fs::write(t.join("m1/gone.txt"), "deleted above\n").unwrap();
    }
    commit(&mut c, "base", "base-extract").await;
    assert_eq!(stat_kind(&mut c, "base").await, Ok(COMMITTED));
    assert_eq!(stat_kind(&mut c, "base-extract").await, Err(Code::NotFound));
    let usage = c
        .usage(UsageRequest {
            snapshotter: "lazybd".into(),
            key: "base".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(usage.size > 0 && usage.inodes == 3, "{usage:?}");

    // A child on top: overlayfs, sees the base, its changes stay its own.
    let mounts = prepare(&mut c, "top-extract", "base", HashMap::new())
        .await
        .unwrap();
    assert_eq!(mounts[0].r#type, "overlay");
    {
        let _m = Mounted::new(&mounts, &mnt(t, "m2"));
        assert_eq!(
            std::fs::read_to_string(t.join("m2/base.txt")).unwrap(),
            "base\n"
        );
        std::fs::remove_file(t.join("m2/gone.txt")).unwrap();
        std::fs::write(t.join("m2/top.txt"), "top\n").unwrap();
    }
    commit(&mut c, "top", "top-extract").await;

    // Errors containerd relies on.
    assert_eq!(
        prepare(&mut c, "top", "", HashMap::new())
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    assert_eq!(
        prepare(&mut c, "x", "missing", HashMap::new())
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        remove(&mut c, "base").await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    // Restart: everything is still there.
    daemon.restart();
    let mut c = daemon.client().await;
    assert_eq!(stat_kind(&mut c, "top").await, Ok(COMMITTED));

    // A read-only view of the chain.
    let view = c
        .view(ViewSnapshotRequest {
            snapshotter: "lazybd".into(),
            key: "v".into(),
            parent: "top".into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    {
        let _m = Mounted::new(&view, &mnt(t, "m3"));
        assert_eq!(
            std::fs::read_to_string(t.join("m3/top.txt")).unwrap(),
            "top\n"
        );
        assert!(!t.join("m3/gone.txt").exists(), "the whiteout hides it");
        assert!(
            std::fs::write(t.join("m3/new"), "x").is_err(),
            "views are read-only"
        );
    }
    let mounts_again = c
        .mounts(MountsRequest {
            snapshotter: "lazybd".into(),
            key: "v".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(mounts_again, view);

    // Labels: update one, list by it.
    let mut info = c
        .stat(StatSnapshotRequest {
            snapshotter: "lazybd".into(),
            key: "top".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    info.labels
        .insert("containerd.io/gc.root".into(), "yes".into());
    c.update(UpdateSnapshotRequest {
        snapshotter: "lazybd".into(),
        info: Some(info),
        update_mask: Some(prost_types_mask(&["labels.containerd.io/gc.root"])),
    })
    .await
    .unwrap();
    let listed: Vec<String> = list(&mut c, &[r#"labels."containerd.io/gc.root"==yes"#]).await;
    assert_eq!(listed, ["top"]);
    let mut all = list(&mut c, &[]).await;
    all.sort();
    assert_eq!(all, ["base", "top", "v"]);

    for key in ["v", "top", "base"] {
        remove(&mut c, key).await.unwrap();
    }
    c.cleanup(CleanupRequest {
        snapshotter: "lazybd".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        std::fs::read_dir(daemon.root.join("snapshots"))
            .unwrap()
            .count(),
        0
    );
}

fn prost_types_mask(paths: &[&str]) -> prost_types::FieldMask {
    prost_types::FieldMask {
        paths: paths.iter().map(|s| s.to_string()).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazybd_layers_are_attached_lazily_and_come_back_after_a_restart() {
    require_root!();
    let (tmp, registry, img) = registry_with_lazy_rich();
    let t = tmp.path();

    let mut daemon = SnapshotterDaemon::start(t, &plain_http_config(&registry));
    let mut c = daemon.client().await;
    let mut parent = String::new();
    let chains = img.chain_ids();
    for (i, (layer, target)) in img.layers.iter().zip(chains.clone()).enumerate() {
        let labels = cri_labels(&img.image, &img.manifest, layer, &target);
        let err = prepare(&mut c, &format!("extract-{i}"), &parent, labels)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}\n{}", daemon.log());
        assert_eq!(stat_kind(&mut c, &target).await, Ok(COMMITTED));
        parent = target;
    }

    let check_container = |c: &mut Client, name: &'static str| {
        let mut c = c.clone();
        let parent = parent.clone();
        let dir = mnt(t, name);
        async move {
            let mounts = prepare(&mut c, name, &parent, HashMap::new())
                .await
                .unwrap();
            let m = Mounted::new(&mounts, &dir);
            assert_eq!(
                std::fs::read_to_string(dir.join("etc/hostname")).unwrap(),
                "lazybd-2\n"
            );
            assert_eq!(std::fs::read(dir.join("data/big")).unwrap().len(), 6 << 20);
            assert!(!dir.join("etc/removed").exists());
            std::fs::write(dir.join("written"), "upper\n").unwrap();
            drop(m);
            remove(&mut c, name).await.unwrap();
        }
    };
    check_container(&mut c, "container-1").await;

    // Metrics: what was fetched, from where, and what is attached.
    let metrics = daemon.metrics();
    let value = |name: &str| metric(&metrics, name);
    assert!(value(r#"lazybd_source_bytes_total{source="registry"}"#) > 0.0);
    assert_eq!(value("lazybd_attached_layers"), 3.0);
    assert!(value("lazybd_read_latency_seconds_count") > 0.0);
    assert_eq!(value("lazybd_oldest_waiting_read_seconds"), 0.0);

    // Control API: a task start on the image maps to its three layers.
    let mounts = prepare(&mut c, "container-3", &parent, HashMap::new())
        .await
        .unwrap();
    let reply = daemon.task_start("c3", &mounts);
    assert_eq!(reply["layers"].as_array().unwrap().len(), 3, "{reply}");
    let listed = ok(&lazybd(&[
        &"layers",
        &"--control",
        &daemon.control,
        &"--json",
    ]));
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let layers = listed["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    assert!(
        layers
            .iter()
            .all(|l| l["containers"] == serde_json::json!(["default/c3"])),
        "{listed}"
    );
    daemon.control(&serde_json::json!({"event": "task-exit", "namespace": "default", "container_id": "c3", "pid": 1, "exit_status": 0}));
    let listed = daemon.control(&serde_json::json!({"op": "layers"}));
    assert!(listed["layers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["containers"] == serde_json::json!([])));
    assert!(daemon.control(&serde_json::json!({"op": "nonsense"}))["error"].is_string());
    remove(&mut c, "container-3").await.unwrap();

    // Restart: the committed lazy layers are attached again before serving.
    daemon.restart();
    let mut c = daemon.client().await;
    check_container(&mut c, "container-2").await;

    // Remove the chain: every lazy layer is detached, nothing stays mounted.
    for chain in chains.iter().rev() {
        remove(&mut c, chain).await.unwrap();
    }
    daemon.assert_only_fuse_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_images_with_cri_labels_fall_back_to_the_normal_path() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let registry = Registry::start();
    let layout = t.join("src");
    let manifest = write_image(&layout, "v1", &rich_layers()[..1], &[Compression::Gzip]);
    registry.push_layout(&layout, "v1", "plain:v1");
    let mut daemon = SnapshotterDaemon::start(t, &plain_http_config(&registry));
    let mut c = daemon.client().await;
    let blob = OciLayout::open(&layout)
        .unwrap()
        .read_blob(&manifest)
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&blob).unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap();
    let labels = cri_labels(&registry.reference("plain:v1"), &manifest, layer, "chain-0");
    let mounts = prepare(&mut c, "extract-0", "", labels).await.unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    let log = daemon.log();
    assert!(
        log.contains("unpacking normally") && log.contains("is not a lazybd layer"),
        "{log}"
    );
    daemon.stop();
}
