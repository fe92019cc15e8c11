//! The lazy block device against the real kernel: FUSE file -> loop -> EROFS,
//! attach/detach through `LayerManager`, with sources that work, die, hang or
//! corrupt data. Real mounts, so root only.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lazybd_blockdev::device::{AttachStep, AttachedLayer, DeviceError, LayerManager, NodeConfig};
use lazybd_blockdev::fetch::FetchConfig;
use lazybd_blockdev::source::{ChunkSource, FileSource};
use lazybd_tests::images::noise;
use lazybd_tests::lazy_layers::{
    assert_nothing_left, leftovers, mkfs_erofs, walk, BlobFile, ControlledSource,
};
use lazybd_tests::require_root;

const CHUNK: u32 = 64 << 10;

/// A small tree: text files, a 3 MiB pseudo-random file spanning many
/// chunks, a symlink, an empty dir.
fn make_tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("etc/conf.d")).unwrap();
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    std::fs::write(dir.join("etc/hostname"), "lazybd\n").unwrap();
    std::fs::write(dir.join("etc/conf.d/app.conf"), "key = value\n".repeat(300)).unwrap();
    std::fs::write(dir.join("big.bin"), noise(0x9e37_79b9_7f4a_7c15, 3 << 20)).unwrap();
    std::os::unix::fs::symlink("etc/hostname", dir.join("link")).unwrap();
    // Ownership, setuid, a device node and a hardlink survive the trip.
    std::os::unix::fs::chown(dir.join("big.bin"), Some(1000), Some(1001)).unwrap();
    std::fs::write(dir.join("suid"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        dir.join("suid"),
        std::os::unix::fs::PermissionsExt::from_mode(0o4755),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &dir.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    std::fs::hard_link(dir.join("etc/hostname"), dir.join("hostname.hard")).unwrap();
}

struct Setup {
    _tmp: tempfile::TempDir,
    tree: std::path::PathBuf,
    blob: BlobFile,
    root: std::path::PathBuf,
}

impl Setup {
    /// A layer manager on this setup's root, with short fetch deadlines.
    fn manager(&self) -> LayerManager {
        LayerManager::new(config(&self.root)).unwrap()
    }

    /// Shuts `manager` down; nothing is left mounted or attached.
    async fn shut_down(&self, manager: LayerManager) {
        manager.shutdown().await.unwrap();
        assert_nothing_left(&self.root);
    }
}

/// Reads `path` on a blocking thread (a FUSE read may wait on this runtime).
async fn read(path: std::path::PathBuf) -> std::io::Result<Vec<u8>> {
    tokio::task::spawn_blocking(move || std::fs::read(path))
        .await
        .unwrap()
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    make_tree(&tree);
    let blob = BlobFile::from_tree(&tree, tmp.path(), CHUNK);
    let root = tmp.path().join("node");
    Setup {
        tree,
        blob,
        root,
        _tmp: tmp,
    }
}

fn config(root: &Path) -> NodeConfig {
    let mut c = NodeConfig::new(root);
    c.fetch = FetchConfig {
        request_timeout: Duration::from_millis(500),
        read_deadline: Duration::from_secs(3),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        ..FetchConfig::default()
    };
    c
}

fn assert_same_tree(expected: &Path, actual: &Path) {
    let paths = walk(expected);
    assert_eq!(paths, walk(actual), "path lists differ");
    for p in paths {
        let (e, a) = (expected.join(&p), actual.join(&p));
        let (em, am) = (
            std::fs::symlink_metadata(&e).unwrap(),
            std::fs::symlink_metadata(&a).unwrap(),
        );
        assert_eq!(em.mode(), am.mode(), "{}: mode", p.display());
        assert_eq!(
            (em.uid(), em.gid()),
            (am.uid(), am.gid()),
            "{}: owner",
            p.display()
        );
        if !em.is_dir() {
            assert_eq!(em.size(), am.size(), "{}: size", p.display());
            assert_eq!(em.rdev(), am.rdev(), "{}: rdev", p.display());
            assert_eq!(em.nlink(), am.nlink(), "{}: nlink", p.display());
        }
        if em.is_file() {
            assert!(
                std::fs::read(&e).unwrap() == std::fs::read(&a).unwrap(),
                "{}: content",
                p.display()
            );
        } else if em.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&e).unwrap(),
                std::fs::read_link(&a).unwrap()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_serves_the_layer_lazily_and_detach_leaves_nothing() {
    require_root!();
    let s = setup();
    let manager = s.manager();
    let attached = manager.attach(s.blob.file_layer()).await.unwrap();
    assert!(attached
        .loop_device
        .to_string_lossy()
        .starts_with("/dev/loop"));
    let after_mount = manager.stats().chunks_fetched();
    let total = s.blob.written.index.chunk_count();
    assert!(
        after_mount < total / 2,
        "mount fetched {after_mount} of {total} chunks"
    );

    // One small file costs a few chunks, not the layer.
    let hostname = std::fs::read_to_string(attached.mountpoint.join("etc/hostname")).unwrap();
    assert_eq!(hostname, "lazybd\n");
    let after_small = manager.stats().chunks_fetched();
    assert!(
        after_small - after_mount <= 2,
        "small read fetched {} chunks",
        after_small - after_mount
    );

    assert_same_tree(&s.tree, &attached.mountpoint);
    let status = manager.layers();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].chunks_total, total);
    assert!(status[0].chunks_present > after_small);

    // Attach is idempotent.
    let again = manager.attach(s.blob.file_layer()).await.unwrap();
    assert_eq!(again, attached);

    manager.detach(&attached.id).await.unwrap();
    manager.detach(&attached.id).await.unwrap(); // no-op
    assert!(manager.layers().is_empty());
    assert!(!attached.mountpoint.exists());
    let (mounts, loops) = leftovers(&s.root);
    assert_eq!(
        mounts,
        [s.root.join("fuse")],
        "only the FUSE dir stays mounted"
    );
    assert!(loops.is_empty(), "loop devices left: {loops:?}");
    s.shut_down(manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattach_after_restart_serves_from_the_cache_offline() {
    require_root!();
    let s = setup();
    let manager = s.manager();
    let attached = manager.attach(s.blob.file_layer()).await.unwrap();
    assert_same_tree(&s.tree, &attached.mountpoint);
    s.shut_down(manager).await;

    // Same root, sources all down: the index and every chunk come from disk.
    let manager = s.manager();
    let dead = Arc::new(ControlledSource::new(&s.blob, None));
    dead.up.store(false, Ordering::SeqCst);
    let attached = manager
        .attach(s.blob.source_with(vec![dead as Arc<dyn ChunkSource>]))
        .await
        .unwrap();
    assert_same_tree(&s.tree, &attached.mountpoint);
    let stats = manager.stats();
    assert_eq!(stats.chunks_fetched(), 0);
    assert_eq!(stats.cache_misses, 0);
    s.shut_down(manager).await;
}

/// An attach fetches its index outside the lock that orders device
/// changes: a layer whose source hangs does not hold up another layer's
/// attach (a pull's next layer, or another image's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_index_fetch_does_not_hold_up_another_layers_attach() {
    require_root!();
    let s = setup();
    let (other_tree, other) = other_layer(&s);

    let manager = Arc::new(s.manager());
    let hung = hanging_source(&s.blob);
    let stuck = spawn_attach(&manager, &s.blob, &hung, None);
    let e = attach_beside_stuck(&manager, &hung, stuck, &other_tree, &other, "index").await;
    assert!(e.contains("index"), "{e}");
    let manager = Arc::into_inner(manager).expect("no attach holds the manager");
    s.shut_down(manager).await;
}

/// The EROFS mount, whose first read (the superblock) waits for the
/// network on a new cache, runs outside that lock as well: a source that
/// hangs after the index does not hold up another layer's attach until its
/// read deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_superblock_fetch_does_not_hold_up_another_layers_attach() {
    require_root!();
    let s = setup();
    let (other_tree, other) = other_layer(&s);

    let manager = Arc::new(s.manager());
    // The index is on disk (as after a fetch ahead); every chunk must come
    // from a source that hangs.
    manager.fetch_index(s.blob.file_layer()).await.unwrap();
    let hung = hanging_source(&s.blob);
    let (opened, verified) = tokio::sync::oneshot::channel();
    let stuck = spawn_attach(&manager, &s.blob, &hung, Some(opened));
    verified
        .await
        .expect("the first layer's index was verified");
    let e = attach_beside_stuck(&manager, &hung, stuck, &other_tree, &other, "superblock").await;
    assert!(e.contains("mount EROFS"), "{e}");
    let manager = Arc::into_inner(manager).expect("no attach holds the manager");
    s.shut_down(manager).await;
}

