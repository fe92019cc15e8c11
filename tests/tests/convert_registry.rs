//! `lazybd convert`, `inspect` and `mount` against a real docker-registry on
//! 127.0.0.1: the rich test image (whiteouts, opaque dirs, hardlinks,
//! devices, xattrs, setuid, owners) pushed with skopeo, converted registry to
//! registry, and mounted lazily; the lazy mount must equal what umoci unpacks
//! from the original image, fetch only what is read, and fail reads cleanly
//! (EIO, counted) when the registry serves corrupt bytes or is down.

use std::io::Read;
use std::path::Path;
use std::process::Command;

use lazybd_tests::cli::{fails, lazybd, ok, MountGuard};
use lazybd_tests::images::{
    listing, publish_lazy_rich, publish_rich, rich_layers, write_image, Compression,
};
use lazybd_tests::lazy_layers::assert_nothing_left;
use lazybd_tests::registry::Registry;
use lazybd_tests::require_root;

const CHUNK: &str = "65536";

fn convert(tmp: &Path, src: &str, dst: &str, extra: &[&str]) -> String {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"convert",
        &"--plain-http",
        &"--chunk-size",
        &CHUNK,
        &"--work-dir",
        &tmp,
        &src,
        &dst,
    ];
    for e in extra {
        args.push(e);
    }
    ok(&lazybd(&args)).trim().to_owned()
}

fn mount(root: &Path, dir: &Path, image: &str, extra: &[&str]) -> MountGuard {
    std::fs::create_dir_all(dir).unwrap();
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"mount", &"--plain-http", &"--root", &root];
    for e in extra {
        args.push(e);
    }
    args.push(&image);
    args.push(&dir);
    ok(&lazybd(&args));
    MountGuard::new(root, dir)
}

