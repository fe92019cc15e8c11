//! The Snapshots service: containerd's overlayfs snapshotter semantics for
//! ordinary layers, plus the remote path for lazybd layers.
//!
//! On disk, under the root: `metadata.redb` (the [`Store`]), one directory
//! per snapshot `snapshots/<id>/{fs,work}`, and `lazy/` (the blockdev
//! layer manager: caches, FUSE, EROFS mounts of remote layers).
//!
//! The Snapshots methods come first, in the order of containerd's
//! interface; the helpers of ordinary snapshots follow them, the lazily
//! attached ones are in [`lazy`], disk usage in [`disk_usage`].

mod disk_usage;
mod lazy;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::{Info, Snapshotter};
use futures_util::stream::{self, BoxStream};
use lazybd_blockdev::device::LayerManager;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::error::SnapshotError;
use crate::filter::Filter;
use crate::mounts;
use crate::remote::{LazyLayers, Remote};
use crate::store::{Kind, Record, Store, Usage};
use disk_usage::disk_usage;
use lazybd_blockdev::oci;

pub struct LazySnapshotter<L = LayerManager> {
    root: PathBuf,
    store: Store,
    remote: Remote<L>,
    /// Serializes changes: each is a store transaction plus directory work
    /// that must not interleave with another change of the same snapshots.
    changes: Mutex<()>,
}

impl<L: LazyLayers> LazySnapshotter<L> {
    /// Opens the store under `root` and attaches every remote layer that was
    /// committed before, so mounts work before the first request is served.
    pub async fn open(root: &Path, remote: Remote<L>) -> Result<Self, SnapshotError> {
        let s = Self::open_store(root, remote)?;
        s.reattach().await?;
        Ok(s)
    }

    /// Opens the store only; the caller runs [`reattach`](Self::reattach)
    /// before serving (the daemon binds its sockets and signal handlers
    /// first, so a restart is never stuck before it can be stopped).
    pub fn open_store(root: &Path, remote: Remote<L>) -> Result<Self, SnapshotError> {
        std::fs::create_dir_all(root.join("snapshots"))
            .map_err(SnapshotError::io(format!("creating {}", root.display())))?;
        let store = Store::open(&root.join("metadata.redb"))?;
        Ok(LazySnapshotter {
            root: root.to_owned(),
            store,
            remote,
            changes: Mutex::new(()),
        })
    }

    pub fn remote(&self) -> &Remote<L> {
        &self.remote
    }

    pub fn into_remote(self) -> Remote<L> {
        self.remote
    }
}

#[containerd_snapshots::tonic::async_trait]
impl<L: LazyLayers> Snapshotter for LazySnapshotter<L> {
    type Error = SnapshotError;

    async fn stat(&self, key: String) -> Result<Info, SnapshotError> {
        let r = self.store.require(&key)?;
        Ok(info(key, r))
    }

