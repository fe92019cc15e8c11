//! The remote path: recognising a Prepare that asks for a lazybd layer,
//! and attaching it lazily through the blockdev core instead of letting
//! containerd download and unpack it.
//!
//! containerd (CRI with `disable_snapshot_annotations = false`, or `lazybd
//! pull`) labels the Prepare of each image layer with the snapshot it will
//! be committed as and with the image, manifest and layer digests. Its
//! unpacker also copies the layer descriptor's `containerd.io/snapshot/`
//! annotations into the labels: for a lazybd layer, where its index is and
//! its anchor, so Prepare needs nothing else. Without them (older images,
//! clients that do not pass them) the manifest, fetched from the image's
//! registry by digest, says whether the layer is a lazybd layer and where
//! its index is. Either way the layer must pass the trust rules of
//! [`trust`] (docs/security.md) before it is attached.
//!
//! Two seams keep this path testable without root: [`LazyLayers`], what it
//! needs from this node's layers ([`LayerManager`] in production), and
//! [`ManifestSource`], where manifests come from (the image's registry).

mod ahead;
mod attaching;
mod error;
#[cfg(test)]
pub(crate) mod fake;
mod layers;
mod registry;
#[cfg(test)]
mod tests;
pub mod trust;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lazybd_blockdev::device::{DeviceError, LayerManager};
use lazybd_blockdev::layer::LayerSource;
use lazybd_blockdev::oci::{
    self, LayerId, LazyLayerAnnotations, OciError, MAX_METADATA_LEN, MEDIA_LAZYBD_LAYER,
};
use lazybd_blockdev::p2p::{PeerNode, RegistryBlob};
use lazybd_blockdev::registry::RegistryClient;
use lazybd_blockdev::source::registry_chain;
use oci_spec::image::ImageManifest;
use tracing::info;

use crate::config::RegistryConfig;
use crate::store::RemoteLayer;
use crate::traces::{trace_key, Traces};
use attaching::ATTACH_WAIT;

#[cfg(test)]
pub(crate) use ahead::MAX_LAYERS as MAX_LAYERS_AHEAD;
pub use error::RemoteError;
pub use layers::LazyLayers;
pub use registry::{ManifestSource, RegistryManifests};

/// Manifests kept for the layers of images being prepared.
const MANIFEST_CACHE: usize = 64;

pub struct Remote<L = LayerManager> {
    /// Shared with the attaches running behind their Prepare.
    manager: Arc<L>,
    attaching: attaching::Attaching,
    ahead: ahead::Ahead,
    /// For the registry client of each attached layer's chunk source.
    registry: RegistryConfig,
    /// Those clients, one per image (its manifest lookups use them too).
    clients: Arc<registry::Clients>,
    manifests: Box<dyn ManifestSource>,
    /// By manifest digest.
    manifest_cache: Mutex<HashMap<String, Arc<ImageManifest>>>,
    /// Chunk caches over this many bytes lose detached layers' caches; 0: no limit.
    cache_capacity: u64,
    /// This node's P2P peer, when `[p2p]` is configured.
    peer: Option<Arc<PeerNode>>,
    /// Startup traces; `None`: neither recorded nor replayed.
    traces: Option<Arc<Traces>>,
    /// `[remote] allow_unanchored_layers`: version 1 layers are attached.
    allow_unanchored: bool,
}

impl<L: LazyLayers> Remote<L> {
    /// Manifests come from the image's registry, layers are attached by `manager`.
    pub fn new(manager: L, registry: RegistryConfig) -> Self {
        let clients = Arc::new(registry::Clients::default());
        Remote {
            manager: Arc::new(manager),
            attaching: attaching::Attaching::default(),
            ahead: ahead::Ahead::default(),
            manifests: Box::new(RegistryManifests::new(registry.clone(), clients.clone())),
            registry,
            clients,
            manifest_cache: Mutex::new(HashMap::new()),
            cache_capacity: 0,
            peer: None,
            traces: None,
            allow_unanchored: false,
        }
    }

    /// Attaches unanchored (version 1) layers too (`[remote]
    /// allow_unanchored_layers`); refused by default.
    pub fn with_unanchored_layers(mut self, allow: bool) -> Self {
        self.allow_unanchored = allow;
        self
    }

