//! Background prefetch and the handoff to the local cache file, against the
//! real kernel: a prefetched layer's loop device ends up reading the cache's
//! image file (LOOP_CHANGE_FD), so its files keep reading after the serving
//! process is SIGKILLed; reads go ahead of a rate-limited prefetch (proved
//! with counters, not timing); cache eviction spares attached layers.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lazybd_blockdev::device::{LayerManager, LayerState, LayerStatus, NodeConfig, PrefetchStart};
use lazybd_blockdev::oci::LayerId;
use lazybd_tests::cli::{lazybd, ok, MountGuard};
use lazybd_tests::images::noise;
use lazybd_tests::lazy_layers::{
    assert_nothing_left, check_tree, BlobFile, LayoutMount, LAZYBD_LAYER,
};
use lazybd_tests::require_root;

const CHUNK: u32 = 64 << 10;

/// The tests of this file run one at a time: a child process forked by one
/// (mkfs.erofs, lazybd) briefly inherits every fd of this process until it
/// execs, including files open inside another test's mounts, which then
/// fail to unmount with EBUSY.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Two incompressible files (every chunk costs its full size to fetch) and a
/// small one.
fn make_tree(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(dir.join("etc/name"), format!("tree-{seed}\n")).unwrap();
    std::fs::write(dir.join("a.bin"), noise(seed, 2 << 20)).unwrap();
    std::fs::write(dir.join("b.bin"), noise(seed + 1, 2 << 20)).unwrap();
}

fn blob(tmp: &Path, name: &str, seed: u64) -> (PathBuf, BlobFile) {
    let tree = tmp.join(name).join("tree");
    make_tree(&tree, seed);
    let blob = BlobFile::from_tree(&tree, &tmp.join(name), CHUNK);
    (tree, blob)
}

#[track_caller]
fn assert_same_files(expected: &Path, actual: &Path) {
    check_tree(expected, actual).unwrap_or_else(|e| panic!("{e}"));
}

/// What the kernel says the loop device reads.
fn sysfs_backing(loop_device: &Path) -> PathBuf {
    let name = loop_device.file_name().unwrap().to_str().unwrap();
    let s = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).unwrap();
    PathBuf::from(s.trim_end())
}

fn drop_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

fn stats_layers(guard: &MountGuard) -> Vec<serde_json::Value> {
    guard.stats()["layers"].as_array().unwrap().clone()
}

