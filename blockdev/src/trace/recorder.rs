//! Recording what a layer's reads touch, in whole blocks, first read first.
//!
//! Every read of the layer is recorded while a recording runs, hits as well
//! as misses: a profile is what the container read, not what happened to be
//! missing. When no recording runs a read costs one relaxed atomic load.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::MAX_TRACE_RANGES;
use crate::format::BLOCK_SIZE;

#[derive(Debug, Default)]
pub struct Recorder {
    on: AtomicBool,
    state: Mutex<Option<Recording>>,
}

#[derive(Debug)]
struct Recording {
    blocks: u64,
    /// One bit per image block: read already.
    seen: Vec<u64>,
    /// In first-read order; adjacent blocks read one after another merge.
    ranges: Vec<Range<u64>>,
}

impl Recorder {
    /// Starts (or restarts, empty) a recording of an image of `image_size` bytes.
    pub fn start(&self, image_size: u64) {
        let blocks = image_size.div_ceil(BLOCK_SIZE);
        let recording = Recording {
            blocks,
            seen: vec![0; blocks.div_ceil(64) as usize],
            ranges: Vec::new(),
        };
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(recording);
        self.on.store(true, Ordering::Release);
    }

    /// Ends the recording: the image byte ranges read, first read first
    /// (empty if none ran).
    pub fn stop(&self) -> Vec<Range<u64>> {
        self.on.store(false, Ordering::Release);
        let taken = self.state.lock().unwrap_or_else(|e| e.into_inner()).take();
        taken.map_or_else(Vec::new, |r| {
            r.ranges
                .into_iter()
                .map(|r| r.start * BLOCK_SIZE..r.end * BLOCK_SIZE)
                .collect()
        })
    }

    /// Records a read of image bytes `[offset, offset+len)`; returns how
    /// many ranges it started.
    pub fn read(&self, offset: u64, len: u64) -> u64 {
        if !self.on.load(Ordering::Relaxed) || len == 0 {
            return 0;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(rec) = state.as_mut() else { return 0 };
        let before = rec.ranges.len();
        let first = offset / BLOCK_SIZE;
        let end = offset
            .saturating_add(len)
            .div_ceil(BLOCK_SIZE)
            .min(rec.blocks);
        for block in first..end {
            let (word, bit) = ((block / 64) as usize, 1u64 << (block % 64));
            let w = &mut rec.seen[word];
            if *w & bit != 0 {
                continue;
            }
            *w |= bit;
            let full = rec.ranges.len() >= MAX_TRACE_RANGES;
            match rec.ranges.last_mut() {
                Some(last) if last.end == block => last.end += 1,
                _ if full => break,
                _ => rec.ranges.push(block..block + 1),
            }
        }
        (rec.ranges.len() - before) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_blocks_once_in_first_read_order() {
        let r = Recorder::default();
        r.read(0, 100);
        assert!(r.stop().is_empty(), "nothing recorded while off");
        r.start(10 * BLOCK_SIZE);
        r.read(5 * BLOCK_SIZE + 10, 2 * BLOCK_SIZE);
        r.read(0, 1);
        r.read(6 * BLOCK_SIZE, BLOCK_SIZE);
        r.read(8 * BLOCK_SIZE, BLOCK_SIZE);
        r.read(9 * BLOCK_SIZE, 1 << 30);
        assert_eq!(
            r.stop(),
            [
                5 * BLOCK_SIZE..8 * BLOCK_SIZE,
                0..BLOCK_SIZE,
                8 * BLOCK_SIZE..10 * BLOCK_SIZE
            ]
        );
        r.read(0, 1);
        assert!(r.stop().is_empty());
    }
}
