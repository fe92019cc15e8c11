//! Snapshot metadata in redb, an embedded transactional store: every change
//! is one ACID transaction, so a crash leaves either the old or the new
//! state, never a torn record. Records are JSON for readability with
//! `redb`-agnostic tools and easy evolution (unknown fields are rejected,
//! missing optional ones default).

use std::collections::HashMap;
use std::path::Path;
use std::time::SystemTime;

use lazybd_blockdev::oci::{self, LayerId, OciError};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::SnapshotError;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_ID: &str = "next_id";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// What is persisted about a lazily attached layer: enough to attach it
/// again after a restart, without the labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteLayer {
    /// The image reference the layer was pulled for (its repository serves
    /// the blob).
    pub image_ref: String,
    pub digest: String,
    pub blob_size: u64,
    pub index_offset: u64,
    pub index_length: u64,
    pub image_size: u64,
    /// The source layer's diff_id (recorded in startup traces, so they can
    /// serve as `lazybd convert --profile`); absent in records written
    /// before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_diff_id: Option<String>,
    /// The layer's anchor (`sha256:` + the sha256 of its index) from the
    /// image's manifest: every attach, after a restart too, checks the
    /// layer's index against it. `None`: an unanchored (version 1) layer,
    /// or a record of a release that did not keep it (see
    /// [`Record::remote_layer`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<String>,
}

impl RemoteLayer {
    /// The layer's identity on the node ([`LayerId`]).
    pub fn id(&self) -> Result<LayerId, OciError> {
        LayerId::of(&self.digest, self.anchor.as_deref())
    }

