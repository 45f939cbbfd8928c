//! The offset between this machine's clock and the S3 store's, measured from the `Date`
//! header of every answer, so that replicas stamp items and flush epochs in one time.
//!
//! An answer dated `D` (whole seconds) was made between `D` and `D + 1 s` on the store's
//! clock, and between sending at `t0` and receiving at `t1` on ours; so the offset lies in
//! `[D - t1, D + 1 s - t0]`. Intersecting these intervals over a window of answers narrows
//! it below a second once answers fall either side of a second's boundary. The correction
//! used is the smallest the interval allows: none while the local clock is consistent with
//! the store's (a clock kept by NTP is more precise than a `Date` header, and replicas on
//! such clocks then agree as closely as their clocks do), else the nearer end of the
//! interval. What remains for a wrong clock is within the interval's width: at most 1 s plus
//! a round trip after the first answer, less once answers straddle a second's boundary.

use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_s3::config::interceptors::{
    BeforeDeserializationInterceptorContextRef, BeforeTransmitInterceptorContextRef,
};
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::primitives::{DateTime, DateTimeFormat};
use aws_smithy_types::config_bag::{Storable, StoreReplace};
use tokio::time::Instant;

use crate::clock::StoreTime;

/// Answers older than this no longer narrow the estimate (clocks drift; one may be reset).
const WINDOW: Duration = Duration::from_secs(600);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// When a request was sent, local Unix microseconds (kept in the request's config bag).
#[derive(Debug, Clone)]
struct SentAt(i64);

impl Storable for SentAt {
    type Storer = StoreReplace<Self>;
}

/// The interval the offset lies in, from the answers since `since`.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    lo_us: i64,
    hi_us: i64,
    since: Instant,
}

/// An SDK interceptor that reads the `Date` of every answer into a [`StoreTime`].
#[derive(Debug)]
pub(super) struct DateProbe {
    time: &'static StoreTime,
    bounds: Mutex<Option<Bounds>>,
}

impl DateProbe {
    pub fn new(time: &'static StoreTime) -> Self {
        DateProbe {
            time,
            bounds: Mutex::new(None),
        }
    }

    /// Takes one answer dated `date_secs`, sent and received at these local times.
    fn sample(&self, date_secs: i64, sent_us: i64, received_us: i64) {
        let lo_us = date_secs * 1_000_000 - received_us;
        let hi_us = (date_secs + 1) * 1_000_000 - sent_us;
        let mut bounds = self.bounds.lock().expect("skew lock");
        let fresh = Bounds {
            lo_us,
            hi_us,
            since: Instant::now(),
        };
        let next = match *bounds {
            Some(b) if b.since.elapsed() < WINDOW => {
                let merged = Bounds {
                    lo_us: b.lo_us.max(lo_us),
                    hi_us: b.hi_us.min(hi_us),
                    since: b.since,
                };
                // Disjoint: a clock was stepped; start again from this answer.
                if merged.lo_us <= merged.hi_us {
                    merged
                } else {
                    fresh
                }
            }
            Some(_) => fresh,
            None => {
                tracing::info!(
                    offset_ms = 0.clamp(lo_us, hi_us) / 1000,
                    interval_ms = (hi_us - lo_us) / 1000,
                    "clock offset to the S3 store measured; items and flush epochs use the store's time"
                );
                fresh
            }
        };
        *bounds = Some(next);
        self.time.set_offset_us(0.clamp(next.lo_us, next.hi_us));
    }
}

impl Intercept for DateProbe {
    fn name(&self) -> &'static str {
        "s3cached-date-probe"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state()
            .store_put(SentAt(self.time.local_us()));
        Ok(())
    }

    fn read_after_transmit(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let received_us = self.time.local_us();
        let Some(SentAt(sent_us)) = cfg.load::<SentAt>().cloned() else {
            return Ok(());
        };
        let date = context.response().headers().get("date");
        if let Some(date) = date.and_then(|d| DateTime::from_str(d, DateTimeFormat::HttpDate).ok())
        {
            self.sample(date.secs(), sent_us, received_us);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_either_side_of_a_second_narrow_the_offset() {
        let time = StoreTime::leak(0);
        let probe = DateProbe::new(time);
        // The store is 2.3 s ahead; round trips of 10 ms.
        let true_offset = 2_300_000;
        let mut uncertainty = i64::MAX;
        for i in 0..20 {
            let sent = 1_700_000_000_000_000 + i * 137_000;
            let received = sent + 10_000;
            let made: i64 = sent + 5_000 + true_offset;
            probe.sample(made.div_euclid(1_000_000), sent, received);
            let b = probe.bounds.lock().unwrap().unwrap();
            assert!(b.lo_us <= true_offset && true_offset <= b.hi_us);
            uncertainty = (b.hi_us - b.lo_us) / 2;
        }
        assert!(uncertainty < 100_000, "still ±{uncertainty} µs");
        assert!((time.offset_us() - true_offset).abs() <= 2 * uncertainty);
    }

    #[test]
    fn a_clock_consistent_with_the_store_is_left_alone() {
        let time = StoreTime::leak(0);
        let probe = DateProbe::new(time);
        // The store is 0.2 s ahead: within what whole-second dates can tell.
        probe.sample(1_699_999_999, 1_699_999_999_700_000, 1_699_999_999_710_000);
        assert_eq!(time.offset_us(), 0);
    }
}
