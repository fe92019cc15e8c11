//! `lazybd convert --record-profile`: the image's entrypoint runs under
//! real runc on a lazy mount of a first conversion (with 4 KiB of
//! readahead, then with 128), and what it read is stored first in the
//! second. A busybox image whose entrypoint reads a few
//! files; the profile must hold reads, the result must carry them in its
//! prefetch area, be reproducible from the same profile, and nothing may be
//! left mounted or in the work dir, also when the entrypoint cannot run.
//! A lazy mount of the result reads what the profile's narrow part holds
//! into the page cache before anything reads it.
//! The recorded conversion reads from and writes to a real docker-registry
//! (the source is copied once, the stores' clients dropped off the async
//! threads).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lazybd_tests::busybox;
use lazybd_tests::cli::{fails, lazybd, ok, MountGuard};
use lazybd_tests::registry::Registry;
use lazybd_tests::require_root;

/// Reads part of busybox (every applet is it) and a file, then exits.
const ENTRYPOINT: &[&str] = &["/bin/sh", "-c", "cat /bin/busybox >/dev/null; echo ready"];

fn inspect(image: &str) -> serde_json::Value {
    let out = ok(&lazybd(&[&"inspect", &"--plain-http", &"--json", &image]));
    serde_json::from_str(&out).expect("inspect --json")
}

/// The one layer's `prefetch_length`.
fn prefetch_length(image: &str) -> u64 {
    let summary = inspect(image);
    let layers = summary.as_array().expect("layers");
    assert_eq!(layers.len(), 1, "{summary}");
    layers[0]["prefetch_length"]
        .as_u64()
        .expect("prefetch_length")
}

/// A work dir in `tmp`, and a registry holding the busybox image `name`
/// (running [`ENTRYPOINT`]) as `name:v1`; its layout stays in
/// `tmp/layout-name`.
fn source(tmp: &Path, name: &str) -> (PathBuf, Registry) {
    let work = tmp.join("work");
    std::fs::create_dir(&work).unwrap();
    busybox::archive(tmp, name, ENTRYPOINT);
    let registry = Registry::start();
    registry.push_layout(
        &tmp.join(format!("layout-{name}")),
        name,
        &format!("{name}:v1"),
    );
    (work, registry)
}

/// `lazybd convert --record-profile` from `src` to `dst`, both in a
/// plain-HTTP registry, with `more` arguments.
fn record(work: &Path, src: &str, dst: &str, more: &[&dyn AsRef<std::ffi::OsStr>]) {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"convert",
        &"--plain-http",
        &"--record-profile",
        &"--record-secs",
        &"20",
        &"--work-dir",
        &work,
    ];
    args.extend_from_slice(more);
    args.extend([&src as &dyn AsRef<std::ffi::OsStr>, &dst]);
    ok(&lazybd(&args));
}

fn scratch_dirs(work: &Path) -> Vec<String> {
    std::fs::read_dir(work)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("lazybd-record-"))
        .collect()
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = dir.to_string_lossy();
    mounts
        .lines()
        .filter(|l| l.contains(dir.as_ref()))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_recorded_profile_is_stored_first_and_reproducible() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let (work, registry) = source(tmp.path(), "rec");
    let src = format!("oci:{}:rec", tmp.path().join("layout-rec").display());
    let plain = format!("oci:{}:plain", tmp.path().join("out").display());
    let recorded = registry.reference("rec:recorded");
    let again = format!("oci:{}:again", tmp.path().join("out").display());
    let profile = tmp.path().join("profile");
    let log = tmp.path().join("workload.log");

    ok(&lazybd(&[&"convert", &"--work-dir", &work, &src, &plain]));
    record(
        &work,
        &registry.reference("rec:v1"),
        &recorded,
        &[&"--profile-out", &profile, &"--record-log", &log],
    );
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(output.contains("ready"), "the workload ran: {output:?}");
    let trace = lazybd_blockdev::trace::Trace::decode(&std::fs::read(&profile).unwrap())
        .expect("the profile is a trace");
    assert_eq!(trace.layers.len(), 1, "one layer read");
    assert!(trace.range_count() > 0);
    // Recorded with 4 KiB of readahead and again with 128: the first
    // run's reads are marked as the narrow part, which the blob stores
    // first (all of it, for a workload that reads a file front to back).
    let narrow = trace.layers[0].narrow.expect("recorded twice");
    assert!((1..=trace.layers[0].ranges.len()).contains(&narrow));
    let layer = &inspect(&recorded)[0];
    let narrow_len = layer["prefetch_narrow_length"].as_u64().unwrap();
    assert!(narrow_len > 0 && narrow_len <= layer["prefetch_length"].as_u64().unwrap());

    // The reads are in the prefetch area, ahead of what metadata alone is.
    let (plain_len, recorded_len) = (prefetch_length(&plain), prefetch_length(&recorded));
    assert!(
        recorded_len > plain_len,
        "recorded prefetch {recorded_len} <= unprofiled {plain_len}"
    );
    // The same source and profile give the same layer.
    ok(&lazybd(&[
        &"convert",
        &"--profile",
        &profile,
        &"--work-dir",
        &work,
        &src,
        &again,
    ]));
    let digest = |image: &str| inspect(image)[0]["digest"].clone();
    assert_eq!(digest(&recorded), digest(&again));

    assert!(scratch_dirs(&work).is_empty(), "{:?}", scratch_dirs(&work));
    assert!(mounts_under(&work).is_empty(), "{:?}", mounts_under(&work));
}

