//! Where an image is cut into chunks and in which order the chunks are stored.
//!
//! Cuts come from three places. *Soft* cuts are where files' data begins
//! and ends in the EROFS image: a container reading a small file then
//! fetches that file, not its neighbours. Runs of small pieces are merged up
//! to [`MERGE_BELOW`], so tiny files do not each pay for a zstd frame and an
//! index entry. *Hard* cuts, never merged away, are the edges of the
//! metadata (inodes, directories: what path lookups read) and of the
//! regions a startup profile says were read, so each is exactly itself,
//! rounded to whole blocks. A profile's region is its ranges merged where
//! they touch (those read with narrow readahead apart from the others):
//! recorded one page at a time, a file read from start to end is one
//! region of full-size chunks, not a chunk per page, each paying for a
//! zstd frame, an index entry and a write to the node's cache (node's
//! startup part was 5 552 chunks of 5 KiB on average). No file edge cuts a
//! region, since the whole region is read anyway.
//!
//! Stored first, in this order, and together the blob's prefetch area: the
//! chunk holding the EROFS superblock (mounting the layer reads it before
//! anything else); the chunks a profile touches, in the order they were
//! first read; then the metadata, in image order (small, and read by every
//! lookup, like a TOC). Those make the area's *narrow part*. A profile may
//! say which of its reads only a container reading ahead further than
//! [`NARROW_READ_AHEAD_KB`](super::NARROW_READ_AHEAD_KB) made: their chunks
//! follow the metadata, so a node on a slow link streams the narrow part
//! alone.
//! Everything else follows in image order. The same image, shape and chunk
//! size always give the same layout.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;

use thiserror::Error;

use super::{check_chunk_size, BLOCK_SIZE, MAX_CHUNKS};

/// Pieces smaller than this are merged with the next one (up to the chunk size).
pub const MERGE_BELOW: u64 = 16 << 10;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("chunk size {0} is not a power of two in the allowed range")]
    BadChunkSize(u32),
    #[error("the startup profile names bytes [{start}, {end}) of an image of {image_size} bytes")]
    ProfileOutsideImage {
        start: u64,
        end: u64,
        image_size: u64,
    },
    #[error("the layout needs {0} chunks, more than {MAX_CHUNKS}; use a larger chunk size")]
    TooManyChunks(u64),
}

/// What is known about an image besides its bytes (all image byte ranges).
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape<'a> {
    /// Where files' data lies.
    pub file_data: &'a [Range<u64>],
    /// The metadata: stored in the prefetch area.
    pub metadata: &'a [Range<u64>],
    /// What a container read at start, first read first: stored first.
    pub profile: &'a [Range<u64>],
    /// How many of `profile`'s ranges, from the first, a container reads
    /// with narrow readahead; the others come after the metadata. `None`:
    /// all of them.
    pub narrow: Option<usize>,
}

impl Shape<'_> {
    /// The profile's ranges read with narrow readahead, and the others.
    fn profile_parts(&self) -> (&[Range<u64>], &[Range<u64>]) {
        let narrow = self.narrow.unwrap_or(usize::MAX).min(self.profile.len());
        self.profile.split_at(narrow)
    }
}

/// The chunks of an image, in image order, and the order they are stored in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    chunk_size: u32,
    /// Chunk `i` covers image bytes `[bounds[i], bounds[i+1])`.
    bounds: Vec<u64>,
    /// Chunk numbers in blob order; the first `prefetch` are the startup
    /// set, of which the first `narrow` its narrow part.
    order: Vec<u64>,
    prefetch: usize,
    narrow: usize,
}

impl Layout {
    /// Fixed-size chunks in image order, no prefetch area (format version 1's layout).
    pub fn fixed(image_size: u64, chunk_size: u32) -> Result<Self, LayoutError> {
        Self::plan(image_size, chunk_size, &Shape::default())
    }

