//! An OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/`).

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageIndex, ImageIndexBuilder};
use thiserror::Error;

use super::{canonical_json, digest_hex, digest_of, OciError, ANN_REF_NAME, MAX_METADATA_LEN};

#[derive(Debug, Error)]
pub enum LayoutError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}: not an OCI image layout (no oci-layout file)")]
    NotALayout(PathBuf),
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {len} bytes is too large for image metadata")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("blob {digest} in {dir}: content hashes to {actual}")]
    DigestMismatch {
        dir: PathBuf,
        digest: String,
        actual: String,
    },
    #[error("{dir}: no manifest tagged {tag:?}")]
    NoSuchTag { dir: PathBuf, tag: String },
    #[error("{dir}: index.json lists {count} manifests; name one as DIR:TAG")]
    Ambiguous { dir: PathBuf, count: usize },
    #[error(transparent)]
    Oci(#[from] OciError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io {
        path: path.to_owned(),
        source,
    }
}

pub struct OciLayout {
    dir: PathBuf,
}

impl OciLayout {
    /// Opens an existing layout.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, LayoutError> {
        let dir = dir.into();
        if !dir.join("oci-layout").is_file() {
            return Err(LayoutError::NotALayout(dir));
        }
        Ok(OciLayout { dir })
    }

    /// Opens a layout, creating an empty one if `dir` has none.
    pub fn open_or_create(dir: impl Into<PathBuf>) -> Result<Self, LayoutError> {
        let dir = dir.into();
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let marker = dir.join("oci-layout");
        if !marker.is_file() {
            write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = dir.join("index.json");
        if !index.is_file() {
            write_atomic(&index, br#"{"manifests":[],"schemaVersion":2}"#)?;
        }
        Ok(OciLayout { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn index(&self) -> Result<ImageIndex, LayoutError> {
        let path = self.dir.join("index.json");
        let bytes = read_limited(&path)?;
        serde_json::from_slice(&bytes).map_err(|source| LayoutError::Json { path, source })
    }

    /// The manifest descriptor tagged `tag`, or the only one when `tag` is None.
    pub fn resolve(&self, tag: Option<&str>) -> Result<Descriptor, LayoutError> {
        let index = self.index()?;
        let manifests = index.manifests();
        match tag {
            Some(tag) => manifests
                .iter()
                .find(|m| ref_name(m) == Some(tag))
                .cloned()
                .ok_or_else(|| LayoutError::NoSuchTag {
                    dir: self.dir.clone(),
                    tag: tag.to_owned(),
                }),
            None => match manifests.as_slice() {
                [one] => Ok(one.clone()),
                _ => Err(LayoutError::Ambiguous {
                    dir: self.dir.clone(),
                    count: manifests.len(),
                }),
            },
        }
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, LayoutError> {
        Ok(self.dir.join("blobs/sha256").join(digest_hex(digest)?))
    }

    pub fn has_blob(&self, digest: &str) -> Result<bool, LayoutError> {
        Ok(self.blob_path(digest)?.is_file())
    }

    /// Reads a small (metadata) blob and checks its digest.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>, LayoutError> {
        let bytes = read_limited(&self.blob_path(digest)?)?;
        let actual = digest_of(&bytes);
        if actual != digest {
            return Err(LayoutError::DigestMismatch {
                dir: self.dir.clone(),
                digest: digest.to_owned(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Stores `bytes` as a blob; returns its digest.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String, LayoutError> {
        let digest = digest_of(bytes);
        let path = self.blob_path(&digest)?;
        if !path.is_file() {
            write_atomic(&path, bytes)?;
        }
        Ok(digest)
    }

    /// Moves (or copies across filesystems) a file whose digest the caller
    /// computed while writing it into the blob store.
    pub fn put_blob_file(&self, file: &Path, digest: &str) -> Result<(), LayoutError> {
        let path = self.blob_path(digest)?;
        if path.is_file() {
            return Ok(());
        }
        if fs::rename(file, &path).is_err() {
            let tmp = path.with_extension("tmp");
            fs::copy(file, &tmp).map_err(io_err(&tmp))?;
            fs::rename(&tmp, &path).map_err(io_err(&path))?;
        }
        Ok(())
    }

    /// Points `tag` at `manifest` in index.json, replacing what it named before.
    pub fn tag(&self, tag: &str, manifest: &Descriptor) -> Result<(), LayoutError> {
        let mut manifests: Vec<Descriptor> = self
            .index()?
            .manifests()
            .iter()
            .filter(|m| ref_name(m) != Some(tag))
            .cloned()
            .collect();
        let mut desc = manifest.clone();
        let mut ann: HashMap<String, String> = desc.annotations().clone().unwrap_or_default();
        ann.insert(ANN_REF_NAME.to_owned(), tag.to_owned());
        desc.set_annotations(Some(ann));
        manifests.push(desc);
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(oci_spec::image::MediaType::ImageIndex)
            .manifests(manifests)
            .build()
            .expect("schema_version and manifests are set");
        let path = self.dir.join("index.json");
        let bytes = canonical_json(&index).map_err(|source| LayoutError::Json {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &bytes)
    }
}

pub fn ref_name(desc: &Descriptor) -> Option<&str> {
    desc.annotations()
        .as_ref()?
        .get(ANN_REF_NAME)
        .map(String::as_str)
}

fn read_limited(path: &Path) -> Result<Vec<u8>, LayoutError> {
    let len = fs::metadata(path).map_err(io_err(path))?.len();
    if len > MAX_METADATA_LEN {
        return Err(LayoutError::TooLarge {
            path: path.to_owned(),
            len,
        });
    }
    fs::read(path).map_err(io_err(path))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LayoutError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::MediaType;

    #[test]
    fn tag_resolve_and_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::open_or_create(dir.path().join("img")).unwrap();
        assert!(matches!(
            layout.resolve(None),
            Err(LayoutError::Ambiguous { count: 0, .. })
        ));
        let digest = layout.put_blob(b"{}").unwrap();
        assert_eq!(layout.read_blob(&digest).unwrap(), b"{}");
        let desc = Descriptor::new(
            MediaType::ImageManifest,
            2,
            digest.parse::<oci_spec::image::Digest>().unwrap(),
        );
        layout.tag("v1", &desc).unwrap();
        layout.tag("v1", &desc).unwrap();
        layout.tag("v2", &desc).unwrap();
        assert_eq!(layout.index().unwrap().manifests().len(), 2);
        assert_eq!(
            layout.resolve(Some("v2")).unwrap().digest().to_string(),
            digest
        );
        assert!(matches!(
            layout.resolve(Some("nope")),
            Err(LayoutError::NoSuchTag { .. })
        ));
        assert!(layout.blob_path("sha256:../../x").is_err());
        // A blob whose bytes do not match its name is refused.
        fs::write(layout.blob_path(&digest).unwrap(), b"{ }").unwrap();
        assert!(matches!(
            layout.read_blob(&digest),
            Err(LayoutError::DigestMismatch { .. })
        ));
    }
}
