//! The global memory budget: one byte accountant shared by every connection.
//!
//! What a connection holds is charged here: its read and write buffers, and for each request
//! in flight the most its reply can take (values read from the store, then the encoded
//! reply). A request starts only once its charge is granted, so the values in flight and the
//! replies waiting to be written of all connections together stay within the limit; a
//! connection that cannot be granted stops reading and dispatching until its replies drain
//! or others release theirs. Grants are first come, first served: a large request is not
//! starved by a stream of small ones.
//!
//! A quarter of the budget is a lane for small requests (a `get` of one key, a small `set`):
//! they take it when the rest is spent, so clients with small requests are still served
//! while large ones queue (1,000 connections each waiting for a 4 MiB reply, say). A
//! connection holds one lane charge at most, and a reply it paid for keeps its charge until
//! written (moved to the main part when that has room): clients that never read cannot
//! spend the lane beyond its size, nor grow past the budget through it.
//!
//! Buffers must sometimes grow to make progress (a reply being encoded): such charges are
//! forced, and what the semaphore cannot give becomes debt, paid back from the next releases
//! before anyone else is granted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::stats::Stats;

pub mod meter;

/// Default budget: 256 MiB. Sized for a small machine (a 512 MiB container or a 1 GiB VM):
/// with the 64 MiB near tier and the runtime it leaves room for the OS. It covers the
/// default 256 S3 requests in flight each reading a maximum-size (1 MiB) item, or four
/// maximum-size (64 MiB) `get` replies at once.
pub const DEFAULT_MEMORY_LIMIT_BYTES: u64 = 256 * 1024 * 1024;
/// The smallest budget accepted: room for one maximum-size item and a few buffers.
pub const MIN_MEMORY_LIMIT_BYTES: u64 = 8 * 1024 * 1024;
/// The accounting unit: charges are rounded up to whole KiB.
pub const UNIT_BYTES: u64 = 1024;
/// One connection may hold at most this fraction (1/N) of the budget while it has replies
/// pending; past it, it stops reading and dispatching until they drain.
pub const SHARE_DIVISOR: u32 = 4;

/// The fraction (1/N) of the budget kept as the lane for small requests.
pub const SMALL_LANE_DIVISOR: u32 = 4;

/// What a request holds: its units, and whether they came from the small-request lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub units: u32,
    pub lane: bool,
}

/// The accountant. Units are KiB so a `u32` count covers 4 TiB.
#[derive(Debug)]
pub struct Budget {
    /// Everything but the lane: buffers, and requests of any size.
    permits: Arc<Semaphore>,
    /// The lane: small requests only.
    lane: Arc<Semaphore>,
    limit_units: u32,
    lane_units: u32,
    /// Units charged by force beyond what the semaphore held: paid from the next releases.
    debt_units: AtomicU64,
    /// Where `memory_used_bytes` and `memory_peak_bytes` are shown, if anywhere.
    stats: Option<Arc<Stats>>,
}

/// A pending grant of units, to be awaited.
pub type Grant = futures::future::BoxFuture<'static, OwnedSemaphorePermit>;

impl Budget {
    pub fn new(limit_bytes: u64) -> Arc<Budget> {
        Self::with_stats(limit_bytes, None)
    }

    /// A budget that keeps the `memory_used_bytes` and `memory_peak_bytes` gauges current.
    pub fn with_stats(limit_bytes: u64, stats: Option<Arc<Stats>>) -> Arc<Budget> {
        let limit_units = u32::try_from(limit_bytes.div_ceil(UNIT_BYTES))
            .unwrap_or(u32::MAX)
            .clamp(1, Semaphore::MAX_PERMITS as u32);
        if let Some(stats) = &stats {
            let limit = u64::from(limit_units) * UNIT_BYTES;
            stats.memory_limit_bytes.store(limit, Ordering::Relaxed);
        }
        let lane_units = limit_units / SMALL_LANE_DIVISOR;
        Arc::new(Budget {
            permits: Arc::new(Semaphore::new((limit_units - lane_units) as usize)),
            lane: Arc::new(Semaphore::new(lane_units as usize)),
            limit_units,
            lane_units,
            debt_units: AtomicU64::new(0),
            stats,
        })
    }

    /// Updates the gauges after a change.
    fn show(&self) {
        if let Some(stats) = &self.stats {
            let used = self.used_bytes();
            stats.memory_used_bytes.store(used, Ordering::Relaxed);
            stats.memory_peak_bytes.fetch_max(used, Ordering::Relaxed);
        }
    }

