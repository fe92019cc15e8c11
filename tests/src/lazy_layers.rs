//! Building lazybd layers for node-side tests without the converter: a
//! directory tree -> EROFS (mkfs.erofs) -> lazybd blob file, plus sources
//! that can be switched off or made to corrupt data, and leak checks.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use lazybd_blockdev::device::{loopdev, mounts};
use lazybd_blockdev::format::{write_blob, WrittenBlob};
use lazybd_blockdev::layer::LayerSource;
use lazybd_blockdev::source::{ChunkSource, FileSource, SourceError};

/// A layer blob written to a file, with what an attach needs to know.
pub struct BlobFile {
    pub path: PathBuf,
    pub written: WrittenBlob,
    pub digest: String,
}

impl BlobFile {
    /// Builds an EROFS image of `tree` and writes it as a lazybd blob into
    /// `out_dir` with the given chunk size.
    pub fn from_tree(tree: &Path, out_dir: &Path, chunk_size: u32) -> BlobFile {
        let image = out_dir.join("layer.erofs");
        let status = Command::new("mkfs.erofs")
            .args(["--quiet", "-T0"])
            .arg(&image)
            .arg(tree)
            .status()
            .expect("run mkfs.erofs");
        assert!(status.success(), "mkfs.erofs failed");
        Self::from_image(&image, out_dir, chunk_size)
    }

    pub fn from_image(image: &Path, out_dir: &Path, chunk_size: u32) -> BlobFile {
        let path = out_dir.join("layer.blob");
        let input = std::fs::File::open(image).expect("open image");
        let out = std::io::BufWriter::new(std::fs::File::create(&path).expect("create blob"));
        let written =
            write_blob(std::io::BufReader::new(input), out, chunk_size).expect("write blob");
        let digest = format!("sha256:{}", hex(&written.blob_digest));
        BlobFile {
            path,
            written,
            digest,
        }
    }

    pub fn source_with(&self, sources: Vec<std::sync::Arc<dyn ChunkSource>>) -> LayerSource {
        LayerSource {
            digest: self.digest.clone(),
            blob_size: self.written.blob_len,
            index_location: Some((
                self.written.footer.index_offset,
                self.written.footer.index_length,
            )),
            sources,
        }
    }

    pub fn file_source(&self) -> std::sync::Arc<FileSource> {
        std::sync::Arc::new(FileSource::open("file", &self.path).expect("open blob"))
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serves a blob file while `up`; when down, every request fails (or hangs
/// until the fetcher's timeout, with `hang`). With `corrupt`, responses that
/// overlap that blob range come back with one bit flipped inside it.
pub struct ControlledSource {
    inner: FileSource,
    pub up: AtomicBool,
    pub hang: AtomicBool,
    pub corrupt: Option<Range<u64>>,
}

impl ControlledSource {
    pub fn new(blob: &BlobFile, corrupt: Option<Range<u64>>) -> Self {
        ControlledSource {
            inner: FileSource::open("controlled", &blob.path).expect("open blob"),
            up: AtomicBool::new(true),
            hang: AtomicBool::new(false),
            corrupt,
        }
    }
}

#[async_trait]
impl ChunkSource for ControlledSource {
    fn name(&self) -> &str {
        "controlled"
    }

    async fn read_range(&self, range: Range<u64>) -> Result<Bytes, SourceError> {
        if !self.up.load(Ordering::SeqCst) {
            if self.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            return Err(SourceError::Transient(
                "connection refused (source down)".into(),
            ));
        }
        let data = self.inner.read_range(range.clone()).await?;
        match &self.corrupt {
            Some(bad) if range.end > bad.start && range.start < bad.end => {
                let mut v = data.to_vec();
                let from = bad.start.max(range.start) - range.start;
                let to = bad.end.min(range.end) - range.start;
                v[((from + to) / 2) as usize] ^= 0x01;
                Ok(v.into())
            }
            _ => Ok(data),
        }
    }
}

/// Mounts and loop devices under `root`, as `(mounts, loop devices)`.
pub fn leftovers(root: &Path) -> (Vec<PathBuf>, Vec<(u32, PathBuf)>) {
    (
        mounts::mounts_under(root).expect("read mountinfo"),
        loopdev::attached_under(root),
    )
}

/// Every regular file, dir and symlink under `root`, relative, sorted.
pub fn walk(root: &Path) -> Vec<PathBuf> {
    fn go(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            out.push(p.strip_prefix(root).expect("under root").to_owned());
            let meta = std::fs::symlink_metadata(&p).expect("lstat");
            if meta.is_dir() {
                go(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    go(root, root, &mut out);
    out
}

/// Writes an OCI image layout at `dir` whose one manifest lists `layers`
/// (bottom first) with `media_type` and the lazybd annotations, as
/// docs/format.md specifies them.
pub fn write_layout(dir: &Path, layers: &[&BlobFile], media_type: &str) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("create layout");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let put = |bytes: &[u8]| -> (String, usize) {
        let digest = hex(&lazybd_blockdev::format::sha256(bytes));
        std::fs::write(blobs.join(&digest), bytes).unwrap();
        (format!("sha256:{digest}"), bytes.len())
    };
    let diff_ids: Vec<String> = layers.iter().map(|l| format!("\"{}\"", l.digest)).collect();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
        diff_ids.join(",")
    );
    let (config_digest, config_len) = put(config.as_bytes());
    let mut descs = Vec::new();
    for l in layers {
        std::fs::copy(&l.path, blobs.join(l.digest.trim_start_matches("sha256:"))).unwrap();
        let f = &l.written.footer;
        descs.push(format!(
            r#"{{"mediaType":"{media_type}","digest":"{}","size":{},"annotations":{{"dev.lazybd.layer.version":"1","dev.lazybd.layer.index-offset":"{}","dev.lazybd.layer.index-length":"{}"}}}}"#,
            l.digest, l.written.blob_len, f.index_offset, f.index_length
        ));
    }
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{config_len}}},"layers":[{}]}}"#,
        descs.join(",")
    );
    let (m_digest, m_len) = put(manifest.as_bytes());
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{m_digest}","size":{m_len},"annotations":{{"org.opencontainers.image.ref.name":"latest"}}}}]}}"#
    );
    std::fs::write(dir.join("index.json"), index).unwrap();
}
