//! The keychain on disk, so that layers attached with CRI credentials
//! still read after a restart: `<root>/cri-keychain/credentials.json`,
//! mode 0600 in a directory of mode 0700, both owned by this daemon's user
//! (root), replaced atomically (written to a temporary file, synced,
//! renamed over the old one, the directory synced).
//!
//! The passwords are stored in clear, as in kubelet's and docker's own
//! credential files: the file's owner and mode are the protection, and a
//! file that another user owns or could read is not trusted.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

const FILE: &str = "credentials.json";
const TEMP: &str = "credentials.json.tmp";
/// A bigger file is not a keychain this daemon wrote (4096 repositories of
/// a few hundred bytes each).
const MAX_FILE_LEN: u64 = 16 << 20;

/// What the file holds.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stored {
    pub version: u32,
    /// By repository (`host/path`).
    pub repositories: BTreeMap<String, StoredCreds>,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredCreds {
    pub username: String,
    pub password: String,
    /// When the pull that brought them succeeded, in commit order (the
    /// oldest are dropped first when the keychain is full).
    pub stamp: u64,
}

impl std::fmt::Debug for StoredCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredCreds")
            .field("username", &self.username)
            .field("stamp", &self.stamp)
            .finish_non_exhaustive()
    }
}

pub struct KeyFile {
    dir: PathBuf,
}

impl KeyFile {
    /// The keychain directory `dir` (created 0700, or made 0700) and what
    /// its file holds. A file this daemon cannot trust (another owner,
    /// readable by others, not JSON) is ignored with a warning: the next
    /// successful pull replaces it.
    pub fn open(dir: &Path) -> io::Result<(KeyFile, Stored)> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let meta = fs::symlink_metadata(dir)?;
        if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is not a directory owned by this daemon's user",
                    dir.display()
                ),
            ));
        }
        if meta.mode() & 0o077 != 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        }
        let file = KeyFile {
            dir: dir.to_owned(),
        };
        let stored = file.load().unwrap_or_else(|e| {
            warn!("cri keychain: ignoring {}: {e}", dir.join(FILE).display());
            Stored::default()
        });
        Ok((file, stored))
    }

    fn load(&self) -> io::Result<Stored> {
        let path = self.dir.join(FILE);
        let f = match OpenOptions::new()
            .read(true)
            .custom_flags(libc_o_nofollow())
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Stored::default()),
            Err(e) => return Err(e),
        };
        let meta = f.metadata()?;
        if meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "owner {} mode {:o}: only this daemon's user may own and read it",
                    meta.uid(),
                    meta.mode() & 0o777
                ),
            ));
        }
        let mut text = Vec::new();
        f.take(MAX_FILE_LEN + 1).read_to_end(&mut text)?;
        if text.len() as u64 > MAX_FILE_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("longer than {MAX_FILE_LEN} bytes"),
            ));
        }
        serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Replaces the file with `stored`, atomically.
    pub fn save(&self, stored: &Stored) -> io::Result<()> {
        let temp = self.dir.join(TEMP);
        let _ = fs::remove_file(&temp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc_o_nofollow())
            .open(&temp)?;
        let text = serde_json::to_vec(stored).map_err(io::Error::other)?;
        f.write_all(&text)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&temp, self.dir.join(FILE))?;
        File::open(&self.dir)?.sync_all()
    }

    #[cfg(test)]
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }
}

fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}
