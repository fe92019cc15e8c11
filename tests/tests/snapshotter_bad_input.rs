//! lazybd-snapshotter given bad input, through containerd's Snapshots gRPC
//! API against a real daemon: every case is a clear gRPC error (or the
//! documented fallback to the normal path) and leaves nothing half made: no
//! snapshot record, no snapshot directory, no mount, no loop device, no FUSE
//! file and no cache directory of a layer that was not attached.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, Info, MountsRequest, PrepareSnapshotRequest, StatSnapshotRequest,
    UpdateSnapshotRequest, UsageRequest, ViewSnapshotRequest,
};
use containerd_client::tonic::{Code, Status};
use containerd_client::types::Mount;
use lazybd_tests::daemon::Daemon;
use lazybd_tests::images::registry_with_lazy_rich;
use lazybd_tests::snapshots_api::{cri_labels, list, remove, Client};
use lazybd_tests::snapshotter::{metric, plain_http_config, SnapshotterDaemon};
use lazybd_tests::{bin_path, require_root};

/// containerd.snapshots.v1.Kind
const ACTIVE: i32 = 2;

/// Generous: a Prepare that falls back must not hang, and the daemon's own
/// deadlines (connect timeout, `read_deadline_secs`) are far below this.
const CALL_BOUND: Duration = Duration::from_secs(120);

async fn prepare(
    c: &mut Client,
    key: &str,
    parent: &str,
    labels: HashMap<String, String>,
) -> Result<Vec<Mount>, Status> {
    let call = c.prepare(PrepareSnapshotRequest {
        snapshotter: "lazybd".into(),
        key: key.into(),
        parent: parent.into(),
        labels,
    });
    match tokio::time::timeout(CALL_BOUND, call).await {
        Ok(answer) => answer.map(|r| r.into_inner().mounts),
        Err(_) => panic!("Prepare {key:?} did not answer in {CALL_BOUND:?}"),
    }
}

async fn stat(c: &mut Client, key: &str) -> Result<Info, Status> {
    c.stat(StatSnapshotRequest {
        snapshotter: "lazybd".into(),
        key: key.into(),
    })
    .await
    .map(|r| r.into_inner().info.unwrap())
}

/// Every snapshot's name, sorted.
async fn list_all(c: &mut Client) -> Vec<String> {
    let mut names = list(c, &[]).await;
    names.sort();
    names
}

fn assert_not_found(r: Result<impl std::fmt::Debug, Status>, key: &str, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), Code::NotFound, "{what}: {e:?}");
    assert!(
        e.message().contains(&format!("{key:?}")),
        "{what}: the error names {key:?}: {e:?}"
    );
}

/// The snapshot directories under the daemon's root.
fn snapshot_dirs(root: &Path) -> usize {
    std::fs::read_dir(root.join("snapshots")).unwrap().count()
}

/// What the layer manager keeps per layer (`lazy/{layers,fuse,mnt}/NAME`,
/// named by its anchor): the paths of the layer with `anchor` that exist.
fn layer_paths(root: &Path, anchor: &str) -> Vec<std::path::PathBuf> {
    let name = anchor.replace(':', "-");
    ["layers", "fuse", "mnt"]
        .iter()
        .map(|d| root.join("lazy").join(d).join(&name))
        .filter(|p| p.exists())
        .collect()
}

