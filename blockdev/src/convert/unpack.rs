//! Unpacks one OCI layer tar into a directory that mkfs.erofs turns into a
//! lower layer for overlayfs.
//!
//! The `tar` crate parses the stream (GNU and PAX long names, PAX uid/gid,
//! sparse files); everything written is done here, through [`Beneath`]: a
//! layer is untrusted input, and no entry may create or change anything
//! outside `dst` whatever its path, link target or parents are (a symlink
//! planted by an earlier entry is never followed; `..` is refused, an
//! absolute path is taken as relative to `dst`, as docker does). On top of
//! a plain unpack: OCI whiteouts become overlayfs whiteouts (`.wh.x` -> a
//! 0/0 character device `x`; `.wh..wh..opq` -> `trusted.overlay.opaque=y`
//! on its directory), and directory mtimes are set at the end, because
//! creating a child changes its directory's mtime (directories the tar only
//! implies get mtime 0, so the output depends on the tar alone).
//!
//! [`LayerLimits`] bound what one layer may cost: bytes written, entries,
//! and the memory of one entry's headers.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{makedev, mknodat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};
use thiserror::Error;
use tracing::warn;

use super::beneath::{self, Beneath};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// overlayfs reads these on its lower layers; only whiteout translation
/// may set them, never a layer's own PAX records.
const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";
/// Longest entry path or link target (Linux's PATH_MAX).
const MAX_PATH: usize = 4096;
/// Header bytes one entry may take (its 512-byte headers, GNU long
/// name/link and PAX records): the `tar` crate holds them in memory.
const MAX_ENTRY_METADATA: u64 = 1 << 20;

/// What one layer may cost to unpack (docs/convert.md#limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerLimits {
    /// Largest uncompressed layer: bytes of file data written, and length
    /// of the uncompressed tar stream.
    pub max_bytes: u64,
    /// Most tar entries (files, directories, links, whiteouts, ...).
    pub max_entries: u64,
}

impl LayerLimits {
    pub const DEFAULT_MAX_BYTES: u64 = 64 << 30;
    pub const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;
}

impl Default for LayerLimits {
    fn default() -> Self {
        LayerLimits {
            max_bytes: Self::DEFAULT_MAX_BYTES,
            max_entries: Self::DEFAULT_MAX_ENTRIES,
        }
    }
}

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
    #[error("the layer is larger than the limit of {limit} {what} (see --max-layer-{flag})")]
    TooLarge {
        what: &'static str,
        flag: &'static str,
        limit: u64,
    },
}

/// Unpacks the tar stream `tar` into the (empty, existing) directory `dst`.
pub fn unpack_layer<R: Read>(tar: R, dst: &Path, limits: &LayerLimits) -> Result<(), UnpackError> {
    let budget = Rc::new(Cell::new(u64::MAX));
    let mut archive = tar::Archive::new(Metered {
        inner: tar,
        budget: budget.clone(),
    });
    let root = Beneath::open(dst).map_err(|source| UnpackError::Entry {
        path: "/".into(),
        source,
    })?;
    let mut state = State {
        root,
        limits: *limits,
        written: 0,
        entries: 0,
        // The root too gets mtime 0 unless the tar lists "./".
        dir_mtimes: HashMap::from([(PathBuf::new(), 0)]),
    };
    let mut entries = archive.entries().map_err(UnpackError::Tar)?;
    loop {
        // While the crate reads one entry's headers, only those bytes may
        // be read: a 10 GiB "long name" is an error, not an allocation.
        budget.set(MAX_ENTRY_METADATA);
        let next = entries.next();
        budget.set(u64::MAX);
        let Some(entry) = next else { break };
        let mut entry = entry.map_err(UnpackError::Tar)?;
        state.entries += 1;
        if state.entries > limits.max_entries {
            return Err(UnpackError::TooLarge {
                what: "entries",
                flag: "entries",
                limit: limits.max_entries,
            });
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        state.entry(&mut entry, &raw).map_err(|e| match e {
            Failure::Limit(e) => e,
            Failure::Bad(reason) => UnpackError::BadEntry {
                path: shown.clone(),
                reason,
            },
            Failure::Io(source) => UnpackError::Entry {
                path: shown.clone(),
                source,
            },
        })?;
        // Whatever the entry's data was not used for (a symlink with a
        // body) is read past here, not while headers are metered.
        io::copy(&mut entry, &mut io::sink()).map_err(UnpackError::Tar)?;
    }
    state.restore_dir_mtimes()
}

/// Reads `inner` while the shared budget lasts.
struct Metered<R> {
    inner: R,
    budget: Rc<Cell<u64>>,
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.budget.get();
        if left == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "one entry's headers (long name, long link, PAX records) exceed {MAX_ENTRY_METADATA} bytes"
                ),
            ));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.budget.set(left - n as u64);
        Ok(n)
    }
}

