//! What a retrieval holds beyond its admission charge: each value, charged at its real size
//! as it arrives.
//!
//! A `get` is admitted for its keys and reply line alone, not for the most its values could
//! take; the values are charged as they come: a store read once it knows the object's length
//! (S3's Content-Length, a file's size) and before it reads the body, a value the near tier
//! already holds when the reply takes it. Charges are taken only if the budget has them free
//! now. A retrieval refused a charge drops what it read, gives back everything it holds, and
//! waits, in arrival order with every other request, for a grant of what it now knows it
//! needs; it then reads again (the values it dropped are in the near tier by then). So no
//! retrieval waits while holding values, and a multi-get of small values goes out as one
//! fan-out however large the item limit.
//!
//! The running retrieval finds its meter through a task-local ([`scope`], [`current`]), and
//! the store's read path through another, as a [`BodyCharge`]: a body is charged without
//! the meter passing through every layer between.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use super::{Budget, UNIT_BYTES};
use crate::store::charge::{self, BodyCharge};

tokio::task_local! {
    static METER: Arc<Meter>;
}

/// Runs `future` with `meter` as the one its store reads and values are charged to.
pub async fn scope<F: Future>(meter: Arc<Meter>, future: F) -> F::Output {
    let charge: Arc<dyn BodyCharge> = meter.clone();
    METER.scope(meter, charge::scope(charge, future)).await
}

/// The meter of the retrieval running on this task, if any.
pub fn current() -> Option<Arc<Meter>> {
    METER.try_with(Arc::clone).ok()
}

/// A retrieval admitted from the small-request lane may take this fraction (1/N) of the lane
/// for its values: enough for a multi-get of small values while the main part is spent, too
/// little for a client that never reads to hold much of it.
pub const LANE_DIVISOR: u32 = 256;

/// Units a meter holds, by the part of the budget they came from.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub main: u32,
    pub lane: u32,
}

#[derive(Debug, Default)]
struct State {
    held: Held,
    /// Bytes of the units held that values and bodies have used.
    used: u64,
    /// Of `used`, bytes of bodies read whose values have not been charged yet: a value
    /// charged after its body takes them over rather than being charged twice.
    bodies: u64,
}

impl State {
    fn free_bytes(&self) -> u64 {
        u64::from(self.held.main + self.held.lane) * UNIT_BYTES - self.used
    }
}

/// One retrieval's charges beyond its admission charge; whatever it still holds when
/// dropped goes back to the budget.
#[derive(Debug)]
pub struct Meter {
    budget: Arc<Budget>,
    /// Units it may take from the small-request lane: some if the retrieval was admitted
    /// from it (a connection holds one lane charge at most), else none.
    lane_units: u32,
    /// When a wait for a grant gives up (the request timeout).
    deadline: Option<Instant>,
    state: Mutex<State>,
}

impl Meter {
    /// A meter for a retrieval admitted from the lane (`lane`) or not.
    pub fn new(budget: Arc<Budget>, lane: bool, deadline: Option<Instant>) -> Meter {
        let lane_units = match lane {
            true => (budget.lane_units / LANE_DIVISOR).max(1),
            false => 0,
        };
        Meter {
            budget,
            lane_units,
            deadline,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Charges a body of `bytes` about to be read; false when the budget cannot take it now.
    pub fn charge_body(&self, bytes: u64) -> bool {
        let mut state = self.state();
        let taken = self.take(&mut state, bytes);
        if taken {
            state.bodies += bytes;
        }
        taken
    }

    /// Charges a value of `bytes` the reply is to hold: first from bodies read and not yet
    /// claimed (its own, when it came from the store), then like [`Meter::charge_body`].
    pub fn charge_value(&self, bytes: u64) -> bool {
        let mut state = self.state();
        let claimed = state.bodies.min(bytes);
        if !self.take(&mut state, bytes - claimed) {
            return false;
        }
        state.bodies -= claimed;
        true
    }

    /// Charges `bytes`: from what the meter holds unused, else from the budget if it has
    /// the rest free now. False when it has not (nothing is taken).
    fn take(&self, state: &mut State, bytes: u64) -> bool {
        let free = state.free_bytes();
        if free >= bytes {
            state.used += bytes;
            return true;
        }
        let units = u32::try_from((bytes - free).div_ceil(UNIT_BYTES)).unwrap_or(u32::MAX);
        if self.budget.try_take(units) {
            state.held.main += units;
        } else if state.held.lane.saturating_add(units) <= self.lane_units
            && self.budget.try_take_lane(units)
        {
            state.held.lane += units;
        } else {
            return false;
        }
        state.used += bytes;
        true
    }

    /// Bytes charged so far.
    pub fn used_bytes(&self) -> u64 {
        self.state().used
    }

    /// Gives back everything held, then waits for a grant of `bytes` (within the largest
    /// grant), held unused for the values to come; false if the deadline passed first.
    pub async fn wait_for(&self, bytes: u64) -> bool {
        self.release();
        let units = self
            .budget
            .clamp(u32::try_from(bytes.div_ceil(UNIT_BYTES)).unwrap_or(u32::MAX));
        let grant = self.budget.grant(units, units <= self.lane_units);
        let permit = match self.deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, grant).await {
                Ok(permit) => permit,
                Err(_) => return false,
            },
            None => grant.await,
        };
        let from_lane = Arc::ptr_eq(permit.semaphore(), &self.budget.lane);
        permit.forget();
        let mut state = self.state();
        if from_lane {
            state.held.lane += units;
        } else {
            state.held.main += units;
        }
        self.budget.show();
        true
    }

