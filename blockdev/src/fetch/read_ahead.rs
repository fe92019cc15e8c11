//! How far a node's lazy devices read ahead on this link
//! ([`LazyReadAhead`]): the device layer sets its loop devices so, and a
//! startup stream reads it to know which part of the prefetch area the
//! node's containers will read.
//!
//! Readahead turns a reader's small reads into larger ones, and starts the
//! next ones before the reader asks (the kernel's async readahead), so a
//! container's start makes fewer FUSE requests and, for what is missing,
//! fewer round trips. It also fetches blocks that are never read. Which
//! wins depends on the link, as for the demand window ([`super::link`]):
//! measured with the python and node images, 128 KiB of readahead cut the
//! start without a profile at 1 Gbit/s from 1.13 s to 0.65 s (python) and
//! 1.27 s to 0.80 s (node), and cost time at 100 Mbit/s, where the extra
//! bytes (+40%) are what the container waits for (docs/benchmarks.md). So a
//! lazy device reads ahead what the link moves in half a round trip, in
//! powers of two from 16 KiB, at most the node's `lazy_read_ahead_kb`, and
//! nothing until the link has an estimate.
//!
//! A layer whose startup profile was recorded twice (its prefetch area has
//! a narrow part, docs/format.md) is another case: what its container reads
//! at start comes with the startup stream whatever the readahead, so more
//! readahead saves no round trip, only FUSE requests, and costs the bytes
//! of the wide part. Its devices read ahead exactly what the narrow part
//! was recorded with, one page ([`NARROW_READ_AHEAD_KB`]). A node that
//! warms the page cache with the narrow part (`device::warm`) keeps it so
//! on every link: its container's reads find the pages cached, and the
//! wide part would only add bytes. One that does not reads ahead as above
//! once the link moves at least [`WIDE_RATE`] (and the stream takes the
//! wide part too), since each page is a trip through FUSE.

use super::LinkEstimate;
use crate::format::NARROW_READ_AHEAD_KB;

/// Below this the readahead is none: a request's own round trip dominates.
const MIN_KB: u32 = 16;
/// Bytes per second from which a profiled layer of a node that does not
/// warm its page cache reads ahead (and streams) as far as the link says.
/// Measured with the python, node and large images and the narrow part
/// recorded with one page, without warming: at 300 Mbit/s, as at 100, the
/// narrow part alone started all three sooner than both parts with the
/// link's readahead (node 0.62 s against 0.65 s, large 0.39 s against
/// 0.53 s), at 1 Gbit/s later (node 0.63 s against 0.35 s): each page is
/// one trip through the loop device and FUSE, which a fast link no longer
/// hides (docs/benchmarks.md). Between 300 Mbit/s and 1 Gbit/s nothing was
/// measured; this is about 320 Mbit/s.
pub const WIDE_RATE: f64 = 40e6;

/// A node's rule for the readahead of its lazy devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LazyReadAhead {
    /// The most, in KiB (0: none).
    pub max_kb: u32,
    /// Below `max_kb` as the link says; off: always `max_kb` (a recording
    /// that must not depend on the link).
    pub follows_link: bool,
    /// The node warms its layers' narrow parts into the page cache: a
    /// split layer reads ahead one page on every link.
    pub warms_narrow: bool,
}

impl Default for LazyReadAhead {
    /// A fetcher on no node's devices: its readers read ahead as far as
    /// any node's do by default.
    fn default() -> Self {
        LazyReadAhead {
            max_kb: Self::DEFAULT_MAX_KB,
            follows_link: false,
            warms_narrow: false,
        }
    }
}

impl LazyReadAhead {
    /// A node's `lazy_read_ahead_kb` unless configured.
    pub const DEFAULT_MAX_KB: u32 = 128;

    /// The readahead of a lazy device on `link` now, in KiB. `split`: its
    /// layer's prefetch area has a narrow part and more after it.
    pub fn kb(&self, link: &LinkEstimate, split: bool) -> u32 {
        if !self.follows_link {
            return self.max_kb;
        }
        let by_link = self.by_round_trip(link);
        if !split {
            return by_link;
        }
        let fast = link.sustained_rate().is_some_and(|r| r >= WIDE_RATE);
        if fast && !self.warms_narrow {
            by_link.max(NARROW_READ_AHEAD_KB).min(self.max_kb)
        } else {
            NARROW_READ_AHEAD_KB.min(self.max_kb)
        }
    }

