//! `lazybd convert`: an OCI image -> the same image with lazybd layers.
//!
//! For each layer: fetch the blob, convert it (see [`layer`]), store it at
//! the destination; then write the config with the new diff_ids (each
//! layer's anchor) and the manifest with the lazybd media type and
//! annotations of docs/format.md. Output depends only on the input image,
//! the chunk size and the startup profile.

mod beneath;
pub mod erofs;
pub mod layer;
pub mod registry_store;
pub mod store;
pub mod unpack;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, IsTerminal};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tracing::info;

use crate::oci::layout::LayoutError;
use crate::oci::{
    canonical_json, config_diff_ids, is_manifest_list, layer_compression, pick_platform, OciError,
    ANN_SOURCE_MANIFEST, MEDIA_LAZYBD_LAYER, MEDIA_OCI_CONFIG, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST,
};
use crate::trace::Trace;
pub use layer::{ConvertedLayer, LayerPlan};
pub use registry_store::RegistryStore;
pub use store::{ImageStore, LayoutStore};
pub use unpack::LayerLimits;

#[derive(Debug, Error)]
pub enum ConvertError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error("layer {layer}: {source}")]
    Unpack {
        layer: String,
        #[source]
        source: unpack::UnpackError,
    },
    #[error(transparent)]
    Erofs(#[from] erofs::ErofsError),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// The largest chunk.
    pub chunk_size: u32,
    /// Startup profile: per source layer diff_id, what a container read at
    /// start ([`profile_of`]).
    pub profile: HashMap<String, LayerProfile>,
    /// Scratch space for unpacked layers and images (needs room for a few
    /// uncompressed layers at once).
    pub work_dir: PathBuf,
    /// Layers converted at the same time.
    pub parallel: usize,
    /// Platform to pick from a multi-platform index.
    pub platform: (String, String),
    /// Convert every platform of a multi-platform index (not only
    /// `platform`) and write an index of the results.
    pub all_platforms: bool,
    /// What one layer may cost to unpack; past it the conversion stops.
    pub limits: LayerLimits,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            chunk_size: crate::format::DEFAULT_CHUNK_SIZE,
            profile: HashMap::new(),
            work_dir: std::env::temp_dir(),
            parallel: 2,
            platform: ("linux".into(), "amd64".into()),
            all_platforms: false,
            limits: LayerLimits::default(),
        }
    }
}

/// What a container read of one layer at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerProfile {
    /// Image byte ranges, in the order they were first read.
    pub ranges: Vec<Range<u64>>,
    /// How many of `ranges`, from the first, it read with narrow readahead
    /// ([`LayerTrace::narrow`](crate::trace::LayerTrace::narrow)); `None`:
    /// all of them.
    pub narrow: Option<usize>,
}

/// The startup profile in a trace (a node's, or one recorded for the
/// purpose): per source layer diff_id, its ranges. Layers the trace does not
/// name by diff_id cannot be matched and are left out.
pub fn profile_of(trace: &Trace) -> HashMap<String, LayerProfile> {
    trace
        .layers
        .iter()
        .filter_map(|l| {
            let profile = LayerProfile {
                ranges: l.ranges().collect(),
                narrow: l.narrow,
            };
            Some((l.diff_id.clone()?, profile))
        })
        .collect()
}

/// What a conversion produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Converted {
    /// The manifest written (with `--all-platforms` of an index: the index).
    pub manifest_digest: String,
    pub config_digest: String,
    pub layers: Vec<String>,
    /// `OS/ARCH[/VARIANT]` of a platform of a converted index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// With `--all-platforms` of an index: each platform's conversion.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<Converted>,
}

