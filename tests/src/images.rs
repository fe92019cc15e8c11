//! Test images built here, byte for byte deterministic: tar layers written
//! with the `tar` crate (so every corner of the format is under the test's
//! control: whiteouts, opaque dirs, hardlinks, devices, xattrs, setuid,
//! owners, mtimes), compressed as asked, stored in an OCI image layout.
//!
//! Also a listing of a mounted or unpacked tree that captures what must
//! survive conversion, for comparing a lazy mount with an ordinary unpack.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use lazybd_blockdev::oci::{canonical_json, digest_of, OciLayout};
use oci_spec::image::{Descriptor, Digest, MediaType};
use serde_json::json;
use sha2::{Digest as _, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    fn compress(self, tar: &[u8]) -> Vec<u8> {
        use std::io::Write;
        match self {
            Compression::None => tar.to_vec(),
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(tar).unwrap();
                e.finish().unwrap()
            }
            Compression::Zstd => zstd::encode_all(tar, 3).unwrap(),
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64*): incompressible test data
/// without a dependency, and the same on every run.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

const MTIME: u64 = 1_700_000_000;

/// Writes tar entries with explicit metadata.
pub struct TarLayer {
    builder: tar::Builder<Vec<u8>>,
}

impl Default for TarLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl TarLayer {
    pub fn new() -> Self {
        TarLayer {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.builder
            .append_data(&mut h, path, std::io::empty())
            .unwrap();
        self
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.file_owned(path, mode, 0, 0, data)
    }

    pub fn file_owned(
        &mut self,
        path: &str,
        mode: u32,
        uid: u64,
        gid: u64,
        data: &[u8],
    ) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.builder.append_data(&mut h, path, data).unwrap();
        self
    }

    /// A file with extended attributes (PAX `SCHILY.xattr.*` records, as
    /// GNU tar and Docker write them).
    pub fn file_with_xattrs(
        &mut self,
        path: &str,
        data: &[u8],
        xattrs: &[(&str, &[u8])],
    ) -> &mut Self {
        let pax: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
            .collect();
        self.builder
            .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap();
        self.file(path, 0o644, data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.builder.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        self.builder.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn device(
        &mut self,
        path: &str,
        kind: tar::EntryType,
        major: u32,
        minor: u32,
    ) -> &mut Self {
        let mut h = Self::header(kind, 0o666, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.builder
            .append_data(&mut h, path, std::io::empty())
            .unwrap();
        self
    }

    /// An OCI whiteout: `path` is deleted from the layers below.
    pub fn whiteout(&mut self, path: &str) -> &mut Self {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let wh = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&wh, 0o644, b"")
    }

    /// An OCI opaque marker: `dir`'s content from below is hidden.
    pub fn opaque(&mut self, dir: &str) -> &mut Self {
        self.file(&format!("{dir}/.wh..wh..opq"), 0o644, b"")
    }

    pub fn finish(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }
}

/// The three layers of the rich test image: Debian's busybox-static (so
/// tests can run a program from the image), everything the converter must
/// keep, and an upper layer that deletes, replaces and hides lower content.
pub fn rich_layers() -> Vec<Vec<u8>> {
    let mut base = busybox_base();
    base.symlink("bin/cat", "busybox")
        .dir("etc", 0o755)
        .dir("data", 0o755)
        .dir("dev", 0o755)
        .dir("opq", 0o755)
        .dir("gone", 0o755)
        .dir("sticky", 0o1777)
        .file("bin/suid", 0o4755, b"#!/bin/sh\necho suid\n")
        .file("bin/sgid", 0o2755, b"#!/bin/sh\necho sgid\n")
        .file("etc/hostname", 0o644, b"lazybd\n")
        .file_with_xattrs(
            "etc/labelled",
            b"has xattrs\n",
            &[("user.lazybd", b"kept"), ("trusted.lazybd", b"root only")],
        )
        .file_owned("etc/owned", 0o640, 1234, 5678, b"owned by 1234:5678\n")
        .file("etc/removed", 0o644, b"deleted by the next layer\n")
        .file("data/small.txt", 0o644, b"hello from a small file\n")
        .hardlink("data/hard", "data/small.txt")
        .symlink("data/link", "small.txt")
        .symlink("data/dangling", "/nowhere")
        .device("dev/mynull", tar::EntryType::Char, 1, 3)
        .device("dev/myloop", tar::EntryType::Block, 7, 200)
        .device("data/fifo", tar::EntryType::Fifo, 0, 0)
        .file("opq/old1", 0o644, b"hidden by an opaque dir\n")
        .file("opq/old2", 0o644, b"hidden too\n")
        .file("gone/file", 0o644, b"whole dir deleted above\n");
    // 6 MiB: random, then zeros, then random again: chunks of all kinds.
    let mut big = noise(1, 6 << 20);
    big[2 << 20..4 << 20].fill(0);
    base.file("data/big", 0o644, &big);

    let mut mid = TarLayer::new();
    mid.dir("etc", 0o755)
        .dir("opq", 0o755)
        .dir("data", 0o755)
        .whiteout("etc/removed")
        .whiteout("gone")
        .opaque("opq")
        .file("opq/new", 0o600, b"the only file left in opq\n")
        .file("etc/hostname", 0o644, b"lazybd-2\n")
        .file("data/added", 0o755, &noise(2, 100_000));

    let mut top = TarLayer::new();
    top.dir("data", 0o755)
        .file("data/big2", 0o644, &noise(3, 3 << 20))
        .file("data/empty", 0o644, b"");
    vec![base.finish(), mid.finish(), top.finish()]
}

/// Writes an image of `layers` (uncompressed tars) into the OCI layout at
/// `dir` under `tag`; returns the manifest digest.
pub fn write_image(
    dir: &Path,
    tag: &str,
    layers: &[Vec<u8>],
    compression: &[Compression],
) -> String {
    assert_eq!(layers.len(), compression.len());
    let blobs: Vec<LayerBlob> = layers
        .iter()
        .zip(compression)
        .map(|(tar, &c)| LayerBlob {
            bytes: c.compress(tar),
            diff_id: digest_of(tar),
            compression: c,
        })
        .collect();
    write_image_blobs(dir, tag, &blobs)
}

/// A layer blob, already compressed: what a layer too large to hold
/// uncompressed in memory is built as ([`large_file_layer`]).
pub struct LayerBlob {
    pub bytes: Vec<u8>,
    /// `sha256:` of the uncompressed tar.
    pub diff_id: String,
    pub compression: Compression,
}

/// [`write_image`] of layers already compressed.
pub fn write_image_blobs(dir: &Path, tag: &str, layers: &[LayerBlob]) -> String {
    let layout = OciLayout::open_or_create(dir).unwrap();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in layers {
        let digest = layout.put_blob(&layer.bytes).unwrap();
        diff_ids.push(layer.diff_id.clone());
        descs.push(
            json!({"mediaType": layer.compression.media_type(), "digest": digest,
                          "size": layer.bytes.len()}),
        );
    }
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["cat /etc/hostname"],
            "Env": ["PATH=/bin", "LAZYBD_TEST=1"],
            "WorkingDir": "/data",
            "Labels": {"dev.lazybd.test": "rich"}
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "lazybd tests"}]
    });
    let config = canonical_json(&config).unwrap();
    let config_digest = layout.put_blob(&config).unwrap();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": descs,
    });
    let manifest = canonical_json(&manifest).unwrap();
    let digest = layout.put_blob(&manifest).unwrap();
    let desc = Descriptor::new(
        MediaType::ImageManifest,
        manifest.len() as u64,
        digest.parse::<Digest>().unwrap(),
    );
    layout.tag(tag, &desc).unwrap();
    digest
}

