//! An image named on the command line, opened for reading lazily: its
//! manifest and, for each layer, where the blob's bytes can be read.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use lazybd_blockdev::layer::LayerSource;
use lazybd_blockdev::oci::{
    is_manifest_list, LazyLayerAnnotations, OciLayout, MAX_METADATA_LEN, MEDIA_LAZYBD_LAYER,
};
use lazybd_blockdev::registry::RegistryClient;
use lazybd_blockdev::source::{ChunkSource, FileSource, RegistrySource};
use oci_spec::image::ImageManifest;

use crate::image_ref::ImageRef;
use crate::registry_args::RegistryArgs;

pub struct OpenImage {
    pub manifest: ImageManifest,
    /// One per manifest layer, in manifest order.
    pub sources: Vec<Arc<dyn ChunkSource>>,
    /// The registry client, for images read from a registry (P2P sources
    /// forward its repository and credentials).
    pub registry: Option<Arc<RegistryClient>>,
}

impl OpenImage {
    pub async fn open(name: &str, registry: &RegistryArgs) -> Result<Self> {
        match ImageRef::parse(name) {
            ImageRef::Layout { dir, tag } => {
                let layout = OciLayout::open(&dir)?;
                let desc = layout.resolve(tag.as_deref())?;
                if desc.size() > MAX_METADATA_LEN {
                    bail!("{name}: a manifest of {} bytes is too large", desc.size());
                }
                let manifest =
                    ImageManifest::from_reader(&layout.read_blob(desc.digest().as_ref())?[..])
                        .with_context(|| format!("{name}: parsing the manifest"))?;
                let mut sources: Vec<Arc<dyn ChunkSource>> = Vec::new();
                for l in manifest.layers() {
                    let path = layout.blob_path(l.digest().as_ref())?;
                    sources.push(Arc::new(
                        FileSource::open("layout", &path)
                            .with_context(|| format!("opening {}", path.display()))?,
                    ));
                }
                Ok(OpenImage {
                    manifest,
                    sources,
                    registry: None,
                })
            }
            ImageRef::Registry(reference) => {
                let client = Arc::new(RegistryClient::new(&reference, &registry.options())?);
                let raw = client.manifest().await?;
                if is_manifest_list(&raw.media_type) {
                    bail!(
                        "{reference} is a multi-platform index; name the platform's \
                         manifest by digest (REPO@sha256:...)"
                    );
                }
                let manifest = ImageManifest::from_reader(&raw.bytes[..])
                    .with_context(|| format!("{reference}: parsing the manifest"))?;
                let sources = manifest
                    .layers()
                    .iter()
                    .map(|l| {
                        Arc::new(RegistrySource::new(client.clone(), l.digest().as_ref()))
                            as Arc<dyn ChunkSource>
                    })
                    .collect();
                Ok(OpenImage {
                    manifest,
                    sources,
                    registry: Some(client),
                })
            }
        }
    }

    /// The image's layers as lazy layers, bottom first, each bound to its
    /// anchor from the manifest; an error names the first layer that is not
    /// a lazybd layer, or that has no anchor (version 1) unless
    /// `allow_unanchored`.
    pub fn lazy_layers(&self, name: &str, allow_unanchored: bool) -> Result<Vec<LayerSource>> {
        if self.manifest.layers().is_empty() {
            bail!("{name}: the image has no layers");
        }
        self.manifest
            .layers()
            .iter()
            .zip(&self.sources)
            .enumerate()
            .map(|(i, (l, source))| {
                if l.media_type().to_string() != MEDIA_LAZYBD_LAYER {
                    bail!(
                        "{name} is not a lazybd image: layer {i} ({}) has media type {}, \
                         not {MEDIA_LAZYBD_LAYER}; convert it first with `lazybd convert`",
                        l.digest(),
                        l.media_type()
                    );
                }
                let ann = LazyLayerAnnotations::from_map(
                    l.annotations().as_ref().unwrap_or(&Default::default()),
                )
                .with_context(|| format!("layer {}", l.digest()))?;
                if ann.index_digest.is_none() && !allow_unanchored {
                    bail!(
                        "{name}: layer {i} ({}) is a version 1 lazybd layer without a content \
                         anchor: nothing ties the bytes served for it to this image. Mount it \
                         only if you trust every source of it, with --allow-unanchored \
                         (docs/security.md), or convert the image again",
                        l.digest()
                    );
                }
                Ok(LayerSource {
                    digest: l.digest().to_string(),
                    anchor: ann.index_digest,
                    blob_size: l.size(),
                    index_location: Some((ann.index_offset, ann.index_length)),
                    sources: vec![source.clone()],
                    diff_id: Some(ann.source_diff_id),
                })
            })
            .collect()
    }
}
