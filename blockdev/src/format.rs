//! The lazybd layer blob: chunked, compressed, digest-verified EROFS image.
//!
//! ```text
//! +----------------+----------------+-----+----------------------+--------+
//! | chunk 0 stored | chunk 1 stored | ... | index (header+table) | footer |
//! +----------------+----------------+-----+----------------------+--------+
//! 0                                       index_offset             blob_len-64
//! ```
//!
//! docs/format.md is the specification; this module is its only implementation.
//! Everything read from a blob is untrusted: every parse checks bounds before it
//! allocates, and every chunk is checked against its sha256 before it is used.

use std::io::{self, Read, Write};
use std::ops::Range;

use sha2::{Digest, Sha256};
use thiserror::Error;

pub const FORMAT_VERSION: u32 = 1;
pub const FOOTER_MAGIC: [u8; 8] = *b"LAZYBDFT";
pub const INDEX_MAGIC: [u8; 8] = *b"LAZYBDIX";
pub const FOOTER_LEN: u64 = 64;
pub const HEADER_LEN: u64 = 64;
pub const ENTRY_LEN: u64 = 48;

pub const MIN_CHUNK_SIZE: u32 = 4096;
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// 2^20 chunks keeps the table under 48 MiB: 1 TiB images at the default chunk size.
pub const MAX_CHUNKS: u64 = 1 << 20;
pub const MAX_INDEX_LEN: u64 = HEADER_LEN + ENTRY_LEN * MAX_CHUNKS;

/// zstd level for chunks: level 3 is zstd's default and compresses filesystem
/// images at several hundred MB/s per core, so conversion stays I/O bound.
pub const ZSTD_LEVEL: i32 = 3;

pub type Sha256Digest = [u8; 32];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("blob too small for a lazybd footer: {len} bytes, need at least {FOOTER_LEN}")]
    TooSmall { len: u64 },
    #[error("bad {what} magic: {found:02x?} (not a lazybd layer blob)")]
    BadMagic { what: &'static str, found: [u8; 8] },
    #[error("unsupported lazybd format version {0} (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    #[error("reserved field {0} is not zero (written by a newer or corrupt writer)")]
    ReservedNotZero(&'static str),
    #[error("index length {0} is invalid: must be {HEADER_LEN} + n*{ENTRY_LEN} and at most {MAX_INDEX_LEN}")]
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

/// The fixed-size record at the very end of a blob; it locates the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub index_offset: u64,
    pub index_length: u64,
    pub index_digest: Sha256Digest,
}

impl Footer {
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        if (bytes.len() as u64) < FOOTER_LEN {
            return Err(FormatError::TooSmall {
                len: bytes.len() as u64,
            });
        }
        // The footer is always the last FOOTER_LEN bytes of what we were given.
        let b = &bytes[bytes.len() - FOOTER_LEN as usize..];
        let mut r = Fields(b);
        let magic = r.array::<8>();
        if magic != FOOTER_MAGIC {
            return Err(FormatError::BadMagic {
                what: "footer",
                found: magic,
            });
        }
        let version = r.u32();
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        if r.u32() != 0 {
            return Err(FormatError::ReservedNotZero("footer.reserved"));
        }
        let index_offset = r.u64();
        let index_length = r.u64();
        let index_digest = r.array::<32>();
        if !(HEADER_LEN..=MAX_INDEX_LEN).contains(&index_length)
            || (index_length - HEADER_LEN) % ENTRY_LEN != 0
        {
            return Err(FormatError::BadIndexLength(index_length));
        }
        Ok(Footer {
            index_offset,
            index_length,
            index_digest,
        })
    }

    /// Checks that index and footer exactly end the blob.
    pub fn check_blob_len(&self, blob_len: u64) -> Result<(), FormatError> {
        let end = self
            .index_offset
            .checked_add(self.index_length)
            .and_then(|e| e.checked_add(FOOTER_LEN));
        if end != Some(blob_len) {
            return Err(FormatError::IndexOutOfBounds {
                offset: self.index_offset,
                length: self.index_length,
                blob_len,
            });
        }
        Ok(())
    }

    /// Total blob length this footer describes.
    pub fn blob_len(&self) -> u64 {
        self.index_offset + self.index_length + FOOTER_LEN
    }

    pub fn to_bytes(&self) -> [u8; FOOTER_LEN as usize] {
        let mut out = [0u8; FOOTER_LEN as usize];
        let mut w = FieldsMut(&mut out[..]);
        w.put(&FOOTER_MAGIC);
        w.put(&FORMAT_VERSION.to_le_bytes());
        w.put(&0u32.to_le_bytes());
        w.put(&self.index_offset.to_le_bytes());
        w.put(&self.index_length.to_le_bytes());
        w.put(&self.index_digest);
        out
    }
}

