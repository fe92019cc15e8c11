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
use lazybd_blockdev::oci::{LazyLayerAnnotations, MEDIA_LAZYBD_LAYER};
use lazybd_blockdev::registry::RegistryError;
use lazybd_blockdev::stats::Stats;
use lazybd_blockdev::trace::Trace;

use super::{LazyLayers, ManifestSource};
use crate::config::RegistryConfig;
use lazybd_blockdev::oci;

pub const IMAGE: &str = "registry.test/app:v1";

/// `sha256:` and 64 hex digits made of `n`.
pub fn digest(n: u8) -> String {
    format!("sha256:{}", format!("{n:02x}").repeat(32))
}

/// The labels containerd puts on the Prepare of an image layer.
pub fn layer_labels(manifest: &str, layer: &str, target: &str) -> HashMap<String, String> {
    HashMap::from([
        (oci::labels::TARGET.to_owned(), target.to_owned()),
        (oci::labels::IMAGE_REF.to_owned(), IMAGE.to_owned()),
        (oci::labels::MANIFEST_DIGEST.to_owned(), manifest.to_owned()),
        (oci::labels::LAYER_DIGEST.to_owned(), layer.to_owned()),
    ])
}

/// The annotations of a lazybd layer descriptor with `image_size`.
pub fn lazy_annotations(image_size: u64) -> BTreeMap<String, String> {
    LazyLayerAnnotations {
        version: 2,
        index_digest: Some(digest(0xa1)),
        source_diff_id: digest(0xdd),
        index_offset: 4096,
        index_length: 112,
        image_size,
        chunk_size: 1 << 20,
    }
    .to_map()
}

/// A layer descriptor of a lazybd layer.
pub fn lazy_layer(digest: &str, image_size: u64) -> serde_json::Value {
    serde_json::json!({
        "mediaType": MEDIA_LAZYBD_LAYER,
        "digest": digest,
        "size": 8192,
        "annotations": lazy_annotations(image_size),
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
    attached: BTreeMap<String, PathBuf>,
    attaches: Vec<AttachCall>,
    detaches: Vec<String>,
    failing: bool,
}

impl FakeLayers {
    /// A table whose attaches all fail.
    pub fn failing() -> Self {
        let layers = FakeLayers::default();
        layers.lock().failing = true;
        layers
    }

    pub fn mountpoint_of(digest: &str) -> PathBuf {
        Path::new("/lazy").join(digest)
    }

    /// Digests of the attached layers.
    pub fn attached(&self) -> Vec<String> {
        self.lock().attached.keys().cloned().collect()
    }

    pub fn attaches(&self) -> Vec<AttachCall> {
        self.lock().attaches.clone()
    }

    pub fn detaches(&self) -> Vec<String> {
        self.lock().detaches.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LayerState> {
        self.state.lock().unwrap()
    }
}

#[async_trait]
impl LazyLayers for FakeLayers {
    async fn attach(&self, source: LayerSource) -> Result<PathBuf, DeviceError> {
        let mut state = self.lock();
        state.attaches.push(AttachCall {
            digest: source.digest.clone(),
            blob_size: source.blob_size,
            index_location: source.index_location,
            sources: source.sources.iter().map(|s| s.name().to_owned()).collect(),
        });
        if state.failing {
            return Err(DeviceError::Injected {
                digest: source.digest,
                step: AttachStep::Loop,
            });
        }
        let mountpoint = Self::mountpoint_of(&source.digest);
        state.attached.insert(source.digest, mountpoint.clone());
        Ok(mountpoint)
    }

    async fn detach(&self, digest: &str) -> Result<(), DeviceError> {
        let mut state = self.lock();
        state.detaches.push(digest.to_owned());
        match state.attached.remove(digest) {
            Some(_) => Ok(()),
            None => Err(DeviceError::NotAttached(digest.to_owned())),
        }
    }

    fn mountpoints(&self) -> Vec<(String, PathBuf)> {
        self.lock()
            .attached
            .iter()
            .map(|(d, m)| (d.clone(), m.clone()))
            .collect()
    }

    fn layer(&self, _digest: &str) -> Option<Arc<LazyLayer>> {
        None
    }

    async fn evict_caches(&self, _capacity: u64) {}

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
