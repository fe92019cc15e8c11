//! The `delete` action: containerd runs it when the shim is gone (killed,
//! crashed, or unreachable after a containerd restart) to clean up what the
//! shim would have: the runc container, the rootfs mounts, the group's socket
//! if nobody serves it any more.

use std::{os::unix::net::UnixStream, path::PathBuf, time::SystemTime};

use anyhow::Context;
use containerd_shim::Flags;
use containerd_shim_protos::api::DeleteResponse;
use log::warn;

use crate::{container::unmount_rootfs, options::RuntimeOptions, process::timestamp_field};

/// What the Go shim reports for a task it had to clean up: killed (128+SIGKILL).
const CLEANED_UP_STATUS: u32 = 128 + libc::SIGKILL as u32;

pub async fn delete(flags: &Flags) -> anyhow::Result<DeleteResponse> {
    let bundle = match flags.bundle.as_str() {
        "" => std::env::current_dir().context("bundle dir")?,
        bundle => PathBuf::from(bundle),
    };
    let runc = RuntimeOptions::load(&bundle)
        .await
        .runc(&flags.namespace, &bundle);
    let out = runc
        .command(&["delete", "--force", &flags.id])
        .output()
        .with_context(|| format!("run {}", runc.binary.display()))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        if !why.contains("does not exist") && !why.contains("not exist") {
            warn!("runc delete --force {}: {}", flags.id, why.trim());
        }
    }
    unmount_rootfs(&bundle.join("rootfs"));
    remove_dead_socket(&bundle);
    let pid = std::fs::read_to_string(bundle.join("init.pid"))
        .ok()
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or(0);
    Ok(DeleteResponse {
        pid,
        exit_status: CLEANED_UP_STATUS,
        exited_at: timestamp_field(Some(SystemTime::now())),
        ..Default::default()
    })
}

/// Removes the shim socket named in the bundle's `address` file unless a
/// live shim (another container of the pod may keep it) still answers on it.
fn remove_dead_socket(bundle: &std::path::Path) {
    let Ok(address) = std::fs::read_to_string(bundle.join("address")) else {
        return;
    };
    let path = address.trim().trim_start_matches("unix://");
    if !path.is_empty() && UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
}
