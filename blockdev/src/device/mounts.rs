//! Kernel mounts: EROFS from a loop device, read-only overlay stacks, and
//! finding what is mounted under a directory (stale mounts, leak checks).

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

fn errno_ctx(what: String) -> impl FnOnce(nix::errno::Errno) -> io::Error {
    move |e| io::Error::new(io::Error::from(e).kind(), format!("{what}: {e}"))
}

/// Mounts the EROFS image on `device` read-only at `target`.
pub fn mount_erofs(device: &Path, target: &Path) -> io::Result<()> {
    mount(
        Some(device),
        target,
        Some("erofs"),
        MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(errno_ctx(format!(
        "mount erofs {} at {}",
        device.display(),
        target.display()
    )))
}

/// Stacks `lowers` (top first) read-only at `target`: overlayfs for two or
/// more layers, a read-only bind mount for one (overlayfs without an upper
/// dir needs at least two lower dirs).
pub fn mount_stack(lowers: &[PathBuf], target: &Path) -> io::Result<()> {
    match lowers {
        [] => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no layers to stack",
        )),
        [only] => {
            mount(
                Some(only.as_path()),
                target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(errno_ctx(format!(
                "bind {} at {}",
                only.display(),
                target.display()
            )))?;
            let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            if let Err(e) = mount(None::<&str>, target, None::<&str>, ro, None::<&str>) {
                let _ = umount2(target, MntFlags::empty());
                return Err(errno_ctx(format!("remount {} read-only", target.display()))(e));
            }
            Ok(())
        }
        many => {
            let mut opts = String::from("lowerdir=");
            for (i, l) in many.iter().enumerate() {
                let s = l.to_str().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "non-UTF-8 layer path")
                })?;
                if s.contains([':', ',', '\\']) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "layer path {s} contains a character overlayfs options cannot carry"
                        ),
                    ));
                }
                if i > 0 {
                    opts.push(':');
                }
                opts.push_str(s);
            }
            mount(
                Some("lazybd"),
                target,
                Some("overlay"),
                MsFlags::MS_RDONLY,
                Some(opts.as_str()),
            )
            .map_err(errno_ctx(format!("mount overlay at {}", target.display())))
        }
    }
}

/// Unmounts `target`; `lazy` detaches it even while busy.
pub fn unmount(target: &Path, lazy: bool) -> io::Result<()> {
    let flags = if lazy {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    umount2(target, flags).map_err(errno_ctx(format!("umount {}", target.display())))
}

/// Mount points at or under `dir`, deepest first (the order to unmount them).
pub fn mounts_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// The filesystem type and source of the mount at `path` (the last one
/// mounted there), from mountinfo.
pub fn mount_info(path: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter(|line| line.split(' ').nth(4).map(unescape).as_deref() == path.to_str())
        .filter_map(|line| {
            let (_, tail) = line.split_once(" - ")?;
            let mut tail = tail.split(' ');
            Some((tail.next()?.to_owned(), unescape(tail.next()?)))
        })
        .next_back()
}

/// The device (`major:minor`) of the mount at `path`, from mountinfo
/// (without a `stat`, which on a FUSE mount would need its daemon).
pub fn mount_device(path: &Path) -> Option<(u32, u32)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter(|line| line.split(' ').nth(4).map(unescape).as_deref() == path.to_str())
        .filter_map(|line| {
            let (major, minor) = line.split(' ').nth(2)?.split_once(':')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        })
        .next_back()
}

/// The filesystem type of the mount at `path`.
pub fn mount_fstype(path: &Path) -> Option<String> {
    mount_info(path).map(|(fstype, _)| fstype)
}

/// Whether `path` is a mount point.
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    Ok(mounts_under(path)?.iter().any(|p| p == path))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b\011c\134d"), "/a b\tc\\d");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/trail\04"), r"/trail\04");
    }
}
