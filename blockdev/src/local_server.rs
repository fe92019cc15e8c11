//! What every local control server of a node needs so that another local
//! user, or a flood of connections, cannot take it over or stop it: unix
//! sockets created with an explicit mode (never the umask's) and callers
//! checked by uid (`SO_PEERCRED`); a cap on connections in which a new
//! connection pushes out the oldest one still waiting for its request, so
//! idle or half-sent connections cannot starve an honest client; and
//! accept errors (EMFILE) that are logged and waited out, never fatal.
//!
//! Used by the snapshotter's metrics, control and gRPC sockets and by
//! `lazybd mount`'s control socket. Deadlines stay with each server (hyper
//! has its own header timeout).

use std::collections::VecDeque;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tracing::warn;

/// Binds a unix socket at `path` with permissions `mode`. The socket is
/// bound in a fresh 0700 directory beside `path`, given its mode, then
/// renamed into place: it never exists at `path` with the umask's mode,
/// and a stale socket there is replaced. The parent directory is created
/// if missing (0755: sockets are protected by their own mode).
pub fn bind_unix(path: &Path, mode: u32) -> io::Result<tokio::net::UnixListener> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent)?;
    let private = parent.join(format!(
        ".bind-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let bound = (|| {
        let temp = private.join("s");
        let listener = std::os::unix::net::UnixListener::bind(&temp)?;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&temp, path)?;
        listener.set_nonblocking(true)?;
        tokio::net::UnixListener::from_std(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound.map_err(|e| io::Error::new(e.kind(), format!("binding {}: {e}", path.display())))
}

/// Who may talk to a control socket: root, and the uids listed.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    pub extra_uids: Vec<u32>,
}

impl PeerPolicy {
    /// Root and this process's own user.
    pub fn root_and_self() -> Self {
        PeerPolicy {
            extra_uids: vec![nix::unistd::geteuid().as_raw()],
        }
    }

    /// The socket mode that lets the allowed users connect: 0600 for root
    /// (and the owner) only; 0666 when other uids are allowed, the uid
    /// check then being the gate.
    pub fn socket_mode(&self) -> u32 {
        let euid = nix::unistd::geteuid().as_raw();
        if self.extra_uids.iter().all(|u| *u == 0 || *u == euid) {
            0o600
        } else {
            0o666
        }
    }

    /// The peer's uid if it may talk to the socket.
    pub fn check(&self, stream: &UnixStream) -> Result<u32, String> {
        let cred = stream
            .peer_cred()
            .map_err(|e| format!("reading the caller's credentials: {e}"))?;
        let uid = cred.uid();
        if uid == 0 || self.extra_uids.contains(&uid) {
            Ok(uid)
        } else {
            Err(format!(
                "uid {uid} (pid {:?}) is not allowed on this socket",
                cred.pid()
            ))
        }
    }
}

/// At most `max` connections; see [`Slots::admit`].
pub struct Slots {
    max: usize,
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    open: usize,
    next_id: u64,
    /// Connections still waiting for their request, oldest first, with
    /// the sender that evicts each.
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
}

impl Slots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Slots {
            max: max.max(1),
            state: Mutex::default(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a connection just accepted. When all are taken, the
    /// oldest connection still waiting for its request is evicted to make
    /// room (an honest client sends its request at once, so only idle and
    /// half-sent connections lose theirs); `None` when every connection is
    /// busy answering: the new one is to be closed.
    pub fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut s = self.state();
        if s.open >= self.max {
            let (_, evict) = s.waiting.pop_front()?;
            let _ = evict.send(());
            // The evicted connection gives its count back when it drops;
            // until then this one is counted too (briefly over `max`).
        }
        s.open += 1;
        let id = s.next_id;
        s.next_id += 1;
        let (tx, rx) = oneshot::channel();
        s.waiting.push_back((id, tx));
        Some(Slot {
            slots: self.clone(),
            id,
            evicted: Some(rx),
        })
    }

    /// Evicts the oldest waiting connection (to free a descriptor after
    /// EMFILE); whether there was one.
    pub fn evict_oldest(&self) -> bool {
        match self.state().waiting.pop_front() {
            Some((_, evict)) => {
                let _ = evict.send(());
                true
            }
            None => false,
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.state().open
    }
}

/// One connection's place among [`Slots`]; freed on drop.
pub struct Slot {
    slots: Arc<Slots>,
    id: u64,
    evicted: Option<oneshot::Receiver<()>>,
}

impl Slot {
    /// The connection's request arrived: it is no longer evicted for newer
    /// connections (its own deadline still bounds it).
    pub fn busy(&self) {
        self.slots.state().waiting.retain(|(id, _)| *id != self.id);
    }