    /// `bytes` in units, rounded up.
    pub fn units(bytes: usize) -> u32 {
        u32::try_from((bytes as u64).div_ceil(UNIT_BYTES)).unwrap_or(u32::MAX)
    }

    pub fn limit_bytes(&self) -> u64 {
        u64::from(self.limit_units) * UNIT_BYTES
    }

    /// Bytes charged now, forced charges included.
    pub fn used_bytes(&self) -> u64 {
        let free = (self.permits.available_permits() + self.lane.available_permits()) as u64;
        (u64::from(self.limit_units).saturating_sub(free) + self.debt_units.load(Ordering::Relaxed))
            * UNIT_BYTES
    }

    /// Most units one connection holds while it has replies pending.
    pub fn share_units(&self) -> u32 {
        (self.limit_units / SHARE_DIVISOR).max(1)
    }

    /// The largest single grant: half the budget, so one request never needs all of it.
    pub fn clamp(&self, units: u32) -> u32 {
        units.min((self.limit_units / 2).max(1))
    }

    /// Whether a request of `units` may use the small-request lane.
    pub fn is_small(&self, units: u32) -> bool {
        units <= self.lane_units / 4
    }

    /// Takes `units` for a request if they are free now: from the main part, or for a small
    /// request (`lane`: allowed to) from the lane.
    fn try_take_request(&self, units: u32, lane: bool) -> Option<Charge> {
        if self.try_take(units) {
            return Some(Charge { units, lane: false });
        }
        if lane && self.is_small(units) && self.try_take_lane(units) {
            return Some(Charge { units, lane: true });
        }
        None
    }

    /// Takes `units` from the lane if they are free now.
    fn try_take_lane(&self, units: u32) -> bool {
        match self.lane.try_acquire_many(units) {
            Ok(permit) => {
                permit.forget();
                self.show();
                true
            }
            Err(_) => false,
        }
    }

    /// Takes `units` from the main part if they are free now.
    fn try_take(&self, units: u32) -> bool {
        if units == 0 {
            return true;
        }
        match self.permits.try_acquire_many(units) {
            Ok(permit) => {
                permit.forget();
                self.show();
                true
            }
            Err(_) => false,
        }
    }

    /// A future that takes `units` once they are free, in arrival order: from the lane for
    /// a small request allowed it (`lane`), else from the main part.
    fn grant(&self, units: u32, lane: bool) -> Grant {
        let permits = if lane && self.is_small(units) {
            self.lane.clone()
        } else {
            self.permits.clone()
        };
        Box::pin(async move {
            permits
                .acquire_many_owned(units)
                .await
                .expect("the budget's semaphore is never closed")
        })
    }

    /// Takes `units` whether or not they are free; what is missing becomes debt.
    fn force(&self, units: u32) {
        if self.try_take(units) {
            return;
        }
        let free = self.permits.available_permits().min(units as usize) as u32;
        let taken = if free > 0 && self.try_take(free) {
            free
        } else {
            0
        };
        self.debt_units
            .fetch_add(u64::from(units - taken), Ordering::Relaxed);
        self.show();
    }

    /// Gives back units of the lane.
    fn release_lane(&self, units: u32) {
        self.lane.add_permits(units as usize);
        self.show();
    }

    /// Gives back `units` of the main part: first to the debt, the rest to whoever waits.
    fn release(&self, units: u32) {
        if units == 0 {
            return;
        }
        let mut left = u64::from(units);
        let _ = self
            .debt_units
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |debt| {
                let paid = debt.min(u64::from(units));
                left = u64::from(units) - paid;
                Some(debt - paid)
            });
        if left > 0 {
            self.permits.add_permits(left as usize);
        }
        self.show();
    }
}

/// What one connection holds of the budget; everything is given back when it is dropped.
#[derive(Debug)]
pub struct Account {
    budget: Arc<Budget>,
    /// Units charged for the read and write buffers' capacity.
    buffer_units: u32,
    /// Units granted to requests in flight, from either part.
    request_units: u32,
    /// Of `request_units`, those from the lane.
    lane_units: u32,
    /// Of `buffer_units`, those from the lane: a reply a lane request paid for, not yet
    /// written, while the main part had no room to take it over.
    lane_buffer_units: u32,
}

impl Account {
    pub fn new(budget: Arc<Budget>) -> Account {
        Account {
            budget,
            buffer_units: 0,
            request_units: 0,
            lane_units: 0,
            lane_buffer_units: 0,
        }
    }

    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// Units held for buffers and requests together.
    pub fn held_units(&self) -> u32 {
        self.buffer_units.saturating_add(self.request_units)
    }

