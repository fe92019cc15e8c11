//! The remote path: recognising a Prepare that asks for a lazybd layer,
//! and attaching it lazily through the blockdev core instead of letting
//! containerd download and unpack it.
//!
//! containerd (CRI with `disable_snapshot_annotations = false`, or `lazybd
//! pull`) labels the Prepare of each image layer with the snapshot it will
//! be committed as and with the image, manifest and layer digests. The
//! manifest (fetched from the image's registry by digest) says whether the
//! layer is a lazybd layer and where its index is.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lazybd_blockdev::device::{DeviceError, LayerManager};
use lazybd_blockdev::layer::LayerSource;
use lazybd_blockdev::oci::{self, LazyLayerAnnotations, MAX_METADATA_LEN, MEDIA_LAZYBD_LAYER};
use lazybd_blockdev::p2p::PeerNode;
use lazybd_blockdev::registry::{RegistryClient, RegistryOptions};
use lazybd_blockdev::source::registry_chain;
use oci_spec::image::ImageManifest;
use serde::{Deserialize, Serialize};

use tracing::info;

use crate::config::RegistryConfig;
use crate::traces::{trace_key, Traces};

/// Manifests kept for the layers of images being prepared.
const MANIFEST_CACHE: usize = 64;

/// What is persisted about a lazily attached layer: enough to attach it
/// again after a restart, without the labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteLayer {
    /// The image reference the layer was pulled for (its repository serves
    /// the blob).
    pub image_ref: String,
    pub digest: String,
    pub blob_size: u64,
    pub index_offset: u64,
    pub index_length: u64,
    pub image_size: u64,
}

pub struct Remote {
    manager: LayerManager,
    registry: RegistryConfig,
    manifests: Mutex<HashMap<String, Arc<ImageManifest>>>,
    /// Chunk caches over this many bytes lose detached layers' caches; 0: no limit.
    cache_capacity: u64,
    /// This node's P2P peer, when `[p2p]` is configured.
    peer: Option<Arc<PeerNode>>,
    /// Startup traces; `None`: neither recorded nor replayed.
    traces: Option<Arc<Traces>>,
}

impl Remote {
    pub fn new(manager: LayerManager, registry: RegistryConfig) -> Self {
        Remote {
            manager,
            registry,
            manifests: Mutex::new(HashMap::new()),
            cache_capacity: 0,
            peer: None,
            traces: None,
        }
    }

    pub fn with_traces(mut self, traces: Arc<Traces>) -> Self {
        self.traces = Some(traces);
        self
    }

    pub fn traces(&self) -> Option<&Arc<Traces>> {
        self.traces.as_ref()
    }

