//! The lazybd layer blob: an EROFS image cut into chunks, each compressed on
//! its own and named by its sha256, with an index at the end.
//!
//! ```text
//! +----------------------------+-------------------+----------------------+--------+
//! | startup chunks (prefetch)  | the other chunks  | index (header+table) | footer |
//! +----------------------------+-------------------+----------------------+--------+
//! 0                            prefetch_len        index_offset           blob_len-64
//! ```
//!
//! Version 2 chunks are variable-length runs of the image (4 KiB-aligned, at
//! most `chunk_size`), cut where files begin and end, and stored in any
//! order: the chunks a container reads at start come first, in the order it
//! reads them, so a node fetches them as one streamed range. Version 3 adds
//! where, in that prefetch area, what a container reads with little
//! readahead ends (its *narrow part*): a node on a slow link streams only
//! that. Versions 1 (fixed chunks in image order) and 2 are still read.
//!
//! docs/format.md is the specification; this module is its only implementation.
//! Everything read from a blob is untrusted: every parse checks bounds before it
//! allocates, and every chunk is checked against its sha256 before it is used.
//! The sha256 of the index bytes is the layer's *content anchor*: it is in the
//! footer, on the layer descriptor and (as the layer's diff_id) in the image
//! config, so a node checks the index it fetched against what the image names.

mod footer;
mod index;
mod layout;
#[cfg(test)]
mod tests;
mod write;

use std::ops::Range;

use sha2::{Digest, Sha256};
use thiserror::Error;

pub use footer::Footer;
pub use index::Index;
pub use layout::{Layout, LayoutError, Shape};
pub use write::{write_blob, write_blob_v1, ReadAt, WrittenBlob};

/// The version this build writes.
pub const FORMAT_VERSION: u32 = 3;
/// Fixed-size chunks in image order, 48-byte entries.
pub const FORMAT_V1: u32 = 1;
/// Version 3 without the narrow part's length: its whole prefetch area is
/// one part.
pub const FORMAT_V2: u32 = 2;
/// The most a node's lazy devices may read ahead, in KiB, for the narrow
/// part of a version 3 prefetch area to hold all it reads at start
/// ([`Index::prefetch_narrow_len`]). One page: the least a device reads,
/// so the narrow part is what the workload itself reads. Measured with
/// the python, node and large images at 100 Mbit/s: 16 KiB moved 1.0-1.8x
/// the workload's compressed read volume, 8 KiB 0.9-1.6x, 4 KiB 0.9-1.4x,
/// and each smaller one started all three sooner (docs/benchmarks.md).
pub const NARROW_READ_AHEAD_KB: u32 = 4;
pub const FOOTER_MAGIC: [u8; 8] = *b"LAZYBDFT";
pub const INDEX_MAGIC: [u8; 8] = *b"LAZYBDIX";
pub const FOOTER_LEN: u64 = 64;
pub const HEADER_LEN: u64 = 64;

/// Chunks are made of whole filesystem blocks (the last one may be short).
pub const BLOCK_SIZE: u64 = 4096;
pub const MIN_CHUNK_SIZE: u32 = 4096;
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// The largest chunk the converter makes by default. Small chunks fetch little
/// more than a container reads (docs/benchmarks.md); compressing them at
/// [`ZSTD_LEVEL`] keeps the blob within a few percent of 1 MiB chunks.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 << 10;
/// 2^20 chunks keeps the table under 56 MiB.
pub const MAX_CHUNKS: u64 = 1 << 20;

/// zstd level for chunks: level 9 buys back most of what small chunks lose
/// against 1 MiB ones (about 10%), at a conversion cost paid once; decoding is
/// as fast as at any level.
pub const ZSTD_LEVEL: i32 = 9;

pub type Sha256Digest = [u8; 32];

/// Length of one chunk table entry in `version`.
pub const fn entry_len(version: u32) -> u64 {
    if version == FORMAT_V1 {
        48
    } else {
        56
    }
}

