//! One admission path for both protocols: what a connection is charged, and when it waits.
//!
//! Everything is charged to the memory budget before it is taken. A request is charged the
//! most its reply can take ([`reply_bound`]), never more than the largest grant, except a
//! retrieval (`get`, `gat`): it is charged its keys and reply line, and each value as it
//! arrives, at its real size ([`crate::budget::meter`]). A request runs once charged; a connection with replies pending that would go past its share waits for them to
//! drain first, and one the budget refuses waits for a grant, in arrival order with every
//! other connection. A retrieval (a multi-get, or a run of binary gets) is cut to what one
//! connection's share can hold. Buffers are charged their capacity: growth the driver can put
//! off waits for the budget like a request, growth it cannot (a reply being encoded) is
//! forced.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::budget::meter::{Held, Meter};
use crate::budget::{Account, Budget, Charge, Grant, UNIT_BYTES};
use crate::command;
use crate::protocol::{self, Limits, Request, Response, StoreMode};
use crate::stats::Stats;
use crate::store::body::STREAM_HOLD_BYTES;

/// Charged for a reply's line and framing, beyond keys and data.
pub const REPLY_OVERHEAD_BYTES: usize = 64;
/// Charged for a request whose reply holds no value (stats, errors, status lines).
const SMALL_REPLY_BYTES: usize = 4 * 1024;

/// What a connection holds of the budget, and the rules by which it takes more.
#[derive(Debug)]
pub struct Admission {
    /// The connection's holdings: its buffers and its requests in flight.
    account: Account,
    /// The parser's limits: the largest value a reply can carry.
    limits: Limits,
    /// Where waits for the budget are counted (`budget_waits`).
    stats: Arc<Stats>,
}

impl Admission {
    pub fn new(budget: Arc<Budget>, limits: Limits, stats: Arc<Stats>) -> Self {
        Admission {
            account: Account::new(budget),
            limits,
            stats,
        }
    }

    /// Units `request` is charged before it runs: the most its reply can take, within the
    /// largest grant (configuration keeps every request within it).
    pub fn units(&self, request: &Request) -> u32 {
        self.units_of(std::iter::once(request))
    }