#[test]
fn prefetch_hands_off_to_the_cache_file_and_reads_survive_the_daemon() {
    require_root!();
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (_, lower) = blob(tmp.path(), "lower", 1);
    let (upper_tree, upper) = blob(tmp.path(), "upper", 7);
    // Both trees have the same paths: the merged view is the upper tree.
    let LayoutMount {
        image, root, dir, ..
    } = LayoutMount::new(tmp.path(), &[&lower, &upper], LAZYBD_LAYER);
    let guard = MountGuard::new(&root, &dir);

    ok(&lazybd(&[
        &"mount",
        &"--root",
        &root,
        &"--prefetch",
        &image,
        &dir,
    ]));
    // Bounded wait for both layers to become local.
    let deadline = Instant::now() + Duration::from_secs(60);
    let layers = loop {
        let layers = stats_layers(&guard);
        if layers.iter().all(|l| l["state"] == "local") {
            break layers;
        }
        assert!(
            Instant::now() < deadline,
            "not local after 60 s: {layers:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(layers.len(), 2);
    for l in &layers {
        let l: LayerStatus = serde_json::from_value(l.clone()).unwrap();
        assert_eq!(l.chunks_present, l.chunks_total);
        assert!(l.backing_file.ends_with("image"), "{l:?}");
        assert_eq!(sysfs_backing(&l.loop_device), l.backing_file, "{l:?}");
        // The FUSE file is gone: FUSE is out of this layer's data path.
        let fuse_file = l.backing_file.parent().unwrap().file_name().unwrap();
        let fuse_dir = l.backing_file.ancestors().nth(3).unwrap().join("fuse");
        assert!(!fuse_dir.join(fuse_file).exists(), "{l:?}");
    }
    let stats = guard.stats();
    assert_eq!(stats["stats"]["prefetch"]["handoffs"], 2, "{stats}");
    assert_eq!(stats["stats"]["prefetch"]["demand_waited_on_background"], 0);
    assert_same_files(&upper_tree, &dir);

    // SIGKILL the daemon: FUSE dies with it, the loop devices do not need it.
    let pid = stats["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        // A zombie until its parent (the `lazybd mount` we ran, gone) is
        // reaped by init; /proc/PID/stat says Z then.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.split(' ').nth(2) == Some("Z") {
            break;
        }
        assert!(Instant::now() < deadline, "daemon {pid} still alive");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop_caches();
    assert_same_files(&upper_tree, &dir);

    // Clean up what the dead daemon left, then mount again: complete layers
    // attach straight to the cache file, nothing is fetched.
    let out = ok(&lazybd(&[&"umount", &"--root", &root, &dir]));
    assert!(out.contains("unmounted"), "{out}");
    ok(&lazybd(&[&"mount", &"--root", &root, &image, &dir]));
    let layers = stats_layers(&guard);
    for l in &layers {
        let l: LayerStatus = serde_json::from_value(l.clone()).unwrap();
        assert_eq!(l.state, LayerState::Local, "{l:?}");
        assert_eq!(sysfs_backing(&l.loop_device), l.backing_file, "{l:?}");
    }
    drop_caches();
    assert_same_files(&upper_tree, &dir);
    let stats = guard.stats();
    assert_eq!(stats["stats"]["cache_misses"], 0, "{stats}");
    ok(&lazybd(&[&"umount", &"--root", &root, &dir]));
    drop(guard);
    assert_nothing_left(tmp.path());
}

fn node_config(root: &Path, rate: u64) -> NodeConfig {
    let mut c = NodeConfig::new(root);
    c.prefetch_rate = rate;
    c.persist_interval = Duration::from_millis(200);
    c
}

async fn read_file(path: PathBuf) -> Vec<u8> {
    tokio::task::spawn_blocking(move || std::fs::read(path).unwrap())
        .await
        .unwrap()
}

async fn wait_for_state(m: &LayerManager, id: &LayerId, want: LayerState) -> LayerStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = m.layers().into_iter().find(|l| &l.id == id).unwrap();
        if l.state == want {
            return l;
        }
        assert!(Instant::now() < deadline, "not {want:?} after 60 s: {l:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Each test has its own runtime; the guard only keeps other tests out.
#[allow(clippy::await_holding_lock)]
async fn reads_go_ahead_of_a_rate_limited_prefetch() {
    require_root!();
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (tree, blob) = blob(tmp.path(), "layer", 3);
    // About one chunk per second: the 4 MiB layer would take a minute.
    let m = LayerManager::new(node_config(&tmp.path().join("node"), CHUNK as u64)).unwrap();
    let attached = m.attach(blob.file_layer()).await.unwrap();
    let d = attached.id.clone();
    assert_eq!(m.prefetch(&d).unwrap(), PrefetchStart::Started);
    assert_eq!(m.prefetch(&d).unwrap(), PrefetchStart::AlreadyRunning);
    assert_eq!(
        m.layers()[0].state,
        LayerState::Fetching,
        "{:?}",
        m.layers()
    );

    // A reader while the prefetch crawls: served at once by its own fetches.
    let got = read_file(attached.mountpoint.join("b.bin")).await;
    assert!(got == std::fs::read(tree.join("b.bin")).unwrap());
    let p = m.stats().prefetch;
    assert!(p.demand_fetches_while_prefetching > 0, "{p:?}");
    assert_eq!(p.demand_waited_on_background, 0, "{p:?}");
    let l = &m.layers()[0];
    // The read did not wait for the prefetch: a.bin is mostly still missing.
    assert_eq!(l.state, LayerState::Fetching, "{l:?}");
    assert!(l.chunks_present < l.chunks_total, "{l:?}");

    // A restart in the middle: the new manager resumes the prefetch on
    // attach, nobody asks again.
    m.shutdown().await.unwrap();
    let m = LayerManager::new(node_config(&tmp.path().join("node"), CHUNK as u64)).unwrap();
    let attached = m.attach(blob.file_layer()).await.unwrap();
    assert_eq!(
        m.layers()[0].state,
        LayerState::Fetching,
        "{:?}",
        m.layers()
    );

    // Lift the limit: the rest arrives in the background and the loop
    // device moves to the cache file.
    m.set_prefetch_rate(0);
    let l = wait_for_state(&m, &d, LayerState::Local).await;
    assert_eq!(sysfs_backing(&l.loop_device), l.backing_file);
    let p = m.stats().prefetch;
    assert!(p.background_chunks > 0, "{p:?}");
    assert_eq!(p.handoffs, 1, "{p:?}");
    assert_eq!(p.demand_waited_on_background, 0, "{p:?}");
    assert_eq!(m.prefetch(&d).unwrap(), PrefetchStart::AlreadyLocal);
    drop_caches();
    assert_same_files(&tree, &attached.mountpoint);

    m.shutdown().await.unwrap();
    assert_nothing_left(tmp.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Each test has its own runtime; the guard only keeps other tests out.
#[allow(clippy::await_holding_lock)]
async fn eviction_removes_detached_caches_and_never_attached_ones() {
    require_root!();
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (tree_a, a) = blob(tmp.path(), "a", 11);
    let (tree_b, b) = blob(tmp.path(), "b", 13);
    let root = tmp.path().join("node");
    let m = LayerManager::new(node_config(&root, 0)).unwrap();
    let la = m.attach(a.file_layer()).await.unwrap();
    let lb = m.attach(b.file_layer()).await.unwrap();
    assert_same_files(&tree_a, &la.mountpoint);
    assert_same_files(&tree_b, &lb.mountpoint);
    // Named by the layers' identities (their anchors).
    let cache_dir = |id: &LayerId| root.join("layers").join(id.file_name());
    assert!(cache_dir(&la.id).exists() && cache_dir(&lb.id).exists());

    // Both attached: over any capacity, nothing goes.
    let report = m.evict_caches(1).await;
    assert!(report.evicted.is_empty(), "{report:?}");
    assert!(report.remaining_bytes > 4 << 20, "{report:?}");

    // A detached: its cache goes, B's stays although still over capacity.
    m.detach(&la.id).await.unwrap();
    let report = m.evict_caches(1).await;
    assert_eq!(report.evicted, [la.id.file_name()], "{report:?}");
    assert!(!cache_dir(&la.id).exists());
    assert!(cache_dir(&lb.id).join("image").exists());
    assert_same_files(&tree_b, &lb.mountpoint);

    // An evicted layer attaches again, fetching anew.
    let before = m.stats().chunks_fetched();
    let la = m.attach(a.file_layer()).await.unwrap();
    assert_same_files(&tree_a, &la.mountpoint);
    assert!(m.stats().chunks_fetched() > before);

    // Unlimited capacity never evicts.
    m.detach(&lb.id).await.unwrap();
    assert!(m.evict_caches(0).await.evicted.is_empty());
    assert!(cache_dir(&lb.id).exists());
    m.shutdown().await.unwrap();
    assert_nothing_left(tmp.path());
}
