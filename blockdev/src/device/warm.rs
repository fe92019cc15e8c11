//! Warming: once a lazy layer's startup stream has brought the narrow part
//! of its prefetch area (what its container reads first, recorded with one
//! page of readahead), that part is read into the page cache of the
//! layer's EROFS files and device, in a few large reads, ahead of the
//! container.
//!
//! Why: a layer streamed only its narrow part reads ahead one page, so
//! each page a container reads or faults in is a trip through the loop
//! device's worker, a FUSE thread and back: three wake-ups, some 50 µs on
//! an otherwise idle machine, thousands per start (docs/benchmarks.md).
//! Read from the files the narrow part belongs to, the same pages come in
//! requests of up to 1 MiB, and the container's reads find them cached.
//! Nothing is fetched for it: only chunks already present are read, so the
//! bytes on the link stay what the workload reads.
//!
//! The files are found by walking the layer's EROFS metadata in its cache
//! ([`crate::erofs`]; the narrow part holds all of it), and opened by file
//! handle, that is by inode number, never by path: a hostile image's names
//! and symlinks play no part, and the walk is bounded. Metadata (inodes,
//! directories) is read through the loop device itself, whose page cache
//! EROFS reads it from.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::fuse::MAX_READAHEAD;
use super::table::lock;
use super::LayerManager;
use crate::erofs::{self, FileData};
use crate::format::{ReadAt, BLOCK_SIZE};
use crate::layer::LazyLayer;
use crate::oci::LayerId;
use crate::stats::Stats;

/// The most inodes a warming walk visits: far above a real layer (the
/// large image's biggest has some 20 000), and a bound on what a hostile
/// one costs.
const MAX_INODES: usize = 1 << 20;
/// The most metadata a walk keeps in memory at once (blocks read twice
/// beyond it).
const MAX_CACHED_BLOCKS: usize = (64 << 20) / BLOCK_SIZE as usize;
/// The most one readahead(2) call asks for: the largest read FUSE sends
/// (the FUSE session's [`MAX_READAHEAD`]). The kernel cuts a longer call to
/// the device's largest request (1.25 MiB for a loop device), and such a
/// call through a lazy device left nothing in the page cache here (a
/// whole 1.9 MiB file, in the `convert_record` warming test).
const MAX_READ_AHEAD: u64 = MAX_READAHEAD as u64;
/// EROFS's file handle type: the inode number in two 32-bit halves, high
/// first, then a generation, which EROFS ignores (`erofs_encode_fh`).
const FILEID_INO64_GEN: i32 = 0x81;

