//! Hedged reads: a GET that has not answered by the time nearly every recent GET had is
//! sent again (and once more after another such delay), and the first answer wins; the
//! other requests are dropped, which closes their connections (S3 stops sending). S3's small
//! GETs have a long tail (a few percent take ten times the median), and a hedge turns that
//! tail into about two medians.
//!
//! - The delay is the 90th percentile of the last [`WINDOW`] GETs' time to answer, within
//!   `s3_hedge_min_ms..=s3_hedge_max_ms` (the upper bound until enough GETs are known).
//! - Hedges are paid from a budget: each GET earns `s3_hedge_percent` hundredths of a
//!   hedge, a hedge spends one, and at most [`BURST`] are saved, so hedges are at most that
//!   share of GETs (0 turns hedging off).
//! - Never while S3 throttles (the in-flight limit is under its cap): a second request
//!   would add to the load that slows S3 down.
//! - In a fan-out (a multi-key get's GETs, [`fanout`]), a GET is hedged once it is also
//!   among the slowest tenth still out, or the delay after half of the fan-out answered.
//! - Only reads. A write is never sent twice at once: a conditional PUT applied twice is
//!   what [`write`](super::write)'s settlement exists to avoid.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};

use crate::store::fanout::{self, Fanout};
use crate::store::StoreError;

/// GET latencies the delay is taken from.
const WINDOW: usize = 512;
/// The delay is recomputed after this many new latencies.
const RECOMPUTE_EVERY: usize = 32;
/// Latencies needed before the delay follows them (until then: the upper bound).
const MIN_SAMPLES: usize = 64;
/// Hedges saved up at most, in hundredths: a burst of slow GETs may all be hedged (a
/// 100-key get's slowest tenth, say, beyond what its own GETs earn).
const BURST: u64 = 64 * 100;
/// Most requests for one GET: the first and two hedges. With a tail of 5 % of GETs, one
/// hedge leaves 0.25 % of them slow (a 100-key get meets one a fifth of the time), two
/// leave 0.0125 %.
const MAX_ATTEMPTS: usize = 3;

/// Hedging settings, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HedgeSettings {
    /// Most hedges, as a percentage of GETs; 0 = never hedge.
    pub percent: u32,
    /// Bounds of the delay after which a GET is hedged.
    pub min: Duration,
    pub max: Duration,
}

/// Recent latencies, the delay they give, the budget, and what hedging did.
#[derive(Debug)]
pub struct Hedging {
    settings: HedgeSettings,
    recent: Mutex<Ring>,
    /// The delay now, in microseconds.
    delay_us: AtomicU64,
    /// Hedges that may be sent now, in hundredths.
    tokens: AtomicU64,
    /// Second GETs sent.
    pub sent: AtomicU64,
    /// Second GETs that answered first.
    pub won: AtomicU64,
}

#[derive(Debug)]
struct Ring {
    micros: Vec<u32>,
    next: usize,
    since_recompute: usize,
}

impl HedgeSettings {
    /// No hedging (tools that make a few requests).
    pub const OFF: HedgeSettings = HedgeSettings {
        percent: 0,
        min: Duration::ZERO,
        max: Duration::ZERO,
    };
}

impl Hedging {
    pub fn new(settings: HedgeSettings) -> Self {
        Hedging {
            settings,
            recent: Mutex::new(Ring {
                micros: Vec::with_capacity(WINDOW),
                next: 0,
                since_recompute: 0,
            }),
            delay_us: AtomicU64::new(settings.max.as_micros() as u64),
            tokens: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            won: AtomicU64::new(0),
        }
    }