    /// Takes manifests from `source` instead of the image's registry.
    pub fn with_manifest_source(mut self, source: impl ManifestSource + 'static) -> Self {
        self.manifests = Box::new(source);
        self
    }

    pub fn with_traces(mut self, traces: Arc<Traces>) -> Self {
        self.traces = Some(traces);
        self
    }

    /// Puts peer and super-node sources in front of the registry for every
    /// layer attached from now on, and serves attached layers to peers.
    pub fn with_peer(mut self, peer: Arc<PeerNode>) -> Self {
        self.peer = Some(peer);
        self
    }

    /// Enforces `capacity` bytes for the chunk caches after every detach
    /// (and in [`evict`](Self::evict)); 0 = unlimited.
    pub fn with_cache_capacity(mut self, capacity: u64) -> Self {
        self.cache_capacity = capacity;
        self
    }

    /// The lazybd layer these Prepare labels ask for: `Ok(None)` when they
    /// do not describe an image layer (a container's rootfs, a plain `ctr`
    /// unpack), an error when they do but it cannot be served lazily. The
    /// layer's own labels (its descriptor's lazybd annotations) are used
    /// when containerd passed them, else the image's manifest.
    pub async fn resolve(
        &self,
        labels: &HashMap<String, String>,
    ) -> Result<Option<RemoteLayer>, RemoteError> {
        let (Some(image_ref), Some(layer_digest)) = (
            labels.get(oci::labels::IMAGE_REF),
            labels.get(oci::labels::LAYER_DIGEST),
        ) else {
            return Ok(None);
        };
        let bad = |source| RemoteError::BadAnnotations {
            image_ref: image_ref.clone(),
            layer: layer_digest.clone(),
            source,
        };
        let (ann, blob_size) = if labels.contains_key(oci::ANN_VERSION) {
            // With the CRI keychain, fetching the manifest is how the
            // registry says which of the repository's credentials it
            // accepts (the layer's chunks are fetched with that one, see
            // `RegistryManifests`): asked for even when containerd passed
            // the layer's annotations (cached: once per image).
            if self.registry.keychain.is_some() {
                if let Some(manifest_digest) = labels.get(oci::labels::MANIFEST_DIGEST) {
                    self.manifest(image_ref, manifest_digest).await?;
                }
            }
            let ann = LazyLayerAnnotations::from_map(labels).map_err(bad)?;
            let size = ann.blob_size().ok_or_else(|| {
                bad(OciError::BadAnnotation {
                    key: oci::ANN_INDEX_LENGTH,
                    value: ann.index_length.to_string(),
                })
            })?;
            (ann, size)
        } else {
            let Some(manifest_digest) = labels.get(oci::labels::MANIFEST_DIGEST) else {
                return Ok(None);
            };
            self.manifest_annotations(image_ref, manifest_digest, layer_digest)
                .await?
        };
        // The digests name files and URLs: refused here if malformed.
        LayerId::of(layer_digest, ann.index_digest.as_deref()).map_err(bad)?;
        Ok(Some(remote_layer(image_ref, layer_digest, ann, blob_size)))
    }