/// Only the layer manager's own FUSE mount; no EROFS mount, no loop device.
fn assert_nothing_lazy_attached(daemon: &SnapshotterDaemon) {
    daemon.assert_only_fuse_left();
    let layers = daemon.control(&serde_json::json!({"op": "layers"}));
    assert_eq!(layers["layers"], serde_json::json!([]), "{layers}");
    assert_eq!(metric(&daemon.metrics(), "lazybd_attached_layers"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_and_missing_parents_are_not_found_and_leave_nothing() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let daemon = SnapshotterDaemon::start(tmp.path(), "");
    let mut c = daemon.client().await;

    assert_not_found(stat(&mut c, "nope").await, "nope", "Stat");
    let mounts = c
        .mounts(MountsRequest {
            snapshotter: "lazybd".into(),
            key: "nope".into(),
        })
        .await;
    assert_not_found(mounts, "nope", "Mounts");
    let usage = c
        .usage(UsageRequest {
            snapshotter: "lazybd".into(),
            key: "nope".into(),
        })
        .await;
    assert_not_found(usage, "nope", "Usage");
    let commit = c
        .commit(CommitSnapshotRequest {
            snapshotter: "lazybd".into(),
            name: "committed".into(),
            key: "nope".into(),
            labels: HashMap::new(),
        })
        .await;
    assert_not_found(commit, "nope", "Commit");
    assert_not_found(remove(&mut c, "nope").await, "nope", "Remove");
    let update = c
        .update(UpdateSnapshotRequest {
            snapshotter: "lazybd".into(),
            info: Some(Info {
                name: "nope".into(),
                labels: HashMap::from([("a".to_string(), "b".to_string())]),
                ..Info::default()
            }),
            update_mask: None,
        })
        .await;
    assert_not_found(update, "nope", "Update");

    // A missing parent: NotFound, as containerd's overlayfs snapshotter
    // (storage.CreateSnapshot: "missing parent ...: not found").
    assert_not_found(
        prepare(&mut c, "child", "no-parent", HashMap::new()).await,
        "no-parent",
        "Prepare on a missing parent",
    );
    let view = c
        .view(ViewSnapshotRequest {
            snapshotter: "lazybd".into(),
            key: "view".into(),
            parent: "no-parent".into(),
            labels: HashMap::new(),
        })
        .await;
    assert_not_found(view, "no-parent", "View on a missing parent");

    // A parent that is not committed: InvalidArgument, as overlayfs.
    prepare(&mut c, "active", "", HashMap::new()).await.unwrap();
    let e = prepare(&mut c, "child", "active", HashMap::new())
        .await
        .expect_err("an active parent");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("\"active\""), "{e:?}");

    // Committing under a name that exists fails and keeps the active one.
    prepare(&mut c, "other", "", HashMap::new()).await.unwrap();
    let commit = c
        .commit(CommitSnapshotRequest {
            snapshotter: "lazybd".into(),
            name: "other".into(),
            key: "active".into(),
            labels: HashMap::new(),
        })
        .await
        .expect_err("the name exists");
    assert_eq!(commit.code(), Code::AlreadyExists, "{commit:?}");
    assert_eq!(stat(&mut c, "active").await.unwrap().kind, ACTIVE);

    // Only what was made on purpose exists.
    assert_eq!(list_all(&mut c).await, ["active", "other"]);
    assert_eq!(snapshot_dirs(&daemon.root), 2);
    remove(&mut c, "active").await.unwrap();
    remove(&mut c, "other").await.unwrap();
    assert_eq!(list_all(&mut c).await, Vec::<String>::new());
    assert_eq!(snapshot_dirs(&daemon.root), 0);
    daemon.assert_only_fuse_left();
}

fn flip(path: &Path, range: std::ops::Range<usize>) {
    let mut bytes = std::fs::read(path).unwrap();
    for b in &mut bytes[range] {
        *b ^= 0x5a;
    }
    std::fs::write(path, &bytes).unwrap();
}

/// The lazybd blob footer (docs/format.md): the last 64 bytes.
const FOOTER_LEN: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_lazybd_index_falls_back_to_the_normal_path() {
    require_root!();
    let (tmp, registry, img) = registry_with_lazy_rich();
    let t = tmp.path();

    // Layer 0: bytes of its index (just before the footer) flipped; layer 1:
    // its footer flipped. Both behind the registry's back.
    let blob = registry.blob_file(&img.layers[0]);
    let len = std::fs::metadata(&blob).unwrap().len() as usize;
    flip(&blob, len - FOOTER_LEN - 16..len - FOOTER_LEN);
    let blob = registry.blob_file(&img.layers[1]);
    let len = std::fs::metadata(&blob).unwrap().len() as usize;
    flip(&blob, len - FOOTER_LEN..len);

    let daemon = SnapshotterDaemon::start(t, &plain_http_config(&registry));
    let mut c = daemon.client().await;
    // Each as a bottom layer: its snapshot name is its anchor.
    for (i, layer) in img.layers[..2].iter().enumerate() {
        let target = img.anchors[i].clone();
        let labels = cri_labels(&img.image, &img.manifest, layer, &target);
        // The fallback: an ordinary active snapshot containerd unpacks into.
        let mounts = prepare(&mut c, &format!("extract-{i}"), "", labels)
            .await
            .unwrap_or_else(|e| panic!("layer {i}: {e:?}\n{}", daemon.log()));
        assert_eq!(mounts[0].r#type, "bind", "{mounts:?}");
        assert_eq!(
            stat(&mut c, &target).await.unwrap_err().code(),
            Code::NotFound
        );
        assert!(
            layer_paths(&daemon.root, &img.anchors[i]).is_empty(),
            "layer {i}: {:?}",
            layer_paths(&daemon.root, &img.anchors[i])
        );
    }
    let log = daemon.log();
    for (i, why) in [(0, "index digest mismatch"), (1, "rejected")] {
        let target = &img.anchors[i];
        assert!(
            log.lines().any(|l| l.contains(&format!(
                "{target}: not attached lazily, unpacking normally"
            )) && l.contains(why)),
            "layer {i}: the log says why ({why}):\n{log}"
        );
    }
    assert_nothing_lazy_attached(&daemon);
    assert_eq!(list_all(&mut c).await, ["extract-0", "extract-1"]);
    remove(&mut c, "extract-0").await.unwrap();
    remove(&mut c, "extract-1").await.unwrap();
    assert_eq!(snapshot_dirs(&daemon.root), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_down_during_a_pull_fails_within_the_deadline_and_says_why() {
    require_root!();
    let (tmp, mut registry, img) = registry_with_lazy_rich();
    let t = tmp.path();
    let daemon = SnapshotterDaemon::start(
        t,
        &format!("read_deadline_secs = 3\n{}", plain_http_config(&registry)),
    );
    let mut c = daemon.client().await;

    // Layer 0 attaches while the registry is up; the manifest is cached
    // and the other layers' indexes are fetched ahead, onto the disk.
    let chains = img.chain_ids();
    let e = prepare(
        &mut c,
        "extract-0",
        "",
        cri_labels(&img.image, &img.manifest, &img.layers[0], &chains[0]),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}\n{}", daemon.log());
    daemon.control(&serde_json::json!({"op": "layers"}));
    let index_ahead = daemon
        .root
        .join("lazy/layers")
        .join(img.anchors[1].replace(':', "-"))
        .join("index");
    assert!(index_ahead.exists(), "{}", daemon.log());

    registry.stop();
    // Layer 1: its index, fetched ahead, is verified and it is committed;
    // what it needs next (the superblock) cannot be fetched, so the
    // container on it gets Unavailable, with the reason, at the deadline.
    let e = prepare(
        &mut c,
        "extract-1",
        &chains[0],
        cri_labels(&img.image, &img.manifest, &img.layers[1], &chains[1]),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}\n{}", daemon.log());
    let e = prepare(&mut c, "ctr", &chains[1], HashMap::new())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}\n{}", daemon.log());
    assert!(
        e.message().contains(&img.layers[1]) && e.message().contains("not attached"),
        "{e:?}"
    );
    assert!(layer_paths(&daemon.root, &img.anchors[1])
        .iter()
        .all(|p| !p.starts_with(daemon.root.join("lazy/mnt"))));
    // A manifest not cached: its fetch fails on the refused connection, and
    // the Prepare falls back to unpacking.
    let other = format!("sha256:{}", "0".repeat(64));
    let mounts = prepare(
        &mut c,
        "extract-other",
        "",
        cri_labels(&img.image, &other, &img.layers[2], "chain-other"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", daemon.log()));
    assert_eq!(mounts[0].r#type, "bind", "{mounts:?}");
    let log = daemon.log();
    assert!(
        log.lines().any(
            |l| l.contains("chain-other: not attached lazily, unpacking normally")
                && l.contains(&registry.host())
        ),
        "the log says why, naming the registry:\n{log}"
    );
    assert_eq!(
        stat(&mut c, "chain-other").await.unwrap_err().code(),
        Code::NotFound
    );
    // Only layer 0 is attached.
    assert_eq!(daemon.layer_fields("digest"), [img.layers[0].as_str()]);
    let mut made = vec![
        chains[1].clone(),
        "extract-other".to_owned(),
        chains[0].clone(),
    ];
    made.sort();
    assert_eq!(list_all(&mut c).await, made);
    for key in [chains[1].as_str(), "extract-other", chains[0].as_str()] {
        remove(&mut c, key).await.unwrap();
    }
    assert_eq!(snapshot_dirs(&daemon.root), 0);
    assert_nothing_lazy_attached(&daemon);
}

/// Runs the daemon on `config_toml` and returns its stderr once it exited;
/// it must refuse to start (fails the test if it serves or lingers).
fn refused(dir: &Path, name: &str, config_toml: &str) -> String {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, config_toml).unwrap();
    let socket = dir.join(format!("{name}.sock"));
    let stderr = dir.join(format!("{name}.log"));
    let mut cmd = Command::new(bin_path("lazybd-snapshotter"));
    cmd.arg("--config")
        .arg(&config)
        .arg("--root")
        .arg(dir.join(format!("{name}-root")))
        .arg("--address")
        .arg(&socket)
        .arg("--control-address")
        .arg(dir.join(format!("{name}-control.sock")))
        .args(["--metrics-address", ""]);
    let mut daemon = Daemon::spawn("lazybd-snapshotter", cmd, &stderr);
    let Some(status) = daemon.wait_exit(Duration::from_secs(30)) else {
        daemon.kill();
        panic!(
            "{name}: the daemon kept running on a bad config:\n{}",
            daemon.log()
        );
    };
    let text = std::fs::read_to_string(&stderr).unwrap();
    assert!(!status.success(), "{name}: exited with {status}:\n{text}");
    assert!(!socket.exists(), "{name}: it must not have served");
    assert!(
        text.contains(&config.display().to_string()),
        "{name}: the error names the file:\n{text}"
    );
    text
}

#[test]
fn a_bad_config_file_stops_the_daemon_with_the_key_named() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let e = refused(t, "top-level", "rot = \"/r\"\n");
    assert!(e.contains("unknown field") && e.contains("rot"), "{e}");
    let e = refused(t, "in-table", "[registry]\nplain = [\"127.0.0.1:5000\"]\n");
    assert!(e.contains("unknown field") && e.contains("plain"), "{e}");
    let e = refused(t, "in-cache", "[cache]\ncapacity = 1\n");
    assert!(e.contains("unknown field") && e.contains("capacity"), "{e}");
    let e = refused(t, "wrong-type", "read_deadline_secs = \"soon\"\n");
    assert!(e.contains("read_deadline_secs"), "{e}");
    let e = refused(t, "malformed", "root = \n");
    assert!(e.contains("line 1"), "{e}");
}
