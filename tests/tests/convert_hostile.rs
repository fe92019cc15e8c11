//! `lazybd convert` of hostile layers, as the CLI runs them: a layer that
//! writes through its own symlink must not touch anything outside the work
//! directory, and tar bombs (bytes, entries) stop at the configured limits.
//! Whatever happens, nothing is left in --work-dir.

use std::path::Path;

use lazybd_tests::cli::{fails, lazybd, ok};
use lazybd_tests::images::{write_image, Compression, TarLayer};
use lazybd_tests::require_root;

/// `lazybd convert oci:SRC:v1 oci:DST` with `extra` flags.
fn convert(t: &Path, extra: &[&str]) -> std::process::Output {
    let (src, dst) = (
        format!("oci:{}:v1", t.join("src").display()),
        format!("oci:{}", t.join("dst").display()),
    );
    let work = t.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"convert", &"--work-dir", &work];
    for e in extra {
        args.push(e);
    }
    args.push(&src);
    args.push(&dst);
    lazybd(&args)
}

#[track_caller]
fn assert_work_dir_empty(t: &Path) {
    let left: Vec<_> = std::fs::read_dir(t.join("work"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left in --work-dir: {left:?}");
}

#[test]
fn a_layer_cannot_write_through_its_own_symlinks() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let canary = t.join("canary");
    std::fs::create_dir(&canary).unwrap();
    let c = canary.display().to_string();
    // Each of these once created `canary/x` (or a node in it) on the host.
    let cases: [fn(&mut TarLayer, &str); 4] = [
        |l, c| {
            l.symlink("a", c).whiteout("a/x/y");
        },
        |l, c| {
            l.symlink("a", c).opaque("a/x");
        },
        |l, c| {
            l.symlink("a", c).device("a/x", tar::EntryType::Char, 1, 3);
        },
        |l, c| {
            l.symlink("a", c).file("a/x", 0o644, b"owned");
        },
    ];
    for (i, build) in cases.into_iter().enumerate() {
        let mut layer = TarLayer::new();
        layer.file("ok", 0o644, b"fine");
        build(&mut layer, &c);
        let _ = std::fs::remove_dir_all(t.join("src"));
        write_image(
            &t.join("src"),
            "v1",
            &[layer.finish()],
            &[Compression::Gzip],
        );
        let err = fails(&convert(t, &[]));
        assert!(err.contains("goes through a symlink"), "case {i}: {err}");
        let inside: Vec<_> = std::fs::read_dir(&canary).unwrap().collect();
        assert!(inside.is_empty(), "case {i}: wrote outside: {inside:?}");
        assert_work_dir_empty(t);
    }
}

#[test]
fn a_gzip_bomb_stops_at_the_size_limit_and_leaves_nothing() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // 64 MiB of zeros: about 64 KiB gzipped.
    let zeros = vec![0u8; 64 << 20];
    let mut layer = TarLayer::new();
    layer.file("bomb", 0o644, &zeros);
    write_image(
        &t.join("src"),
        "v1",
        &[layer.finish()],
        &[Compression::Gzip],
    );
    let err = fails(&convert(t, &["--max-layer-size", "8M"]));
    assert!(
        err.contains("larger than the limit of 8388608 bytes (see --max-layer-size)"),
        "{err}"
    );
    assert_work_dir_empty(t);
    // Within the limit the same image converts.
    ok(&convert(t, &["--max-layer-size", "65M"]));
    assert_work_dir_empty(t);
}

#[test]
fn an_entry_bomb_stops_at_the_entry_limit_and_leaves_nothing() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let mut layer = TarLayer::new();
    for i in 0..5000 {
        layer.file(&format!("d{}/f{i}", i % 50), 0o644, b"");
    }
    write_image(
        &t.join("src"),
        "v1",
        &[layer.finish()],
        &[Compression::Gzip],
    );
    let err = fails(&convert(t, &["--max-layer-entries", "1000"]));
    assert!(
        err.contains("larger than the limit of 1000 entries (see --max-layer-entries)"),
        "{err}"
    );
    assert_work_dir_empty(t);
}
