//! Per-layer chunk cache: a sparse file holding the uncompressed image, and a
//! persisted bitmap of the chunks present in it. A node that serves its
//! layers to P2P peers also keeps the stored (zstd) bytes of the chunks it
//! fetched, in a second sparse file laid out like the blob's data area
//! (`stored`, with its own bitmap `stored.map`), so a peer sends what it was
//! sent byte for byte instead of compressing again. Raw chunks are not
//! copied there (their stored bytes are the image's) and zero chunks store
//! nothing.
//!
//! # Crash consistency
//!
//! The invariant is: **a bit set in a bitmap file means that chunk's bytes
//! are durably in the file it covers and verified**: `chunks.map` covers the
//! image file, `stored.map` the stored file. Three rules keep it:
//!
//! 1. A chunk is stored only after [`Index::decode_chunk`] verified it (its
//!    stored bytes decoded to the chunk's sha256; both files get bytes from
//!    that one verification).
//! 2. [`ChunkCache::persist`] orders its steps: `fdatasync` of the image and
//!    stored files first, then the bits of the chunks written before those
//!    syncs go into the bitmap files, then `fdatasync` of the bitmaps. A crash
//!    before the bitmap sync loses only bits, never adds a bit whose data
//!    might be missing: the chunk is fetched again.
//! 3. Bits are only ever set while a cache is open; a bitmap whose header does
//!    not name this index (digest, sizes) is thrown away with its file.
//!
//! In memory a chunk counts as present as soon as its bytes are in the image
//! file (`pwrite` returned): reads in this process go through the same page
//! cache, so serving it before it is durable is correct.
//!
//! Belt and braces against disks that lie about flushes: the header records
//! whether the cache was closed cleanly, and while it is open, the boot id of
//! the process using it. How much of a bitmap is trusted at open:
//!
//! - closed cleanly: all of it;
//! - left open by a process of **this boot** (it died, or handed over to the
//!   next daemon): all of it. Every set bit was written after its chunk's
//!   `pwrite` returned, and the page cache outlives a process, so nothing a
//!   bit claims can be missing; re-hashing would only cost time at the
//!   worst moment (a restart under running containers);
//! - left open before a reboot (or still being verified): a **complete**
//!   layer is trusted as well: its image stopped changing when its last
//!   chunk was synced, before its bits, and it was handed off to the loop
//!   device then. An incomplete one is served at once, but the chunks its
//!   bitmap claims count as missing until [`ChunkCache::verify_pending`]
//!   re-hashed them (a background task; reads that need one earlier fetch
//!   it). Their bits stay on disk, and the header says *verifying*, so a
//!   crash during the verification only makes the next open verify again.
//!
//! No open re-hashes the image: a restart serves at once, whatever the size
//! of the caches, and cannot be killed by a start timeout in a loop.
//!
//! The stored copy (P2P serving, [`stored`]) has a bitmap of its own with
//! the same header: trusted when closed cleanly or left open in this boot;
//! left open before a reboot, its frames are decoded and checked at open
//! and the bad ones dropped (only nodes that serve peers keep one). A node
//! that turns P2P serving on or off later keeps or ignores the stored copy,
//! which stays valid for its index.
//!
//! Zero chunks are never written: they are holes of the sparse file, read as
//! zeros, and count as present from the start.

mod bitmap;
mod stored;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};
use thiserror::Error;

use crate::format::{ChunkKind, Index, Sha256Digest};
use bitmap::{BitmapFile, BootId, Left, MapHeader};
use stored::StoredCopy;

pub const IMAGE_FILE: &str = "image";
pub const BITMAP_FILE: &str = "chunks.map";
pub const STORED_FILE: &str = "stored";
pub const STORED_MAP_FILE: &str = "stored.map";

