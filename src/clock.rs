//! Wall-clock time for expiry and flush, swappable for tokio's paused clock in tests.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest relative expiration time (30 days); larger values are absolute Unix times.
pub const MAX_RELATIVE_EXPTIME_SECS: i64 = 60 * 60 * 24 * 30;

/// Where "now" comes from.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system's wall clock.
    System,
    /// A fixed Unix time plus tokio's elapsed time: follows `tokio::time::pause`/`advance`.
    Tokio {
        base_us: u64,
        start: tokio::time::Instant,
    },
    /// The system clock moved to the store's time (see [`StoreTime`]), so that replicas with
    /// skewed clocks stamp items and flush epochs alike.
    Store(&'static StoreTime),
}

/// This machine's clock corrected toward a shared reference, the S3 store's clock, as the
/// store measures it from its answers' `Date` headers. One per server, for the process's life.
#[derive(Debug, Default)]
pub struct StoreTime {
    /// Testing only (`clock_offset_ms`): an error added to the system clock, to play a
    /// replica whose clock is wrong.
    skew_us: i64,
    /// Measured: what to add to the local clock to read the store's.
    offset_us: AtomicI64,
    /// The last time handed out: store time never goes back, even when a better
    /// measurement lowers the offset, so a `set` after a `flush_all` is always after it.
    last_us: AtomicU64,
}

impl StoreTime {
    /// A store time for a server whose local clock is off by `skew_ms` (0 in production).
    /// Leaked: it lives as long as the process, one per server started.
    pub fn leak(skew_ms: i64) -> &'static StoreTime {
        Box::leak(Box::new(StoreTime {
            skew_us: skew_ms.saturating_mul(1000),
            offset_us: AtomicI64::new(0),
            last_us: AtomicU64::new(0),
        }))
    }

    /// The local clock (with any testing skew), in Unix microseconds.
    pub fn local_us(&self) -> i64 {
        system_now_us() as i64 + self.skew_us
    }

    /// The measured offset from the local clock to the store's, in microseconds.
    pub fn offset_us(&self) -> i64 {
        self.offset_us.load(Relaxed)
    }

    pub fn set_offset_us(&self, offset_us: i64) {
        self.offset_us.store(offset_us, Relaxed);
    }

    /// The store's time now, in Unix microseconds: strictly increasing from call to call
    /// (when the offset drops, it advances by a microsecond a call until it catches up).
    pub fn now_us(&self) -> u64 {
        let now = (self.local_us() + self.offset_us()).max(0) as u64;
        let after = |last: u64| now.max(last + 1);
        let last = self
            .last_us
            .fetch_update(Relaxed, Relaxed, |last| Some(after(last)))
            .unwrap_or_else(|last| last);
        after(last)
    }
}

impl Clock {
    /// A clock that starts at the current wall time and then advances with tokio's clock.
    pub fn tokio() -> Self {
        Clock::Tokio {
            base_us: system_now_us(),
            start: tokio::time::Instant::now(),
        }
    }

    /// Now, in Unix microseconds.
    pub fn now_us(&self) -> u64 {
        match self {
            Clock::System => system_now_us(),
            Clock::Tokio { base_us, start } => base_us + start.elapsed().as_micros() as u64,
            Clock::Store(time) => time.now_us(),
        }
    }

    /// Now, in Unix seconds.
    pub fn now_secs(&self) -> u64 {
        self.now_us() / 1_000_000
    }

    /// memcached's reading of an exptime: 0 never, negative already expired, up to 30 days
    /// relative, beyond that an absolute Unix time. Returns an absolute expiry (0 = never);
    /// every moment already past is 1, as memcached's `realtime` makes it, so two past
    /// moments compare equal (meta `R` against an expired item wins nothing).
    pub fn expires_at(&self, exptime: i64) -> u64 {
        match exptime {
            0 => 0,
            e if e < 0 => 1,
            e if e <= MAX_RELATIVE_EXPTIME_SECS => self.now_secs() + e as u64,
            e if e as u64 <= self.now_secs() => 1,
            e => e as u64,
        }
    }
}

fn system_now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let clock = Clock::tokio();
        let t0 = clock.now_secs();
        tokio::time::advance(std::time::Duration::from_secs(100)).await;
        assert_eq!(clock.now_secs(), t0 + 100);
    }

    #[test]
    fn store_time_adds_the_measured_offset_to_the_skewed_clock() {
        let time = StoreTime::leak(-30_000);
        let clock = Clock::Store(time);
        let system = Clock::System.now_us() as i64;
        assert!((clock.now_us() as i64 - (system - 30_000_000)).abs() < 1_000_000);
        time.set_offset_us(30_000_000);
        assert!((clock.now_us() as i64 - system).abs() < 1_000_000);
        // A lower measurement never takes time back.
        let before = clock.now_us();
        time.set_offset_us(29_000_000);
        assert!(clock.now_us() > before);
    }

    #[test]
    fn exptime_rules() {
        let clock = Clock::System;
        let now = clock.now_secs();
        assert_eq!(clock.expires_at(0), 0);
        assert_eq!(clock.expires_at(-1), 1);
        let rel = clock.expires_at(10);
        assert!(rel >= now + 10 && rel <= now + 11);
        assert_eq!(
            clock.expires_at(MAX_RELATIVE_EXPTIME_SECS + 1),
            1,
            "past: 1"
        );
        assert_eq!(clock.expires_at(i64::from(i32::MAX)), i32::MAX as u64);
    }
}