    /// Starts fetching the indexes of the other lazybd layers of the image
    /// whose layer `current` is being prepared (`crate::remote::ahead`),
    /// once per image: from its manifest, named by digest in the labels.
    /// Only helps: any failure leaves each layer to fetch its own index.
    pub async fn fetch_indexes_ahead(
        &self,
        labels: &HashMap<String, String>,
        current: &RemoteLayer,
    ) {
        let Some(manifest_digest) = labels.get(oci::labels::MANIFEST_DIGEST) else {
            return;
        };
        if self.ahead.looked(manifest_digest) {
            return;
        }
        let manifest = match self.manifest(&current.image_ref, manifest_digest).await {
            Ok(m) => m,
            Err(e) => {
                info!("not fetching the indexes of the other layers ahead: {e}");
                return;
            }
        };
        let mut fetches: Vec<(LayerId, ahead::Fetch)> = Vec::new();
        for desc in manifest.layers() {
            let digest = desc.digest().to_string();
            if desc.media_type().to_string() != MEDIA_LAZYBD_LAYER || digest == current.digest {
                continue;
            }
            let no_annotations = HashMap::new();
            let annotations = desc.annotations().as_ref().unwrap_or(&no_annotations);
            let Ok(ann) = LazyLayerAnnotations::from_map(annotations) else {
                continue;
            };
            let layer = remote_layer(&current.image_ref, &digest, ann, desc.size());
            let Ok(id) = layer.id() else { continue };
            let refused = self.anchored_or_allowed(&layer).is_err();
            if refused || self.mountpoint(&id).is_some() || self.attaching.running(&id).is_some() {
                continue;
            }
            let Ok(client) = self.client(&layer) else {
                continue;
            };
            let (manager, source) = (
                self.manager.clone(),
                layer_source(&layer, &client, self.peer.as_ref()),
            );
            fetches.push((
                id,
                Box::pin(async move {
                    if let Err(e) = manager.fetch_index(source).await {
                        info!("fetching the index of layer {digest} ahead: {e}");
                    }
                }),
            ));
        }
        self.ahead.start(manifest_digest, fetches);
    }

    /// The layer's annotations and blob size from the image's manifest.
    async fn manifest_annotations(
        &self,
        image_ref: &str,
        manifest_digest: &str,
        layer_digest: &str,
    ) -> Result<(LazyLayerAnnotations, u64), RemoteError> {
        let manifest = self.manifest(image_ref, manifest_digest).await?;
        let desc = manifest
            .layers()
            .iter()
            .find(|l| l.digest().to_string() == layer_digest)
            .ok_or_else(|| RemoteError::NoSuchLayer {
                image_ref: image_ref.to_owned(),
                manifest: manifest_digest.to_owned(),
                layer: layer_digest.to_owned(),
            })?;
        if desc.media_type().to_string() != MEDIA_LAZYBD_LAYER {
            return Err(RemoteError::NotLazy {
                image_ref: image_ref.to_owned(),
                layer: layer_digest.to_owned(),
                media_type: desc.media_type().to_string(),
            });
        }
        let ann =
            LazyLayerAnnotations::from_map(desc.annotations().as_ref().unwrap_or(&HashMap::new()))
                .map_err(|source| RemoteError::BadAnnotations {
                    image_ref: image_ref.to_owned(),
                    layer: layer_digest.to_owned(),
                    source,
                })?;
        Ok((ann, desc.size()))
    }

    /// Attaches the layer here and now (idempotent for its identity); its
    /// index must hash to its anchor. Returns its EROFS mount.
    pub async fn attach(&self, layer: &RemoteLayer) -> Result<PathBuf, RemoteError> {
        let client = self.client(layer)?;
        attach_layer(
            &*self.manager,
            client,
            self.peer.clone(),
            layer.clone(),
            None,
        )
        .await
    }

    /// Starts attaching the layer, unless it is attached or being attached,
    /// and waits until its index is verified against its anchor; the rest
    /// of the attach goes on behind (`crate::remote::attaching`).
    pub async fn attach_verified(&self, layer: &RemoteLayer) -> Result<(), RemoteError> {
        if self.attached_now(layer).is_some() {
            return Ok(());
        }
        let verified = self.attaching(layer).await?.verified;
        match tokio::time::timeout(ATTACH_WAIT, verified).await {
            Ok(verified) => verified.map_err(RemoteError::Shared),
            Err(_) => Err(not_within(layer)),
        }
    }

    /// The layer's EROFS mount: at once if it is attached, else once the
    /// attach running behind its Prepare ends, or one started now (the
    /// last failed), within [`ATTACH_WAIT`].
    pub async fn attached(&self, layer: &RemoteLayer) -> Result<PathBuf, RemoteError> {
        if let Some(m) = self.attached_now(layer) {
            return Ok(m);
        }
        let attached = self.attaching(layer).await?.attached;
        info!("waiting for layer {} to attach", layer.digest);
        match tokio::time::timeout(ATTACH_WAIT, attached).await {
            Ok(attached) => attached.map_err(RemoteError::Shared),
            Err(_) => Err(not_within(layer)),
        }
    }

