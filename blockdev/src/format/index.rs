//! The chunk table: which image bytes each chunk covers, where its stored
//! bytes are in the blob, and its sha256.

use std::ops::Range;

use super::{
    check_chunk_size, entry_len, sha256, zstd_bound, ChunkEntry, ChunkKind, Compression, Fields,
    FieldsMut, Footer, FormatError, BLOCK_SIZE, FORMAT_V1, FORMAT_V2, HEADER_LEN, INDEX_MAGIC,
    MAX_CHUNKS,
};

/// The parsed, validated index of a layer blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    pub version: u32,
    /// Version 1: the size of every chunk but the last. Version 2: no chunk
    /// is larger.
    pub chunk_size: u32,
    pub compression: Compression,
    /// Size of the uncompressed EROFS image.
    pub image_size: u64,
    /// Length of the data area, equal to the index offset.
    pub data_len: u64,
    /// The first `prefetch_len` bytes of the blob are the chunks a container
    /// reads at start, in the order it reads them (0: no startup profile).
    pub prefetch_len: u64,
    /// The first `prefetch_narrow_len` bytes of the prefetch area are what a
    /// container reads at start while its layers read ahead at most
    /// [`NARROW_READ_AHEAD_KB`](super::NARROW_READ_AHEAD_KB); the rest of
    /// the area is what it reads besides with more readahead. Before
    /// version 3: the whole area.
    pub prefetch_narrow_len: u64,
    /// In image order.
    pub chunks: Vec<ChunkEntry>,
    /// Image offset of each chunk, and the image size at the end.
    starts: Vec<u64>,
    /// The chunks that store bytes, in blob order.
    by_offset: Vec<u32>,
}

