//! A token bucket that caps the bytes per second of a disk transfer.
//!
//! Hand-written rather than taken from `governor` because it runs on tokio's clock: under a
//! paused test clock its arithmetic is exact, so the cap is proven without timing thresholds.
//! The bucket may go into debt: a chunk larger than the burst is sent at once and the next
//! one waits until the debt is paid, so the average rate is exact for any chunk size.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    /// Bytes per second; `None` for no limit.
    rate: Option<u64>,
    /// The most bytes that may go out at once after a pause.
    burst: u64,
    /// Bytes that may go out now; negative while in debt.
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// A limiter of `rate` bytes per second (unlimited when `None` or 0) with `burst` bytes of
    /// credit; starts full.
    pub fn new(rate: Option<u64>, burst: u64) -> RateLimiter {
        RateLimiter {
            rate: rate.filter(|r| *r > 0),
            burst,
            tokens: burst as f64,
            last: Instant::now(),
        }
    }

    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    /// How long `n` more bytes must wait; takes them from the bucket.
    pub fn take(&mut self, n: u64) -> Duration {
        let Some(rate) = self.rate else {
            return Duration::ZERO;
        };
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate as f64).min(self.burst as f64);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate as f64)
        }
    }

    /// Waits until `n` more bytes may go out.
    pub async fn acquire(&mut self, n: u64) {
        let wait = self.take(n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[tokio::test(start_paused = true)]
    async fn the_average_rate_is_the_configured_one() {
        let mut limiter = RateLimiter::new(Some(MIB), 64 * 1024);
        let start = Instant::now();
        for _ in 0..64 {
            limiter.acquire(64 * 1024).await;
        }
        // 4 MiB at 1 MiB/s, the first 64 KiB free from the burst: 3.9375 s of paused time.
        // tokio's timer rounds a sleep up to the millisecond; the next refill counts the real
        // elapsed time, so the rounding does not add up over the 63 waits.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_secs_f64(3.9375), "{elapsed:?}");
        assert!(elapsed <= Duration::from_secs_f64(3.9385), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_chunk_larger_than_the_burst_goes_at_once_and_the_debt_is_paid_after() {
        let mut limiter = RateLimiter::new(Some(MIB), 1024);
        assert_eq!(limiter.take(1024), Duration::ZERO);
        assert_eq!(limiter.take(MIB), Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        // The debt is paid; nothing was saved up meanwhile beyond it.
        assert_eq!(limiter.take(MIB / 2), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_bucket_refills_only_up_to_its_burst() {
        let mut limiter = RateLimiter::new(Some(MIB), 4096);
        assert_eq!(limiter.take(4096), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(limiter.take(4096), Duration::ZERO);
        assert_eq!(limiter.take(MIB), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn no_rate_means_no_wait() {
        let mut limiter = RateLimiter::new(None, 0);
        assert_eq!(limiter.take(u64::MAX / 2), Duration::ZERO);
        let mut zero = RateLimiter::new(Some(0), 0);
        assert_eq!(zero.take(MIB), Duration::ZERO);
        assert_eq!(zero.rate(), None);
    }
}
