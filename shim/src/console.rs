//! TTY support: runc sends the pty master of a `terminal: true` process over
//! a unix socket (`--console-socket`); the shim keeps it to copy the
//! terminal to containerd's fifos and to resize it.

use std::{
    fs::File,
    io::IoSliceMut,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use tokio::net::UnixListener;

use crate::error::{io_context, Error, Result};

/// runc connects while it sets the process up; if it has not sent the
/// terminal by then, its create/exec has failed and reported why.
const RECEIVE_DEADLINE: Duration = Duration::from_secs(60);

/// A listening console socket in a private temp dir, removed on drop.
pub struct ConsoleSocket {
    listener: UnixListener,
    dir: PathBuf,
    path: PathBuf,
}

impl ConsoleSocket {
    pub fn new() -> Result<Self> {
        // Bundle paths can exceed the 108-byte sun_path limit; the temp dir cannot.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lazybd-pty-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(io_context(format!("mkdir {}", dir.display())))?;
        let path = dir.join("pty.sock");
        let listener =
            UnixListener::bind(&path).map_err(io_context(format!("bind {}", path.display())))?;
        Ok(Self {
            listener,
            dir,
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for runc to send the pty master.
    pub async fn receive_master(&self) -> Result<File> {
        let accept = tokio::time::timeout(RECEIVE_DEADLINE, self.listener.accept()).await;
        let (stream, _) = accept
            .map_err(|_| Error::DeadlineExceeded("receive the console from runc".into()))?
            .map_err(io_context("accept on the console socket"))?;
        let stream = stream
            .into_std()
            .map_err(io_context("console socket stream"))?;
        stream
            .set_nonblocking(false)
            .map_err(io_context("console socket stream"))?;
        stream
            .set_read_timeout(Some(RECEIVE_DEADLINE))
            .map_err(io_context("console socket stream"))?;
        tokio::task::spawn_blocking(move || receive_fd(stream.as_raw_fd()))
            .await
            .map_err(|e| Error::io("receive the console", std::io::Error::other(e)))?
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn receive_fd(socket: RawFd) -> Result<File> {
    let mut name = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut name)];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        socket,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| Error::io("recvmsg on the console socket", e.into()))?;
    for cmsg in msg
        .cmsgs()
        .map_err(|e| Error::io("console message", e.into()))?
    {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            let mut fds = fds.into_iter();
            if let Some(fd) = fds.next() {
                // Anything beyond the first descriptor is not ours to keep open.
                for extra in fds {
                    // SAFETY: received just now, owned by nobody else.
                    drop(unsafe { OwnedFd::from_raw_fd(extra) });
                }
                // SAFETY: received just now, owned by nobody else.
                return Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
    }
    Err(Error::io(
        "console socket",
        std::io::Error::other("runc sent no terminal descriptor"),
    ))
}

/// Sets the window size of the terminal whose master is `master`.
pub fn resize(master: &impl AsFd, width: u32, height: u32) -> Result<()> {
    let size = libc::winsize {
        ws_row: height.min(u16::MAX as u32) as u16,
        ws_col: width.min(u16::MAX as u32) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which outlives the call.
    let rc = unsafe { libc::ioctl(master.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if rc < 0 {
        return Err(Error::io(
            "resize the terminal",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}