/// A stranger's image decides what its mount reads: this one's superblock
/// names a root inode far from the first chunk, and its registry serves
/// the index and the first chunk but withholds that inode's chunk. Its
/// attach waits until the read deadline; no other layer's waits with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_whose_mount_reads_a_withheld_block_holds_up_no_other_attach() {
    require_root!();
    let s = setup();
    let (other_tree, other) = other_layer(&s);
    let dir = s._tmp.path().join("far-root");
    std::fs::create_dir_all(&dir).unwrap();
    let image = mkfs_erofs(&s.tree, &dir);
    let far = move_root_inode_to_block(&image, FAR_BLOCK);
    let blob = BlobFile::from_image(&image, &dir, CHUNK);
    let index = &blob.written.index;
    let far_chunks = index.chunks_for(far, 4096);
    assert_ne!(
        far_chunks,
        index.chunks_for(0, 4096),
        "the root inode left the superblock's chunk"
    );
    let withheld = index.entry(far_chunks.start).unwrap();

    let manager = Arc::new(s.manager());
    let mut hung = ControlledSource::new(&blob, None);
    hung.withheld = Some(withheld.stored_range());
    let hung = Arc::new(hung);
    let stuck = spawn_attach(&manager, &blob, &hung, None);
    let e = attach_beside_stuck(&manager, &hung, stuck, &other_tree, &other, "root inode").await;
    assert!(e.contains("mount EROFS"), "{e}");
    let manager = Arc::into_inner(manager).expect("no attach holds the manager");
    s.shut_down(manager).await;
}

