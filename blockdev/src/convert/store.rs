//! Where the converter reads images from and writes them to.

use std::path::Path;

use super::ConvertError;
use crate::oci::digest_of;
use crate::oci::layout::{LayoutError, OciLayout};

/// A place holding one named image: an OCI layout tag or a registry reference.
pub trait ImageStore: Send + Sync {
    /// For messages: `oci:DIR:TAG` or `host/repo:tag`.
    fn describe(&self) -> String;
    /// The named manifest (or index): bytes, media type, digest.
    fn manifest(&self) -> Result<(Vec<u8>, String, String), ConvertError>;
    /// A manifest of this repository by digest (for an index's entries).
    fn manifest_by_digest(&self, digest: &str) -> Result<Vec<u8>, ConvertError>;
    /// A small blob (config), digest verified.
    fn blob(&self, digest: &str) -> Result<Vec<u8>, ConvertError>;
    /// A large blob of `size` bytes (its descriptor's) into `path`, digest
    /// verified; a source may refuse to send more than `size`.
    fn blob_to_file(&self, digest: &str, size: u64, path: &Path) -> Result<(), ConvertError>;
    fn put_blob(&self, bytes: &[u8]) -> Result<String, ConvertError>;
    /// Stores a file whose digest the caller computed; the file may be moved.
    fn put_blob_file(&self, digest: &str, path: &Path) -> Result<(), ConvertError>;
    /// Stores an OCI image manifest under the store's name; returns its digest.
    fn put_manifest(&self, bytes: &[u8]) -> Result<String, ConvertError>;
    /// Stores an OCI image manifest by its digest only (an entry of an
    /// index stored next); returns its digest.
    fn put_platform_manifest(&self, bytes: &[u8]) -> Result<String, ConvertError>;
    /// Stores an OCI image index under the store's name; returns its digest.
    fn put_index(&self, bytes: &[u8]) -> Result<String, ConvertError>;
}

pub struct LayoutStore {
    layout: OciLayout,
    tag: Option<String>,
}

impl LayoutStore {
    pub fn open(dir: &Path, tag: Option<String>) -> Result<Self, ConvertError> {
        Ok(LayoutStore {
            layout: OciLayout::open(dir)?,
            tag,
        })
    }

    pub fn create(dir: &Path, tag: Option<String>) -> Result<Self, ConvertError> {
        Ok(LayoutStore {
            layout: OciLayout::open_or_create(dir)?,
            tag,
        })
    }
}

impl LayoutStore {
    /// Stores `bytes` and tags them as this store's image.
    fn put_tagged(
        &self,
        bytes: &[u8],
        media_type: oci_spec::image::MediaType,
    ) -> Result<String, ConvertError> {
        let digest = self.layout.put_blob(bytes)?;
        debug_assert_eq!(digest, digest_of(bytes));
        let desc = oci_spec::image::Descriptor::new(
            media_type,
            bytes.len() as u64,
            digest
                .parse::<oci_spec::image::Digest>()
                .map_err(|e| ConvertError::Invalid(e.to_string()))?,
        );
        self.layout
            .tag(self.tag.as_deref().unwrap_or("latest"), &desc)?;
        Ok(digest)
    }
}

impl ImageStore for LayoutStore {
    fn describe(&self) -> String {
        match &self.tag {
            Some(t) => format!("oci:{}:{t}", self.layout.dir().display()),
            None => format!("oci:{}", self.layout.dir().display()),
        }
    }

    fn manifest(&self) -> Result<(Vec<u8>, String, String), ConvertError> {
        let desc = self.layout.resolve(self.tag.as_deref())?;
        let digest = desc.digest().to_string();
        Ok((
            self.layout.read_blob(&digest)?,
            desc.media_type().to_string(),
            digest,
        ))
    }

    fn manifest_by_digest(&self, digest: &str) -> Result<Vec<u8>, ConvertError> {
        Ok(self.layout.read_blob(digest)?)
    }

    fn blob(&self, digest: &str) -> Result<Vec<u8>, ConvertError> {
        Ok(self.layout.read_blob(digest)?)
    }

    fn blob_to_file(&self, digest: &str, _size: u64, path: &Path) -> Result<(), ConvertError> {
        let src = self.layout.blob_path(digest)?;
        let actual = super::file_digest(&src)?;
        if actual != digest {
            return Err(LayoutError::DigestMismatch {
                dir: self.layout.dir().into(),
                digest: digest.into(),
                actual,
            }
            .into());
        }
        // A hard link avoids copying large layers; fall back to a copy.
        if std::fs::hard_link(&src, path).is_err() {
            std::fs::copy(&src, path).map_err(|e| ConvertError::Io {
                what: format!("copying {}", src.display()),
                source: e,
            })?;
        }
        Ok(())
    }

    fn put_blob(&self, bytes: &[u8]) -> Result<String, ConvertError> {
        Ok(self.layout.put_blob(bytes)?)
    }

    fn put_blob_file(&self, digest: &str, path: &Path) -> Result<(), ConvertError> {
        Ok(self.layout.put_blob_file(path, digest)?)
    }

    fn put_manifest(&self, bytes: &[u8]) -> Result<String, ConvertError> {
        self.put_tagged(bytes, oci_spec::image::MediaType::ImageManifest)
    }

    fn put_platform_manifest(&self, bytes: &[u8]) -> Result<String, ConvertError> {
        Ok(self.layout.put_blob(bytes)?)
    }

    fn put_index(&self, bytes: &[u8]) -> Result<String, ConvertError> {
        self.put_tagged(bytes, oci_spec::image::MediaType::ImageIndex)
    }
}