#[derive(Debug, Error)]
pub enum CacheError {
    #[error("cache {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cache {0} is in use by another process")]
    Locked(PathBuf),
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

/// What opening a cache found; logged by the caller and useful in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenReport {
    /// The bitmap was missing or belonged to another index: started empty.
    pub created: bool,
    /// The previous user did not close the cache.
    pub left_open: bool,
    /// Chunks the bitmap claims that wait for [`ChunkCache::verify_pending`]
    /// (left open before a reboot, and incomplete).
    pub to_verify: u64,
    /// Chunks present (including zero chunks) after opening.
    pub present: u64,
    /// Chunks whose stored bytes are kept (0 when not kept).
    pub stored: u64,
}

/// What [`ChunkCache::verify_pending`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Chunks re-hashed.
    pub hashed: u64,
    /// Of those, chunks whose bytes did not match (dropped, fetched again).
    pub dropped: u64,
}

pub struct ChunkCache {
    dir: PathBuf,
    image: File,
    bitmap: Mutex<BitmapFile>,
    /// Exclusive lock on the bitmap file for as long as the cache is open, so
    /// two daemons never write one cache.
    _lock: Flock<File>,
    present: Vec<AtomicU64>,
    present_count: AtomicU64,
    /// Chunks written to the image file whose bits are not yet persisted.
    unpersisted: Mutex<Vec<u64>>,
    /// Chunks the bitmap claims that are not verified yet (not present).
    pending: Mutex<Vec<u64>>,
    chunk_count: u64,
    index: std::sync::Arc<Index>,
    /// The stored bytes, when this node serves its layers to peers.
    stored: Option<StoredCopy>,
}

impl ChunkCache {
    /// Opens (or creates) the cache for `index` in `dir`. `index_digest` binds
    /// the bitmap to this exact index.
    pub fn open(
        dir: &Path,
        index: std::sync::Arc<Index>,
        index_digest: Sha256Digest,
    ) -> Result<(Self, OpenReport), CacheError> {
        Self::open_with(dir, index, index_digest, false)
    }

    /// [`open`](Self::open); with `keep_stored`, also keeps the stored bytes
    /// of the chunks stored from now on ([`store_stored`](Self::store_stored)).
    pub fn open_with(
        dir: &Path,
        index: std::sync::Arc<Index>,
        index_digest: Sha256Digest,
        keep_stored: bool,
    ) -> Result<(Self, OpenReport), CacheError> {
        Self::open_in_boot(dir, index, index_digest, keep_stored, bitmap::boot_id())
    }

