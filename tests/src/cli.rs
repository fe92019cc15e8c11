//! Running the `lazybd` CLI as a user would, and undoing its mounts.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::bin_path;

/// Runs `lazybd ARGS...` to completion.
pub fn lazybd(args: &[&dyn AsRef<OsStr>]) -> Output {
    let mut cmd = Command::new(bin_path("lazybd"));
    for a in args {
        cmd.arg(a);
    }
    cmd.output().expect("run lazybd")
}

/// The stdout of a command that must have succeeded.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "lazybd failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The stderr of a command that must have failed.
pub fn fails(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "lazybd should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `lazybd umount` on drop, so a failing test leaves no mount behind.
pub struct MountGuard {
    pub root: PathBuf,
    pub dir: PathBuf,
}

impl MountGuard {
    pub fn new(root: &Path, dir: &Path) -> Self {
        MountGuard {
            root: root.to_owned(),
            dir: dir.to_owned(),
        }
    }

    /// `lazybd stats --json` of this mount.
    pub fn stats(&self) -> serde_json::Value {
        let json = ok(&lazybd(&[
            &"stats", &"--root", &self.root, &"--json", &self.dir,
        ]));
        serde_json::from_str(&json).expect("stats JSON")
    }

    /// `lazybd stats --p2p` of this mount.
    pub fn p2p_stats(&self) -> serde_json::Value {
        let json = ok(&lazybd(&[
            &"stats", &"--root", &self.root, &"--p2p", &self.dir,
        ]));
        serde_json::from_str(&json).expect("p2p stats JSON")
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = lazybd(&[&"umount", &"--root", &self.root, &self.dir]);
    }
}