    /// Gives back everything held.
    fn release(&self) {
        let mut state = self.state();
        let held = std::mem::take(&mut state.held);
        state.used = 0;
        state.bodies = 0;
        self.budget.release(held.main);
        self.budget.release_lane(held.lane);
    }

    /// Hands what the meter holds to the caller (the connection, whose reply it now pays
    /// for); nothing is given back when the meter is dropped.
    pub fn settle(&self) -> Held {
        let mut state = self.state();
        state.used = 0;
        state.bodies = 0;
        std::mem::take(&mut state.held)
    }
}

impl BodyCharge for Meter {
    fn charge_body(&self, bytes: u64) -> bool {
        Meter::charge_body(self, bytes)
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;
    use crate::budget::Account;

    const KIB: u64 = 1024;

    #[test]
    fn values_are_charged_from_what_is_held_then_from_the_budget() {
        let budget = Budget::new(64 * KIB);
        let meter = Meter::new(budget.clone(), false, None);
        assert!(meter.charge_value(100));
        assert_eq!(budget.used_bytes(), KIB, "rounded up to a unit");
        assert!(meter.charge_value(900), "within the unit already held");
        assert_eq!(budget.used_bytes(), KIB);
        assert!(meter.charge_value(2 * KIB));
        assert_eq!(budget.used_bytes(), 3 * KIB);
        assert_eq!(meter.used_bytes(), 3000 + 48);
        drop(meter);
        assert_eq!(
            budget.used_bytes(),
            0,
            "a dropped meter gives everything back"
        );
    }

    #[test]
    fn a_charge_the_budget_cannot_take_now_is_refused_and_takes_nothing() {
        // 1,024 units: 768 main, a lane of 256 of which a meter admitted from it may take 1.
        let budget = Budget::new(1024 * KIB);
        let mut hog = Account::new(budget.clone());
        assert!(hog.try_take_request(766).is_some());
        let meter = Meter::new(budget.clone(), false, None);
        assert!(
            !meter.charge_value(3 * KIB),
            "two units are free in the main part"
        );
        assert_eq!(budget.used_bytes(), 766 * KIB);
        assert!(meter.charge_value(2 * KIB));
        assert!(
            !meter.charge_value(1),
            "not admitted from the lane: none of it"
        );
        assert_eq!(meter.settle(), Held { main: 2, lane: 0 });
        let small = Meter::new(budget.clone(), true, None);
        assert!(small.charge_value(1000), "its share of the lane");
        assert!(!small.charge_value(KIB), "no more than its share");
        drop(small);
        drop(meter);
        assert_eq!(budget.used_bytes(), 768 * KIB, "settled units stay held");
        budget.release(2);
        drop(hog);
        assert_eq!(budget.used_bytes(), 0);
    }

    #[tokio::test]
    async fn a_refused_retrieval_gives_back_what_it_holds_and_waits_for_what_it_needs() {
        let budget = Budget::new(64 * KIB);
        let mut hog = Account::new(budget.clone());
        let charge = hog.try_take_request(40).expect("main part");
        let meter = Meter::new(budget.clone(), false, None);
        assert!(meter.charge_value(6 * KIB));
        assert!(!meter.charge_value(6 * KIB));
        // It waits holding nothing: the wait is for the 12 KiB it now knows it needs.
        let mut wait = Box::pin(meter.wait_for(12 * KIB));
        assert!((&mut wait).now_or_never().is_none());
        assert_eq!(meter.used_bytes(), 0);
        hog.finish_request(charge);
        hog.set_buffers(0);
        assert!(wait.await);
        assert_eq!(budget.used_bytes(), 12 * KIB);
        assert!(
            meter.charge_value(6 * KIB) && meter.charge_value(6 * KIB),
            "from the grant"
        );
        assert_eq!(budget.used_bytes(), 12 * KIB);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_gives_up_at_the_deadline() {
        let budget = Budget::new(64 * KIB);
        let mut hog = Account::new(budget.clone());
        assert!(hog.try_take_request(48).is_some());
        let deadline = Instant::now() + std::time::Duration::from_secs(1);
        let meter = Meter::new(budget.clone(), false, Some(deadline));
        assert!(!meter.wait_for(8 * KIB).await);
        assert_eq!(budget.used_bytes(), 48 * KIB);
    }

    #[tokio::test]
    async fn the_running_retrieval_finds_its_meter() {
        let budget = Budget::new(64 * KIB);
        assert_eq!(
            charge::charge_body(1 << 30),
            Ok(()),
            "no retrieval: nothing charged"
        );
        let meter = Arc::new(Meter::new(budget.clone(), false, None));
        let charged = scope(meter.clone(), async {
            (charge::charge_body(4 * KIB), charge::charge_body(1 << 30))
        })
        .await;
        assert_eq!(charged, (Ok(()), Err(1 << 30)));
        assert_eq!(meter.used_bytes(), 4 * KIB);
        // The value read from that body takes over its charge.
        assert!(meter.charge_value(3 * KIB));
        assert_eq!(meter.used_bytes(), 4 * KIB);
        assert!(
            meter.charge_value(2 * KIB),
            "the body's last KiB, and one more"
        );
        assert_eq!(meter.used_bytes(), 5 * KIB);
    }
}
