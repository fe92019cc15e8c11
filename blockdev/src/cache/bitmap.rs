//! The on-disk bitmap of present chunks (`chunks.map`).
//!
//! ```text
//! 0   magic "LAZYBDCM"          8
//! 8   version (1)               4
//! 12  state: 1 clean, 0 open    4
//! 16  chunk_size                4
//! 20  reserved (0)              4
//! 24  image_size                8
//! 32  chunk_count               8
//! 40  index sha256             32
//! 72  reserved (0) up to 128
//! 128 bitmap, bit i of byte i/8 = chunk i (LSB first), ceil(chunk_count/8) bytes
//! ```
//!
//! Anything that does not match the expected header exactly (another index,
//! another version, a short file) is discarded and the cache starts empty:
//! losing a cache costs refetching, trusting a wrong one would serve bad data.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::format::{Index, Sha256Digest};

const MAGIC: [u8; 8] = *b"LAZYBDCM";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 128;
const STATE_OPEN: u32 = 0;
const STATE_CLEAN: u32 = 1;

/// The identity fields of a bitmap: which index it describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapHeader {
    chunk_size: u32,
    image_size: u64,
    chunk_count: u64,
    index_digest: Sha256Digest,
}

impl MapHeader {
    pub fn for_index(index: &Index, index_digest: Sha256Digest) -> Self {
        MapHeader {
            chunk_size: index.chunk_size,
            image_size: index.image_size,
            chunk_count: index.chunk_count(),
            index_digest,
        }
    }

    fn encode(&self, state: u32) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&state.to_le_bytes());
        h[16..20].copy_from_slice(&self.chunk_size.to_le_bytes());
        h[24..32].copy_from_slice(&self.image_size.to_le_bytes());
        h[32..40].copy_from_slice(&self.chunk_count.to_le_bytes());
        h[40..72].copy_from_slice(&self.index_digest);
        h
    }

    fn bitmap_len(&self) -> usize {
        self.chunk_count.div_ceil(8) as usize
    }
}

pub struct BitmapFile {
    file: File,
    header: MapHeader,
    bits: Vec<u8>,
}

impl BitmapFile {
    /// Loads the bitmap if the file holds one for `header`; returns whether it
    /// was closed cleanly (`Some(clean)`), or `None` when it was (re)created.
    pub fn load_or_create(file: File, header: &MapHeader) -> io::Result<(Self, Option<bool>)> {
        let want_len = HEADER_LEN + header.bitmap_len();
        let mut on_disk = vec![0u8; want_len];
        let len = file.metadata()?.len();
        if len == want_len as u64 {
            file.read_exact_at(&mut on_disk, 0)?;
            let state = u32::from_le_bytes(on_disk[12..16].try_into().expect("4 bytes"));
            let matches_open = on_disk[..HEADER_LEN] == header.encode(STATE_OPEN);
            let matches_clean = on_disk[..HEADER_LEN] == header.encode(STATE_CLEAN);
            if matches_open || matches_clean {
                let bits = on_disk.split_off(HEADER_LEN);
                let map = BitmapFile {
                    file,
                    header: header.clone(),
                    bits,
                };
                return Ok((map, Some(state == STATE_CLEAN)));
            }
        }
        // Recreate: header first as "open", so a crash mid-way still leaves a
        // file that is either rejected or all zeros.
        file.set_len(0)?;
        file.set_len(want_len as u64)?;
        file.write_all_at(&header.encode(STATE_OPEN), 0)?;
        file.sync_all()?;
        let map = BitmapFile {
            file,
            header: header.clone(),
            bits: vec![0u8; header.bitmap_len()],
        };
        Ok((map, None))
    }

    pub fn is_set(&self, chunk: u64) -> bool {
        self.bits
            .get((chunk / 8) as usize)
            .is_some_and(|b| b & (1 << (chunk % 8)) != 0)
    }

    pub fn set(&mut self, chunk: u64) {
        self.bits[(chunk / 8) as usize] |= 1 << (chunk % 8);
    }

    pub fn clear(&mut self, chunk: u64) {
        self.bits[(chunk / 8) as usize] &= !(1 << (chunk % 8));
    }

    /// Marks the cache as in use (and writes any bits cleared by recovery);
    /// must be durable before the first chunk is written.
    pub fn mark_open(&mut self) -> io::Result<()> {
        self.file.write_all_at(&self.bits, HEADER_LEN as u64)?;
        self.file.write_all_at(&self.header.encode(STATE_OPEN), 0)?;
        self.file.sync_data()
    }

    /// Writes the whole bitmap and syncs it. At most 128 KiB (2^20 chunks), and
    /// called once per persist interval, so tracking dirty ranges is not worth it.
    pub fn write_bits(&mut self) -> io::Result<()> {
        self.file.write_all_at(&self.bits, HEADER_LEN as u64)?;
        self.file.sync_data()
    }

    pub fn mark_clean(&mut self) -> io::Result<()> {
        self.file
            .write_all_at(&self.header.encode(STATE_CLEAN), 0)?;
        self.file.sync_data()
    }
}
