//! Which lazy layers make up IMAGE, bottom first, and where their bytes are.
//!
//! IMAGE is an OCI image layout directory (`DIR` or `DIR:TAG`), as `lazybd
//! convert` writes. The media type and annotation names are the ones
//! docs/format.md specifies.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use lazybd_blockdev::layer::LayerSource;
use lazybd_blockdev::source::{ChunkSource, FileSource};
use serde::Deserialize;

const LAZYBD_LAYER: &str = "application/vnd.oci.image.layer.v1.erofs+lazybd";
const ANN_INDEX_OFFSET: &str = "dev.lazybd.layer.index-offset";
const ANN_INDEX_LENGTH: &str = "dev.lazybd.layer.index-length";
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Manifests and indexes are small; anything bigger is not one.
const MAX_JSON: u64 = 4 << 20;

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Deserialize)]
struct ImageIndex {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    layers: Vec<Descriptor>,
}

pub fn resolve(image: &str) -> Result<Vec<LayerSource>> {
    let (dir, tag) = split_layout_ref(image)
        .with_context(|| format!("{image}: not an OCI image layout directory (DIR or DIR:TAG)"))?;
    let index: ImageIndex = read_json(&dir.join("index.json"))?;
    let manifest_desc = pick_manifest(&index.manifests, tag.as_deref())
        .with_context(|| format!("{image}: choosing the manifest"))?;
    let manifest: Manifest = read_json(&blob_path(&dir, &manifest_desc.digest)?)?;
    if manifest.layers.is_empty() {
        bail!("{image}: the image has no layers");
    }
    manifest
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            if l.media_type != LAZYBD_LAYER {
                bail!(
                    "{image} is not a lazybd image: layer {i} ({}) has media type {:?}, \
                     not {LAZYBD_LAYER:?}; convert it first with `lazybd convert`",
                    l.digest,
                    l.media_type
                );
            }
            let path = blob_path(&dir, &l.digest)?;
            let source: Arc<dyn ChunkSource> = Arc::new(
                FileSource::open("layout", &path)
                    .with_context(|| format!("opening layer blob {}", path.display()))?,
            );
            Ok(LayerSource {
                digest: l.digest.clone(),
                blob_size: l.size,
                index_location: index_location(&l.annotations)
                    .with_context(|| format!("layer {}: annotations", l.digest))?,
                sources: vec![source],
            })
        })
        .collect()
}

fn split_layout_ref(image: &str) -> Option<(PathBuf, Option<String>)> {
    let is_layout = |p: &Path| p.join("oci-layout").is_file();
    if is_layout(Path::new(image)) {
        return Some((image.into(), None));
    }
    let (dir, tag) = image.rsplit_once(':')?;
    is_layout(Path::new(dir)).then(|| (dir.into(), Some(tag.to_owned())))
}

fn pick_manifest<'a>(manifests: &'a [Descriptor], tag: Option<&str>) -> Result<&'a Descriptor> {
    match tag {
        Some(tag) => manifests
            .iter()
            .find(|m| m.annotations.get(REF_NAME).map(String::as_str) == Some(tag))
            .with_context(|| format!("no manifest tagged {tag:?}")),
        None => match manifests {
            [one] => Ok(one),
            [] => bail!("index.json lists no manifests"),
            _ => bail!(
                "index.json lists {} manifests: name one as DIR:TAG",
                manifests.len()
            ),
        },
    }
}

fn index_location(ann: &HashMap<String, String>) -> Result<Option<(u64, u64)>> {
    match (ann.get(ANN_INDEX_OFFSET), ann.get(ANN_INDEX_LENGTH)) {
        (Some(o), Some(l)) => Ok(Some((
            o.parse()
                .with_context(|| format!("{ANN_INDEX_OFFSET}={o:?}"))?,
            l.parse()
                .with_context(|| format!("{ANN_INDEX_LENGTH}={l:?}"))?,
        ))),
        _ => Ok(None),
    }
}

fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf> {
    let (algo, hex) = digest
        .split_once(':')
        .with_context(|| format!("bad digest {digest:?}"))?;
    let safe = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
    if !safe(algo) || !safe(hex) {
        bail!("bad digest {digest:?}");
    }
    Ok(dir.join("blobs").join(algo).join(hex))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > MAX_JSON {
        bail!(
            "{}: {len} bytes is too large for image metadata",
            path.display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}
