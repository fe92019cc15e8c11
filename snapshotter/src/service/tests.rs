//! The service over the in-memory seams of the remote path (no root, no
//! FUSE, no registry): what Prepare, Remove and opening do with lazy layers.

use std::collections::HashMap;
use std::path::Path;

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::{Kind as InfoKind, Snapshotter};

use lazybd_blockdev::oci;

use super::LazySnapshotter;
use crate::error::SnapshotError;
use crate::remote::fake::{
    self, anchor_of, chain, digest, id_of, Failing, FakeLayers, FakeManifests, IMAGE,
};
use crate::remote::{Remote, RemoteError, MAX_LAYERS_AHEAD as MAX_LAYERS};
use crate::store::RemoteLayer;

async fn open(
    dir: &Path,
    manifests: &FakeManifests,
    layers: FakeLayers,
) -> LazySnapshotter<FakeLayers> {
    open_with(dir, manifests, layers, false).await
}

async fn open_with(
    dir: &Path,
    manifests: &FakeManifests,
    layers: FakeLayers,
    allow_unanchored: bool,
) -> LazySnapshotter<FakeLayers> {
    let remote = Remote::new(layers, fake::registry_config(dir))
        .with_manifest_source(manifests.clone())
        .with_unanchored_layers(allow_unanchored);
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
/// AlreadyExists of the target. Returns once the attach it started behind
/// the commit ended.
async fn prepare_layer(
    s: &LazySnapshotter<FakeLayers>,
    manifest: &str,
    layer: &str,
    parent: &str,
    target: &str,
) -> Result<Vec<Mount>, SnapshotError> {
    let prepared = s
        .prepare(
            format!("extract-{target}"),
            parent.into(),
            fake::layer_labels(manifest, layer, target),
        )
        .await;
    s.remote().settle().await;
    prepared
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
    let c = chain(&[&l1, &l2]);
    let s = open(dir.path(), &manifests, FakeLayers::default()).await;

    let r = prepare_layer(&s, &m, &l1, "", &c[0]).await;
    assert_eq!(already_exists(r), c[0]);
    // The image's other lazybd layer gets its index meanwhile (not L3, a
    // gzip layer), for its own Prepare to find on disk.
    assert_eq!(
        s.remote().manager().index_fetches(),
        std::slice::from_ref(&l2)
    );
    let info = s.stat(c[0].clone()).await.unwrap();
    assert_eq!(info.kind, InfoKind::Committed);
    assert_eq!(info.parent, "");
    assert_eq!(info.labels, fake::layer_labels(&m, &l1, &c[0]));
    assert_eq!(
        s.store.require(&c[0]).unwrap().remote,
        Some(RemoteLayer {
            image_ref: IMAGE.into(),
            digest: l1.clone(),
            blob_size: 4272,
            index_offset: 4096,
            index_length: 112,
            image_size: 1 << 20,
            anchor: Some(anchor_of(&l1)),
            source_diff_id: Some(fake::digest(0xdd)),
        })
    );
    assert_eq!(s.usage(c[0].clone()).await.unwrap().size, 1 << 20);
    // The extraction snapshot containerd asked for is not made.
    assert!(matches!(
        s.stat(format!("extract-{}", c[0])).await,
        Err(SnapshotError::NotFound(_))
    ));

    let r = prepare_layer(&s, &m, &l2, &c[0], &c[1]).await;
    assert_eq!(already_exists(r), c[1]);
    assert_eq!(s.stat(c[1].clone()).await.unwrap().parent, c[0]);
    assert_eq!(s.remote().manager().attached(), [l1.as_str(), l2.as_str()]);
    assert_eq!(manifests.fetches(), 1);
    assert_eq!(
        s.remote().manager().index_fetches(),
        std::slice::from_ref(&l2),
        "once"
    );
    // Every attach is bound to the anchor on the layer's descriptor.
    let anchors: Vec<_> = s
        .remote()
        .manager()
        .attaches()
        .into_iter()
        .map(|a| a.anchor)
        .collect();
    assert_eq!(anchors, [Some(anchor_of(&l1)), Some(anchor_of(&l2))]);

    // A container on them: overlay on the layers' EROFS mounts, top first.
    let mounts = s
        .prepare("ctr".into(), c[1].clone(), HashMap::new())
        .await
        .unwrap();
    let lowerdir = format!(
        "lowerdir={}:{}",
        FakeLayers::mountpoint_of(&id_of(&l2)).display(),
        FakeLayers::mountpoint_of(&id_of(&l1)).display()
    );
    assert!(mounts[0].options.contains(&lowerdir), "{mounts:?}");

    // The same layer again (another pull of the image): nothing is asked.
    let r = prepare_layer(&s, &m, &l1, "", &c[0]).await;
    assert_eq!(already_exists(r), c[0]);
    assert_eq!(s.remote().manager().attaches().len(), 2);
    assert_eq!(manifests.fetches(), 1);
}

#[tokio::test]
async fn a_prepare_with_the_layers_labels_needs_no_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = FakeManifests::default();
    let s = open(dir.path(), &manifests, FakeLayers::default()).await;
    let (l1, l2) = (digest(1), digest(2));
    let c = chain(&[&l1, &l2]);
    // Not even the manifest's digest is known to the fake.
    let m = digest(0xa0);
    for (layer, parent, target) in [(&l1, "", &c[0]), (&l2, c[0].as_str(), &c[1])] {
        let r = s
            .prepare(
                format!("extract-{target}"),
                parent.into(),
                fake::lazy_labels(&m, layer, 1 << 20, target),
            )
            .await;
        assert_eq!(already_exists(r), *target);
    }
    s.remote().settle().await;
    // Asked for only to fetch the other layers' indexes ahead, which each
    // Prepare gives up when the manifest cannot be had.
    assert_eq!(manifests.fetches(), 2);
    assert!(s.remote().manager().index_fetches().is_empty());
    let record = s.store.require(&c[1]).unwrap().remote.unwrap();
    assert_eq!(record.anchor, Some(anchor_of(&l2)));
    assert_eq!(record.blob_size, 4096 + 112 + 64);
    assert_eq!(s.remote().manager().attached(), [l1.as_str(), l2.as_str()]);
}

