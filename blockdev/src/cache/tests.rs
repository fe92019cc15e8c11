use super::*;
use crate::format::{sha256, write_blob, Index, Layout};

const CS: u32 = 4096;

/// Chunk 0 text, chunk 1 zeros, chunk 2 text, chunk 3 short tail.
fn sample() -> (Vec<u8>, std::sync::Arc<Index>, Sha256Digest) {
    let mut img = b"hello chunk zero ".repeat(241)[..CS as usize].to_vec();
    img.extend(vec![0u8; CS as usize]);
    img.extend(b"second data chunk ".repeat(228)[..CS as usize].to_vec());
    img.extend(b"tail".repeat(10));
    let mut blob = Vec::new();
    let layout = Layout::fixed(img.len() as u64, CS).unwrap();
    let w = write_blob(&img[..], &mut blob, &layout).unwrap();
    let digest = sha256(&w.index.to_bytes());
    (img, std::sync::Arc::new(w.index), digest)
}

fn store(cache: &ChunkCache, index: &Index, img: &[u8], chunk: u64) {
    let r = index.image_range(chunk);
    cache
        .store(chunk, r.start, &img[r.start as usize..r.end as usize])
        .unwrap();
}

fn read_chunk(cache: &ChunkCache, index: &Index, chunk: u64) -> Vec<u8> {
    let r = index.image_range(chunk);
    let mut buf = vec![0u8; (r.end - r.start) as usize];
    cache.read_at(&mut buf, r.start).unwrap();
    buf
}

#[test]
fn new_cache_has_only_zero_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (img, index, d) = sample();
    let (cache, report) = ChunkCache::open(dir.path(), index.clone(), d).unwrap();
    assert!(report.created && !report.left_open);
    assert_eq!(report.present, 1);
    assert!(cache.is_present(1) && !cache.is_present(0) && !cache.is_present(99));
    assert_eq!(read_chunk(&cache, &index, 1), img[4096..8192]);
    let len = std::fs::metadata(dir.path().join(IMAGE_FILE))
        .unwrap()
        .len();
    assert_eq!(len, index.image_size);
}

#[test]
fn clean_close_keeps_chunks_without_rehash() {
    let dir = tempfile::tempdir().unwrap();
    let (img, index, d) = sample();
    let (cache, _) = ChunkCache::open(dir.path(), index.clone(), d).unwrap();
    store(&cache, &index, &img, 0);
    store(&cache, &index, &img, 3);
    assert_eq!(read_chunk(&cache, &index, 3), img[3 * 4096..]);
    cache.close().unwrap();

    let (cache, report) = ChunkCache::open(dir.path(), index.clone(), d).unwrap();
    assert_eq!(
        report,
        OpenReport {
            created: false,
            left_open: false,
            to_verify: 0,
            present: 3,
            stored: 0,
        }
    );
    assert_eq!(read_chunk(&cache, &index, 0), img[..4096]);
}

#[test]
fn crash_before_persist_forgets_the_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let (img, index, d) = sample();
    let (cache, _) = ChunkCache::open(dir.path(), index.clone(), d).unwrap();
    store(&cache, &index, &img, 0);
    assert!(cache.is_present(0));
    drop(cache); // crash: data written, bit never persisted

    let (cache, report) = ChunkCache::open(dir.path(), index.clone(), d).unwrap();
    assert!(report.left_open && report.to_verify == 0);
    assert!(
        !cache.is_present(0),
        "unpersisted chunk must be fetched again"
    );
    // Storing again works and persists this time.
    store(&cache, &index, &img, 0);
    cache.persist().unwrap();
    drop(cache);
    let (cache, _) = ChunkCache::open(dir.path(), index.clone(), d).unwrap();
    assert!(cache.is_present(0));
}

#[test]
fn crash_after_persist_keeps_verified_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (img, index, d) = sample();
    let (cache, _) = ChunkCache::open(dir.path(), index.clone(), d).unwrap();
    store(&cache, &index, &img, 2);
    cache.persist().unwrap();
    store(&cache, &index, &img, 0); // written after the last persist
    drop(cache);

    let (cache, report) = ChunkCache::open(dir.path(), index.clone(), d).unwrap();
    // Same boot: the page cache outlived the process, nothing to re-hash.
    assert!(report.left_open);
    assert_eq!(report.to_verify, 0);
    assert!(cache.is_present(2) && !cache.is_present(0));
    assert_eq!(read_chunk(&cache, &index, 2), img[2 * 4096..3 * 4096]);
}

const OTHER_BOOT: [u8; 16] = [0xb0; 16];