/// The rich image in an OCI layout at `dir/src` (tag `v1`), also pushed to
/// `registry` as `rich:v1` (with skopeo).
pub fn publish_rich(dir: &Path, registry: &crate::registry::Registry) -> PathBuf {
    let layout = dir.join("src");
    write_image(
        &layout,
        "v1",
        &rich_layers(),
        &[Compression::Gzip, Compression::None, Compression::Gzip],
    );
    registry.push_layout(&layout, "v1", "rich:v1");
    layout
}

/// [`publish_rich`], then `lazybd convert` of it into the registry as
/// `rich:lazy` with 64 KiB chunks; returns the conversion's `--json`.
pub fn publish_lazy_rich(dir: &Path, registry: &crate::registry::Registry) -> serde_json::Value {
    publish_rich(dir, registry);
    convert_in(dir, registry, "rich:v1", "rich:lazy")
}

/// `lazybd convert` of `src` into `dst` in `registry`, 64 KiB chunks; the
/// conversion's `--json`.
fn convert_in(
    dir: &Path,
    registry: &crate::registry::Registry,
    src: &str,
    dst: &str,
) -> serde_json::Value {
    convert_with(dir, registry, src, dst, &[])
}

/// [`convert_in`] with more `lazybd convert` arguments.
fn convert_with(
    dir: &Path,
    registry: &crate::registry::Registry,
    src: &str,
    dst: &str,
    extra: &[&str],
) -> serde_json::Value {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"convert",
        &"--plain-http",
        &"--json",
        &"--chunk-size",
        &"65536",
        &"--work-dir",
        &dir,
    ];
    args.extend(extra.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    let (src, dst) = (registry.reference(src), registry.reference(dst));
    args.extend([&src as &dyn AsRef<std::ffi::OsStr>, &dst]);
    let out = crate::cli::ok(&crate::cli::lazybd(&args));
    serde_json::from_str(&out).expect("convert --json")
}

