//! Fuzzes the blob parser. Any panic, overflow or allocation blow-up is a bug.
//!
//! Random bytes almost never get past the index sha256, so most inputs are
//! turned into a blob whose footer is computed for them: the fuzzer then
//! drives the header and chunk-table checks and every chunk decode directly
//! (format version 2, or 1 when bit 1 of the first byte is set).
#![no_main]

use lazybd_blockdev::format::{sha256, Footer, Index, FORMAT_V1, FORMAT_VERSION};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        parse_blob(rest);
        return;
    }
    // rest = data_len (u16 LE) || data area || index bytes
    if rest.len() < 2 {
        return;
    }
    let data_len = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
    let (data, index) = rest[2..].split_at(data_len);
    // Both versions are still read (version 1 blobs exist).
    let footer = Footer {
        version: if mode & 2 == 0 { FORMAT_VERSION } else { FORMAT_V1 },
        index_offset: data.len() as u64,
        index_length: index.len() as u64,
        index_digest: sha256(index),
    };
    let mut blob = Vec::with_capacity(rest.len() + 64);
    blob.extend_from_slice(data);
    blob.extend_from_slice(index);
    blob.extend_from_slice(&footer.to_bytes());
    parse_blob(&blob);
});

fn parse_blob(blob: &[u8]) {
    let Ok(footer) = Footer::parse(blob) else {
        return;
    };
    if footer.check_blob_len(blob.len() as u64).is_err() {
        return;
    }
    let start = footer.index_offset as usize;
    let end = start + footer.index_length as usize;
    let Ok(index) = Index::parse(&blob[start..end], &footer) else {
        return;
    };
    for i in 0..index.chunk_count() {
        let range = index.entry(i).expect("i < chunk_count").stored_range();
        let _ = index.decode_chunk(i, &blob[range.start as usize..range.end as usize]);
        // The lookups the fetcher makes (version 2: chunks in any blob order).
        let image = index.image_range(i);
        let _ = index.chunks_for(image.start, image.end - image.start);
        let _ = index.next_in_blob(i);
        let _ = index.chunks_in_blob_range(range.start, range.end);
    }
    let _ = index.prefetch_chunks();
    let _ = index.stored_bytes();
}
