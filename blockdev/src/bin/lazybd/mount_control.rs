//! Where a `lazybd mount` process keeps its state, and how `umount` and
//! `stats` talk to it: a unix socket (0600, root and the mount's user only,
//! see `mount.rs`), one request line, one reply.
//!
//! `<root>/mounts/<id>/` with `<id>` derived from the canonical mount
//! directory holds `control.sock`, `target` (the mount directory),
//! `mount.log` (the daemon's log) and the node root of its layer manager
//! (`fuse/`, `layers/` = the chunk caches, `mnt/`). Requests: `stats` ->
//! one JSON [`StatusReply`]; `shutdown` -> `ok` once everything is unmounted,
//! or `error: ...`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lazybd_blockdev::device::LayerStatus;
use lazybd_blockdev::stats::StatsSnapshot;
use serde::{Deserialize, Serialize};

pub const DEFAULT_ROOT: &str = "/var/lib/lazybd";

#[derive(Debug, Serialize, Deserialize)]
pub struct StatusReply {
    pub image: String,
    pub target: PathBuf,
    pub pid: u32,
    pub layers: Vec<LayerStatus>,
    pub stats: StatsSnapshot,
}

pub struct MountState {
    pub dir: PathBuf,
}

impl MountState {
    /// The state of the mount at `target` (which must exist).
    pub fn for_target(root: &Path, target: &Path) -> Result<Self> {
        let target = target
            .canonicalize()
            .with_context(|| format!("mount directory {}", target.display()))?;
        let digest = lazybd_blockdev::format::sha256(target.as_os_str().as_encoded_bytes());
        let id: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(MountState {
            dir: root.join("mounts").join(id),
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("mount.log")
    }

    pub fn node_root(&self) -> PathBuf {
        self.dir.clone()
    }

    /// Sends one request line and returns the reply, or `None` if no
    /// process is listening (never mounted, or the daemon died).
    pub fn request(&self, line: &str, timeout: Duration) -> Result<Option<String>> {
        let mut stream = match UnixStream::connect(self.socket()) {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e).context("connecting to the mount process"),
        };
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(format!("{line}\n").as_bytes())?;
        let mut reply = String::new();
        BufReader::new(stream)
            .read_line(&mut reply)
            .with_context(|| {
                format!("waiting {timeout:?} for the mount process to answer {line:?}")
            })?;
        if reply.is_empty() {
            bail!("the mount process closed the connection without answering {line:?}");
        }
        Ok(Some(reply.trim_end().to_owned()))
    }
}
