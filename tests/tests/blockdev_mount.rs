//! `lazybd mount` / `stats` / `umount` as a user runs them: a two-layer
//! converted image in an OCI layout, mounted lazily in the background,
//! compared with the merged tree, then unmounted without leftovers.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use lazybd_tests::cli::{lazybd, ok};
use lazybd_tests::lazy_layers::{assert_nothing_left, walk, BlobFile, LayoutMount, LAZYBD_LAYER};
use lazybd_tests::require_root;

/// Lower layer: a few files and a dir; upper layer: replaces one file,
/// deletes another with an overlayfs whiteout, adds a big file.
fn build_layers(tmp: &Path) -> (BlobFile, BlobFile, std::path::PathBuf) {
    let lower = tmp.join("lower");
    std::fs::create_dir_all(lower.join("etc")).unwrap();
    std::fs::create_dir_all(lower.join("usr/bin")).unwrap();
    std::fs::write(lower.join("etc/os-release"), "ID=lower\n").unwrap();
    std::fs::write(lower.join("etc/gone"), "deleted above\n").unwrap();
    std::fs::write(lower.join("usr/bin/tool"), vec![7u8; 300_000]).unwrap();
    let upper = tmp.join("upper");
    std::fs::create_dir_all(upper.join("etc")).unwrap();
    std::fs::write(upper.join("etc/os-release"), "ID=upper\n").unwrap();
    nix::sys::stat::mknod(
        &upper.join("etc/gone"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .unwrap();
    let big: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(upper.join("big.bin"), &big).unwrap();

    // The expected merged view.
    let merged = tmp.join("merged");
    std::fs::create_dir_all(merged.join("etc")).unwrap();
    std::fs::create_dir_all(merged.join("usr/bin")).unwrap();
    std::fs::write(merged.join("etc/os-release"), "ID=upper\n").unwrap();
    std::fs::write(merged.join("usr/bin/tool"), vec![7u8; 300_000]).unwrap();
    std::fs::write(merged.join("big.bin"), &big).unwrap();

    let (lo, up) = (tmp.join("lo"), tmp.join("up"));
    std::fs::create_dir_all(&lo).unwrap();
    std::fs::create_dir_all(&up).unwrap();
    (
        BlobFile::from_tree(&lower, &lo, 64 << 10),
        BlobFile::from_tree(&upper, &up, 64 << 10),
        merged,
    )
}

#[test]
fn mount_stats_umount_round_trip() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let (lower, upper, merged) = build_layers(tmp.path());
    let LayoutMount {
        image, root, dir, ..
    } = LayoutMount::new(tmp.path(), &[&lower, &upper], LAZYBD_LAYER);

    let out = ok(&lazybd(&[&"mount", &"--root", &root, &image, &dir]));
    assert!(out.contains("mounted"), "{out}");

    // A second mount at the same place is refused.
    let again = lazybd(&[&"mount", &"--root", &root, &image, &dir]);
    assert!(!again.status.success());

    let paths = walk(&merged);
    assert_eq!(paths, walk(&dir));
    for p in &paths {
        let (e, a) = (merged.join(p), dir.join(p));
        let (em, am) = (
            std::fs::metadata(&e).unwrap(),
            std::fs::metadata(&a).unwrap(),
        );
        if em.is_file() {
            assert_eq!(em.size(), am.size(), "{}", p.display());
            assert!(
                std::fs::read(&e).unwrap() == std::fs::read(&a).unwrap(),
                "{}",
                p.display()
            );
        }
    }
    assert!(
        !dir.join("etc/gone").exists(),
        "whiteout hides the lower file"
    );

    let json = ok(&lazybd(&[&"stats", &"--root", &root, &"--json", &dir]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["layers"].as_array().unwrap().len(), 2);
    let layout_src = v["stats"]["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "layout")
        .unwrap();
    assert!(layout_src["chunks"].as_u64().unwrap() > 0);
    let human = ok(&lazybd(&[&"stats", &"--root", &root, &dir]));
    assert!(human.contains("read latency"), "{human}");

    let out = ok(&lazybd(&[&"umount", &"--root", &root, &dir]));
    assert!(out.contains("unmounted"), "{out}");
    assert_nothing_left(tmp.path());
    assert!(
        std::fs::read_dir(&dir).unwrap().next().is_none(),
        "mount dir is empty again"
    );

    // Remounting reuses the caches: nothing is fetched for what was read.
    ok(&lazybd(&[&"mount", &"--root", &root, &image, &dir]));
    assert_eq!(
        std::fs::read(dir.join("big.bin")).unwrap(),
        std::fs::read(merged.join("big.bin")).unwrap()
    );
    let json = ok(&lazybd(&[&"stats", &"--root", &root, &"--json", &dir]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["stats"]["cache_misses"], 0, "{json}");
    ok(&lazybd(&[&"umount", &"--root", &root, &dir]));
    assert_nothing_left(tmp.path());
}

#[test]
fn mounting_a_non_lazybd_image_is_a_clear_error() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let (lower, _, _) = build_layers(tmp.path());
    let tar_gzip = "application/vnd.oci.image.layer.v1.tar+gzip";
    let LayoutMount {
        layout, root, dir, ..
    } = LayoutMount::new(tmp.path(), &[&lower], tar_gzip);
    let out = lazybd(&[&"mount", &"--root", &root, &layout, &dir]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a lazybd image"), "{err}");
    assert_nothing_left(tmp.path());
}

#[test]
fn umount_cleans_up_after_a_killed_daemon() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let (lower, upper, merged) = build_layers(tmp.path());
    let LayoutMount {
        layout, root, dir, ..
    } = LayoutMount::new(tmp.path(), &[&lower, &upper], LAZYBD_LAYER);
    ok(&lazybd(&[&"mount", &"--root", &root, &layout, &dir]));
    // Fetch some chunks so the killed daemon leaves a cache behind.
    std::fs::read(dir.join("usr/bin/tool")).unwrap();
    let json = ok(&lazybd(&[&"stats", &"--root", &root, &"--json", &dir]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let pid = v["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Wait for it to be gone (its FUSE connection dies with it).
    for _ in 0..500 {
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = ok(&lazybd(&[&"umount", &"--root", &root, &dir]));
    assert!(out.contains("unmounted"), "{out}");
    assert_nothing_left(tmp.path());

    // Mounting again reopens the caches the killed daemon left open: in the
    // same boot nothing a bit claims can be missing, so they are trusted
    // without re-hashing (docs/blockdev.md), and the data is correct.
    ok(&lazybd(&[&"mount", &"--root", &root, &layout, &dir]));
    assert_eq!(
        std::fs::read(dir.join("big.bin")).unwrap(),
        std::fs::read(merged.join("big.bin")).unwrap()
    );
    let state = std::fs::read_dir(root.join("mounts"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let log = std::fs::read_to_string(state.join("mount.log")).unwrap();
    assert!(log.contains("left open by a process of this boot"), "{log}");
    ok(&lazybd(&[&"umount", &"--root", &root, &dir]));
    assert_nothing_left(tmp.path());
}

#[test]
fn the_control_socket_is_private_and_serves_past_idle_and_overlong_callers() {
    use std::io::{BufRead, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let (lower, upper, _) = build_layers(tmp.path());
    let LayoutMount {
        image, root, dir, ..
    } = LayoutMount::new(tmp.path(), &[&lower, &upper], LAZYBD_LAYER);
    ok(&lazybd(&[&"mount", &"--root", &root, &image, &dir]));
    // Unmounts even if an assertion fails.
    let mounted = lazybd_tests::cli::MountGuard::new(&root, &dir);
    let socket = std::fs::read_dir(root.join("mounts"))
        .unwrap()
        .map(|e| e.unwrap().path().join("control.sock"))
        .find(|p| p.exists())
        .expect("the mount's control socket");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // Callers that never finish their request line, or send a huge one.
    let mut idle = Vec::new();
    for i in 0..64 {
        let mut s = UnixStream::connect(&socket).unwrap();
        if i % 8 == 0 {
            s.set_write_timeout(Some(std::time::Duration::from_millis(50)))
                .unwrap();
            let _ = s.write_all(&vec![b'x'; 64 << 10]);
        }
        idle.push(s);
    }
    let start = std::time::Instant::now();
    let json = ok(&lazybd(&[&"stats", &"--root", &root, &"--json", &dir]));
    assert!(json.contains("\"layers\""), "{json}");
    assert!(
        start.elapsed() < std::time::Duration::from_secs(3),
        "stats waited {:?} behind idle callers",
        start.elapsed()
    );
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut long = vec![b'y'; 10_000];
    long.push(b'\n');
    s.write_all(&long).unwrap();
    let mut reply = String::new();
    std::io::BufReader::new(&s).read_line(&mut reply).unwrap();
    assert!(reply.starts_with("error: unknown request"), "{reply}");
    assert!(reply.len() < 200, "{reply}");
    drop(idle);
    // `lazybd umount`; nothing may be left.
    drop(mounted);
    assert_nothing_left(tmp.path());
}
