//! OCI image vocabulary shared by the converter, `lazybd mount`, `inspect`
//! and the snapshotter: media types, the lazybd annotations of docs/format.md,
//! digests, the OCI image layout on disk, and containerd's remote-snapshot
//! labels.

mod identity;
pub mod labels;
pub mod layout;

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use thiserror::Error;

pub use identity::LayerId;
pub use layout::OciLayout;

pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The media type of a lazybd layer (see docs/format.md for why it has the
/// OCI layer prefix).
pub const MEDIA_LAZYBD_LAYER: &str = "application/vnd.oci.image.layer.v1.erofs+lazybd";

/// Layer descriptor annotations of format versions 2 and 3. Under
/// `containerd.io/snapshot/`, so containerd's unpacker hands them to the
/// snapshotter's Prepare as labels on every pull path (as eStargz does with
/// its TOC digest): Prepare needs no manifest fetch, and gets the anchor from
/// the same manifest the image's config and chain IDs come from.
pub const ANN_PREFIX: &str = "containerd.io/snapshot/lazybd.";
pub const ANN_VERSION: &str = "containerd.io/snapshot/lazybd.version";
/// The layer's content anchor: `sha256:` + the sha256 of its index.
pub const ANN_INDEX_DIGEST: &str = "containerd.io/snapshot/lazybd.index-digest";
pub const ANN_INDEX_OFFSET: &str = "containerd.io/snapshot/lazybd.index-offset";
pub const ANN_INDEX_LENGTH: &str = "containerd.io/snapshot/lazybd.index-length";
pub const ANN_IMAGE_SIZE: &str = "containerd.io/snapshot/lazybd.image-size";
pub const ANN_CHUNK_SIZE: &str = "containerd.io/snapshot/lazybd.chunk-size";
pub const ANN_SOURCE_DIFF_ID: &str = "containerd.io/snapshot/lazybd.source-diff-id";

/// The version 1 keys, still read (such layers have no anchor).
pub mod v1 {
    pub const ANN_VERSION: &str = "dev.lazybd.layer.version";
    pub const ANN_SOURCE_DIFF_ID: &str = "dev.lazybd.layer.source-diff-id";
    pub const ANN_INDEX_OFFSET: &str = "dev.lazybd.layer.index-offset";
    pub const ANN_INDEX_LENGTH: &str = "dev.lazybd.layer.index-length";
    pub const ANN_IMAGE_SIZE: &str = "dev.lazybd.layer.image-size";
    pub const ANN_CHUNK_SIZE: &str = "dev.lazybd.layer.chunk-size";
}

pub const ANN_SOURCE_MANIFEST: &str = "dev.lazybd.image.source-manifest";
pub const ANN_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Manifests, indexes and configs are small; anything bigger is not one.
pub const MAX_METADATA_LEN: u64 = 4 << 20;

#[derive(Debug, Error)]
pub enum OciError {
    #[error("bad digest {0:?}: want sha256:<64 hex digits>")]
    BadDigest(String),
    #[error("layer annotation {key}={value:?} is not a number")]
    BadAnnotation { key: &'static str, value: String },
    #[error("layer annotation {0} is missing")]
    MissingAnnotation(&'static str),
    #[error("the image config lists {found} diff_ids for {layers} layers")]
    DiffIdCount { found: usize, layers: usize },
}

/// Compression of a source layer, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

/// Classifies an OCI or Docker layer media type; `None` if it is not a tar layer
/// this converter reads (e.g. already a lazybd layer, or foreign).
pub fn layer_compression(media_type: &str) -> Option<LayerCompression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Some(LayerCompression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(LayerCompression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(LayerCompression::Zstd),
        _ => None,
    }
}

pub fn is_manifest_list(media_type: &str) -> bool {
    media_type == MEDIA_OCI_INDEX || media_type == MEDIA_DOCKER_LIST
}

/// The `rootfs.diff_ids` of an image config, which must name `layers` layers.
pub fn config_diff_ids(config: &serde_json::Value, layers: usize) -> Result<Vec<String>, OciError> {
    let ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if ids.len() != layers {
        return Err(OciError::DiffIdCount {
            found: ids.len(),
            layers,
        });
    }
    Ok(ids)
}

/// The entry of a multi-platform index for `os`/`arch`.
pub fn pick_platform<'a>(
    manifests: &'a [oci_spec::image::Descriptor],
    os: &str,
    arch: &str,
) -> Option<&'a oci_spec::image::Descriptor> {
    manifests.iter().find(|m| {
        m.platform()
            .as_ref()
            .is_some_and(|p| p.os().to_string() == os && p.architecture().to_string() == arch)
    })
}

/// `sha256:<hex>` of `data`.
pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(crate::format::sha256(data)))
}

