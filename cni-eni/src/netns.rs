//! Network namespaces by path, and a netlink socket bound to each.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};

use crate::error::{CniError, Result};
use crate::link::Netlink;

/// An open network namespace. Holding the fd keeps the namespace alive for
/// the duration of the operation even if its bind mount is removed.
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// The namespace this process runs in (the runtime's, i.e. the host's).
    pub fn host() -> Result<Netns> {
        Netns::open(Path::new("/proc/self/ns/net"))
            .map_err(|e| CniError::io("open the host netns /proc/self/ns/net", e))
    }

    /// Opens `path` and checks that it really is a network namespace
    /// (nsfs), so a stray regular file is refused instead of setns'd into.
    /// `NotFound` means the namespace is gone.
    pub fn open(path: &Path) -> io::Result<Netns> {
        let file = File::open(path)?;
        let fs = fstatfs(&file).map_err(io::Error::from)?;
        if fs.filesystem_type() != NSFS_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not a network namespace (not on nsfs)",
                    path.display()
                ),
            ));
        }
        Ok(Netns {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// A netlink connection whose socket lives in this namespace. A netlink
    /// socket stays bound to the netns it was created in, so we create it on
    /// a short-lived thread that setns()es there and never touch the
    /// namespace of the thread running the async code.
    pub async fn netlink(&self) -> Result<Netlink> {
        let fd = self
            .file
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| CniError::io("dup netns fd", e))?;
        let rt = tokio::runtime::Handle::current();
        let label = self.path.display().to_string();
        let made = std::thread::spawn(move || {
            nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            let _guard = rt.enter();
            rtnetlink::new_connection()
        })
        .join()
        .map_err(|_| CniError::io("netlink thread", io::Error::other("panicked")))?;
        let (conn, handle, _) =
            made.map_err(|e| CniError::io(format!("netlink socket in netns {label}"), e))?;
        tokio::spawn(conn);
        Ok(Netlink::new(handle, label))
    }
}