    /// The digests of the attached lazy layers among `lowers` (overlay lower
    /// dirs, top first), bottom first: the key of the image's trace.
    pub fn lazy_chain<'a>(&self, lowers: impl DoubleEndedIterator<Item = &'a Path>) -> Vec<String> {
        let layers = self.manager.layers();
        lowers
            .rev()
            .filter_map(|dir| layers.iter().find(|l| l.mountpoint == dir))
            .map(|l| l.digest.clone())
            .collect()
    }

    /// Replays the stored trace of the image with these lazy layers (local,
    /// else, with `ask_supernode`, from the super node); whether there was one.
    pub async fn replay_trace(&self, chain: &[String], ask_supernode: bool) -> bool {
        let Some(traces) = self.traces.as_ref().filter(|t| t.config.replay) else {
            return false;
        };
        if chain.is_empty() {
            return false;
        }
        let key = trace_key(chain);
        let stats = self.manager.counters();
        let peer = self.peer.as_deref().filter(|_| ask_supernode);
        let Some(trace) = traces.load(&key, peer, stats).await else {
            return false;
        };
        let started = self.manager.replay_trace(&trace);
        info!(
            "trace {key}: {} chunks, replay started on {started} layers",
            trace.chunk_count()
        );
        true
    }

    /// Puts peer and super-node sources in front of the registry for every
    /// layer attached from now on, and serves attached layers to peers.
    pub fn with_peer(mut self, peer: Arc<PeerNode>) -> Self {
        self.peer = Some(peer);
        self
    }

    pub fn peer(&self) -> Option<&Arc<PeerNode>> {
        self.peer.as_ref()
    }

    /// Enforces `capacity` bytes for the chunk caches after every detach
    /// (and in [`evict`](Self::evict)); 0 = unlimited.
    pub fn with_cache_capacity(mut self, capacity: u64) -> Self {
        self.cache_capacity = capacity;
        self
    }

    /// Removes least recently used caches of detached layers while over the
    /// capacity.
    pub async fn evict(&self) {
        if self.cache_capacity > 0 {
            self.manager.evict_caches(self.cache_capacity).await;
        }
    }

    pub fn manager(&self) -> &LayerManager {
        &self.manager
    }

    pub fn into_manager(self) -> LayerManager {
        self.manager
    }

    /// The lazybd layer these Prepare labels ask for: `Ok(None)` when they
    /// do not describe an image layer (a container's rootfs, a plain `ctr`
    /// unpack), `Err(reason)` when they do but it cannot be served lazily.
    pub async fn resolve(
        &self,
        labels: &HashMap<String, String>,
    ) -> Result<Option<RemoteLayer>, String> {
        let (Some(image_ref), Some(manifest_digest), Some(layer_digest)) = (
            labels.get(oci::labels::IMAGE_REF),
            labels.get(oci::labels::MANIFEST_DIGEST),
            labels.get(oci::labels::LAYER_DIGEST),
        ) else {
            return Ok(None);
        };
        let manifest = self.manifest(image_ref, manifest_digest).await?;
        let desc = manifest
            .layers()
            .iter()
            .find(|l| l.digest().to_string() == *layer_digest)
            .ok_or_else(|| {
                format!("manifest {manifest_digest} of {image_ref} has no layer {layer_digest}")
            })?;
        if desc.media_type().to_string() != MEDIA_LAZYBD_LAYER {
            return Err(format!(
                "layer {layer_digest} of {image_ref} is not a lazybd layer (media type {})",
                desc.media_type()
            ));
        }
        let ann =
            LazyLayerAnnotations::from_map(desc.annotations().as_ref().unwrap_or(&HashMap::new()))
                .map_err(|e| format!("layer {layer_digest} of {image_ref}: {e}"))?;
        Ok(Some(RemoteLayer {
            image_ref: image_ref.clone(),
            digest: layer_digest.clone(),
            blob_size: desc.size(),
            index_offset: ann.index_offset,
            index_length: ann.index_length,
            image_size: ann.image_size,
        }))
    }

    async fn manifest(&self, image_ref: &str, digest: &str) -> Result<Arc<ImageManifest>, String> {
        if let Some(m) = self.cached_manifest(digest) {
            return Ok(m);
        }
        let client = self.client(image_ref)?;
        let raw = client
            .manifest_by_digest(digest)
            .await
            .map_err(|e| e.to_string())?;
        if raw.bytes.len() as u64 > MAX_METADATA_LEN {
            return Err(format!("manifest {digest} of {image_ref} is too large"));
        }
        let manifest = Arc::new(
            ImageManifest::from_reader(&raw.bytes[..])
                .map_err(|e| format!("manifest {digest} of {image_ref}: {e}"))?,
        );
        let mut cache = self.manifests.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MANIFEST_CACHE {
            cache.clear();
        }
        cache.insert(digest.to_owned(), manifest.clone());
        Ok(manifest)
    }

    fn cached_manifest(&self, digest: &str) -> Option<Arc<ImageManifest>> {
        self.manifests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .cloned()
    }

    fn client(&self, image_ref: &str) -> Result<Arc<RegistryClient>, String> {
        let host = image_ref.split('/').next().unwrap_or_default();
        let opts = RegistryOptions {
            plain_http: self.registry.plain_http.iter().any(|h| h == host),
            docker_config: self.registry.docker_config.clone(),
            ..RegistryOptions::default()
        };
        let keychain = self.registry.keychain.as_ref();
        match keychain.and_then(|k| k.get(image_ref)) {
            Some(auth) => RegistryClient::with_auth(image_ref, &opts, auth),
            None => RegistryClient::new(image_ref, &opts),
        }
        .map(Arc::new)
        .map_err(|e| e.to_string())
    }

    /// Attaches the layer (idempotent); returns its EROFS mount.
    pub async fn attach(&self, layer: &RemoteLayer) -> Result<PathBuf, String> {
        let client = self.client(&layer.image_ref)?;
        let sources = registry_chain(&client, self.peer.as_ref(), &layer.digest, layer.blob_size);
        let attached = self
            .manager
            .attach(LayerSource {
                digest: layer.digest.clone(),
                blob_size: layer.blob_size,
                index_location: Some((layer.index_offset, layer.index_length)),
                sources,
            })
            .await
            .map_err(|e| e.to_string())?;
        if let (Some(peer), Some(l)) = (&self.peer, self.manager.layer(&attached.digest)) {
            peer.serve_layer(l).await;
        }
        Ok(attached.mountpoint)
    }

    pub async fn detach(&self, digest: &str) -> Result<(), DeviceError> {
        if let Some(peer) = &self.peer {
            peer.forget_layer(digest).await;
        }
        self.manager.detach(digest).await?;
        self.evict().await;
        Ok(())
    }

    /// The EROFS mount of an attached layer.
    pub fn mountpoint(&self, digest: &str) -> Option<PathBuf> {
        self.manager
            .layers()
            .into_iter()
            .find(|l| l.digest == digest)
            .map(|l| l.mountpoint)
    }
}