/// One row of the chunk table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// Offset of the stored bytes in the blob.
    pub offset: u64,
    pub stored_len: u32,
    pub kind: ChunkKind,
    /// sha256 of the uncompressed chunk.
    pub digest: Sha256Digest,
}

impl ChunkEntry {
    pub fn stored_range(&self) -> Range<u64> {
        self.offset..self.offset + u64::from(self.stored_len)
    }
}

/// The parsed, validated index of a layer blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    pub chunk_size: u32,
    pub compression: Compression,
    /// Size of the uncompressed EROFS image.
    pub image_size: u64,
    /// Length of the data area, equal to the index offset.
    pub data_len: u64,
    pub chunks: Vec<ChunkEntry>,
}

impl Index {
    /// Parses and validates index bytes located by `footer`.
    pub fn parse(bytes: &[u8], footer: &Footer) -> Result<Self, FormatError> {
        if bytes.len() as u64 != footer.index_length {
            return Err(FormatError::BadIndexLength(bytes.len() as u64));
        }
        let actual = sha256(bytes);
        if actual != footer.index_digest {
            return Err(FormatError::IndexDigestMismatch {
                expected: hex::encode(footer.index_digest),
                actual: hex::encode(actual),
            });
        }
        let mut r = Fields(bytes);
        let magic = r.array::<8>();
        if magic != INDEX_MAGIC {
            return Err(FormatError::BadMagic {
                what: "index",
                found: magic,
            });
        }
        let version = r.u32();
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        if r.u32() != 0 {
            return Err(FormatError::ReservedNotZero("header.flags"));
        }
        let chunk_size = r.u32();
        check_chunk_size(chunk_size)?;
        let compression = Compression::from_id(r.u32())?;
        let image_size = r.u64();
        let chunk_count = r.u64();
        let data_len = r.u64();
        if r.array::<16>() != [0u8; 16] {
            return Err(FormatError::ReservedNotZero("header.reserved"));
        }
        let table_count = (footer.index_length - HEADER_LEN) / ENTRY_LEN;
        let expected = image_size.div_ceil(u64::from(chunk_size));
        if expected > MAX_CHUNKS {
            return Err(FormatError::TooManyChunks(expected));
        }
        if chunk_count != expected || table_count != expected {
            return Err(FormatError::ChunkCountMismatch {
                image_size,
                chunk_size,
                expected,
                found: chunk_count.min(table_count),
            });
        }
        if data_len != footer.index_offset {
            return Err(FormatError::DataLengthMismatch {
                data_len,
                index_offset: footer.index_offset,
            });
        }

        let mut chunks = Vec::with_capacity(expected as usize);
        let mut prev_end = 0u64;
        for index in 0..expected {
            let offset = r.u64();
            let stored_len = r.u32();
            let kind = ChunkKind::from_id(index, r.u8())?;
            if r.array::<3>() != [0u8; 3] {
                return Err(FormatError::ReservedNotZero("entry.reserved"));
            }
            let digest = r.array::<32>();
            let uncompressed_len = chunk_len(image_size, chunk_size, index);
            let stored_ok = match kind {
                ChunkKind::Zero => stored_len == 0,
                ChunkKind::Raw => stored_len == uncompressed_len,
                ChunkKind::Zstd => {
                    stored_len > 0 && (stored_len as usize) <= zstd_bound(uncompressed_len as usize)
                }
            };
            if !stored_ok {
                return Err(FormatError::BadStoredLength {
                    index,
                    kind,
                    stored_len,
                    uncompressed_len,
                });
            }
            // Zero chunks are checked too, so every entry's stored range lies
            // inside the data area and callers may slice with it.
            if offset < prev_end {
                return Err(FormatError::ChunkOutOfOrder {
                    index,
                    offset,
                    len: stored_len,
                    prev_end,
                });
            }
            match offset.checked_add(u64::from(stored_len)) {
                Some(end) if end <= data_len => prev_end = end,
                _ => {
                    return Err(FormatError::ChunkPastData {
                        index,
                        offset,
                        len: stored_len,
                        data_end: data_len,
                    })
                }
            }
            chunks.push(ChunkEntry {
                offset,
                stored_len,
                kind,
                digest,
            });
        }
        Ok(Index {
            chunk_size,
            compression,
            image_size,
            data_len,
            chunks,
        })
    }