/// A bit on disk whose data did not survive a reboot (a disk that
/// acknowledged the data sync but lost the write) is caught: after a
/// reboot, claimed chunks of an incomplete layer count as missing until
/// verified, and the verification drops the bad one.
#[test]
fn after_a_reboot_an_incomplete_cache_is_verified_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let (img, index, d) = sample();
    let (cache, _) = ChunkCache::open(dir.path(), index.clone(), d).unwrap();
    store(&cache, &index, &img, 0);
    store(&cache, &index, &img, 2);
    cache.persist().unwrap();
    drop(cache); // left open
    let image = OpenOptions::new()
        .write(true)
        .open(dir.path().join(IMAGE_FILE))
        .unwrap();
    image.write_all_at(&[0u8; 512], 0).unwrap();

    let (cache, report) =
        ChunkCache::open_in_boot(dir.path(), index.clone(), d, false, OTHER_BOOT).unwrap();
    assert!(report.left_open);
    assert_eq!(report.to_verify, 2, "opening hashes nothing");
    assert!(!cache.is_present(0) && !cache.is_present(2) && cache.is_present(1));
    // A crash before the verification: the next open (even in the same
    // boot as the one that started verifying) verifies again.
    drop(cache);
    let (cache, report) =
        ChunkCache::open_in_boot(dir.path(), index.clone(), d, false, OTHER_BOOT).unwrap();
    assert_eq!(report.to_verify, 2);
    let verified = cache.verify_pending().unwrap();
    assert_eq!(
        verified,
        VerifyReport {
            hashed: 2,
            dropped: 1
        }
    );
    assert!(!cache.is_present(0) && cache.is_present(2));
    assert_eq!(read_chunk(&cache, &index, 2), img[2 * 4096..3 * 4096]);
    // The dropped bit is gone from disk too, even across another crash (in
    // the boot that verified).
    drop(cache);
    let (cache, report) =
        ChunkCache::open_in_boot(dir.path(), index.clone(), d, false, OTHER_BOOT).unwrap();
    assert_eq!(report.to_verify, 0);
    assert!(!cache.is_present(0) && cache.is_present(2));
}

/// A complete layer is never re-hashed, not even after a reboot: its image
/// stopped changing when its last chunk was synced.
#[test]
fn a_complete_cache_is_trusted_after_a_reboot() {
    let dir = tempfile::tempdir().unwrap();
    let (img, index, d) = sample();
    let (cache, _) = ChunkCache::open(dir.path(), index.clone(), d).unwrap();
    for c in [0, 2, 3] {
        store(&cache, &index, &img, c);
    }
    cache.persist().unwrap();
    drop(cache);
    let (cache, report) =
        ChunkCache::open_in_boot(dir.path(), index.clone(), d, false, OTHER_BOOT).unwrap();
    assert_eq!(
        (report.left_open, report.to_verify, report.present),
        (true, 0, 4)
    );
    assert!(!cache.has_pending());
}

/// Verification and a fetch of the same chunk race: the fetched chunk
/// stays present and keeps its bit.
#[test]
fn a_chunk_fetched_during_verification_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (img, index, d) = sample();
    let (cache, _) = ChunkCache::open(dir.path(), index.clone(), d).unwrap();
    store(&cache, &index, &img, 0);
    cache.persist().unwrap();
    drop(cache);
    let (cache, _) =
        ChunkCache::open_in_boot(dir.path(), index.clone(), d, false, OTHER_BOOT).unwrap();
    store(&cache, &index, &img, 0); // a reader fetched it meanwhile
    assert_eq!(cache.verify_pending().unwrap(), VerifyReport::default());
    cache.close().unwrap();
    let (cache, _) = ChunkCache::open(dir.path(), index.clone(), d).unwrap();
    assert!(cache.is_present(0));
}

#[test]
fn bitmap_of_another_index_is_discarded_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let (img, index, d) = sample();
    let (cache, _) = ChunkCache::open(dir.path(), index.clone(), d).unwrap();
    store(&cache, &index, &img, 0);
    cache.close().unwrap();

    let other = [7u8; 32];
    let (cache, report) = ChunkCache::open(dir.path(), index.clone(), other).unwrap();
    assert!(report.created);
    assert!(!cache.is_present(0));
    assert_eq!(read_chunk(&cache, &index, 0), vec![0u8; 4096]);
}

#[test]
fn truncated_bitmap_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let (img, index, d) = sample();
    let (cache, _) = ChunkCache::open(dir.path(), index.clone(), d).unwrap();
    store(&cache, &index, &img, 0);
    cache.close().unwrap();
    let map = OpenOptions::new()
        .write(true)
        .open(dir.path().join(BITMAP_FILE))
        .unwrap();
    map.set_len(100).unwrap();
    let (cache, report) = ChunkCache::open(dir.path(), index.clone(), d).unwrap();
    assert!(report.created && !cache.is_present(0));
}

