//! Content trust (docs/security.md): a lazy layer is exactly the bytes its
//! image's manifest names, whatever a registry, mirror or super node serves
//! under its digest. Each test is an attack that worked before nodes checked
//! the layer's anchor (the sha256 of its index, on the layer descriptor and
//! as its diff_id):
//!
//! - the forged image: an attacker's registry serves the attacker's own,
//!   self-consistent layer under a victim's layer digest. Pulled into one
//!   containerd (other namespaces), before or after the victim's image and
//!   again after a snapshotter restart, each image reads its own files; an
//!   image that claims the victim's snapshot name (chain ID) or anchor with
//!   the attacker's bytes is refused;
//! - a super node answering the tail range with a foreign, self-consistent
//!   tail: refused, and the layer attaches from the registry;
//! - a version 1 layer (no anchor): refused unless the operator allows it,
//!   then it still pulls, runs and mounts.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use lazybd_blockdev::oci::{canonical_json, digest_of, ANN_INDEX_DIGEST};
use lazybd_tests::cli::{fails, lazybd, ok, MountGuard};
use lazybd_tests::containerd::{Containerd, LazyRun};
use lazybd_tests::images::{noise, write_image, Compression, TarLayer};
use lazybd_tests::lazy_layers::{
    check_tree, write_layout, write_layout_v1, BlobFile, LAZYBD_LAYER,
};
use lazybd_tests::p2p::LyingSupernode;
use lazybd_tests::registry::Registry;
use lazybd_tests::require_root;
use lazybd_tests::snapshotter::SnapshotterDaemon;
use serde_json::{json, Value};

const VICTIM_SECRET: &str = "the victim's own file\n";
const ATTACKER_SECRET: &str = "the attacker's file\n";

/// busybox (so `ctr run` has a program) and its `sh` and `cat`.
fn base_layer() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox")
        .expect("/bin/busybox (apt install busybox-static; hack/install-deps.sh does)");
    let mut t = TarLayer::new();
    t.dir("bin", 0o755)
        .file("bin/busybox", 0o755, &busybox)
        .symlink("bin/sh", "busybox")
        .symlink("bin/cat", "busybox")
        .dir("etc", 0o755);
    t.finish()
}

/// `/etc/secret` and some filler, so the layer has several chunks.
fn secret_layer(secret: &str, seed: u64) -> Vec<u8> {
    let mut t = TarLayer::new();
    t.dir("etc", 0o755)
        .file("etc/secret", 0o644, secret.as_bytes())
        .file("etc/filler", 0o644, &noise(seed, 300 << 10));
    t.finish()
}

/// Pushes the image `[base, secret]` to `registry` as `NAME:v1`, converts
/// it with `lazybd convert` to `NAME:lazy`, and returns the converted
/// manifest.
fn publish_converted(
    dir: &Path,
    registry: &Registry,
    name: &str,
    secret: &str,
    seed: u64,
) -> Value {
    let layout = dir.join(name);
    let layers = [base_layer(), secret_layer(secret, seed)];
    write_image(&layout, "v1", &layers, &[Compression::Gzip; 2]);
    registry.push_layout(&layout, "v1", &format!("{name}:v1"));
    let out = ok(&lazybd(&[
        &"convert",
        &"--plain-http",
        &"--json",
        &"--chunk-size",
        &"65536",
        &"--work-dir",
        &dir,
        &registry.reference(&format!("{name}:v1")),
        &registry.reference(&format!("{name}:lazy")),
    ]));
    let converted: Value = serde_json::from_str(&out).expect("convert --json");
    let manifest = converted["manifest_digest"].as_str().unwrap();
    serde_json::from_slice(&registry.read_blob(manifest)).unwrap()
}