/// The one digest rule of lazybd: `sha256:` and 64 lowercase hex digits (the
/// only algorithm lazybd writes or accepts). Returns the hex part, which is
/// safe to use as a file name or URL path segment.
pub fn digest_hex(digest: &str) -> Result<&str, OciError> {
    match digest.split_once(':') {
        Some(("sha256", hex))
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(hex)
        }
        _ => Err(OciError::BadDigest(digest.to_owned())),
    }
}

/// Whether `digest` passes [`digest_hex`].
pub fn valid_digest(digest: &str) -> bool {
    digest_hex(digest).is_ok()
}

/// What a lazybd layer descriptor says about its blob (docs/format.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LazyLayerAnnotations {
    pub version: u32,
    /// `sha256:<hex>` of the layer's index; `None` for version 1 layers,
    /// which have no anchor.
    pub index_digest: Option<String>,
    pub source_diff_id: String,
    pub index_offset: u64,
    pub index_length: u64,
    pub image_size: u64,
    pub chunk_size: u32,
}

impl LazyLayerAnnotations {
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut map = BTreeMap::from([
            (ANN_VERSION.to_owned(), self.version.to_string()),
            (ANN_SOURCE_DIFF_ID.to_owned(), self.source_diff_id.clone()),
            (ANN_INDEX_OFFSET.to_owned(), self.index_offset.to_string()),
            (ANN_INDEX_LENGTH.to_owned(), self.index_length.to_string()),
            (ANN_IMAGE_SIZE.to_owned(), self.image_size.to_string()),
            (ANN_CHUNK_SIZE.to_owned(), self.chunk_size.to_string()),
        ]);
        if let Some(d) = &self.index_digest {
            map.insert(ANN_INDEX_DIGEST.to_owned(), d.clone());
        }
        map
    }

    /// Reads version 2 and 3 annotations (or labels: containerd passes them to
    /// Prepare under the same keys), else version 1 ones.
    pub fn from_map(map: &HashMap<String, String>) -> Result<Self, OciError> {
        if map.contains_key(ANN_VERSION) {
            let version: u32 = num(map, ANN_VERSION)?;
            let index_digest = text(map, ANN_INDEX_DIGEST)?;
            digest_hex(&index_digest)?;
            return Ok(LazyLayerAnnotations {
                version,
                index_digest: Some(index_digest),
                source_diff_id: text(map, ANN_SOURCE_DIFF_ID)?,
                index_offset: num(map, ANN_INDEX_OFFSET)?,
                index_length: num(map, ANN_INDEX_LENGTH)?,
                image_size: num(map, ANN_IMAGE_SIZE)?,
                chunk_size: num(map, ANN_CHUNK_SIZE)?,
            });
        }
        Ok(LazyLayerAnnotations {
            version: crate::format::FORMAT_V1,
            index_digest: None,
            source_diff_id: text(map, v1::ANN_SOURCE_DIFF_ID)?,
            index_offset: num(map, v1::ANN_INDEX_OFFSET)?,
            index_length: num(map, v1::ANN_INDEX_LENGTH)?,
            image_size: num(map, v1::ANN_IMAGE_SIZE)?,
            chunk_size: num(map, v1::ANN_CHUNK_SIZE)?,
        })
    }

    /// The blob size the annotations imply (`index_offset + index_length +`
    /// the footer, docs/format.md): what Prepare uses when containerd passed
    /// the annotations as labels and the manifest (with the descriptor's
    /// size) is not fetched. A wrong value only fails the tail's checks.
    pub fn blob_size(&self) -> Option<u64> {
        self.index_offset
            .checked_add(self.index_length)?
            .checked_add(crate::format::FOOTER_LEN)
    }

    /// The layer's diff_id in its image config: the anchor (version 2 on), or
    /// the blob digest `blob_digest` (version 1 images used it).
    pub fn diff_id<'a>(&'a self, blob_digest: &'a str) -> &'a str {
        self.index_digest.as_deref().unwrap_or(blob_digest)
    }
}

fn text(map: &HashMap<String, String>, key: &'static str) -> Result<String, OciError> {
    map.get(key)
        .cloned()
        .ok_or(OciError::MissingAnnotation(key))
}

fn num<T: std::str::FromStr>(
    map: &HashMap<String, String>,
    key: &'static str,
) -> Result<T, OciError> {
    let value = map.get(key).ok_or(OciError::MissingAnnotation(key))?;
    value.parse().map_err(|_| OciError::BadAnnotation {
        key,
        value: value.clone(),
    })
}