    /// Units a run of `requests` executed together is charged: the sum of their bounds,
    /// within the largest grant.
    pub fn units_of<'r>(&self, requests: impl IntoIterator<Item = &'r Request>) -> u32 {
        let budget = self.account.budget();
        let units = requests
            .into_iter()
            .map(|r| Budget::units(admitted_bound(r, &self.limits, budget)))
            .fold(0u32, u32::saturating_add);
        self.account.budget().clamp(units)
    }

    /// Keys one retrieval may ask for at once and still fit in a connection's share; at
    /// least one.
    pub fn keys_per_share(&self) -> usize {
        let share = self.account.budget().share_units() as usize * UNIT_BYTES as usize;
        let per_key = reply_bound_per_key(&self.limits) + 2 * protocol::MAX_KEY_BYTES;
        (share.saturating_sub(SMALL_REPLY_BYTES) / per_key).max(1)
    }

    /// Queues `request`, split if it is a retrieval whose reply could take more than a
    /// connection's share into pieces that cannot (several connections' large gets then run
    /// at once); every piece but the last leaves out `END`, as with a line longer than the
    /// parser's window.
    pub fn queue(&self, request: Request, queue: &mut VecDeque<Request>) {
        let share = self.account.budget().share_units();
        if Budget::units(reply_bound(&request, &self.limits)) <= share {
            queue.push_back(request);
            return;
        }
        let per_piece = self.keys_per_share();
        let pieces = |keys: &[Bytes], end: bool| {
            let n = keys.chunks(per_piece).count();
            let chunks = keys.chunks(per_piece).enumerate();
            chunks
                .map(|(i, chunk)| (chunk.to_vec(), end && i + 1 == n))
                .collect::<Vec<_>>()
        };
        match request {
            Request::Get { keys, cas, end } => queue.extend(
                pieces(&keys, end)
                    .into_iter()
                    .map(|(keys, end)| Request::Get { keys, cas, end }),
            ),
            Request::Gat {
                exptime,
                keys,
                cas,
                end,
            } => queue.extend(
                pieces(&keys, end)
                    .into_iter()
                    .map(|(keys, end)| Request::Gat {
                        exptime,
                        keys,
                        cas,
                        end,
                    }),
            ),
            other => queue.push_back(other),
        }
    }

    /// Units a reply already in hand is charged (one answered from the near tier, whose
    /// values it shares): what it encodes to, within the largest grant.
    pub fn reply_units(&self, response: &Response) -> u32 {
        let units = Budget::units(reply_len(response) + SMALL_REPLY_BYTES);
        self.account.budget().clamp(units)
    }

    /// The meter `request`, admitted with `charge`, charges its values to as they arrive,
    /// if it is a large retrieval; its waits for the budget give up at `deadline`.
    pub fn meter(
        &self,
        request: &Request,
        charge: Charge,
        deadline: Option<Instant>,
    ) -> Option<Arc<Meter>> {
        let budget = self.account.budget();
        let metered = metered(request, &self.limits, budget);
        metered.then(|| Arc::new(Meter::new(budget.clone(), charge.lane, deadline)))
    }

    /// Takes over what a finished retrieval's meter held, to pay for its reply.
    pub fn adopt(&mut self, held: Held) {
        self.account.adopt(held);
    }

    /// Takes `units` for a request if the budget has them free now.
    pub fn try_admit(&mut self, units: u32) -> Option<Charge> {
        self.account.try_take_request(units)
    }

    /// Whether a request of `units` must first wait for this connection's own replies to
    /// drain: it has requests in flight and would take their units past its share.
    pub fn must_drain(&self, units: u32, in_flight: bool) -> bool {
        in_flight
            && self.account.request_units().saturating_add(units)
                > self.account.budget().share_units()
    }

    /// Takes `units` for a request now, or gives the grant to wait for (a wait counted in
    /// `budget_waits`).
    pub fn admit_or_grant(&mut self, units: u32) -> Result<Charge, Grant> {
        if let Some(charge) = self.account.try_take_request(units) {
            return Ok(charge);
        }
        Stats::incr(&self.stats.budget_waits);
        Err(self.account.grant(units, true))
    }

    /// Books an awaited grant as held by the request that waited for it.
    pub fn granted(&mut self, permit: OwnedSemaphorePermit) -> Charge {
        self.account.granted_request(permit)
    }

    /// A request has finished and its reply goes to the write buffer: what it held pays for
    /// the buffer until the next [`Admission::set_buffers`] gives back the rest.
    pub fn finish(&mut self, charge: Charge) {
        self.account.finish_request(charge);
    }

    /// Past its share with replies still to come (`in_flight`): take no more input until
    /// they drain.
    pub fn over_share(&self, in_flight: bool) -> bool {
        in_flight && self.account.held_units() > self.account.budget().share_units()
    }

    /// Charges buffers of `bytes` capacity in all: growth is forced (the bytes are already
    /// allocated), shrinking gives units back.
    pub fn set_buffers(&mut self, bytes: usize) {
        self.account.set_buffers(bytes);
    }

    /// Takes `units` for buffers about to grow, if they are free now.
    pub fn try_grow_buffers(&mut self, units: u32) -> bool {
        self.account.try_grow_buffers(units)
    }

    /// The grant to wait for before buffers grow by `units` (within the largest grant); the
    /// wait is counted in `budget_waits`.
    pub fn grant_buffers(&mut self, units: u32) -> Grant {
        Stats::incr(&self.stats.budget_waits);
        let units = self.account.budget().clamp(units);
        self.account.grant(units, false)
    }

    /// A new grant of `units` for a request (`request`) or buffers, at the end of the queue:
    /// for a connection that gave up its place (it had to write first). Not counted again.
    pub fn requeue(&mut self, units: u32, request: bool) -> Grant {
        let units = self.account.budget().clamp(units);
        self.account.grant(units, request)
    }

    /// Books an awaited grant as held by the buffers.
    pub fn granted_buffers(&mut self, permit: OwnedSemaphorePermit) {
        self.account.granted_buffers(permit);
    }
}

