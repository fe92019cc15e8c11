//! `lazybd umount DIR`: stop the `lazybd mount` process serving DIR; it
//! unmounts the stack, every layer and its FUSE directory. If that process
//! is gone (crashed, killed), clean up what it left.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lazybd_blockdev::device::{loopdev, mounts};

use crate::mount_control::{MountState, DEFAULT_ROOT};

/// Unmount an image mounted with `lazybd mount` and stop its daemon.
#[derive(clap::Args)]
pub struct Args {
    /// The directory the image is mounted at.
    dir: PathBuf,
    /// The --root given to `lazybd mount`.
    #[arg(long, default_value = DEFAULT_ROOT)]
    root: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let state = MountState::for_target(&args.root, &args.dir)?;
    let target = args.dir.canonicalize()?;
    match state.request("shutdown", Duration::from_secs(60))? {
        Some(reply) if reply == "ok" => {}
        Some(reply) => bail!("{}: {reply}", target.display()),
        None => {
            if !state.dir.exists() {
                bail!(
                    "{} is not mounted by lazybd (no state in {})",
                    target.display(),
                    state.dir.display()
                );
            }
            // The daemon is gone: its mounts only return errors now.
            eprintln!(
                "no lazybd process serves {}; cleaning up what it left",
                target.display()
            );
            if mounts::is_mount_point(&target)? {
                mounts::unmount(&target, true)?;
            }
            for m in mounts::mounts_under(&state.dir)? {
                mounts::unmount(&m, true).with_context(|| format!("unmounting {}", m.display()))?;
            }
        }
    }
    let _ = std::fs::remove_file(state.socket());
    // After a lazy unmount the kernel clears autoclear loop devices once the
    // filesystem on them is gone, which can take a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut left = loopdev::attached_under(&state.dir);
    while !left.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        left = loopdev::attached_under(&state.dir);
    }
    if !left.is_empty() {
        bail!(
            "loop devices still attached to {}: {left:?}",
            state.dir.display()
        );
    }
    println!("unmounted {}", target.display());
    Ok(())
}