/// Converts the image `src` names into `dst`: one platform's manifest
/// (`opts.platform` of an index), or with `opts.all_platforms` every
/// platform of an index, written as an index of the converted manifests.
pub fn convert_image(
    src: &dyn ImageStore,
    dst: &dyn ImageStore,
    opts: &ConvertOptions,
) -> Result<Converted, ConvertError> {
    if opts.all_platforms {
        let (bytes, media_type, _) = src.manifest()?;
        if is_index(&bytes, &media_type) {
            return convert_index(src, dst, opts, &bytes);
        }
    }
    let (source_digest, _, manifest) = source_manifest(src, opts)?;
    let (bytes, converted) = convert_manifest(src, dst, &source_digest, &manifest, opts)?;
    let manifest_digest = dst.put_manifest(&bytes)?;
    info!(src = %src.describe(), dst = %dst.describe(), manifest = %manifest_digest, "converted");
    Ok(Converted {
        manifest_digest,
        ..converted
    })
}

/// Every platform of the index `bytes`, each converted and stored by
/// digest, then an index of them under `dst`'s name. Entries without a
/// platform, or `unknown/unknown` (build attestations), are left out.
fn convert_index(
    src: &dyn ImageStore,
    dst: &dyn ImageStore,
    opts: &ConvertOptions,
    bytes: &[u8],
) -> Result<Converted, ConvertError> {
    let parse_err = |e: oci_spec::OciSpecError| {
        ConvertError::Invalid(format!("{}: index: {e}", src.describe()))
    };
    let index = ImageIndex::from_reader(bytes).map_err(parse_err)?;
    let mut entries = Vec::new();
    let mut platforms = Vec::new();
    for entry in index.manifests() {
        let Some(platform) = entry.platform() else {
            continue;
        };
        let (os, arch) = (
            platform.os().to_string(),
            platform.architecture().to_string(),
        );
        if os == "unknown" {
            continue;
        }
        let name = match platform.variant() {
            Some(v) => format!("{os}/{arch}/{v}"),
            None => format!("{os}/{arch}"),
        };
        info!(src = %src.describe(), platform = %name, "converting one platform of the index");
        let digest = entry.digest().to_string();
        let manifest_bytes = src.manifest_by_digest(&digest)?;
        let manifest = ImageManifest::from_reader(&manifest_bytes[..]).map_err(|e| {
            ConvertError::Invalid(format!("{}: manifest {digest}: {e}", src.describe()))
        })?;
        let (converted_bytes, converted) = convert_manifest(src, dst, &digest, &manifest, opts)
            .map_err(|e| ConvertError::Invalid(format!("platform {name}: {e}")))?;
        let converted_digest = dst.put_platform_manifest(&converted_bytes)?;
        entries.push(json!({
            "mediaType": MEDIA_OCI_MANIFEST,
            "digest": converted_digest,
            "size": converted_bytes.len(),
            "platform": serde_json::to_value(platform)
                .map_err(|e| ConvertError::Invalid(e.to_string()))?,
        }));
        platforms.push(Converted {
            manifest_digest: converted_digest,
            platform: Some(name),
            ..converted
        });
    }
    if entries.is_empty() {
        return Err(ConvertError::Invalid(format!(
            "{}: the index names no platform",
            src.describe()
        )));
    }
    let index_json = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_INDEX,
        "manifests": entries,
    });
    let index_bytes =
        canonical_json(&index_json).map_err(|e| ConvertError::Invalid(e.to_string()))?;
    let index_digest = dst.put_index(&index_bytes)?;
    info!(src = %src.describe(), dst = %dst.describe(), index = %index_digest, platforms = platforms.len(), "converted");
    Ok(Converted {
        manifest_digest: index_digest,
        config_digest: String::new(),
        layers: platforms.iter().flat_map(|p| p.layers.clone()).collect(),
        platform: None,
        platforms,
    })
}