/// The chain ID containerd names a layer's snapshot by: the diff_id for the
/// bottom layer, else `sha256(parent_chain + " " + diff_id)` (the OCI image
/// spec's ChainID). A lazybd layer's diff_id is its anchor, so a snapshot's
/// name commits to the content of every layer below and in it.
pub fn chain_id(parent: Option<&str>, diff_id: &str) -> String {
    match parent {
        None => diff_id.to_owned(),
        Some(p) => digest_of(format!("{p} {diff_id}").as_bytes()),
    }
}

/// Serializes JSON with sorted object keys, so equal documents are equal
/// bytes (and digests): serde_json's default `Map` is a BTreeMap.
pub fn canonical_json<T: Serialize>(value: &T) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&serde_json::to_value(value)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_round_trip() {
        let a = LazyLayerAnnotations {
            version: 2,
            index_digest: Some(digest_of(b"index")),
            source_diff_id: digest_of(b"x"),
            index_offset: 10,
            index_length: 112,
            image_size: 4096,
            chunk_size: 1 << 20,
        };
        let map: HashMap<_, _> = a.to_map().into_iter().collect();
        assert_eq!(LazyLayerAnnotations::from_map(&map).unwrap(), a);
        let mut bad = map.clone();
        bad.insert(ANN_INDEX_OFFSET.into(), "ten".into());
        assert!(matches!(
            LazyLayerAnnotations::from_map(&bad),
            Err(OciError::BadAnnotation {
                key: ANN_INDEX_OFFSET,
                ..
            })
        ));
        bad.remove(ANN_CHUNK_SIZE);
        assert!(LazyLayerAnnotations::from_map(&bad).is_err());
        let mut no_anchor = map.clone();
        no_anchor.insert(ANN_INDEX_DIGEST.into(), "sha256:../../x".into());
        assert!(matches!(
            LazyLayerAnnotations::from_map(&no_anchor),
            Err(OciError::BadDigest(_))
        ));
        no_anchor.remove(ANN_INDEX_DIGEST);
        assert!(matches!(
            LazyLayerAnnotations::from_map(&no_anchor),
            Err(OciError::MissingAnnotation(ANN_INDEX_DIGEST))
        ));
    }

    #[test]
    fn version_1_annotations_are_read_without_an_anchor() {
        let map: HashMap<String, String> = [
            (v1::ANN_VERSION, "1"),
            (v1::ANN_SOURCE_DIFF_ID, "sha256:ab"),
            (v1::ANN_INDEX_OFFSET, "10"),
            (v1::ANN_INDEX_LENGTH, "112"),
            (v1::ANN_IMAGE_SIZE, "4096"),
            (v1::ANN_CHUNK_SIZE, "4096"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let a = LazyLayerAnnotations::from_map(&map).unwrap();
        assert_eq!((a.version, a.index_digest, a.index_offset), (1, None, 10));
    }

    #[test]
    fn chain_ids_are_the_oci_specs() {
        // The python benchmark image's two layers; containerd's
        // identity.ChainID gives the same value.
        let a = "sha256:83c89739708081d16c1ab5e49050e98aca28b4aebba4abb43b2c07b14e394ce8";
        let b = "sha256:ed6c75e3345db7af6b001e8eee9e62a3f78bfb9e9cf90d0445dd38a64ffdc3a2";
        assert_eq!(chain_id(None, a), a);
        assert_eq!(
            chain_id(Some(a), b),
            "sha256:e186917cafe14766286a984162b1be13de207828397564bb45f35c5ece09509b"
        );
    }

    #[test]
    fn digests_are_checked() {
        assert!(digest_hex(&digest_of(b"")).is_ok());
        assert!(valid_digest(&format!("sha256:{}", "a".repeat(64))));
        for bad in [
            "sha256:../../etc",
            "md5:abc",
            "sha256:ABCD",
            "",
            "sha256:",
            "sha256",
            &format!("sha256:{}", "AB".repeat(32)),
            &format!("sha512:{}", "ab".repeat(32)),
            &format!("sha256:{}", "ab".repeat(16)),
        ] {
            assert!(digest_hex(bad).is_err(), "{bad}");
            assert!(!valid_digest(bad), "{bad}");
        }
    }

    #[test]
    fn media_types() {
        assert_eq!(
            layer_compression("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(LayerCompression::Gzip)
        );
        assert_eq!(layer_compression(MEDIA_LAZYBD_LAYER), None);
    }
}