/// A layer (zstd) of `dir/` and one file `dir/name` of `size` bytes: `block`
/// over and over. Non-zero, so a cache of it holds real data, not holes;
/// streamed through the compressor, so a layer of GiBs costs a few MiB of
/// memory and its blob a few MiB of disk.
pub fn large_file_layer(dir: &str, name: &str, size: u64, block: &[u8]) -> LayerBlob {
    use std::io::Write;

    /// The uncompressed tar's bytes go to the diff_id's hash and the
    /// compressor.
    struct Tee {
        hash: Sha256,
        zstd: zstd::Encoder<'static, Vec<u8>>,
    }
    impl Write for Tee {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.zstd.write(buf)?;
            self.hash.update(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.zstd.flush()
        }
    }
    /// `block` repeated, `left` bytes of it.
    struct Repeat<'a> {
        block: &'a [u8],
        at: usize,
        left: u64,
    }
    impl std::io::Read for Repeat<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf
                .len()
                .min(self.block.len() - self.at)
                .min(usize::try_from(self.left).unwrap_or(usize::MAX));
            buf[..n].copy_from_slice(&self.block[self.at..self.at + n]);
            self.at = (self.at + n) % self.block.len();
            self.left -= n as u64;
            Ok(n)
        }
    }
    assert!(block.iter().any(|&b| b != 0), "zero blocks are holes");
    let tee = Tee {
        hash: Sha256::new(),
        zstd: zstd::Encoder::new(Vec::new(), 1).unwrap(),
    };
    let mut tar = tar::Builder::new(tee);
    let mut h = TarLayer::header(tar::EntryType::Directory, 0o755, 0);
    tar.append_data(&mut h, dir, std::io::empty()).unwrap();
    let mut h = TarLayer::header(tar::EntryType::Regular, 0o644, size);
    let data = Repeat {
        block,
        at: 0,
        left: size,
    };
    tar.append_data(&mut h, format!("{dir}/{name}"), data)
        .unwrap();
    let tee = tar.into_inner().unwrap();
    LayerBlob {
        bytes: tee.zstd.finish().unwrap(),
        diff_id: format!("sha256:{}", hex::encode(tee.hash.finalize())),
        compression: Compression::Zstd,
    }
}