/// The victim's converted image in one registry, the attacker's in another,
/// and in the attacker's, images built on the victim's top layer digest.
struct Forgery {
    victim_registry: Registry,
    attacker_registry: Registry,
    tmp: tempfile::TempDir,
    /// The victim's image, as converted.
    victim: String,
    /// The attacker's converted image with its top layer's digest replaced
    /// by the victim's (the attacker's registry serves the attacker's blob
    /// under it): self-consistent, its own anchor and diff_id.
    forged: String,
    /// `forged`, with a config whose diff_ids name the victim's anchor: its
    /// top snapshot's name is the victim's.
    claim: String,
    /// `claim`, with the victim's anchor on the layer descriptor too.
    lie: String,
    /// The top layers' anchors.
    victim_anchor: String,
    attacker_anchor: String,
}

impl Forgery {
    fn new() -> Forgery {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let (victim_registry, attacker_registry) = (Registry::start(), Registry::start());
        let victim_m = publish_converted(t, &victim_registry, "victim", VICTIM_SECRET, 1);
        let attacker_m = publish_converted(t, &attacker_registry, "attacker", ATTACKER_SECRET, 2);
        let top = |m: &Value, what: &str| -> String {
            match what {
                "digest" => m["layers"][1]["digest"].as_str().unwrap().to_owned(),
                _ => m["layers"][1]["annotations"][ANN_INDEX_DIGEST]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            }
        };
        let (victim_digest, victim_anchor) = (top(&victim_m, "digest"), top(&victim_m, "anchor"));
        let attacker_anchor = top(&attacker_m, "anchor");
        assert_ne!(victim_digest, top(&attacker_m, "digest"));
        assert_ne!(victim_anchor, attacker_anchor);
        let r = &attacker_registry;
        r.plant_blob(
            "attacker",
            &victim_digest,
            &r.read_blob(&top(&attacker_m, "digest")),
        );

        let mut forged = attacker_m.clone();
        forged["layers"][1]["digest"] = json!(victim_digest);
        r.put_manifest("attacker", "forged", &canonical_json(&forged).unwrap());

        let config_digest = attacker_m["config"]["digest"].as_str().unwrap();
        let mut config: Value = serde_json::from_slice(&r.read_blob(config_digest)).unwrap();
        config["rootfs"]["diff_ids"][1] = json!(victim_anchor);
        let config = canonical_json(&config).unwrap();
        r.plant_blob("attacker", &digest_of(&config), &config);
        let mut claim = forged.clone();
        claim["config"]["digest"] = json!(digest_of(&config));
        claim["config"]["size"] = json!(config.len());
        r.put_manifest("attacker", "claim", &canonical_json(&claim).unwrap());

        let mut lie = claim.clone();
        lie["layers"][1]["annotations"][ANN_INDEX_DIGEST] = json!(victim_anchor);
        r.put_manifest("attacker", "lie", &canonical_json(&lie).unwrap());

        Forgery {
            victim: victim_registry.reference("victim:lazy"),
            forged: r.reference("attacker:forged"),
            claim: r.reference("attacker:claim"),
            lie: r.reference("attacker:lie"),
            victim_anchor,
            attacker_anchor,
            victim_registry,
            attacker_registry,
            tmp,
        }
    }

    /// A snapshotter that reads both registries.
    fn snapshotter(&self) -> SnapshotterDaemon {
        SnapshotterDaemon::start(
            &self.tmp.path().join("snapshotter"),
            &format!(
                "[registry]\nplain_http = [\"{}\", \"{}\"]\n",
                self.victim_registry.host(),
                self.attacker_registry.host()
            ),
        )
    }

    /// [`Forgery::snapshotter`], and containerd on it. Fields of the caller
    /// drop containerd first.
    fn node(&self) -> (Containerd, SnapshotterDaemon) {
        let snapshotter = self.snapshotter();
        let ctd = Containerd::builder()
            .proxy_snapshotter(snapshotter.proxy())
            .namespace("tenant-a")
            .start();
        (ctd, snapshotter)
    }
}

/// `lazybd pull` of `image` into namespace `ns`.
fn pull(ctd: &Containerd, ns: &str, image: &str) -> Output {
    lazybd(&[
        &"pull",
        &"--plain-http",
        &"--address",
        &ctd.socket(),
        &"-n",
        &ns,
        &image,
    ])
}