/// An extended attribute: name, value.
type Xattr = (Vec<u8>, Vec<u8>);

enum Failure {
    Limit(UnpackError),
    Bad(String),
    Io(io::Error),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}

impl From<Errno> for Failure {
    fn from(e: Errno) -> Self {
        Failure::Io(e.into())
    }
}

struct State {
    root: Beneath,
    limits: LayerLimits,
    /// File data written so far.
    written: u64,
    entries: u64,
    /// Every directory made, with the mtime its entry gave (0 if implied).
    dir_mtimes: HashMap<PathBuf, i64>,
}

impl State {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<R>, raw: &[u8]) -> Result<(), Failure> {
        let rel = relative_path(raw)?;
        let header = entry.header().clone();
        let mtime = i64::try_from(header.mtime()?).unwrap_or(i64::MAX);
        let kind = header.entry_type();
        let Some(name) = rel.file_name().map(OsStr::to_owned) else {
            // "." itself: only its metadata matters.
            let root = nix::unistd::dup(self.root.root())?;
            apply_owner_mode(&root, &header)?;
            self.dir_mtimes.insert(PathBuf::new(), mtime);
            return Ok(());
        };
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_owned();
        let dir_mtimes = &mut self.dir_mtimes;
        let parent = self.root.make_dirs(&parent_rel, |made| {
            dir_mtimes.entry(made.to_owned()).or_insert(0);
        })?;
        let name_bytes = name.as_bytes();
        if name_bytes == OPAQUE_MARKER {
            let dir = File::from(nix::unistd::dup(&parent)?);
            xattr::FileExt::set_xattr(&dir, OPAQUE_XATTR, b"y")?;
            return Ok(());
        }
        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(Failure::Bad("whiteout names no file".into()));
            }
            let hidden = OsStr::from_bytes(hidden);
            beneath::remove_at(&parent, hidden)?;
            mknodat(
                &parent,
                hidden,
                SFlag::S_IFCHR,
                Mode::empty(),
                makedev(0, 0),
            )?;
            set_mtime_at(&parent, hidden, mtime)?;
            return Ok(());
        }
        let xattrs = xattrs_of(entry)?;
        if kind.is_dir() {
            self.directory(&parent, &name, &header, &xattrs)?;
            self.dir_mtimes.insert(rel, mtime);
        } else if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
            self.file(entry, &parent, &name, &header, &xattrs)?;
        } else if kind.is_symlink() {
            let target = link_target(entry)?;
            beneath::remove_at(&parent, &name)?;
            nix::unistd::symlinkat(target.as_os_str(), &parent, name.as_os_str())?;
            chown_at(&parent, &name, &header)?;
            set_xattrs_at(&parent, &name, &xattrs)?;
            set_mtime_at(&parent, &name, mtime)?;
        } else if kind.is_hard_link() {
            let target = relative_path(link_target(entry)?.as_os_str().as_bytes())?;
            if target == rel {
                return Err(Failure::Bad("hardlink to itself".into()));
            }
            let (Some(tname), Some(tparent)) = (target.file_name(), target.parent()) else {
                return Err(Failure::Bad("hardlink to the layer root".into()));
            };
            let tdir = self.root.dir(tparent)?;
            beneath::remove_at(&parent, &name)?;
            // Flags 0: a link to a symlink links the symlink itself.
            nix::unistd::linkat(&tdir, tname, &parent, name.as_os_str(), AtFlags::empty())?;
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
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
            beneath::remove_at(&parent, &name)?;
            mknodat(&parent, name.as_os_str(), sflag, Mode::empty(), dev)?;
            chown_at(&parent, &name, &header)?;
            // A node just made here, not a symlink: following is moot.
            nix::sys::stat::fchmodat(
                &parent,
                name.as_os_str(),
                mode_of(&header)?,
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )?;
            set_xattrs_at(&parent, &name, &xattrs)?;
            set_mtime_at(&parent, &name, mtime)?;
        } else if kind.is_pax_global_extensions() {
            // Global PAX records carry nothing a layer needs.
        } else {
            return Err(Failure::Bad(format!(
                "unsupported entry type {:?}",
                kind.as_byte() as char
            )));
        }
        Ok(())
    }

    fn directory(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        header: &tar::Header,
        xattrs: &[Xattr],
    ) -> Result<(), Failure> {
        // An existing directory is kept (tars list a directory again to
        // change its metadata); anything else there is replaced.
        if beneath::kind_at(parent, name)? != Some(SFlag::S_IFDIR) {
            beneath::remove_at(parent, name)?;
            nix::sys::stat::mkdirat(parent, name, Mode::from_bits_truncate(0o700))?;
        }
        let dir = beneath::dir_file(parent, name)?;
        apply_owner_mode(&dir, header)?;
        for (k, v) in xattrs {
            xattr::FileExt::set_xattr(&dir, OsStr::from_bytes(k), v)?;
        }
        Ok(())
    }

    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        parent: &OwnedFd,
        name: &OsStr,
        header: &tar::Header,
        xattrs: &[Xattr],
    ) -> Result<(), Failure> {
        let allowance = self.limits.max_bytes - self.written;
        let too_large = || {
            Failure::Limit(UnpackError::TooLarge {
                what: "bytes",
                flag: "size",
                limit: self.limits.max_bytes,
            })
        };
        if entry.size() > allowance {
            return Err(too_large());
        }
        beneath::remove_at(parent, name)?;
        let fd = nix::fcntl::openat(
            parent,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )?;
        let mut file = File::from(fd);
        // Sparse entries expand to more than their size in the stream:
        // what is written is counted, not what the header says.
        let n = io::copy(&mut (&mut *entry).take(allowance + 1), &mut file)?;
        if n > allowance {
            return Err(too_large());
        }
        self.written += n;
        apply_owner_mode(&file, header)?;
        for (k, v) in xattrs {
            xattr::FileExt::set_xattr(&file, OsStr::from_bytes(k), v)?;
        }
        let t = TimeSpec::new(i64::try_from(header.mtime()?).unwrap_or(i64::MAX), 0);
        nix::sys::stat::futimens(&file, &t, &t)?;
        Ok(())
    }

    /// Sets every directory's mtime to its entry's (0 for implied ones),
    /// after the last child was made. Directories a later entry replaced
    /// are skipped.
    fn restore_dir_mtimes(&self) -> Result<(), UnpackError> {
        for (rel, mtime) in &self.dir_mtimes {
            let dir = match self.root.dir(rel) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => continue,
                Err(source) => {
                    return Err(UnpackError::Entry {
                        path: rel.display().to_string(),
                        source,
                    })
                }
            };
            let t = TimeSpec::new(*mtime, 0);
            nix::sys::stat::futimens(&dir, &t, &t).map_err(|e| UnpackError::Entry {
                path: rel.display().to_string(),
                source: e.into(),
            })?;
        }
        Ok(())
    }
}