    /// What says this connection was evicted (taken once, so that the slot
    /// itself can then be shared with the request handler).
    pub fn eviction(&mut self) -> Eviction {
        Eviction(self.evicted.take())
    }
}

/// See [`Slot::eviction`].
pub struct Eviction(Option<oneshot::Receiver<()>>);

impl Eviction {
    /// Resolves once the connection was evicted; never if it is not.
    pub async fn wait(self) {
        let evicted = match self.0 {
            Some(rx) => rx.await.is_ok(),
            None => false,
        };
        if !evicted {
            // The sender is gone without a send: `busy` took the slot off
            // the waiting list, so no eviction can come.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.state();
        s.waiting.retain(|(id, _)| *id != self.id);
        s.open -= 1;
    }
}

/// How long an accept loop waits after an accept error before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Handles an accept error of the server `what`: logs it (at most once a
/// second), evicts the oldest waiting connection of `slots` when the
/// process is out of descriptors, and waits a moment. The caller goes on
/// accepting afterwards: an accept error is never fatal to a server.
pub async fn accept_failed(
    what: &str,
    e: &io::Error,
    slots: &Slots,
    last_log: &Mutex<Option<Instant>>,
) {
    let out_of_fds = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    );
    let evicted = out_of_fds && slots.evict_oldest();
    let log_now = {
        let mut last = last_log.lock().unwrap_or_else(|e| e.into_inner());
        let due = last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if due {
            *last = Some(Instant::now());
        }
        due
    };
    if log_now {
        warn!(
            "{what}: accepting a connection failed: {e}; {} open, {}retrying in {ACCEPT_BACKOFF:?}",
            slots.open(),
            if evicted {
                "the oldest idle one closed, "
            } else {
                ""
            }
        );
    }
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_full_server_evicts_its_oldest_waiting_connection() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let slots = Slots::new(2);
            let mut a = slots.admit().unwrap();
            let b = slots.admit().unwrap();
            b.busy();
            // Full: the oldest waiting one (a) goes, not the busy b.
            let c = slots.admit().unwrap();
            tokio::time::timeout(Duration::from_secs(1), a.eviction().wait())
                .await
                .expect("a evicted");
            drop(a);
            assert_eq!(slots.open(), 2);
            c.busy();
            // Every connection busy: no room.
            assert!(slots.admit().is_none());
            drop(b);
            let mut d = slots.admit().unwrap();
            let mut eviction = std::pin::pin!(d.eviction().wait());
            assert!(
                tokio::time::timeout(Duration::from_millis(50), &mut eviction)
                    .await
                    .is_err(),
                "d has room, nobody evicts it"
            );
            assert!(slots.evict_oldest());
            tokio::time::timeout(Duration::from_secs(1), eviction)
                .await
                .expect("d evicted");
            drop((c, d));
            assert_eq!(slots.open(), 0);
        });
    }

    #[test]
    fn sockets_get_their_mode_not_the_umask() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sub/control.sock");
        rt.block_on(async {
            // Bound as usual, the socket would have 0777 less the umask.
            let _listener = bind_unix(&path, 0o600).unwrap();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            assert_eq!(meta.mode() & 0o777, 0o600);
            // A stale socket is replaced, and no private dir is left.
            let _again = bind_unix(&path, 0o660).unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o660);
            let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["control.sock"]);
        });
    }

    #[test]
    fn peers_are_checked_by_uid() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        rt.block_on(async {
            let (a, _b) = UnixStream::pair().unwrap();
            let me = nix::unistd::geteuid().as_raw();
            assert_eq!(PeerPolicy::root_and_self().check(&a), Ok(me));
            if me != 0 {
                assert!(PeerPolicy::default().check(&a).is_err());
            }
            assert_eq!(PeerPolicy::default().socket_mode(), 0o600);
            let others = PeerPolicy {
                extra_uids: vec![me + 1000],
            };
            assert_eq!(others.socket_mode(), 0o666);
        });
    }
}