    /// The layer's diff_id in its image's config: its anchor, or (version
    /// 1) its blob digest.
    pub fn diff_id(&self) -> &str {
        self.anchor.as_deref().unwrap_or(&self.digest)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Names the snapshot's directory; never reused.
    pub id: u64,
    pub kind: Kind,
    pub parent: Option<String>,
    #[serde(default)]
    pub labels: HashMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// Measured at commit (committed snapshots do not change).
    #[serde(default)]
    pub usage: Option<Usage>,
    /// Set for committed snapshots that are lazily attached lazybd layers.
    #[serde(default)]
    pub remote: Option<RemoteLayer>,
}

impl Record {
    /// The lazily attached layer of this snapshot. Records of releases that
    /// did not keep the anchor get it from the Prepare's labels they kept
    /// (containerd passes the layer's `lazybd.index-digest` annotation), so
    /// they are checked against it as well.
    pub fn remote_layer(&self) -> Option<RemoteLayer> {
        let mut layer = self.remote.clone()?;
        if layer.anchor.is_none() {
            layer.anchor = self.labels.get(oci::ANN_INDEX_DIGEST).cloned();
        }
        Some(layer)
    }
}

pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(SNAPSHOTS)?;
        txn.open_table(COUNTERS)?;
        txn.commit()?;
        Ok(Store { db })
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>, SnapshotError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let value = table.get(key)?;
        Ok(match value {
            Some(v) => Some(serde_json::from_slice(v.value())?),
            None => None,
        })
    }

    pub fn require(&self, key: &str) -> Result<Record, SnapshotError> {
        self.get(key)?
            .ok_or_else(|| SnapshotError::NotFound(key.to_owned()))
    }

    pub fn all(&self) -> Result<Vec<(String, Record)>, SnapshotError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            out.push((k.value().to_owned(), serde_json::from_slice(v.value())?));
        }
        Ok(out)
    }

    /// Adds `key` with a fresh id; `make` builds the record from the id.
    pub fn create(
        &self,
        key: &str,
        make: impl FnOnce(u64) -> Record,
    ) -> Result<Record, SnapshotError> {
        let txn = self.db.begin_write()?;
        let record = {
            let mut table = txn.open_table(SNAPSHOTS)?;
            if table.get(key)?.is_some() {
                return Err(SnapshotError::AlreadyExists(key.to_owned()));
            }
            let mut counters = txn.open_table(COUNTERS)?;
            let id = counters.get(NEXT_ID)?.map(|v| v.value()).unwrap_or(1);
            counters.insert(NEXT_ID, id + 1)?;
            let record = make(id);
            table.insert(key, serde_json::to_vec(&record)?.as_slice())?;
            record
        };
        txn.commit()?;
        Ok(record)
    }

    /// Replaces the record of an existing `key`.
    pub fn update(&self, key: &str, record: &Record) -> Result<(), SnapshotError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(SNAPSHOTS)?;
            if table.get(key)?.is_none() {
                return Err(SnapshotError::NotFound(key.to_owned()));
            }
            table.insert(key, serde_json::to_vec(record)?.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Renames `key` to `name` with `record`, atomically.
    pub fn rename(&self, key: &str, name: &str, record: &Record) -> Result<(), SnapshotError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(SNAPSHOTS)?;
            if table.get(name)?.is_some() {
                return Err(SnapshotError::AlreadyExists(name.to_owned()));
            }
            if table.remove(key)?.is_none() {
                return Err(SnapshotError::NotFound(key.to_owned()));
            }
            table.insert(name, serde_json::to_vec(record)?.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Removes `key` unless another snapshot names it as parent.
    pub fn remove(&self, key: &str) -> Result<Record, SnapshotError> {
        let txn = self.db.begin_write()?;
        let record = {
            let mut table = txn.open_table(SNAPSHOTS)?;
            for entry in table.iter()? {
                let (k, v) = entry?;
                let r: Record = serde_json::from_slice(v.value())?;
                if r.parent.as_deref() == Some(key) {
                    return Err(SnapshotError::FailedPrecondition(format!(
                        "cannot remove snapshot {key:?}: {:?} is its child",
                        k.value()
                    )));
                }
            }
            let removed = table.remove(key)?;
            match removed {
                Some(v) => serde_json::from_slice(v.value())?,
                None => return Err(SnapshotError::NotFound(key.to_owned())),
            }
        };
        txn.commit()?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, kind: Kind, parent: Option<&str>) -> Record {
        Record {
            id,
            kind,
            parent: parent.map(str::to_owned),
            labels: HashMap::new(),
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
            usage: None,
            remote: None,
        }
    }

    /// A record as earlier versions wrote it still reads, and is written
    /// back byte for byte: metadata of a running node must keep opening.
    #[test]
    fn records_keep_their_encoding() {
        let old = concat!(
            r#"{"id":7,"kind":"Committed","parent":"chain-0","labels":{"a":"b"},"#,
            r#""created":{"secs_since_epoch":1700000000,"nanos_since_epoch":5},"#,
            r#""updated":{"secs_since_epoch":1700000001,"nanos_since_epoch":0},"#,
            r#""usage":{"size":1048576,"inodes":0},"#,
            r#""remote":{"image_ref":"registry.test/app:v1","digest":"sha256:ab","#,
            r#""blob_size":8192,"index_offset":4096,"index_length":112,"image_size":1048576}}"#
        );
        let r: Record = serde_json::from_str(old).unwrap();
        assert_eq!(r.kind, Kind::Committed);
        assert_eq!(
            r.remote,
            Some(RemoteLayer {
                image_ref: "registry.test/app:v1".into(),
                digest: "sha256:ab".into(),
                blob_size: 8192,
                index_offset: 4096,
                index_length: 112,
                image_size: 1 << 20,
                anchor: None,
                source_diff_id: None,
            })
        );
        assert_eq!(serde_json::to_string(&r).unwrap(), old);
        // Its anchor, if any, comes from the labels it kept.
        let anchor = oci::digest_of(b"index");
        let mut labelled = r.clone();
        labelled
            .labels
            .insert(oci::ANN_INDEX_DIGEST.into(), anchor.clone());
        assert_eq!(
            labelled.remote_layer().unwrap().anchor,
            Some(anchor.clone())
        );
        assert_eq!(r.remote_layer().unwrap().anchor, None);
        // New records keep it, and read back.
        let mut new = r.clone();
        new.remote.as_mut().unwrap().anchor = Some(anchor.clone());
        let json = serde_json::to_string(&new).unwrap();
        assert!(json.contains(&format!(r#""anchor":"{anchor}""#)), "{json}");
        let back: Record = serde_json::from_str(&json).unwrap();
        assert_eq!(back.remote, new.remote);
        // Ordinary snapshots had neither usage nor remote.
        let r: Record = serde_json::from_str(concat!(
            r#"{"id":1,"kind":"Active","parent":null,"#,
            r#""created":{"secs_since_epoch":0,"nanos_since_epoch":0},"#,
            r#""updated":{"secs_since_epoch":0,"nanos_since_epoch":0}}"#
        ))
        .unwrap();
        assert!(r.remote.is_none() && r.usage.is_none() && r.labels.is_empty());
    }

    #[test]
    fn create_rename_remove_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        {
            let s = Store::open(&path).unwrap();
            let a = s.create("a", |id| record(id, Kind::Active, None)).unwrap();
            assert_eq!(a.id, 1);
            assert!(matches!(
                s.create("a", |id| record(id, Kind::Active, None)),
                Err(SnapshotError::AlreadyExists(_))
            ));
            let mut c = a.clone();
            c.kind = Kind::Committed;
            s.rename("a", "base", &c).unwrap();
            let b = s
                .create("b", |id| record(id, Kind::Active, Some("base")))
                .unwrap();
            assert_eq!(b.id, 2);
            assert!(matches!(
                s.remove("base"),
                Err(SnapshotError::FailedPrecondition(_))
            ));
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.require("base").unwrap().kind, Kind::Committed);
        assert!(matches!(s.require("a"), Err(SnapshotError::NotFound(_))));
        s.remove("b").unwrap();
        s.remove("base").unwrap();
        assert!(s.all().unwrap().is_empty());
        // Ids are never reused.
        assert_eq!(
            s.create("c", |id| record(id, Kind::View, None)).unwrap().id,
            3
        );
    }
}