    /// The delay after which a GET is hedged now.
    pub fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_us.load(Relaxed))
    }

    /// Notes how long a GET took to answer.
    pub fn record(&self, took: Duration) {
        let micros = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
        let mut ring = self.recent.lock().expect("hedge lock");
        if ring.micros.len() < WINDOW {
            ring.micros.push(micros);
        } else {
            let at = ring.next;
            ring.micros[at] = micros;
        }
        ring.next = (ring.next + 1) % WINDOW;
        ring.since_recompute += 1;
        if ring.since_recompute < RECOMPUTE_EVERY || ring.micros.len() < MIN_SAMPLES {
            return;
        }
        ring.since_recompute = 0;
        let mut sorted = ring.micros.clone();
        drop(ring);
        // The 90th percentile: below a tail of a few percent, so it stays the fast GETs'
        // time even when the tail is as thick as 5 to 10 % (the 95th would jump into it).
        let rank = (sorted.len() * 90).div_ceil(100) - 1;
        let (_, p90, _) = sorted.select_nth_unstable(rank);
        let delay = Duration::from_micros(u64::from(*p90));
        let delay = delay.clamp(self.settings.min, self.settings.max);
        self.delay_us.store(delay.as_micros() as u64, Relaxed);
    }

    /// A GET starts: it earns its share of a hedge.
    fn earn(&self) {
        let share = u64::from(self.settings.percent);
        let _ = self
            .tokens
            .fetch_update(Relaxed, Relaxed, |t| Some((t + share).min(BURST)));
    }

    /// Spends one hedge, if the budget has one.
    fn spend(&self) -> bool {
        self.tokens
            .fetch_update(Relaxed, Relaxed, |t| t.checked_sub(100))
            .is_ok()
    }

    /// Runs `attempt`, and again each time the delay passes with no answer while a hedge
    /// may be sent (`may_hedge`: S3 is not throttling us) and the budget has one, up to
    /// [`MAX_ATTEMPTS`] in all; the first success wins and the others are dropped. A failure
    /// waits for the attempts still running, if any.
    pub async fn run<T, F, Fut>(&self, may_hedge: bool, attempt: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        if self.settings.percent == 0 {
            return attempt().await;
        }
        self.earn();
        let fanout = fanout::current();
        let _answering = fanout.as_ref().map(Fanout::start);
        let numbered = |n: usize| {
            let answer = attempt();
            async move { (n, answer.await) }
        };
        let mut running = FuturesUnordered::new();
        running.push(numbered(0));
        let mut started = 1;
        let mut hedging = may_hedge;
        let mut next_hedge: Pin<Box<dyn Future<Output = ()> + Send>> =
            Box::pin(first_hedge_due(self.delay(), fanout));
        loop {
            tokio::select! {
                Some((n, answered)) = running.next() => match answered {
                    Ok(found) => {
                        if n > 0 {
                            self.won.fetch_add(1, Relaxed);
                        }
                        return Ok(found);
                    }
                    Err(e) if running.is_empty() => return Err(e),
                    Err(_) => {}
                },
                () = &mut next_hedge, if hedging => {
                    if !self.spend() {
                        hedging = false;
                        continue;
                    }
                    self.sent.fetch_add(1, Relaxed);
                    running.push(numbered(started));
                    started += 1;
                    hedging = started < MAX_ATTEMPTS;
                    next_hedge = Box::pin(tokio::time::sleep(self.delay()));
                }
            }
        }
    }
}

