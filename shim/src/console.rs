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

use std::os::unix::fs::DirBuilderExt;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use tokio::net::UnixListener;

use crate::error::{io_context, Error, Result};

/// runc connects while it sets the process up; if it has not sent the
/// terminal by then, its create/exec has failed and reported why.
const RECEIVE_DEADLINE: Duration = Duration::from_secs(60);

/// A listening console socket in a private (0700, freshly made) temp dir,
/// removed on drop. Only root may hand it a terminal: the pty master it
/// receives becomes the container's console.
pub struct ConsoleSocket {
    listener: UnixListener,
    dir: PathBuf,
    path: PathBuf,
}

impl ConsoleSocket {
    pub fn new() -> Result<Self> {
        // Bundle paths can exceed the 108-byte sun_path limit; the temp dir cannot.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // A directory made now with mode 0700, never one that exists: in a
        // shared temp dir another user could have made it (or a symlink)
        // under the predictable name, and then reach the socket.
        let dir = loop {
            let dir = std::env::temp_dir().join(format!(
                "lazybd-pty-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => break dir,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_context(format!("mkdir {}", dir.display()))(e)),
            }
        };
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
        let accept = tokio::time::timeout(RECEIVE_DEADLINE, self.accept_root()).await;
        let stream = accept
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

impl ConsoleSocket {
    /// The next connection from root (runc); others are dropped.
    async fn accept_root(&self) -> std::io::Result<tokio::net::UnixStream> {
        loop {
            let (stream, _) = self.listener.accept().await?;
            match stream.peer_cred() {
                Ok(cred) if cred.uid() == 0 || cred.uid() == nix::unistd::geteuid().as_raw() => {
                    return Ok(stream)
                }
                Ok(cred) => log::warn!(
                    "console socket {}: refused uid {} (pid {:?})",
                    self.path.display(),
                    cred.uid(),
                    cred.pid()
                ),
                Err(e) => log::warn!("console socket {}: {e}", self.path.display()),
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_console_socket_lives_in_a_fresh_private_dir() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        rt.block_on(async {
            // Another user squatting on the next names (with an open
            // directory) is skipped, never used.
            let squatted: Vec<PathBuf> = (0..64)
                .map(|n| {
                    std::env::temp_dir().join(format!("lazybd-pty-{}-{n}", std::process::id()))
                })
                .filter(|d| std::fs::create_dir(d).is_ok())
                .collect();
            for d in &squatted {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
            }
            let socket = ConsoleSocket::new().unwrap();
            let dir = socket.path().parent().unwrap().to_owned();
            for d in &squatted {
                std::fs::remove_dir(d).unwrap();
            }
            assert!(!squatted.contains(&dir), "{dir:?}");
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
            drop(socket);
            assert!(!dir.exists());
        });
    }
}