/// A running warming job: cancelled, it stops before its next file.
pub(super) struct WarmJob {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl WarmJob {
    /// Stops the job; waiting for it (`task`) then ends within one read
    /// call, with every file it opened closed.
    pub(super) fn stop(self) -> tokio::task::JoinHandle<()> {
        self.cancel.cancel();
        self.task
    }
}

/// What one layer's warming read ahead.
#[derive(Debug, Default, PartialEq, Eq)]
struct Warmed {
    files: u64,
    /// readahead(2) calls, of files and the device.
    reads: u64,
    file_bytes: u64,
    metadata_bytes: u64,
}

impl LayerManager {
    /// Warms the page cache of a lazy layer just attached once its startup
    /// stream has brought the narrow part (in the background; detach stops
    /// it). Layers without a prefetch area have nothing to warm.
    pub(super) fn warm(
        &self,
        id: &LayerId,
        layer: Arc<LazyLayer>,
        mountpoint: PathBuf,
        dev: PathBuf,
    ) {
        if !self.config.warm_startup || layer.index().prefetch_narrow_len == 0 {
            return;
        }
        let cancel = CancellationToken::new();
        let (stop, stats) = (cancel.clone(), self.shared.stats.clone());
        let task = tokio::spawn(async move {
            let streamed = tokio::select! {
                () = stop.cancelled() => return,
                s = layer.fetcher().narrow_streamed() => s,
            };
            if !streamed {
                return;
            }
            let digest = layer.digest().to_owned();
            let started = Instant::now();
            let warmed =
                tokio::task::spawn_blocking(move || warm_layer(&layer, &mountpoint, &dev, &stop))
                    .await;
            match warmed {
                Ok(Ok(w)) => {
                    count(&stats, &w);
                    info!(
                        "layer {digest}: page cache warmed with its startup part: {} files, \
                         {} KiB of file data, {} KiB of metadata, {} reads, in {:?}",
                        w.files,
                        w.file_bytes >> 10,
                        w.metadata_bytes >> 10,
                        w.reads,
                        started.elapsed()
                    );
                }
                Ok(Err(e)) => info!("layer {digest}: not warmed: {e}"),
                Err(e) => info!("layer {digest}: warming task: {e}"),
            }
        });
        lock(&self.jobs.warms).insert(id.clone(), WarmJob { cancel, task });
    }
}

fn count(stats: &Stats, w: &Warmed) {
    let c = &stats.attach;
    c.warmed_layers.fetch_add(1, Relaxed);
    c.warmed_bytes
        .fetch_add(w.file_bytes + w.metadata_bytes, Relaxed);
}

/// Reads the layer's present narrow part ahead: file data through the
/// files, in the order the container read it, and metadata through the
/// device.
fn warm_layer(
    layer: &LazyLayer,
    mountpoint: &Path,
    dev: &Path,
    cancel: &CancellationToken,
) -> io::Result<Warmed> {
    let index = layer.index();
    let present = Present::new(layer);
    let files = erofs::files(&present, index.image_size, MAX_INODES)
        .map_err(|e| io::Error::other(format!("walking its EROFS metadata: {e}")))?;
    drop(present);
    let (narrow, _) = index.prefetch_parts();
    let ranges = narrow
        .into_iter()
        .filter(|&c| layer.is_present(c))
        .map(|c| index.image_range(c));
    let (runs, metadata) = file_runs(&files, ranges);

    let mut warmed = Warmed::default();
    let device = File::open(dev)?;
    for r in &metadata {
        if cancel.is_cancelled() {
            return Ok(warmed);
        }
        warmed.reads += read_ahead(&device, r.start, r.end - r.start)?;
        warmed.metadata_bytes += r.end - r.start;
    }
    let root = File::open(mountpoint)?;
    let mut open: Option<(u64, File)> = None;
    for run in &runs {
        if cancel.is_cancelled() {
            break;
        }
        let file = match &open {
            Some((nid, f)) if *nid == run.nid => f,
            _ => {
                let f = match open_by_nid(&root, run.nid) {
                    Ok(f) => f,
                    Err(e) => {
                        debug!("inode {}: not opened by handle: {e}", run.nid);
                        continue;
                    }
                };
                warmed.files += 1;
                &open.insert((run.nid, f)).1
            }
        };
        warmed.reads += read_ahead(file, run.offset, run.len)?;
        warmed.file_bytes += run.len;
    }
    Ok(warmed)
}

/// A run of one file's bytes to read ahead.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    nid: u64,
    offset: u64,
    len: u64,
}

/// Maps image `ranges` (in the order to read them) to runs of the files
/// whose data they lie in: files in the order they are first read, each
/// file's runs in offset order, adjacent ones joined. A container reads a
/// file's pages out of order (faults in a library, seeks in an archive),
/// and each run is one request through the loop device and FUSE: joined,
/// a file comes in a few large reads instead of one per recorded piece.
/// What lies in no file's data is metadata, returned apart (sorted,
/// joined).
fn file_runs(
    files: &[FileData],
    ranges: impl Iterator<Item = Range<u64>>,
) -> (Vec<Run>, Vec<Range<u64>>) {
    let mut first_read: Vec<u64> = Vec::new();
    let mut pieces: HashMap<u64, Vec<Range<u64>>> = HashMap::new();
    let mut metadata: Vec<Range<u64>> = Vec::new();
    for mut r in ranges {
        while r.start < r.end {
            let i = files.partition_point(|f| f.data.start <= r.start);
            let file = i.checked_sub(1).map(|i| &files[i]);
            match file.filter(|f| r.start < f.data.end) {
                Some(f) => {
                    let end = r.end.min(f.data.end);
                    pieces
                        .entry(f.nid)
                        .or_insert_with(|| {
                            first_read.push(f.nid);
                            Vec::new()
                        })
                        .push(r.start - f.data.start..end - f.data.start);
                    r.start = end;
                }
                None => {
                    // Up to the next file's data, or the range's end.
                    let end = files.get(i).map_or(r.end, |f| f.data.start.min(r.end));
                    metadata.push(r.start..end);
                    r.start = end;
                }
            }
        }
    }
    let runs = first_read
        .into_iter()
        .flat_map(|nid| {
            let file = pieces.remove(&nid).unwrap_or_default();
            joined(file).into_iter().map(move |r| Run {
                nid,
                offset: r.start,
                len: r.end - r.start,
            })
        })
        .collect();
    (runs, joined(metadata))
}

