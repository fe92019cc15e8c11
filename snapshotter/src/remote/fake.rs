//! In-memory stand-ins for the two seams of the remote path, for unit tests
//! of it and of the service: a layer table that records what it was asked
//! (no FUSE, no loop devices, no root), and manifests served from a map
//! that counts its fetches (no registry).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use lazybd_blockdev::device::{AttachStep, DeviceError};
use lazybd_blockdev::layer::{LayerSource, LazyLayer};
use lazybd_blockdev::oci::{LayerId, LazyLayerAnnotations, MEDIA_LAZYBD_LAYER};
use lazybd_blockdev::registry::RegistryError;
use lazybd_blockdev::stats::Stats;
use lazybd_blockdev::trace::Trace;
use tokio::sync::oneshot;

use super::{LazyLayers, ManifestSource};
use crate::config::RegistryConfig;
use lazybd_blockdev::oci;

pub const IMAGE: &str = "registry.test/app:v1";

/// `sha256:` and 64 hex digits made of `n`.
pub fn digest(n: u8) -> String {
    format!("sha256:{}", format!("{n:02x}").repeat(32))
}

/// The anchor the fake images give layer `layer` (one per blob digest).
pub fn anchor_of(layer: &str) -> String {
    oci::digest_of(format!("index of {layer}").as_bytes())
}

/// The identity of layer `layer` with its fake anchor.
pub fn id_of(layer: &str) -> LayerId {
    LayerId::anchored(&anchor_of(layer)).unwrap()
}

/// The chain IDs of lazybd layers `layers` (bottom first) with their fake
/// anchors as diff_ids: the snapshot names containerd asks for.
pub fn chain(layers: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in layers {
        out.push(oci::chain_id(out.last().map(String::as_str), &anchor_of(l)));
    }
    out
}

/// The labels containerd puts on the Prepare of an image layer when the
/// descriptor's annotations do not reach it (the manifest path).
pub fn layer_labels(manifest: &str, layer: &str, target: &str) -> HashMap<String, String> {
    HashMap::from([
        (oci::labels::TARGET.to_owned(), target.to_owned()),
        (oci::labels::IMAGE_REF.to_owned(), IMAGE.to_owned()),
        (oci::labels::MANIFEST_DIGEST.to_owned(), manifest.to_owned()),
        (oci::labels::LAYER_DIGEST.to_owned(), layer.to_owned()),
    ])
}

/// [`layer_labels`] plus the layer descriptor's lazybd annotations, as
/// containerd's unpacker passes them: no manifest is needed.
pub fn lazy_labels(
    manifest: &str,
    layer: &str,
    image_size: u64,
    target: &str,
) -> HashMap<String, String> {
    let mut labels = layer_labels(manifest, layer, target);
    labels.extend(lazy_annotations(layer, image_size));
    labels
}

/// The annotations of lazybd layer `layer`'s descriptor with `image_size`.
pub fn lazy_annotations(layer: &str, image_size: u64) -> BTreeMap<String, String> {
    LazyLayerAnnotations {
        version: 2,
        index_digest: Some(anchor_of(layer)),
        source_diff_id: digest(0xdd),
        index_offset: 4096,
        index_length: 112,
        image_size,
        chunk_size: 1 << 20,
    }
    .to_map()
}

/// A layer descriptor of a lazybd layer (8192 bytes: index at 4096, 112
/// bytes, then the footer... as the annotations say).
pub fn lazy_layer(digest: &str, image_size: u64) -> serde_json::Value {
    serde_json::json!({
        "mediaType": MEDIA_LAZYBD_LAYER,
        "digest": digest,
        "size": 4096 + 112 + 64,
        "annotations": lazy_annotations(digest, image_size),
    })
}

/// A descriptor of a version 1 lazybd layer: no anchor.
pub fn v1_layer(digest: &str, image_size: u64) -> serde_json::Value {
    use lazybd_blockdev::oci::v1;
    serde_json::json!({
        "mediaType": MEDIA_LAZYBD_LAYER,
        "digest": digest,
        "size": 4096 + 112 + 64,
        "annotations": {
            v1::ANN_VERSION: "1",
            v1::ANN_SOURCE_DIFF_ID: self::digest(0xdd),
            v1::ANN_INDEX_OFFSET: "4096",
            v1::ANN_INDEX_LENGTH: "112",
            v1::ANN_IMAGE_SIZE: image_size.to_string(),
            v1::ANN_CHUNK_SIZE: "4096",
        },
    })
}

/// A layer descriptor of an ordinary gzip layer.
pub fn gzip_layer(digest: &str) -> serde_json::Value {
    serde_json::json!({
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": digest,
        "size": 8192,
    })
}

/// An image manifest with these layer descriptors.
pub fn manifest(layers: &[serde_json::Value]) -> Bytes {
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(0xcc),
            "size": 2,
        },
        "layers": layers,
    });
    serde_json::to_vec(&m).unwrap().into()
}

/// Registry settings that read no credentials from this machine.
pub fn registry_config(dir: &Path) -> RegistryConfig {
    let docker_config = dir.join("docker-config.json");
    std::fs::write(&docker_config, "{}").unwrap();
    RegistryConfig {
        docker_config: Some(docker_config),
        ..RegistryConfig::default()
    }
}

/// What one attach was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachCall {
    pub digest: String,
    pub anchor: Option<String>,
    pub blob_size: u64,
    pub index_location: Option<(u64, u64)>,
    /// The sources' names, in order.
    pub sources: Vec<String>,
}

