//! File operations confined to one directory tree: every path is resolved
//! under the root by the kernel, component by component, and a symlink or a
//! `..` on the way is an error, never followed. The unpacker does every
//! write of a layer through this, so a tar that plants `a -> /etc` and then
//! writes `a/x` (a whiteout, a device, a directory, a hardlink, an xattr)
//! cannot create or change anything outside the directory it unpacks into.
//!
//! Resolution is `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` (Linux
//! 5.6); the final name of an entry is then created or changed with the
//! `*at` calls relative to its parent's descriptor, without following it.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstatat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

/// A directory tree that writes cannot leave.
pub struct Beneath {
    root: OwnedFd,
}

impl Beneath {
    pub fn open(root: &Path) -> io::Result<Self> {
        let root = nix::fcntl::open(
            root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )?;
        Ok(Beneath { root })
    }

    /// The root itself.
    pub fn root(&self) -> &OwnedFd {
        &self.root
    }

    /// The existing directory `rel` (all of whose components are plain
    /// names), opened for reading and metadata changes.
    pub fn dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        open_beneath(&self.root, rel_or_dot(rel)).map_err(|e| explain(e, rel))
    }

    /// Directory `rel`, creating missing ones on the way (mode 0755, owned
    /// by the caller, as tar unpackers do for directories a layer only
    /// implies); `created` hears the path of each one made.
    pub fn make_dirs(&self, rel: &Path, mut created: impl FnMut(&Path)) -> io::Result<OwnedFd> {
        match open_beneath(&self.root, rel_or_dot(rel)) {
            Err(Errno::ENOENT) => {}
            other => return other.map_err(|e| explain(e, rel)),
        }
        let mut cur = nix::unistd::dup(&self.root)?;
        let mut sofar = PathBuf::new();
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return Err(explain(Errno::EXDEV, rel));
            };
            sofar.push(name);
            cur = match open_beneath(&cur, name) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    nix::sys::stat::mkdirat(&cur, name, Mode::from_bits_truncate(0o755))?;
                    created(&sofar);
                    open_beneath(&cur, name).map_err(|e| explain(e, &sofar))?
                }
                Err(e) => return Err(explain(e, &sofar)),
            };
        }
        Ok(cur)
    }
}

/// What `name` in directory `dir` is, without following it; `None` if
/// there is nothing.
pub fn kind_at(dir: &impl AsFd, name: &OsStr) -> io::Result<Option<SFlag>> {
    match fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(SFlag::from_bits_truncate(
            st.st_mode & SFlag::S_IFMT.bits(),
        ))),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Removes `name` from `dir` whatever it is (a directory with everything
/// in it); nothing there is fine.
pub fn remove_at(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    match kind_at(dir, name)? {
        None => Ok(()),
        // std's remove_dir_all never follows symlinks inside the tree (it
        // walks with openat/unlinkat), and the path reaches `dir` through
        // its descriptor's /proc link, so nothing outside can be named.
        Some(SFlag::S_IFDIR) => std::fs::remove_dir_all(proc_path(dir, name)),
        Some(_) => Ok(unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)?),
    }
}

/// A path naming `name` inside the directory `dir` is open on, for the
/// calls that have no `*at` form (setting an xattr on a symlink or a
/// device node). The kernel resolves `/proc/self/fd/N` to that very
/// directory; only `name` is then looked up, and callers use the
/// non-following call variants on it.
pub fn proc_path(dir: &OwnedFd, name: &OsStr) -> PathBuf {
    Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name)
}

/// Opens directory `name` of `dir` for writing metadata (mode, owner,
/// xattrs), refusing a symlink.
pub fn dir_file(dir: &OwnedFd, name: &OsStr) -> io::Result<File> {
    Ok(File::from(open_beneath(dir, name)?))
}

fn open_beneath(dir: &impl AsFd, rel: &(impl nix::NixPath + ?Sized)) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    loop {
        match openat2(dir, rel, how) {
            // openat2 asks to retry when a rename raced the lookup.
            Err(Errno::EAGAIN) => continue,
            r => return r,
        }
    }
}

fn rel_or_dot(rel: &Path) -> &Path {
    if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    }
}

fn explain(e: Errno, rel: &Path) -> io::Error {
    let what = match e {
        Errno::ELOOP => "goes through a symlink, which a layer may not write through",
        Errno::EXDEV => "leaves the layer root",
        Errno::ENOTDIR => "has a parent that is not a directory",
        _ => return io::Error::from(e),
    };
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{}: {what}", rel.display()),
    )
}