/// `ranges` sorted, the overlapping or adjacent ones joined.
fn joined(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Opens a file of the EROFS mount `root` by its inode number.
fn open_by_nid(root: &File, nid: u64) -> io::Result<File> {
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        id: [u32; 3],
    }
    let mut handle = Handle {
        bytes: 12,
        kind: FILEID_INO64_GEN,
        id: [(nid >> 32) as u32, nid as u32, 0],
    };
    // SAFETY: `handle` is a `struct file_handle` with 12 bytes of
    // `f_handle`, as `bytes` says; the kernel reads no further.
    let fd = unsafe {
        libc::open_by_handle_at(
            root.as_raw_fd(),
            (&raw mut handle).cast(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the call just returned, owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Starts reading `[offset, +len)` of `file` into its page cache, in calls
/// of at most [`MAX_READ_AHEAD`]; returns once the reads are sent, with how
/// many calls it took.
fn read_ahead(file: &File, offset: u64, len: u64) -> io::Result<u64> {
    let end = offset.saturating_add(len);
    let mut calls = 0;
    for start in (offset..end).step_by(MAX_READ_AHEAD as usize) {
        let piece = MAX_READ_AHEAD.min(end - start);
        let (Ok(start), Ok(piece)) = (i64::try_from(start), usize::try_from(piece)) else {
            return Err(io::Error::other("range past what readahead(2) takes"));
        };
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::readahead(file.as_raw_fd(), start, piece) } < 0 {
            return Err(io::Error::last_os_error());
        }
        calls += 1;
    }
    Ok(calls)
}

/// The layer's image as far as its cache holds it, by whole blocks,
/// remembered (up to [`MAX_CACHED_BLOCKS`]) since a walk reads each
/// metadata block many times.
struct Present<'a> {
    layer: &'a LazyLayer,
    blocks: RefCell<HashMap<u64, Box<[u8]>>>,
}

impl<'a> Present<'a> {
    fn new(layer: &'a LazyLayer) -> Self {
        Present {
            layer,
            blocks: RefCell::default(),
        }
    }

    fn with_block<T>(&self, block: u64, f: impl FnOnce(&[u8]) -> T) -> io::Result<T> {
        let mut blocks = self.blocks.borrow_mut();
        if !blocks.contains_key(&block) {
            let start = block * BLOCK_SIZE;
            let len = BLOCK_SIZE.min(self.layer.image_size().saturating_sub(start));
            let mut data = vec![0u8; len as usize].into_boxed_slice();
            self.layer.read_if_present(start, &mut data)?;
            if blocks.len() >= MAX_CACHED_BLOCKS {
                blocks.clear();
            }
            blocks.insert(block, data);
        }
        Ok(f(&blocks[&block]))
    }
}

impl ReadAt for Present<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let (block, within) = (at / BLOCK_SIZE, (at % BLOCK_SIZE) as usize);
            let n = self.with_block(block, |b| {
                let n = b.len().saturating_sub(within).min(buf.len() - done);
                buf[done..done + n].copy_from_slice(&b[within..within + n]);
                n
            })?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(nid: u64, data: Range<u64>) -> FileData {
        FileData { nid, data }
    }

    #[test]
    fn ranges_become_runs_of_their_files_in_the_order_first_read() {
        let files = [
            file(7, 4096..20480),
            file(9, 20480..32768),
            file(3, 65536..73728),
        ];
        let ranges = [
            65536..69632, // file 3, first block
            12288..16384, // file 7, fourth block
            0..4096,      // metadata
            8192..12288,  // file 7, third block: joined with the fourth
            16384..24576, // file 7's last block and file 9's first
            32768..40960, // metadata between 9 and 3
            28672..32768, // file 9's last block, not adjacent to its first
        ];
        let (runs, metadata) = file_runs(&files, ranges.into_iter());
        assert_eq!(
            runs,
            vec![
                Run {
                    nid: 3,
                    offset: 0,
                    len: 4096
                },
                Run {
                    nid: 7,
                    offset: 4096,
                    len: 12288
                },
                Run {
                    nid: 9,
                    offset: 0,
                    len: 4096
                },
                Run {
                    nid: 9,
                    offset: 8192,
                    len: 4096
                },
            ]
        );
        assert_eq!(metadata, vec![0..4096, 32768..40960]);
    }

    #[test]
    fn a_range_past_every_file_is_metadata() {
        let (runs, metadata) = file_runs(&[file(1, 0..4096)], std::iter::once(8192..12288));
        assert!(runs.is_empty());
        assert_eq!(metadata, vec![8192..12288]);
        let (runs, metadata) = file_runs(&[], [0..4096, 4096..8192].into_iter());
        assert!(runs.is_empty());
        assert_eq!(metadata, vec![0..8192]);
    }
}