/// [`pull`] that must succeed; retried (bounded) while containerd is still
/// reconnecting to a restarted snapshotter.
fn pull_ok(ctd: &Containerd, ns: &str, image: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = pull(ctd, ns, image);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !stderr.contains("Unavailable") || Instant::now() > deadline {
            return ok(&out);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// What a container of `image` in `ns` reads at `path`. Retried (bounded):
/// after a snapshotter restart, containerd reconnects with a backoff.
fn read_in_container(ctd: &Containerd, ns: &str, image: &str, path: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let id = format!("c{}", N.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        let out = ctd.ctr_in(
            ns,
            &LazyRun {
                image,
                id: &id,
                cmd: &["/bin/cat", path],
                ..LazyRun::default()
            }
            .args(),
        );
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "ctr -n {ns} run {image}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            ctd.log_tail()
        );
        let _ = ctd.ctr_in(ns, &["container", "rm", &id]);
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_forged_layer_pulled_before_the_victim_never_reaches_it() {
    require_root!();
    let f = Forgery::new();
    let (ctd, mut snapshotter) = f.node();

    ok(&pull(&ctd, "tenant-a", &f.forged));
    assert_eq!(
        read_in_container(&ctd, "tenant-a", &f.forged, "/etc/secret"),
        ATTACKER_SECRET,
        "the forged image reads its own layer"
    );
    // The victim's snapshot name with the attacker's anchor: `lazybd pull`
    // prepares the layers as their anchors name them and refuses the
    // config, with the reason (the CRI path, which names snapshots by the
    // config, is refused by the snapshotter: the test below).
    let e = fails(&pull(&ctd, "tenant-c", &f.claim));
    assert!(
        e.contains("chain ID") && e.contains("docs/security.md"),
        "{e}\n{}",
        snapshotter.log()
    );
    // The victim's anchor too: the attacker's bytes do not hash to it.
    let e = fails(&pull(&ctd, "tenant-d", &f.lie));
    assert!(e.contains("did not attach"), "{e}");
    assert!(
        snapshotter.log().contains("is not the layer's anchor"),
        "{}",
        snapshotter.log()
    );

    ok(&pull(&ctd, "tenant-b", &f.victim));
    assert_eq!(
        read_in_container(&ctd, "tenant-b", &f.victim, "/etc/secret"),
        VICTIM_SECRET
    );

    snapshotter.restart();
    assert_eq!(
        read_in_container(&ctd, "tenant-b", &f.victim, "/etc/secret"),
        VICTIM_SECRET,
        "after a restart"
    );
    assert_eq!(
        read_in_container(&ctd, "tenant-a", &f.forged, "/etc/secret"),
        ATTACKER_SECRET,
        "after a restart"
    );
    drop((ctd, snapshotter));
}

/// CRI names layer snapshots by the config's diff_ids alone: the
/// snapshotter refuses to attach the attacker's layer under the victim's
/// snapshot name, and the victim's image pulled after it is its own.
#[test]
fn a_config_claiming_another_layers_snapshot_name_is_refused_over_cri() {
    require_root!();
    let f = Forgery::new();
    let snapshotter = f.snapshotter();
    let ctd = Containerd::builder()
        .proxy_snapshotter(snapshotter.proxy())
        .cri_snapshotter("lazybd")
        .plain_http_registry(&f.victim_registry.host())
        .plain_http_registry(&f.attacker_registry.host())
        .start();

    let snapshots = || {
        let listed = ctd.ctr_in("k8s.io", &["snapshots", "--snapshotter", "lazybd", "ls"]);
        String::from_utf8_lossy(&listed.stdout).into_owned()
    };
    let before = snapshots();
    let e = ctd.try_pull_image(&f.claim).unwrap_err();
    assert!(
        e.contains("FailedPrecondition")
            && e.contains("another layer's snapshot name")
            && e.contains("docs/security.md"),
        "{e}\n{}",
        snapshotter.log()
    );
    // The base layer the refused pull committed is no image's: containerd
    // collects it, and a pull that found it just before fails (containerd's
    // own race between its garbage collector and an unpack).
    ctd.wait_for(
        30,
        "containerd to collect the refused pull's snapshots",
        || snapshots() == before,
    );
    ctd.pull_image(&f.victim);
    let anchors = snapshotter.layer_fields("anchor");
    assert!(anchors.contains(&f.victim_anchor), "{anchors:?}");
    assert!(
        !anchors.contains(&f.attacker_anchor),
        "the refused layer stays unattached: {anchors:?}"
    );
    drop((ctd, snapshotter));
}

#[test]
fn a_forged_layer_pulled_after_the_victim_reads_its_own_bytes() {
    require_root!();
    let f = Forgery::new();
    let (ctd, mut snapshotter) = f.node();

    ok(&pull(&ctd, "tenant-b", &f.victim));
    assert_eq!(
        read_in_container(&ctd, "tenant-b", &f.victim, "/etc/secret"),
        VICTIM_SECRET
    );
    ok(&pull(&ctd, "tenant-a", &f.forged));
    assert_eq!(
        read_in_container(&ctd, "tenant-a", &f.forged, "/etc/secret"),
        ATTACKER_SECRET,
        "the forged image never shares the victim's attachment"
    );
    let layers = snapshotter.control(&json!({"op": "layers"}));
    let layers = layers["layers"].as_array().unwrap();
    // The base layer (the same in both), and one top layer each: two
    // identities for one blob digest.
    assert_eq!(layers.len(), 3, "{layers:?}");

    snapshotter.restart();
    assert_eq!(
        read_in_container(&ctd, "tenant-a", &f.forged, "/etc/secret"),
        ATTACKER_SECRET,
        "after a restart"
    );
    assert_eq!(
        read_in_container(&ctd, "tenant-b", &f.victim, "/etc/secret"),
        VICTIM_SECRET,
        "after a restart"
    );
    drop((ctd, snapshotter));
}

#[test]
fn a_super_node_serving_a_foreign_tail_is_refused_and_the_registry_serves() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let tree = t.join("tree");
    std::fs::create_dir_all(tree.join("data")).unwrap();
    let data = noise(21, 1 << 20);
    std::fs::write(tree.join("data/noise.bin"), &data).unwrap();
    std::fs::write(tree.join("data/hello"), "hello\n").unwrap();

    let honest_dir = t.join("honest");
    std::fs::create_dir_all(&honest_dir).unwrap();
    let honest = BlobFile::from_tree(&tree, &honest_dir, 64 << 10);
    // The attacker's: the same filesystem with other bytes in the file, a
    // blob of the same length with a self-consistent tail.
    let foreign = honest.foreign_twin(
        &honest_dir.join("layer.erofs"),
        &data,
        &noise(22, data.len()),
        &t.join("foreign"),
    );

    let registry = Registry::start();
    let layout = t.join("layout");
    write_layout(&layout, &[&honest], LAZYBD_LAYER);
    registry.push_layout(&layout, "latest", "img:latest");
    let liar = LyingSupernode::start(&foreign.path);
    let peer_port = lazybd_tests::free_port();
    let config = t.join("p2p.toml");
    std::fs::write(
        &config,
        format!(
            "[p2p]\nsupernode = \"http://{}\"\nlisten = \"127.0.0.1:{peer_port}\"\n\
             heartbeat_ms = 1000\npeer_timeout_ms = 2000\nsupernode_timeout_ms = 2000\n",
            liar.addr
        ),
    )
    .unwrap();
    let (root, dir) = (t.join("root"), t.join("mnt"));
    std::fs::create_dir_all(&dir).unwrap();
    let guard = MountGuard::new(&root, &dir);
    ok(&lazybd(&[
        &"mount",
        &"--root",
        &root,
        &"--plain-http",
        &"--read-deadline",
        &"30",
        &"--p2p-config",
        &config,
        &registry.reference("img:latest"),
        &dir,
    ]));

    check_tree(&tree, &dir).expect("the mount reads the image's own bytes");
    assert!(
        liar.blob_requests.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the super node was asked (and lied)"
    );
    let stats = guard.stats();
    let chunks = |name: &str| {
        stats["stats"]["sources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .map_or(0, |s| s["chunks"].as_u64().unwrap())
    };
    assert_eq!(chunks("supernode"), 0, "{stats}");
    assert!(chunks("registry") > 0, "{stats}");
    let log = mount_log(&root);
    assert!(
        log.contains("supernode rejected") && log.contains("is not the layer's anchor"),
        "{log}"
    );
    drop(guard);
}

/// The log of the one `lazybd mount` under `root`.
fn mount_log(root: &Path) -> String {
    let mounts: Vec<PathBuf> = std::fs::read_dir(root.join("mounts"))
        .unwrap()
        .map(|e| e.unwrap().path().join("mount.log"))
        .collect();
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    std::fs::read_to_string(&mounts[0]).unwrap()
}

#[test]
fn a_version_1_layer_needs_the_operators_opt_in() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let tree = t.join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).expect("/bin/busybox");
    for link in ["sh", "cat"] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(link)).unwrap();
    }
    std::fs::write(tree.join("etc/hello"), "hello from version 1\n").unwrap();
    let out = t.join("blob");
    std::fs::create_dir_all(&out).unwrap();
    let blob = BlobFile::from_tree_v1(&tree, &out, 64 << 10);
    assert_eq!(blob.written.index.version, 1);
    let layout = t.join("layout");
    write_layout_v1(&layout, &[&blob]);
    let registry = Registry::start();
    registry.push_layout(&layout, "latest", "old:v1");
    let image = registry.reference("old:v1");

    let plain = format!("[registry]\nplain_http = [\"{}\"]\n", registry.host());
    let mut snapshotter = SnapshotterDaemon::start(&t.join("snapshotter"), &plain);
    let ctd = Containerd::builder()
        .proxy_snapshotter(snapshotter.proxy())
        .namespace("default")
        .start();
    let e = fails(&pull(&ctd, "default", &image));
    assert!(
        e.contains("allow_unanchored_layers") && e.contains("version 1"),
        "{e}\n{}",
        snapshotter.log()
    );
    let attached = snapshotter.control(&json!({"op": "layers"}));
    assert_eq!(attached["layers"], json!([]), "{attached}");

    snapshotter.rewrite_config(&format!(
        "{plain}[remote]\nallow_unanchored_layers = true\n"
    ));
    snapshotter.restart();
    let pulled = pull_ok(&ctd, "default", &image);
    assert!(pulled.contains("1 attached lazily"), "{pulled}");
    assert_eq!(
        read_in_container(&ctd, "default", &image, "/etc/hello"),
        "hello from version 1\n"
    );
    let listed = snapshotter.control(&json!({"op": "layers"}));
    assert_eq!(
        listed["layers"][0]["digest"],
        json!(blob.digest),
        "{listed}"
    );
    assert_eq!(listed["layers"][0]["anchor"], Value::Null, "{listed}");

    // `lazybd mount` of the same layers: the same rule, as a flag.
    let (root, dir) = (t.join("root"), t.join("mnt"));
    std::fs::create_dir_all(&dir).unwrap();
    let layout_ref = format!("{}:latest", layout.display());
    let guard = MountGuard::new(&root, &dir);
    let e = fails(&lazybd(&[&"mount", &"--root", &root, &layout_ref, &dir]));
    assert!(e.contains("--allow-unanchored"), "{e}");
    ok(&lazybd(&[
        &"mount",
        &"--root",
        &root,
        &"--allow-unanchored",
        &layout_ref,
        &dir,
    ]));
    check_tree(&tree, &dir).expect("the version 1 layer mounts");
    drop(guard);
    drop((ctd, snapshotter));
}
