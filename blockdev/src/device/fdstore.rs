//! Where a FUSE session's descriptors wait while no daemon runs: systemd's
//! file descriptor store where systemd runs the service, elsewhere a
//! `lazybd fd-holder` (the [`holder`](super::holder) protocol), or nowhere.
//!
//! The daemon puts each descriptor there as soon as it exists and removes
//! it only when the session is unmounted; a daemon that starts takes back
//! what the previous one left under its key. The store keeps its own
//! copies, so a daemon that dies before it serves loses nothing.
//!
//! Names in the store are `<key>.<name>`; the key names the session (one
//! per layer manager root), so several daemons can share one holder.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tracing::{info, warn};

use super::holder::Client;

/// Which fd store the daemon uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum FdStoreKind {
    /// None: the session dies with the daemon (reads fail until the next
    /// one recovers the loop devices).
    #[default]
    None,
    /// systemd's (`FDSTORE=1` to `$NOTIFY_SOCKET`; back as `$LISTEN_FDS`).
    Systemd,
    /// A `lazybd fd-holder` listening on this socket.
    Holder(PathBuf),
}

impl FdStoreKind {
    /// `auto`: systemd when it started us with a notify socket, else the
    /// holder if its socket exists, else none.
    pub fn auto(holder_socket: &Path) -> FdStoreKind {
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            FdStoreKind::Systemd
        } else if holder_socket.exists() {
            FdStoreKind::Holder(holder_socket.to_owned())
        } else {
            FdStoreKind::None
        }
    }

    /// From a setting: `auto`, `systemd`, `holder` (at `holder_socket`) or `none`.
    pub fn parse(setting: &str, holder_socket: &Path) -> Result<FdStoreKind, String> {
        match setting {
            "auto" => Ok(Self::auto(holder_socket)),
            "systemd" => Ok(FdStoreKind::Systemd),
            "holder" => Ok(FdStoreKind::Holder(holder_socket.to_owned())),
            "none" => Ok(FdStoreKind::None),
            other => Err(format!(
                "fd store {other:?}: expected auto, systemd, holder or none"
            )),
        }
    }
}

/// One session's place in the fd store.
pub struct FdStore {
    kind: FdStoreKind,
    key: String,
    holder: Option<Arc<Client>>,
    /// What we put there, so a restarted holder can be given it again.
    stored: Arc<Mutex<BTreeMap<String, OwnedFd>>>,
}