    fn attached_now(&self, layer: &RemoteLayer) -> Option<PathBuf> {
        self.mountpoint(&layer.id().ok()?)
    }

    /// The running attach of the layer, or one started now (after the
    /// fetch of its index ahead, if one runs: it leaves the index on disk).
    async fn attaching(&self, layer: &RemoteLayer) -> Result<attaching::Attach, RemoteError> {
        let id = layer.id().map_err(|source| RemoteError::BadAnnotations {
            image_ref: layer.image_ref.clone(),
            layer: layer.digest.clone(),
            source,
        })?;
        if self.attaching.running(&id).is_none() {
            let _ = tokio::time::timeout(ATTACH_WAIT, self.ahead.wait(&id)).await;
        }
        let client = self.client(layer)?;
        let (manager, peer, layer) = (self.manager.clone(), self.peer.clone(), layer.clone());
        Ok(self.attaching.start(&id, move |verified| async move {
            attach_layer(&*manager, client, peer, layer, Some(verified)).await
        }))
    }

    /// Waits for the attaches running behind their Prepares and the index
    /// fetches ahead of theirs.
    pub async fn settle(&self) {
        self.ahead.settle().await;
        self.attaching.settle().await;
    }

    /// Detaches the layer, after its running attach if there is one.
    pub async fn detach(&self, id: &LayerId) -> Result<(), DeviceError> {
        if let Some(attach) = self.attaching.running(id) {
            let _ = tokio::time::timeout(ATTACH_WAIT, attach.attached).await;
        }
        if let Some(peer) = &self.peer {
            peer.forget_layer(id).await;
        }
        self.manager.detach(id).await?;
        self.evict().await;
        Ok(())
    }

    /// The EROFS mount of an attached layer.
    pub fn mountpoint(&self, id: &LayerId) -> Option<PathBuf> {
        self.manager
            .mountpoints()
            .into_iter()
            .find(|(attached, _)| attached == id)
            .map(|(_, mountpoint)| mountpoint)
    }