#[test]
fn an_entrypoint_that_cannot_run_is_a_clear_error_and_leaves_nothing() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    busybox::archive(tmp.path(), "broken", &["/no/such/program"]);
    let src = format!("oci:{}:broken", tmp.path().join("layout-broken").display());
    let dst = format!("oci:{}:out", tmp.path().join("out").display());
    let err = fails(&lazybd(&[
        &"convert",
        &"--record-profile",
        &"--record-secs",
        &"20",
        &"--work-dir",
        &work,
        &src,
        &dst,
    ]));
    assert!(
        err.contains("no profile") || err.contains("/no/such/program"),
        "{err}"
    );
    assert!(scratch_dirs(&work).is_empty(), "{:?}", scratch_dirs(&work));
    assert!(mounts_under(&work).is_empty(), "{:?}", mounts_under(&work));
}

#[test]
fn a_readahead_past_the_bound_is_refused_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = format!("oci:{}:out", tmp.path().join("out").display());
    let err = fails(&lazybd(&[
        &"convert",
        &"--record-profile",
        &"--record-read-ahead-kb",
        &"5000",
        &"oci:/nonexistent:x",
        &dst,
    ]));
    assert!(err.contains("--record-read-ahead-kb"), "{err}");
    assert!(!tmp.path().join("out").exists(), "nothing was written");
}

/// A lazy mount of an image with a recorded profile reads the narrow part
/// into the page cache once it has arrived, before anything reads it: the
/// file the entrypoint read is resident in the page cache of a mount no
/// one has read (`fincore`), read by the warming alone.
#[test]
fn a_lazy_mount_reads_the_narrow_part_into_the_page_cache_before_its_reader() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let (work, registry) = source(tmp.path(), "warm");
    let recorded = registry.reference("warm:recorded");
    record(&work, &registry.reference("warm:v1"), &recorded, &[]);

    let (root, dir) = (tmp.path().join("root"), tmp.path().join("mnt"));
    std::fs::create_dir(&dir).unwrap();
    ok(&lazybd(&[
        &"mount",
        &"--root",
        &root,
        &"--plain-http",
        &recorded,
        &dir,
    ]));
    let mounted = MountGuard::new(&root, &dir);
    let deadline = Instant::now() + Duration::from_secs(30);
    let attach = loop {
        let attach = mounted.stats()["stats"]["attach"].clone();
        if attach["warmed_layers"].as_u64() == Some(1) {
            break attach;
        }
        assert!(
            Instant::now() < deadline,
            "not warmed within 30 s: {attach}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let busybox = dir.join("bin/busybox");
    let size = std::fs::metadata(&busybox).unwrap().len();
    let warmed = attach["warmed_bytes"].as_u64().unwrap();
    assert!(
        warmed >= size / 4096 * 4096,
        "{warmed} bytes warmed, busybox is {size}"
    );
    // Readahead is asynchronous: the pages arrive moments after the call.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--output", "RES"])
            .arg(&busybox)
            .output()
            .expect("fincore (util-linux)");
        let resident: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        if resident >= size / 4096 * 4096 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{resident} of busybox's {size} bytes in the page cache"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(mounted);
}