#[tokio::test]
async fn indexes_fetched_ahead_are_bounded_per_image() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = FakeManifests::default();
    // Anyone's manifest may list many layers.
    let m = digest(0xa9);
    let layers: Vec<String> = (1..=MAX_LAYERS as u8 + 4).map(digest).collect();
    let descriptors: Vec<_> = layers
        .iter()
        .map(|l| fake::lazy_layer(l, 1 << 20))
        .collect();
    manifests.insert(&m, fake::manifest(&descriptors));
    let s = open(dir.path(), &manifests, FakeLayers::default()).await;
    let c = chain(&[&layers[0]]);
    already_exists(prepare_layer(&s, &m, &layers[0], "", &c[0]).await);
    assert_eq!(
        s.remote().manager().index_fetches(),
        layers[1..=MAX_LAYERS],
        "the next layers, in order, no more"
    );
}

#[tokio::test]
async fn a_snapshot_name_that_is_not_the_layers_chain_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = FakeManifests::default();
    let (m, [l1, l2, _]) = image(&manifests);
    let s = open(dir.path(), &manifests, FakeLayers::default()).await;
    let c = chain(&[&l1, &l2]);
    already_exists(prepare_layer(&s, &m, &l1, "", &c[0]).await);

    // L2 asked to be committed as another layer's snapshot (the bottom
    // one's name, an arbitrary one, its own name without its parent): a
    // clear error to containerd, not a fallback, and nothing attached.
    for (parent, target) in [
        ("", c[0].clone()),
        (c[0].as_str(), "chain-2".to_owned()),
        ("", c[1].clone()),
        (c[0].as_str(), chain(&[&l2])[0].clone()),
    ] {
        let key = format!("extract-{target}-{parent}");
        let r = s
            .prepare(
                key.clone(),
                parent.into(),
                fake::layer_labels(&m, &l2, &target),
            )
            .await;
        match r {
            // The first: the name exists, containerd's reuse of it is its own.
            Err(SnapshotError::AlreadyExists(name)) if name == c[0] && parent.is_empty() => {}
            Err(SnapshotError::Remote(e @ RemoteError::ChainMismatch { .. })) => {
                let status = containerd_snapshots::tonic::Status::from(SnapshotError::Remote(e));
                assert_eq!(
                    status.code(),
                    containerd_snapshots::tonic::Code::FailedPrecondition
                );
                assert!(status.message().contains("chain ID"), "{status:?}");
            }
            other => panic!("{target} on {parent:?}: {other:?}"),
        }
        assert!(matches!(s.stat(key).await, Err(SnapshotError::NotFound(_))));
    }
    assert_eq!(s.remote().manager().attached(), [l1.as_str()]);
    assert_eq!(s.remote().manager().attaches().len(), 1);
}

