//! Wall-clock time for expiry and flush, swappable for tokio's paused clock in tests.

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
