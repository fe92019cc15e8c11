//! Images for CRI tests, built here from Debian's busybox-static and written
//! as OCI archives for `ctr images import`: a pause image (what a real node
//! pulls as `registry.k8s.io/pause`) and a small busybox image.

use std::path::{Path, PathBuf};

use lazybd_blockdev::oci::{canonical_json, digest_of, OciLayout};
use oci_spec::image::{Descriptor, Digest, MediaType};
use serde_json::json;

use crate::images::TarLayer;

/// The sandbox image every pod of the harness runs.
pub const PAUSE_IMAGE: &str = "lazybd.test/pause:1";
/// A busybox image for the containers of CRI tests.
pub const BUSYBOX_IMAGE: &str = "lazybd.test/busybox:1";

const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "true", "ls", "tr", "hostname", "id", "ip",
];

fn busybox_layer() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static (hack/install-deps.sh)");
    let mut layer = TarLayer::new();
    layer.dir("bin", 0o755).file("bin/busybox", 0o755, &busybox);
    for applet in APPLETS {
        layer.symlink(&format!("bin/{applet}"), "busybox");
    }
    for dir in ["proc", "sys", "dev", "tmp", "etc", "run"] {
        layer.dir(dir, 0o755);
    }
    layer.finish()
}

/// Writes an OCI archive of a one-layer busybox image named `name` whose
/// config runs `entrypoint`; returns the archive's path.
fn archive(dir: &Path, name: &str, entrypoint: &[&str]) -> PathBuf {
    let layout_dir = dir.join(format!("layout-{}", name.replace(['/', ':'], "_")));
    let layout = OciLayout::open_or_create(&layout_dir).expect("create OCI layout");
    let tar = busybox_layer();
    // Uncompressed: the lazybd snapshotter and overlayfs apply it alike, and
    // gzip would only cost time here.
    let layer_digest = layout.put_blob(&tar).unwrap();
    let config = canonical_json(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [digest_of(&tar)]},
    }))
    .unwrap();
    let config_digest = layout.put_blob(&config).unwrap();
    let manifest = canonical_json(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": tar.len()}],
    }))
    .unwrap();
    let digest = layout.put_blob(&manifest).unwrap();
    let desc = Descriptor::new(
        MediaType::ImageManifest,
        manifest.len() as u64,
        digest.parse::<Digest>().unwrap(),
    );
    layout.tag(name, &desc).unwrap();
    let path = layout_dir.with_extension("tar");
    let mut tar = tar::Builder::new(std::fs::File::create(&path).unwrap());
    tar.append_dir_all(".", &layout_dir).unwrap();
    tar.finish().unwrap();
    path
}

/// The pause image: pid 1 of every sandbox, it only has to live until
/// StopPodSandbox kills it (CRI stops sandboxes with SIGKILL).
pub fn pause_archive(dir: &Path) -> PathBuf {
    archive(dir, PAUSE_IMAGE, &["/bin/sleep", "2147483647"])
}

pub fn busybox_archive(dir: &Path) -> PathBuf {
    archive(dir, BUSYBOX_IMAGE, &["/bin/sh"])
}