    /// Cuts the image at the edges of `shape`'s ranges and every
    /// `chunk_size`, and orders the chunks as the module docs say.
    pub fn plan(image_size: u64, chunk_size: u32, shape: &Shape) -> Result<Self, LayoutError> {
        check_chunk_size(chunk_size).map_err(|_| LayoutError::BadChunkSize(chunk_size))?;
        for r in shape.profile {
            if r.start >= r.end || r.end > image_size {
                return Err(LayoutError::ProfileOutsideImage {
                    start: r.start,
                    end: r.end,
                    image_size,
                });
            }
        }
        // Cut points inside the image, block-aligned; `true` = hard.
        let mut cuts: BTreeMap<u64, bool> = BTreeMap::new();
        let inside = |p: u64| p > 0 && p < image_size;
        let (narrow, wide) = shape.profile_parts();
        let regions = profile_regions(narrow, wide);
        for r in shape.file_data {
            for c in [r.start, r.end] {
                let c = c / BLOCK_SIZE * BLOCK_SIZE;
                if inside(c) && !strictly_within(&regions, c) {
                    cuts.entry(c).or_insert(false);
                }
            }
        }
        for r in shape.metadata.iter().chain(&regions) {
            let r = blocks(r);
            for c in [r.start, r.end] {
                if inside(c) {
                    cuts.insert(c, true);
                }
            }
        }
        let bounds = split_groups(image_size, u64::from(chunk_size), &cuts);
        let count = bounds.len().saturating_sub(1) as u64;
        if count > MAX_CHUNKS {
            return Err(LayoutError::TooManyChunks(count));
        }
        let layout = Layout {
            chunk_size,
            bounds,
            order: Vec::new(),
            prefetch: 0,
            narrow: 0,
        };
        Ok(layout.ordered(shape))
    }

    /// The superblock's chunk, then the profile's narrow chunks (by first
    /// read), then the metadata (in image order), then the profile's other
    /// chunks, then the rest in image order. The superblock leads because a
    /// node streams the prefetch area in order and its attach mounts the
    /// layer: behind the profile, the mount (and with it the pull) would
    /// wait for the whole profile to arrive.
    fn ordered(mut self, shape: &Shape) -> Self {
        let mut placed = HashSet::new();
        let mut order = Vec::with_capacity(self.chunk_count() as usize);
        // An image read as EROFS has metadata, and its first range holds
        // the superblock (at 1024).
        let superblock = shape
            .metadata
            .first()
            .filter(|r| r.start == 0)
            .map(|_| 0..BLOCK_SIZE);
        let (narrow_profile, wide_profile) = shape.profile_parts();
        for r in superblock
            .iter()
            .chain(narrow_profile)
            .chain(shape.metadata)
        {
            self.place(r, &mut placed, &mut order);
        }
        self.narrow = order.len();
        for r in wide_profile {
            self.place(r, &mut placed, &mut order);
        }
        self.prefetch = order.len();
        order.extend((0..self.chunk_count()).filter(|c| !placed.contains(c)));
        self.order = order;
        self
    }

    /// Appends the chunks overlapping `r` that are not placed yet.
    fn place(&self, r: &Range<u64>, placed: &mut HashSet<u64>, order: &mut Vec<u64>) {
        for c in self.chunks_for(r) {
            if placed.insert(c) {
                order.push(c);
            }
        }
    }

