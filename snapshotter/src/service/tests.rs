//! The service over the in-memory seams of the remote path (no root, no
//! FUSE, no registry): what Prepare, Remove and opening do with lazy layers.

use std::collections::HashMap;
use std::path::Path;

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::{Kind as InfoKind, Snapshotter};

use super::LazySnapshotter;
use crate::error::SnapshotError;
use crate::remote::fake::{self, digest, FakeLayers, FakeManifests, IMAGE};
use crate::remote::Remote;
use crate::store::RemoteLayer;

async fn open(
    dir: &Path,
    manifests: &FakeManifests,
    layers: FakeLayers,
) -> LazySnapshotter<FakeLayers> {
    let remote =
        Remote::new(layers, fake::registry_config(dir)).with_manifest_source(manifests.clone());
    LazySnapshotter::open(&dir.join("root"), remote)
        .await
        .unwrap()
}

/// Manifest `m` with lazybd layers L1 (1 MiB image) and L2 (2 MiB), and a
/// gzip layer L3.
fn image(manifests: &FakeManifests) -> (String, [String; 3]) {
    let (m, layers) = (digest(0xa0), [digest(1), digest(2), digest(3)]);
    manifests.insert(
        &m,
        fake::manifest(&[
            fake::lazy_layer(&layers[0], 1 << 20),
            fake::lazy_layer(&layers[1], 2 << 20),
            fake::gzip_layer(&layers[2]),
        ]),
    );
    (m, layers)
}

/// Prepare as containerd's unpacker does: the answer for a lazy layer is
/// AlreadyExists of the target.
async fn prepare_layer(
    s: &LazySnapshotter<FakeLayers>,
    manifest: &str,
    layer: &str,
    parent: &str,
    target: &str,
) -> Result<Vec<Mount>, SnapshotError> {
    s.prepare(
        format!("extract-{target}"),
        parent.into(),
        fake::layer_labels(manifest, layer, target),
    )
    .await
}

fn already_exists(r: Result<Vec<Mount>, SnapshotError>) -> String {
    match r {
        Err(SnapshotError::AlreadyExists(name)) => name,
        other => panic!("want AlreadyExists, got {other:?}"),
    }
}

#[tokio::test]
async fn a_lazy_layer_is_committed_as_the_target_with_a_remote_record() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = FakeManifests::default();
    let (m, [l1, l2, _]) = image(&manifests);
    let s = open(dir.path(), &manifests, FakeLayers::default()).await;

    let r = prepare_layer(&s, &m, &l1, "", "chain-1").await;
    assert_eq!(already_exists(r), "chain-1");
    let info = s.stat("chain-1".into()).await.unwrap();
    assert_eq!(info.kind, InfoKind::Committed);
    assert_eq!(info.parent, "");
    assert_eq!(info.labels, fake::layer_labels(&m, &l1, "chain-1"));
    assert_eq!(
        s.store.require("chain-1").unwrap().remote,
        Some(RemoteLayer {
            image_ref: IMAGE.into(),
            digest: l1.clone(),
            blob_size: 8192,
            index_offset: 4096,
            index_length: 112,
            image_size: 1 << 20,
            diff_id: Some(fake::digest(0xdd)),
        })
    );
    assert_eq!(s.usage("chain-1".into()).await.unwrap().size, 1 << 20);
    // The extraction snapshot containerd asked for is not made.
    assert!(matches!(
        s.stat("extract-chain-1".into()).await,
        Err(SnapshotError::NotFound(_))
    ));

    let r = prepare_layer(&s, &m, &l2, "chain-1", "chain-2").await;
    assert_eq!(already_exists(r), "chain-2");
    assert_eq!(s.stat("chain-2".into()).await.unwrap().parent, "chain-1");
    assert_eq!(s.remote().manager().attached(), [l1.as_str(), l2.as_str()]);
    assert_eq!(manifests.fetches(), 1);

    // A container on them: overlay on the layers' EROFS mounts, top first.
    let mounts = s
        .prepare("ctr".into(), "chain-2".into(), HashMap::new())
        .await
        .unwrap();
    let lowerdir = format!(
        "lowerdir={}:{}",
        FakeLayers::mountpoint_of(&l2).display(),
        FakeLayers::mountpoint_of(&l1).display()
    );
    assert!(mounts[0].options.contains(&lowerdir), "{mounts:?}");

    // The same layer again (another pull of the image): nothing is asked.
    let r = prepare_layer(&s, &m, &l1, "", "chain-1").await;
    assert_eq!(already_exists(r), "chain-1");
    assert_eq!(s.remote().manager().attaches().len(), 2);
    assert_eq!(manifests.fetches(), 1);
}