/// Converts one image manifest's config and layers into `dst`; returns
/// the converted manifest's bytes (not stored yet) and what was made.
fn convert_manifest(
    src: &dyn ImageStore,
    dst: &dyn ImageStore,
    source_digest: &str,
    manifest: &ImageManifest,
    opts: &ConvertOptions,
) -> Result<(Vec<u8>, Converted), ConvertError> {
    let config_desc = manifest.config();
    let mut config: Value = serde_json::from_slice(&src.blob(config_desc.digest().as_ref())?)
        .map_err(|e| ConvertError::Invalid(format!("{}: image config: {e}", src.describe())))?;
    let diff_ids = config_diff_ids(&config, manifest.layers().len())
        .map_err(|e| ConvertError::Invalid(format!("{}: {e}", src.describe())))?;
    if let Some(stray) = opts.profile.keys().find(|d| !diff_ids.contains(d)) {
        return Err(ConvertError::Invalid(format!(
            "the startup profile names layer {stray}, which {} does not have",
            src.describe()
        )));
    }

    let work = tempfile::Builder::new()
        .prefix("lazybd-convert-")
        .tempdir_in(&opts.work_dir)
        .map_err(|e| ConvertError::Io {
            what: format!("creating a work dir in {}", opts.work_dir.display()),
            source: e,
        })?;
    let progress = Progress::new(manifest.layers());
    let layers = convert_layers(
        src,
        dst,
        manifest.layers(),
        &diff_ids,
        work.path(),
        opts,
        &progress,
    )?;
    progress.finish();

    // A lazybd layer's diff_id is its anchor: containerd names snapshots
    // by chain IDs of diff_ids, so a snapshot's name then commits to its
    // content, and no image can claim it with other bytes (docs/security.md).
    let anchors = layers
        .iter()
        .map(|l| {
            l.annotations
                .index_digest
                .clone()
                .ok_or_else(|| ConvertError::Invalid(format!("layer {} has no anchor", l.digest)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    config["rootfs"]["diff_ids"] = json!(anchors);
    let config_bytes = canonical_json(&config).map_err(|e| ConvertError::Invalid(e.to_string()))?;
    let config_digest = dst.put_blob(&config_bytes)?;
    let manifest_json = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": { "mediaType": MEDIA_OCI_CONFIG, "digest": config_digest, "size": config_bytes.len() },
        "layers": layers.iter().map(|l| json!({
            "mediaType": MEDIA_LAZYBD_LAYER,
            "digest": l.digest,
            "size": l.size,
            "annotations": l.annotations.to_map(),
        })).collect::<Vec<_>>(),
        "annotations": { ANN_SOURCE_MANIFEST: source_digest },
    });
    let manifest_bytes =
        canonical_json(&manifest_json).map_err(|e| ConvertError::Invalid(e.to_string()))?;
    Ok((
        manifest_bytes,
        Converted {
            manifest_digest: String::new(),
            config_digest,
            layers: layers.into_iter().map(|l| l.digest).collect(),
            platform: None,
            platforms: Vec::new(),
        },
    ))
}

/// Copies the image `src` names (for an index, the manifest of
/// `opts.platform`) into `dst` unchanged: its manifest, config and layer
/// blobs, each verified against its digest on the way. `scratch` holds a
/// layer while it is copied.
///
/// `lazybd convert --record-profile` converts its source twice (before and
/// after recording); copying a registry image first downloads it once, and
/// both passes convert the same image even if its tag moves meanwhile.
pub fn copy_image(
    src: &dyn ImageStore,
    dst: &LayoutStore,
    opts: &ConvertOptions,
    scratch: &Path,
) -> Result<(), ConvertError> {
    let (digest, bytes, manifest) = source_manifest(src, opts)?;
    dst.put_blob(&src.blob(manifest.config().digest().as_ref())?)?;
    for (i, layer) in manifest.layers().iter().enumerate() {
        let file = scratch.join(format!("copy-{i}.blob"));
        src.blob_to_file(layer.digest().as_ref(), layer.size(), &file)?;
        dst.put_blob_file(layer.digest().as_ref(), &file)?;
        // Moved into the layout, or copied when that is another filesystem.
        let _ = std::fs::remove_file(&file);
    }
    let copied = dst.put_manifest(&bytes)?;
    if copied != digest {
        return Err(ConvertError::Invalid(format!(
            "{}: manifest {digest} was stored as {copied}",
            src.describe()
        )));
    }
    info!(src = %src.describe(), dst = %dst.describe(), manifest = %digest, "copied");
    Ok(())
}

/// The config of the image `src` names (for an index, `opts.platform`'s):
/// what runs in it (entrypoint, env, user, ...).
pub fn source_config(src: &dyn ImageStore, opts: &ConvertOptions) -> Result<Value, ConvertError> {
    let (_, _, manifest) = source_manifest(src, opts)?;
    serde_json::from_slice(&src.blob(manifest.config().digest().as_ref())?)
        .map_err(|e| ConvertError::Invalid(format!("{}: image config: {e}", src.describe())))
}

/// The EROFS image of every layer of `src` (for an index, `opts.platform`'s)
/// as conversion builds it, in manifest order: `(diff_id, work/<i>/image.erofs)`.
/// `lazybd check --against` compares them with what a converted image's
/// blobs hold.
pub fn layer_images(
    src: &dyn ImageStore,
    opts: &ConvertOptions,
    work: &Path,
) -> Result<Vec<(String, PathBuf)>, ConvertError> {
    let (_, _, manifest) = source_manifest(src, opts)?;
    let mut out = Vec::new();
    for (i, desc) in manifest.layers().iter().enumerate() {
        let media_type = desc.media_type().to_string();
        let digest = desc.digest().to_string();
        let compression = layer_compression(&media_type).ok_or_else(|| {
            ConvertError::Invalid(format!(
                "layer {digest}: unsupported media type {media_type:?}"
            ))
        })?;
        let dir = work.join(i.to_string());
        std::fs::create_dir_all(&dir).map_err(|e| ConvertError::Io {
            what: format!("creating {}", dir.display()),
            source: e,
        })?;
        let blob = dir.join("source.blob");
        src.blob_to_file(&digest, desc.size(), &blob)?;
        let (image, diff_id) = layer::build_layer_image(&blob, compression, &dir, &opts.limits)?;
        let _ = std::fs::remove_file(&blob);
        out.push((diff_id, image));
    }
    Ok(out)
}

/// Whether a manifest `bytes` of `media_type` is an index (a manifest list).
fn is_index(bytes: &[u8], media_type: &str) -> bool {
    is_manifest_list(media_type)
        || serde_json::from_slice::<Value>(bytes)
            .ok()
            .is_some_and(|v| v.get("manifests").is_some())
}

/// The image manifest to convert: its digest, bytes and parsed form,
/// choosing the platform from an index.
fn source_manifest(
    src: &dyn ImageStore,
    opts: &ConvertOptions,
) -> Result<(String, Vec<u8>, ImageManifest), ConvertError> {
    let (bytes, media_type, digest) = src.manifest()?;
    let parse_err = |e: oci_spec::OciSpecError| {
        ConvertError::Invalid(format!("{}: manifest: {e}", src.describe()))
    };
    if !is_index(&bytes, &media_type) {
        let manifest = ImageManifest::from_reader(&bytes[..]).map_err(parse_err)?;
        return Ok((digest, bytes, manifest));
    }
    let index = ImageIndex::from_reader(&bytes[..]).map_err(parse_err)?;
    let (os, arch) = &opts.platform;
    let entry = pick_platform(index.manifests(), os, arch).ok_or_else(|| {
        ConvertError::Invalid(format!(
            "{}: the index has no {os}/{arch} manifest",
            src.describe()
        ))
    })?;
    let digest = entry.digest().to_string();
    let bytes = src.manifest_by_digest(&digest)?;
    let manifest = ImageManifest::from_reader(&bytes[..]).map_err(parse_err)?;
    Ok((digest, bytes, manifest))
}

/// Converts the layers, `opts.parallel` at a time, storing each at `dst`.
fn convert_layers(
    src: &dyn ImageStore,
    dst: &dyn ImageStore,
    layers: &[Descriptor],
    diff_ids: &[String],
    work: &Path,
    opts: &ConvertOptions,
    progress: &Progress,
) -> Result<Vec<ConvertedLayer>, ConvertError> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<ConvertedLayer, ConvertError>>>> =
        Mutex::new((0..layers.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..opts.parallel.clamp(1, layers.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= layers.len() {
                    break;
                }
                let r = convert_one(
                    src,
                    dst,
                    &layers[i],
                    &diff_ids[i],
                    &work.join(i.to_string()),
                    opts,
                );
                let failed = r.is_err();
                progress.layer_done(i, &layers[i], &r);
                results.lock().expect("no panics while holding the lock")[i] = Some(r);
                if failed {
                    // Stop handing out layers; the first error is reported.
                    next.store(layers.len(), Ordering::Relaxed);
                }
            });
        }
    });
    results
        .into_inner()
        .expect("threads joined")
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(ConvertError::Invalid(
                    "conversion stopped after an earlier error".into(),
                ))
            })
        })
        .collect()
}

