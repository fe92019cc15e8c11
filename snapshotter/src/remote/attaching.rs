//! Attaches that finish behind their Prepare.
//!
//! A layer's Prepare waits only until the layer's index is fetched and
//! verified against its anchor (and its cache is open): then its snapshot
//! is committed, and the rest of the attach (FUSE file, loop device, EROFS
//! mount, which reads the superblock through the lazy path) goes on on its
//! own task. The pull goes on to the next layer meanwhile, and the
//! container's start overlaps the attaches instead of waiting for each in
//! turn. Whatever needs the layer's mount (a container's Prepare on top of
//! it, Mounts, View) waits for its attach here; one that failed is tried
//! again by the next such wait.
//!
//! A snapshot name commits to content (docs/security.md): no record is
//! committed for a layer whose index did not verify, so an image lying
//! about its anchor still fails at its Prepare and never holds the name
//! of the layer it claims.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt, Shared};
use lazybd_blockdev::device::DeviceError;
use lazybd_blockdev::oci::LayerId;
use tokio::sync::oneshot;
use tracing::warn;

use super::RemoteError;

/// How long a mount waits for its layer's attach. An attach's own steps
/// have deadlines (fetches, the EROFS mount's reads); this bounds the sum.
pub const ATTACH_WAIT: Duration = Duration::from_secs(120);

/// The outcome of one attach, for every waiter: the EROFS mount.
pub type Attached = Result<PathBuf, Arc<RemoteError>>;

/// One attach running, for everyone who waits on it.
#[derive(Clone)]
pub struct Attach {
    /// Ends when the index is verified, or with the attach's error.
    pub verified: Shared<BoxFuture<'static, Result<(), Arc<RemoteError>>>>,
    /// Ends with the attach.
    pub attached: Shared<BoxFuture<'static, Attached>>,
}

/// The attaches running now, by layer identity: at most one each.
#[derive(Clone, Default)]
pub struct Attaching {
    running: Arc<Mutex<HashMap<LayerId, Attach>>>,
}

impl Attaching {
    /// The running attach of `id`, else `attach` started on its own task
    /// (it sends on its sender once the index is verified). The entry goes
    /// away when the attach ends, so the next call after a failure starts
    /// a new one.
    pub fn start<F>(&self, id: &LayerId, attach: impl FnOnce(oneshot::Sender<()>) -> F) -> Attach
    where
        F: Future<Output = Result<PathBuf, RemoteError>> + Send + 'static,
    {
        // Held while spawning: the task's removal of its entry cannot
        // come before the entry is there.
        let mut running = self.lock();
        if let Some(attach) = running.get(id) {
            return attach.clone();
        }
        let (tx, rx) = oneshot::channel();
        let attach = attach(tx);
        let (table, key) = (self.running.clone(), id.clone());
        let task = tokio::spawn(async move {
            let attached = attach.await;
            if let Err(e) = &attached {
                warn!("attaching layer {key}: {e}; its snapshots' mounts try again");
            }
            table.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            attached
        });
        let digest = id.to_string();
        let attached = async move {
            match task.await {
                Ok(attached) => attached.map_err(Arc::new),
                Err(e) => Err(Arc::new(RemoteError::Attach {
                    digest,
                    source: DeviceError::Task(e.to_string()),
                })),
            }
        }
        .boxed()
        .shared();
        let outcome = attached.clone();
        let verified = async move {
            match rx.await {
                Ok(()) => Ok(()),
                // The attach ended before the index was verified.
                Err(_) => outcome.await.map(drop),
            }
        }
        .boxed()
        .shared();
        let attach = Attach { verified, attached };
        running.insert(id.clone(), attach.clone());
        attach
    }

    /// The running attach of `id`, if any.
    pub fn running(&self, id: &LayerId) -> Option<Attach> {
        self.lock().get(id).cloned()
    }

    /// Waits for every attach running now (each bounded by [`ATTACH_WAIT`]).
    pub async fn settle(&self) {
        let running: Vec<Attach> = self.lock().values().cloned().collect();
        for attach in running {
            let _ = tokio::time::timeout(ATTACH_WAIT, attach.attached).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LayerId, Attach>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}