    pub fn chunk_count(&self) -> u64 {
        self.chunks.len() as u64
    }

    pub fn entry(&self, index: u64) -> Result<&ChunkEntry, FormatError> {
        self.chunks
            .get(index as usize)
            .ok_or(FormatError::NoSuchChunk {
                index,
                count: self.chunk_count(),
            })
    }

    /// Uncompressed length of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: u64) -> u32 {
        chunk_len(self.image_size, self.chunk_size, index)
    }

    /// Byte range of chunk `index` in the uncompressed image.
    pub fn image_range(&self, index: u64) -> Range<u64> {
        let start = index * u64::from(self.chunk_size);
        start..start + u64::from(self.chunk_len(index))
    }

    /// Chunks covering image bytes `[offset, offset+len)`, clamped to the image.
    pub fn chunks_for(&self, offset: u64, len: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(self.image_size);
        if offset >= end {
            return 0..0;
        }
        let cs = u64::from(self.chunk_size);
        offset / cs..end.div_ceil(cs)
    }

    /// Total stored bytes of all chunks (what a full fetch transfers).
    pub fn stored_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.stored_len)).sum()
    }

    /// Turns the stored bytes of chunk `index` into verified uncompressed bytes.
    pub fn decode_chunk(&self, index: u64, stored: &[u8]) -> Result<Vec<u8>, FormatError> {
        let entry = *self.entry(index)?;
        let expected = self.chunk_len(index);
        if stored.len() != entry.stored_len as usize {
            return Err(FormatError::StoredLengthMismatch {
                index,
                got: stored.len(),
                expected: entry.stored_len,
            });
        }
        let data = match entry.kind {
            ChunkKind::Zero => vec![0u8; expected as usize],
            ChunkKind::Raw => stored.to_vec(),
            ChunkKind::Zstd => {
                // The capacity bound makes a hostile frame fail instead of growing memory.
                let data = zstd::bulk::decompress(stored, expected as usize).map_err(|e| {
                    FormatError::Decompress {
                        index,
                        reason: e.to_string(),
                    }
                })?;
                if data.len() != expected as usize {
                    return Err(FormatError::DecompressedLength {
                        index,
                        got: data.len(),
                        expected,
                    });
                }
                data
            }
        };
        let actual = sha256(&data);
        if actual != entry.digest {
            return Err(FormatError::ChunkDigestMismatch {
                index,
                expected: hex::encode(entry.digest),
                actual: hex::encode(actual),
            });
        }
        Ok(data)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; (HEADER_LEN + ENTRY_LEN * self.chunk_count()) as usize];
        let mut w = FieldsMut(&mut out[..]);
        w.put(&INDEX_MAGIC);
        w.put(&FORMAT_VERSION.to_le_bytes());
        w.put(&0u32.to_le_bytes());
        w.put(&self.chunk_size.to_le_bytes());
        w.put(&(self.compression as u32).to_le_bytes());
        w.put(&self.image_size.to_le_bytes());
        w.put(&self.chunk_count().to_le_bytes());
        w.put(&self.data_len.to_le_bytes());
        w.put(&[0u8; 16]);
        for c in &self.chunks {
            w.put(&c.offset.to_le_bytes());
            w.put(&c.stored_len.to_le_bytes());
            w.put(&[c.kind as u8, 0, 0, 0]);
            w.put(&c.digest);
        }
        out
    }
}

/// Result of writing a blob: its index, footer, total length and digest.
#[derive(Debug, Clone)]
pub struct WrittenBlob {
    pub index: Index,
    pub footer: Footer,
    pub blob_len: u64,
    /// sha256 of the whole blob (its OCI digest).
    pub blob_digest: Sha256Digest,
}

