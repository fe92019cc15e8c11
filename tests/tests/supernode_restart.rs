//! A super node restart does not send the datacenter back to the registry:
//! its block cache survives the restart. A node reads a lazy image through
//! the super node (real docker-registry, `lazybd-supernode`, `lazybd mount`
//! with P2P on loopback); the super node is SIGKILLed and started again on
//! the same cache directory; a fresh node reads the same image through it,
//! and the registry sends nothing.

use std::path::Path;

use lazybd_tests::cli::{lazybd, ok, MountGuard};
use lazybd_tests::images::publish_lazy_rich;
use lazybd_tests::registry::Registry;
use lazybd_tests::supernode::Supernode;
use lazybd_tests::{free_port, require_root};

const TOKEN: &str = "supernode-restart-token";

fn start_supernode(dir: &Path, listen: &str, registry: &Registry) -> Supernode {
    let token = dir.join("token");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&token, TOKEN).unwrap();
    Supernode::start(
        dir,
        listen,
        &registry.host(),
        &[&"--cluster-token-file", &token],
        None,
    )
}

/// The super node's `/v1/stats`.
fn stats(sn: &Supernode) -> serde_json::Value {
    let (status, body) = lazybd_tests::http::request(
        None,
        "GET",
        &sn.addr,
        "/v1/stats",
        &[("x-lazybd-token", TOKEN)],
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// Mounts `image` on a fresh root with P2P through `sn`, reads every file,
/// and returns the bytes each source sent.
fn read_through(t: &Path, name: &str, image: &str, sn: &Supernode) -> (u64, u64) {
    let config = t.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[p2p]\nsupernode = \"http://{}\"\nlisten = \"127.0.0.1:{}\"\n\
             cluster_token = \"{TOKEN}\"\nsupernode_timeout_ms = 5000\n",
            sn.addr,
            free_port()
        ),
    )
    .unwrap();
    let (root, dir) = (
        t.join(format!("{name}-root")),
        t.join(format!("{name}-mnt")),
    );
    std::fs::create_dir_all(&dir).unwrap();
    ok(&lazybd(&[
        &"mount",
        &"--plain-http",
        &"--p2p-config",
        &config,
        &"--root",
        &root,
        &image,
        &dir,
    ]));
    let m = MountGuard::new(&root, &dir);
    let big = std::fs::read(dir.join("data/big")).unwrap();
    assert_eq!(big.len(), 6 << 20);
    let stats = m.stats();
    let from = |source: &str| {
        stats["stats"]["sources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == source)
            .map_or(0, |s| s["bytes"].as_u64().unwrap())
    };
    (from("supernode"), from("registry"))
}

#[test]
fn a_restarted_super_node_serves_from_its_kept_cache() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let registry = Registry::start();
    publish_lazy_rich(t, &registry);
    let image = registry.reference("rich:lazy");
    let listen = format!("127.0.0.1:{}", free_port());
    let sn_dir = t.join("sn");

    let mut sn = start_supernode(&sn_dir, &listen, &registry);
    let (via_sn, direct) = read_through(t, "a", &image, &sn);
    assert!(
        via_sn > 1 << 20,
        "node A got {via_sn} bytes from the super node"
    );
    assert_eq!(direct, 0, "node A went to the registry itself");
    let first = stats(&sn);
    assert!(
        first["registry_bytes"].as_u64().unwrap() >= via_sn,
        "{first}"
    );

    sn.kill();
    drop(sn);
    let sn = start_supernode(&sn_dir, &listen, &registry);
    let (via_sn, direct) = read_through(t, "b", &image, &sn);
    assert!(
        via_sn > 1 << 20,
        "node B got {via_sn} bytes from the super node"
    );
    assert_eq!(direct, 0, "node B went to the registry itself");
    let second = stats(&sn);
    // The counters restart with the process: everything node B read came
    // from the kept blocks, nothing from the registry.
    assert_eq!(second["registry_bytes"], 0, "{second}");
    assert!(second["block_hits"].as_u64().unwrap() > 0, "{second}");
}