impl Index {
    /// An index over `chunks` (in image order, covering the image).
    pub fn new(
        version: u32,
        chunk_size: u32,
        image_size: u64,
        data_len: u64,
        prefetch_len: u64,
        prefetch_narrow_len: u64,
        chunks: Vec<ChunkEntry>,
    ) -> Self {
        Index {
            version,
            chunk_size,
            compression: Compression::Zstd,
            image_size,
            data_len,
            prefetch_len,
            prefetch_narrow_len,
            starts: starts_of(&chunks),
            by_offset: blob_order_of(&chunks),
            chunks,
        }
    }

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
        if version != footer.version {
            return Err(FormatError::VersionMismatch {
                footer: footer.version,
                index: version,
            });
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
        let prefetch_len = if version == FORMAT_V1 { 0 } else { r.u64() };
        let (prefetch_narrow_len, reserved) = match version {
            FORMAT_V1 => (0, r.array::<16>() != [0u8; 16]),
            FORMAT_V2 => (prefetch_len, r.array::<8>() != [0u8; 8]),
            _ => (r.u64(), false),
        };
        if reserved {
            return Err(FormatError::ReservedNotZero("header.reserved"));
        }
        let table_count = (footer.index_length - HEADER_LEN) / entry_len(version);
        if chunk_count > MAX_CHUNKS || table_count > MAX_CHUNKS {
            return Err(FormatError::TooManyChunks(chunk_count.max(table_count)));
        }
        // Fewer chunks than this cannot cover the image, more cannot each
        // hold a whole block (version 1: exactly the fixed-size count).
        let fewest = image_size.div_ceil(u64::from(chunk_size));
        let most = if version == FORMAT_V1 {
            fewest
        } else {
            image_size.div_ceil(BLOCK_SIZE)
        };
        if fewest > MAX_CHUNKS {
            return Err(FormatError::TooManyChunks(fewest));
        }
        if chunk_count != table_count || !(fewest..=most).contains(&chunk_count) {
            return Err(FormatError::ChunkCountMismatch {
                image_size,
                chunk_size,
                expected: fewest,
                found: chunk_count.min(table_count),
            });
        }
        if data_len != footer.index_offset {
            return Err(FormatError::DataLengthMismatch {
                data_len,
                index_offset: footer.index_offset,
            });
        }

        let mut chunks = Vec::with_capacity(chunk_count as usize);
        let mut covered = 0u64;
        for index in 0..chunk_count {
            let offset = r.u64();
            let stored_len = r.u32();
            let image_len = if version == FORMAT_V1 {
                fixed_chunk_len(image_size, chunk_size, index)
            } else {
                r.u32()
            };
            let kind = ChunkKind::from_id(index, r.u8())?;
            let reserved = if version == FORMAT_V1 {
                r.array::<3>() != [0u8; 3]
            } else {
                r.array::<7>() != [0u8; 7]
            };
            if reserved {
                return Err(FormatError::ReservedNotZero("entry.reserved"));
            }
            let digest = r.array::<32>();
            let end = covered + u64::from(image_len);
            let whole_blocks = u64::from(image_len) % BLOCK_SIZE == 0 || end == image_size;
            if image_len == 0 || image_len > chunk_size || end > image_size || !whole_blocks {
                return Err(FormatError::BadImageLength {
                    index,
                    image_len,
                    chunk_size,
                });
            }
            covered = end;
            let stored_ok = match kind {
                ChunkKind::Zero => stored_len == 0,
                ChunkKind::Raw => stored_len == image_len,
                ChunkKind::Zstd => {
                    stored_len > 0 && (stored_len as usize) <= zstd_bound(image_len as usize)
                }
            };
            if !stored_ok {
                return Err(FormatError::BadStoredLength {
                    index,
                    kind,
                    stored_len,
                    uncompressed_len: image_len,
                });
            }
            // Zero chunks are checked too, so every entry's stored range lies
            // inside the data area and callers may slice with it.
            if offset
                .checked_add(u64::from(stored_len))
                .is_none_or(|end| end > data_len)
            {
                return Err(FormatError::ChunkPastData {
                    index,
                    offset,
                    len: stored_len,
                    data_end: data_len,
                });
            }
            chunks.push(ChunkEntry {
                offset,
                stored_len,
                image_len,
                kind,
                digest,
            });
        }
        if covered != image_size {
            return Err(FormatError::ImageNotCovered {
                covered,
                image_size,
            });
        }
        let by_offset = blob_order_of(&chunks);
        check_blob_order(version, &chunks, &by_offset)?;
        check_prefetch(prefetch_len, data_len, &chunks)?;
        check_narrow(prefetch_narrow_len, prefetch_len, &chunks)?;
        Ok(Index {
            version,
            chunk_size,
            compression,
            image_size,
            data_len,
            prefetch_len,
            prefetch_narrow_len,
            starts: starts_of(&chunks),
            by_offset,
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

    /// Uncompressed length of chunk `index` (0 past the end).
    pub fn chunk_len(&self, index: u64) -> u32 {
        self.chunks.get(index as usize).map_or(0, |c| c.image_len)
    }

    /// Byte range of chunk `index` in the uncompressed image.
    pub fn image_range(&self, index: u64) -> Range<u64> {
        let i = (index as usize).min(self.chunks.len());
        self.starts[i]..self.starts[i] + u64::from(self.chunk_len(index))
    }

    /// Chunks covering image bytes `[offset, offset+len)`, clamped to the image.
    pub fn chunks_for(&self, offset: u64, len: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(self.image_size);
        if offset >= end {
            return 0..0;
        }
        // starts[0] == 0 <= offset, so the first chunk is at least 0.
        let first = self.starts.partition_point(|&s| s <= offset) - 1;
        let last = self.starts.partition_point(|&s| s < end);
        first as u64..(last as u64).min(self.chunk_count())
    }

    /// The chunks whose stored bytes are exactly blob bytes `[start, end)`,
    /// in blob order; `None` unless the range is a run of whole, adjacent
    /// stored chunks (zero chunks, which store nothing, are never part of one).
    pub fn chunks_in_blob_range(&self, start: u64, end: u64) -> Option<Vec<u64>> {
        let order = &self.by_offset;
        let first = order.partition_point(|&c| self.chunks[c as usize].offset < start);
        let mut out = Vec::new();
        let mut at = start;
        for &c in &order[first..] {
            let c = u64::from(c);
            if at == end {
                break;
            }
            let r = self.chunks[c as usize].stored_range();
            if r.start != at {
                return None;
            }
            at = r.end;
            out.push(c);
        }
        (at == end && !out.is_empty()).then_some(out)
    }

    /// The chunks that store bytes, in blob order.
    pub fn blob_order(&self) -> impl Iterator<Item = u64> + '_ {
        self.by_offset.iter().map(|&c| u64::from(c))
    }

    /// The chunk stored right after chunk `c` in the blob, if any.
    pub fn next_in_blob(&self, c: u64) -> Option<u64> {
        let offset = self.chunks.get(c as usize)?.offset;
        let at = self
            .by_offset
            .partition_point(|&o| self.chunks[o as usize].offset <= offset);
        self.by_offset.get(at).map(|&n| u64::from(n))
    }

    /// The startup chunks (stored in the first `prefetch_len` bytes), in
    /// blob order: the order the profiled container first read them.
    pub fn prefetch_chunks(&self) -> Vec<u64> {
        self.blob_order()
            .take_while(|&c| self.chunks[c as usize].offset < self.prefetch_len)
            .collect()
    }

    /// Whether the prefetch area holds more than its narrow part.
    pub fn is_split(&self) -> bool {
        self.prefetch_narrow_len < self.prefetch_len
    }

    /// The startup chunks as the narrow part (what a container reads with
    /// little readahead) and the rest of the prefetch area, each in blob
    /// order.
    pub fn prefetch_parts(&self) -> (Vec<u64>, Vec<u64>) {
        self.prefetch_chunks()
            .into_iter()
            .partition(|&c| self.chunks[c as usize].offset < self.prefetch_narrow_len)
    }

    /// Total stored bytes of all chunks (what a full fetch transfers).
    pub fn stored_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.stored_len)).sum()
    }

    /// Turns the stored bytes of chunk `index` into verified uncompressed bytes.
    pub fn decode_chunk(&self, index: u64, stored: &[u8]) -> Result<Vec<u8>, FormatError> {
        let entry = *self.entry(index)?;
        let expected = entry.image_len;
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
                let data =
                    decompress(stored, expected as usize).map_err(|e| FormatError::Decompress {
                        index,
                        reason: e.to_string(),
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

    /// The index bytes as written in the blob (whose sha256 is the anchor).
    pub fn to_bytes(&self) -> Vec<u8> {
        let v1 = self.version == FORMAT_V1;
        let mut out =
            vec![0u8; (HEADER_LEN + entry_len(self.version) * self.chunk_count()) as usize];
        let mut w = FieldsMut(&mut out[..]);
        w.put(&INDEX_MAGIC);
        w.put(&self.version.to_le_bytes());
        w.put(&0u32.to_le_bytes());
        w.put(&self.chunk_size.to_le_bytes());
        w.put(&(self.compression as u32).to_le_bytes());
        w.put(&self.image_size.to_le_bytes());
        w.put(&self.chunk_count().to_le_bytes());
        w.put(&self.data_len.to_le_bytes());
        match self.version {
            FORMAT_V1 => w.put(&[0u8; 16]),
            FORMAT_V2 => {
                w.put(&self.prefetch_len.to_le_bytes());
                w.put(&[0u8; 8]);
            }
            _ => {
                w.put(&self.prefetch_len.to_le_bytes());
                w.put(&self.prefetch_narrow_len.to_le_bytes());
            }
        }
        for c in &self.chunks {
            w.put(&c.offset.to_le_bytes());
            w.put(&c.stored_len.to_le_bytes());
            if v1 {
                w.put(&[c.kind as u8, 0, 0, 0]);
            } else {
                w.put(&c.image_len.to_le_bytes());
                w.put(&[c.kind as u8, 0, 0, 0, 0, 0, 0, 0]);
            }
            w.put(&c.digest);
        }
        out
    }
}

fn starts_of(chunks: &[ChunkEntry]) -> Vec<u64> {
    let mut starts = Vec::with_capacity(chunks.len() + 1);
    let mut at = 0u64;
    starts.push(0);
    for c in chunks {
        at += u64::from(c.image_len);
        starts.push(at);
    }
    starts
}

fn fixed_chunk_len(image_size: u64, chunk_size: u32, index: u64) -> u32 {
    let start = index.saturating_mul(u64::from(chunk_size));
    image_size.saturating_sub(start).min(u64::from(chunk_size)) as u32
}

fn blob_order_of(chunks: &[ChunkEntry]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..chunks.len() as u32)
        .filter(|&i| chunks[i as usize].stored_len > 0)
        .collect();
    order.sort_by_key(|&i| chunks[i as usize].offset);
    order
}

/// Stored ranges never overlap. Version 1 also keeps them in image order
/// (zero chunks included); version 2 stores chunks in any order.
fn check_blob_order(
    version: u32,
    chunks: &[ChunkEntry],
    by_offset: &[u32],
) -> Result<(), FormatError> {
    let order: Vec<usize> = if version == FORMAT_V1 {
        (0..chunks.len()).collect()
    } else {
        by_offset.iter().map(|&i| i as usize).collect()
    };
    let mut prev_end = 0u64;
    for i in order {
        let c = &chunks[i];
        if c.offset < prev_end {
            return Err(FormatError::ChunkOutOfOrder {
                index: i as u64,
                offset: c.offset,
                len: c.stored_len,
                prev_end,
            });
        }
        prev_end = c.stored_range().end;
    }
    Ok(())
}

/// The prefetch area is a prefix of the data area made of whole chunks.
fn check_prefetch(
    prefetch_len: u64,
    data_len: u64,
    chunks: &[ChunkEntry],
) -> Result<(), FormatError> {
    whole_chunks_within(prefetch_len, data_len, chunks).map_err(|index| {
        FormatError::BadPrefetchLength {
            prefetch_len,
            data_len,
            index,
        }
    })
}

/// The narrow part is a prefix of the prefetch area made of whole chunks.
fn check_narrow(
    narrow_len: u64,
    prefetch_len: u64,
    chunks: &[ChunkEntry],
) -> Result<(), FormatError> {
    whole_chunks_within(narrow_len, prefetch_len, chunks).map_err(|index| {
        FormatError::BadNarrowLength {
            narrow_len,
            prefetch_len,
            index,
        }
    })
}

/// Whether the first `len` blob bytes are at most `limit` and end between
/// chunks; else the chunk they split (0 if none).
fn whole_chunks_within(len: u64, limit: u64, chunks: &[ChunkEntry]) -> Result<(), u64> {
    let splits = splitting(len, chunks);
    if len > limit || splits.is_some() {
        return Err(splits.unwrap_or(0));
    }
    Ok(())
}

/// The chunk whose stored bytes `at` falls inside of, if any.
fn splitting(at: u64, chunks: &[ChunkEntry]) -> Option<u64> {
    chunks
        .iter()
        .position(|c| c.offset < at && c.stored_range().end > at)
        .map(|i| i as u64)
}

/// One zstd frame, into at most `capacity` bytes, with this thread's
/// decompression context. Startup chunks are a few KiB each, and creating a
/// context per chunk (`zstd::bulk::decompress`) cost more than decoding it:
/// a profile of a cold start put `ZSTD_createDCtx` above the decoding itself.
/// A context keeps no state between frames that could change a result: each
/// call decodes one whole frame from the start.
fn decompress(frame: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    thread_local! {
        static CONTEXT: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    CONTEXT.with(|cell| {
        let mut slot = cell.borrow_mut();
        let context = match slot.as_mut() {
            Some(c) => c,
            None => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        context.decompress(frame, capacity)
    })
}