#[tokio::test]
async fn unanchored_layers_are_refused_unless_the_operator_allows_them() {
    let manifests = FakeManifests::default();
    let (m, old) = (digest(0xa7), digest(7));
    manifests.insert(&m, fake::manifest(&[fake::v1_layer(&old, 1 << 20)]));
    // Version 1 images used the blob digest as diff_id.
    let target = old.clone();

    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), &manifests, FakeLayers::default()).await;
    let r = prepare_layer(&s, &m, &old, "", &target).await;
    let Err(SnapshotError::Remote(e)) = r else {
        panic!("want a refusal, got {r:?}");
    };
    assert!(matches!(e, RemoteError::Unanchored { .. }), "{e:?}");
    assert!(e.to_string().contains("allow_unanchored_layers"), "{e}");
    assert!(s.remote().manager().attaches().is_empty());
    drop(s);

    let dir = tempfile::tempdir().unwrap();
    let s = open_with(dir.path(), &manifests, FakeLayers::default(), true).await;
    assert_eq!(
        already_exists(prepare_layer(&s, &m, &old, "", &target).await),
        target
    );
    let attach = &s.remote().manager().attaches()[0];
    assert_eq!(
        (attach.digest.as_str(), &attach.anchor),
        (old.as_str(), &None)
    );
    // Even allowed, never under an anchored layer's name.
    let r = prepare_layer(&s, &m, &old, "", &anchor_of(&old)).await;
    assert!(
        matches!(
            r,
            Err(SnapshotError::Remote(RemoteError::ChainMismatch { .. }))
        ),
        "{r:?}"
    );
    drop(s);

    // The operator takes the permission back: neither a restart nor a
    // container's Prepare on it attaches it, and the refusal says why.
    let s = open(dir.path(), &manifests, FakeLayers::default()).await;
    assert!(s.remote().manager().attaches().is_empty());
    let r = s
        .prepare("ctr".into(), target.clone(), HashMap::new())
        .await;
    assert!(
        matches!(
            r,
            Err(SnapshotError::Remote(RemoteError::Unanchored { .. }))
        ),
        "{r:?}"
    );
    assert!(s.remote().manager().attaches().is_empty());
}

#[tokio::test]
async fn one_blob_digest_with_two_anchors_is_two_layers() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = FakeManifests::default();
    let s = open(dir.path(), &manifests, FakeLayers::default()).await;
    let d = digest(1);
    let mut forged = fake::lazy_labels(&digest(0xa0), &d, 1 << 20, "");
    let forged_anchor = digest(0xf0);
    forged.insert(oci::ANN_INDEX_DIGEST.into(), forged_anchor.clone());
    forged.insert(oci::labels::TARGET.into(), forged_anchor.clone());
    let honest_target = chain(&[&d])[0].clone();
    let honest = fake::lazy_labels(&digest(0xa1), &d, 1 << 20, &honest_target);
    already_exists(s.prepare("x-forged".into(), String::new(), forged).await);
    already_exists(s.prepare("x-honest".into(), String::new(), honest).await);
    s.remote().settle().await;
    let ids = s.remote().manager().attached_ids();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(s.remote().manager().attached(), [d.as_str(), d.as_str()]);

    // Each snapshot mounts its own layer; removing one leaves the other.
    let mount_of = |target: &str| {
        let s = &s;
        let target = target.to_owned();
        async move {
            s.view(format!("v-{target}"), target, HashMap::new())
                .await
                .unwrap()[0]
                .source
                .clone()
        }
    };
    assert_ne!(
        mount_of(&forged_anchor).await,
        mount_of(&honest_target).await
    );
    s.remove(format!("v-{forged_anchor}")).await.unwrap();
    s.remove(forged_anchor.clone()).await.unwrap();
    let forged_id = oci::LayerId::anchored(&forged_anchor).unwrap();
    assert_eq!(s.remote().manager().detaches(), [forged_id]);
    assert_eq!(s.remote().manager().attached_ids(), [id_of(&d)]);
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
    let c1 = &chain(&[&l1])[0];
    let mounts = prepare_layer(&s, &m, &l1, "", c1).await.unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    assert_eq!(s.remote().manager().attaches().len(), 1);
    assert!(matches!(
        s.stat(c1.clone()).await,
        Err(SnapshotError::NotFound(_))
    ));
    assert!(s
        .store
        .require(&format!("extract-{c1}"))
        .unwrap()
        .remote
        .is_none());
}

