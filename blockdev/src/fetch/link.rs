//! How much a fetch should take along after the chunks it needs, from what
//! the link moves in a round trip (its bandwidth-delay product).
//!
//! A missed chunk costs a round trip (the time to the first byte) plus its
//! transfer. The chunks stored right after it in the blob (the same file's
//! next blocks, the same directory's next files, or the profile's next
//! reads) cost only transfer time when taken along. Two sizes follow:
//!
//! - **The demand window** ([`LinkEstimate::window`]), what a reader's miss
//!   takes along: twice the product. What is stored after a miss is often
//!   read later in the start, not only next, and each such chunk saves a
//!   later round trip of its own. Measured on the python and large
//!   benchmark images' startup traces (hack/bench-coldstart.sh; each
//!   replayed against its chunk table for windows of 32 KiB to 4 MiB), the
//!   start's wait for the link (requests times round trip plus bytes over
//!   rate) was least between one and four times the product at both
//!   100 Mbit/s and 1 Gbit/s: at 1 Gbit/s with a 3.5 ms registry, python
//!   sent 40-56 requests at 512 KiB-1 MiB against 111 at 128 KiB, large
//!   62-78 against 162, for 5-21 MB more (docs/benchmarks.md).
//! - **Worth along** ([`LinkEstimate::worth_along`]), for what is paid
//!   whether or not it is read, and in a reader's own wait: the readahead of
//!   lazy devices (every read waits for all of it) and the gaps a trace
//!   replay fills. Half the product: the extra transfer is worth it while
//!   it is shorter than the round trip it may save, weighted by one in two.
//!
//! On a fast link with a slow registry both grow, on a slow link they
//! shrink, so bytes are spent where round trips, not bytes, are what a
//! container waits for.
//!
//! The round trip is the median time to the first byte of recent requests
//! sent while no other was in flight. Not of all requests: while our own
//! fetches fill the link, answers wait in its queue (a shaped 100 Mbit/s
//! link queues for up to 100 ms; a window still streaming in is such a
//! queue), and that wait is no reason to fetch more: counting it would grow
//! the window that caused it. The median, because a registry's time to
//! answer a range varies several-fold from one request to the next (1 to 8
//! ms for Debian's docker-registry on loopback), and a miss costs the
//! typical one. The throughput is a low quantile of recent transfers: a
//! shaped link lets a short answer through at line rate out of its token
//! bucket (the benchmark's `tc tbf` has a 1 MB burst), which says nothing
//! about what a container's start of many megabytes gets; the quantile
//! follows the sustained rate and ignores those bursts. The estimate is
//! node-wide (every layer shares the link); until the first samples arrive
//! there is no window.
//!
//! **What the link sustains** ([`LinkEstimate::sustained_rate`]) is asked
//! apart: whether a layer's startup stream should also take what only a
//! fast node reads (`read_ahead`). An answer's own sample comes at its
//! end, and a startup stream of megabytes on a slow link ends after the
//! container opened its files. So long answers are also sampled in pieces
//! of 256 KiB as they stream in, and the sustained rate is a low quantile
//! of those, once there are eight (2 MiB): the first megabyte of an answer
//! may come out of a shaper's token bucket at line rate. Kept out of the
//! windows and the other readahead, which follow answers as before: a few
//! pieces from the start of a stream, out of such a bucket, would move them
//! at the moment its container opens files.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

/// Transfers whose throughput the estimate is a low quantile of.
const RATE_SAMPLES: usize = 16;
/// Requests whose time to the first byte the round trip is the median of.
const RTT_SAMPLES: usize = 16;
/// Transfers shorter than this say little about throughput.
const MIN_SAMPLE_BYTES: u64 = 32 << 10;
/// A long answer is sampled every this many bytes as it streams in
/// ([`LinkEstimate::sample_piece`]).
pub(super) const PIECE_BYTES: u64 = 256 << 10;
/// Pieces whose throughput the sustained rate is a low quantile of.
const PIECE_SAMPLES: usize = 16;
/// Pieces before there is a sustained rate.
const MIN_PIECES: usize = 8;

