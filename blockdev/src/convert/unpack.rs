//! Unpacks one OCI layer tar into a directory that mkfs.erofs turns into a
//! lower layer for overlayfs.
//!
//! The `tar` crate does the ordinary entries (it keeps modes, owners, mtimes,
//! xattrs, hardlinks and symlinks, and refuses paths that leave the
//! destination). Three things it does not do are done here: OCI whiteouts
//! become overlayfs whiteouts (`.wh.x` -> a 0/0 character device `x`;
//! `.wh..wh..opq` -> `trusted.overlay.opaque=y` on its directory), device
//! nodes and fifos are created with mknod (the crate would write them as
//! empty regular files), and every mtime is set again at the end, because
//! creating a child changes its directory's mtime and directories the tar
//! does not list would otherwise get the time of conversion.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use filetime::FileTime;
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chown, Gid, Uid};
use thiserror::Error;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

#[derive(Debug, Error)]
pub enum UnpackError {
    #[error("reading the layer tar: {0}")]
    Tar(#[source] io::Error),
    #[error("tar entry {path:?}: {reason}")]
    BadEntry { path: String, reason: String },
    #[error("tar entry {path:?}: {source}")]
    Entry {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Unpacks the tar stream `tar` into the (empty, existing) directory `dst`.
pub fn unpack_layer<R: Read>(tar: R, dst: &Path) -> Result<(), UnpackError> {
    let mut archive = tar::Archive::new(tar);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    let mut mtimes: HashMap<PathBuf, i64> = HashMap::new();
    for entry in archive.entries().map_err(UnpackError::Tar)? {
        let mut entry = entry.map_err(UnpackError::Tar)?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let rel = relative_path(&raw)?;
        let bad = |reason: &str| UnpackError::BadEntry {
            path: raw.clone(),
            reason: reason.to_owned(),
        };
        let entry_err = |source: io::Error| UnpackError::Entry {
            path: raw.clone(),
            source,
        };
        let Some(name) = rel.file_name().map(|n| n.as_bytes().to_vec()) else {
            // "." itself: only its metadata matters.
            let header = entry.header();
            apply_owner_mode(dst, header).map_err(entry_err)?;
            mtimes.insert(PathBuf::new(), header.mtime().unwrap_or(0) as i64);
            continue;
        };
        let parent = rel.parent().unwrap_or(Path::new(""));
        if name == OPAQUE_MARKER.as_bytes() {
            let dir = safe_dir(dst, parent).map_err(entry_err)?;
            xattr::set(&dir, OPAQUE_XATTR, b"y").map_err(entry_err)?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." || hidden.contains(&b'/') {
                return Err(bad("whiteout names no file"));
            }
            let dir = safe_dir(dst, parent).map_err(entry_err)?;
            let target = dir.join(std::ffi::OsStr::from_bytes(hidden));
            remove_any(&target).map_err(entry_err)?;
            mknod(&target, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))
                .map_err(|e| entry_err(e.into()))?;
            mtimes.insert(
                parent.join(std::ffi::OsStr::from_bytes(hidden)),
                entry.header().mtime().unwrap_or(0) as i64,
            );
            continue;
        }
        let kind = entry.header().entry_type();
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            let dir = safe_dir(dst, parent).map_err(entry_err)?;
            let target = dir.join(std::ffi::OsStr::from_bytes(&name));
            make_special(&mut entry, &target).map_err(entry_err)?;
        } else if !entry.unpack_in(dst).map_err(entry_err)? {
            return Err(bad("path leaves the layer root"));
        }
        mtimes.insert(rel, entry.header().mtime().unwrap_or(0) as i64);
    }
    restore_mtimes(dst, Path::new(""), &mtimes).map_err(|source| UnpackError::Entry {
        path: "/".into(),
        source,
    })
}

/// The entry path relative to the layer root; `..` anywhere is refused rather
/// than skipped, because a layer that tries it is hostile or broken.
fn relative_path(raw: &str) -> Result<PathBuf, UnpackError> {
    let mut out = PathBuf::new();
    for c in Path::new(raw).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(UnpackError::BadEntry {
                    path: raw.to_owned(),
                    reason: "path contains '..'".into(),
                })
            }
        }
    }
    Ok(out)
}

/// Creates (if needed) directory `rel` under `root` and checks that, with
/// symlinks resolved, it is still inside `root`.
fn safe_dir(root: &Path, rel: &Path) -> io::Result<PathBuf> {
    let dir = root.join(rel);
    fs::create_dir_all(&dir)?;
    let real = dir.canonicalize()?;
    if !real.starts_with(root.canonicalize()?) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "directory resolves outside the layer root",
        ));
    }
    Ok(real)
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn make_special<R: Read>(entry: &mut tar::Entry<R>, target: &Path) -> io::Result<()> {
    let header = entry.header();
    let kind = header.entry_type();
    let sflag = if kind.is_character_special() {
        SFlag::S_IFCHR
    } else if kind.is_block_special() {
        SFlag::S_IFBLK
    } else {
        SFlag::S_IFIFO
    };
    let dev = makedev(
        u64::from(header.device_major()?.unwrap_or(0)),
        u64::from(header.device_minor()?.unwrap_or(0)),
    );
    remove_any(target)?;
    mknod(target, sflag, Mode::empty(), dev)?;
    apply_owner_mode(target, header)?;
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts.flatten() {
            if let Some(key) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                xattr::set(target, std::ffi::OsStr::from_bytes(key), ext.value_bytes())?;
            }
        }
    }
    Ok(())
}

fn apply_owner_mode(path: &Path, header: &tar::Header) -> io::Result<()> {
    let uid = header.uid()? as u32;
    let gid = header.gid()? as u32;
    chown(path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
    // After chown: chown clears setuid/setgid bits.
    let mode = header.mode()? & 0o7777;
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
}

/// Sets every path's mtime to the one its tar entry gave (0 for directories
/// the tar only implies), children before parents.
fn restore_mtimes(root: &Path, rel: &Path, mtimes: &HashMap<PathBuf, i64>) -> io::Result<()> {
    let path = root.join(rel);
    let meta = fs::symlink_metadata(&path)?;
    if meta.is_dir() {
        for child in fs::read_dir(&path)? {
            restore_mtimes(root, &rel.join(child?.file_name()), mtimes)?;
        }
    }
    let t = FileTime::from_unix_time(mtimes.get(rel).copied().unwrap_or(0), 0);
    filetime::set_symlink_file_times(&path, t, t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(relative_path("./a/b").unwrap(), PathBuf::from("a/b"));
        assert_eq!(relative_path("/a").unwrap(), PathBuf::from("a"));
        assert_eq!(relative_path("./").unwrap(), PathBuf::new());
        assert!(relative_path("a/../../etc/passwd").is_err());
    }
}
