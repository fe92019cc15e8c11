//! The P2P test fabric: a registry (behind a counting proxy), a
//! `lazybd-supernode` and nodes that each run a real `lazybd mount
//! --p2p-config` or lazybd-snapshotter, every node in its own network
//! namespace on a private bridge (10.213.N.0/24, addresses only inside the
//! test's namespaces).
//!
//! Topology: a "hub" netns holds the bridge (10.213.N.1), the super node and
//! the proxy's listening socket (the proxy forwards to the registry on the
//! host's 127.0.0.1); node i lives in its own netns at 10.213.N.(10+i).
//! Processes are put into a netns with setns(CLONE_NEWNET) only, so the
//! mounts they make are visible to the test.

mod fabric;
mod fake_peer;
mod lying_supernode;
mod node;
mod pki;
mod proxy;
mod scripted;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

pub use fabric::{Fabric, RegistryLink};
pub use fake_peer::{Fake, FakePeer};
pub use lying_supernode::LyingSupernode;
pub use node::{snapshotter_node, snapshotter_node_with, Node};
pub use pki::{docker_config, Pki, TOKEN};
pub use proxy::{blob_ranges, CountingProxy, Seen};
pub use scripted::{Answer, ScriptedServer, ENDLESS_CAP};

use crate::images::noise;
pub use crate::lazy_layers::check_tree;
use crate::lazy_layers::{write_layout, BlobFile, LAZYBD_LAYER};
use crate::registry::Registry;
use crate::supernode::Supernode;

pub const PEER_PORT: u16 = 7070;
pub const SUPERNODE_PORT: u16 = 7443;
pub const PROXY_PORT: u16 = 5000;

/// The counting proxy in the hub at `hub:PROXY_PORT`, in front of `registry`.
pub fn hub_proxy(f: &Fabric, registry: &Registry) -> CountingProxy {
    CountingProxy::start(
        &f.hub,
        format!("{}:{PROXY_PORT}", f.hub_ip()).parse().unwrap(),
        registry.host().parse().unwrap(),
    )
}

/// The super node in the hub at `hub:SUPERNODE_PORT`, reading the registry
/// through the hub's proxy; `extra` are more arguments (TLS, tokens).
pub fn hub_supernode(
    f: &Fabric,
    dir: &Path,
    fanout: usize,
    member_ttl_ms: u64,
    extra: &[&dyn AsRef<OsStr>],
) -> Supernode {
    let registry = format!("{}:{PROXY_PORT}", f.hub_ip());
    supernode(f, dir, fanout, member_ttl_ms, extra, &registry)
}

/// The super node in the hub whose registry is at `registry` (`ip:port`).
/// Without `--tls-cert` in `extra` it serves plain HTTP on the bridge, which
/// it must be told is allowed (`--allow-insecure`).
pub fn supernode(
    f: &Fabric,
    dir: &Path,
    fanout: usize,
    member_ttl_ms: u64,
    extra: &[&dyn AsRef<OsStr>],
    registry: &str,
) -> Supernode {
    let (fanout, ttl) = (fanout.to_string(), member_ttl_ms.to_string());
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![
        &"--block-kib",
        &"256",
        &"--fanout",
        &fanout,
        &"--member-ttl-ms",
        &ttl,
    ];
    let tls = extra.iter().any(|a| a.as_ref() == OsStr::new("--tls-cert"));
    if !tls {
        args.push(&"--allow-insecure");
    }
    args.extend_from_slice(extra);
    let listen = format!("{}:{SUPERNODE_PORT}", f.hub_ip());
    Supernode::start(dir, &listen, registry, &args, Some(&f.hub.name))
}

/// Tells the hub's super node (plain HTTP) that `peer` (`ip:port`, on the
/// hub) holds `blob` of the image at `hub:PROXY_PORT/p2p`, as a node joining
/// its tree would (the registry is anonymous: the announce passes its
/// check); returns the ticket it got.
pub fn announce(f: &Fabric, blob: &BlobFile, peer: &str) -> String {
    let (status, body) = crate::http::request(
        Some(&f.hub.name),
        "POST",
        &format!("{}:{SUPERNODE_PORT}", f.hub_ip()),
        &format!(
            "/v1/announce?registry={}:{PROXY_PORT}&repo=p2p&blob={}&anchor={}&addr={peer}",
            f.hub_ip(),
            blob.digest,
            blob.anchor()
        ),
        &[],
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
    reply["ticket"].as_str().unwrap().to_owned()
}

/// The image at `hub:PROXY_PORT/p2p:latest` as the nodes name it.
pub fn hub_image(f: &Fabric) -> String {
    format!("{}:{PROXY_PORT}/p2p:latest", f.hub_ip())
}

/// A one-layer image (64 KiB chunks) pushed to `registry` as `p2p:latest`:
/// incompressible noise (raw chunks), compressible text (zstd chunks) and
/// small files; returns the expected tree and the blob.
pub fn publish_image(tmp: &Path, registry: &Registry) -> (PathBuf, BlobFile) {
    let tree = tmp.join("tree");
    std::fs::create_dir_all(tree.join("data")).unwrap();
    std::fs::write(tree.join("data/noise.bin"), noise(7, 3 << 20)).unwrap();
    let text: String = (0..40_000)
        .map(|i| format!("line {i} of some text\n"))
        .collect();
    std::fs::write(tree.join("data/text.txt"), text).unwrap();
    for i in 0..20 {
        std::fs::write(
            tree.join(format!("data/small{i}")),
            format!("small file {i}\n"),
        )
        .unwrap();
    }
    let blob = publish_tree(tmp, &tree, 64 << 10, registry);
    (tree, blob)
}

/// `tree` as a one-layer lazybd image with `chunk_size` chunks, pushed to
/// `registry` as `p2p:latest`.
pub fn publish_tree(tmp: &Path, tree: &Path, chunk_size: u32, registry: &Registry) -> BlobFile {
    let out = tmp.join("blob");
    std::fs::create_dir_all(&out).unwrap();
    let blob = BlobFile::from_tree(tree, &out, chunk_size);
    let layout = tmp.join("layout");
    write_layout(&layout, &[&blob], LAZYBD_LAYER);
    registry.push_layout(&layout, "latest", "p2p:latest");
    blob
}

pub fn drop_page_cache() {
    std::fs::write("/proc/sys/vm/drop_caches", "1").expect("drop page cache");
}

/// `curl` inside netns `ns` (no mounts needed there; it speaks TLS, which
/// [`crate::http`] does not); returns (status, body).
pub fn curl(ns: &str, args: &[&str]) -> (u16, String) {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-sS",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code.trim().parse().unwrap_or(0);
    if code == 0 {
        return (0, String::from_utf8_lossy(&out.stderr).into_owned());
    }
    (code, body.to_owned())
}

/// The peak resident memory of process `pid` so far (VmHWM), in MiB.
pub fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM in /proc/PID/status")
        >> 10
}