#[derive(Debug, Default)]
pub struct LinkEstimate {
    state: Mutex<State>,
    /// Requests in flight on the node.
    active: AtomicUsize,
    /// Woken after samples (one waiter: what follows the estimate).
    sampled: Notify,
}

/// A request in flight; [`LinkEstimate::sample`] takes it back.
pub struct InFlight<'a> {
    link: &'a LinkEstimate,
    /// No other request was in flight when this one was sent.
    alone: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.link.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Default)]
struct State {
    /// Seconds from sending a request to its first body byte, latest last.
    ttfb: VecDeque<f64>,
    /// Bytes per second while a body streamed, latest last.
    rates: VecDeque<f64>,
    /// Bytes per second of pieces of long answers, latest last.
    pieces: VecDeque<f64>,
}

impl LinkEstimate {
    /// Marks a request as sent, until the guard is dropped.
    pub fn send(&self) -> InFlight<'_> {
        let before = self.active.fetch_add(1, Ordering::AcqRel);
        InFlight {
            link: self,
            alone: before == 0,
        }
    }

    /// The request `sent` finished: time to its first byte, then `bytes`
    /// over `transfer` until its last.
    pub fn sample(&self, sent: InFlight<'_>, ttfb: Duration, bytes: u64, transfer: Duration) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if sent.alone {
            push_latest(&mut s.ttfb, ttfb.as_secs_f64(), RTT_SAMPLES);
        }
        if bytes >= MIN_SAMPLE_BYTES && !transfer.is_zero() {
            let rate = bytes as f64 / transfer.as_secs_f64();
            push_latest(&mut s.rates, rate, RATE_SAMPLES);
        }
        drop(s);
        self.sampled.notify_one();
    }

    /// A piece of a long answer still streaming in: `bytes` over
    /// `transfer` (see the module docs).
    pub fn sample_piece(&self, bytes: u64, transfer: Duration) {
        if transfer.is_zero() {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let rate = bytes as f64 / transfer.as_secs_f64();
        push_latest(&mut s.pieces, rate, PIECE_SAMPLES);
        drop(s);
        self.sampled.notify_one();
    }

    /// Returns after the next sample (or at once if one came since the
    /// last call).
    pub async fn sampled(&self) {
        self.sampled.notified().await;
    }

    /// Bytes a demand fetch should add after the missed chunks, at most
    /// `max`: what the link moves in two round trips (see the module docs).
    pub fn window(&self, max: u64) -> u64 {
        self.bandwidth_delay()
            .map_or(0, |bdp| ((bdp * 2.0) as u64).min(max))
    }

    /// Bytes worth fetching along with a request to save another one when
    /// they are paid for whether read or not, at most `max`: what the link
    /// moves in half a round trip (see the module docs). The longest gap
    /// between two ranges a trace replay fills, and the readahead of lazy
    /// devices. `None` until the first samples.
    pub fn worth_along(&self, max: u64) -> Option<u64> {
        let bdp = self.bandwidth_delay()?;
        Some(((bdp / 2.0) as u64).min(max))
    }

    /// Bytes per second the link sustains under a long answer (see the
    /// module docs); `None` until enough of it streamed.
    pub fn sustained_rate(&self) -> Option<f64> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.pieces.len() < MIN_PIECES {
            return None;
        }
        quantile(&s.pieces, 4)
    }

    /// Bytes the link moves in one round trip.
    fn bandwidth_delay(&self) -> Option<f64> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let rtt = median(&s.ttfb)?;
        let rate = quantile(&s.rates, 4)?;
        Some(rate * rtt)
    }
}

/// Appends `sample`, dropping the oldest beyond the last `keep`.
fn push_latest(samples: &mut VecDeque<f64>, sample: f64, keep: usize) {
    if samples.len() == keep {
        samples.pop_front();
    }
    samples.push_back(sample);
}