#[test]
fn second_open_is_refused_while_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let (_, index, d) = sample();
    let (cache, _) = ChunkCache::open(dir.path(), index.clone(), d).unwrap();
    assert!(matches!(
        ChunkCache::open(dir.path(), index.clone(), d),
        Err(CacheError::Locked(_))
    ));
    drop(cache);
    assert!(ChunkCache::open(dir.path(), index.clone(), d).is_ok());
}

/// The sample's blob too, for the stored bytes of its chunks.
fn sample_blob() -> (Vec<u8>, Vec<u8>, std::sync::Arc<Index>, Sha256Digest) {
    let (img, index, d) = sample();
    let mut blob = Vec::new();
    let layout = Layout::fixed(img.len() as u64, CS).unwrap();
    write_blob(&img[..], &mut blob, &layout).unwrap();
    (img, blob, index, d)
}

fn stored_of<'a>(blob: &'a [u8], index: &Index, chunk: u64) -> &'a [u8] {
    let r = index.chunks[chunk as usize].stored_range();
    &blob[r.start as usize..r.end as usize]
}

/// Stores chunk `chunk` as the fetcher does: stored bytes, then the image.
fn store_both(cache: &ChunkCache, index: &Index, img: &[u8], blob: &[u8], chunk: u64) {
    cache
        .store_stored(index, chunk, stored_of(blob, index, chunk))
        .unwrap();
    store(cache, index, img, chunk);
}

#[test]
fn stored_bytes_are_kept_as_the_blob_holds_them_across_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (img, blob, index, d) = sample_blob();
    assert_eq!(index.chunks[0].kind, ChunkKind::Zstd);
    let (cache, _) = ChunkCache::open_with(dir.path(), index.clone(), d, true).unwrap();
    assert_eq!(
        cache.read_stored(&index, 0).unwrap(),
        None,
        "not fetched yet"
    );
    for c in [0, 2, 3] {
        store_both(&cache, &index, &img, &blob, c);
    }
    for c in 0..4 {
        assert_eq!(
            cache.read_stored(&index, c).unwrap().as_deref(),
            Some(stored_of(&blob, &index, c)),
            "chunk {c}"
        );
    }
    cache.close().unwrap();

    let (cache, report) = ChunkCache::open_with(dir.path(), index.clone(), d, true).unwrap();
    assert!(!report.left_open);
    let zstd = (0..4)
        .filter(|&c| index.chunks[c as usize].kind == ChunkKind::Zstd)
        .count() as u64;
    assert_eq!(report.stored, zstd);
    assert_eq!(
        cache.read_stored(&index, 2).unwrap().as_deref(),
        Some(stored_of(&blob, &index, 2))
    );
    drop(cache);
    // Without keeping stored bytes, a zstd chunk has none to offer (its
    // peer server rebuilds it); raw and zero chunks always do.
    let (cache, _) = ChunkCache::open(dir.path(), index.clone(), d).unwrap();
    assert_eq!(cache.read_stored(&index, 0).unwrap(), None);
    assert_eq!(cache.read_stored(&index, 1).unwrap(), Some(Vec::new()));
}

/// The stored copy follows the crash rule: a frame written after the last
/// persist is forgotten, and after a reboot one whose bytes did not survive
/// is caught by decoding it again.
#[test]
fn crash_and_reboot_drop_unpersisted_and_damaged_stored_frames() {
    let dir = tempfile::tempdir().unwrap();
    let (img, blob, index, d) = sample_blob();
    let (cache, _) = ChunkCache::open_with(dir.path(), index.clone(), d, true).unwrap();
    store_both(&cache, &index, &img, &blob, 0);
    store_both(&cache, &index, &img, &blob, 2);
    cache.persist().unwrap();
    store_both(&cache, &index, &img, &blob, 3);
    drop(cache);
    let stored = OpenOptions::new()
        .write(true)
        .open(dir.path().join(STORED_FILE))
        .unwrap();
    stored
        .write_all_at(&[0u8; 8], index.chunks[0].offset)
        .unwrap();

    let (cache, report) =
        ChunkCache::open_in_boot(dir.path(), index.clone(), d, true, OTHER_BOOT).unwrap();
    assert!(report.left_open);
    assert_eq!(cache.read_stored(&index, 0).unwrap(), None, "damaged");
    let kept = cache.read_stored(&index, 2).unwrap();
    if index.chunks[2].kind == ChunkKind::Zstd {
        assert_eq!(kept.as_deref(), Some(stored_of(&blob, &index, 2)));
    }
    if index.chunks[3].kind == ChunkKind::Zstd {
        assert_eq!(cache.read_stored(&index, 3).unwrap(), None, "unpersisted");
    }
}
