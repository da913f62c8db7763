//! Jittered, capped exponential backoff: the one retry schedule of the host and the plugins.
//!
//! The base wait doubles from `first` up to `max`; each wait handed out is the base moved by
//! up to a quarter either way, so Embassy hosts that lost one etcd, Consul or Docker engine
//! together do not retry against it in step.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// Makes two schedules created in the same nanosecond differ.
static SCHEDULES: AtomicU64 = AtomicU64::new(0);

/// A retry schedule; `next_wait` after each failure, `reset` after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    base: Duration,
    /// splitmix64 state; seeded per schedule so two watches of one host differ too.
    state: u64,
}

impl Backoff {
    /// Waits from `first` doubling up to `max` (a `max` below `first` is taken as `first`).
    pub fn new(first: Duration, max: Duration) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let sequence = SCHEDULES.fetch_add(1, Ordering::Relaxed);
        Backoff {
            first,
            max: max.max(first),
            base: first,
            state: nanos ^ sequence.wrapping_mul(0x2545_f491_4f6c_dd1d),
        }
    }

    /// The wait before the next attempt; the base doubles for the one after.
    pub fn next_wait(&mut self) -> Duration {
        let wait = jittered(self.base, (self.random() >> 32) as u32);
        self.base = (self.base * 2).min(self.max);
        wait
    }

    /// Back to `first`, after an attempt that worked.
    pub fn reset(&mut self) {
        self.base = self.first;
    }

    /// The base wait `next_wait` will jitter (for logs and tests).
    pub fn base(&self) -> Duration {
        self.base
    }

    fn random(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `wait` moved by up to a quarter either way; `entropy` (uniform over u32) picks where.
pub fn jittered(wait: Duration, entropy: u32) -> Duration {
    let quarter = wait / 4;
    let span = quarter.as_nanos() * 2;
    let offset = span * u128::from(entropy) / (u128::from(u32::MAX) + 1);
    // offset < span <= wait / 2, so it fits wherever `wait` does; saturate rather than wrap.
    (wait - quarter).saturating_add(Duration::from_nanos(
        u64::try_from(offset).unwrap_or(u64::MAX),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `jittered(wait_ms, entropy)` in milliseconds.
    fn check(wait_ms: u64, entropy: u32, expected: Duration) {
        assert_eq!(
            jittered(Duration::from_millis(wait_ms), entropy),
            expected,
            "{wait_ms} ms, {entropy}"
        );
    }

    #[test]
    fn jitter_spreads_a_quarter_either_way() {
        let ms = Duration::from_millis;
        check(500, 0, ms(375));
        check(500, u32::MAX / 2 + 1, ms(500));
        check(100, 0, ms(75));
        check(0, u32::MAX, ms(0));
        let most = jittered(ms(500), u32::MAX);
        assert!(most < ms(625) && most > ms(624), "{most:?}");
        let huge = jittered(Duration::MAX, u32::MAX);
        assert!(huge > Duration::MAX / 2, "{huge:?}");
    }

    #[test]
    fn waits_double_to_the_cap_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let mut bases = Vec::new();
        for _ in 0..6 {
            bases.push(backoff.base().as_millis());
            let base = backoff.base();
            let wait = backoff.next_wait();
            assert!(
                wait >= base - base / 4 && wait < base + base / 4,
                "{wait:?}"
            );
        }
        assert_eq!(bases, [100, 200, 400, 500, 500, 500]);
        backoff.reset();
        assert_eq!(backoff.base(), Duration::from_millis(100));
        let narrow = Backoff::new(Duration::from_secs(1), Duration::from_millis(1));
        assert_eq!(narrow.max, Duration::from_secs(1), "max below first");
    }

    /// Two schedules started at once do not wait in step.
    #[test]
    fn schedules_differ() {
        let mut a = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let a: Vec<Duration> = (0..8).map(|_| a.next_wait()).collect();
        let b: Vec<Duration> = (0..8).map(|_| b.next_wait()).collect();
        assert_ne!(a, b);
    }
}
