//! How many S3 requests a replica keeps in flight: at most `s3_max_in_flight`, halved when
//! S3 throttles (503 SlowDown, 429) and grown back by one for each limit's worth of answered
//! requests (additive increase, multiplicative decrease, as TCP does), so a burst past what
//! the bucket's prefix takes is served slower rather than refused.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use std::time::Duration;
use tokio::sync::{Semaphore, SemaphorePermit};

use tokio::time::Instant;

/// One burst of throttled answers cuts the limit once: cuts are this far apart at least.
const CUT_INTERVAL_MS: u64 = 100;

/// The in-flight limit and the slots under it.
#[derive(Debug)]
pub struct InFlight {
    slots: Semaphore,
    max: usize,
    /// The limit now, between 1 and `max`.
    limit: AtomicUsize,
    /// Slots that exist, taken or free: brought down to `limit` as slots come back, and up
    /// as it grows.
    slots_made: AtomicUsize,
    /// Answered requests since the limit last grew.
    answered: AtomicUsize,
    /// When the limit was last cut, in milliseconds since `started` (+ the interval, so the
    /// first cut is never held back).
    last_cut_ms: AtomicU64,
    started: Instant,
}

/// A slot for one request; given back when dropped, or retired if the limit went down.
pub struct Slot<'a> {
    permit: Option<SemaphorePermit<'a>>,
    owner: &'a InFlight,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            if self.owner.retire_one() {
                permit.forget();
            }
        }
    }
}

impl InFlight {
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        InFlight {
            slots: Semaphore::new(max),
            max,
            limit: AtomicUsize::new(max),
            slots_made: AtomicUsize::new(max),
            answered: AtomicUsize::new(0),
            last_cut_ms: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// A slot, or `None` if none frees up before `deadline`.
    pub async fn slot(&self, deadline: Instant) -> Option<Slot<'_>> {
        let permit = tokio::time::timeout_at(deadline, self.slots.acquire())
            .await
            .ok()?
            .ok()?;
        Some(Slot {
            permit: Some(permit),
            owner: self,
        })
    }

    /// The limit now.
    pub fn limit(&self) -> usize {
        self.limit.load(Relaxed)
    }

    /// Whether the limit is under its cap: S3 throttled us recently.
    pub fn throttling(&self) -> bool {
        self.limit() < self.max
    }

    /// S3 answered 503 SlowDown or 429: halves the limit (once per burst).
    pub fn throttled(&self) {
        let now = self.started.elapsed().as_millis() as u64 + CUT_INTERVAL_MS;
        let last = self.last_cut_ms.load(Relaxed);
        if now < last + CUT_INTERVAL_MS
            || self
                .last_cut_ms
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_err()
        {
            return;
        }
        let cut = (self.limit.load(Relaxed) / 2).max(1);
        self.limit.store(cut, Relaxed);
        self.answered.store(0, Relaxed);
        // Free slots go at once; taken ones as they come back.
        let made = self.slots_made.load(Relaxed);
        let gone = self.slots.forget_permits(made.saturating_sub(cut));
        self.slots_made.fetch_sub(gone, Relaxed);
    }

    /// S3 answered (not throttled): one more slot after a limit's worth of answers.
    pub fn answered(&self) {
        let limit = self.limit.load(Relaxed);
        if limit >= self.max || self.answered.fetch_add(1, Relaxed) + 1 < limit {
            return;
        }
        self.answered.store(0, Relaxed);
        let grown = (limit + 1).min(self.max);
        if self
            .limit
            .compare_exchange(limit, grown, Relaxed, Relaxed)
            .is_ok()
            && self.slots_made.load(Relaxed) < grown
        {
            self.slots_made.fetch_add(1, Relaxed);
            self.slots.add_permits(1);
        }
    }

    /// Whether a slot coming back is one too many for the limit (and is then retired).
    fn retire_one(&self) -> bool {
        let mut made = self.slots_made.load(Relaxed);
        loop {
            if made <= self.limit.load(Relaxed) {
                return false;
            }
            match self
                .slots_made
                .compare_exchange(made, made - 1, Relaxed, Relaxed)
            {
                Ok(_) => return true,
                Err(now) => made = now,
            }
        }
    }
}

/// First pause before sending again what S3 throttled (503 SlowDown, 429); doubles each
/// time up to [`THROTTLE_MAX_MS`], with jitter, within the operation deadline.
const THROTTLE_BASE_MS: u64 = 50;
const THROTTLE_MAX_MS: u64 = 1_000;

/// The pause after the `throttles`-th throttled answer in a row: false when the deadline
/// leaves no time to send again.
pub(super) async fn slow_down(throttles: &mut u32, deadline: Instant) -> bool {
    let ms = (THROTTLE_BASE_MS << (*throttles).min(5)).min(THROTTLE_MAX_MS);
    *throttles += 1;
    pause(ms, deadline).await;
    Instant::now() < deadline
}

/// A jittered pause of up to `ms`, never past `deadline`.
pub(super) async fn pause(ms: u64, deadline: Instant) {
    let ms = ms / 2 + rand::random::<u64>() % (ms / 2 + 1);
    let until = (Instant::now() + Duration::from_millis(ms)).min(deadline);
    tokio::time::sleep_until(until).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn later() -> Instant {
        Instant::now() + std::time::Duration::from_secs(5)
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_halves_the_limit_and_answers_grow_it_back() {
        let f = InFlight::new(8);
        let held: Vec<_> = futures::future::join_all((0..6).map(|_| f.slot(later()))).await;
        f.throttled();
        assert_eq!(f.limit(), 4);
        // A burst cuts once.
        f.throttled();
        assert_eq!(f.limit(), 4);
        // 6 slots taken, the 2 free ones went at once; 2 of the taken go as they come back.
        assert_eq!(f.slots_made.load(Relaxed), 6);
        drop(held);
        assert_eq!(
            f.slots_made.load(Relaxed),
            4,
            "slots coming back are retired"
        );
        tokio::time::advance(std::time::Duration::from_millis(CUT_INTERVAL_MS)).await;
        f.throttled();
        f.throttled();
        tokio::time::advance(std::time::Duration::from_millis(CUT_INTERVAL_MS)).await;
        f.throttled();
        assert_eq!(f.limit(), 1);
        tokio::time::advance(std::time::Duration::from_millis(CUT_INTERVAL_MS)).await;
        f.throttled();
        assert_eq!(f.limit(), 1, "never below one");
        // Additive increase: one slot per limit's worth of answers.
        f.answered();
        assert_eq!(f.limit(), 2);
        f.answered();
        assert_eq!(f.limit(), 2);
        f.answered();
        assert_eq!(f.limit(), 3);
        for _ in 0..100 {
            f.answered();
        }
        assert_eq!(f.limit(), 8, "up to the configured cap");
        let all: Vec<_> = futures::future::join_all((0..8).map(|_| f.slot(later()))).await;
        assert!(all.iter().all(Option::is_some));
        let past = Instant::now() + std::time::Duration::from_millis(10);
        assert!(f.slot(past).await.is_none(), "no ninth slot");
    }
}
