//! The fd holder: a process that does nothing but keep the descriptors of
//! FUSE sessions while their daemon is gone, and give them to the next one
//! (`lazybd fd-holder`; where systemd runs the daemon its fd store does
//! this). Also the daemon's side of it ([`Client`]).
//!
//! Protocol, on a unix `SOCK_SEQPACKET` socket (one message per request,
//! a descriptor attached with `SCM_RIGHTS` where noted):
//!
//! ```text
//! hello <key> <deadline_ms>   -> "fd <name>" + fd, one per stored fd, then "end"
//! put <name> + fd             -> "ok"        (replaces one of that name)
//! del <name>                  -> "ok"
//! serving                     -> "ok"        (this connection serves <key> now)
//! ```
//!
//! # Rules
//!
//! - A session (a key) is *owned* by the connection that said `serving`
//!   last, or the first `hello` while it has no owner.
//! - When the owner's connection closes (its daemon exited or died) while
//!   the session has descriptors, a countdown of the deadline its daemon
//!   gave starts. `serving` on any connection stops it. When it runs out,
//!   the holder closes the session's descriptors: the kernel aborts the
//!   connection and waiting reads fail with EIO, as if there had been no
//!   holder. A daemon that connects and dies before `serving` (a crash
//!   loop) does not restart the countdown.
//! - Only peers with the holder's own uid are served; at most
//!   [`MAX_SESSIONS`] sessions of [`MAX_FDS`] descriptors each.
//! - If the holder dies, the descriptors it held are closed; sessions
//!   whose daemon still runs are unaffected (the daemon has its own
//!   copies) and their daemons give their descriptors to the next holder
//!   when it is back. A session whose daemon is dead too is aborted.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use tracing::{info, warn};