/// Debian's busybox-static as `/bin/busybox`, and `/bin/sh`: what a base
/// layer needs to run commands.
fn busybox_base() -> TarLayer {
    let busybox = std::fs::read("/bin/busybox")
        .expect("/bin/busybox (apt install busybox-static; hack/install-deps.sh does)");
    let mut base = TarLayer::new();
    base.dir("bin", 0o755)
        .file("bin/busybox", 0o755, &busybox)
        .symlink("bin/sh", "busybox");
    base
}

/// busybox (`/bin/busybox`, `/bin/sh`) and the directories a container
/// needs: a base layer to run commands in.
pub fn busybox_layer() -> Vec<u8> {
    let mut base = busybox_base();
    base.dir("tmp", 0o1777)
        .dir("dev", 0o755)
        .dir("proc", 0o755)
        .dir("sys", 0o755)
        .dir("out", 0o755);
    base.finish()
}

/// `layers` as image `repo:v1` in `registry`, converted (64 KiB chunks, one
/// layer at a time, so `dir` needs room for one uncompressed layer twice)
/// into `repo:lazy`.
pub fn publish_lazy_blobs(
    dir: &Path,
    registry: &crate::registry::Registry,
    repo: &str,
    layers: &[LayerBlob],
) -> LazyImage {
    let layout = dir.join(format!("{repo}-src"));
    write_image_blobs(&layout, "v1", layers);
    let (src, dst) = (format!("{repo}:v1"), format!("{repo}:lazy"));
    registry.push_layout(&layout, "v1", &src);
    let converted = convert_with(dir, registry, &src, &dst, &["--parallel", "1"]);
    lazy_image(registry, &dst, &converted)
}

/// The converted rich image as a snapshotter sees it on a Prepare.
pub struct LazyImage {
    /// `REGISTRY/rich:lazy`.
    pub image: String,
    pub manifest: String,
    /// Layer digests, bottom first.
    pub layers: Vec<String>,
    /// The layers' anchors (their diff_ids), bottom first.
    pub anchors: Vec<String>,
}

impl LazyImage {
    /// The snapshot names containerd gives the layers: their chain IDs
    /// (from the anchors, the image's diff_ids), bottom first.
    pub fn chain_ids(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for a in &self.anchors {
            out.push(lazybd_blockdev::oci::chain_id(
                out.last().map(String::as_str),
                a,
            ));
        }
        out
    }
}

/// [`publish_lazy_rich`], returning what a Prepare's labels name.
pub fn publish_lazy_image(dir: &Path, registry: &crate::registry::Registry) -> LazyImage {
    let converted = publish_lazy_rich(dir, registry);
    lazy_image(registry, "rich:lazy", &converted)
}

/// What a Prepare's labels name for the image `tag` that `lazybd convert
/// --json` wrote (`converted`) into `registry`.
fn lazy_image(
    registry: &crate::registry::Registry,
    tag: &str,
    converted: &serde_json::Value,
) -> LazyImage {
    let manifest = converted["manifest_digest"].as_str().unwrap().to_owned();
    let m: serde_json::Value = serde_json::from_slice(&registry.read_blob(&manifest)).unwrap();
    let anchors = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["annotations"][lazybd_blockdev::oci::ANN_INDEX_DIGEST]
                .as_str()
                .expect("converted layers carry their anchor")
                .to_owned()
        })
        .collect();
    LazyImage {
        image: registry.reference(tag),
        manifest,
        layers: converted["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().to_owned())
            .collect(),
        anchors,
    }
}