#[tokio::test]
async fn an_ordinary_layer_or_a_failed_attach_falls_back_to_unpacking() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = FakeManifests::default();
    let (m, [l1, _, l3]) = image(&manifests);
    let s = open(dir.path(), &manifests, FakeLayers::default()).await;
    let mounts = prepare_layer(&s, &m, &l3, "", "chain-3").await.unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    assert_eq!(
        s.stat("extract-chain-3".into()).await.unwrap().kind,
        InfoKind::Active
    );
    assert!(matches!(
        s.stat("chain-3".into()).await,
        Err(SnapshotError::NotFound(_))
    ));
    assert!(s.remote().manager().attaches().is_empty());
    drop(s);

    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), &manifests, FakeLayers::failing()).await;
    let mounts = prepare_layer(&s, &m, &l1, "", "chain-1").await.unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    assert_eq!(s.remote().manager().attaches().len(), 1);
    assert!(matches!(
        s.stat("chain-1".into()).await,
        Err(SnapshotError::NotFound(_))
    ));
    assert!(s.store.require("extract-chain-1").unwrap().remote.is_none());
}

#[tokio::test]
async fn a_bad_parent_or_key_is_refused_before_any_manifest_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = FakeManifests::default();
    let (m, [l1, _, _]) = image(&manifests);
    let s = open(dir.path(), &manifests, FakeLayers::default()).await;

    let r = prepare_layer(&s, &m, &l1, "missing", "chain-1").await;
    assert!(
        matches!(r, Err(SnapshotError::NotFound(ref p)) if p == "missing"),
        "{r:?}"
    );
    assert_eq!(manifests.fetches(), 0, "a missing parent costs no fetch");
    s.view("view".into(), String::new(), HashMap::new())
        .await
        .unwrap();
    let r = prepare_layer(&s, &m, &l1, "view", "chain-1").await;
    assert!(matches!(r, Err(SnapshotError::InvalidArgument(_))), "{r:?}");
    assert_eq!(manifests.fetches(), 0, "an active parent costs no fetch");
    let r = s
        .prepare(
            "view".into(),
            String::new(),
            fake::layer_labels(&m, &l1, "chain-1"),
        )
        .await;
    assert!(
        matches!(r, Err(SnapshotError::AlreadyExists(ref k)) if k == "view"),
        "{r:?}"
    );
    assert_eq!(manifests.fetches(), 0, "a key in use costs no fetch");
    assert!(s.remote().manager().attaches().is_empty());
    assert!(matches!(
        s.stat("chain-1".into()).await,
        Err(SnapshotError::NotFound(_))
    ));
}

#[tokio::test]
async fn removing_the_last_snapshot_of_a_layer_detaches_it() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = FakeManifests::default();
    let (m, [l1, _, _]) = image(&manifests);
    let s = open(dir.path(), &manifests, FakeLayers::default()).await;
    // One layer twice in a chain (as an image with a repeated layer has).
    already_exists(prepare_layer(&s, &m, &l1, "", "chain-a").await);
    already_exists(prepare_layer(&s, &m, &l1, "chain-a", "chain-b").await);

    assert!(matches!(
        s.remove("chain-a".into()).await,
        Err(SnapshotError::FailedPrecondition(_))
    ));
    s.remove("chain-b".into()).await.unwrap();
    assert!(s.remote().manager().detaches().is_empty());
    assert_eq!(s.remote().manager().attached(), [l1.as_str()]);
    s.remove("chain-a".into()).await.unwrap();
    assert_eq!(s.remote().manager().detaches(), [l1.as_str()]);
    assert!(s.remote().manager().attached().is_empty());
    // Lazy snapshots have no directory.
    let dirs = std::fs::read_dir(dir.path().join("root/snapshots")).unwrap();
    assert_eq!(dirs.count(), 0);
}

#[tokio::test]
async fn opening_attaches_the_committed_lazy_layers_again() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = FakeManifests::default();
    let (m, [l1, l2, _]) = image(&manifests);
    {
        let s = open(dir.path(), &manifests, FakeLayers::default()).await;
        already_exists(prepare_layer(&s, &m, &l1, "", "chain-a").await);
        already_exists(prepare_layer(&s, &m, &l1, "chain-a", "chain-b").await);
        already_exists(prepare_layer(&s, &m, &l2, "chain-b", "chain-c").await);
    }

    // From the records alone: no manifest is fetched again, each layer is
    // attached once, with what the record says.
    let manifests = FakeManifests::default();
    let s = open(dir.path(), &manifests, FakeLayers::default()).await;
    let attaches = s.remote().manager().attaches();
    let digests: Vec<&str> = attaches.iter().map(|a| a.digest.as_str()).collect();
    assert_eq!(digests, [l1.as_str(), l2.as_str()]);
    assert_eq!(attaches[1].index_location, Some((4096, 112)));
    assert_eq!(manifests.fetches(), 0);
    s.prepare("ctr".into(), "chain-c".into(), HashMap::new())
        .await
        .unwrap();
    drop(s);

    // An attach that fails does not stop the daemon; mounts on that layer
    // are Unavailable until it is attached.
    let s = open(dir.path(), &manifests, FakeLayers::failing()).await;
    assert_eq!(s.remote().manager().attaches().len(), 2);
    assert!(matches!(
        s.mounts("ctr".into()).await,
        Err(SnapshotError::Unavailable(_))
    ));
}
