//! Which ENI is attached to which container, on disk, under a per-ENI lock.
//!
//! Layout under the state dir: `enis/<mac hex>.json` (one record per ENI
//! this plugin has moved or is moving), `locks/<mac hex>.lock` (flock
//! files; never deleted, since deleting a lock file others may hold races)
//! and `available/` (the registry of offered ENIs, written by the hot-plug
//! agent and only read here, see [`crate::offer`]). A record is the only
//! thing that lets DEL and GC touch an ENI.
//! Records are replaced atomically (write, fsync, rename, fsync dir), so a
//! crash leaves either the old or the new record, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::env::Env;
use crate::error::{CniError, Result};
use crate::log;
use crate::mac::Mac;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// ADD started: the ENI may be in the host, in the pod, or half way.
    Adding,
    /// ADD finished.
    Attached,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub mac: Mac,
    /// The network (config `name`) that attached it; GC only looks at its own.
    pub network: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    pub netns: Option<PathBuf>,
    pub phase: Phase,
    /// Its name in the host before ADD moved it, for logs and humans.
    pub host_name: String,
}

impl Record {
    pub fn is_for(&self, env: &Env) -> bool {
        self.container_id == env.container_id && self.ifname == env.ifname
    }
}

pub struct Store {
    enis: PathBuf,
    locks: PathBuf,
}

/// Proof that the caller holds the ENI's lock; required to change its record.
pub struct EniLock {
    mac: Mac,
    _flock: Flock<File>,
}

const LOCK_POLL: Duration = Duration::from_millis(20);

impl Store {
    pub fn open(dir: &Path) -> Result<Store> {
        let store = Store {
            enis: dir.join("enis"),
            locks: dir.join("locks"),
        };
        let registry = dir.join(crate::offer::REGISTRY_DIR);
        for d in [&store.enis, &store.locks, &registry] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(|e| CniError::io(format!("create state dir {}", d.display()), e))?;
        }
        Ok(store)
    }

    /// Takes the ENI's lock, waiting at most `timeout` (then: try again later).
    pub async fn lock(&self, mac: Mac, timeout: Duration) -> Result<EniLock> {
        let path = self.locks.join(format!("{}.lock", mac.hex()));
        let deadline = Instant::now() + timeout;
        let mut said = false;
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| CniError::io(format!("open lock {}", path.display()), e))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(flock) => return Ok(EniLock { mac, _flock: flock }),
                Err((_, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    if !said {
                        log(format!(
                            "waiting up to {timeout:?} for the lock of ENI {mac}"
                        ));
                        said = true;
                    }
                    tokio::time::sleep(LOCK_POLL).await;
                }
                Err((_, Errno::EWOULDBLOCK)) => {
                    return Err(CniError::TryAgainLater(format!(
                        "ENI {mac} is locked by another eni invocation for more than {timeout:?}"
                    )))
                }
                Err((_, e)) => {
                    return Err(CniError::io(format!("flock {}", path.display()), e.into()))
                }
            }
        }
    }

    fn record_path(&self, mac: Mac) -> PathBuf {
        self.enis.join(format!("{}.json", mac.hex()))
    }

    pub fn load(&self, lock: &EniLock) -> Result<Option<Record>> {
        read_record(&self.record_path(lock.mac))
    }

    pub fn save(&self, lock: &EniLock, rec: &Record) -> Result<()> {
        assert_eq!(rec.mac, lock.mac, "record saved under another ENI's lock");
        let path = self.record_path(lock.mac);
        let tmp = path.with_extension("json.tmp");
        let io = |what: &str, e| CniError::io(format!("{what} {}", tmp.display()), e);
        let mut f = File::create(&tmp).map_err(|e| io("create", e))?;
        let bytes = serde_json::to_vec_pretty(rec).expect("record serializes");
        f.write_all(&bytes).map_err(|e| io("write", e))?;
        f.sync_all().map_err(|e| io("fsync", e))?;
        fs::rename(&tmp, &path).map_err(|e| io("rename", e))?;
        self.sync_dir()
    }

    pub fn remove(&self, lock: &EniLock) -> Result<()> {
        let path = self.record_path(lock.mac);
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CniError::io(format!("remove {}", path.display()), e)),
        }
    }

    fn sync_dir(&self) -> Result<()> {
        File::open(&self.enis)
            .and_then(|d| d.sync_all())
            .map_err(|e| CniError::io(format!("fsync {}", self.enis.display()), e))
    }

    /// Every record, read without locks: a snapshot to pick candidates from.
    /// Act on one only after taking its lock and loading it again.
    pub fn records(&self) -> Result<Vec<Record>> {
        let rd = fs::read_dir(&self.enis)
            .map_err(|e| CniError::io(format!("list {}", self.enis.display()), e))?;
        let mut out = Vec::new();
        for entry in rd {
            let path = entry
                .map_err(|e| CniError::io(format!("list {}", self.enis.display()), e))?
                .path();
            if path.extension().is_some_and(|x| x == "json") {
                out.extend(read_record(&path)?);
            }
        }
        Ok(out)
    }

    /// The record of one ENI, read without its lock: a hint only.
    pub fn peek(&self, mac: Mac) -> Result<Option<Record>> {
        read_record(&self.record_path(mac))
    }

    /// The record of an attachment, by (container, ifname). An unreadable
    /// record of some other ENI is logged and skipped, so it cannot hold up
    /// every pod's DEL on the node (GC still reports it).
    pub fn find(&self, env: &Env) -> Result<Option<Record>> {
        let rd = fs::read_dir(&self.enis)
            .map_err(|e| CniError::io(format!("list {}", self.enis.display()), e))?;
        for entry in rd {
            let path = entry
                .map_err(|e| CniError::io(format!("list {}", self.enis.display()), e))?
                .path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match read_record(&path) {
                Ok(Some(r)) if r.is_for(env) => return Ok(Some(r)),
                Ok(_) => {}
                Err(e) => log(format!("skipping {}: {e}", path.display())),
            }
        }
        Ok(None)
    }
}

