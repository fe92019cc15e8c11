//! The snapshot labels of containerd's remote-snapshot protocol: containerd's
//! unpacker (with CRI's additions) puts them on the Prepare of each image
//! layer, so a remote snapshotter can attach the layer from the registry
//! instead of having it downloaded and unpacked. `lazybd pull` sets them the
//! same way; the snapshotter reads them. Spelled here once for all of lazybd.

use std::collections::HashMap;

/// The committed snapshot name containerd wants (set on every unpack).
pub const TARGET: &str = "containerd.io/snapshot.ref";
/// The image reference the layer is pulled for (its repository serves the blob).
pub const IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// The digest of the image manifest that lists the layer.
pub const MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// The layer's blob digest.
pub const LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";

/// Labels under this prefix are inherited: containerd's unpacker copies the
/// layer descriptor's annotations with it into the Prepare's labels
/// (`snapshots.FilterInheritedLabels`), which is how the lazybd annotations
/// (`crate::oci::ANN_PREFIX`) reach the snapshotter.
pub const INHERITED_PREFIX: &str = "containerd.io/snapshot/";

/// The annotations of a layer descriptor that containerd's unpacker passes
/// on as Prepare labels.
pub fn inherited(annotations: &HashMap<String, String>) -> HashMap<String, String> {
    annotations
        .iter()
        .filter(|(k, _)| k.starts_with(INHERITED_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}
