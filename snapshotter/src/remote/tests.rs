use std::collections::HashMap;

use lazybd_blockdev::device::DeviceError;
use lazybd_blockdev::oci;

use super::fake::{self, anchor_of, digest, id_of, FakeLayers, FakeManifests, IMAGE};
use super::*;

fn remote(dir: &Path, manifests: &FakeManifests, layers: FakeLayers) -> Remote<FakeLayers> {
    Remote::new(layers, fake::registry_config(dir)).with_manifest_source(manifests.clone())
}

#[tokio::test]
async fn resolves_a_lazybd_layer_from_its_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = FakeManifests::default();
    let (m, layer) = (digest(0xa0), digest(1));
    manifests.insert(
        &m,
        fake::manifest(&[
            fake::gzip_layer(&digest(2)),
            fake::lazy_layer(&layer, 1 << 20),
        ]),
    );
    let r = remote(dir.path(), &manifests, FakeLayers::default());
    let resolved = r
        .resolve(&fake::layer_labels(&m, &layer, "chain-1"))
        .await
        .unwrap();
    let want = RemoteLayer {
        image_ref: IMAGE.into(),
        digest: layer.clone(),
        blob_size: 4272,
        index_offset: 4096,
        index_length: 112,
        image_size: 1 << 20,
        anchor: Some(anchor_of(&layer)),
        source_diff_id: Some(digest(0xdd)),
    };
    assert_eq!(resolved, Some(want.clone()));
    // The other layers of the image find the manifest in the cache.
    r.resolve(&fake::layer_labels(&m, &layer, "chain-2"))
        .await
        .unwrap();
    assert_eq!(manifests.fetches(), 1);

    // With the descriptor's annotations among the labels (containerd's
    // unpacker passes them), the same layer and no manifest at all.
    let labelled = Remote::new(FakeLayers::default(), fake::registry_config(dir.path()))
        .with_manifest_source(FakeManifests::default());
    let labels = fake::lazy_labels(&digest(0xa9), &layer, 1 << 20, "chain-1");
    assert_eq!(labelled.resolve(&labels).await.unwrap(), Some(want));
    // The manifest digest is not needed either.
    let mut labels = labels;
    labels.remove(oci::labels::MANIFEST_DIGEST);
    assert!(labelled.resolve(&labels).await.unwrap().is_some());
}

#[tokio::test]
async fn labels_that_name_a_layer_badly_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = FakeManifests::default();
    let r = remote(dir.path(), &manifests, FakeLayers::default());
    let layer = digest(1);
    let good = fake::lazy_labels(&digest(0xa0), &layer, 1 << 20, "t");
    for (key, value) in [
        (oci::ANN_INDEX_DIGEST, "sha256:../../etc"),
        (oci::ANN_INDEX_LENGTH, &u64::MAX.to_string()),
        (oci::labels::LAYER_DIGEST, "sha256:../../etc"),
    ] {
        let mut labels = good.clone();
        labels.insert(key.to_owned(), value.to_owned());
        let e = r.resolve(&labels).await.unwrap_err();
        assert!(
            matches!(e, RemoteError::BadAnnotations { .. }),
            "{key}: {e:?}"
        );
    }
    // A version 2 layer without its anchor is not a version 1 layer.
    let mut labels = good.clone();
    labels.remove(oci::ANN_INDEX_DIGEST);
    let e = r.resolve(&labels).await.unwrap_err();
    assert!(e.to_string().contains("index-digest"), "{e}");
    assert_eq!(manifests.fetches(), 0);
}

#[tokio::test]
async fn labels_without_an_image_layer_ask_for_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = FakeManifests::default();
    let r = remote(dir.path(), &manifests, FakeLayers::default());
    let mut labels = fake::layer_labels(&digest(0xa0), &digest(1), "chain-1");
    labels.remove(oci::labels::LAYER_DIGEST);
    assert_eq!(r.resolve(&labels).await.unwrap(), None);
    assert_eq!(r.resolve(&HashMap::new()).await.unwrap(), None);
    assert_eq!(manifests.fetches(), 0);
}

async fn resolve(
    r: &Remote<FakeLayers>,
    manifest: &str,
    layer: &str,
) -> Result<Option<RemoteLayer>, RemoteError> {
    r.resolve(&fake::layer_labels(manifest, layer, "t")).await
}