fn median(samples: &VecDeque<f64>) -> Option<f64> {
    quantile(samples, 2)
}

/// The sample `1/nth` of the way up (`n = 2`: the median).
fn quantile(samples: &VecDeque<f64>, nth: usize) -> Option<f64> {
    let mut sorted: Vec<f64> = samples.iter().copied().collect();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / nth).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both sizes, in KB: the demand window and worth along.
    fn sizes(link: &LinkEstimate) -> (u64, u64) {
        let along = link.worth_along(1 << 30).unwrap_or(0);
        (link.window(1 << 30) / 1000, along / 1000)
    }

    #[test]
    fn sizes_follow_the_bandwidth_delay_product() {
        let link = LinkEstimate::default();
        assert_eq!(link.window(1 << 20), 0, "no samples, no window");
        assert_eq!(link.worth_along(1 << 20), None);
        // 100 MB/s, 2 ms to the first byte: 200 KB in a round trip.
        link.sample(
            link.send(),
            Duration::from_millis(2),
            1_000_000,
            Duration::from_millis(10),
        );
        assert_eq!(sizes(&link), (400, 100));
        assert_eq!(link.window(4096), 4096, "capped");
        assert_eq!(link.worth_along(4096), Some(4096), "capped");
        // One slow first byte moves the median little; small transfers do
        // not move the throughput.
        let micro = Duration::from_micros(1);
        link.sample(link.send(), Duration::from_millis(2), 100, micro);
        link.sample(link.send(), Duration::from_millis(80), 100, micro);
        assert_eq!(sizes(&link), (400, 100));
        // A request sent behind another says nothing about the round trip.
        let first = link.send();
        link.sample(link.send(), micro, 100, micro);
        drop(first);
        assert_eq!(sizes(&link), (400, 100));
        // Once the fast samples are old, the sizes follow the new ones.
        for _ in 0..RTT_SAMPLES {
            link.sample(link.send(), Duration::from_millis(4), 100, micro);
        }
        assert_eq!(sizes(&link), (800, 200));
    }

    #[test]
    fn answers_out_of_a_token_bucket_do_not_inflate_the_rate() {
        let link = LinkEstimate::default();
        let ms = Duration::from_millis;
        // A shaped 100 Mbit/s link: most transfers at 12.5 MB/s, a few
        // short ones at line rate out of the bucket.
        for i in 0..RATE_SAMPLES {
            let transfer = if i % 4 == 0 { ms(1) } else { ms(40) };
            link.sample(link.send(), ms(2), 500_000, transfer);
        }
        // 12.5 MB/s, 2 ms: 25 KB in a round trip.
        assert_eq!(sizes(&link), (50, 12));
    }

    #[test]
    fn a_long_answer_says_what_the_link_sustains_before_it_ends() {
        let link = LinkEstimate::default();
        let ms = Duration::from_millis;
        let mb_s = |link: &LinkEstimate| link.sustained_rate().map(|r| (r / 1e6) as u64);
        // A startup stream at 100 Mbit/s whose first megabyte came out of
        // the shaper's bucket at line rate (1 GB/s).
        for _ in 0..4 {
            link.sample_piece(PIECE_BYTES, Duration::from_micros(262));
        }
        assert_eq!(mb_s(&link), None, "too little streamed to say");
        for _ in 0..3 {
            link.sample_piece(PIECE_BYTES, ms(21));
        }
        assert_eq!(mb_s(&link), None);
        link.sample_piece(PIECE_BYTES, ms(21));
        assert_eq!(mb_s(&link), Some(12), "the bucket is left out");
        // Pieces move neither the windows nor worth along.
        assert_eq!(link.worth_along(1 << 30), None);
        link.sample(link.send(), ms(2), 1 << 20, ms(1));
        assert_eq!(sizes(&link), (4194, 1048), "1 GB/s from the whole answer");
    }
}
