//! `lazybd mount --record-trace` / `--replay-trace`: a mount records what
//! its reader read until the unmount; a mount on a fresh root that
//! replays the file has them all before the same reads (no on-demand miss on
//! a traced chunk), and the data is the same. A corrupt trace file fails the
//! mount with the file named, and leaves nothing mounted.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use lazybd_blockdev::trace::Trace;
use lazybd_tests::cli::{lazybd, ok, MountGuard};
use lazybd_tests::images::noise;
use lazybd_tests::lazy_layers::{assert_nothing_left, BlobFile, LayoutMount, LAZYBD_LAYER};
use lazybd_tests::require_root;

/// `lazybd mount --root ROOT TRACE_FLAG TRACE_FILE IMAGE DIR`.
fn mount(m: &LayoutMount, root: &Path, trace_flag: &str, trace_file: &Path) -> Output {
    lazybd(&[
        &"mount",
        &"--root",
        &root,
        &trace_flag,
        &trace_file,
        &m.image,
        &m.dir,
    ])
}

/// The "startup": a small file and the first half of a big one.
fn startup_reads(dir: &Path) -> Vec<u8> {
    let mut out = std::fs::read(dir.join("etc/name")).unwrap();
    let big = std::fs::read(dir.join("a.bin")).unwrap();
    out.extend_from_slice(&big[..big.len() / 2]);
    out
}

#[test]
fn a_mount_records_a_trace_and_another_replays_it_before_the_reads() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let tree = t.join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/name"), "traced\n").unwrap();
    std::fs::write(tree.join("a.bin"), noise(3, 2 << 20)).unwrap();
    std::fs::write(tree.join("b.bin"), noise(4, 2 << 20)).unwrap();
    std::fs::create_dir(t.join("blob")).unwrap();
    let blob = BlobFile::from_tree(&tree, &t.join("blob"), 64 << 10);
    let m = LayoutMount::new(t, &[&blob], LAZYBD_LAYER);
    let dir = &m.dir;
    let trace_file = t.join("trace.json");

    let root = t.join("state-a");
    let guard = MountGuard::new(&root, dir);
    ok(&mount(&m, &root, "--record-trace", &trace_file));
    let expected = startup_reads(dir);
    ok(&lazybd(&[&"umount", &"--root", &root, &dir]));
    drop(guard);
    let trace = Trace::decode(&std::fs::read(&trace_file).unwrap()).unwrap();
    assert_eq!(trace.layers.len(), 1, "{trace:?}");
    // Layers are named by identity (the anchor), not by blob digest.
    assert_eq!(trace.layers[0].layer.as_str(), blob.anchor());
    // a.bin (2 MiB, read whole) and some metadata; not b.bin.
    let read: u64 = trace.layers[0].ranges.iter().map(|[_, n]| n).sum();
    assert!((2 << 20..3 << 20).contains(&read), "{trace:?}");

    let root = t.join("state-b");
    let guard = MountGuard::new(&root, dir);
    ok(&mount(&m, &root, "--replay-trace", &trace_file));
    let deadline = Instant::now() + Duration::from_secs(60);
    while guard.stats()["stats"]["trace"]["replays"] != 1 {
        assert!(Instant::now() < deadline, "no replay: {}", guard.stats());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        startup_reads(dir) == expected,
        "the replayed mount read other data"
    );
    let stats = guard.stats();
    let traced = &stats["stats"]["trace"];
    assert_eq!(traced["demand_misses_traced"], 0, "{stats}");
    assert!(traced["replayed_chunks"].as_u64().unwrap() > 0, "{stats}");
    ok(&lazybd(&[&"umount", &"--root", &root, &dir]));
    drop(guard);

    std::fs::write(&trace_file, b"{\"version\":7}").unwrap();
    let root = t.join("state-c");
    let _guard = MountGuard::new(&root, dir);
    let out = mount(&m, &root, "--replay-trace", &trace_file);
    assert!(!out.status.success());
    let err =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        err.contains("trace.json") && err.contains("version 7"),
        "{err}"
    );
    assert_nothing_left(t);
}