#[tokio::test]
async fn an_attach_failing_after_its_index_shows_at_the_mount_and_is_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = FakeManifests::default();
    let (m, [l1, _, _]) = image(&manifests);
    let layers = FakeLayers::default();
    layers.set_failing(Some(Failing::Expose));
    let s = open(dir.path(), &manifests, layers).await;
    let c1 = &chain(&[&l1])[0];
    // The index verified, so the snapshot is committed; the rest of the
    // attach runs behind the commit and fails there.
    assert_eq!(
        already_exists(prepare_layer(&s, &m, &l1, "", c1).await),
        *c1
    );
    assert_eq!(s.remote().manager().attaches().len(), 1);
    assert!(s.remote().manager().attached().is_empty());

    let r = s.prepare("ctr".into(), c1.clone(), HashMap::new()).await;
    let Err(SnapshotError::Unavailable(e)) = r else {
        panic!("want Unavailable, got {r:?}");
    };
    assert!(e.contains(&l1) && e.contains("injected failure"), "{e}");
    assert_eq!(s.remote().manager().attaches().len(), 2, "tried again");
    assert!(matches!(
        s.stat("ctr".into()).await,
        Err(SnapshotError::NotFound(_))
    ));

    s.remote().manager().set_failing(None);
    let mounts = s
        .prepare("ctr".into(), c1.clone(), HashMap::new())
        .await
        .unwrap();
    assert_eq!(s.remote().manager().attached(), [l1.as_str()]);
    assert!(
        mounts[0].options.iter().any(|o| o.contains("/lazy/")),
        "{mounts:?}"
    );
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
    let c = chain(&[&l1, &l1]);
    already_exists(prepare_layer(&s, &m, &l1, "", &c[0]).await);
    already_exists(prepare_layer(&s, &m, &l1, &c[0], &c[1]).await);

    assert!(matches!(
        s.remove(c[0].clone()).await,
        Err(SnapshotError::FailedPrecondition(_))
    ));
    s.remove(c[1].clone()).await.unwrap();
    assert!(s.remote().manager().detaches().is_empty());
    assert_eq!(s.remote().manager().attached(), [l1.as_str()]);
    s.remove(c[0].clone()).await.unwrap();
    assert_eq!(s.remote().manager().detaches(), [id_of(&l1)]);
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
    let c = chain(&[&l1, &l1, &l2]);
    {
        let s = open(dir.path(), &manifests, FakeLayers::default()).await;
        already_exists(prepare_layer(&s, &m, &l1, "", &c[0]).await);
        already_exists(prepare_layer(&s, &m, &l1, &c[0], &c[1]).await);
        already_exists(prepare_layer(&s, &m, &l2, &c[1], &c[2]).await);
    }

    // From the records alone: no manifest is fetched again, each layer is
    // attached once, with what the record says (its anchor too).
    let manifests = FakeManifests::default();
    let s = open(dir.path(), &manifests, FakeLayers::default()).await;
    let attaches = s.remote().manager().attaches();
    let digests: Vec<&str> = attaches.iter().map(|a| a.digest.as_str()).collect();
    assert_eq!(digests, [l1.as_str(), l2.as_str()]);
    assert_eq!(attaches[1].index_location, Some((4096, 112)));
    assert_eq!(attaches[1].anchor, Some(anchor_of(&l2)));
    assert_eq!(manifests.fetches(), 0);
    s.prepare("ctr".into(), c[2].clone(), HashMap::new())
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

#[tokio::test]
async fn opening_checks_old_records_against_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = FakeManifests::default();
    let (m, [l1, l2, _]) = image(&manifests);
    let c = chain(&[&l1, &l2]);
    {
        let s = open(dir.path(), &manifests, FakeLayers::default()).await;
        already_exists(prepare_layer(&s, &m, &l1, "", &c[0]).await);
        already_exists(prepare_layer(&s, &m, &l2, &c[0], &c[1]).await);
        // As a release before anchors wrote them: no anchor in the record;
        // L1's Prepare labels carried it (containerd passes the
        // annotations), L2's did not.
        let mut r1 = s.store.require(&c[0]).unwrap();
        r1.remote.as_mut().unwrap().anchor = None;
        r1.labels
            .insert(oci::ANN_INDEX_DIGEST.into(), anchor_of(&l1));
        s.store.update(&c[0], &r1).unwrap();
        let mut r2 = s.store.require(&c[1]).unwrap();
        r2.remote.as_mut().unwrap().anchor = None;
        s.store.update(&c[1], &r2).unwrap();
    }
    let s = open(dir.path(), &manifests, FakeLayers::default()).await;
    // L1 is checked against the anchor its labels name; L2 is unanchored
    // now and not attached without the operator's permission, at a
    // container's Prepare neither.
    let attaches = s.remote().manager().attaches();
    assert_eq!(attaches.len(), 1, "{attaches:?}");
    assert_eq!(attaches[0].anchor, Some(anchor_of(&l1)));
    let r = s.prepare("ctr".into(), c[1].clone(), HashMap::new()).await;
    assert!(
        matches!(
            r,
            Err(SnapshotError::Remote(RemoteError::Unanchored { .. }))
        ),
        "{r:?}"
    );
    assert_eq!(s.remote().manager().attaches().len(), 1);
}