    /// Half a round trip of the link, as the module docs say.
    fn by_round_trip(&self, link: &LinkEstimate) -> u32 {
        let worth = link.worth_along(u64::from(self.max_kb) << 10).unwrap_or(0) >> 10;
        let kb = u32::try_from(worth).unwrap_or(self.max_kb).min(self.max_kb);
        if kb < MIN_KB {
            return 0;
        }
        // The nearest power of two: the estimate moves with every answer, the
        // devices' setting only when it about halves or doubles.
        let lower = 1 << kb.ilog2();
        let nearest = if kb - lower >= lower * 2 - kb {
            lower * 2
        } else {
            lower
        };
        nearest.min(self.max_kb)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn link(rate_bytes_per_sec: u64, rtt: Duration) -> LinkEstimate {
        let link = LinkEstimate::default();
        let bytes = rate_bytes_per_sec / 10;
        link.sample(link.send(), rtt, bytes, Duration::from_millis(100));
        for _ in 0..8 {
            link.sample_piece(bytes, Duration::from_millis(100));
        }
        link
    }

    fn rule(max_kb: u32) -> LazyReadAhead {
        LazyReadAhead {
            max_kb,
            follows_link: true,
            warms_narrow: false,
        }
    }

    #[test]
    fn the_readahead_is_half_a_round_trip_of_the_link_in_powers_of_two() {
        let kb = |max_kb, link: &LinkEstimate| rule(max_kb).kb(link, false);
        let unknown = LinkEstimate::default();
        assert_eq!(kb(128, &unknown), 0, "no estimate, none");
        let ms = Duration::from_millis;
        // 1 Gbit/s, 2 ms: 125 KB worth along -> 128 KiB.
        assert_eq!(kb(128, &link(125_000_000, ms(2))), 128);
        // 1 Gbit/s, 1 ms: 62.5 KB -> 64 KiB.
        assert_eq!(kb(128, &link(125_000_000, ms(1))), 64);
        // 1 Gbit/s, 4 ms: 250 KB, capped at 128 KiB.
        assert_eq!(kb(128, &link(125_000_000, ms(4))), 128);
        // 100 Mbit/s, 2 ms: 12.5 KB: none.
        assert_eq!(kb(128, &link(12_500_000, ms(2))), 0);
        // 100 Mbit/s, 8 ms: 50 KB -> 64 KiB; 5 ms: 31 KB -> 32 KiB.
        assert_eq!(kb(128, &link(12_500_000, ms(8))), 64);
        assert_eq!(kb(128, &link(12_500_000, ms(5))), 32);
        assert_eq!(kb(0, &link(125_000_000, ms(4))), 0, "off");
        let fixed = LazyReadAhead {
            max_kb: 16,
            follows_link: false,
            warms_narrow: false,
        };
        assert_eq!(fixed.kb(&unknown, true), 16, "not following the link");
    }

    #[test]
    fn a_split_layer_reads_ahead_as_recorded_unless_the_link_is_fast() {
        let kb = |max_kb, link: &LinkEstimate| rule(max_kb).kb(link, true);
        let ms = Duration::from_millis;
        let narrow = NARROW_READ_AHEAD_KB;
        assert_eq!(kb(128, &LinkEstimate::default()), narrow, "no estimate");
        let answers_only = LinkEstimate::default();
        answers_only.sample(answers_only.send(), ms(2), 1 << 20, ms(1));
        assert_eq!(kb(128, &answers_only), narrow, "nothing long streamed yet");
        // 100 Mbit/s: the narrow part's readahead, whatever the round trip.
        assert_eq!(kb(128, &link(12_500_000, ms(8))), narrow);
        assert_eq!(kb(128, &link(12_500_000, ms(1))), narrow);
        // 1 Gbit/s: as the link says, at least the narrow part's.
        assert_eq!(kb(128, &link(125_000_000, ms(2))), 128);
        assert_eq!(
            kb(128, &link(125_000_000, Duration::from_micros(100))),
            narrow
        );
        // Never past the node's most.
        assert_eq!(kb(64, &link(125_000_000, ms(2))), 64);
        assert_eq!(kb(0, &link(12_500_000, ms(8))), 0);
        assert_eq!(kb(0, &link(125_000_000, ms(2))), 0);
    }

    #[test]
    fn a_split_layer_of_a_warming_node_reads_ahead_one_page_on_every_link() {
        let warming = LazyReadAhead {
            warms_narrow: true,
            ..rule(128)
        };
        let ms = Duration::from_millis;
        let narrow = NARROW_READ_AHEAD_KB;
        assert_eq!(warming.kb(&link(12_500_000, ms(8)), true), narrow);
        assert_eq!(warming.kb(&link(125_000_000, ms(2)), true), narrow);
        assert_eq!(warming.kb(&link(1_250_000_000, ms(2)), true), narrow);
        // Other layers follow the link as ever.
        assert_eq!(warming.kb(&link(125_000_000, ms(2)), false), 128);
    }
}
