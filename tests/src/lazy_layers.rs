//! Building lazybd layers for node-side tests without the converter: a
//! directory tree -> EROFS (mkfs.erofs) -> lazybd blob file, plus sources
//! that can be switched off or made to corrupt data, and leak checks.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use lazybd_blockdev::device::{loopdev, mounts};
use lazybd_blockdev::format::{write_blob, write_blob_v1, Layout, WrittenBlob};
use lazybd_blockdev::layer::LayerSource;
use lazybd_blockdev::oci::{canonical_json, LazyLayerAnnotations, OciLayout};
use lazybd_blockdev::source::{Answer, ChunkSource, FileSource, SourceError};
use serde_json::json;

/// The media type of a lazybd layer in a manifest (docs/format.md).
pub const LAZYBD_LAYER: &str = "application/vnd.oci.image.layer.v1.erofs+lazybd";

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
        let image = mkfs_erofs(tree, out_dir);
        Self::from_image(&image, out_dir, chunk_size)
    }

    pub fn from_image(image: &Path, out_dir: &Path, chunk_size: u32) -> BlobFile {
        Self::write(image, out_dir, |input, size, out| {
            let layout = Layout::fixed(size, chunk_size).expect("layout");
            write_blob(input, out, &layout)
        })
    }

    /// A format version 1 blob (fixed chunks, no anchor on its descriptor,
    /// docs/format.md#version-1) of the EROFS image of `tree`, as nodes of
    /// earlier releases were given.
    pub fn from_tree_v1(tree: &Path, out_dir: &Path, chunk_size: u32) -> BlobFile {
        let image = mkfs_erofs(tree, out_dir);
        Self::write(&image, out_dir, |input, size, out| {
            write_blob_v1(input, size, out, chunk_size)
        })
    }

    fn write(
        image: &Path,
        out_dir: &Path,
        write: impl FnOnce(
            &std::fs::File,
            u64,
            std::io::BufWriter<std::fs::File>,
        ) -> std::io::Result<WrittenBlob>,
    ) -> BlobFile {
        let path = out_dir.join("layer.blob");
        let input = std::fs::File::open(image).expect("open image");
        let size = input.metadata().expect("image size").len();
        let out = std::io::BufWriter::new(std::fs::File::create(&path).expect("create blob"));
        let written = write(&input, size, out).expect("write blob");
        let digest = format!("sha256:{}", hex(&written.blob_digest));
        BlobFile {
            path,
            written,
            digest,
        }
    }

    /// What an attacker serves under this blob's digest: a blob of the same
    /// length and index location whose file with content `data` holds
    /// `other` instead, written to `out_dir`. Its tail is self-consistent
    /// (the footer's digest matches its index), so only the anchor tells it
    /// apart. `image` is this blob's EROFS image (`layer.erofs` of
    /// [`from_tree`](Self::from_tree)); `data` is incompressible noise, so
    /// its chunks stay raw and the lengths equal.
    pub fn foreign_twin(
        &self,
        image: &Path,
        data: &[u8],
        other: &[u8],
        out_dir: &Path,
    ) -> BlobFile {
        assert_eq!(data.len(), other.len());
        let mut bytes = std::fs::read(image).unwrap();
        let at: Vec<usize> = bytes
            .windows(64)
            .enumerate()
            .filter(|(_, w)| *w == &data[..64])
            .map(|(i, _)| i)
            .collect();
        assert_eq!(at.len(), 1, "the file's data must occur once in the image");
        bytes[at[0]..at[0] + data.len()].copy_from_slice(other);
        std::fs::create_dir_all(out_dir).unwrap();
        let foreign_image = out_dir.join("layer.erofs");
        std::fs::write(&foreign_image, bytes).unwrap();
        let chunk_size = self.written.index.chunk_size;
        let twin = BlobFile::from_image(&foreign_image, out_dir, chunk_size);
        assert_eq!(twin.written.blob_len, self.written.blob_len);
        assert_eq!(
            (
                twin.written.footer.index_offset,
                twin.written.footer.index_length
            ),
            (
                self.written.footer.index_offset,
                self.written.footer.index_length
            )
        );
        assert_ne!(twin.anchor(), self.anchor());
        twin
    }

    pub fn source_with(&self, sources: Vec<std::sync::Arc<dyn ChunkSource>>) -> LayerSource {
        LayerSource {
            digest: self.digest.clone(),
            // As its descriptor carries it: version 1 layers have none.
            anchor: (self.written.index.version >= 2).then(|| self.anchor()),
            blob_size: self.written.blob_len,
            index_location: Some((
                self.written.footer.index_offset,
                self.written.footer.index_length,
            )),
            sources,
            diff_id: None,
        }
    }

    /// `sha256:` + the sha256 of the blob's index.
    pub fn anchor(&self) -> String {
        format!("sha256:{}", hex(&self.written.anchor()))
    }

    /// The layer served from its blob file alone.
    pub fn file_layer(&self) -> LayerSource {
        self.source_with(vec![self.file_source()])
    }

    pub fn file_source(&self) -> std::sync::Arc<FileSource> {
        std::sync::Arc::new(FileSource::open("file", &self.path).expect("open blob"))
    }
}

