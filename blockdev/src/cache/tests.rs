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
            present: 3
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
        ChunkCache::open_in_boot(dir.path(), index.clone(), d, OTHER_BOOT).unwrap();
    assert!(report.left_open);
    assert_eq!(report.to_verify, 2, "opening hashes nothing");
    assert!(!cache.is_present(0) && !cache.is_present(2) && cache.is_present(1));
    // A crash before the verification: the next open (even in the same
    // boot as the one that started verifying) verifies again.
    drop(cache);
    let (cache, report) =
        ChunkCache::open_in_boot(dir.path(), index.clone(), d, OTHER_BOOT).unwrap();
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
        ChunkCache::open_in_boot(dir.path(), index.clone(), d, OTHER_BOOT).unwrap();
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
        ChunkCache::open_in_boot(dir.path(), index.clone(), d, OTHER_BOOT).unwrap();
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
    let (cache, _) = ChunkCache::open_in_boot(dir.path(), index.clone(), d, OTHER_BOOT).unwrap();
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