    async fn update(
        &self,
        new: Info,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<Info, SnapshotError> {
        let _g = self.changes.lock().await;
        let mut r = self.store.require(&new.name)?;
        let paths = fieldpaths.unwrap_or_default();
        if paths.is_empty() {
            r.labels = new.labels.clone();
        }
        for path in paths {
            if path == "labels" {
                r.labels = new.labels.clone();
            } else if let Some(key) = path.strip_prefix("labels.") {
                match new.labels.get(key) {
                    Some(v) => r.labels.insert(key.to_owned(), v.clone()),
                    None => r.labels.remove(key),
                };
            } else {
                return Err(SnapshotError::InvalidArgument(format!(
                    "cannot update field {path:?} of snapshot {:?}",
                    new.name
                )));
            }
        }
        r.updated = SystemTime::now();
        self.store.update(&new.name, &r)?;
        Ok(info(new.name, r))
    }

    async fn usage(&self, key: String) -> Result<containerd_snapshots::Usage, SnapshotError> {
        let r = self.store.require(&key)?;
        let u = match (r.kind, r.usage, &r.remote) {
            // What the lazy layer's cache holds, not its image size: kubelet's
            // image GC and `ctr snapshots usage` see the disk it takes.
            (Kind::Committed, recorded, Some(layer)) => match self.lazy_cache_dir(layer) {
                Some(dir) if dir.exists() => disk_usage(&dir)?,
                Some(_) => Usage::default(),
                None => recorded.unwrap_or_default(),
            },
            (Kind::Committed, Some(u), None) => u,
            (Kind::Committed, None, None) => Usage::default(),
            _ => disk_usage(&self.dir(r.id).join("fs"))?,
        };
        Ok(containerd_snapshots::Usage {
            inodes: u.inodes,
            size: u.size,
        })
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, SnapshotError> {
        let r = self.store.require(&key)?;
        let lowers = self.lowers(r.parent.as_deref()).await?;
        self.mounts_of(&r, &lowers)
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        let _g = self.changes.lock().await;
        let target = labels.get(oci::labels::TARGET);
        // containerd reads AlreadyExists as "the layer is there", stats the
        // target and skips download and unpack.
        if let Some(target) = target {
            if self.store.get(target)?.is_some() {
                return Err(SnapshotError::AlreadyExists(target.clone()));
            }
        }
        // A bad request is refused here, before the remote path costs a
        // registry round trip.
        let checked_parent = self.check_parent(&parent)?;
        self.check_unused(&key)?;
        if let Some(target) = target {
            match self
                .prepare_lazy(target, checked_parent.clone(), &labels)
                .await
            {
                Ok(true) => return Err(SnapshotError::AlreadyExists(target.clone())),
                Ok(false) => {}
                // The trust rules' verdict goes to containerd as is: an
                // unpack could not do better, and would hide the reason.
                Err(SnapshotError::Remote(e)) if e.is_refusal() => {
                    warn!("{target}: refused: {e}");
                    return Err(SnapshotError::Remote(e));
                }
                Err(reason) => {
                    warn!("{target}: not attached lazily, unpacking normally: {reason}")
                }
            }
        }
        // On lazy layers whose attach still runs behind their Prepare, this
        // waits for it (a failed one is tried again).
        let lowers = self.lowers(checked_parent.as_deref()).await?;
        let mounts = self.create_local(&key, checked_parent, labels, Kind::Active, &lowers)?;
        drop(_g);
        if !parent.is_empty() {
            self.replay_trace_for(&key, &parent).await;
        }
        Ok(mounts)
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        let _g = self.changes.lock().await;
        let parent = self.check_parent(&parent)?;
        let lowers = self.lowers(parent.as_deref()).await?;
        self.create_local(&key, parent, labels, Kind::View, &lowers)
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), SnapshotError> {
        let _g = self.changes.lock().await;
        let mut r = self.store.require(&key)?;
        if r.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        r.usage = Some(disk_usage(&self.dir(r.id).join("fs"))?);
        r.kind = Kind::Committed;
        r.labels = labels;
        // As containerd's storage: the committed snapshot is new, created
        // (and last updated) now.
        r.created = SystemTime::now();
        r.updated = r.created;
        self.store.rename(&key, &name, &r)
    }

    async fn remove(&self, key: String) -> Result<(), SnapshotError> {
        let _g = self.changes.lock().await;
        let r = self.store.remove(&key)?;
        match r.remote_layer() {
            Some(layer) => self.detach_if_unused(&layer).await,
            None => self.remove_dir(r.id),
        }
        Ok(())
    }

    type InfoStream = BoxStream<'static, Result<Info, SnapshotError>>;

    /// containerd's Walk.
    async fn list(
        &self,
        _snapshotter: String,
        filters: Vec<String>,
    ) -> Result<Self::InfoStream, SnapshotError> {
        let filter = Filter::parse(&filters)?;
        let infos: Vec<Result<Info, SnapshotError>> = self
            .store
            .all()?
            .into_iter()
            .filter(|(name, r)| filter.matches(name, r))
            .map(|(name, r)| Ok(info(name, r)))
            .collect();
        Ok(Box::pin(stream::iter(infos)))
    }

    /// containerd's Cleanup: removes the directories no record refers to.
    async fn clear(&self) -> Result<(), SnapshotError> {
        let _g = self.changes.lock().await;
        let ids: HashSet<String> = self
            .store
            .all()?
            .into_iter()
            .map(|(_, r)| r.id.to_string())
            .collect();
        let dir = self.root.join("snapshots");
        for entry in std::fs::read_dir(&dir)
            .map_err(SnapshotError::io(format!("listing {}", dir.display())))?
        {
            let entry = entry.map_err(SnapshotError::io(format!("listing {}", dir.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !ids.contains(&name) {
                info!("cleanup: removing {}", entry.path().display());
                if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                    warn!("cleanup: removing {}: {e}", entry.path().display());
                }
            }
        }
        Ok(())
    }
}

impl<L: LazyLayers> LazySnapshotter<L> {
    /// `parent` as the parent of a new snapshot: `None` for none, else it
    /// must be a committed snapshot.
    fn check_parent(&self, parent: &str) -> Result<Option<String>, SnapshotError> {
        if parent.is_empty() {
            return Ok(None);
        }
        let p = self.store.require(parent)?;
        if p.kind != Kind::Committed {
            return Err(SnapshotError::InvalidArgument(format!(
                "parent {parent:?} is not a committed snapshot"
            )));
        }
        Ok(Some(parent.to_owned()))
    }

    /// `key` must not name a snapshot yet. ([`Store::create`] checks again,
    /// atomically.)
    fn check_unused(&self, key: &str) -> Result<(), SnapshotError> {
        match self.store.get(key)? {
            Some(_) => Err(SnapshotError::AlreadyExists(key.to_owned())),
            None => Ok(()),
        }
    }

    /// A new active snapshot or view with its directories, on a checked
    /// parent whose lower directories are `lowers`.
    fn create_local(
        &self,
        key: &str,
        parent: Option<String>,
        labels: HashMap<String, String>,
        kind: Kind,
        lowers: &[PathBuf],
    ) -> Result<Vec<Mount>, SnapshotError> {
        let now = SystemTime::now();
        let record = self.store.create(key, |id| Record {
            id,
            kind,
            parent,
            labels,
            created: now,
            updated: now,
            usage: None,
            remote: None,
        })?;
        let dir = self.dir(record.id);
        let made = std::fs::create_dir_all(dir.join("fs")).and_then(|()| {
            if kind == Kind::Active {
                std::fs::create_dir_all(dir.join("work"))
            } else {
                Ok(())
            }
        });
        if let Err(e) = made {
            let _ = self.store.remove(key);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(SnapshotError::io(format!("creating {}", dir.display()))(e));
        }
        self.mounts_of(&record, lowers)
    }

    fn mounts_of(&self, r: &Record, lowers: &[PathBuf]) -> Result<Vec<Mount>, SnapshotError> {
        let dir = self.dir(r.id);
        Ok(vec![match r.kind {
            Kind::Active => mounts::active(&dir.join("fs"), &dir.join("work"), lowers),
            Kind::View => mounts::view(&dir.join("fs"), lowers),
            Kind::Committed => {
                return Err(SnapshotError::FailedPrecondition(
                    "committed snapshots have no mounts; make a view".into(),
                ))
            }
        }])
    }

    /// The lower directories of a snapshot whose parent is `parent`, top
    /// first; lazy layers' once they are attached.
    async fn lowers(&self, parent: Option<&str>) -> Result<Vec<PathBuf>, SnapshotError> {
        let mut out = Vec::new();
        let mut next = parent.map(str::to_owned);
        while let Some(key) = next {
            let r = self.store.require(&key)?;
            out.push(match r.remote_layer() {
                Some(layer) => self.lazy_mountpoint(&key, &r, &layer).await?,
                None => self.dir(r.id).join("fs"),
            });
            next = r.parent;
        }
        Ok(out)
    }

    /// The directory of an ordinary snapshot (`fs` and `work` in it).
    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn remove_dir(&self, id: u64) {
        let dir = self.dir(id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                // Cleanup retries what is left.
                warn!("removing {}: {e}", dir.display());
            }
        }
    }
}

impl<L> std::fmt::Debug for LazySnapshotter<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazySnapshotter")
            .field("root", &self.root)
            .finish()
    }
}

fn info(name: String, r: Record) -> Info {
    Info {
        kind: match r.kind {
            Kind::View => containerd_snapshots::Kind::View,
            Kind::Active => containerd_snapshots::Kind::Active,
            Kind::Committed => containerd_snapshots::Kind::Committed,
        },
        name,
        parent: r.parent.unwrap_or_default(),
        labels: r.labels,
        created_at: r.created,
        updated_at: r.updated,
    }
}
