//! Where a daemon's FUSE session waits while the daemon restarts, as the
//! tests provide it: a real `lazybd fd-holder` process, or a stand-in for
//! systemd's file descriptor store that speaks systemd's protocol (a notify
//! datagram socket taking `FDSTORE=1`/`FDNAME=`/`FDSTOREREMOVE=1` with
//! `SCM_RIGHTS`, the stored descriptors passed to the next start as
//! `$LISTEN_FDS` from fd 3 on with `$LISTEN_FDNAMES` and `$LISTEN_PID`),
//! since no systemd runs the tests.

use std::collections::BTreeMap;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use crate::daemon::Daemon;

/// A running `lazybd fd-holder` on a private socket.
pub struct FdHolder {
    daemon: Daemon,
    pub socket: PathBuf,
    log: PathBuf,
}

impl FdHolder {
    pub fn start(dir: &Path) -> FdHolder {
        let socket = dir.join("fd-holder.sock");
        let log = dir.join("fd-holder.log");
        FdHolder {
            daemon: spawn_holder(&socket, &log),
            socket,
            log,
        }
    }

    /// SIGKILL: the descriptors it held are closed.
    pub fn kill(&mut self) {
        self.daemon.kill();
    }

    /// Starts it again on the same socket (after [`kill`](Self::kill)).
    pub fn start_again(&mut self) {
        self.daemon = spawn_holder(&self.socket, &self.log);
    }

    /// The `[restart]` table of a snapshotter config that uses it.
    pub fn snapshotter_config(&self) -> String {
        format!(
            "[restart]\nfd_store = \"holder\"\nfd_holder = \"{}\"\n",
            self.socket.display()
        )
    }

    pub fn log(&self) -> String {
        self.daemon.log()
    }
}

fn spawn_holder(socket: &Path, log: &Path) -> Daemon {
    let _ = std::fs::remove_file(socket);
    let mut cmd = Command::new(crate::bin_path("lazybd"));
    cmd.arg("fd-holder").arg("--socket").arg(socket);
    let mut d = Daemon::spawn("lazybd fd-holder", cmd, log);
    d.wait_ready(Duration::from_secs(10), "holder socket", || socket.exists());
    d
}

/// A stand-in for systemd's fd store: give [`Self::prepare`] the daemon's
/// command before each start.
pub struct SystemdStore {
    pub notify_socket: PathBuf,
    stored: Arc<Mutex<BTreeMap<String, OwnedFd>>>,
    /// `READY=1` messages received.
    ready: Arc<Mutex<u32>>,
}

/// The receiving thread shares the stored descriptors and never ends:
/// release them when the store goes, as systemd does when the unit stops,
/// so a session left behind by a failed test is aborted instead of keeping
/// whatever touches its mount (a temp dir's removal) waiting forever.
impl Drop for SystemdStore {
    fn drop(&mut self) {
        self.release();
    }
}

impl SystemdStore {
    pub fn start(dir: &Path) -> SystemdStore {
        let notify_socket = dir.join("notify.sock");
        let _ = std::fs::remove_file(&notify_socket);
        let sock = UnixDatagram::bind(&notify_socket).unwrap();
        let stored: Arc<Mutex<BTreeMap<String, OwnedFd>>> = Arc::default();
        let ready = Arc::new(Mutex::new(0));
        let (s, r) = (stored.clone(), ready.clone());
        std::thread::spawn(move || receive(sock, &s, &r));
        SystemdStore {
            notify_socket,
            stored,
            ready,
        }
    }

    /// Names of the descriptors stored now.
    pub fn names(&self) -> Vec<String> {
        self.stored.lock().unwrap().keys().cloned().collect()
    }

    pub fn ready_count(&self) -> u32 {
        *self.ready.lock().unwrap()
    }

    /// Drops every stored descriptor (`systemctl stop` releases the store).
    pub fn release(&self) {
        self.stored.lock().unwrap().clear();
    }

    /// Sets up `cmd` as systemd would start a `Type=notify` service with
    /// `FileDescriptorStoreMax=`: `$NOTIFY_SOCKET`, and the stored
    /// descriptors as fds 3.. with `$LISTEN_FDS`, `$LISTEN_FDNAMES` and
    /// `$LISTEN_PID` (set in the child, to its own pid).
    pub fn prepare(&self, cmd: &mut Command) {
        cmd.env("NOTIFY_SOCKET", &self.notify_socket);
        let stored = self.stored.lock().unwrap();
        let names: Vec<String> = stored.keys().cloned().collect();
        // Duplicates that live until the child has exec'd (dropped with the
        // Command's closure in this process afterwards).
        let fds: Vec<OwnedFd> = stored.values().map(|f| f.try_clone().unwrap()).collect();
        drop(stored);
        if fds.is_empty() {
            return;
        }
        cmd.env("LISTEN_FDS", fds.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let keep = Arc::new(fds);
        // SAFETY: only async-signal-safe calls (fcntl, dup2, close) between
        // fork and exec. LISTEN_PID is set by a shell wrapper ([`command`]).
        unsafe {
            cmd.pre_exec(move || {
                let _keep = &keep;
                let n = raw.len() as RawFd;
                // First out of the way of 3..3+n, then into place.
                let mut high = Vec::with_capacity(raw.len());
                for &fd in &raw {
                    let h = nix::libc::fcntl(fd, nix::libc::F_DUPFD, 3 + n + 64);
                    if h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    high.push(h);
                }
                for (i, &h) in high.iter().enumerate() {
                    if nix::libc::dup2(h, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    nix::libc::close(h);
                }
                Ok(())
            });
        }
    }

    /// Wraps `program args` so the child sets `$LISTEN_PID` to its own pid
    /// (systemd sets it for the process it forks; a shell's `exec` keeps it).
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("export LISTEN_PID=$$; exec \"$0\" \"$@\"")
            .arg(program);
        cmd
    }
}

fn receive(sock: UnixDatagram, stored: &Mutex<BTreeMap<String, OwnedFd>>, ready: &Mutex<u32>) {
    loop {
        let mut buf = [0u8; 4096];
        let mut cmsg = nix::cmsg_space!([RawFd; 16]);
        let (text, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let Ok(msg) = recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) else {
                return;
            };
            let mut fds = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: just received, owned once.
                        fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                    }
                }
            }
            (msg.bytes, fds)
        };
        let text = String::from_utf8_lossy(&buf[..text]).into_owned();
        let fields: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let name = fields.get("FDNAME").copied().unwrap_or("stored").to_owned();
        let mut stored = stored.lock().unwrap();
        if fields.get("FDSTOREREMOVE") == Some(&"1") {
            stored.remove(&name);
        }
        if fields.get("FDSTORE") == Some(&"1") {
            for fd in fds {
                // systemd keeps the first of a name; the daemon removes first.
                stored.entry(name.clone()).or_insert(fd);
            }
        }
        if fields.get("READY") == Some(&"1") {
            *ready.lock().unwrap() += 1;
        }
    }
}