/// Bytes a reply encodes to, near enough to charge it and size the write buffer for it (0
/// for a reply with no value).
pub fn reply_len(response: &Response) -> usize {
    match response {
        Response::Values { values, .. } => values
            .iter()
            .map(|v| v.key.len() + v.data.len() + REPLY_OVERHEAD_BYTES)
            .sum::<usize>()
            .saturating_add(8),
        _ => 0,
    }
}

/// Whether a request's values are charged as they arrive rather than up front: a
/// retrieval whose values could take more than a small request (one that may use the
/// budget's lane for small requests, so a client's `get` of a key or two is served while
/// large retrievals wait).
fn metered(request: &Request, limits: &Limits, budget: &Budget) -> bool {
    matches!(request, Request::Get { .. } | Request::Gat { .. })
        && !budget.is_small(Budget::units(reply_bound(request, limits)))
}

/// What a request is charged to start: a metered retrieval its keys and reply line, any
/// other the most its reply can take.
fn admitted_bound(request: &Request, limits: &Limits, budget: &Budget) -> usize {
    match request {
        Request::Get { keys, .. } | Request::Gat { keys, .. }
            if metered(request, limits, budget) =>
        {
            let keys: usize = keys.iter().map(|k| 2 * k.len()).sum();
            keys + SMALL_REPLY_BYTES
        }
        other => reply_bound(other, limits),
    }
}

/// What one key of a retrieval can take: its value read from the store, and encoded.
fn reply_bound_per_key(limits: &Limits) -> usize {
    2 * (limits.whole_item_bytes() + REPLY_OVERHEAD_BYTES)
}

