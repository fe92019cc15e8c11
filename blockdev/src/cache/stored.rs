//! The stored copy of a cache (`stored` and `stored.map`): the zstd frames of
//! the chunks a node fetched, at their offsets in the blob, so its P2P peer
//! server sends them on unchanged. Same crash rule as the image file (see
//! the parent module): bytes first, synced, then the bit.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::bitmap::{BitmapFile, BootId, Left, MapHeader};
use super::{io_err, CacheError, STORED_FILE, STORED_MAP_FILE};
use crate::format::{ChunkEntry, ChunkKind, Index};

pub struct StoredCopy {
    file: File,
    map: Mutex<BitmapFile>,
    present: Vec<AtomicU64>,
    count: AtomicU64,
    unpersisted: Mutex<Vec<u64>>,
}

impl StoredCopy {
    /// Opens or creates the copy for the index `header` names. Left open
    /// by a process of this boot (`boot`), it is trusted like the image
    /// (see the parent module); left open before a reboot, every frame its
    /// bitmap claims is decoded and checked again, and the bad ones are
    /// dropped.
    pub fn open(
        dir: &Path,
        index: &Index,
        header: &MapHeader,
        boot: BootId,
    ) -> Result<Self, CacheError> {
        let (map_path, path) = (dir.join(STORED_MAP_FILE), dir.join(STORED_FILE));
        let open = |p: &Path, what| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .map_err(io_err(p, what))
        };
        let map_file = open(&map_path, "open stored bitmap")?;
        let file = open(&path, "open stored copy")?;
        let (mut map, loaded) = BitmapFile::load_or_create(map_file, header, boot)
            .map_err(io_err(&map_path, "load stored bitmap"))?;
        if loaded.is_none() {
            file.set_len(0).map_err(io_err(&path, "truncate"))?;
        }
        file.set_len(index.data_len)
            .map_err(io_err(&path, "size stored copy"))?;
        let recovered = match loaded {
            None | Some(Left::Clean) => false,
            Some(Left::Open(b)) => b != boot || boot == [0; 16],
            Some(Left::Verifying) => true,
        };
        let mut present: Vec<AtomicU64> = (0..index.chunk_count().div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        let mut count = 0;
        for (i, entry) in index.chunks.iter().enumerate() {
            let i = i as u64;
            if entry.kind != ChunkKind::Zstd || !map.is_set(i) {
                continue;
            }
            if recovered && !frame_matches(&file, index, entry, i) {
                map.clear(i);
                continue;
            }
            *present[(i / 64) as usize].get_mut() |= 1 << (i % 64);
            count += 1;
        }
        map.mark_open(false)
            .map_err(io_err(&map_path, "mark stored bitmap open"))?;
        Ok(StoredCopy {
            file,
            map: Mutex::new(map),
            present,
            count: AtomicU64::new(count),
            unpersisted: Mutex::new(Vec::new()),
        })
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn has(&self, chunk: u64) -> bool {
        self.present
            .get((chunk / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (chunk % 64)) != 0)
    }

    /// Keeps the verified stored bytes of a zstd chunk (other kinds need no
    /// copy).
    pub fn store(
        &self,
        dir: &Path,
        index: &Index,
        chunk: u64,
        stored: &[u8],
    ) -> Result<(), CacheError> {
        let Some(entry) = index.chunks.get(chunk as usize) else {
            return Ok(());
        };
        if entry.kind != ChunkKind::Zstd
            || stored.len() != entry.stored_len as usize
            || self.has(chunk)
        {
            return Ok(());
        }
        self.file
            .write_all_at(stored, entry.offset)
            .map_err(io_err(&dir.join(STORED_FILE), "write frame"))?;
        self.unpersisted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(chunk);
        let prev =
            self.present[(chunk / 64) as usize].fetch_or(1 << (chunk % 64), Ordering::AcqRel);
        if prev & (1 << (chunk % 64)) == 0 {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    pub fn read(
        &self,
        dir: &Path,
        entry: &ChunkEntry,
        chunk: u64,
    ) -> Result<Option<Vec<u8>>, CacheError> {
        if !self.has(chunk) {
            return Ok(None);
        }
        let mut buf = vec![0u8; entry.stored_len as usize];
        self.file
            .read_exact_at(&mut buf, entry.offset)
            .map_err(io_err(&dir.join(STORED_FILE), "read frame"))?;
        Ok(Some(buf))
    }

    /// Data sync, then the bits of the frames written before it.
    pub fn persist(&self, dir: &Path) -> Result<(), CacheError> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let chunks =
            std::mem::take(&mut *self.unpersisted.lock().unwrap_or_else(|e| e.into_inner()));
        if chunks.is_empty() {
            return Ok(());
        }
        let (path, map_path) = (dir.join(STORED_FILE), dir.join(STORED_MAP_FILE));
        let result = (|| {
            self.file
                .sync_data()
                .map_err(io_err(&path, "fdatasync stored copy"))?;
            for &c in &chunks {
                map.set(c);
            }
            map.write_bits()
                .map_err(io_err(&map_path, "write stored bitmap"))
        })();
        if result.is_err() {
            self.unpersisted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(chunks);
        }
        result
    }

    pub fn mark_clean(&self, dir: &Path) -> Result<(), CacheError> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .mark_clean()
            .map_err(io_err(
                &dir.join(STORED_MAP_FILE),
                "mark stored bitmap clean",
            ))
    }
}

/// Whether the file holds chunk `i`'s frame as the index describes it (it
/// decodes to the chunk's sha256). A read error counts as a mismatch.
fn frame_matches(file: &File, index: &Index, entry: &ChunkEntry, i: u64) -> bool {
    let mut buf = vec![0u8; entry.stored_len as usize];
    file.read_exact_at(&mut buf, entry.offset).is_ok() && index.decode_chunk(i, &buf).is_ok()
}
