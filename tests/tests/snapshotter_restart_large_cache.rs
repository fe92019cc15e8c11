//! lazybd-snapshotter restarted with GiBs of complete layers under a running
//! container (private containerd, `ctr run` with the lazybd runtime, whose
//! task start prefetched every layer and handed it off to its cache file):
//! the next daemon serves without reading those caches, with
//! `lazybd fd-holder` keeping the FUSE session (it adopts the mounts) and
//! without one (it mounts the layers' cache files again).
//!
//! A restart that re-hashed complete caches would read all of them before
//! (or, verifying in the background, right after) it serves: with GiBs of
//! caches that is seconds to minutes, and a start timeout or probe kills
//! it in a loop. The assertion is on what the kernel counted the new
//! process reading (`/proc/PID/io`), not on the clock; the time from the
//! start to the first answer is printed (docs/benchmarks.md).
//!
//! The layers are one file each of a 4 KiB random block repeated: real data
//! in every cache (not holes), but their blobs are a few MiB, so the test
//! spends its time on the prefetch, not on the registry. Everything lives
//! in one temp dir, gone at the end (about 2 GiB of caches at the peak).

use std::path::Path;
use std::time::{Duration, Instant};

use lazybd_tests::containerd::{Containerd, LazyRun, LAZYBD_RUNTIME};
use lazybd_tests::fdstore::FdHolder;
use lazybd_tests::images::{
    busybox_layer, large_file_layer, noise, publish_lazy_blobs, Compression, LayerBlob,
};
use lazybd_tests::registry::Registry;
use lazybd_tests::require_root;
use lazybd_tests::snapshotter::{metric_or_zero, plain_http_config, SnapshotterDaemon};

/// Large layers, and the size of the one file in each.
const LARGE_LAYERS: usize = 2;
const FILE_SIZE: u64 = 1 << 30;
const BLOCK: usize = 4096;
/// What a restart may read, all files together (the saved indexes, about
/// 1 MiB per GiB of layer at 64 KiB chunks; the config; procfs and sysfs):
/// a small fraction of the caches, however large they are.
const READ_BUDGET: u64 = 64 << 20;

/// What the kernel counted a process reading and writing (`/proc/PID/io`).
#[derive(Debug, Clone, Copy)]
struct Io {
    /// Bytes returned by read(2) and the like, page cache hits included.
    rchar: u64,
    /// Bytes the process made the block layer read.
    read_bytes: u64,
}

impl Io {
    fn of(pid: u32) -> Io {
        let text = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
        let field = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} in /proc/{pid}/io: {text}"))
        };
        Io {
            rchar: field("rchar"),
            read_bytes: field("read_bytes"),
        }
    }
}

/// Bytes allocated to the cache image files under the snapshotter's root.
fn cache_bytes(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let layers = root.join("lazy/layers");
    std::fs::read_dir(&layers)
        .unwrap_or_else(|e| panic!("{}: {e}", layers.display()))
        .filter_map(|e| std::fs::metadata(e.ok()?.path().join("image")).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// The last block of every large file, read inside the container (its
/// rootfs is the overlay on the layers' EROFS mounts), by sha256.
fn last_blocks(ctd: &Containerd, container: &str, exec_id: &str) -> String {
    let skip = FILE_SIZE / BLOCK as u64 - 1;
    let script: String = (0..LARGE_LAYERS)
        .map(|i| {
            format!(
                "busybox dd if=/large{i}/data bs={BLOCK} skip={skip} count=1 2>/dev/null \
                 | busybox sha256sum; "
            )
        })
        .collect();
    ctd.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        exec_id,
        container,
        "/bin/sh",
        "-c",
        &script,
    ])
}

/// One restart's figures.
struct Restart {
    /// Start of the process to its Snapshots API served.
    serving: Duration,
    /// Start to the first metrics scrape answered.
    first_answer: Duration,
    /// What the process read until it served.
    at_serving: Io,
    /// What it read until the container's reads after it were answered.
    after_reads: Io,
}

/// Starts the killed snapshotter again and measures it; asserts it adopted
/// or re-mounted every layer as local without reading the caches.
fn restart(
    snapshotter: &mut SnapshotterDaemon,
    ctd: &Containerd,
    container: &str,
    exec_id: &str,
    want: &str,
) -> Restart {
    let started = Instant::now();
    snapshotter.start_again();
    let serving = started.elapsed();
    let pid = snapshotter.pid();
    let at_serving = Io::of(pid);
    let metrics = snapshotter.metrics();
    let first_answer = started.elapsed();
    let states = snapshotter.layer_states();
    assert!(
        states.len() == LARGE_LAYERS + 1 && states.iter().all(|s| s == "local"),
        "not every layer local right after the restart: {states:?}\n{}",
        snapshotter.log()
    );
    assert_eq!(
        last_blocks(ctd, container, exec_id),
        want,
        "the container read other bytes after the restart"
    );
    let after_reads = Io::of(pid);
    assert_eq!(
        metric_or_zero(&metrics, "lazybd_cache_rehashed_chunks"),
        0.0,
        "{metrics}"
    );
    for (what, io) in [("serving", at_serving), ("the reads", after_reads)] {
        assert!(
            io.rchar < READ_BUDGET && io.read_bytes < READ_BUDGET,
            "the restarted snapshotter read {io:?} until {what}: it re-read the caches\n{}",
            snapshotter.log()
        );
    }
    Restart {
        serving,
        first_answer,
        at_serving,
        after_reads,
    }
}