#[tokio::test]
async fn says_why_a_layer_cannot_be_lazy() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = FakeManifests::default();
    let r = remote(dir.path(), &manifests, FakeLayers::default());
    let mut no_annotations = fake::lazy_layer(&digest(3), 1);
    no_annotations["annotations"] = serde_json::json!({});
    let m = digest(0xa0);
    manifests.insert(
        &m,
        fake::manifest(&[fake::gzip_layer(&digest(2)), no_annotations]),
    );
    let (too_large, not_json) = (digest(0xa1), digest(0xa2));
    manifests.insert(&too_large, vec![b' '; MAX_METADATA_LEN as usize + 1].into());
    manifests.insert(&not_json, "{".into());

    let e = resolve(&r, &m, &digest(2)).await.unwrap_err();
    assert!(
        matches!(&e, RemoteError::NotLazy { media_type, .. }
        if media_type == "application/vnd.oci.image.layer.v1.tar+gzip"),
        "{e:?}"
    );
    assert!(e.to_string().contains("is not a lazybd layer"), "{e}");
    let e = resolve(&r, &m, &digest(9)).await.unwrap_err();
    assert!(matches!(e, RemoteError::NoSuchLayer { .. }), "{e:?}");
    let e = resolve(&r, &m, &digest(3)).await.unwrap_err();
    assert!(matches!(e, RemoteError::BadAnnotations { .. }), "{e:?}");
    // The underlying reason stays in the message (the fallback logs it)
    // and in the source chain.
    assert!(e.to_string().contains("missing"), "{e}");
    assert!(std::error::Error::source(&e).is_some());
    let e = resolve(&r, &too_large, &digest(2)).await.unwrap_err();
    assert!(matches!(e, RemoteError::TooLarge { .. }), "{e:?}");
    let e = resolve(&r, &not_json, &digest(2)).await.unwrap_err();
    assert!(matches!(e, RemoteError::BadManifest { .. }), "{e:?}");
    let e = resolve(&r, &digest(0xa3), &digest(2)).await.unwrap_err();
    assert!(
        matches!(&e, RemoteError::Fetch { source, .. } if !source.is_transient()),
        "{e:?}"
    );
    assert!(e.to_string().contains("manifest unknown"), "{e}");
    assert!(!e.is_transient());
}

#[tokio::test]
async fn attaches_from_the_registry_and_detaches() {
    let dir = tempfile::tempdir().unwrap();
    let r = remote(dir.path(), &FakeManifests::default(), FakeLayers::default());
    let layer = RemoteLayer {
        image_ref: IMAGE.into(),
        digest: digest(1),
        blob_size: 8192,
        index_offset: 4096,
        index_length: 112,
        image_size: 1 << 20,
        anchor: Some(anchor_of(&digest(1))),
        source_diff_id: None,
    };
    let id = id_of(&layer.digest);
    let mountpoint = r.attach(&layer).await.unwrap();
    assert_eq!(mountpoint, FakeLayers::mountpoint_of(&id));
    assert_eq!(r.mountpoint(&id), Some(mountpoint.clone()));
    assert_eq!(
        r.manager().attaches(),
        [fake::AttachCall {
            digest: layer.digest.clone(),
            anchor: layer.anchor.clone(),
            blob_size: 8192,
            index_location: Some((4096, 112)),
            // No `[p2p]`: the registry only.
            sources: vec!["registry".into()],
        }]
    );
    let other = Path::new("/elsewhere");
    let chain = r.lazy_chain([mountpoint.as_path(), other].into_iter());
    assert_eq!(chain, std::slice::from_ref(&id));
    assert_eq!(r.manager().attached(), [layer.digest.as_str()]);
    r.detach(&id).await.unwrap();
    assert_eq!(r.mountpoint(&id), None);
    assert_eq!(r.manager().detaches(), [id]);
    assert!(r.manager().attached().is_empty());
}

#[tokio::test]
async fn a_failed_attach_keeps_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let r = remote(dir.path(), &FakeManifests::default(), FakeLayers::failing());
    let layer = RemoteLayer {
        image_ref: IMAGE.into(),
        digest: digest(1),
        blob_size: 8192,
        index_offset: 4096,
        index_length: 112,
        image_size: 1 << 20,
        anchor: Some(anchor_of(&digest(1))),
        source_diff_id: None,
    };
    let e = r.attach(&layer).await.unwrap_err();
    assert!(
        matches!(
            &e,
            RemoteError::Attach {
                source: DeviceError::Injected { .. },
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("injected failure"), "{e}");
    assert!(e.is_transient());
    // A reference no client can be made for fails before the attach.
    let bad = RemoteLayer {
        image_ref: "Not A Reference".into(),
        ..layer
    };
    let e = r.attach(&bad).await.unwrap_err();
    assert!(matches!(e, RemoteError::Client { .. }), "{e:?}");
    assert_eq!(r.manager().attaches().len(), 1);
}