/// Where `lazybd fd-holder` listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/lazybd/fd-holder.sock";
/// Sessions one holder keeps.
pub const MAX_SESSIONS: usize = 64;
/// Descriptors one session keeps.
pub const MAX_FDS: usize = 256;
const MAX_MESSAGE: usize = 512;
/// How long a request waits for the holder's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn send(fd: BorrowedFd<'_>, text: &str, attached: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let iov = [IoSlice::new(text.as_bytes())];
    let raw: Vec<RawFd> = attached.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg: Vec<ControlMessage> = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    socket::sendmsg::<()>(fd.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// One message: its text and the descriptor attached to it, if any.
/// `None` when the peer closed the connection.
fn recv(fd: BorrowedFd<'_>) -> io::Result<Option<(String, Option<OwnedFd>)>> {
    let mut buf = [0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors in
                // this process for us; each is owned exactly once.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
        (msg.bytes, fds)
    };
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    Ok(Some((text, fds.into_iter().next())))
}

// ---------------------------------------------------------------- server

#[derive(Default)]
struct Session {
    fds: BTreeMap<String, OwnedFd>,
    deadline: Duration,
    owner: Option<u64>,
    orphaned_at: Option<Instant>,
}

#[derive(Default)]
struct Held {
    sessions: HashMap<String, Session>,
}

/// A running holder on `socket`.
pub struct Holder {
    held: Arc<Mutex<Held>>,
    socket: PathBuf,
    listener: OwnedFd,
}

impl Holder {
    /// Binds `socket` (mode 0600; an old socket file is replaced).
    pub fn bind(socket: &Path) -> io::Result<Holder> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(socket);
        let listener = seqpacket()?;
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = socket::bind(listener.as_raw_fd(), &UnixAddr::new(socket)?);
        nix::sys::stat::umask(old);
        bound?;
        socket::listen(&listener, Backlog::new(16).map_err(io::Error::from)?)?;
        Ok(Holder {
            held: Arc::default(),
            socket: socket.to_owned(),
            listener,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Serves until the process ends: one thread per connection and one
    /// that enforces the deadlines.
    pub fn run(self) -> io::Result<()> {
        let held = self.held.clone();
        std::thread::Builder::new()
            .name("deadlines".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(100));
                expire(&held);
            })?;
        let ids = AtomicU64::new(1);
        loop {
            let conn = match socket::accept(self.listener.as_raw_fd()) {
                // SAFETY: accept returned a new descriptor we own.
                Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let _ = nix::fcntl::fcntl(
                &conn,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            if !same_uid(&conn) {
                warn!("refusing a peer with another uid");
                continue;
            }
            let id = ids.fetch_add(1, Ordering::Relaxed);
            let held = self.held.clone();
            std::thread::Builder::new()
                .name(format!("conn-{id}"))
                .spawn(move || serve_conn(&held, id, conn))?;
        }
    }
}

fn same_uid(conn: &OwnedFd) -> bool {
    socket::getsockopt(conn, socket::sockopt::PeerCredentials)
        .is_ok_and(|c| c.uid() == nix::unistd::getuid().as_raw())
}

fn lock(held: &Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
    held.lock().unwrap_or_else(|e| e.into_inner())
}

/// Closes the descriptors of sessions whose countdown ran out.
fn expire(held: &Mutex<Held>) {
    let mut held = lock(held);
    held.sessions.retain(|key, s| match s.orphaned_at {
        Some(at) if at.elapsed() >= s.deadline => {
            warn!(
                "session {key}: no daemon served it within {:?} of its last one's exit; \
                 closing its {} descriptors (its FUSE connection aborts)",
                s.deadline,
                s.fds.len()
            );
            false
        }
        _ => true,
    });
}

fn serve_conn(held: &Mutex<Held>, id: u64, conn: OwnedFd) {
    let mut key: Option<String> = None;
    loop {
        let msg = match recv(conn.as_fd()) {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                warn!("connection {id}: {e}");
                break;
            }
        };
        let answer = handle(held, id, &mut key, &conn, msg);
        if let Err(e) = answer.and_then(|text| send(conn.as_fd(), &text, None)) {
            warn!("connection {id}: {e}");
            break;
        }
    }
    let Some(key) = key else { return };
    let mut held = lock(held);
    if let Some(s) = held.sessions.get_mut(&key) {
        if s.owner == Some(id) {
            s.owner = None;
            if s.fds.is_empty() {
                held.sessions.remove(&key);
            } else if s.orphaned_at.is_none() {
                info!(
                    "session {key}: its daemon is gone; keeping {} descriptors for {:?}",
                    s.fds.len(),
                    s.deadline
                );
                s.orphaned_at = Some(Instant::now());
            }
        }
    }
}

/// Answers one request; `hello` sends its descriptors itself and answers `end`.
fn handle(
    held: &Mutex<Held>,
    id: u64,
    key: &mut Option<String>,
    conn: &OwnedFd,
    (text, fd): (String, Option<OwnedFd>),
) -> io::Result<String> {
    let mut words = text.split_whitespace();
    let verb = words.next().unwrap_or_default();
    if verb == "hello" {
        let (Some(k), Some(ms)) = (words.next(), words.next().and_then(|w| w.parse().ok())) else {
            return Ok("error: hello <key> <deadline_ms>".into());
        };
        let mut held = lock(held);
        if !held.sessions.contains_key(k) && held.sessions.len() >= MAX_SESSIONS {
            return Ok(format!("error: more than {MAX_SESSIONS} sessions"));
        }
        let s = held.sessions.entry(k.to_owned()).or_default();
        s.deadline = Duration::from_millis(ms);
        s.owner.get_or_insert(id);
        for (name, fd) in &s.fds {
            send(conn.as_fd(), &format!("fd {name}"), Some(fd.as_fd()))?;
        }
        *key = Some(k.to_owned());
        return Ok("end".into());
    }
    let Some(k) = key.as_deref() else {
        return Ok("error: hello first".into());
    };
    let mut held = lock(held);
    let Some(s) = held.sessions.get_mut(k) else {
        return Ok("error: session gone".into());
    };
    match (verb, words.next(), fd) {
        ("put", Some(name), Some(fd)) => {
            if !s.fds.contains_key(name) && s.fds.len() >= MAX_FDS {
                return Ok(format!("error: more than {MAX_FDS} descriptors"));
            }
            s.fds.insert(name.to_owned(), fd);
            Ok("ok".into())
        }
        ("del", Some(name), None) => {
            s.fds.remove(name);
            Ok("ok".into())
        }
        ("serving", None, None) => {
            if s.orphaned_at.take().is_some() {
                info!("session {k}: served again");
            }
            s.owner = Some(id);
            Ok("ok".into())
        }
        _ => Ok(format!("error: bad request {text:?}")),
    }
}

// ---------------------------------------------------------------- client

/// A daemon's connection to the holder. If the holder goes away, a thread
/// reconnects every second and gives the new holder everything stored.
pub struct Client {
    socket: PathBuf,
    key: String,
    deadline: Duration,
    conn: Mutex<Option<OwnedFd>>,
    inherited: Mutex<Vec<(String, OwnedFd)>>,
    stored: Arc<Mutex<BTreeMap<String, OwnedFd>>>,
    serving: AtomicBool,
}

impl Client {
    /// Connects and says hello; what the holder kept for `key` is then
    /// [`inherited`](Self::inherited). A holder that cannot be reached is
    /// logged, and connected to once it is up (everything stored is given
    /// to it then).
    pub fn connect(
        socket: &Path,
        key: &str,
        deadline: Duration,
        stored: Arc<Mutex<BTreeMap<String, OwnedFd>>>,
    ) -> io::Result<Arc<Client>> {
        let (conn, inherited) = match hello(socket, key, deadline) {
            Ok((conn, inherited)) => (Some(conn), inherited),
            Err(e) => {
                warn!(
                    "fd holder {}: {e}; FUSE sessions would not outlive this daemon until \
                     it is up",
                    socket.display()
                );
                (None, Vec::new())
            }
        };
        let client = Arc::new(Client {
            socket: socket.to_owned(),
            key: key.to_owned(),
            deadline,
            conn: Mutex::new(conn),
            inherited: Mutex::new(inherited),
            stored,
            serving: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&client);
        std::thread::Builder::new()
            .name("fd-holder".into())
            .spawn(move || watch(weak))?;
        Ok(client)
    }

    /// Whether the holder is there now (and so keeps what we stored).
    pub fn is_connected(&self) -> bool {
        self.conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    pub fn inherited(&self) -> Vec<(String, OwnedFd)> {
        std::mem::take(&mut *self.inherited.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn put(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.request(&format!("put {name}"), Some(fd))
    }

    pub fn remove(&self, name: &str) -> io::Result<()> {
        self.request(&format!("del {name}"), None)
    }

    pub fn serving(&self) -> io::Result<()> {
        self.serving.store(true, Ordering::Relaxed);
        self.request("serving", None)
    }

    fn request(&self, text: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let Some(conn) = conn.as_ref() else {
            // The holder is gone; the watcher gives the next one everything.
            return Ok(());
        };
        exchange(conn.as_fd(), text, fd)
    }
}

fn exchange(conn: BorrowedFd<'_>, text: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    send(conn, text, fd)?;
    match recv(conn)? {
        Some((answer, _)) if answer == "ok" => Ok(()),
        Some((answer, _)) => Err(io::Error::other(format!("fd holder: {text}: {answer}"))),
        None => Err(io::Error::other("fd holder closed the connection")),
    }
}

fn hello(
    socket: &Path,
    key: &str,
    deadline: Duration,
) -> io::Result<(OwnedFd, Vec<(String, OwnedFd)>)> {
    let conn = seqpacket()?;
    socket::connect(conn.as_raw_fd(), &UnixAddr::new(socket)?)?;
    let timeout = nix::sys::time::TimeVal::new(REPLY_TIMEOUT.as_secs() as i64, 0);
    socket::setsockopt(&conn, socket::sockopt::ReceiveTimeout, &timeout)?;
    send(
        conn.as_fd(),
        &format!("hello {key} {}", deadline.as_millis()),
        None,
    )?;
    let mut inherited = Vec::new();
    loop {
        match recv(conn.as_fd())? {
            Some((text, fd)) if text == "end" => {
                drop(fd);
                return Ok((conn, inherited));
            }
            Some((text, Some(fd))) if text.starts_with("fd ") => {
                if inherited.len() < MAX_FDS {
                    inherited.push((text[3..].to_owned(), fd));
                }
            }
            Some((text, _)) => return Err(io::Error::other(format!("fd holder: {text}"))),
            None => return Err(io::Error::other("fd holder closed the connection")),
        }
    }
}

/// Waits for the holder to hang up, then reconnects every second and puts
/// everything stored again. Ends with the client.
fn watch(client: std::sync::Weak<Client>) {
    loop {
        let Some(c) = client.upgrade() else { return };
        let raw = c
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|f| f.as_raw_fd());
        drop(c);
        if let Some(raw) = raw {
            // SAFETY: the descriptor stays open while the client lives; if
            // it is replaced meanwhile, poll reports on a closed fd (POLLNVAL)
            // and we look again.
            let fd = unsafe { BorrowedFd::borrow_raw(raw) };
            // No events asked: poll reports only hangup and errors (a reply
            // arriving does not wake us).
            let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::empty())];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                _ => {}
            }
            let hup = fds[0].revents().is_some_and(|r| {
                r.intersects(
                    nix::poll::PollFlags::POLLHUP
                        | nix::poll::PollFlags::POLLERR
                        | nix::poll::PollFlags::POLLNVAL,
                )
            });
            if !hup {
                continue;
            }
            let Some(c) = client.upgrade() else { return };
            warn!(
                "fd holder {} went away: FUSE sessions would not outlive this daemon \
                 until it is back",
                c.socket.display()
            );
            *c.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
            continue;
        }
        std::thread::sleep(Duration::from_secs(1));
        let Some(c) = client.upgrade() else { return };
        let Ok((conn, _stale)) = hello(&c.socket, &c.key, c.deadline) else {
            continue;
        };
        let stored = c.stored.lock().unwrap_or_else(|e| e.into_inner());
        let mut result = stored.iter().try_for_each(|(name, fd)| {
            exchange(conn.as_fd(), &format!("put {name}"), Some(fd.as_fd()))
        });
        if result.is_ok() && c.serving.load(Ordering::Relaxed) {
            result = exchange(conn.as_fd(), "serving", None);
        }
        drop(stored);
        match result {
            Ok(()) => {
                info!(
                    "fd holder {} is back; gave it this daemon's descriptors",
                    c.socket.display()
                );
                *c.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
            }
            Err(e) => warn!("fd holder {}: {e}", c.socket.display()),
        }
    }
}

#[cfg(test)]
mod tests;