fn read_record(path: &Path) -> Result<Option<Record>> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| CniError::Decode {
                what: format!("state record {}", path.display()),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CniError::io(format!("read {}", path.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(mac: Mac, cid: &str) -> Record {
        Record {
            mac,
            network: "n".into(),
            container_id: cid.into(),
            ifname: "eth0".into(),
            netns: Some("/run/netns/x".into()),
            phase: Phase::Adding,
            host_name: "eth1".into(),
        }
    }

    #[tokio::test]
    async fn save_load_remove_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mac: Mac = "02:00:00:00:00:07".parse().unwrap();
        let lock = store.lock(mac, Duration::from_secs(1)).await.unwrap();
        assert_eq!(store.load(&lock).unwrap(), None);
        store.save(&lock, &rec(mac, "c1")).unwrap();
        assert_eq!(store.load(&lock).unwrap().unwrap().container_id, "c1");
        assert_eq!(store.records().unwrap().len(), 1);
        store.remove(&lock).unwrap();
        store.remove(&lock).unwrap();
        assert!(store.records().unwrap().is_empty());
    }

    #[tokio::test]
    async fn second_lock_times_out_as_try_again_later() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mac: Mac = "02:00:00:00:00:08".parse().unwrap();
        let _held = store.lock(mac, Duration::from_secs(1)).await.unwrap();
        let e = store
            .lock(mac, Duration::from_millis(50))
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), 11);
        let other: Mac = "02:00:00:00:00:09".parse().unwrap();
        store.lock(other, Duration::from_millis(50)).await.unwrap();
    }

    #[tokio::test]
    async fn corrupt_record_is_a_decode_error_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mac: Mac = "02:00:00:00:00:0a".parse().unwrap();
        let path = dir.path().join("enis").join(format!("{}.json", mac.hex()));
        fs::write(&path, b"{oops").unwrap();
        let lock = store.lock(mac, Duration::from_secs(1)).await.unwrap();
        assert_eq!(store.load(&lock).unwrap_err().code(), 6);
        assert!(path.exists());
    }
}
