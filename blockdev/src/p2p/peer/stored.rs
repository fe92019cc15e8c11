//! The fallback for chunks whose stored bytes this node did not keep (a
//! cache filled before the node served peers): the fetcher asks for the
//! blob's stored bytes, so the peer rebuilds them from the uncompressed
//! cache. zstd at the converter's level reproduces the converter's frame
//! byte for byte with the same zstd; a shorter frame is padded with a zstd
//! skippable frame (which decoders ignore) to the stored length. Whatever
//! comes out, the receiver decodes and checks the chunk's sha256, so a
//! rebuild can at worst be refused, never trusted wrongly. It costs CPU the
//! kept stored bytes do not (`crate::cache`), so it is counted
//! (`rebuilt_chunks_sent`).

use crate::format::{ChunkKind, Index, ZSTD_LEVEL};

/// Magic of the first zstd skippable frame type (RFC 8878, 3.1.2).
const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;
const SKIPPABLE_HEADER: usize = 8;

/// The stored form of chunk `c` from its uncompressed `data`; `None` when no
/// frame of exactly the stored length can be made.
pub fn rebuild(index: &Index, c: u64, data: &[u8]) -> Option<Vec<u8>> {
    let entry = index.chunks.get(c as usize)?;
    let want = entry.stored_len as usize;
    match entry.kind {
        ChunkKind::Raw => (data.len() == want).then(|| data.to_vec()),
        ChunkKind::Zero => Some(Vec::new()),
        ChunkKind::Zstd => {
            let mut frame = zstd::bulk::compress(data, ZSTD_LEVEL).ok()?;
            if frame.len() == want {
                return Some(frame);
            }
            let pad = want.checked_sub(frame.len())?;
            if pad < SKIPPABLE_HEADER {
                return None;
            }
            frame.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
            frame.extend_from_slice(&((pad - SKIPPABLE_HEADER) as u32).to_le_bytes());
            frame.resize(want, 0);
            Some(frame)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a peer rebuilds from its decoded cache is the converter's
    /// stored bytes, chunk for chunk (raw, zstd and zero chunks).
    #[test]
    fn rebuilt_chunks_equal_the_converters() {
        let mut image: Vec<u8> = (0..300_000u32).map(|i| (i % 7) as u8).collect();
        image.extend(vec![0u8; 128 << 10]);
        let mut x = 1u64;
        image.extend((0..200_000).map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        }));
        let mut blob = Vec::new();
        let layout = crate::format::Layout::fixed(image.len() as u64, 64 << 10).unwrap();
        let written = crate::format::write_blob(&image[..], &mut blob, &layout).unwrap();
        let index = &written.index;
        let kinds: std::collections::HashSet<u8> =
            index.chunks.iter().map(|e| e.kind as u8).collect();
        assert_eq!(kinds.len(), 3, "raw, zstd and zero chunks");
        for c in 0..index.chunk_count() {
            let r = index.image_range(c);
            let data = &image[r.start as usize..r.end as usize];
            let stored = &blob[index.chunks[c as usize].stored_range().start as usize
                ..index.chunks[c as usize].stored_range().end as usize];
            assert_eq!(
                rebuild(index, c, data).as_deref(),
                Some(stored),
                "chunk {c}"
            );
        }
    }

    #[test]
    fn a_padded_frame_decodes_to_the_same_data() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let frame = zstd::bulk::compress(&data, ZSTD_LEVEL).unwrap();
        let mut padded = frame.clone();
        padded.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
        padded.extend_from_slice(&16u32.to_le_bytes());
        padded.extend_from_slice(&[0u8; 16]);
        let out = zstd::bulk::decompress(&padded, data.len()).unwrap();
        assert_eq!(out, data);
    }
}