/// The entry path relative to the layer root; `..` anywhere is refused rather
/// than skipped, because a layer that tries it is hostile or broken.
fn relative_path(raw: &[u8]) -> Result<PathBuf, Failure> {
    if raw.len() > MAX_PATH {
        return Err(Failure::Bad(format!("path longer than {MAX_PATH} bytes")));
    }
    let mut out = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(Failure::Bad("path contains '..'".into()))
            }
        }
    }
    Ok(out)
}

fn link_target<R: Read>(entry: &tar::Entry<R>) -> Result<PathBuf, Failure> {
    let target = entry
        .link_name_bytes()
        .ok_or_else(|| Failure::Bad("link without a target".into()))?;
    if target.is_empty() || target.len() > MAX_PATH {
        return Err(Failure::Bad(format!(
            "link target is empty or longer than {MAX_PATH} bytes"
        )));
    }
    Ok(PathBuf::from(OsStr::from_bytes(&target)))
}

/// The entry's `SCHILY.xattr.*` PAX records, less overlayfs's own.
fn xattrs_of<R: Read>(entry: &mut tar::Entry<R>) -> Result<Vec<Xattr>, Failure> {
    let mut out = Vec::new();
    let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
    let Some(exts) = entry.pax_extensions()? else {
        return Ok(out);
    };
    for ext in exts {
        let ext = ext?;
        let Some(key) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
            continue;
        };
        if key.starts_with(OVERLAY_XATTR_PREFIX) {
            warn!(
                "tar entry {path:?}: dropping xattr {:?}: overlayfs's own attributes come from whiteouts only",
                String::from_utf8_lossy(key)
            );
            continue;
        }
        out.push((key.to_vec(), ext.value_bytes().to_vec()));
    }
    Ok(out)
}