/// When a GET is first hedged: once `delay` has passed, and in a fan-out once it is also
/// slow next to its siblings (a fan-out's GETs also queue for the CPU, and would all pass a
/// delay taken from single GETs): among the slowest tenth still out, or `delay` after half
/// of the fan-out answered.
async fn first_hedge_due(delay: Duration, fanout: Option<Arc<Fanout>>) {
    tokio::time::sleep(delay).await;
    if let Some(fanout) = fanout {
        let most = fanout.wait_most_answered();
        let after_half = async {
            let half = fanout.wait_half_answered().await;
            tokio::time::sleep_until(half + delay).await;
        };
        tokio::select! {
            () = most => {}
            () = after_half => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hedging(percent: u32) -> Hedging {
        Hedging::new(HedgeSettings {
            percent,
            min: Duration::from_millis(5),
            max: Duration::from_millis(500),
        })
    }

    #[test]
    fn the_delay_follows_the_90th_percentile_within_its_bounds() {
        let h = hedging(5);
        let ms = Duration::from_millis;
        assert_eq!(h.delay(), ms(500), "the upper bound at first");
        // A window of latencies, then the delay they give.
        let delay_after = |took: &dyn Fn(usize) -> Duration| {
            (0..WINDOW).for_each(|i| h.record(took(i)));
            h.delay()
        };
        // 93 % at 20 ms, 7 % at 400 ms: the 90th percentile is 20 ms.
        let tail = |i| ms(if i % 15 == 0 { 400 } else { 20 });
        assert_eq!(delay_after(&tail), ms(20));
        let fast = |_| Duration::from_micros(100);
        assert_eq!(delay_after(&fast), ms(5), "never under the lower bound");
        let slow = |_| Duration::from_secs(3);
        assert_eq!(delay_after(&slow), ms(500), "never over the upper bound");
    }

    #[test]
    fn hedges_are_at_most_their_share_of_gets() {
        let h = hedging(5);
        let mut hedges = 0;
        for _ in 0..1000 {
            h.earn();
            if h.spend() {
                hedges += 1;
            }
        }
        assert_eq!(hedges, 50);
        // Saved up while GETs were fast, at most a burst's worth.
        for _ in 0..100_000 {
            h.earn();
        }
        let burst = std::iter::from_fn(|| h.spend().then_some(())).count();
        assert_eq!(burst as u64, BURST / 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_first_attempt_loses_to_the_hedge() {
        let h = hedging(100);
        let calls = std::sync::atomic::AtomicU32::new(0);
        let took = tokio::time::Instant::now();
        let answer = h
            .run(true, || {
                let n = calls.fetch_add(1, Relaxed);
                async move {
                    let wait = if n == 0 { 10_000 } else { 10 };
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    Ok::<_, StoreError>(n)
                }
            })
            .await
            .unwrap();
        assert_eq!(answer, 1, "the hedge answered");
        assert_eq!(took.elapsed(), Duration::from_millis(510));
        assert_eq!((h.sent.load(Relaxed), h.won.load(Relaxed)), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_hedge_is_hedged_once_more_and_no_more() {
        let h = hedging(100);
        for _ in 0..3 {
            h.earn();
        }
        let calls = std::sync::atomic::AtomicU32::new(0);
        let took = tokio::time::Instant::now();
        let answer = h
            .run(true, || {
                let n = calls.fetch_add(1, Relaxed);
                async move {
                    let wait = if n < 2 { 10_000 } else { 10 };
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    Ok::<_, StoreError>(n)
                }
            })
            .await
            .unwrap();
        assert_eq!(answer, 2, "the second hedge answered");
        assert_eq!(took.elapsed(), Duration::from_millis(1010));
        assert_eq!((h.sent.load(Relaxed), h.won.load(Relaxed)), (2, 1));
        // All slow: three requests at most, then the first answer.
        let calls = std::sync::atomic::AtomicU32::new(0);
        let answer = h
            .run(true, || {
                let n = calls.fetch_add(1, Relaxed);
                async move {
                    tokio::time::sleep(Duration::from_millis(10_000)).await;
                    Ok::<_, StoreError>(n)
                }
            })
            .await;
        assert_eq!(answer.unwrap(), 0);
        assert_eq!(calls.load(Relaxed), MAX_ATTEMPTS as u32);
    }

    #[tokio::test(start_paused = true)]
    async fn no_hedge_when_off_throttled_or_out_of_budget() {
        for (percent, may_hedge) in [(0, true), (100, false), (1, true)] {
            let h = hedging(percent);
            let calls = std::sync::atomic::AtomicU32::new(0);
            let answer = h
                .run(may_hedge, || {
                    calls.fetch_add(1, Relaxed);
                    async {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        Ok::<_, StoreError>(())
                    }
                })
                .await;
            assert!(answer.is_ok());
            assert_eq!(
                calls.load(Relaxed),
                1,
                "percent {percent}, may_hedge {may_hedge}"
            );
            assert_eq!(h.sent.load(Relaxed), 0);
        }
    }

    /// Ten GETs sent together, the delay 20 ms: nine answer between 25 and 33 ms (queued,
    /// not slow), the tenth would take 10 s; a hedge answers in 5 ms. How many hedges were
    /// sent (in all, by `h`), and when the last answer came.
    async fn ten_gets_at_once(h: Arc<Hedging>) -> (u64, Duration) {
        gets_at_once(h, 1).await
    }

    /// Ten GETs as [`ten_gets_at_once`], of which the last `slow` take 10 s.
    async fn gets_at_once(h: Arc<Hedging>, slow: u64) -> (u64, Duration) {
        let began = tokio::time::Instant::now();
        let gets = (0..10u64).map(|i| {
            let h = h.clone();
            async move {
                let calls = std::sync::atomic::AtomicU32::new(0);
                h.run(true, || {
                    let first = calls.fetch_add(1, Relaxed) == 0;
                    async move {
                        let wait = match (first, i) {
                            (false, _) => 5,
                            (true, i) if i >= 10 - slow => 10_000,
                            (true, i) => 25 + i,
                        };
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                        Ok::<_, StoreError>(())
                    }
                })
                .await
            }
        });
        let answers = futures::future::join_all(gets).await;
        assert!(answers.iter().all(Result::is_ok));
        (h.sent.load(Relaxed), began.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn in_a_fan_out_only_the_get_slow_next_to_its_siblings_is_hedged() {
        let settings = HedgeSettings {
            percent: 100,
            min: Duration::from_millis(20),
            max: Duration::from_millis(20),
        };
        // Alone, each GET past 20 ms is hedged: all ten.
        let (sent, _) = ten_gets_at_once(Arc::new(Hedging::new(settings))).await;
        assert_eq!(sent, 10);
        // In a fan-out: at 33 ms the nine others have answered and the slow one is hedged;
        // its hedge answers at 38 ms.
        let h = Arc::new(Hedging::new(settings));
        let (sent, took) = fanout::scope(ten_gets_at_once(h.clone())).await;
        assert_eq!(sent, 1);
        assert_eq!(took, Duration::from_millis(38));
        // Two slow of ten: neither is in the slowest tenth alone; half of the fan-out had
        // answered at 29 ms, so both are hedged at 49 ms and answer at 54 ms.
        let (sent, took) = fanout::scope(gets_at_once(h, 2)).await;
        assert_eq!(sent, 1 + 2);
        assert_eq!(took, Duration::from_millis(54));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_attempt_waits_for_the_other() {
        let h = hedging(100);
        let calls = std::sync::atomic::AtomicU32::new(0);
        let answer = h
            .run(true, || {
                let n = calls.fetch_add(1, Relaxed);
                async move {
                    if n == 0 {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        Ok(7)
                    } else {
                        Err(StoreError::Unavailable("reset".into()))
                    }
                }
            })
            .await;
        assert_eq!(answer.unwrap(), 7);
    }
}