/// `out_dir/layer.erofs`: the EROFS image of `tree` (timestamps zeroed).
pub fn mkfs_erofs(tree: &Path, out_dir: &Path) -> PathBuf {
    let image = out_dir.join("layer.erofs");
    let status = Command::new("mkfs.erofs")
        .args(["--quiet", "-T0"])
        .arg(&image)
        .arg(tree)
        .status()
        .expect("run mkfs.erofs");
    assert!(status.success(), "mkfs.erofs failed");
    image
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serves a blob file while `up`; when down, every request fails (or hangs
/// until the fetcher's timeout, with `hang`). With `corrupt`, responses that
/// overlap that blob range come back with one bit flipped inside it; with
/// `withheld`, requests that overlap that blob range hang even while up.
pub struct ControlledSource {
    inner: FileSource,
    pub up: AtomicBool,
    pub hang: AtomicBool,
    pub corrupt: Option<Range<u64>>,
    pub withheld: Option<Range<u64>>,
    /// Requests that hung on `withheld` so far.
    pub withheld_asked: AtomicUsize,
    /// Requests asked of it so far.
    pub requests: AtomicUsize,
}

impl ControlledSource {
    pub fn new(blob: &BlobFile, corrupt: Option<Range<u64>>) -> Self {
        ControlledSource {
            inner: FileSource::open("controlled", &blob.path).expect("open blob"),
            up: AtomicBool::new(true),
            hang: AtomicBool::new(false),
            corrupt,
            withheld: None,
            withheld_asked: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl ChunkSource for ControlledSource {
    fn name(&self) -> &str {
        "controlled"
    }

    async fn read_range(&self, range: Range<u64>) -> Result<Answer, SourceError> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if let Some(w) = &self.withheld {
            if range.end > w.start && range.start < w.end {
                self.withheld_asked.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
        }
        if !self.up.load(Ordering::SeqCst) {
            if self.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            return Err(SourceError::Transient(
                "connection refused (source down)".into(),
            ));
        }
        let len = range.end - range.start;
        let data = self
            .inner
            .read_range(range.clone())
            .await?
            .collect(len)
            .await?;
        match &self.corrupt {
            Some(bad) if range.end > bad.start && range.start < bad.end => {
                let mut v = data.to_vec();
                let from = bad.start.max(range.start) - range.start;
                let to = bad.end.min(range.end) - range.start;
                v[((from + to) / 2) as usize] ^= 0x01;
                Ok(Answer::whole(Bytes::from(v)))
            }
            _ => Ok(Answer::whole(data)),
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

/// Asserts that nothing is mounted or attached under `root`.
#[track_caller]
pub fn assert_nothing_left(root: &Path) {
    let (mounts, loops) = leftovers(root);
    assert!(
        mounts.is_empty() && loops.is_empty(),
        "left behind: {mounts:?} {loops:?}"
    );
}

/// Waits (at most 10 s) until nothing is mounted or attached under `root`:
/// loop devices that an overlay still held clear a moment after it goes.
pub fn wait_nothing_left(root: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (mounts, loops) = leftovers(root);
        if mounts.is_empty() && loops.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left behind: {mounts:?} {loops:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
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

/// Reads every file under `dir` and compares the tree with `expected`
/// (paths, and the bytes of regular files).
pub fn check_tree(expected: &Path, dir: &Path) -> Result<(), String> {
    let paths = walk(expected);
    if paths != walk(dir) {
        return Err(format!("{}: listing differs", dir.display()));
    }
    for p in paths {
        let e = expected.join(&p);
        if e.is_file() {
            let a = std::fs::read(dir.join(&p)).map_err(|err| format!("{}: {err}", p.display()))?;
            if a != std::fs::read(&e).unwrap() {
                return Err(format!("{}: content differs", p.display()));
            }
        }
    }
    Ok(())
}

/// What `lazybd mount` of a layout image needs, under one dir: the image
/// (`DIR/image`, tag `latest`), a state root (`DIR/state`) and an empty
/// mount dir (`DIR/mnt`).
pub struct LayoutMount {
    pub layout: PathBuf,
    /// `DIR/image:latest`.
    pub image: String,
    pub root: PathBuf,
    pub dir: PathBuf,
}

impl LayoutMount {
    /// Writes an image of `layers` with `media_type` under `dir`.
    pub fn new(dir: &Path, layers: &[&BlobFile], media_type: &str) -> LayoutMount {
        let layout = dir.join("image");
        write_layout(&layout, layers, media_type);
        let mnt = dir.join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        LayoutMount {
            image: format!("{}:latest", layout.display()),
            layout,
            root: dir.join("state"),
            dir: mnt,
        }
    }
}

/// Writes an OCI image layout at `dir` whose one manifest (tag `latest`)
/// lists `layers` (bottom first) with `media_type` and the lazybd
/// annotations, as docs/format.md specifies them: each layer's diff_id is
/// its anchor. These layers come from trees, not tars: the blob digest
/// stands in for the source diff_id.
pub fn write_layout(dir: &Path, layers: &[&BlobFile], media_type: &str) {
    write_layout_with(dir, layers, media_type, BlobFile::anchor, |l| {
        LazyLayerAnnotations {
            version: l.written.index.version,
            index_digest: Some(l.anchor()),
            source_diff_id: l.digest.clone(),
            index_offset: l.written.footer.index_offset,
            index_length: l.written.footer.index_length,
            image_size: l.written.index.image_size,
            chunk_size: l.written.index.chunk_size,
        }
        .to_map()
    });
}

/// [`write_layout`] of version 1 layers ([`BlobFile::from_tree_v1`]) as
/// version 1 images were: `dev.lazybd.layer.*` annotations, no anchor, and
/// each blob's digest as its diff_id.
pub fn write_layout_v1(dir: &Path, layers: &[&BlobFile]) {
    use lazybd_blockdev::oci::v1;
    let digest = |l: &BlobFile| l.digest.clone();
    write_layout_with(dir, layers, LAZYBD_LAYER, digest, |l| {
        std::collections::BTreeMap::from([
            (v1::ANN_VERSION.to_owned(), "1".to_owned()),
            (v1::ANN_SOURCE_DIFF_ID.to_owned(), l.digest.clone()),
            (
                v1::ANN_INDEX_OFFSET.to_owned(),
                l.written.footer.index_offset.to_string(),
            ),
            (
                v1::ANN_INDEX_LENGTH.to_owned(),
                l.written.footer.index_length.to_string(),
            ),
            (
                v1::ANN_IMAGE_SIZE.to_owned(),
                l.written.index.image_size.to_string(),
            ),
            (
                v1::ANN_CHUNK_SIZE.to_owned(),
                l.written.index.chunk_size.to_string(),
            ),
        ])
    });
}

fn write_layout_with(
    dir: &Path,
    layers: &[&BlobFile],
    media_type: &str,
    diff_id: impl Fn(&BlobFile) -> String,
    annotations: impl Fn(&BlobFile) -> std::collections::BTreeMap<String, String>,
) {
    let layout = OciLayout::open_or_create(dir).expect("create layout");
    let diff_ids: Vec<String> = layers.iter().map(|l| diff_id(l)).collect();
    let config = canonical_json(&json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_digest = layout.put_blob(&config).unwrap();
    let mut descs = Vec::new();
    for l in layers {
        std::fs::copy(&l.path, layout.blob_path(&l.digest).unwrap()).expect("store layer blob");
        descs.push(json!({
            "mediaType": media_type,
            "digest": l.digest,
            "size": l.written.blob_len,
            "annotations": annotations(l),
        }));
    }
    let manifest = canonical_json(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    let digest = layout.put_blob(&manifest).unwrap();
    let desc = oci_spec::image::Descriptor::new(
        oci_spec::image::MediaType::ImageManifest,
        manifest.len() as u64,
        digest.parse::<oci_spec::image::Digest>().unwrap(),
    );
    layout.tag("latest", &desc).unwrap();
}