impl FdStore {
    /// The store for session `key`; with a holder, connects to it
    /// (`deadline`: how long it keeps the descriptors for a daemon that
    /// died before aborting the session). A holder that cannot be reached
    /// is logged and the session is not kept.
    pub fn open(kind: FdStoreKind, key: &str, deadline: Duration) -> FdStore {
        let stored = Arc::new(Mutex::new(BTreeMap::new()));
        let holder = match &kind {
            FdStoreKind::Holder(socket) => {
                match Client::connect(socket, key, deadline, stored.clone()) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        warn!(
                            "fd holder {}: {e}; FUSE sessions do not outlive this daemon",
                            socket.display()
                        );
                        None
                    }
                }
            }
            _ => None,
        };
        FdStore {
            kind,
            key: key.to_owned(),
            holder,
            stored,
        }
    }

    pub fn kind(&self) -> &FdStoreKind {
        &self.kind
    }

    /// Whether descriptors put here outlive this process (right now: a
    /// holder may be down for a while).
    pub fn keeps_fds(&self) -> bool {
        match self.kind {
            FdStoreKind::None => false,
            FdStoreKind::Systemd => true,
            FdStoreKind::Holder(_) => self.holder.as_ref().is_some_and(|h| h.is_connected()),
        }
    }

    /// Whether this daemon puts its descriptors anywhere (a holder that is
    /// down now gets them once it is back).
    pub fn configured(&self) -> bool {
        self.holder.is_some() || self.kind == FdStoreKind::Systemd
    }

    /// What the previous daemon left under our key, by name (without the
    /// key). The store keeps its copies.
    pub fn take_inherited(&self) -> BTreeMap<String, OwnedFd> {
        let prefix = format!("{}.", self.key);
        let all = match (&self.kind, &self.holder) {
            (FdStoreKind::Systemd, _) => systemd_inherited(&prefix),
            (FdStoreKind::Holder(_), Some(h)) => h.inherited(),
            _ => Vec::new(),
        };
        all.into_iter()
            .filter_map(|(name, fd)| Some((name.strip_prefix(&prefix)?.to_owned(), fd)))
            .collect()
    }

    /// Puts `fd` in the store as `name` (replacing one of that name).
    pub fn put(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        let full = format!("{}.{name}", self.key);
        match (&self.kind, &self.holder) {
            (FdStoreKind::Systemd, _) => {
                // systemd keeps the first of two fds of one name: remove first.
                sd_notify::notify(&[
                    sd_notify::NotifyState::FdStoreRemove,
                    sd_notify::NotifyState::FdName(&full),
                ])?;
                sd_notify::notify_with_fds(
                    &[
                        sd_notify::NotifyState::FdStore,
                        sd_notify::NotifyState::FdName(&full),
                    ],
                    &[fd],
                )?;
            }
            (FdStoreKind::Holder(_), Some(h)) => h.put(&full, fd)?,
            _ => return Ok(()),
        }
        self.stored
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(full, fd.try_clone_to_owned()?);
        Ok(())
    }

    /// Removes `name` from the store.
    pub fn remove(&self, name: &str) {
        let full = format!("{}.{name}", self.key);
        self.stored
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&full);
        let removed = match (&self.kind, &self.holder) {
            (FdStoreKind::Systemd, _) => sd_notify::notify(&[
                sd_notify::NotifyState::FdStoreRemove,
                sd_notify::NotifyState::FdName(&full),
            ]),
            (FdStoreKind::Holder(_), Some(h)) => h.remove(&full),
            _ => Ok(()),
        };
        if let Err(e) = removed {
            warn!("removing {full} from the fd store: {e}");
        }
    }

    /// Tells the holder this daemon serves the session now: it stops the
    /// countdown a previous daemon's death started.
    pub fn serving(&self) {
        if let Some(h) = &self.holder {
            if let Err(e) = h.serving() {
                warn!("fd holder: {e}");
            }
        }
    }

    /// Removes everything this daemon stored (the session is unmounted).
    pub fn remove_all(&self) {
        let prefix = format!("{}.", self.key);
        let names: Vec<String> = self
            .stored
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter_map(|full| full.strip_prefix(&prefix).map(str::to_owned))
            .collect();
        for name in names {
            self.remove(&name);
        }
    }
}

/// The descriptors systemd passed at start (`$LISTEN_FDS`, named by
/// `$LISTEN_FDNAMES`), taken once per process; those whose name starts
/// with `prefix` are returned, the others stay for another caller.
fn systemd_inherited(prefix: &str) -> Vec<(String, OwnedFd)> {
    static PASSED: OnceLock<Mutex<Vec<(String, OwnedFd)>>> = OnceLock::new();
    let passed = PASSED.get_or_init(|| {
        let fds = match sd_notify::listen_fds_with_names() {
            Ok(fds) => fds
                .map(|(raw, name)| {
                    // SAFETY: systemd passed these descriptors to this
                    // process for it to own (LISTEN_PID is checked); we
                    // take each exactly once.
                    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                    let _ = nix::fcntl::fcntl(
                        &fd,
                        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                    );
                    (name, fd)
                })
                .collect(),
            Err(e) => {
                warn!("reading the descriptors systemd passed: {e}");
                Vec::new()
            }
        };
        Mutex::new(fds)
    });
    let mut passed = passed.lock().unwrap_or_else(|e| e.into_inner());
    let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut *passed)
        .into_iter()
        .partition(|(name, _)| name.starts_with(prefix));
    *passed = rest;
    if !mine.is_empty() {
        info!(
            "systemd passed {} stored descriptors of {prefix}*",
            mine.len()
        );
    }
    mine
}

/// A session key for the layer manager root `root`: stable, short, and
/// made of characters every store accepts.
pub fn session_key(root: &Path) -> String {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_owned());
    let h = crate::format::sha256(root.as_os_str().as_encoded_bytes());
    format!("lazybd-{}", hex::encode(&h[..8]))
}
