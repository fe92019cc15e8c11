//! `/dev/fuse` file descriptors: one per FUSE thread (a clone of the
//! session's), reading requests and writing replies. A reply must go to the
//! descriptor its request was read from (the kernel keeps a request on that
//! descriptor's processing list until it is answered).

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use super::abi::{self, OutHeader, Pod};

nix::ioctl_read!(fuse_dev_ioc_clone, abi::DEV_IOC_MAGIC, 0, u32);

/// One `/dev/fuse` descriptor of a connection.
#[derive(Debug)]
pub struct Channel {
    file: File,
}

/// What reading a request gave.
pub enum Received {
    Request(usize),
    /// The connection is gone (unmounted or aborted): stop reading.
    Gone,
}

impl Channel {
    /// A fresh `/dev/fuse` descriptor, not yet part of any connection.
    pub fn open_device() -> io::Result<Channel> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/fuse")?;
        Ok(Channel { file })
    }

    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel {
            file: File::from(fd),
        }
    }

    /// Another descriptor of the same connection (`FUSE_DEV_IOC_CLONE`): a
    /// thread of its own reading requests, with its own processing list.
    pub fn clone_session(&self) -> io::Result<Channel> {
        let clone = Channel::open_device()?;
        let mut fd = self.file.as_raw_fd() as u32;
        // SAFETY: the ioctl reads the session fd number from `fd`, which
        // lives for the call.
        unsafe { fuse_dev_ioc_clone(clone.file.as_raw_fd(), &mut fd) }
            .map_err(|e| io::Error::other(format!("FUSE_DEV_IOC_CLONE: {e}")))?;
        Ok(clone)
    }

    pub fn raw(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    /// Blocks until a request arrives, into `buf`.
    pub fn receive(&self, buf: &mut [u8]) -> io::Result<Received> {
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe {
                libc::read(
                    self.file.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                )
            };
            if n >= 0 {
                return Ok(Received::Request(n as usize));
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                // The request was interrupted before we got it; a signal.
                Some(libc::ENOENT) | Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                Some(libc::ENODEV) => return Ok(Received::Gone),
                _ => return Err(err),
            }
        }
    }

    /// Sends a reply (or a notification, `unique` 0): header and `parts`
    /// in one `writev`, as the kernel requires.
    pub fn send(&self, unique: u64, error: i32, parts: &[&[u8]]) -> io::Result<()> {
        let len = size_of::<OutHeader>() + parts.iter().map(|p| p.len()).sum::<usize>();
        let header = OutHeader {
            len: len as u32,
            error,
            unique,
        };
        let mut iov = Vec::with_capacity(parts.len() + 1);
        iov.push(IoSlice::new(header.as_bytes()));
        iov.extend(parts.iter().map(|p| IoSlice::new(p)));
        loop {
            // SAFETY: IoSlice is ABI compatible with iovec; every slice
            // outlives the call.
            let n = unsafe {
                libc::writev(
                    self.file.as_raw_fd(),
                    iov.as_ptr() as *const libc::iovec,
                    iov.len() as libc::c_int,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(err);
            }
        }
    }

    /// Asks the kernel to put every request that was read from any
    /// descriptor of this connection but not answered back in its queue
    /// (`FUSE_NOTIFY_RESEND`, Linux 6.9+): what a dead daemon had taken.
    pub fn notify_resend(&self) -> io::Result<()> {
        self.send(0, abi::NOTIFY_RESEND, &[])
    }
}
