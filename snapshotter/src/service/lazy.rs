//! The service's side of the remote path: committed snapshots that are
//! lazily attached lazybd layers. Prepare makes them (after the trust rules
//! of `crate::remote::trust`) and starts their attach, which the mounts of
//! snapshots on top wait for; Remove detaches their layer once no snapshot
//! uses it, opening the store attaches them again (checking the same rules
//! and the anchor again), and a container's Prepare on top of them replays
//! the image's trace.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use super::LazySnapshotter;
use crate::error::SnapshotError;
use crate::remote::trust::parent_chain_id;
use crate::remote::{LazyLayers, RemoteError};
use crate::store::{Kind, Record, RemoteLayer, Usage};

/// How long a container snapshot's Prepare waits for its image's trace.
const TRACE_LOOKUP_AT_PREPARE: Duration = Duration::from_secs(2);

impl<L: LazyLayers> LazySnapshotter<L> {
    /// The remote path of Prepare, on a checked parent: `Ok(true)` when
    /// `target` now exists as a committed lazily attached snapshot,
    /// `Ok(false)` when the labels do not ask for a lazybd layer. An error
    /// means containerd should unpack the layer itself, unless it is a
    /// refusal of the trust rules. Only the index is verified before the
    /// commit; the rest of the attach goes on behind it
    /// (`crate::remote::attaching`), and a failure there shows at the mounts.
    pub(super) async fn prepare_lazy(
        &self,
        target: &str,
        parent: Option<String>,
        labels: &HashMap<String, String>,
    ) -> Result<bool, SnapshotError> {
        let Some(layer) = self.remote.resolve(labels).await? else {
            return Ok(false);
        };
        let parent_chain = self.chain_id(parent.as_deref())?;
        self.remote.admit(&layer, target, parent_chain.as_deref())?;
        // The image's other layers' indexes are fetched meanwhile, for
        // their Prepares; given up (they fetch their own) if this layer is
        // verified first.
        let verified = self.remote.attach_verified(&layer);
        let ahead = self.remote.fetch_indexes_ahead(labels, &layer);
        tokio::pin!(verified, ahead);
        let looked_ahead = tokio::select! {
            // The look ahead first: on a quiet link its manifest answers
            // before the index is verified.
            biased;
            () = &mut ahead => None,
            r = &mut verified => Some(r),
        };
        match looked_ahead {
            Some(r) => r?,
            None => verified.await?,
        }
        let now = SystemTime::now();
        let made = self.store.create(target, |id| Record {
            id,
            kind: Kind::Committed,
            parent,
            labels: labels.clone(),
            created: now,
            updated: now,
            usage: Some(Usage {
                size: layer.image_size as i64,
                inodes: 0,
            }),
            remote: Some(layer.clone()),
        });
        if let Err(e) = made {
            self.detach_if_unused(&layer).await;
            return Err(e);
        }
        info!(
            "layer {} of {} committed as {target:?}, attaching lazily",
            layer.digest, layer.image_ref
        );
        Ok(true)
    }

    /// The EROFS mount of the lazy layer of committed snapshot `name`
    /// (record `r`): at once when attached, else after its attach. A layer
    /// not being attached (its attach failed, or failed at the restart)
    /// is attached now, if the trust rules of now admit it.
    pub(super) async fn lazy_mountpoint(
        &self,
        name: &str,
        r: &Record,
        layer: &RemoteLayer,
    ) -> Result<PathBuf, SnapshotError> {
        if let Some(m) = layer.id().ok().and_then(|id| self.remote.mountpoint(&id)) {
            return Ok(m);
        }
        let parent = self.chain_id(r.parent.as_deref())?;
        self.remote.admit(layer, name, parent.as_deref())?;
        self.remote.attached(layer).await.map_err(|e| {
            SnapshotError::Unavailable(format!(
                "lazy layer {} of snapshot {name:?} is not attached: {e}",
                layer.digest
            ))
        })
    }

    /// A container's rootfs on lazy layers: its layers are attached, so the
    /// image's trace can be replayed now, before the task starts. The super
    /// node is asked for a bounded time only (the Prepare waits);
    /// `task-start` asks again if it did not answer.
    pub(super) async fn replay_trace_for(&self, key: &str, parent: &str) {
        let Ok(lowers) = self.lowers(Some(parent)).await else {
            return;
        };
        let chain = self.remote.lazy_chain(lowers.iter().map(PathBuf::as_path));
        let replay = self.remote.replay_trace(&chain, true);
        if tokio::time::timeout(TRACE_LOOKUP_AT_PREPARE, replay)
            .await
            .is_err()
        {
            warn!(
                "{key}: no trace lookup answer within {TRACE_LOOKUP_AT_PREPARE:?}; \
                 the task start tries again"
            );
        }
    }

    /// Detaches the layer once no snapshot is on it (snapshots of other
    /// layers under the same blob digest do not count).
    pub(super) async fn detach_if_unused(&self, layer: &RemoteLayer) {
        let Ok(id) = layer.id() else { return };
        let used = match self.store.all() {
            Ok(all) => all.iter().any(|(_, r)| {
                r.remote_layer()
                    .is_some_and(|l| l.id().is_ok_and(|other| other == id))
            }),
            Err(e) => {
                warn!("not detaching {}: {e}", layer.digest);
                return;
            }
        };
        if !used {
            if let Err(e) = self.remote.detach(&id).await {
                warn!("detaching layer {}: {e}", layer.digest);
            }
        }
    }

    /// Where the cache of a lazy layer lives (`None`: layers take no disk
    /// here, or the record names no valid identity).
    pub(super) fn lazy_cache_dir(&self, layer: &RemoteLayer) -> Option<std::path::PathBuf> {
        let id = layer.id().ok()?;
        self.remote.manager().cache_dir(&id)
    }

    /// The chain ID of the committed snapshot `key` (`None` for none).
    fn chain_id(&self, key: Option<&str>) -> Result<Option<String>, SnapshotError> {
        let Some(key) = key else { return Ok(None) };
        let r = self.store.require(key)?;
        Ok(Some(parent_chain_id(key, r.remote.is_some()).to_owned()))
    }

    /// Attaches the layer of every lazily attached snapshot, each once,
    /// after checking the trust rules again (the operator may have changed
    /// them; records of older releases were not checked) and, in the
    /// attach, the layer's index against its anchor.
    pub async fn reattach(&self) -> Result<(), SnapshotError> {
        let mut seen = HashSet::new();
        for (name, r) in self.store.all()? {
            let Some(layer) = r.remote_layer() else {
                continue;
            };
            let checked = self
                .chain_id(r.parent.as_deref())
                .map_err(|e| e.to_string())
                .and_then(|parent| {
                    self.remote
                        .admit(&layer, &name, parent.as_deref())
                        .map_err(|e: RemoteError| e.to_string())
                });
            if let Err(e) = checked {
                // Its snapshots' mounts fail with Unavailable.
                warn!("not re-attaching the layer of snapshot {name:?}: {e}");
                continue;
            }
            let Ok(id) = layer.id() else { continue };
            if !seen.insert(id) {
                continue;
            }
            match self.remote.attach(&layer).await {
                Ok(_) => info!("re-attached layer {} of snapshot {name:?}", layer.digest),
                // Mounts of its snapshots fail with Unavailable until a later
                // attach works; the daemon itself keeps serving.
                Err(e) => warn!(
                    "re-attaching layer {} of snapshot {name:?}: {e}",
                    layer.digest
                ),
            }
        }
        Ok(())
    }
}