    /// Units held by requests in flight.
    pub fn request_units(&self) -> u32 {
        self.request_units
    }

    /// Sets the charge for buffers to `bytes` of capacity: growth is forced (the bytes are
    /// already allocated), shrinking gives units back.
    pub fn set_buffers(&mut self, bytes: usize) {
        let units = Budget::units(bytes);
        if units > self.buffer_units {
            self.budget.force(units - self.buffer_units);
        } else {
            let give = self.buffer_units - units;
            let to_lane = give.min(self.lane_buffer_units);
            self.lane_buffer_units -= to_lane;
            if to_lane > 0 {
                self.budget.release_lane(to_lane);
            }
            self.budget.release(give - to_lane);
        }
        self.buffer_units = units;
    }

    /// Whether this connection may take from the lane: it holds nothing of it now.
    fn lane_allowed(&self) -> bool {
        self.lane_units == 0 && self.lane_buffer_units == 0
    }

    /// Takes `units` for buffers about to grow, if they are free now.
    pub fn try_grow_buffers(&mut self, units: u32) -> bool {
        let ok = self.budget.try_take(units);
        if ok {
            self.buffer_units += units;
        }
        ok
    }

    /// Takes `units` for a request, if they are free now.
    pub fn try_take_request(&mut self, units: u32) -> Option<Charge> {
        let charge = self.budget.try_take_request(units, self.lane_allowed())?;
        self.hold(charge);
        Some(charge)
    }

    fn hold(&mut self, charge: Charge) {
        self.request_units += charge.units;
        if charge.lane {
            self.lane_units += charge.units;
        }
    }

    /// Waits for `units` for a request (`request`) or buffers, in arrival order with every
    /// other connection.
    pub fn grant(&self, units: u32, request: bool) -> Grant {
        self.budget.grant(units, request && self.lane_allowed())
    }

    /// Books an awaited grant as held by a request, which it returns.
    pub fn granted_request(&mut self, permit: OwnedSemaphorePermit) -> Charge {
        let lane = Arc::ptr_eq(permit.semaphore(), &self.budget.lane);
        let charge = Charge {
            units: permit.num_permits() as u32,
            lane,
        };
        permit.forget();
        self.hold(charge);
        self.budget.show();
        charge
    }

    /// Books an awaited grant as held by the buffers.
    pub fn granted_buffers(&mut self, permit: OwnedSemaphorePermit) {
        self.buffer_units += permit.num_permits() as u32;
        permit.forget();
        self.budget.show();
    }

    /// A request has finished and its reply goes to the write buffer: what it held pays for
    /// the buffer (the next [`Account::set_buffers`] gives back what it does not need). Units
    /// from the lane go back to it if the main part can take their place; otherwise they
    /// stay held, from the lane, until the reply is written.
    pub fn finish_request(&mut self, charge: Charge) {
        let units = charge.units.min(self.request_units);
        self.request_units -= units;
        self.buffer_units += units;
        if charge.lane {
            let units = units.min(self.lane_units);
            self.lane_units -= units;
            if self.budget.try_take(units) {
                self.budget.release_lane(units);
            } else {
                self.lane_buffer_units += units;
            }
        }
    }

