//! A token bucket capping the bandwidth of background fetches. The pure
//! part ([`TokenBucket`]) takes the time as an argument so it is tested
//! without clocks; [`RateLimiter`] sleeps on the tokio clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// `rate` bytes per second with a burst of one second's worth (at least one
/// request: a request larger than the burst is let through once the bucket
/// is full, then the debt is paid off before the next).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    /// Bytes that may be sent right now; negative while in debt.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u64, now: Instant) -> Self {
        TokenBucket {
            rate,
            tokens: rate as f64,
            last: now,
        }
    }

    /// Takes `bytes` and returns how long the caller must wait before
    /// sending them (zero if unlimited or tokens are there).
    pub fn take(&mut self, bytes: u64, now: Instant) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let rate = self.rate as f64;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        // Wait until the bucket covers the request (or is full, for
        // requests bigger than the burst), then take it.
        let need = (bytes as f64).min(rate);
        let wait = if self.tokens >= need {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((need - self.tokens) / rate)
        };
        self.tokens -= bytes as f64;
        // Time spent waiting refills what the wait was for; the debt past
        // the burst stays and delays the next request.
        self.tokens += wait.as_secs_f64() * rate;
        self.last = now + wait;
        wait
    }
}

/// Shared by every prefetch job of a node; `rate` can change at run time.
#[derive(Debug)]
pub struct RateLimiter {
    rate: AtomicU64,
    bucket: Mutex<TokenBucket>,
}

impl RateLimiter {
    /// `rate` bytes per second; 0 = unlimited.
    pub fn new(rate: u64) -> Self {
        RateLimiter {
            rate: AtomicU64::new(rate),
            bucket: Mutex::new(TokenBucket::new(rate, Instant::now())),
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Changes the limit; takes effect with the next request.
    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
        *self.bucket.lock().unwrap_or_else(|e| e.into_inner()) =
            TokenBucket::new(rate, Instant::now());
    }

    /// Waits until `bytes` may be sent; returns how long it waited.
    pub async fn acquire(&self, bytes: u64) -> Duration {
        let wait = self
            .bucket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Float seconds round-trip to within a microsecond.
    fn close(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) < Duration::from_micros(1)
    }

    #[test]
    fn unlimited_never_waits() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0, t0);
        for _ in 0..100 {
            assert_eq!(b.take(1 << 30, t0), Duration::ZERO);
        }
    }

    #[test]
    fn burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, t0);
        // A full bucket: one second's worth at once.
        assert_eq!(b.take(1000, t0), Duration::ZERO);
        // Empty now: 500 bytes need half a second.
        assert!(close(b.take(500, t0), ms(500)));
        // Asked again at the moment the previous wait ended: another 500 ms.
        assert!(close(b.take(500, t0 + ms(500)), ms(500)));
        // After a long pause the bucket is full again, but never fuller.
        assert_eq!(b.take(1000, t0 + ms(10_000)), Duration::ZERO);
        assert!(close(b.take(1, t0 + ms(10_000)), ms(1)));
    }

    #[test]
    fn requests_bigger_than_the_burst_pay_their_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, t0);
        // 3000 bytes: let through on a full bucket, 2000 bytes of debt.
        assert_eq!(b.take(3000, t0), Duration::ZERO);
        // The next byte waits for the debt and itself: 2001 ms.
        assert!(close(b.take(1, t0), ms(2001)));
    }

    #[test]
    fn long_run_average_is_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(64 << 10, t0);
        let mut now = t0;
        let mut sent = 0u64;
        for _ in 0..200 {
            now += b.take(16 << 10, now);
            sent += 16 << 10;
        }
        let secs = (now - t0).as_secs_f64();
        // All but the first second's burst was paced at the rate.
        let expected = (sent - (64 << 10)) as f64 / (64 << 10) as f64;
        assert!((secs - expected).abs() < 0.01, "{secs} vs {expected}");
    }
}
