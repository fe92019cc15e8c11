//! What runs on a P2P node, in its netns: `lazybd mount` (with or without
//! `--p2p-config`), or a lazybd-snapshotter with a `[p2p]` table.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::{Fabric, PEER_PORT, PROXY_PORT, SUPERNODE_PORT};
use crate::bin_path;
use crate::cli::MountGuard;
use crate::snapshotter::SnapshotterDaemon;

/// One node: `lazybd mount` in its netns, unmounted on drop.
pub struct Node {
    pub i: usize,
    /// Its peer address (empty without P2P).
    pub addr: String,
    /// Where the image is mounted.
    pub dir: PathBuf,
    guard: MountGuard,
}

impl Node {
    /// `lazybd mount --p2p-config` of `image` on node `i`, its config
    /// pointing at the hub's super node (https when `extra_toml` has a
    /// `[p2p.tls]` table), plus `extra_toml` and `extra_args`.
    pub fn mount(
        f: &Fabric,
        tmp: &Path,
        i: usize,
        image: &str,
        extra_toml: &str,
        extra_args: &[&dyn AsRef<OsStr>],
    ) -> Node {
        // Plain HTTP on the test bridge must be allowed explicitly.
        let (scheme, insecure) = if extra_toml.contains("[p2p.tls]") {
            ("https", "")
        } else {
            ("http", "allow_insecure = true\n")
        };
        let addr = format!("{}:{PEER_PORT}", f.node_ip(i));
        let cfg = tmp.join(format!("node{i}")).join("lazybd.toml");
        std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
        std::fs::write(
            &cfg,
            format!(
                "[p2p]\nsupernode = \"{scheme}://{}:{SUPERNODE_PORT}\"\nlisten = \"{addr}\"\n\
                 heartbeat_ms = 1000\npeer_timeout_ms = 5000\nsupernode_timeout_ms = 5000\n\
                 {insecure}{extra_toml}",
                f.hub_ip()
            ),
        )
        .unwrap();
        Self::try_mount(f, tmp, i, image, &cfg, extra_args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `lazybd mount --p2p-config CFG` of `image` on node `i`, as it is;
    /// `Err(stderr)` when it fails.
    pub fn try_mount(
        f: &Fabric,
        tmp: &Path,
        i: usize,
        image: &str,
        cfg: &Path,
        extra_args: &[&dyn AsRef<OsStr>],
    ) -> Result<Node, String> {
        let addr = format!("{}:{PEER_PORT}", f.node_ip(i));
        let mut args: Vec<&dyn AsRef<OsStr>> =
            vec![&"--read-deadline", &"30", &"--p2p-config", &cfg];
        args.extend_from_slice(extra_args);
        Self::run_mount(f, tmp, i, image, &args, addr)
    }

    /// A node reading the registry directly (no P2P), for the bench baseline.
    pub fn mount_direct(f: &Fabric, tmp: &Path, i: usize, image: &str) -> Node {
        Self::run_mount(f, tmp, i, image, &[], String::new()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `lazybd mount --root ROOT --plain-http ARGS IMAGE DIR` in node `i`'s
    /// netns, under `tmp/node<i>`.
    fn run_mount(
        f: &Fabric,
        tmp: &Path,
        i: usize,
        image: &str,
        args: &[&dyn AsRef<OsStr>],
        addr: String,
    ) -> Result<Node, String> {
        let base = tmp.join(format!("node{i}"));
        let (root, dir) = (base.join("root"), base.join("mnt"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new(bin_path("lazybd"));
        cmd.arg("mount")
            .arg("--root")
            .arg(&root)
            .arg("--plain-http");
        for arg in args {
            cmd.arg(arg);
        }
        cmd.arg(image).arg(&dir);
        f.nodes[i].enter(&mut cmd);
        let guard = MountGuard::new(&root, &dir);
        let out = cmd.output().expect("run lazybd mount");
        if !out.status.success() {
            return Err(format!(
                "lazybd mount failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(Node {
            i,
            addr,
            dir,
            guard,
        })
    }

    /// The node's P2P stats, per peer and layer (`lazybd stats --p2p`: its
    /// own operator's view; `/v1/stats` shows others only aggregates).
    pub fn p2p_stats(&self) -> Value {
        self.guard.p2p_stats()
    }

    /// Chunks the mount took from source `name` (`peer`, `supernode`, ...).
    pub fn source_chunks(&self, name: &str) -> u64 {
        let v = self.guard.stats();
        v["stats"]["sources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .map(|s| s["chunks"].as_u64().unwrap())
            .unwrap_or(0)
    }
}

/// `lazybd-snapshotter` with a `[p2p]` table in node `i`'s netns (metrics
/// on the node's address), under `tmp/snap<i>`.
pub fn snapshotter_node(f: &Fabric, tmp: &Path, i: usize) -> SnapshotterDaemon {
    snapshotter_node_with(f, tmp, i, "")
}

/// [`snapshotter_node`] with `extra_toml` (more tables) in its config.
pub fn snapshotter_node_with(
    f: &Fabric,
    tmp: &Path,
    i: usize,
    extra_toml: &str,
) -> SnapshotterDaemon {
    let config = format!(
        "[registry]\nplain_http = [\"{hub}:{PROXY_PORT}\"]\n[p2p]\n\
         supernode = \"http://{hub}:{SUPERNODE_PORT}\"\nlisten = \"{}:{PEER_PORT}\"\n\
         heartbeat_ms = 1000\nallow_insecure = true\n{extra_toml}",
        f.node_ip(i),
        hub = f.hub_ip()
    );
    SnapshotterDaemon::start_in_netns(
        &tmp.join(format!("snap{i}")),
        &config,
        &f.nodes[i].name,
        &format!("{}:9880", f.node_ip(i)),
    )
}