/// Where `move_root_inode_to_block` puts the root inode: past the first
/// chunk, inside the setup's 3 MiB file, and within reach of EROFS's 16-bit
/// root inode number (2 MiB from the metadata's start).
const FAR_BLOCK: u64 = 300;

/// Copies the EROFS `image`'s root inode block to block `to` (over file
/// data), points the superblock's root inode number at the copy and drops
/// the superblock checksum flag; returns the copy's image offset. A valid
/// image whose mount reads that block second.
fn move_root_inode_to_block(image: &Path, to: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let mut sb = [0u8; 128];
    f.read_exact_at(&mut sb, 1024).unwrap();
    let meta = u32::from_le_bytes(sb[40..44].try_into().unwrap());
    assert_eq!(meta, 0, "inodes counted from block 0");
    let root = u64::from(u16::from_le_bytes([sb[14], sb[15]]));
    let from = root * 32 / 4096;
    let mut block = vec![0u8; 4096];
    f.read_exact_at(&mut block, from * 4096).unwrap();
    f.write_all_at(&block, to * 4096).unwrap();
    let moved = u16::try_from(root + (to - from) * 4096 / 32).unwrap();
    sb[14..16].copy_from_slice(&moved.to_le_bytes());
    let compat = u32::from_le_bytes(sb[8..12].try_into().unwrap()) & !1;
    sb[8..12].copy_from_slice(&compat.to_le_bytes());
    f.write_all_at(&sb, 1024).unwrap();
    to * 4096
}

/// A source of `blob` that hangs on every request.
fn hanging_source(blob: &BlobFile) -> Arc<ControlledSource> {
    let hung = Arc::new(ControlledSource::new(blob, None));
    hung.hang.store(true, Ordering::SeqCst);
    hung.up.store(false, Ordering::SeqCst);
    hung
}

/// Attaches `blob` with `hung` as its only source, on a task of its own;
/// `opened` as in `LayerManager::attach_reporting`.
fn spawn_attach(
    manager: &Arc<LayerManager>,
    blob: &BlobFile,
    hung: &Arc<ControlledSource>,
    opened: Option<tokio::sync::oneshot::Sender<()>>,
) -> tokio::task::JoinHandle<Result<AttachedLayer, DeviceError>> {
    let manager = manager.clone();
    let src = blob.source_with(vec![hung.clone() as Arc<dyn ChunkSource>]);
    tokio::spawn(async move { manager.attach_reporting(src, opened).await })
}

