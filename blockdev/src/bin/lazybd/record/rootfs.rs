//! The root filesystem the workload runs on while it is recorded: the
//! converted image's layers attached lazily by this process's own
//! [`LayerManager`] (FUSE file -> loop device -> EROFS, as on a node), so
//! every read of theirs passes its trace recorder, stacked with overlayfs
//! under a throwaway tmpfs upper layer (the container's writable layer, as
//! containerd would give it; nothing it writes outlives the recording).
//!
//! `dir` holds `node/` (the manager's root), `rw/` (the tmpfs: `upper/`,
//! `work/`) and `rootfs/` (the overlay). [`LazyRootfs::unmount`] takes it
//! all down again; a failed mount takes down what it had set up.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lazybd_blockdev::device::{mounts, LayerManager, NodeConfig};
use lazybd_blockdev::layer::LayerSource;
use lazybd_blockdev::oci::LayerId;
use lazybd_blockdev::trace::Trace;
use nix::mount::{mount, MsFlags};
use tracing::{info, warn};

/// Most the workload may write (its writable layer is in memory).
const UPPER_SIZE: &str = "1g";

pub struct LazyRootfs {
    manager: LayerManager,
    ids: Vec<LayerId>,
    rw: PathBuf,
    target: PathBuf,
}

impl LazyRootfs {
    /// Attaches `layers` (bottom first) under `dir` and stacks them at
    /// `dir/rootfs`, writable; their loop devices read ahead
    /// `read_ahead_kb` KiB.
    pub async fn mount(layers: Vec<LayerSource>, dir: &Path, read_ahead_kb: u32) -> Result<Self> {
        let mut config = NodeConfig::new(dir.join("node"));
        // A layer whose every chunk arrived would otherwise switch its loop
        // device to the cache file, and its reads would pass unrecorded.
        config.handoff = false;
        // The profile must hold what a node reads with the most readahead
        // it uses (`lazy_read_ahead_kb` follows the node's link up to that):
        // a node that reads ahead further than its profile misses, a round
        // trip each, on every block the profile left out.
        config.lazy_read_ahead_follows_link = false;
        config.lazy_read_ahead_kb = read_ahead_kb;
        // Warming would read the profile in ahead of the workload.
        config.warm_startup = false;
        let manager = LayerManager::new(config)?;
        let mut rootfs = LazyRootfs {
            manager,
            ids: Vec::new(),
            rw: dir.join("rw"),
            target: dir.join("rootfs"),
        };
        match rootfs.stack(layers).await {
            Ok(()) => Ok(rootfs),
            Err(e) => {
                if let Err(undo) = rootfs.unmount().await {
                    warn!("cleaning up after the failed mount: {undo:#}");
                }
                Err(e)
            }
        }
    }

    async fn stack(&mut self, layers: Vec<LayerSource>) -> Result<()> {
        let mut lowers = Vec::new();
        for layer in layers {
            let attached = self.manager.attach(layer).await?;
            self.ids.push(attached.id);
            lowers.push(attached.mountpoint);
        }
        lowers.reverse(); // overlayfs wants the top layer first
        std::fs::create_dir_all(&self.rw)?;
        mount(
            Some("tmpfs"),
            &self.rw,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(format!("mode=0700,size={UPPER_SIZE}").as_str()),
        )
        .with_context(|| format!("mounting a tmpfs at {}", self.rw.display()))?;
        let (upper, work) = (self.rw.join("upper"), self.rw.join("work"));
        std::fs::create_dir(&upper)?;
        std::fs::create_dir(&work)?;
        // The merged root takes its owner and mode from the upper dir: give
        // it the image's.
        let top = std::fs::metadata(&lowers[0])?;
        std::fs::set_permissions(&upper, std::fs::Permissions::from_mode(top.mode() & 0o7777))?;
        std::os::unix::fs::chown(&upper, Some(top.uid()), Some(top.gid()))?;

        let dirs = |ps: &[PathBuf]| -> Result<String> {
            let parts = ps
                .iter()
                .map(|p| {
                    let s = p.to_str().context("non-UTF-8 path")?;
                    if s.contains([':', ',', '\\']) {
                        bail!("{s} contains a character overlayfs options cannot carry");
                    }
                    Ok(s)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(parts.join(":"))
        };
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            dirs(&lowers)?,
            dirs(&[upper])?,
            dirs(&[work])?
        );
        std::fs::create_dir_all(&self.target)?;
        mount(
            Some("lazybd-record"),
            &self.target,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .with_context(|| format!("mounting the overlay at {}", self.target.display()))?;
        info!(
            "{} lazy layers stacked at {}",
            self.ids.len(),
            self.target.display()
        );
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.target
    }

    /// Starts recording every read of the layers.
    pub fn start_recording(&self) {
        self.manager.start_trace(&self.ids);
    }

    /// What the layers were read for since [`start_recording`](Self::start_recording),
    /// each layer named by its anchor and its source diff_id.
    pub fn stop_recording(&self) -> Trace {
        self.manager.stop_trace(&self.ids)
    }

    /// Unmounts the overlay and the tmpfs, detaches the layers, unmounts
    /// FUSE; goes on past errors and reports the first.
    pub async fn unmount(self) -> Result<()> {
        let mut first: Option<anyhow::Error> = None;
        for dir in [&self.target, &self.rw] {
            if !mounts::is_mount_point(dir).unwrap_or(true) {
                continue;
            }
            if let Err(e) = mounts::unmount(dir, false) {
                // Still busy: detached lazily, so the layers below can go.
                warn!("{e}; detaching it lazily");
                if let Err(e) = mounts::unmount(dir, true) {
                    first.get_or_insert(e.into());
                }
            }
        }
        if let Err(e) = self.manager.shutdown().await {
            first.get_or_insert(e.into());
        }
        match first {
            None => Ok(()),
            Some(e) => Err(e.context("taking down the recording's rootfs")),
        }
    }
}