/// A layer table: attach makes a mountpoint under `/lazy`.
#[derive(Default)]
pub struct FakeLayers {
    state: Mutex<LayerState>,
    stats: Stats,
}

#[derive(Default)]
struct LayerState {
    /// By identity: the blob digest and the mountpoint.
    attached: BTreeMap<LayerId, (String, PathBuf)>,
    attaches: Vec<AttachCall>,
    detaches: Vec<LayerId>,
    /// Blob digests whose index was fetched ahead.
    index_fetches: Vec<String>,
    failing: Option<Failing>,
}

/// Where the fake's attaches fail.
#[derive(Clone, Copy)]
pub enum Failing {
    /// Before the index is verified (as a wrong or missing index does).
    Index,
    /// After it (as a failing loop device or mount does).
    Expose,
}

impl FakeLayers {
    /// A table whose attaches all fail, before the index is verified.
    pub fn failing() -> Self {
        let layers = FakeLayers::default();
        layers.set_failing(Some(Failing::Index));
        layers
    }

    /// Attaches from now on fail there (or work again: `None`).
    pub fn set_failing(&self, failing: Option<Failing>) {
        self.lock().failing = failing;
    }

    pub fn mountpoint_of(id: &LayerId) -> PathBuf {
        Path::new("/lazy").join(id.file_name())
    }

    /// Blob digests whose index was fetched ahead, in order.
    pub fn index_fetches(&self) -> Vec<String> {
        self.lock().index_fetches.clone()
    }

    /// Blob digests of the attached layers, sorted (one per identity).
    pub fn attached(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .lock()
            .attached
            .values()
            .map(|(d, _)| d.clone())
            .collect();
        out.sort();
        out
    }

    pub fn attached_ids(&self) -> Vec<LayerId> {
        self.lock().attached.keys().cloned().collect()
    }

    pub fn attaches(&self) -> Vec<AttachCall> {
        self.lock().attaches.clone()
    }

    pub fn detaches(&self) -> Vec<LayerId> {
        self.lock().detaches.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LayerState> {
        self.state.lock().unwrap()
    }
}

#[async_trait]
impl LazyLayers for FakeLayers {
    async fn attach(
        &self,
        source: LayerSource,
        opened: Option<oneshot::Sender<()>>,
    ) -> Result<PathBuf, DeviceError> {
        let mut state = self.lock();
        state.attaches.push(AttachCall {
            digest: source.digest.clone(),
            anchor: source.anchor.clone(),
            blob_size: source.blob_size,
            index_location: source.index_location,
            sources: source.sources.iter().map(|s| s.name().to_owned()).collect(),
        });
        let fail = |step| DeviceError::Injected {
            digest: source.digest.clone(),
            step,
        };
        match state.failing {
            Some(Failing::Index) => return Err(fail(AttachStep::FuseFile)),
            Some(Failing::Expose) => {
                opened.map(|tx| tx.send(()));
                return Err(fail(AttachStep::Loop));
            }
            None => {}
        }
        let id = source
            .id()
            .map_err(|_| DeviceError::BadDigest(source.digest.clone()))?;
        opened.map(|tx| tx.send(()));
        let mountpoint = Self::mountpoint_of(&id);
        // As the layer manager: one attachment per identity.
        state
            .attached
            .entry(id)
            .or_insert((source.digest, mountpoint.clone()));
        Ok(mountpoint)
    }

    async fn fetch_index(&self, source: LayerSource) -> Result<(), DeviceError> {
        self.lock().index_fetches.push(source.digest);
        Ok(())
    }

    async fn detach(&self, id: &LayerId) -> Result<(), DeviceError> {
        let mut state = self.lock();
        state.detaches.push(id.clone());
        match state.attached.remove(id) {
            Some(_) => Ok(()),
            None => Err(DeviceError::NotAttached(id.to_string())),
        }
    }

    fn mountpoints(&self) -> Vec<(LayerId, PathBuf)> {
        self.lock()
            .attached
            .iter()
            .map(|(id, (_, m))| (id.clone(), m.clone()))
            .collect()
    }

    fn layer(&self, _id: &LayerId) -> Option<Arc<LazyLayer>> {
        None
    }

    async fn evict_caches(&self, _capacity: u64) {}

    fn cache_dir(&self, _id: &LayerId) -> Option<PathBuf> {
        None
    }

    fn counters(&self) -> &Stats {
        &self.stats
    }

    fn replay_trace(&self, _trace: &Trace) -> usize {
        0
    }
}

/// Manifests by digest; a clone shares them and the fetch count.
#[derive(Clone, Default)]
pub struct FakeManifests {
    inner: Arc<Mutex<ManifestState>>,
}

#[derive(Default)]
struct ManifestState {
    manifests: HashMap<String, Bytes>,
    fetches: usize,
}

impl FakeManifests {
    /// Serves `manifest` as `digest` (the fake does not hash).
    pub fn insert(&self, digest: &str, manifest: Bytes) {
        self.inner
            .lock()
            .unwrap()
            .manifests
            .insert(digest.to_owned(), manifest);
    }

    /// How many manifests were asked for.
    pub fn fetches(&self) -> usize {
        self.inner.lock().unwrap().fetches
    }
}

#[async_trait]
impl ManifestSource for FakeManifests {
    async fn manifest(&self, image_ref: &str, digest: &str) -> Result<Bytes, RegistryError> {
        let mut state = self.inner.lock().unwrap();
        state.fetches += 1;
        state
            .manifests
            .get(digest)
            .cloned()
            .ok_or_else(|| RegistryError::Permanent {
                what: format!("{image_ref}@{digest}"),
                message: "manifest unknown".into(),
            })
    }
}