    /// [`open_with`](Self::open_with) as a process of the boot `boot` (tests
    /// simulate a reboot with another id).
    pub(crate) fn open_in_boot(
        dir: &Path,
        index: std::sync::Arc<Index>,
        index_digest: Sha256Digest,
        keep_stored: bool,
        boot: BootId,
    ) -> Result<(Self, OpenReport), CacheError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir, "create dir"))?;
        let map_path = dir.join(BITMAP_FILE);
        let image_path = dir.join(IMAGE_FILE);
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&map_path)
            .map_err(io_err(&map_path, "open bitmap"))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| CacheError::Locked(dir.to_owned()))?;
        let map_file = lock
            .try_clone()
            .map_err(io_err(&map_path, "clone bitmap fd"))?;
        let image = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&image_path)
            .map_err(io_err(&image_path, "open image"))?;

        let header = MapHeader::for_index(&index, index_digest);
        let (mut bitmap, left) = BitmapFile::load_or_create(map_file, &header, boot)
            .map_err(io_err(&map_path, "load bitmap"))?;
        let created = left.is_none();
        if created {
            // Start from an empty sparse file: bytes from another index must
            // never become readable as this one's.
            image.set_len(0).map_err(io_err(&image_path, "truncate"))?;
        }
        image
            .set_len(index.image_size)
            .map_err(io_err(&image_path, "size image"))?;

        let chunk_count = index.chunk_count();
        let claims = |i: u64, kind: ChunkKind| kind == ChunkKind::Zero || bitmap.is_set(i);
        let complete = (0..chunk_count)
            .zip(&index.chunks)
            .all(|(i, e)| claims(i, e.kind));
        let trusted = match left {
            None | Some(Left::Clean) => true,
            Some(Left::Open(b)) => (b == boot && boot != [0; 16]) || complete,
            Some(Left::Verifying) => complete,
        };
        let mut present: Vec<AtomicU64> = (0..chunk_count.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        let mut present_count = 0;
        let mut pending = Vec::new();
        for (i, entry) in (0..chunk_count).zip(&index.chunks) {
            if !claims(i, entry.kind) {
                continue;
            }
            if !trusted && entry.kind != ChunkKind::Zero {
                pending.push(i);
                continue;
            }
            *present[(i / 64) as usize].get_mut() |= 1 << (i % 64);
            present_count += 1;
        }
        let stored = if keep_stored {
            Some(StoredCopy::open(dir, &index, &header, boot)?)
        } else {
            None
        };
        // From here on writes may happen: a crash must be noticed. A bitmap
        // just created is durable as open, with no bits, already.
        if !created {
            bitmap
                .mark_open(!pending.is_empty())
                .map_err(io_err(&map_path, "mark bitmap open"))?;
        }
        let report = OpenReport {
            created,
            left_open: matches!(left, Some(Left::Open(_) | Left::Verifying)),
            to_verify: pending.len() as u64,
            present: present_count,
            stored: stored.as_ref().map_or(0, StoredCopy::count),
        };
        let cache = ChunkCache {
            dir: dir.to_owned(),
            image,
            bitmap: Mutex::new(bitmap),
            _lock: lock,
            present,
            present_count: AtomicU64::new(present_count),
            unpersisted: Mutex::new(Vec::new()),
            pending: Mutex::new(pending),
            chunk_count,
            index,
            stored,
        };
        Ok((cache, report))
    }

    /// Re-hashes the chunks the bitmap claimed that [`open`](Self::open) did
    /// not trust: a match becomes present, a mismatch loses its bit. Blocking
    /// (one sequential pass); meant for a background thread while the cache
    /// serves. A chunk fetched meanwhile is left alone.
    pub fn verify_pending(&self) -> Result<VerifyReport, CacheError> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let mut report = VerifyReport::default();
        if pending.is_empty() {
            return Ok(report);
        }
        let mut buf = Vec::new();
        for c in pending {
            if self.is_present(c) {
                continue;
            }
            report.hashed += 1;
            if chunk_matches(&self.image, &self.index, c, &mut buf) {
                self.mark_present(c);
            } else {
                report.dropped += 1;
                let mut bitmap = self.bitmap.lock().unwrap_or_else(|e| e.into_inner());
                // A fetch may have stored it since we read it.
                if !self.is_present(c) {
                    bitmap.clear(c);
                }
            }
        }
        let map_path = self.dir.join(BITMAP_FILE);
        self.bitmap
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finish_verify()
            .map_err(io_err(&map_path, "write verified bitmap"))?;
        Ok(report)
    }

    /// Whether chunks wait for [`verify_pending`](Self::verify_pending).
    pub fn has_pending(&self) -> bool {
        !self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn chunk_count(&self) -> u64 {
        self.chunk_count
    }

    pub fn is_present(&self, chunk: u64) -> bool {
        match self.present.get((chunk / 64) as usize) {
            Some(word) => word.load(Ordering::Acquire) & (1 << (chunk % 64)) != 0,
            None => false,
        }
    }

    pub fn present_count(&self) -> u64 {
        self.present_count.load(Ordering::Relaxed)
    }

    fn mark_present(&self, chunk: u64) {
        let prev =
            self.present[(chunk / 64) as usize].fetch_or(1 << (chunk % 64), Ordering::AcqRel);
        if prev & (1 << (chunk % 64)) == 0 {
            self.present_count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Stores verified bytes of chunk `chunk` at `offset` in the image. The
    /// chunk is readable at once; its bit becomes durable at the next
    /// [`persist`](Self::persist).
    pub fn store(&self, chunk: u64, offset: u64, data: &[u8]) -> Result<(), CacheError> {
        if self.is_present(chunk) {
            return Ok(());
        }
        let path = self.dir.join(IMAGE_FILE);
        self.image
            .write_all_at(data, offset)
            .map_err(io_err(&path, "write chunk"))?;
        self.unpersisted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(chunk);
        self.mark_present(chunk);
        Ok(())
    }

    /// Keeps the stored bytes of chunk `chunk`, verified with its image
    /// bytes (rule 1), when this cache keeps them; else does nothing.
    pub fn store_stored(&self, index: &Index, chunk: u64, stored: &[u8]) -> Result<(), CacheError> {
        match &self.stored {
            Some(s) => s.store(&self.dir, index, chunk, stored),
            None => Ok(()),
        }
    }

    /// Whether this cache keeps stored bytes.
    pub fn keeps_stored(&self) -> bool {
        self.stored.is_some()
    }

    /// The stored bytes of a present chunk as they are in the blob: kept as
    /// fetched, or for a raw chunk its image bytes; `None` when they are not
    /// here (not kept, or the chunk was cached before they were).
    pub fn read_stored(&self, index: &Index, chunk: u64) -> Result<Option<Vec<u8>>, CacheError> {
        let Some(entry) = index.chunks.get(chunk as usize) else {
            return Ok(None);
        };
        match entry.kind {
            ChunkKind::Zero => Ok(Some(Vec::new())),
            ChunkKind::Raw if self.is_present(chunk) => {
                let mut buf = vec![0u8; entry.stored_len as usize];
                self.read_at(&mut buf, index.image_range(chunk).start)?;
                Ok(Some(buf))
            }
            ChunkKind::Raw => Ok(None),
            ChunkKind::Zstd => match &self.stored {
                Some(s) => s.read(&self.dir, entry, chunk),
                None => Ok(None),
            },
        }
    }

    /// Makes the bits of every chunk stored so far durable, data first.
    pub fn persist(&self) -> Result<(), CacheError> {
        // Holding the bitmap lock for the whole sequence keeps two persists
        // from interleaving their syncs and writes.
        let mut bitmap = self.bitmap.lock().unwrap_or_else(|e| e.into_inner());
        let chunks =
            std::mem::take(&mut *self.unpersisted.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(s) = &self.stored {
            // Its own data sync, bits and bitmap sync (rule 2), before the
            // image's: either may be lost in a crash, neither lies.
            s.persist(&self.dir)?;
        }
        if chunks.is_empty() {
            return Ok(());
        }
        let image_path = self.dir.join(IMAGE_FILE);
        let map_path = self.dir.join(BITMAP_FILE);
        let result = (|| {
            self.image
                .sync_data()
                .map_err(io_err(&image_path, "fdatasync image"))?;
            for &c in &chunks {
                bitmap.set(c);
            }
            bitmap
                .write_bits()
                .map_err(io_err(&map_path, "write bitmap"))
        })();
        if result.is_err() {
            // Keep them queued: the next persist tries again.
            self.unpersisted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(chunks);
        }
        result
    }

    /// Persists everything and marks the cache clean, so the next open trusts
    /// its bitmap without re-hashing.
    pub fn close(self) -> Result<(), CacheError> {
        self.persist()?;
        if let Some(s) = &self.stored {
            s.mark_clean(&self.dir)?;
        }
        if !self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            // Claimed chunks are still unverified: the next open verifies.
            return Ok(());
        }
        let map_path = self.dir.join(BITMAP_FILE);
        self.bitmap
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .mark_clean()
            .map_err(io_err(&map_path, "mark bitmap clean"))
    }

    /// Reads image bytes at `offset`; the caller makes sure the chunks are present.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), CacheError> {
        self.image
            .read_exact_at(buf, offset)
            .map_err(io_err(&self.dir.join(IMAGE_FILE), "read"))
    }
}

/// Whether the image file holds chunk `i` as the index describes it. A read
/// error counts as a mismatch: the chunk is fetched again rather than trusted.
fn chunk_matches(image: &File, index: &Index, i: u64, buf: &mut Vec<u8>) -> bool {
    let range = index.image_range(i);
    buf.resize((range.end - range.start) as usize, 0);
    image.read_exact_at(buf, range.start).is_ok()
        && crate::format::sha256(buf) == index.chunks[i as usize].digest
}

#[cfg(test)]
mod tests;