    /// The attached lazy layers among `lowers` (overlay lower dirs, top
    /// first), bottom first: the key of the image's trace.
    pub fn lazy_chain<'a>(
        &self,
        lowers: impl DoubleEndedIterator<Item = &'a Path>,
    ) -> Vec<LayerId> {
        let layers = self.manager.mountpoints();
        lowers
            .rev()
            .filter_map(|dir| layers.iter().find(|(_, mountpoint)| mountpoint == dir))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Replays the stored trace of the image with these lazy layers (local,
    /// else, with `ask_supernode`, from the super node); whether there was one.
    pub async fn replay_trace(&self, chain: &[LayerId], ask_supernode: bool) -> bool {
        let Some(traces) = self.traces.as_ref().filter(|t| t.config.replay) else {
            return false;
        };
        if chain.is_empty() {
            return false;
        }
        let key = trace_key(chain);
        let stats = self.manager.counters();
        let peer = self.peer.as_deref().filter(|_| ask_supernode);
        let Some(trace) = traces.load(&key, chain, peer, stats).await else {
            return false;
        };
        let started = self.manager.replay_trace(&trace);
        info!(
            "trace {key}: {} chunks, replay started on {started} layers",
            trace.range_count()
        );
        true
    }

    /// Removes least recently used caches of detached layers while over the
    /// capacity.
    pub async fn evict(&self) {
        if self.cache_capacity > 0 {
            self.manager.evict_caches(self.cache_capacity).await;
        }
    }

    pub fn traces(&self) -> Option<&Arc<Traces>> {
        self.traces.as_ref()
    }

    pub fn peer(&self) -> Option<&Arc<PeerNode>> {
        self.peer.as_ref()
    }

    pub fn manager(&self) -> &L {
        &self.manager
    }

    /// The layer manager, once the attaches running behind their Prepares
    /// ended; `None` if one still holds it.
    pub async fn into_manager(self) -> Option<L> {
        self.settle().await;
        Arc::try_unwrap(self.manager).ok()
    }

    /// The manifest by digest, cached: the Prepares of one image's layers
    /// come one after another and all need it.
    async fn manifest(
        &self,
        image_ref: &str,
        digest: &str,
    ) -> Result<Arc<ImageManifest>, RemoteError> {
        if let Some(m) = self.cached_manifest(digest) {
            return Ok(m);
        }
        let raw = self
            .manifests
            .manifest(image_ref, digest)
            .await
            .map_err(|source| RemoteError::Fetch {
                image_ref: image_ref.to_owned(),
                digest: digest.to_owned(),
                source,
            })?;
        if raw.len() as u64 > MAX_METADATA_LEN {
            return Err(RemoteError::TooLarge {
                image_ref: image_ref.to_owned(),
                digest: digest.to_owned(),
                len: raw.len() as u64,
            });
        }
        let manifest = Arc::new(ImageManifest::from_reader(&raw[..]).map_err(|source| {
            RemoteError::BadManifest {
                image_ref: image_ref.to_owned(),
                digest: digest.to_owned(),
                source,
            }
        })?);
        let mut cache = self
            .manifest_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MANIFEST_CACHE {
            cache.clear();
        }
        cache.insert(digest.to_owned(), manifest.clone());
        Ok(manifest)
    }

    fn cached_manifest(&self, digest: &str) -> Option<Arc<ImageManifest>> {
        self.manifest_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .cloned()
    }

    /// The registry client of the layer's image: for its chunk sources
    /// (this node's P2P parent and ancestors, the super node, the registry:
    /// `registry_chain`) and for the super node's check of its credentials.
    fn client(&self, layer: &RemoteLayer) -> Result<Arc<RegistryClient>, RemoteError> {
        self.clients
            .get(&self.registry, &layer.image_ref)
            .map_err(|source| RemoteError::Client {
                image_ref: layer.image_ref.clone(),
                source,
            })
    }
}

fn not_within(layer: &RemoteLayer) -> RemoteError {
    RemoteError::Attach {
        digest: layer.digest.clone(),
        source: DeviceError::Task(format!("not attached within {ATTACH_WAIT:?}")),
    }
}

/// Attaches `layer` through `manager` and serves it to peers. Sends on
/// `verified` once its index is verified.
async fn attach_layer<L: LazyLayers>(
    manager: &L,
    client: Arc<RegistryClient>,
    peer: Option<Arc<PeerNode>>,
    layer: RemoteLayer,
    verified: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<PathBuf, RemoteError> {
    let mountpoint = manager
        .attach(layer_source(&layer, &client, peer.as_ref()), verified)
        .await
        .map_err(|source| RemoteError::Attach {
            digest: layer.digest.clone(),
            source,
        })?;
    let served = match (&peer, layer.id()) {
        (Some(peer), Ok(id)) => manager.layer(&id).map(|l| (peer, l)),
        _ => None,
    };
    if let Some((peer, l)) = served {
        let origin = RegistryBlob::new(&client, &layer.digest, layer.blob_size);
        peer.serve_layer(l, origin).await;
    }
    Ok(mountpoint)
}

/// What the blockdev layer manager needs of `layer`: its chunk sources are
/// this node's P2P parent and ancestors, the super node, the registry
/// (`registry_chain`).
fn layer_source(
    layer: &RemoteLayer,
    client: &Arc<RegistryClient>,
    peer: Option<&Arc<PeerNode>>,
) -> LayerSource {
    LayerSource {
        digest: layer.digest.clone(),
        anchor: layer.anchor.clone(),
        blob_size: layer.blob_size,
        index_location: Some((layer.index_offset, layer.index_length)),
        sources: registry_chain(
            client,
            peer,
            &layer.digest,
            layer.anchor.as_deref(),
            layer.blob_size,
        ),
        diff_id: layer.source_diff_id.clone(),
    }
}

/// The layer `digest` of `image_ref`, as its descriptor's annotations
/// describe it.
fn remote_layer(
    image_ref: &str,
    digest: &str,
    ann: LazyLayerAnnotations,
    blob_size: u64,
) -> RemoteLayer {
    RemoteLayer {
        image_ref: image_ref.to_owned(),
        digest: digest.to_owned(),
        blob_size,
        index_offset: ann.index_offset,
        index_length: ann.index_length,
        image_size: ann.image_size,
        anchor: ann.index_digest,
        source_diff_id: Some(ann.source_diff_id),
    }
}