#[test]
fn a_restart_with_gibs_of_complete_caches_serves_without_reading_them() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let t0 = Instant::now();
    let base = busybox_layer();
    let mut layers = vec![LayerBlob {
        diff_id: lazybd_blockdev::oci::digest_of(&base),
        bytes: base,
        compression: Compression::None,
    }];
    for i in 0..LARGE_LAYERS {
        let block = noise(7000 + i as u64, BLOCK);
        layers.push(large_file_layer(
            &format!("large{i}"),
            "data",
            FILE_SIZE,
            &block,
        ));
    }
    let img = publish_lazy_blobs(tmp.path(), &registry, "large", &layers);
    eprintln!(
        "built and converted {LARGE_LAYERS} layers of {} MiB in {:?}",
        FILE_SIZE >> 20,
        t0.elapsed()
    );
    let want: String = (0..LARGE_LAYERS)
        .map(|i| {
            let block = noise(7000 + i as u64, BLOCK);
            format!(
                "{}  -\n",
                hex::encode(lazybd_blockdev::format::sha256(&block))
            )
        })
        .collect();

    let dir = tmp.path().join("snapshotter");
    std::fs::create_dir_all(&dir).unwrap();
    let mut holder = FdHolder::start(&dir);
    let ctd_dir = lazybd_tests::containerd::new_dir();
    let config = plain_http_config(&registry)
        + &format!(
            "[containerd]\naddress = \"{}\"\n",
            lazybd_tests::containerd::socket_in(ctd_dir.path()).display()
        )
        + &holder.snapshotter_config();
    let mut snapshotter = SnapshotterDaemon::start(&dir, &config);
    let ctd = Containerd::builder()
        .in_dir(ctd_dir)
        .proxy_snapshotter(snapshotter.proxy())
        .namespace("default")
        .start();
    let out = ctd.lazybd_pull(&img.image);
    assert!(out.contains("3 attached lazily"), "{out}");

    // The lazybd runtime's task start prefetches every layer; each is handed
    // off to its cache file once complete.
    let t0 = Instant::now();
    let container = format!("large-{}", std::process::id());
    ctd.ctr_ok(
        &LazyRun {
            image: &img.image,
            id: &container,
            detach: true,
            runtime: Some(LAZYBD_RUNTIME),
            cmd: &["/bin/sh", "-c", "exec busybox sleep 3600"],
            ..LazyRun::default()
        }
        .args(),
    );
    snapshotter.wait_all_local(Duration::from_secs(240));
    let cached = cache_bytes(&snapshotter.root);
    eprintln!(
        "prefetched and handed off {} MiB of caches in {:?}",
        cached >> 20,
        t0.elapsed()
    );
    assert!(
        cached >= LARGE_LAYERS as u64 * FILE_SIZE,
        "{cached} bytes of caches"
    );
    assert_eq!(last_blocks(&ctd, &container, "before"), want);

    // SIGKILL; the holder keeps the session: the next daemon adopts the
    // mounts of the local layers.
    snapshotter.kill();
    let resumed = restart(&mut snapshotter, &ctd, &container, "resumed", &want);
    assert!(
        snapshotter.log().contains("resumed the FUSE session"),
        "{}",
        snapshotter.log()
    );

    // SIGKILL with no store: the next daemon mounts the cache files again.
    holder.kill();
    snapshotter.kill();
    let log_before = snapshotter.log().len();
    let fresh = restart(&mut snapshotter, &ctd, &container, "fresh", &want);
    assert!(
        !snapshotter.log()[log_before..].contains("resumed the FUSE session"),
        "{}",
        snapshotter.log()
    );

    for (how, r) in [("fd holder", &resumed), ("no fd store", &fresh)] {
        eprintln!(
            "restart with {} MiB of complete caches ({how}): serving {:?}, first answer {:?} \
             after the start; read until serving {:?}, until the container's reads were \
             answered {:?}",
            cached >> 20,
            r.serving,
            r.first_answer,
            r.at_serving,
            r.after_reads
        );
    }

    ctd.ctr_ok(&["task", "kill", "-s", "KILL", &container]);
    ctd.wait_task(30, &container, "STOPPED");
    ctd.ctr_ok(&["task", "rm", &container]);
    // containerd may still be reconnecting to the restarted snapshotter.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctd.ctr(&["container", "rm", &container]).status.success() {
        assert!(Instant::now() < deadline, "container rm {container}");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(ctd);
    drop(snapshotter);
    drop(holder);
}