fn convert_one(
    src: &dyn ImageStore,
    dst: &dyn ImageStore,
    desc: &Descriptor,
    diff_id: &str,
    work: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertedLayer, ConvertError> {
    let media_type = desc.media_type().to_string();
    let digest = desc.digest().to_string();
    let compression = layer_compression(&media_type).ok_or_else(|| {
        let hint = if media_type == MEDIA_LAZYBD_LAYER {
            " (the image is already converted)"
        } else {
            ""
        };
        ConvertError::Invalid(format!(
            "layer {digest}: unsupported media type {media_type:?}{hint}"
        ))
    })?;
    std::fs::create_dir_all(work).map_err(|e| ConvertError::Io {
        what: format!("creating {}", work.display()),
        source: e,
    })?;
    // A compressed layer is not larger than the uncompressed limit (an
    // uncompressed one is exactly its tar): refused before it is fetched.
    if desc.size() > opts.limits.max_bytes {
        return Err(ConvertError::Unpack {
            layer: digest,
            source: unpack::UnpackError::TooLarge {
                what: "bytes",
                flag: "size",
                limit: opts.limits.max_bytes,
            },
        });
    }
    let blob = work.join("source.blob");
    src.blob_to_file(&digest, desc.size(), &blob)?;
    let converted = layer::convert_layer(&blob, compression, work, &opts.limits, |diff_id| {
        LayerPlan {
            chunk_size: opts.chunk_size,
            profile: opts.profile.get(diff_id),
        }
    })?;
    std::fs::remove_file(&blob).map_err(|e| ConvertError::Io {
        what: format!("removing {}", blob.display()),
        source: e,
    })?;
    if converted.annotations.source_diff_id != diff_id {
        return Err(ConvertError::Invalid(format!(
            "layer {digest}: uncompressed content hashes to {}, but the config's diff_id is {diff_id}",
            converted.annotations.source_diff_id
        )));
    }
    dst.put_blob_file(&converted.digest, &converted.blob_path)?;
    Ok(converted)
}

/// sha256 digest of a file, streaming.
pub fn file_digest(path: &Path) -> Result<String, ConvertError> {
    let mut f = File::open(path).map_err(|e| ConvertError::Io {
        what: format!("opening {}", path.display()),
        source: e,
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = io::Read::read(&mut f, &mut buf).map_err(|e| ConvertError::Io {
            what: format!("reading {}", path.display()),
            source: e,
        })?;
        if n == 0 {
            return Ok(format!("sha256:{}", hex::encode(h.finalize())));
        }
        h.update(&buf[..n]);
    }
}

/// A progress bar on a terminal; one log line per layer otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    layers: usize,
    done: AtomicUsize,
}

impl Progress {
    /// A bar of the source layers' bytes (a layer counts once converted).
    fn new(layers: &[Descriptor]) -> Self {
        let total: u64 = layers.iter().map(|l| l.size()).sum();
        let bar = io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} converting {binary_bytes}/{binary_total_bytes} of layers \
                     [{elapsed}, {binary_bytes_per_sec}] {msg}",
                )
                .expect("static template"),
            );
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            bar
        });
        Progress {
            bar,
            layers: layers.len(),
            done: AtomicUsize::new(0),
        }
    }

    fn layer_done(&self, i: usize, src: &Descriptor, r: &Result<ConvertedLayer, ConvertError>) {
        let Ok(l) = r else { return };
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        let msg = format!(
            "layer {i} ({done}/{} done): {} ({} B) -> {} ({} B)",
            self.layers,
            src.digest(),
            src.size(),
            l.digest,
            l.size
        );
        match &self.bar {
            Some(bar) => {
                bar.inc(src.size());
                bar.set_message(msg);
            }
            None => info!("{msg}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
