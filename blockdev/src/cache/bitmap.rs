//! The on-disk bitmap of present chunks (`chunks.map`).
//!
//! ```text
//! 0   magic "LAZYBDCM"          8
//! 8   version (1)               4
//! 12  state: 1 clean, 0 open,    4
//!     2 open with chunks still to verify
//! 16  chunk_size                4
//! 20  reserved (0)              4
//! 24  image_size                8
//! 32  chunk_count               8
//! 40  index sha256             32
//! 72  boot id of the opener    16   (0 when clean; /proc/sys/kernel/random/boot_id)
//! 88  reserved (0) up to 128
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
const STATE_VERIFYING: u32 = 2;
const BOOT: std::ops::Range<usize> = 72..88;

/// The kernel's boot id: a cache left open by a process of this boot lost
/// nothing (the page cache outlived that process).
pub type BootId = [u8; 16];

/// How the previous user left the bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    Clean,
    /// Open (in use, or its user died) by a process of this boot.
    Open(BootId),
    /// Open with chunks not yet verified after a reboot.
    Verifying,
}

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

    fn encode(&self, state: u32, boot: &BootId) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&state.to_le_bytes());
        h[16..20].copy_from_slice(&self.chunk_size.to_le_bytes());
        h[24..32].copy_from_slice(&self.image_size.to_le_bytes());
        h[32..40].copy_from_slice(&self.chunk_count.to_le_bytes());
        h[40..72].copy_from_slice(&self.index_digest);
        h[BOOT].copy_from_slice(boot);
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
    boot: BootId,
}

impl BitmapFile {
    /// Loads the bitmap if the file holds one for `header`; returns how it
    /// was left, or `None` when it was (re)created. `boot` is this boot's id,
    /// written into the header while the cache is open.
    pub fn load_or_create(
        file: File,
        header: &MapHeader,
        boot: BootId,
    ) -> io::Result<(Self, Option<Left>)> {
        let want_len = HEADER_LEN + header.bitmap_len();
        let mut on_disk = vec![0u8; want_len];
        let len = file.metadata()?.len();
        if len == want_len as u64 {
            file.read_exact_at(&mut on_disk, 0)?;
            let state = u32::from_le_bytes(on_disk[12..16].try_into().expect("4 bytes"));
            let left_boot: BootId = on_disk[BOOT].try_into().expect("16 bytes");
            let left = match state {
                STATE_CLEAN => Some(Left::Clean),
                STATE_OPEN => Some(Left::Open(left_boot)),
                STATE_VERIFYING => Some(Left::Verifying),
                _ => None,
            };
            // Everything but the state and the boot id must be ours exactly.
            let mut expected = header.encode(state, &left_boot);
            expected[12..16].copy_from_slice(&on_disk[12..16]);
            if let (Some(left), true) = (left, on_disk[..HEADER_LEN] == expected) {
                let bits = on_disk.split_off(HEADER_LEN);
                let map = BitmapFile {
                    file,
                    header: header.clone(),
                    bits,
                    boot,
                };
                return Ok((map, Some(left)));
            }
        }
        // Recreate: header first as "open", so a crash mid-way still leaves a
        // file that is either rejected or all zeros.
        file.set_len(0)?;
        file.set_len(want_len as u64)?;
        file.write_all_at(&header.encode(STATE_OPEN, &boot), 0)?;
        file.sync_all()?;
        let map = BitmapFile {
            file,
            header: header.clone(),
            bits: vec![0u8; header.bitmap_len()],
            boot,
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

    /// Marks the cache as in use by this boot (and writes any bits cleared
    /// by recovery); must be durable before the first chunk is written.
    /// `verifying`: some set bits still await verification, which a crash
    /// before [`finish_verify`](Self::finish_verify) must not forget.
    pub fn mark_open(&mut self, verifying: bool) -> io::Result<()> {
        let state = if verifying {
            STATE_VERIFYING
        } else {
            STATE_OPEN
        };
        self.file.write_all_at(&self.bits, HEADER_LEN as u64)?;
        self.file
            .write_all_at(&self.header.encode(state, &self.boot), 0)?;
        self.file.sync_data()
    }

    /// Every claimed chunk was verified (and the failures' bits cleared).
    pub fn finish_verify(&mut self) -> io::Result<()> {
        self.mark_open(false)
    }

    /// Writes the whole bitmap and syncs it. At most 128 KiB (2^20 chunks), and
    /// called once per persist interval, so tracking dirty ranges is not worth it.
    pub fn write_bits(&mut self) -> io::Result<()> {
        self.file.write_all_at(&self.bits, HEADER_LEN as u64)?;
        self.file.sync_data()
    }

    pub fn mark_clean(&mut self) -> io::Result<()> {
        self.file
            .write_all_at(&self.header.encode(STATE_CLEAN, &[0; 16]), 0)?;
        self.file.sync_data()
    }
}

/// This boot's id; all zeros (never equal to a recorded one) if unknown.
pub fn boot_id() -> BootId {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|s| hex::decode(s.trim().replace('-', "")).ok())
        .and_then(|b| b.try_into().ok())
        .unwrap_or([0; 16])
}
