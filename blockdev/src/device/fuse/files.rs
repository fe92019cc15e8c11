//! The directory's contents: one read-only file per attached layer, whose
//! bytes are the layer's uncompressed EROFS image, and the requests parked
//! for files that are not back yet after a resume.
//!
//! A file's inode number and generation come from its name (the layer
//! digest), not from a counter: a daemon that resumes a session finds the
//! same file under the number the kernel already knows (its loop devices
//! hold files opened by the previous daemon). Two names that collide on the
//! 64-bit number are refused by [`LayerFiles::add`]; the generation (the
//! next 64 bits) keeps the kernel from mistaking one for the other across
//! a detach.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::runtime::Handle;
use tracing::{debug, warn};

use super::abi::{self, Attr};
use super::channel::Channel;
use crate::layer::LazyLayer;

pub(super) struct LayerFile {
    pub name: OsString,
    pub layer: Arc<LazyLayer>,
    pub attr: Attr,
    pub generation: u64,
}

#[derive(Default)]
struct Files {
    by_ino: HashMap<u64, Arc<LayerFile>>,
    by_name: HashMap<OsString, u64>,
}

/// What a request's inode is.
pub(super) enum Known {
    File(Arc<LayerFile>),
    /// Kept until its resumed layer is back; answered then.
    Parked,
    Unknown,
}

/// A request for an inode that is not back yet, kept with the channel it
/// must be answered on.
pub(super) struct Parked {
    pub request: Vec<u8>,
    pub channel: Arc<Channel>,
    pub since: Instant,
}

/// The directory's contents, shared by the FUSE threads and the manager.
pub struct LayerFiles {
    files: RwLock<Files>,
    pub(super) runtime: Handle,
    created: u64,
    /// `Some` while a resumed session waits for its layers to be attached
    /// again: requests for their inodes wait here instead of failing.
    parked: Mutex<Option<HashMap<u64, Vec<Parked>>>>,
}

/// Inode number and generation of the file named `name`.
pub fn inode_of(name: &str) -> (u64, u64) {
    let h = crate::format::sha256(name.as_bytes());
    let ino = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
    let generation = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    // 0 is invalid and 1 is the root directory.
    (ino.max(2), generation)
}

impl LayerFiles {
    pub fn new(runtime: Handle) -> Arc<Self> {
        Self::build(runtime, false)
    }

    /// For a resumed session: requests for unknown inodes wait until
    /// [`end_restore`](Self::end_restore) instead of failing at once.
    pub fn restoring(runtime: Handle) -> Arc<Self> {
        Self::build(runtime, true)
    }

    fn build(runtime: Handle, restoring: bool) -> Arc<Self> {
        Arc::new(LayerFiles {
            files: RwLock::default(),
            runtime,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            parked: Mutex::new(restoring.then(HashMap::new)),
        })
    }

    /// Adds a file named `name` serving `layer`; fails if the name (or its
    /// inode number) is taken. Requests parked for it are served now.
    pub fn add(&self, name: &str, layer: Arc<LazyLayer>) -> io::Result<()> {
        let (ino, generation) = inode_of(name);
        {
            let mut files = self.files.write().unwrap_or_else(|e| e.into_inner());
            if files.by_name.contains_key(std::ffi::OsStr::new(name))
                || files.by_ino.contains_key(&ino)
            {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("layer file {name} (inode {ino:#x}) already exists"),
                ));
            }
            let size = layer.image_size();
            let attr = Attr {
                ino,
                size,
                blocks: size.div_ceil(512),
                atime: self.created,
                mtime: self.created,
                ctime: self.created,
                mode: abi::S_IFREG | 0o444,
                nlink: 1,
                blksize: 4096,
                ..Attr::default()
            };
            files.by_name.insert(name.into(), ino);
            files.by_ino.insert(
                ino,
                Arc::new(LayerFile {
                    name: name.into(),
                    layer,
                    attr,
                    generation,
                }),
            );
        }
        let waiting = self
            .parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .and_then(|p| p.remove(&ino));
        for p in waiting.into_iter().flatten() {
            debug!(
                "{name}: serving a request parked {:?} ago",
                p.since.elapsed()
            );
            super::ops::dispatch(self, &p.channel, &p.request);
        }
        Ok(())
    }

    pub fn remove(&self, name: &str) {
        let mut files = self.files.write().unwrap_or_else(|e| e.into_inner());
        if let Some(ino) = files.by_name.remove(std::ffi::OsStr::new(name)) {
            files.by_ino.remove(&ino);
        }
    }

    pub(super) fn by_ino(&self, ino: u64) -> Option<Arc<LayerFile>> {
        let files = self.files.read().unwrap_or_else(|e| e.into_inner());
        files.by_ino.get(&ino).cloned()
    }

    pub(super) fn by_name(&self, name: &[u8]) -> Option<Arc<LayerFile>> {
        let files = self.files.read().unwrap_or_else(|e| e.into_inner());
        let name = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name);
        files
            .by_name
            .get(name)
            .and_then(|ino| files.by_ino.get(ino))
            .cloned()
    }

    /// (inode, name) of every file, sorted by name.
    pub(super) fn list(&self) -> Vec<(u64, OsString)> {
        let files = self.files.read().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<_> = files
            .by_ino
            .values()
            .map(|f| (f.attr.ino, f.name.clone()))
            .collect();
        names.sort_by(|a, b| a.1.cmp(&b.1));
        names
    }

    pub(super) fn root_attr(&self) -> Attr {
        Attr {
            ino: abi::ROOT_ID,
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            mode: abi::S_IFDIR | 0o555,
            nlink: 2,
            blksize: 4096,
            ..Attr::default()
        }
    }

    /// The file of inode `ino`; while a restore runs, an unknown inode's
    /// request is kept until its file is added (and answered then).
    pub(super) fn find_or_park(&self, ino: u64, request: &[u8], channel: &Arc<Channel>) -> Known {
        if let Some(f) = self.by_ino(ino) {
            return Known::File(f);
        }
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        let Some(parked) = parked.as_mut() else {
            return Known::Unknown;
        };
        // Looked up again under the lock `add` takes after inserting: the
        // file cannot arrive between this check and the park unseen.
        if let Some(f) = self.by_ino(ino) {
            return Known::File(f);
        }
        parked.entry(ino).or_default().push(Parked {
            request: request.to_vec(),
            channel: channel.clone(),
            since: Instant::now(),
        });
        Known::Parked
    }

    /// The restore is over: what is still parked is for a layer that did
    /// not come back, and fails now (reads with EIO, the rest ENOENT).
    pub fn end_restore(&self) {
        let parked = self.parked.lock().unwrap_or_else(|e| e.into_inner()).take();
        for (ino, requests) in parked.into_iter().flatten() {
            warn!(
                "inode {ino:#x}: {} request(s) for a layer that was not attached again",
                requests.len()
            );
            for p in requests {
                super::ops::fail_parked(&p);
            }
        }
    }

    pub fn is_restoring(&self) -> bool {
        self.parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inodes_are_stable_and_never_root() {
        let name = format!("sha256-{}", "ab".repeat(32));
        assert_eq!(inode_of(&name), inode_of(&name));
        assert_ne!(
            inode_of(&name),
            inode_of(&format!("sha256-{}", "cd".repeat(32)))
        );
        assert!(inode_of(&name).0 >= 2);
    }
}