/// Writes an image as a lazybd blob: chunks, then index, then footer.
///
/// Output is a pure function of the image bytes and chunk size, so converting
/// the same layer twice gives the same blob digest.
pub fn write_blob<R: Read, W: Write>(
    mut image: R,
    out: W,
    chunk_size: u32,
) -> io::Result<WrittenBlob> {
    check_chunk_size(chunk_size).map_err(io::Error::other)?;
    let mut out = HashingWriter {
        inner: out,
        hasher: Sha256::new(),
        written: 0,
    };
    let mut compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL)?;
    let mut buf = vec![0u8; chunk_size as usize];
    let mut chunks = Vec::new();
    let mut image_size = 0u64;
    loop {
        let n = read_full(&mut image, &mut buf)?;
        if n == 0 {
            break;
        }
        if chunks.len() as u64 >= MAX_CHUNKS {
            return Err(io::Error::other(FormatError::TooManyChunks(
                chunks.len() as u64 + 1,
            )));
        }
        let data = &buf[..n];
        image_size += n as u64;
        let digest = sha256(data);
        let offset = out.written;
        let (kind, stored_len) = if data.iter().all(|&b| b == 0) {
            (ChunkKind::Zero, 0)
        } else {
            let compressed = compressor.compress(data)?;
            if compressed.len() < n {
                out.write_all(&compressed)?;
                (ChunkKind::Zstd, compressed.len())
            } else {
                out.write_all(data)?;
                (ChunkKind::Raw, n)
            }
        };
        chunks.push(ChunkEntry {
            offset,
            stored_len: stored_len as u32,
            kind,
            digest,
        });
        if n < buf.len() {
            break;
        }
    }
    let index = Index {
        chunk_size,
        compression: Compression::Zstd,
        image_size,
        data_len: out.written,
        chunks,
    };
    let index_bytes = index.to_bytes();
    let footer = Footer {
        index_offset: out.written,
        index_length: index_bytes.len() as u64,
        index_digest: sha256(&index_bytes),
    };
    out.write_all(&index_bytes)?;
    out.write_all(&footer.to_bytes())?;
    out.flush()?;
    let blob_len = out.written;
    let blob_digest = out.hasher.finalize().into();
    Ok(WrittenBlob {
        index,
        footer,
        blob_len,
        blob_digest,
    })
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

fn chunk_len(image_size: u64, chunk_size: u32, index: u64) -> u32 {
    let start = index.saturating_mul(u64::from(chunk_size));
    image_size.saturating_sub(start).min(u64::from(chunk_size)) as u32
}

