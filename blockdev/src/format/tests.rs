//! Parsing, validation and round trips of every format version.

// A one-range profile is a list of ranges, not a range to collect.
#![allow(clippy::single_range_in_vec_init)]

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
    let layout = Layout::fixed(img.len() as u64, CS).unwrap();
    let w = write_blob(img, &mut blob, &layout).unwrap();
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
    reindex_blob(&blob, &w, f)
}

/// [`reindex`] of a blob already written.
fn reindex_blob(
    blob: &[u8],
    w: &WrittenBlob,
    f: impl FnOnce(&mut Index),
) -> Result<Index, FormatError> {
    let mut index = w.index.clone();
    f(&mut index);
    let bytes = index.to_bytes();
    let mut out = blob[..w.footer.index_offset as usize].to_vec();
    let footer = Footer {
        version: index.version,
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

/// A profile puts its chunks first; the index maps them back to image order.
#[test]
fn startup_chunks_are_stored_first_and_found_by_image_offset() {
    let img = sample_image();
    let size = img.len() as u64;
    let files = [0..u64::from(CS), u64::from(CS)..size];
    let profile = [2 * 4096..2 * 4096 + 10];
    let shape = Shape {
        file_data: &files,
        profile: &profile,
        ..Shape::default()
    };
    let layout = Layout::plan(size, 2 * CS, &shape).unwrap();
    let mut blob = Vec::new();
    let w = write_blob(&img[..], &mut blob, &layout).unwrap();
    let index = parse(&blob).unwrap();
    assert_eq!(index, w.index);
    assert_eq!(index.version, FORMAT_VERSION);
    // Chunks: [0,8K) (the soft cut at 4K merged away), [8K,12K) (between
    // the profile's hard edges), [12K, end).
    assert_eq!(index.chunk_count(), 3);
    assert_eq!(index.image_range(1), 8192..12288);
    assert_eq!(index.prefetch_chunks(), [1]);
    assert_eq!(
        index.chunks[1].offset, 0,
        "the startup chunk is stored first"
    );
    assert_eq!(index.prefetch_len, u64::from(index.chunks[1].stored_len));
    assert_eq!(index.chunks_for(8191, 2), 0..2);
    assert_eq!(index.chunks_for(12288, 1 << 20), 2..3);
    assert_eq!(decode_all(&blob, &index), img);
    assert_eq!(
        index.chunks_in_blob_range(0, index.prefetch_len),
        Some(vec![1])
    );
    assert_eq!(index.next_in_blob(1), Some(0));
    assert_eq!(index.chunks_in_blob_range(1, index.prefetch_len), None);
    assert_eq!(w.anchor(), sha256(&index.to_bytes()));
}

/// Two profiled chunks, one read with narrow readahead and one only with
/// more: the narrow part ends between them; version 2 indexes have no
/// narrow part of their own (all of the area is), and a narrow part past
/// the area or inside a chunk is refused.
#[test]
fn the_narrow_part_ends_where_the_narrow_reads_do() {
    let img = sample_image();
    let size = img.len() as u64;
    let files = [0..u64::from(CS), u64::from(CS)..2 * 4096, 2 * 4096..size];
    let profile = [2 * 4096..2 * 4096 + 10, 0..10];
    let shape = Shape {
        file_data: &files,
        profile: &profile,
        narrow: Some(1),
        ..Shape::default()
    };
    let layout = Layout::plan(size, CS, &shape).unwrap();
    let mut blob = Vec::new();
    let w = write_blob(&img[..], &mut blob, &layout).unwrap();
    let index = parse(&blob).unwrap();
    assert_eq!(index, w.index);
    assert_eq!(index.prefetch_parts(), (vec![2], vec![0]));
    assert_eq!(
        index.prefetch_narrow_len,
        u64::from(index.chunks[2].stored_len)
    );
    assert_eq!(
        index.prefetch_len,
        index.prefetch_narrow_len + u64::from(index.chunks[0].stored_len)
    );
    assert_eq!(decode_all(&blob, &index), img);

    let (narrow, whole) = (index.prefetch_narrow_len, index.prefetch_len);
    let rewrite = |f: &dyn Fn(&mut Index)| reindex_blob(&blob, &w, f);
    let v2 = rewrite(&|i| i.version = FORMAT_V2).unwrap();
    assert_eq!(v2.prefetch_narrow_len, whole, "version 2: the whole area");
    assert_eq!(v2.prefetch_parts(), (vec![2, 0], vec![]));
    assert_eq!(
        rewrite(&|i| i.prefetch_narrow_len = whole + 4096),
        Err(FormatError::BadNarrowLength {
            narrow_len: whole + 4096,
            prefetch_len: whole,
            index: 0
        })
    );
    assert_eq!(
        rewrite(&|i| i.prefetch_narrow_len = narrow - 1),
        Err(FormatError::BadNarrowLength {
            narrow_len: narrow - 1,
            prefetch_len: whole,
            index: 2
        })
    );
}

#[test]
fn version_1_blobs_still_parse() {
    let img = sample_image();
    let mut blob = Vec::new();
    let w = write_blob_v1(&img[..], img.len() as u64, &mut blob, CS).unwrap();
    let index = parse(&blob).unwrap();
    assert_eq!(index.version, FORMAT_V1);
    assert_eq!(index, w.index);
    assert_eq!(index.chunk_count(), 4);
    assert_eq!(index.image_range(3), 12288..12320);
    assert_eq!(decode_all(&blob, &index), img);
    // A version 1 index with a version 2 footer is refused.
    let mut bad = blob.clone();
    let n = bad.len();
    bad[n - 56] = 2;
    assert!(matches!(
        parse(&bad),
        Err(FormatError::VersionMismatch {
            footer: 2,
            index: 1
        } | FormatError::BadIndexLength(_))
    ));
}

#[test]
fn v2_chunk_lengths_must_be_whole_blocks_covering_the_image() {
    let img = sample_image();
    let r = reindex(&img, |i| {
        i.chunks[0].image_len = 4000;
    });
    assert!(matches!(
        r,
        Err(FormatError::BadImageLength { index: 0, .. })
    ));
    let r = reindex(&img, |i| i.chunks[1].image_len = 2 * CS);
    assert!(matches!(
        r,
        Err(FormatError::BadImageLength { .. } | FormatError::ImageNotCovered { .. })
    ));
    let r = reindex(&img, |i| i.chunks[3].image_len = 16);
    assert!(matches!(
        r,
        Err(FormatError::BadImageLength { index: 3, .. })
    ));
    let r = reindex(&img, |i| {
        i.chunk_size = 2 * CS;
        i.image_size += 4096;
        i.chunks[3].image_len = 4096;
    });
    assert!(matches!(r, Err(FormatError::ImageNotCovered { .. })));
}

#[test]
fn prefetch_length_must_end_on_a_chunk() {
    let img = sample_image();
    let r = reindex(&img, |i| i.prefetch_len = 1);
    assert!(matches!(r, Err(FormatError::BadPrefetchLength { .. })));
    let r = reindex(&img, |i| i.prefetch_len = i.data_len + 1);
    assert!(matches!(r, Err(FormatError::BadPrefetchLength { .. })));
    let ok = reindex(&img, |i| i.prefetch_len = i.chunks[0].stored_range().end);
    assert_eq!(ok.unwrap().prefetch_chunks(), [0]);
}

proptest::proptest! {
    #[test]
    fn any_layout_round_trips(
        img in proptest::collection::vec(0u8..4, 0..40000),
        cuts in proptest::collection::vec(0u64..40000, 0..8),
        profile in proptest::collection::vec((0u64..40000, 1u64..9000), 0..4),
    ) {
        let size = img.len() as u64;
        let profile: Vec<_> = profile
            .into_iter()
            .filter(|&(s, l)| s + l <= size)
            .map(|(s, l)| s..s + l)
            .collect();
        let files: Vec<_> = cuts.windows(2).map(|w| w[0].min(w[1])..w[0].max(w[1])).collect();
        let shape = Shape { file_data: &files, profile: &profile, ..Shape::default() };
        let layout = Layout::plan(size, 2 * CS, &shape).unwrap();
        let mut blob = Vec::new();
        let w = write_blob(&img[..], &mut blob, &layout).unwrap();
        let index = parse(&blob).unwrap();
        proptest::prop_assert_eq!(&index, &w.index);
        proptest::prop_assert_eq!(decode_all(&blob, &index), img);
        for r in &profile {
            for c in index.chunks_for(r.start, r.end - r.start) {
                proptest::prop_assert!(index.chunks[c as usize].stored_len == 0
                    || index.chunks[c as usize].offset < index.prefetch_len);
            }
        }
    }
}
