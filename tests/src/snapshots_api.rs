//! The Snapshots API calls the snapshotter tests make over containerd's
//! gRPC client, and the labels CRI puts on an unpack's Prepare.

use std::collections::HashMap;

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    ListSnapshotsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use containerd_client::tonic::{transport::Channel, Code, Status};
use containerd_client::types::Mount;
use lazybd_blockdev::oci::labels;

pub type Client = SnapshotsClient<Channel>;

pub async fn prepare(
    c: &mut Client,
    key: &str,
    parent: &str,
    labels: HashMap<String, String>,
) -> Result<Vec<Mount>, Status> {
    c.prepare(PrepareSnapshotRequest {
        snapshotter: "lazybd".into(),
        key: key.into(),
        parent: parent.into(),
        labels,
    })
    .await
    .map(|r| r.into_inner().mounts)
}

pub async fn remove(c: &mut Client, key: &str) -> Result<(), Status> {
    c.remove(RemoveSnapshotRequest {
        snapshotter: "lazybd".into(),
        key: key.into(),
    })
    .await
    .map(|_| ())
}

/// The names of the snapshots that match `filters`, in the order listed.
pub async fn list(c: &mut Client, filters: &[&str]) -> Vec<String> {
    let mut stream = c
        .list(ListSnapshotsRequest {
            snapshotter: "lazybd".into(),
            filters: filters.iter().map(|s| s.to_string()).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(batch) = stream.message().await.unwrap() {
        out.extend(batch.info.into_iter().map(|i| i.name));
    }
    out
}

/// The labels CRI (and `lazybd pull`) put on the Prepare of layer `layer`
/// of `image`, whose committed snapshot is to be `target`.
pub fn cri_labels(
    image: &str,
    manifest: &str,
    layer: &str,
    target: &str,
) -> HashMap<String, String> {
    HashMap::from([
        (labels::TARGET.to_string(), target.to_string()),
        (labels::IMAGE_REF.into(), image.into()),
        (labels::MANIFEST_DIGEST.into(), manifest.into()),
        (labels::LAYER_DIGEST.into(), layer.into()),
    ])
}

/// Prepares the layers of `img` (named `image`) bottom first with CRI's
/// unpack labels, as containerd does when it pulls: each is attached lazily
/// and committed as its chain ID, so each Prepare answers AlreadyExists.
/// Returns the top one's chain ID.
pub async fn attach_layers(
    c: &mut Client,
    image: &str,
    img: &crate::images::LazyImage,
    log: impl Fn() -> String,
) -> String {
    let mut parent = String::new();
    for (i, (layer, target)) in img.layers.iter().zip(img.chain_ids()).enumerate() {
        let labels = cri_labels(image, &img.manifest, layer, &target);
        let err = prepare(c, &format!("extract-{i}"), &parent, labels)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}\n{}", log());
        parent = target;
    }
    parent
}