/// A temp dir and a fresh registry holding the rich image (`rich:v1`) and
/// its conversion (`rich:lazy`, [`publish_lazy_image`]).
pub fn registry_with_lazy_rich() -> (tempfile::TempDir, crate::registry::Registry, LazyImage) {
    let tmp = tempfile::tempdir().unwrap();
    let registry = crate::registry::Registry::start();
    let img = publish_lazy_image(tmp.path(), &registry);
    (tmp, registry, img)
}

/// What must survive conversion, for one path of a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Regular files: size and sha256; symlinks: the target; devices: rdev.
    pub content: String,
    /// Regular files only (directory mtimes change as trees are unpacked).
    pub mtime: Option<i64>,
    pub nlink: Option<u64>,
    /// `user.*` xattrs (others need privileges or belong to the kernel).
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// Every path under `root` (relative), with what [`Entry`] captures.
pub fn listing(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    for rel in crate::lazy_layers::walk(root) {
        let path = root.join(&rel);
        let rel = rel.to_string_lossy().into_owned();
        let md = std::fs::symlink_metadata(&path).unwrap();
        let ft = md.file_type();
        let (kind, content) = if ft.is_file() {
            let data = std::fs::read(&path).unwrap();
            (
                "file",
                format!("{} {}", data.len(), hex::encode(Sha256::digest(&data))),
            )
        } else if ft.is_dir() {
            ("dir", String::new())
        } else if ft.is_symlink() {
            (
                "symlink",
                std::fs::read_link(&path).unwrap().display().to_string(),
            )
        } else if ft.is_char_device() {
            ("char", format!("{:x}", md.rdev()))
        } else if ft.is_block_device() {
            ("block", format!("{:x}", md.rdev()))
        } else if ft.is_fifo() {
            ("fifo", String::new())
        } else {
            ("socket", String::new())
        };
        let xattrs = if ft.is_symlink() {
            BTreeMap::new()
        } else {
            xattr::list(&path)
                .unwrap()
                .filter_map(|n| n.into_string().ok())
                .filter(|n| n.starts_with("user."))
                .map(|n| {
                    let v = xattr::get(&path, &n).unwrap().unwrap_or_default();
                    (n, v)
                })
                .collect()
        };
        out.insert(
            rel,
            Entry {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                content,
                mtime: ft.is_file().then(|| md.mtime()),
                nlink: ft.is_file().then(|| md.nlink()),
                xattrs,
            },
        );
    }
    out
}

/// An image for reading many files of a lazy layer: busybox in one layer,
/// `/files/fNNN` (`count` files of `size` random bytes) in another,
/// converted (64 KiB chunks) into `registry` as `files:lazy`.
pub struct FilesImage {
    pub image: LazyImage,
    /// `fNNN` and the sha256 (hex) of its bytes, in name order.
    pub files: Vec<(String, String)>,
}

/// Publishes a [`FilesImage`]. The source layers are uncompressed: the
/// files are random bytes gzip would not shrink, and a debug build would
/// spend most of the test compressing them.
pub fn publish_lazy_files(
    dir: &Path,
    registry: &crate::registry::Registry,
    count: usize,
    size: usize,
) -> FilesImage {
    let mut data = TarLayer::new();
    data.dir("files", 0o755);
    let mut files = Vec::new();
    for i in 0..count {
        let bytes = noise(1000 + i as u64, size);
        let name = format!("f{i:03}");
        files.push((
            name.clone(),
            hex::encode(lazybd_blockdev::format::sha256(&bytes)),
        ));
        data.file(&format!("files/{name}"), 0o644, &bytes);
    }
    let layout = dir.join("files-src");
    write_image(
        &layout,
        "v1",
        &[busybox_layer(), data.finish()],
        &[Compression::None, Compression::None],
    );
    registry.push_layout(&layout, "v1", "files:v1");
    let converted = convert_in(dir, registry, "files:v1", "files:lazy");
    FilesImage {
        image: lazy_image(registry, "files:lazy", &converted),
        files,
    }
}