/// Once `stuck`, an attach whose source `hung` hangs, has asked it (for
/// its withheld range, if it has one): the `other` layer attaches while
/// `stuck` still waits (for its `waits_for`), and `stuck` fails in the
/// end, leaving only `other` attached. Returns `stuck`'s error.
async fn attach_beside_stuck(
    manager: &LayerManager,
    hung: &ControlledSource,
    stuck: tokio::task::JoinHandle<Result<AttachedLayer, DeviceError>>,
    other_tree: &Path,
    other: &BlobFile,
    waits_for: &str,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let asked = || match hung.withheld {
        Some(_) => hung.withheld_asked.load(Ordering::SeqCst),
        None => hung.requests.load(Ordering::SeqCst),
    };
    while asked() == 0 {
        assert!(Instant::now() < deadline, "the first attach never asked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let attached = manager.attach(other.file_layer()).await.unwrap();
    assert!(
        !stuck.is_finished(),
        "the second layer waited for the first one's {waits_for}"
    );
    assert_same_tree(other_tree, &attached.mountpoint);
    let e = stuck.await.unwrap().unwrap_err().to_string();
    assert_eq!(manager.layers().len(), 1);
    e
}

/// A second, one-file layer beside the setup's: its tree and blob.
fn other_layer(s: &Setup) -> (std::path::PathBuf, BlobFile) {
    let tree = s._tmp.path().join("other-tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("other"), "another layer\n").unwrap();
    let out = s._tmp.path().join("other-blob");
    std::fs::create_dir_all(&out).unwrap();
    let blob = BlobFile::from_tree(&tree, &out, CHUNK);
    (tree, blob)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_down_fails_reads_with_eio_after_the_deadline() {
    require_root!();
    let s = setup();
    let manager = s.manager();
    let source = Arc::new(ControlledSource::new(&s.blob, None));
    let attached = manager
        .attach(
            s.blob
                .source_with(vec![source.clone() as Arc<dyn ChunkSource>]),
        )
        .await
        .unwrap();
    source.hang.store(true, Ordering::SeqCst);
    source.up.store(false, Ordering::SeqCst);
    let big = attached.mountpoint.join("big.bin");
    let started = Instant::now();
    let err = read(big).await.unwrap_err();
    let waited = started.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
    assert!(
        waited >= Duration::from_secs(2),
        "failed too early: {waited:?}"
    );
    assert!(waited < Duration::from_secs(30), "took {waited:?}");
    let stats = manager.stats();
    assert!(stats.read_errors >= 1);
    assert_eq!(stats.waiting_reads, 0, "no read left hanging");

    // Back up: the same file reads fine (failed fetches left no stale state).
    source.up.store(true, Ordering::SeqCst);
    let big = attached.mountpoint.join("big.bin");
    let data = read(big).await.unwrap();
    assert_eq!(data, std::fs::read(s.tree.join("big.bin")).unwrap());
    s.shut_down(manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_chunks_are_never_served() {
    require_root!();
    let s = setup();
    let manager = s.manager();
    // Chunks in the second half of the data area come back damaged.
    let data_len = s.blob.written.index.data_len;
    let source = Arc::new(ControlledSource::new(&s.blob, Some(data_len / 2..data_len)));
    let attached = manager
        .attach(s.blob.source_with(vec![source as Arc<dyn ChunkSource>]))
        .await
        .unwrap();
    let big = attached.mountpoint.join("big.bin");
    let err = read(big).await.unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
    let stats = manager.stats();
    let src = stats.source("controlled").unwrap();
    assert!(src.corrupt_chunks >= 1, "{stats:?}");
    // No damaged chunk reached the cache: the cache file holds zeros (a
    // hole) wherever a chunk was refused.
    let index = &s.blob.written.index;
    assert!(manager.layers()[0].chunks_present < index.chunk_count());
    s.shut_down(manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attach_at_any_step_leaves_nothing() {
    require_root!();
    let s = setup();
    for step in [
        AttachStep::FuseFile,
        AttachStep::Loop,
        AttachStep::Mount,
        AttachStep::Register,
    ] {
        let mut c = config(&s.root);
        c.fail_attach_at = Some(step);
        let manager = LayerManager::new(c).unwrap();
        let err = manager.attach(s.blob.file_layer()).await.unwrap_err();
        assert!(
            matches!(err, DeviceError::Injected { step: s, .. } if s == step),
            "{err}"
        );
        assert!(manager.layers().is_empty());
        let (mounts, loops) = leftovers(&s.root);
        assert_eq!(mounts, [s.root.join("fuse")], "after failing at {step:?}");
        assert!(loops.is_empty(), "after failing at {step:?}: {loops:?}");
        assert!(!s
            .root
            .join("mnt")
            .join(s.blob.anchor().replace(':', "-"))
            .exists());
        s.shut_down(manager).await;
    }
}

/// A source that serves another blob's self-consistent tail and chunks
/// under this blob's digest (a lying mirror, super node or peer) cannot
/// decide what the layer reads: only the tail that hashes to the anchor is
/// used, from the sources or from the disk. A layer with another anchor
/// under the same digest is another layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anchor_picks_the_tail_and_names_the_layer() {
    require_root!();
    let s = setup();
    let big = noise(0x9e37_79b9_7f4a_7c15, 3 << 20);
    let other = noise(7, 3 << 20);
    let tmp = s._tmp.path();
    let foreign = s
        .blob
        .foreign_twin(&tmp.join("layer.erofs"), &big, &other, &tmp.join("foreign"));
    let liar =
        || -> Arc<dyn ChunkSource> { Arc::new(FileSource::open("liar", &foreign.path).unwrap()) };
    let manager = s.manager();

    // The liar first: its tail is refused, the next source's is used, and
    // every read is this image's.
    let honest = manager
        .attach(s.blob.source_with(vec![liar(), s.blob.file_source()]))
        .await
        .unwrap();
    assert_eq!(honest.id.anchor(), Some(s.blob.anchor().as_str()));
    assert_same_tree(&s.tree, &honest.mountpoint);

    // The foreign blob as its own layer under the same digest (its own
    // anchor): another layer, with its own mount and cache.
    let mut forged = foreign.file_layer();
    forged.digest = s.blob.digest.clone();
    let theirs = manager.attach(forged).await.unwrap();
    assert_ne!(theirs.id, honest.id);
    assert_ne!(theirs.mountpoint, honest.mountpoint);
    assert_eq!(
        read(theirs.mountpoint.join("big.bin")).await.unwrap(),
        other
    );
    assert_eq!(read(honest.mountpoint.join("big.bin")).await.unwrap(), big);
    let status = manager.layers();
    assert_eq!(status.len(), 2);
    assert!(status.iter().all(|l| l.digest == s.blob.digest));

    // Detached, the honest layer's saved index replaced by the foreign one:
    // discarded and fetched again, never trusted.
    manager.detach(&honest.id).await.unwrap();
    manager.detach(&theirs.id).await.unwrap();
    let layers = s.root.join("layers");
    let saved = |id: &lazybd_blockdev::oci::LayerId| layers.join(id.file_name()).join("index");
    let honest_tail = std::fs::read(saved(&honest.id)).unwrap();
    std::fs::copy(saved(&theirs.id), saved(&honest.id)).unwrap();
    let again = manager.attach(s.blob.file_layer()).await.unwrap();
    assert_eq!(again.id, honest.id);
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_same_tree(&s.tree, &again.mountpoint);
    assert_eq!(std::fs::read(saved(&honest.id)).unwrap(), honest_tail);

    // Only the liar, nothing saved: the attach fails, naming the anchor.
    manager.detach(&again.id).await.unwrap();
    std::fs::remove_dir_all(layers.join(honest.id.file_name())).unwrap();
    let err = manager
        .attach(s.blob.source_with(vec![liar()]))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not the layer's anchor"), "{err}");
    assert!(manager.layers().is_empty());
    s.shut_down(manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_index_location_is_a_clear_error() {
    require_root!();
    let s = setup();
    let manager = s.manager();
    let mut src = s.blob.file_layer();
    src.index_location = Some((1, 2));
    let err = manager.attach(src).await.unwrap_err().to_string();
    assert!(err.contains("do not fit the blob size"), "{err}");
    s.shut_down(manager).await;
}

fn libc_eio() -> i32 {
    nix::errno::Errno::EIO as i32
}
