//! How much a demand fetch should take along after the chunks a reader
//! missed: what the link moves in about half the time a request takes to
//! start answering.
//!
//! A missed chunk costs a round trip (the time to the first byte) plus its
//! transfer. The chunks stored right after it in the blob (the same file's
//! next blocks, the same directory's next files, or the profile's next
//! reads) are often read next; taking them along costs only transfer time.
//! That is worth it while the extra transfer is shorter than the round trip
//! it may save, weighted by how likely the chunk is read: with one in two,
//! the window is half the bandwidth-delay product. On a fast link with a
//! slow registry it grows, on a slow link it shrinks to nothing, so bytes
//! are spent where round trips, not bytes, are what a container waits for.
//!
//! The estimate is node-wide (every layer shares the link) and smoothed;
//! until the first samples arrive there is no window.

use std::sync::Mutex;
use std::time::Duration;

/// Weight of a new sample.
const ALPHA: f64 = 0.3;
/// Transfers shorter than this say little about throughput.
const MIN_SAMPLE_BYTES: u64 = 32 << 10;

#[derive(Debug, Default)]
pub struct LinkEstimate {
    state: Mutex<State>,
}

#[derive(Debug, Default, Clone, Copy)]
struct State {
    /// Seconds from sending a request to its first body byte.
    ttfb: Option<f64>,
    /// Bytes per second while a body streams.
    throughput: Option<f64>,
}

impl LinkEstimate {
    /// One finished request: time to its first byte, then `bytes` over
    /// `transfer` until its last.
    pub fn sample(&self, ttfb: Duration, bytes: u64, transfer: Duration) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.ttfb = Some(smooth(s.ttfb, ttfb.as_secs_f64()));
        if bytes >= MIN_SAMPLE_BYTES && !transfer.is_zero() {
            let rate = bytes as f64 / transfer.as_secs_f64();
            s.throughput = Some(smooth(s.throughput, rate));
        }
    }

    /// Bytes a demand fetch should add after the missed chunks, at most `max`.
    pub fn window(&self, max: u64) -> u64 {
        let s = *self.state.lock().unwrap_or_else(|e| e.into_inner());
        match (s.ttfb, s.throughput) {
            (Some(ttfb), Some(rate)) => ((rate * ttfb / 2.0) as u64).min(max),
            _ => 0,
        }
    }
}

fn smooth(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |o| o + ALPHA * (new - o))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_half_the_bandwidth_delay_product() {
        let link = LinkEstimate::default();
        assert_eq!(link.window(1 << 20), 0, "no samples, no window");
        // 100 MB/s, 2 ms to the first byte.
        link.sample(
            Duration::from_millis(2),
            1_000_000,
            Duration::from_millis(10),
        );
        let w = link.window(1 << 20);
        assert!((99_000..=101_000).contains(&w), "{w}");
        assert_eq!(link.window(4096), 4096, "capped");
        // Small transfers move the latency, not the throughput.
        link.sample(Duration::from_millis(12), 100, Duration::from_micros(1));
        let w = link.window(1 << 20);
        assert!((249_000..=251_000).contains(&w), "{w}");
    }
}
