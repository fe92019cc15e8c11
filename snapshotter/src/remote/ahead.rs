//! Index fetches ahead of their layer's Prepare.
//!
//! containerd prepares an image's layers one after another, each once the
//! one below is committed. At the first layer's Prepare the image's
//! manifest (by digest, content-addressed) names them all, so their indexes
//! are fetched then, while the link is still quiet: each later Prepare finds
//! its index on disk (in the layer's cache directory, checked against its
//! anchor again when it is opened) instead of fetching it behind the
//! earlier layers' startup streams.
//!
//! Bounded, since a manifest is anyone's: one image's indexes are fetched
//! one after another, in layer order (the next Prepare's first), at most
//! [`MAX_LAYERS`] of them, and at most [`MAX_IMAGES`] images at once; past
//! that nothing is fetched ahead and each layer fetches its own.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use lazybd_blockdev::oci::LayerId;
use tokio::sync::{oneshot, Semaphore};

/// Layers of one image whose indexes are fetched ahead.
pub const MAX_LAYERS: usize = 16;
/// Images whose indexes are fetched ahead at once.
const MAX_IMAGES: usize = 2;
/// Manifests remembered as looked ahead; then forgotten all at once.
const LOOKED_AHEAD: usize = 64;

pub type Fetch = Pin<Box<dyn Future<Output = ()> + Send>>;

pub struct Ahead {
    /// The fetches not done yet, by layer identity.
    pending: Arc<Mutex<HashMap<LayerId, Shared<BoxFuture<'static, ()>>>>>,
    /// Manifest digests whose layers' fetches were started.
    looked: Mutex<HashSet<String>>,
    images: Arc<Semaphore>,
}

impl Default for Ahead {
    fn default() -> Self {
        Ahead {
            pending: Default::default(),
            looked: Default::default(),
            images: Arc::new(Semaphore::new(MAX_IMAGES)),
        }
    }
}

impl Ahead {
    /// Whether `manifest` was looked ahead already.
    pub fn looked(&self, manifest: &str) -> bool {
        lock(&self.looked).contains(manifest)
    }

    /// Runs `fetches` (by layer) one after another on a task of their own,
    /// unless as many images are being fetched ahead already; remembers
    /// `manifest` as looked ahead either way.
    pub fn start(&self, manifest: &str, fetches: Vec<(LayerId, Fetch)>) {
        {
            let mut looked = lock(&self.looked);
            if looked.len() >= LOOKED_AHEAD {
                looked.clear();
            }
            looked.insert(manifest.to_owned());
        }
        let Ok(permit) = self.images.clone().try_acquire_owned() else {
            return;
        };
        let mut pending = lock(&self.pending);
        let mut queue = Vec::new();
        for (id, fetch) in fetches.into_iter().take(MAX_LAYERS) {
            if pending.contains_key(&id) {
                continue;
            }
            let (done, waiting) = oneshot::channel::<()>();
            // Ends when the fetch does, or when the task is gone.
            pending.insert(id.clone(), waiting.map(drop).boxed().shared());
            queue.push((id, fetch, done));
        }
        let table = self.pending.clone();
        tokio::spawn(async move {
            let _permit = permit;
            for (id, fetch, done) in queue {
                fetch.await;
                lock(&table).remove(&id);
                let _ = done.send(());
            }
        });
    }

    /// Waits for every fetch pending now.
    pub async fn settle(&self) {
        let pending: Vec<_> = lock(&self.pending).values().cloned().collect();
        for fetch in pending {
            fetch.await;
        }
    }

    /// Waits for the fetch of `id`, if one is pending.
    pub async fn wait(&self, id: &LayerId) {
        let pending = lock(&self.pending).get(id).cloned();
        if let Some(fetch) = pending {
            fetch.await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