/// The longest index `version` allows.
pub const fn max_index_len(version: u32) -> u64 {
    HEADER_LEN + entry_len(version) * MAX_CHUNKS
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("blob too small for a lazybd footer: {len} bytes, need at least {FOOTER_LEN}")]
    TooSmall { len: u64 },
    #[error("bad {what} magic: {found:02x?} (not a lazybd layer blob)")]
    BadMagic { what: &'static str, found: [u8; 8] },
    #[error("unsupported lazybd format version {0} (this build reads versions {FORMAT_V1} to {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    #[error("footer says version {footer}, index says {index}")]
    VersionMismatch { footer: u32, index: u32 },
    #[error("reserved field {0} is not zero (written by a newer or corrupt writer)")]
    ReservedNotZero(&'static str),
    #[error("index length {0} is invalid for its version (header plus whole entries, at most {MAX_CHUNKS} of them)")]
    BadIndexLength(u64),
    #[error("index [{offset}, +{length}) plus footer does not end at the blob end {blob_len}")]
    IndexOutOfBounds {
        offset: u64,
        length: u64,
        blob_len: u64,
    },
    #[error("index digest mismatch: footer says {expected}, index hashes to {actual}")]
    IndexDigestMismatch { expected: String, actual: String },
    #[error("chunk size {0} is not a power of two in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")]
    BadChunkSize(u32),
    #[error("unknown compression id {0}")]
    UnknownCompression(u32),
    #[error("image size {image_size} with chunk size {chunk_size} needs {expected} chunks, table has {found}")]
    ChunkCountMismatch {
        image_size: u64,
        chunk_size: u32,
        expected: u64,
        found: u64,
    },
    #[error("image of {0} chunks exceeds the limit of {MAX_CHUNKS} chunks")]
    TooManyChunks(u64),
    #[error(
        "header data length {data_len} does not match the footer's index offset {index_offset}"
    )]
    DataLengthMismatch { data_len: u64, index_offset: u64 },
    #[error("chunk {index}: unknown kind {kind}")]
    UnknownChunkKind { index: u64, kind: u8 },
    #[error("chunk {index}: stored length {stored_len} is invalid for kind {kind:?} (uncompressed {uncompressed_len})")]
    BadStoredLength {
        index: u64,
        kind: ChunkKind,
        stored_len: u32,
        uncompressed_len: u32,
    },
    #[error("chunk {index}: image length {image_len} is not a whole number of blocks up to the chunk size {chunk_size}, or runs past the image")]
    BadImageLength {
        index: u64,
        image_len: u32,
        chunk_size: u32,
    },
    #[error("chunks cover {covered} bytes of an image of {image_size}")]
    ImageNotCovered { covered: u64, image_size: u64 },
    #[error("chunk {index}: bytes [{offset}, +{len}) overlap or precede the previous chunk ending at {prev_end}")]
    ChunkOutOfOrder {
        index: u64,
        offset: u64,
        len: u32,
        prev_end: u64,
    },
    #[error("chunk {index}: bytes [{offset}, +{len}) run past the data area ending at {data_end}")]
    ChunkPastData {
        index: u64,
        offset: u64,
        len: u32,
        data_end: u64,
    },
    #[error(
        "prefetch length {prefetch_len} is past the data area ({data_len}) or splits chunk {index}"
    )]
    BadPrefetchLength {
        prefetch_len: u64,
        data_len: u64,
        index: u64,
    },
    #[error("the prefetch area's narrow part ({narrow_len} bytes) is longer than the area ({prefetch_len}) or splits chunk {index}")]
    BadNarrowLength {
        narrow_len: u64,
        prefetch_len: u64,
        index: u64,
    },
    #[error("chunk {index} out of range: image has {count} chunks")]
    NoSuchChunk { index: u64, count: u64 },
    #[error("chunk {index}: got {got} stored bytes, index says {expected}")]
    StoredLengthMismatch {
        index: u64,
        got: usize,
        expected: u32,
    },
    #[error("chunk {index}: decompression failed: {reason}")]
    Decompress { index: u64, reason: String },
    #[error("chunk {index}: decompressed to {got} bytes, expected {expected}")]
    DecompressedLength {
        index: u64,
        got: usize,
        expected: u32,
    },
    #[error("chunk {index}: sha256 mismatch: index says {expected}, data hashes to {actual}")]
    ChunkDigestMismatch {
        index: u64,
        expected: String,
        actual: String,
    },
}

/// Compression declared for the blob as a whole; chunks that do not shrink are stored raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zstd = 1,
}

impl Compression {
    fn from_id(id: u32) -> Result<Self, FormatError> {
        match id {
            1 => Ok(Compression::Zstd),
            other => Err(FormatError::UnknownCompression(other)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
        }
    }
}

/// How one chunk is stored in the data area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// Uncompressed bytes (compression did not help).
    Raw = 0,
    /// One zstd frame.
    Zstd = 1,
    /// All zero bytes; nothing stored, nothing to fetch.
    Zero = 2,
}

impl ChunkKind {
    fn from_id(index: u64, kind: u8) -> Result<Self, FormatError> {
        match kind {
            0 => Ok(ChunkKind::Raw),
            1 => Ok(ChunkKind::Zstd),
            2 => Ok(ChunkKind::Zero),
            kind => Err(FormatError::UnknownChunkKind { index, kind }),
        }
    }
}

/// One row of the chunk table; rows are in image order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// Offset of the stored bytes in the blob.
    pub offset: u64,
    pub stored_len: u32,
    /// Uncompressed length: how many image bytes the chunk covers.
    pub image_len: u32,
    pub kind: ChunkKind,
    /// sha256 of the uncompressed chunk.
    pub digest: Sha256Digest,
}

impl ChunkEntry {
    pub fn stored_range(&self) -> Range<u64> {
        self.offset..self.offset + u64::from(self.stored_len)
    }
}

pub fn sha256(data: &[u8]) -> Sha256Digest {
    Sha256::digest(data).into()
}

fn check_chunk_size(chunk_size: u32) -> Result<(), FormatError> {
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(FormatError::BadChunkSize(chunk_size));
    }
    Ok(())
}

fn zstd_bound(len: usize) -> usize {
    zstd::zstd_safe::compress_bound(len)
}

/// Little-endian field reader over a slice whose length the caller has checked.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().expect("split_at gives N bytes")
    }
    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

struct FieldsMut<'a>(&'a mut [u8]);

impl FieldsMut<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let (head, rest) = std::mem::take(&mut self.0).split_at_mut(bytes.len());
        head.copy_from_slice(bytes);
        self.0 = rest;
    }
}
