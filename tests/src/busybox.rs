//! Busybox for the containers of the containerd tests, from Debian's
//! busybox-static: a root filesystem for `ctr run --rootfs`, and one-layer
//! images written as OCI archives for `ctr images import`: a pause image
//! (what a real node pulls as `registry.k8s.io/pause`) and a small busybox
//! image.

use std::path::{Path, PathBuf};

use lazybd_blockdev::oci::{canonical_json, digest_of, OciLayout};
use oci_spec::image::{Descriptor, Digest, MediaType};
use serde_json::json;

use crate::images::TarLayer;

/// The sandbox image every pod of a CRI containerd runs.
pub const PAUSE_IMAGE: &str = "lazybd.test/pause:1";
/// A busybox image for the containers of CRI tests.
pub const BUSYBOX_IMAGE: &str = "lazybd.test/busybox:1";

/// Applets the test containers run, linked to busybox.
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "true", "false", "stty", "ls", "head", "dd", "kill", "tail",
    "tr", "hostname", "id", "ip",
];

fn binary() -> Vec<u8> {
    std::fs::read("/bin/busybox").expect("busybox-static (hack/install-deps.sh)")
}

/// A busybox root filesystem under `dir`, made once, for `ctr run --rootfs`.
pub fn rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("busybox-rootfs");
    if !root.exists() {
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("busybox"), binary()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(bin.join("busybox"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        for applet in APPLETS {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
    root
}

fn layer() -> Vec<u8> {
    let mut layer = TarLayer::new();
    layer
        .dir("bin", 0o755)
        .file("bin/busybox", 0o755, &binary());
    for applet in APPLETS {
        layer.symlink(&format!("bin/{applet}"), "busybox");
    }
    for dir in ["proc", "sys", "dev", "tmp", "etc", "run"] {
        layer.dir(dir, 0o755);
    }
    layer.finish()
}

/// Writes an OCI archive of a one-layer busybox image named `name` whose
/// config runs `entrypoint`; returns the archive's path. The layout tags it
/// by its ref annotation alone: `ctr images import --index-name` would make
/// a second image of the same name, whose update to the manifest lets
/// containerd's GC collect the index while the import still reads it (CI
/// saw "content digest ...: not found").
pub fn archive(dir: &Path, name: &str, entrypoint: &[&str]) -> PathBuf {
    let layout_dir = dir.join(format!("layout-{}", name.replace(['/', ':'], "_")));
    let layout = OciLayout::open_or_create(&layout_dir).expect("create OCI layout");
    let tar = layer();
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