fn source_counter(stats: &serde_json::Value, source: &str, counter: &str) -> u64 {
    stats["stats"]["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == source)
        .map(|s| s[counter].as_u64().unwrap())
        .unwrap_or(0)
}

fn total_chunks(stats: &serde_json::Value) -> u64 {
    stats["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["chunks_total"].as_u64().unwrap())
        .sum()
}

#[test]
fn registry_to_registry_conversion_mounts_lazily_and_matches_an_unpack() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let registry = Registry::start();
    let layout = publish_rich(t, &registry);

    let lazy_ref = registry.reference("rich:lazy");
    let json = |s: String| serde_json::from_str::<serde_json::Value>(&s).unwrap();
    let converted = json(convert(
        t,
        &registry.reference("rich:v1"),
        &lazy_ref,
        &["--json"],
    ));
    // Deterministic: the same again; and from the layout the same layers
    // and config (the manifest differs only in naming its source manifest,
    // which skopeo re-serialized on the way into the registry).
    let again = convert(
        t,
        &registry.reference("rich:v1"),
        &registry.reference("rich:again"),
        &["--json"],
    );
    assert_eq!(json(again), converted);
    let from_layout = json(convert(
        t,
        &format!("oci:{}:v1", layout.display()),
        &format!("oci:{}:lazy", t.join("out").display()),
        &["--json"],
    ));
    assert_eq!(from_layout["layers"], converted["layers"]);
    assert_eq!(from_layout["config_digest"], converted["config_digest"]);

    let inspect = ok(&lazybd(&[
        &"inspect",
        &"--plain-http",
        &"--json",
        &lazy_ref,
    ]));
    let layers: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(layers.as_array().unwrap().len(), 3, "{inspect}");
    assert_eq!(layers[0]["chunk_size"], 65536);

    // The reference: the original image unpacked by umoci.
    let unpacked = t.join("unpacked");
    let out = Command::new("umoci")
        .args(["raw", "unpack", "--image"])
        .arg(format!("{}:v1", layout.display()))
        .arg(&unpacked)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "umoci: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let root = t.join("state");
    let dir = t.join("mnt");
    let m = mount(&root, &dir, &lazy_ref, &[]);

    // One small file costs a few chunks, not the image.
    assert_eq!(
        std::fs::read(dir.join("data/small.txt")).unwrap(),
        b"hello from a small file\n"
    );
    let stats = m.stats();
    let fetched = source_counter(&stats, "registry", "chunks");
    let total = total_chunks(&stats);
    assert!(
        fetched > 0 && fetched * 10 < total,
        "fetched {fetched} of {total} chunks: {stats}"
    );

    let want = listing(&unpacked);
    let got = listing(&dir);
    for (path, entry) in &want {
        assert_eq!(got.get(path), Some(entry), "{path}");
    }
    assert_eq!(
        got.len(),
        want.len(),
        "extra paths: {:?}",
        got.keys()
            .filter(|k| !want.contains_key(*k))
            .collect::<Vec<_>>()
    );
    assert!(!dir.join("etc/removed").exists() && !dir.join("gone").exists());
    assert_eq!(std::fs::read_dir(dir.join("opq")).unwrap().count(), 1);
    assert_eq!(got["etc/hostname"].content, want["etc/hostname"].content);
    assert_eq!(got["data/small.txt"].nlink, Some(2));
    assert_eq!(got["bin/suid"].mode, 0o4755);
    assert_eq!((got["etc/owned"].uid, got["etc/owned"].gid), (1234, 5678));
    assert_eq!(
        got["etc/labelled"]
            .xattrs
            .get("user.lazybd")
            .map(Vec::as_slice),
        Some(&b"kept"[..])
    );
    assert_eq!(
        xattr::get(dir.join("etc/labelled"), "trusted.lazybd")
            .unwrap()
            .as_deref(),
        Some(&b"root only"[..])
    );
    // A program runs from the lazy mount.
    let out = Command::new("chroot")
        .arg(&dir)
        .args(["/bin/sh", "-c", "cat /etc/hostname /data/small.txt"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "lazybd-2\nhello from a small file\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    drop(m);
    assert_nothing_left(t);
}

#[test]
fn the_lazy_layer_depends_only_on_the_uncompressed_tar() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let layers = rich_layers();
    write_image(&t.join("gz"), "v1", &layers, &[Compression::Gzip; 3]);
    write_image(
        &t.join("zst"),
        "v1",
        &layers,
        &[Compression::Zstd, Compression::None, Compression::Zstd],
    );
    let layer_digests = |name: &str| {
        let out = ok(&lazybd(&[
            &"convert",
            &"--json",
            &"--chunk-size",
            &CHUNK,
            &"--work-dir",
            &t,
            &format!("oci:{}:v1", t.join(name).display()),
            &format!("oci:{}:lazy", t.join(format!("{name}-lazy")).display()),
        ]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["layers"].clone()
    };
    let gz = layer_digests("gz");
    assert_eq!(gz.as_array().unwrap().len(), 3);
    assert_eq!(gz, layer_digests("zst"));
}

#[test]
fn basic_auth_credentials_come_from_the_docker_config() {
    require_root!();
    authenticated_round_trip(&Registry::start_with_htpasswd("lazy", "s3cret:pw"));
}

#[test]
fn bearer_tokens_are_fetched_from_the_registrys_token_realm() {
    require_root!();
    let registry = Registry::start_with_token_auth("lazy", "t0ken-pw");
    authenticated_round_trip(&registry);
    assert!(registry.tokens_granted() > 0);
}

/// Without credentials: refused; with the docker config: convert, inspect
/// and a lazy mount work.
fn authenticated_round_trip(registry: &Registry) {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    publish_rich(t, registry);
    let src = registry.reference("rich:v1");
    let dst = registry.reference("rich:lazy");

    let err = fails(&lazybd(&[
        &"convert",
        &"--plain-http",
        &"--work-dir",
        &t,
        &src,
        &dst,
    ]));
    assert!(err.to_lowercase().contains("authoriz"), "{err}");

    let config = registry.docker_config();
    let config = config.to_str().unwrap();
    let digest = convert(t, &src, &dst, &["--docker-config", config]);
    assert!(digest.starts_with("sha256:"));
    let inspect = ok(&lazybd(&[
        &"inspect",
        &"--plain-http",
        &"--docker-config",
        &config,
        &dst,
    ]));
    assert!(inspect.contains("zstd"), "{inspect}");

    let root = t.join("state");
    let dir = t.join("mnt");
    let m = mount(&root, &dir, &dst, &["--docker-config", config]);
    assert_eq!(
        std::fs::read(dir.join("etc/hostname")).unwrap(),
        b"lazybd-2\n"
    );
    drop(m);
    assert_nothing_left(t);
}

/// Converts the rich image into the registry; returns the lazy reference and
/// the digest of the layer holding `data/big`.
fn lazy_rich(t: &Path, registry: &Registry) -> (String, String) {
    let converted = publish_lazy_rich(t, registry);
    let base = converted["layers"][0].as_str().unwrap().to_owned();
    (registry.reference("rich:lazy"), base)
}

#[test]
fn corrupt_bytes_in_the_registry_fail_the_read_and_are_counted() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let registry = Registry::start();
    let (lazy_ref, base) = lazy_rich(t, &registry);

    // Flip bytes in the middle of the base layer's chunk data (data/big is
    // most of it), leaving the index at the blob's end intact.
    let blob = registry.blob_file(&base);
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 3;
    for b in &mut bytes[mid..mid + 4096] {
        *b ^= 0x5a;
    }
    std::fs::write(&blob, &bytes).unwrap();

    let root = t.join("state");
    let dir = t.join("mnt");
    let m = mount(&root, &dir, &lazy_ref, &["--read-deadline", "20"]);
    let mut data = Vec::new();
    let err = std::fs::File::open(dir.join("data/big"))
        .unwrap()
        .read_to_end(&mut data)
        .expect_err("corrupt data must not be served");
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
    let stats = m.stats();
    assert!(
        source_counter(&stats, "registry", "corrupt_chunks") > 0,
        "{stats}"
    );
    // Intact chunks still read.
    assert_eq!(std::fs::read(dir.join("data/big2")).unwrap().len(), 3 << 20);
    drop(m);
    assert_nothing_left(t);
}

#[test]
fn reads_fail_with_eio_when_the_registry_is_down_and_cached_data_still_reads() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let mut registry = Registry::start();
    let (lazy_ref, _) = lazy_rich(t, &registry);
    let root = t.join("state");
    let dir = t.join("mnt");
    let m = mount(&root, &dir, &lazy_ref, &["--read-deadline", "3"]);
    let small = std::fs::read(dir.join("data/small.txt")).unwrap();

    registry.stop();
    let err = std::fs::read(dir.join("data/big2")).expect_err("no source can serve it");
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
    assert_eq!(std::fs::read(dir.join("data/small.txt")).unwrap(), small);
    let stats = m.stats();
    assert!(
        stats["stats"]["read_errors"].as_u64().unwrap() > 0,
        "{stats}"
    );
    drop(m);
    assert_nothing_left(t);
}

#[test]
fn bad_references_and_a_dead_registry_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // Nothing listens on port 1.
    let err = fails(&lazybd(&[
        &"inspect",
        &"--plain-http",
        &"127.0.0.1:1/none:v1",
    ]));
    assert!(err.contains("127.0.0.1:1"), "{err}");
    let err = fails(&lazybd(&[
        &"convert",
        &"--work-dir",
        &t,
        &"Bad Ref!",
        &"oci:/nonexistent",
    ]));
    assert!(err.contains("Bad Ref!"), "{err}");
    let registry = Registry::start();
    let missing = registry.reference("missing:v1");
    let err = fails(&lazybd(&[&"inspect", &"--plain-http", &missing]));
    assert!(err.contains("missing"), "{err}");
}

fn libc_eio() -> i32 {
    nix::errno::Errno::EIO as i32
}

/// `lazybd check`: a converted image passes (every chunk, the anchors, a
/// well-formed EROFS image, the same image as converting the original);
/// flipped bytes in a blob make it fail with the layer and chunk named.
#[test]
fn check_verifies_every_chunk_against_the_original_and_finds_corruption() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let registry = Registry::start();
    let (lazy_ref, base) = lazy_rich(t, &registry);
    let original = registry.reference("rich:v1");
    let check = |extra: &[&str]| {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"check",
            &"--plain-http",
            &"--json",
            &"--work-dir",
            &t,
            &lazy_ref,
        ];
        for e in extra {
            args.push(e);
        }
        lazybd(&args)
    };
    let out = ok(&check(&["--against", &original]));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3, "{report}");
    for l in layers {
        assert_eq!(l["bad_chunks"], 0, "{l}");
        assert!(l["chunks"].as_u64().unwrap() > 0, "{l}");
        assert_eq!(l["erofs_ok"], true, "{l}");
        assert_eq!(l["same_as_original"], true, "{l}");
    }

    let blob = registry.blob_file(&base);
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 3;
    for b in &mut bytes[mid..mid + 4096] {
        *b ^= 0x5a;
    }
    std::fs::write(&blob, &bytes).unwrap();
    let out = check(&[]);
    fails(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false, "{report}");
    let broken = &report["layers"][0];
    assert_eq!(broken["digest"], base.as_str(), "{report}");
    assert!(broken["bad_chunks"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["layers"][1]["bad_chunks"], 0, "{report}");
    // Nothing is left in the work dir.
    let left: Vec<_> = std::fs::read_dir(t)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("lazybd-check-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// `--all-platforms`: every platform of a multi-platform image (an OCI
/// index in the registry) is converted, and an
/// index of the converted manifests is written with their platforms; each
/// passes `lazybd check`. Without the flag one platform's manifest is made.
#[test]
fn every_platform_of_an_index_is_converted_into_an_index() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let layout = t.join("multi");
    let layers = rich_layers();
    let amd64 = write_image(&layout, "amd64", &layers, &[Compression::Gzip; 3]);
    let arm64 = write_image(&layout, "arm64", &layers[..2], &[Compression::Gzip; 2]);
    let entry = |digest: &str, arch: &str| {
        let blob = t
            .join("multi/blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": std::fs::metadata(blob).unwrap().len(),
            "platform": {"os": "linux", "architecture": arch},
        })
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry(&amd64, "amd64"), entry(&arm64, "arm64")],
    });
    let registry = Registry::start();
    for tag in ["amd64", "arm64"] {
        registry.push_layout(&layout, tag, &format!("multi:{tag}"));
    }
    let index_bytes = serde_json::to_vec(&index).unwrap();
    registry.put_manifest("multi", "v1", &index_bytes);

    let out = convert(
        t,
        &registry.reference("multi:v1"),
        &registry.reference("multi:lazy"),
        &["--all-platforms", "--json"],
    );
    let converted: serde_json::Value = serde_json::from_str(&out).unwrap();
    let platforms = converted["platforms"].as_array().expect("platforms");
    let names: Vec<&str> = platforms
        .iter()
        .map(|p| p["platform"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["linux/amd64", "linux/arm64"], "{converted}");
    assert_eq!(platforms[0]["layers"].as_array().unwrap().len(), 3);
    assert_eq!(platforms[1]["layers"].as_array().unwrap().len(), 2);

    // The registry holds an index naming both converted manifests.
    let (status, body) = lazybd_tests::http::request(
        None,
        "GET",
        &registry.host(),
        "/v2/multi/manifests/lazy",
        &[("accept", "application/vnd.oci.image.index.v1+json")],
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let stored: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let entries = stored["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{stored}");
    for (e, p) in entries.iter().zip(platforms) {
        assert_eq!(e["digest"], p["manifest_digest"], "{stored}");
    }
    assert_eq!(entries[1]["platform"]["architecture"], "arm64");
    // Each platform's image is a sound lazybd image.
    for p in platforms {
        let by_digest = format!(
            "{}@{}",
            registry.reference("multi"),
            p["manifest_digest"].as_str().unwrap()
        );
        ok(&lazybd(&[
            &"check",
            &"--plain-http",
            &"--work-dir",
            &t,
            &by_digest,
        ]));
    }

    // Without --all-platforms: --platform's manifest alone.
    let out = convert(
        t,
        &registry.reference("multi:v1"),
        &registry.reference("multi:arm"),
        &["--platform", "linux/arm64", "--json"],
    );
    let one: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(one.get("platforms").is_none(), "{one}");
    assert_eq!(one["layers"].as_array().unwrap().len(), 2, "{one}");
}