fn mode_of(header: &tar::Header) -> io::Result<Mode> {
    Ok(Mode::from_bits_truncate(header.mode()? & 0o7777))
}

fn owner_of(header: &tar::Header) -> io::Result<(Uid, Gid)> {
    let id = |v: u64| {
        u32::try_from(v)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "uid or gid out of range"))
    };
    Ok((
        Uid::from_raw(id(header.uid()?)?),
        Gid::from_raw(id(header.gid()?)?),
    ))
}

fn apply_owner_mode(fd: &impl std::os::fd::AsFd, header: &tar::Header) -> io::Result<()> {
    let (uid, gid) = owner_of(header)?;
    nix::unistd::fchown(fd, Some(uid), Some(gid))?;
    // After chown: chown clears setuid/setgid bits.
    nix::sys::stat::fchmod(fd, mode_of(header)?)?;
    Ok(())
}

fn chown_at(dir: &OwnedFd, name: &OsStr, header: &tar::Header) -> io::Result<()> {
    let (uid, gid) = owner_of(header)?;
    nix::unistd::fchownat(
        dir,
        name,
        Some(uid),
        Some(gid),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// xattrs on a symlink or device node, which cannot be opened for it.
fn set_xattrs_at(dir: &OwnedFd, name: &OsStr, xattrs: &[Xattr]) -> io::Result<()> {
    if xattrs.is_empty() {
        return Ok(());
    }
    // `xattr::set` never follows the final symlink (lsetxattr).
    let path = beneath::proc_path(dir, name);
    for (k, v) in xattrs {
        xattr::set(&path, OsStr::from_bytes(k), v)?;
    }
    Ok(())
}

fn set_mtime_at(dir: &OwnedFd, name: &OsStr, mtime: i64) -> io::Result<()> {
    let t = TimeSpec::new(mtime, 0);
    nix::sys::stat::utimensat(dir, name, &t, &t, UtimensatFlags::NoFollowSymlink)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn relative_paths() {
        let rel = |p: &str| relative_path(p.as_bytes()).ok();
        assert_eq!(rel("./a/b"), Some(PathBuf::from("a/b")));
        assert_eq!(rel("/a"), Some(PathBuf::from("a")));
        assert_eq!(rel("./"), Some(PathBuf::new()));
        assert!(rel("a/../../etc/passwd").is_none());
        assert!(rel(&"a/".repeat(3000)).is_none());
    }

    /// A tar written entry by entry with raw names (the `tar` crate's
    /// builder refuses the hostile ones these tests need).
    struct Tar(Vec<u8>);

    impl Tar {
        fn new() -> Self {
            Tar(Vec::new())
        }

        fn entry(
            &mut self,
            kind: tar::EntryType,
            name: &str,
            link: &str,
            data: &[u8],
        ) -> &mut Self {
            self.entry_with_pax(kind, name, link, data, &[])
        }

        fn entry_with_pax(
            &mut self,
            kind: tar::EntryType,
            name: &str,
            link: &str,
            data: &[u8],
            pax: &[(&str, &[u8])],
        ) -> &mut Self {
            if !pax.is_empty() {
                let mut records = Vec::new();
                for (k, v) in pax {
                    let body_len = k.len() + v.len() + 3;
                    let mut len = body_len + 1;
                    while len.to_string().len() + body_len != len {
                        len += 1;
                    }
                    records.extend_from_slice(format!("{len} {k}=").as_bytes());
                    records.extend_from_slice(v);
                    records.push(b'\n');
                }
                self.raw(tar::EntryType::XHeader, "pax", "", &records, 0o644);
            }
            let mode = if kind == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            };
            self.raw(kind, name, link, data, mode);
            self
        }

        fn raw(&mut self, kind: tar::EntryType, name: &str, link: &str, data: &[u8], mode: u32) {
            let mut h = tar::Header::new_gnu();
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
            h.as_gnu_mut().unwrap().linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_size(data.len() as u64);
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            self.0.extend_from_slice(h.as_bytes());
            self.0.extend_from_slice(data);
            self.0.resize(self.0.len().div_ceil(512) * 512, 0);
        }

        fn dir(&mut self, name: &str) -> &mut Self {
            self.entry(tar::EntryType::Directory, name, "", b"")
        }

        fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
            self.entry(tar::EntryType::Regular, name, "", data)
        }

        fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
            self.entry(tar::EntryType::Symlink, name, target, b"")
        }

        fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
            self.entry(tar::EntryType::Link, name, target, b"")
        }

        fn bytes(&self) -> Vec<u8> {
            let mut out = self.0.clone();
            out.extend_from_slice(&[0; 1024]);
            out
        }
    }

    /// A layer root and, next to it, a canary directory holding one file
    /// that a hostile layer must not be able to touch.
    struct Scene {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        canary: PathBuf,
    }

    impl Scene {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path().join("rootfs");
            let canary = tmp.path().join("canary");
            fs::create_dir(&root).unwrap();
            fs::create_dir(&canary).unwrap();
            fs::write(canary.join("file"), b"original").unwrap();
            Scene {
                _tmp: tmp,
                root,
                canary,
            }
        }

        fn canary_path(&self) -> String {
            self.canary.display().to_string()
        }

        /// Unpacks `tar`; whatever the result, nothing outside the root changed.
        fn unpack(&self, tar: &Tar) -> Result<(), UnpackError> {
            let before = fs::metadata(self.canary.join("file")).unwrap();
            let r = unpack_layer(&tar.bytes()[..], &self.root, &LayerLimits::default());
            let names: Vec<_> = fs::read_dir(&self.canary)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["file"], "the layer wrote outside its root ({r:?})");
            let after = fs::symlink_metadata(self.canary.join("file")).unwrap();
            assert!(after.is_file(), "canary file replaced ({r:?})");
            assert_eq!(fs::read(self.canary.join("file")).unwrap(), b"original");
            assert_eq!(
                (before.mode(), before.uid(), before.nlink(), before.mtime()),
                (after.mode(), after.uid(), after.nlink(), after.mtime()),
                "canary file changed ({r:?})"
            );
            r
        }
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn a_whiteout_under_a_symlinked_parent_stays_inside() {
        if !is_root() {
            return eprintln!("skipped: mknod needs root");
        }
        let s = Scene::new();
        let mut t = Tar::new();
        t.symlink("a", &s.canary_path()).file("a/x/.wh.y", b"");
        assert!(s.unpack(&t).is_err());
        let mut t = Tar::new();
        t.symlink("a", &s.canary_path()).file("a/.wh.file", b"");
        assert!(s.unpack(&t).is_err());
    }

    #[test]
    fn an_opaque_marker_under_a_symlinked_parent_stays_inside() {
        let s = Scene::new();
        let mut t = Tar::new();
        t.symlink("a", &s.canary_path())
            .file("a/x/.wh..wh..opq", b"");
        assert!(s.unpack(&t).is_err());
    }

    #[test]
    fn a_device_under_a_symlinked_parent_stays_inside() {
        if !is_root() {
            return eprintln!("skipped: mknod needs root");
        }
        let s = Scene::new();
        let mut t = Tar::new();
        t.symlink("a", &s.canary_path())
            .entry(tar::EntryType::Char, "a/sub/null", "", b"")
            .entry(tar::EntryType::Fifo, "a/fifo", "", b"");
        assert!(s.unpack(&t).is_err());
    }

    #[test]
    fn files_and_dirs_through_a_symlink_stay_inside() {
        let s = Scene::new();
        for t in [
            Tar::new()
                .symlink("a", &s.canary_path())
                .file("a/new", b"x"),
            Tar::new()
                .symlink("a", &s.canary_path())
                .file("a/file", b"x"),
            Tar::new().symlink("a", &s.canary_path()).dir("a/sub/"),
            Tar::new()
                .symlink("a", &s.canary_path())
                .symlink("a/link", "/"),
            Tar::new().symlink("a", &s.canary_path()).entry_with_pax(
                tar::EntryType::Regular,
                "a/x",
                "",
                b"",
                &[("SCHILY.xattr.user.x", b"1")],
            ),
        ] {
            assert!(s.unpack(t).is_err());
        }
    }

    #[test]
    fn a_file_over_a_symlink_replaces_the_link() {
        let s = Scene::new();
        let target = s.canary.join("file").display().to_string();
        let mut t = Tar::new();
        t.symlink("s", &target).file("s", b"new content");
        s.unpack(&t).unwrap();
        assert_eq!(fs::read(s.root.join("s")).unwrap(), b"new content");
    }

    #[test]
    fn hardlinks_cannot_reach_outside() {
        let s = Scene::new();
        let target = s.canary.join("file").display().to_string();
        // An absolute target names a path under the root, which is missing.
        assert!(s.unpack(Tar::new().hardlink("h", &target)).is_err());
        assert!(s
            .unpack(Tar::new().hardlink("h", "../canary/file"))
            .is_err());
        assert!(s
            .unpack(
                Tar::new()
                    .symlink("a", &s.canary_path())
                    .hardlink("h", "a/file")
            )
            .is_err());
        assert!(s
            .unpack(
                Tar::new()
                    .symlink("a", &s.canary_path())
                    .file("f", b"x")
                    .hardlink("a/h", "f")
            )
            .is_err());
        // A hardlink to a symlink links the symlink, never its target.
        s.unpack(Tar::new().symlink("l", &target).hardlink("h", "l"))
            .unwrap();
        assert!(fs::symlink_metadata(s.root.join("h")).unwrap().is_symlink());
    }

    #[test]
    fn dot_dot_and_absolute_paths_stay_inside() {
        let s = Scene::new();
        assert!(s.unpack(Tar::new().file("../canary/new", b"x")).is_err());
        assert!(s
            .unpack(Tar::new().file("a/../../canary/new", b"x"))
            .is_err());
        let abs = format!("{}/new", s.canary_path());
        s.unpack(Tar::new().file(&abs, b"x")).unwrap();
        assert_eq!(
            fs::read(s.root.join(abs.trim_start_matches('/'))).unwrap(),
            b"x"
        );
    }

    #[test]
    fn writing_through_a_symlink_is_a_clear_error() {
        let s = Scene::new();
        let e = s
            .unpack(Tar::new().symlink("a", &s.canary_path()).file("a/x", b""))
            .unwrap_err();
        assert!(e.to_string().contains("a: goes through a symlink"), "{e}");
    }

    #[test]
    fn the_entry_and_size_limits_stop_a_bomb() {
        let s = Scene::new();
        let limits = LayerLimits {
            max_bytes: 2 << 20,
            max_entries: 10,
        };
        let mut t = Tar::new();
        for i in 0..11 {
            t.file(&format!("f{i}"), b"");
        }
        let e = unpack_layer(&t.bytes()[..], &s.root, &limits).unwrap_err();
        assert!(e.to_string().contains("limit of 10 entries"), "{e}");
        let big = vec![7u8; 1 << 20];
        let mut t = Tar::new();
        t.file("a", &big).file("b", &big).file("c", &big);
        let e = unpack_layer(&t.bytes()[..], &s.root, &limits).unwrap_err();
        assert!(
            e.to_string()
                .contains("limit of 2097152 bytes (see --max-layer-size)"),
            "{e}"
        );
    }

    #[test]
    fn a_huge_long_name_is_refused_without_buffering_it() {
        let s = Scene::new();
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(8 << 30);
        h.set_cksum();
        // An endless name: without the metadata budget the crate would try
        // to hold 8 GiB of it.
        let stream = io::Read::chain(&h.as_bytes()[..], io::repeat(b'a'));
        let e = unpack_layer(stream, &s.root, &LayerLimits::default()).unwrap_err();
        assert!(e.to_string().contains("headers"), "{e}");
    }

    #[test]
    fn whiteouts_opaque_dirs_links_and_times_are_kept() {
        if !is_root() {
            return eprintln!("skipped: mknod and trusted xattrs need root");
        }
        let s = Scene::new();
        let mut t = Tar::new();
        t.dir("d/")
            .file("d/f", b"data")
            .hardlink("d/h", "d/f")
            .symlink("d/l", "/nowhere")
            .file("d/.wh.gone", b"")
            .file("o/.wh..wh..opq", b"")
            .entry_with_pax(
                tar::EntryType::Regular,
                "x",
                "",
                b"",
                &[
                    ("SCHILY.xattr.user.kept", b"1"),
                    ("SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
                ],
            )
            .file("implied/child", b"");
        s.unpack(&t).unwrap();
        let r = &s.root;
        let wh = fs::symlink_metadata(r.join("d/gone")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(
            &wh.file_type()
        ));
        assert_eq!(wh.rdev(), 0);
        assert_eq!(
            xattr::get(r.join("o"), OPAQUE_XATTR).unwrap().as_deref(),
            Some(&b"y"[..])
        );
        assert_eq!(fs::metadata(r.join("d/h")).unwrap().nlink(), 2);
        assert_eq!(fs::read_link(r.join("d/l")).unwrap(), Path::new("/nowhere"));
        assert_eq!(
            xattr::get(r.join("x"), "user.kept").unwrap().as_deref(),
            Some(&b"1"[..])
        );
        assert_eq!(
            xattr::get(r.join("x"), "trusted.overlay.redirect").unwrap(),
            None
        );
        assert_eq!(fs::metadata(r.join("d")).unwrap().mtime(), 1_700_000_000);
        assert_eq!(fs::metadata(r.join("implied")).unwrap().mtime(), 0);
        assert_eq!(fs::metadata(r.join("d/f")).unwrap().mtime(), 1_700_000_000);
        assert_eq!(
            fs::symlink_metadata(r.join("d/l")).unwrap().mtime(),
            1_700_000_000
        );
    }
}