    /// Chunks overlapping image bytes `r`.
    fn chunks_for(&self, r: &Range<u64>) -> Range<u64> {
        let first = self
            .bounds
            .partition_point(|&b| b <= r.start)
            .saturating_sub(1);
        let end = self.bounds.partition_point(|&b| b < r.end);
        first as u64..(end as u64).min(self.chunk_count())
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    pub fn image_size(&self) -> u64 {
        self.bounds.last().copied().unwrap_or(0)
    }

    pub fn chunk_count(&self) -> u64 {
        self.bounds.len().saturating_sub(1) as u64
    }

    /// Image bytes of chunk `c`.
    pub fn image_range(&self, c: u64) -> Range<u64> {
        self.bounds[c as usize]..self.bounds[c as usize + 1]
    }

    /// Chunk numbers in the order they are stored.
    pub fn order(&self) -> &[u64] {
        &self.order
    }

    /// How many chunks at the front of [`order`](Self::order) are the startup set.
    pub fn prefetch_count(&self) -> usize {
        self.prefetch
    }

    /// How many chunks at the front of [`order`](Self::order) are the
    /// startup set's narrow part.
    pub fn narrow_count(&self) -> usize {
        self.narrow
    }
}

/// `r` rounded out to whole blocks.
fn blocks(r: &Range<u64>) -> Range<u64> {
    r.start / BLOCK_SIZE * BLOCK_SIZE..r.end.div_ceil(BLOCK_SIZE) * BLOCK_SIZE
}

/// The regions a profile read, in image order and disjoint: `narrow`'s
/// ranges (rounded out to whole blocks) merged where they touch or overlap,
/// then what `wide`'s add beyond them, merged the same way. Each region is
/// cut only at its edges and every chunk size: the narrow part's chunks
/// must not carry what only a wider readahead read.
fn profile_regions(narrow: &[Range<u64>], wide: &[Range<u64>]) -> Vec<Range<u64>> {
    let narrow = merged(narrow);
    let mut regions = narrow.clone();
    for w in merged(wide) {
        // `w` less the narrow regions, which are sorted and disjoint.
        let mut at = w.start;
        let first = narrow.partition_point(|n| n.end <= w.start);
        for n in narrow[first..].iter().take_while(|n| n.start < w.end) {
            if n.start > at {
                regions.push(at..n.start);
            }
            at = at.max(n.end);
        }
        if at < w.end {
            regions.push(at..w.end);
        }
    }
    regions.sort_by_key(|r| r.start);
    regions
}

/// `ranges` rounded out to whole blocks, sorted, and merged where they
/// touch or overlap.
fn merged(ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut sorted: Vec<Range<u64>> = ranges.iter().map(blocks).collect();
    sorted.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Whether `p` lies inside one of `regions` (sorted, disjoint), not on an edge.
fn strictly_within(regions: &[Range<u64>], p: u64) -> bool {
    let i = regions.partition_point(|r| r.end <= p);
    regions.get(i).is_some_and(|r| r.start < p)
}

/// Chunk bounds in image order: groups between kept cuts, each split into
/// pieces of at most `max`. A soft cut is dropped while the group before it
/// is smaller than [`MERGE_BELOW`] and the merged group still fits `max`.
fn split_groups(image_size: u64, max: u64, cuts: &BTreeMap<u64, bool>) -> Vec<u64> {
    let mut bounds = vec![0];
    if image_size == 0 {
        bounds.clear();
        bounds.push(0);
        return bounds;
    }
    let points: Vec<(u64, bool)> = cuts
        .iter()
        .map(|(&p, &hard)| (p, hard))
        .chain(std::iter::once((image_size, true)))
        .collect();
    let mut group_start = 0u64;
    for (i, &(p, hard)) in points.iter().enumerate() {
        let next = points.get(i + 1).map(|&(n, _)| n);
        let merge =
            !hard && p - group_start < MERGE_BELOW && next.is_some_and(|n| n - group_start <= max);
        if merge {
            continue;
        }
        let mut at = group_start;
        while p - at > max {
            at += max;
            bounds.push(at);
        }
        bounds.push(p);
        group_start = p;
    }
    bounds
}

#[cfg(test)]
// A one-range profile is a list of ranges, not a range to collect.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    const K: u64 = 1024;

    fn ranges(l: &Layout) -> Vec<Range<u64>> {
        (0..l.chunk_count()).map(|c| l.image_range(c)).collect()
    }

    #[test]
    fn fixed_chunks_cover_the_image_in_order() {
        let l = Layout::fixed(200 * K + 5, 64 * K as u32).unwrap();
        assert_eq!(
            ranges(&l),
            [
                0..64 * K,
                64 * K..128 * K,
                128 * K..192 * K,
                192 * K..200 * K + 5
            ]
        );
        assert_eq!(l.order(), [0, 1, 2, 3]);
        assert_eq!(l.prefetch_count(), 0);
        assert_eq!(Layout::fixed(0, 4096).unwrap().chunk_count(), 0);
    }

    #[test]
    fn files_are_cut_out_and_small_ones_merged() {
        // A 4 KiB file, an 8 KiB file, then a 100 KiB file, then the rest.
        let files = [0..4 * K, 4 * K..12 * K, 12 * K..112 * K];
        let shape = Shape {
            file_data: &files,
            ..Shape::default()
        };
        let l = Layout::plan(256 * K, 64 * K as u32, &shape).unwrap();
        assert_eq!(
            ranges(&l),
            [
                // 4 KiB < 16 KiB: merged with the 8 KiB file; 12 KiB is still
                // small, but the 100 KiB file does not fit with it.
                0..12 * K,
                12 * K..76 * K,
                76 * K..112 * K,
                112 * K..176 * K,
                176 * K..240 * K,
                240 * K..256 * K,
            ]
        );
    }

    #[test]
    fn profile_edges_are_hard_and_its_chunks_come_first() {
        let profile = [200 * K..204 * K, 10 * K..30 * K, 201 * K..202 * K];
        let shape = Shape {
            profile: &profile,
            ..Shape::default()
        };
        let l = Layout::plan(256 * K, 64 * K as u32, &shape).unwrap();
        let order: Vec<Range<u64>> = l.order().iter().map(|&c| l.image_range(c)).collect();
        assert_eq!(l.prefetch_count(), 2);
        assert_eq!(order[0], 200 * K..204 * K);
        assert_eq!(order[1], 8 * K..32 * K, "rounded out to whole blocks");
        // The rest in image order, and together everything once.
        let mut all = ranges(&l);
        all.sort_by_key(|r| r.start);
        assert_eq!(all.first().unwrap().start, 0);
        assert!(all.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(all.last().unwrap().end, 256 * K);
        assert!(order[2..].windows(2).all(|w| w[0].start < w[1].start));
    }

    #[test]
    fn a_file_read_page_by_page_is_cut_in_full_chunks() {
        // A 40 KiB file, then a 160 KiB one; read a page at a time from 8
        // KiB to 152 KiB with narrow readahead, across the files' edge;
        // then, with more, 152..160 KiB and a page already read.
        let files = [0..40 * K, 40 * K..200 * K];
        let mut profile: Vec<Range<u64>> = (2..38).map(|p| p * 4 * K..(p + 1) * 4 * K).collect();
        profile.extend([152 * K..160 * K, 100 * K..104 * K]);
        let shape = Shape {
            file_data: &files,
            profile: &profile,
            narrow: Some(36),
            ..Shape::default()
        };
        let l = Layout::plan(256 * K, 64 * K as u32, &shape).unwrap();
        let order: Vec<Range<u64>> = l.order().iter().map(|&c| l.image_range(c)).collect();
        assert_eq!(
            order[..3],
            [8 * K..72 * K, 72 * K..136 * K, 136 * K..152 * K],
            "one region, not a chunk per page, nor cut at the file edge"
        );
        assert_eq!(
            order[3],
            152 * K..160 * K,
            "what only the wider readahead read is apart from the narrow part"
        );
        assert_eq!((l.narrow_count(), l.prefetch_count()), (3, 4));
    }

    #[test]
    fn planning_is_deterministic_and_checks_the_profile() {
        let files = [4 * K..40 * K, 40 * K..44 * K];
        let profile = vec![50 * K..51 * K, 50 * K..51 * K];
        let shape = |profile| Shape {
            file_data: &files,
            profile,
            ..Shape::default()
        };
        let a = Layout::plan(300 * K, 64 * K as u32, &shape(&profile)).unwrap();
        assert_eq!(
            a,
            Layout::plan(300 * K, 64 * K as u32, &shape(&profile)).unwrap()
        );
        let outside = [299 * K..301 * K];
        assert_eq!(
            Layout::plan(300 * K, 64 * K as u32, &shape(&outside)),
            Err(LayoutError::ProfileOutsideImage {
                start: 299 * K,
                end: 301 * K,
                image_size: 300 * K
            })
        );
        let empty = [5 * K..5 * K];
        assert!(Layout::plan(300 * K, 64 * K as u32, &shape(&empty)).is_err());
        assert_eq!(
            Layout::fixed(300 * K, 5000),
            Err(LayoutError::BadChunkSize(5000))
        );
    }

    #[test]
    fn unaligned_and_outside_cuts_are_ignored_or_rounded() {
        let files = [0..5000, 5000..64 * K, 64 * K..1 << 40];
        let shape = Shape {
            file_data: &files,
            ..Shape::default()
        };
        let l = Layout::plan(64 * K, 64 * K as u32, &shape).unwrap();
        // 5000 rounds down to 4096, which is below the merge size: one chunk.
        assert_eq!(ranges(&l), vec![0..64 * K]);
    }

    #[test]
    fn superblock_then_profile_then_metadata() {
        // Files at 16..48 KiB and 64..200 KiB; metadata around them.
        let files = [16 * K..48 * K, 64 * K..200 * K];
        let metadata = [0..16 * K, 48 * K..64 * K, 200 * K..256 * K];
        let profile = [100 * K..101 * K];
        let shape = Shape {
            file_data: &files,
            metadata: &metadata,
            profile: &profile,
            narrow: None,
        };
        let l = Layout::plan(256 * K, 64 * K as u32, &shape).unwrap();
        let order: Vec<Range<u64>> = l.order().iter().map(|&c| l.image_range(c)).collect();
        assert_eq!(order[0], 0..16 * K, "the superblock's chunk first");
        assert_eq!(order[1], 100 * K..104 * K, "then the profile");
        assert_eq!(
            order[2..4],
            [48 * K..64 * K, 200 * K..256 * K],
            "then the metadata, exactly, never merged with file data"
        );
        assert_eq!(l.prefetch_count(), 4);
        assert_eq!(l.narrow_count(), 4, "a profile without a mark: all narrow");
    }

    #[test]
    fn the_wide_reads_follow_the_metadata() {
        let files = [16 * K..48 * K, 64 * K..200 * K];
        let metadata = [0..16 * K, 48 * K..64 * K, 200 * K..256 * K];
        // Read with narrow readahead: 100 KiB; with more, 120 KiB and the
        // 100 KiB block again (already placed).
        let profile = [100 * K..101 * K, 120 * K..122 * K, 100 * K..104 * K];
        let shape = Shape {
            file_data: &files,
            metadata: &metadata,
            profile: &profile,
            narrow: Some(1),
        };
        let l = Layout::plan(256 * K, 64 * K as u32, &shape).unwrap();
        let order: Vec<Range<u64>> = l.order().iter().map(|&c| l.image_range(c)).collect();
        assert_eq!(
            order[..5],
            [
                0..16 * K,
                100 * K..104 * K,
                48 * K..64 * K,
                200 * K..256 * K,
                120 * K..124 * K
            ],
            "superblock, narrow reads, metadata, then the other reads"
        );
        assert_eq!((l.narrow_count(), l.prefetch_count()), (4, 5));
        let none_narrow = Shape {
            narrow: Some(0),
            ..shape
        };
        let l = Layout::plan(256 * K, 64 * K as u32, &none_narrow).unwrap();
        assert_eq!((l.narrow_count(), l.prefetch_count()), (3, 5));
    }
}