fn zstd_bound(len: usize) -> usize {
    zstd::zstd_safe::compress_bound(len)
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u32 = 4096;

    fn sample_image() -> Vec<u8> {
        // compressible chunk, zero chunk, incompressible chunk, short tail
        let mut img = vec![b'a'; CS as usize];
        img.extend(vec![0u8; CS as usize]);
        let mut x = 0x1234_5678u32;
        img.extend((0..CS).map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        }));
        img.extend(b"tail".repeat(8));
        img
    }

    fn blob_of(img: &[u8]) -> (Vec<u8>, WrittenBlob) {
        let mut blob = Vec::new();
        let w = write_blob(img, &mut blob, CS).unwrap();
        (blob, w)
    }

    fn parse(blob: &[u8]) -> Result<Index, FormatError> {
        let footer = Footer::parse(blob)?;
        footer.check_blob_len(blob.len() as u64)?;
        let start = footer.index_offset as usize;
        Index::parse(&blob[start..start + footer.index_length as usize], &footer)
    }

    fn decode_all(blob: &[u8], index: &Index) -> Vec<u8> {
        let mut img = Vec::new();
        for i in 0..index.chunk_count() {
            let r = index.entry(i).unwrap().stored_range();
            img.extend(
                index
                    .decode_chunk(i, &blob[r.start as usize..r.end as usize])
                    .unwrap(),
            );
        }
        img
    }

    #[test]
    fn round_trip_uses_every_chunk_kind() {
        let img = sample_image();
        let (blob, written) = blob_of(&img);
        let index = parse(&blob).unwrap();
        assert_eq!(index, written.index);
        assert_eq!(written.blob_len, blob.len() as u64);
        assert_eq!(written.blob_digest, sha256(&blob));
        let kinds: Vec<_> = index.chunks.iter().map(|c| c.kind).collect();
        assert_eq!(
            kinds,
            [
                ChunkKind::Zstd,
                ChunkKind::Zero,
                ChunkKind::Raw,
                ChunkKind::Zstd
            ]
        );
        assert_eq!(index.image_size, img.len() as u64);
        assert_eq!(decode_all(&blob, &index), img);
    }

    #[test]
    fn empty_image_round_trips() {
        let (blob, _) = blob_of(&[]);
        let index = parse(&blob).unwrap();
        assert_eq!(index.chunk_count(), 0);
        assert_eq!(index.chunks_for(0, 100), 0..0);
    }

    #[test]
    fn writing_is_deterministic() {
        let img = sample_image();
        assert_eq!(blob_of(&img).0, blob_of(&img).0);
    }

    #[test]
    fn chunk_ranges() {
        let (blob, _) = blob_of(&sample_image());
        let index = parse(&blob).unwrap();
        assert_eq!(index.chunks_for(0, 1), 0..1);
        assert_eq!(index.chunks_for(4095, 2), 0..2);
        assert_eq!(index.chunks_for(3 * 4096, 1 << 30), 3..4);
        assert_eq!(index.chunks_for(u64::MAX - 1, 5), 0..0);
        assert_eq!(index.image_range(3), 12288..12320);
    }

    #[test]
    fn wrong_footer_magic() {
        let (mut blob, _) = blob_of(&sample_image());
        let n = blob.len();
        blob[n - 64] ^= 0xff;
        assert!(matches!(
            parse(&blob),
            Err(FormatError::BadMagic { what: "footer", .. })
        ));
    }

    #[test]
    fn wrong_version() {
        let (mut blob, _) = blob_of(&sample_image());
        let n = blob.len();
        blob[n - 56] = 9;
        assert_eq!(parse(&blob), Err(FormatError::UnsupportedVersion(9)));
    }

    #[test]
    fn truncated_blob() {
        let (blob, _) = blob_of(&sample_image());
        assert!(matches!(
            parse(&blob[..10]),
            Err(FormatError::TooSmall { len: 10 })
        ));
        // Dropping a prefix keeps a valid footer that no longer fits the blob.
        assert!(matches!(
            parse(&blob[100..]),
            Err(FormatError::IndexOutOfBounds { .. })
        ));
    }

    fn patch_footer(blob: &mut [u8], f: impl FnOnce(&mut Footer)) {
        let n = blob.len();
        let mut footer = Footer::parse(blob).unwrap();
        f(&mut footer);
        blob[n - 64..].copy_from_slice(&footer.to_bytes());
    }

    #[test]
    fn index_past_end() {
        let (mut blob, _) = blob_of(&sample_image());
        patch_footer(&mut blob, |f| f.index_offset = u64::MAX - 10);
        assert!(matches!(
            parse(&blob),
            Err(FormatError::IndexOutOfBounds { .. })
        ));
    }

    #[test]
    fn absurd_index_length_is_rejected_before_allocation() {
        let (mut blob, _) = blob_of(&sample_image());
        patch_footer(&mut blob, |f| f.index_length = u64::MAX - 63);
        assert!(matches!(parse(&blob), Err(FormatError::BadIndexLength(_))));
    }

    #[test]
    fn index_digest_mismatch() {
        let (mut blob, w) = blob_of(&sample_image());
        blob[w.footer.index_offset as usize + 20] ^= 1;
        assert!(matches!(
            parse(&blob),
            Err(FormatError::IndexDigestMismatch { .. })
        ));
    }

    /// Rewrites the index with `f` applied and a footer digest to match, so the
    /// structural checks behind the digest are what gets tested.
    fn reindex(img: &[u8], f: impl FnOnce(&mut Index)) -> Result<Index, FormatError> {
        let (blob, w) = blob_of(img);
        let mut index = w.index.clone();
        f(&mut index);
        let bytes = index.to_bytes();
        let mut out = blob[..w.footer.index_offset as usize].to_vec();
        let footer = Footer {
            index_offset: out.len() as u64,
            index_length: bytes.len() as u64,
            index_digest: sha256(&bytes),
        };
        out.extend(&bytes);
        out.extend(footer.to_bytes());
        parse(&out)
    }

    #[test]
    fn overlapping_chunks() {
        let r = reindex(&sample_image(), |i| {
            i.chunks[2].offset = i.chunks[0].offset + 1
        });
        assert!(matches!(
            r,
            Err(FormatError::ChunkOutOfOrder { index: 2, .. })
        ));
    }

    #[test]
    fn out_of_order_chunks() {
        let r = reindex(&sample_image(), |i| i.chunks[3].offset = i.chunks[0].offset);
        assert!(matches!(
            r,
            Err(FormatError::ChunkOutOfOrder { index: 3, .. })
        ));
    }

    #[test]
    fn zero_chunk_outside_data_area() {
        let r = reindex(&sample_image(), |i| i.chunks[1].offset = 5_966_351);
        assert!(matches!(
            r,
            Err(FormatError::ChunkPastData { index: 1, .. })
        ));
        let r = reindex(&sample_image(), |i| i.chunks[3].offset = u64::MAX - 2);
        assert!(matches!(
            r,
            Err(FormatError::ChunkPastData { index: 3, .. })
        ));
    }

    #[test]
    fn chunk_past_data_area() {
        let r = reindex(&sample_image(), |i| i.chunks[3].offset = i.data_len);
        assert!(matches!(
            r,
            Err(FormatError::ChunkPastData { index: 3, .. })
        ));
    }

    #[test]
    fn bad_chunk_size_and_counts() {
        let img = sample_image();
        assert!(matches!(
            reindex(&img, |i| i.chunk_size = 5000),
            Err(FormatError::BadChunkSize(5000))
        ));
        assert!(matches!(
            reindex(&img, |i| i.image_size = 1 << 50),
            Err(FormatError::TooManyChunks(_))
        ));
        assert!(matches!(
            reindex(&img, |i| i.image_size += 4096),
            Err(FormatError::ChunkCountMismatch { .. })
        ));
        assert!(matches!(
            reindex(&img, |i| i.data_len += 1),
            Err(FormatError::DataLengthMismatch { .. })
        ));
    }

    #[test]
    fn bad_stored_lengths() {
        let img = sample_image();
        assert!(matches!(
            reindex(&img, |i| i.chunks[1].stored_len = 3),
            Err(FormatError::BadStoredLength { index: 1, .. })
        ));
        assert!(matches!(
            reindex(&img, |i| i.chunks[2].stored_len -= 1),
            Err(FormatError::BadStoredLength { index: 2, .. })
        ));
        assert!(matches!(
            reindex(&img, |i| i.chunks[0].stored_len = u32::MAX),
            Err(FormatError::BadStoredLength { index: 0, .. })
        ));
    }

    #[test]
    fn corrupt_chunk_is_never_returned() {
        let img = sample_image();
        let (mut blob, w) = blob_of(&img);
        let r = w.index.chunks[0].stored_range();
        let stored = &mut blob[r.start as usize..r.end as usize];
        let last = stored.len() - 1;
        stored[last] ^= 0x55;
        let err = w
            .index
            .decode_chunk(0, &blob[r.start as usize..r.end as usize])
            .unwrap_err();
        assert!(matches!(
            err,
            FormatError::Decompress { index: 0, .. }
                | FormatError::ChunkDigestMismatch { index: 0, .. }
        ));
        // A raw chunk with a flipped bit decodes but fails its digest.
        let r = w.index.chunks[2].stored_range();
        let mut raw = blob[r.start as usize..r.end as usize].to_vec();
        raw[7] ^= 1;
        assert!(matches!(
            w.index.decode_chunk(2, &raw),
            Err(FormatError::ChunkDigestMismatch { index: 2, .. })
        ));
        assert!(matches!(
            w.index.decode_chunk(2, &raw[1..]),
            Err(FormatError::StoredLengthMismatch { .. })
        ));
        assert!(matches!(
            w.index.decode_chunk(9, &raw),
            Err(FormatError::NoSuchChunk { index: 9, .. })
        ));
    }

    #[test]
    fn zstd_bomb_is_bounded() {
        // A frame that inflates past the chunk length must fail, not allocate.
        let big = zstd::bulk::compress(&vec![7u8; 1 << 20], 3).unwrap();
        let mut index = blob_of(&sample_image()).1.index;
        index.chunks[0].stored_len = big.len() as u32;
        assert!(index.decode_chunk(0, &big).is_err());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse(&data);
        }

        #[test]
        fn round_trip_any_image(img in proptest::collection::vec(0u8..4, 0..20000)) {
            let (blob, _) = blob_of(&img);
            let index = parse(&blob).unwrap();
            proptest::prop_assert_eq!(decode_all(&blob, &index), img);
        }
    }
}