    /// Takes over what a finished retrieval's meter held: it pays for the reply in the write
    /// buffer, as a request's charge does after [`Account::finish_request`].
    pub fn adopt(&mut self, held: meter::Held) {
        self.buffer_units += held.main + held.lane;
        self.lane_buffer_units += held.lane;
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        let lane = self.lane_units + self.lane_buffer_units;
        self.budget.release_lane(lane);
        self.budget.release(self.held_units().saturating_sub(lane));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn units_round_up() {
        assert_eq!(Budget::units(0), 0);
        assert_eq!(Budget::units(1), 1);
        assert_eq!(Budget::units(1024), 1);
        assert_eq!(Budget::units(1025), 2);
    }

    #[test]
    fn requests_are_refused_past_the_limit_and_granted_after_a_release() {
        // 64 units: 48 main, a lane of 16 for requests of at most 4.
        let budget = Budget::new(64 * 1024);
        let mut a = Account::new(budget.clone());
        let mut b = Account::new(budget.clone());
        let big = a.try_take_request(40).expect("main part");
        assert!(!big.lane);
        assert!(b.try_take_request(16).is_none(), "too big for what is left");
        let small = b.try_take_request(8).expect("main part");
        assert!(!small.lane);
        let lane = b
            .try_take_request(4)
            .expect("the lane takes a small request");
        assert!(lane.lane);
        assert!(b.try_take_request(5).is_none(), "not small: no lane");
        let mut grant = b.grant(8, true);
        assert!((&mut grant).now_or_never().is_none());
        a.finish_request(big);
        a.set_buffers(0);
        let charge = b.granted_request(grant.now_or_never().expect("granted after a release"));
        assert_eq!(
            charge,
            Charge {
                units: 8,
                lane: false
            }
        );
        assert_eq!(b.request_units(), 20);
        drop(a);
        drop(b);
        assert_eq!(budget.used_bytes(), 0);
    }

    #[test]
    fn small_requests_are_served_from_the_lane_while_large_ones_queue() {
        let budget = Budget::new(64 * 1024);
        let mut hog = Account::new(budget.clone());
        assert!(hog.try_take_request(48).is_some());
        let mut queued = hog.grant(40, true);
        assert!((&mut queued).now_or_never().is_none());
        let mut small = Account::new(budget.clone());
        for _ in 0..4 {
            let charge = small.try_take_request(4).expect("lane");
            small.finish_request(charge);
            // The reply is written: its buffer goes, and the lane's units with it.
            small.set_buffers(0);
        }
        assert_eq!(budget.used_bytes(), 48 * 1024);
        drop(queued);
        drop(hog);
        drop(small);
        assert_eq!(budget.used_bytes(), 0);
    }

    #[test]
    fn a_reply_paid_from_the_lane_keeps_its_charge_until_written() {
        // 64 units: 48 main, a lane of 16 for requests of at most 4.
        let budget = Budget::new(64 * 1024);
        let mut hog = Account::new(budget.clone());
        assert!(hog.try_take_request(48).is_some());
        let mut reader = Account::new(budget.clone());
        let charge = reader.try_take_request(4).expect("lane");
        reader.finish_request(charge);
        // The main part is spent: the reply keeps its lane units, and the connection gets no
        // more of the lane (a client that never reads cannot spend it all).
        reader.set_buffers(4 * 1024);
        assert_eq!(budget.used_bytes(), 52 * 1024);
        assert!(reader.try_take_request(4).is_none());
        assert!(reader.grant(4, true).now_or_never().is_none());
        let mut other = Account::new(budget.clone());
        let theirs = other
            .try_take_request(4)
            .expect("others still have the lane");
        other.finish_request(theirs);
        other.set_buffers(0);
        // Once written, the lane is free to it again.
        reader.set_buffers(0);
        assert!(reader.try_take_request(4).is_some_and(|c| c.lane));
        drop((hog, reader, other));
        assert_eq!(budget.used_bytes(), 0);
    }

    #[test]
    fn a_reply_paid_from_the_lane_moves_to_the_main_part_when_it_has_room() {
        let budget = Budget::new(64 * 1024);
        let mut hog = Account::new(budget.clone());
        let big = hog.try_take_request(48).expect("main part");
        let mut reader = Account::new(budget.clone());
        let charge = reader.try_take_request(4).expect("lane");
        hog.finish_request(big);
        hog.set_buffers(0);
        reader.finish_request(charge);
        reader.set_buffers(4 * 1024);
        assert!(
            reader.try_take_request(4).is_some(),
            "the lane is free again"
        );
        drop((hog, reader));
        assert_eq!(budget.used_bytes(), 0);
    }

    #[test]
    fn forced_charges_become_debt_paid_before_new_grants() {
        let budget = Budget::new(16 * 1024);
        let mut a = Account::new(budget.clone());
        a.set_buffers(24 * 1024);
        assert_eq!(budget.used_bytes(), 24 * 1024);
        let mut b = Account::new(budget.clone());
        assert!(b.try_take_request(8).is_none());
        a.set_buffers(4 * 1024);
        assert!(b.try_take_request(8).is_some());
        drop(a);
        drop(b);
        assert_eq!(budget.used_bytes(), 0);
    }

    #[test]
    fn shares_and_clamps_scale_with_the_limit() {
        let budget = Budget::new(DEFAULT_MEMORY_LIMIT_BYTES);
        assert_eq!(budget.share_units(), 64 * 1024);
        assert_eq!(budget.clamp(u32::MAX), 128 * 1024);
        assert_eq!(budget.clamp(5), 5);
        assert!(budget.is_small(16 * 1024) && !budget.is_small(16 * 1024 + 1));
    }
}