/// The most bytes a request can hold while it runs and its reply waits: values read from
/// the store, and their encoding in the write buffer.
fn reply_bound(request: &Request, limits: &Limits) -> usize {
    // A longer value is streamed: it holds less than this (`READ_HOLD_BYTES`) at a time.
    let per_value = limits.whole_item_bytes() + REPLY_OVERHEAD_BYTES;
    match request {
        Request::Get { keys, .. } | Request::Gat { keys, .. } => {
            let values = keys.len().saturating_mul(reply_bound_per_key(limits));
            let keys: usize = keys.iter().map(|k| 2 * k.len()).sum();
            values.min(2 * (command::MAX_RESPONSE_BYTES + per_value)) + keys + SMALL_REPLY_BYTES
        }
        // The data block and a copy as written to the store; append and prepend also read
        // the old value.
        Request::Store { data, mode, .. } => {
            let old = match mode {
                StoreMode::Append | StoreMode::Prepend => per_value,
                _ => 0,
            };
            2 * data.len() + old + SMALL_REPLY_BYTES
        }
        // The parts being uploaded (`upload`), and pieces in the pipe to them.
        Request::StoreStreamed { .. } => STREAM_HOLD_BYTES + SMALL_REPLY_BYTES,
        Request::Arith { .. } | Request::Meta(_) => 2 * per_value + SMALL_REPLY_BYTES,
        _ => SMALL_REPLY_BYTES,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use futures::FutureExt;

    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn admission(limit_bytes: u64) -> Admission {
        let stats = Arc::new(Stats::default());
        Admission::new(Budget::new(limit_bytes), Limits::default(), stats)
    }

    fn get(n: usize, end: bool) -> Request {
        let keys = (0..n).map(|i| Bytes::from(format!("key{i}"))).collect();
        Request::Get {
            keys,
            cas: false,
            end,
        }
    }

    /// The key counts and `END` flags of the pieces `a` queues for `request`.
    fn shape(a: &Admission, request: Request) -> Vec<(usize, bool)> {
        let mut pieces = VecDeque::new();
        a.queue(request, &mut pieces);
        pieces
            .iter()
            .map(|p| match p {
                Request::Get { keys, end, .. } => (keys.len(), *end),
                other => panic!("not a get: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_multi_get_past_the_share_is_split_and_only_the_last_piece_ends() {
        // The default 256 MiB budget: a share of 64 MiB holds 31 values of 1 MiB, read and
        // encoded.
        let a = admission(256 * MIB);
        assert_eq!(a.keys_per_share(), 31);
        assert_eq!(shape(&a, get(31, true)), [(31, true)]);
        assert_eq!(
            shape(&a, get(100, true)),
            [(31, false), (31, false), (31, false), (7, true)]
        );
        // A piece of a longer line (no END of its own) ends nowhere.
        assert_eq!(shape(&a, get(40, false)), [(31, false), (9, false)]);
        // The smallest budget still serves one key at a time.
        let small = admission(8 * MIB);
        assert_eq!(small.keys_per_share(), 1);
        assert_eq!(
            shape(&small, get(3, true)),
            [(1, false), (1, false), (1, true)]
        );
    }

    #[test]
    fn a_run_is_charged_the_sum_of_its_requests_within_the_largest_grant() {
        let a = admission(256 * MIB);
        let incr = || Request::Arith {
            key: Bytes::from_static(b"n"),
            delta: 1,
            incr: true,
            noreply: false,
        };
        let one = a.units(&incr());
        let run = [incr(), incr(), incr()];
        assert_eq!(a.units_of(&run), 3 * one);
        let huge: Vec<Request> = (0..1000).map(|_| incr()).collect();
        assert_eq!(a.units_of(&huge), a.account.budget().clamp(u32::MAX));
    }

    #[test]
    fn a_large_retrieval_is_charged_its_keys_and_line_not_its_values() {
        let a = admission(256 * MIB);
        let charge = |units| Charge { units, lane: false };
        // Twenty keys could take 40 MiB: more than a small request. Two bytes per key byte
        // (the key parsed, and echoed), and the reply line; the values are metered.
        let keys: usize = (0..20).map(|i| format!("key{i}").len()).sum();
        let line = Budget::units(SMALL_REPLY_BYTES + 2 * keys);
        assert_eq!(a.units(&get(20, true)), line);
        assert!(a.meter(&get(20, true), charge(line), None).is_some());
        // Three keys are a small request: charged the most they can take, from the lane if
        // need be, and not metered.
        let small = a.units(&get(3, true));
        assert!(small > 3 * 2 * 1024 && a.account.budget().is_small(small));
        assert!(a.meter(&get(3, true), charge(small), None).is_none());
        let incr = Request::Arith {
            key: Bytes::from_static(b"n"),
            delta: 1,
            incr: true,
            noreply: false,
        };
        assert!(
            a.meter(&incr, charge(small), None).is_none(),
            "charged up front"
        );
    }

    #[test]
    fn past_its_share_a_connection_with_replies_pending_waits_for_them() {
        let mut a = admission(256 * MIB);
        let share = a.account.budget().share_units();
        let held = a.try_admit(share - 10).expect("free budget");
        assert!(!a.must_drain(10, true), "exactly the share");
        assert!(a.must_drain(11, true), "past the share");
        assert!(
            !a.must_drain(11, false),
            "nothing pending: it cannot wait for itself"
        );
        assert!(!a.over_share(true));
        a.set_buffers(11 * UNIT_BYTES as usize);
        assert!(a.over_share(true) && !a.over_share(false));
        a.finish(held);
        a.set_buffers(0);
        assert_eq!(a.account.held_units(), 0);
    }

    #[tokio::test]
    async fn a_spent_budget_is_waited_for_and_the_wait_counted() {
        let mut a = admission(8 * MIB);
        let mut b = admission(8 * MIB);
        // Share one budget.
        b.account = Account::new(a.account.budget().clone());
        let all = a.account.budget().clamp(u32::MAX);
        let first = a.try_admit(all).expect("half the budget");
        let second = a.try_admit(all - 2048).expect("most of the rest");
        let Err(mut grant) = b.admit_or_grant(4096) else {
            panic!("the budget is spent");
        };
        assert_eq!(b.stats.budget_waits.load(Relaxed), 1);
        assert!((&mut grant).now_or_never().is_none());
        a.finish(first);
        a.finish(second);
        a.set_buffers(0);
        let charge = b.granted(grant.await);
        assert_eq!(charge.units, 4096);
        let Ok(free) = b.admit_or_grant(16) else {
            panic!("free: no wait");
        };
        assert_eq!(free.units, 16);
        assert_eq!(b.stats.budget_waits.load(Relaxed), 1);
    }
}
