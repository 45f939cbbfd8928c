//! Failed logins limited per client address, across all its connections and both protocols.
//!
//! Each address has a bucket of turns: [`AUTH_FAILURE_BURST_PER_CLIENT`] at once, refilled at
//! [`AUTH_FAILURES_PER_SEC_PER_CLIENT`]. An attempt with a turn free is checked now; past the
//! limit it is given the next turn to come (at most [`AUTH_FAILURE_QUEUE_PER_CLIENT`] turns
//! ahead) and answered as a failure then, unchecked; past the queue it gets no turn and must
//! ask again later. Every failure answered has had a turn, so an address gets at most
//! burst + rate × t failures answered (and passwords checked) in t seconds, however many
//! connections it opens. A login that succeeds gives its turn back.
//!
//! The state is one instant per address (when its bucket is full again); an address whose
//! bucket is full is forgotten, and at most [`MAX_TRACKED_CLIENTS`] are remembered.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Failed logins an address may have answered per second, in the long run: the pace of one
/// connection whose every failure waits [`super::AUTH_FAILURE_DELAY_MS`], so a lone client
/// retrying never notices the limit, while 64 connections guess no faster than one.
pub const AUTH_FAILURES_PER_SEC_PER_CLIENT: u32 = 4;
/// Failed logins an address may make at once before the rate applies: one connection's
/// allowance ([`super::MAX_AUTH_FAILURES_PER_CONNECTION`]), so a user mistyping a password
/// a few times, or a pool of clients with a stale one, is answered at the usual pace.
pub const AUTH_FAILURE_BURST_PER_CLIENT: u32 = 8;
/// Turns past the limit an address may have waiting (2 s of them): an attempt that would
/// wait longer gets none, so an address cannot run up a debt that locks it out for long.
pub const AUTH_FAILURE_QUEUE_PER_CLIENT: u32 = 8;
/// Most addresses remembered at once (under 256 KiB); past it, the one closest to a full
/// bucket is forgotten, so memory is bounded however many addresses try.
pub const MAX_TRACKED_CLIENTS: usize = 4096;

/// The time one turn takes to come back.
const TURN: Duration = Duration::from_millis(1000 / AUTH_FAILURES_PER_SEC_PER_CLIENT as u64);

/// A client as the limit knows it: an IPv4 address, or the /64 network of an IPv6 one (what
/// one subscriber is given). Connections without an address share one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    /// The key of a client at `addr` (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn of(addr: Option<IpAddr>) -> ClientKey {
        match addr.map(|a| a.to_canonical()) {
            Some(IpAddr::V6(v6)) => {
                let network = u128::from(v6) & !u128::from(u64::MAX);
                ClientKey(IpAddr::V6(Ipv6Addr::from(network)))
            }
            Some(v4) => ClientKey(v4),
            None => ClientKey(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        }
    }
}

/// When a login attempt may be judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Within the limit: check the credentials now (a turn is taken).
    Now,
    /// Over the limit: answer a failure at this time without checking (a turn is taken).
    At(Instant),
    /// Over the limit with the queue full: no turn was taken; ask again at this time.
    Busy(Instant),
}

/// The failed-login limits of every client address, shared by all connections.
#[derive(Debug)]
pub struct FailedLogins {
    /// Per address, when its bucket is full again; addresses with a full bucket are absent.
    full_at: Mutex<HashMap<ClientKey, Instant>>,
    /// Most addresses remembered.
    max_clients: usize,
}

impl Default for FailedLogins {
    fn default() -> Self {
        FailedLogins::new(MAX_TRACKED_CLIENTS)
    }
}

impl FailedLogins {
    /// Limits remembering at most `max_clients` addresses (at least one).
    pub fn new(max_clients: usize) -> FailedLogins {
        FailedLogins {
            full_at: Mutex::new(HashMap::new()),
            max_clients: max_clients.max(1),
        }
    }

    /// Takes `client`'s next turn at `now`, if one is within the queue.
    pub fn turn(&self, client: ClientKey, now: Instant) -> Turn {
        let mut full_at = self.full_at.lock().unwrap_or_else(|e| e.into_inner());
        let base = full_at.get(&client).copied().unwrap_or(now).max(now);
        // The turn this attempt would take comes when the bucket has room for it.
        let turn = (base + TURN)
            .checked_sub(TURN * AUTH_FAILURE_BURST_PER_CLIENT)
            .map_or(now, |at| at.max(now));
        if turn > now + TURN * AUTH_FAILURE_QUEUE_PER_CLIENT {
            return Turn::Busy(turn - TURN * AUTH_FAILURE_QUEUE_PER_CLIENT);
        }
        if !full_at.contains_key(&client) {
            make_room(&mut full_at, self.max_clients, now);
        }
        full_at.insert(client, base + TURN);
        match turn > now {
            true => Turn::At(turn),
            false => Turn::Now,
        }
    }

    /// Gives back a turn taken for an attempt that succeeded: only failures are limited.
    pub fn give_back(&self, client: ClientKey) {
        let mut full_at = self.full_at.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = full_at.get_mut(&client) {
            *at = at.checked_sub(TURN).unwrap_or(*at);
        }
    }

    /// How many addresses are remembered.
    pub fn tracked(&self) -> usize {
        self.full_at.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Makes room for one more address: forgets those whose bucket is full by `now`, and if
/// none is, the one whose bucket fills first.
fn make_room(full_at: &mut HashMap<ClientKey, Instant>, max_clients: usize, now: Instant) {
    if full_at.len() < max_clients {
        return;
    }
    full_at.retain(|_, at| *at > now);
    if full_at.len() < max_clients {
        return;
    }
    let soonest = full_at
        .iter()
        .min_by_key(|(_, at)| **at)
        .map(|(key, _)| *key);
    if let Some(key) = soonest {
        full_at.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(addr: &str) -> ClientKey {
        ClientKey::of(Some(addr.parse().unwrap()))
    }

    #[test]
    fn an_ipv6_client_is_its_64_and_a_mapped_ipv4_one_its_address() {
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        assert_eq!(ClientKey::of(None), ClientKey::of(None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_one_turn_per_interval_then_a_full_queue() {
        let limits = FailedLogins::default();
        let client = key("192.0.2.1");
        let start = Instant::now();
        for _ in 0..AUTH_FAILURE_BURST_PER_CLIENT {
            assert_eq!(limits.turn(client, start), Turn::Now);
        }
        // Past the burst, turns are handed out one interval apart, up to the queue.
        for n in 1..=AUTH_FAILURE_QUEUE_PER_CLIENT {
            assert_eq!(limits.turn(client, start), Turn::At(start + TURN * n));
        }
        let busy = limits.turn(client, start);
        assert_eq!(busy, Turn::Busy(start + TURN));
        // Another address is not held back by this one.
        assert_eq!(limits.turn(key("192.0.2.2"), start), Turn::Now);
        // Asking again when told: a turn at the end of the queue.
        tokio::time::advance(TURN).await;
        let now = Instant::now();
        let last = start + TURN * (AUTH_FAILURE_QUEUE_PER_CLIENT + 1);
        assert_eq!(limits.turn(client, now), Turn::At(last));
        assert!(matches!(limits.turn(client, now), Turn::Busy(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn many_connections_get_failures_answered_at_the_documented_rate() {
        let limits = std::sync::Arc::new(FailedLogins::default());
        let client = key("2001:db8::1");
        let end = Instant::now() + Duration::from_secs(10);
        // Sixteen connections of one address, each answered when its turn comes.
        let connections = (0..16).map(|_| {
            let limits = limits.clone();
            tokio::spawn(async move {
                let mut answered = 0u32;
                while Instant::now() < end {
                    match limits.turn(client, Instant::now()) {
                        Turn::Now => answered += 1,
                        Turn::At(at) => {
                            tokio::time::sleep_until(at).await;
                            answered += u32::from(at < end);
                        }
                        Turn::Busy(at) => tokio::time::sleep_until(at).await,
                    }
                }
                answered
            })
        });
        let mut answered = 0;
        for connection in connections.collect::<Vec<_>>() {
            answered += connection.await.unwrap();
        }
        let most = AUTH_FAILURE_BURST_PER_CLIENT + 10 * AUTH_FAILURES_PER_SEC_PER_CLIENT;
        assert!(answered <= most && answered + 2 >= most, "{answered}");
        // Left alone, the bucket fills up again.
        let queue = AUTH_FAILURE_BURST_PER_CLIENT + AUTH_FAILURE_QUEUE_PER_CLIENT;
        tokio::time::sleep(TURN * queue).await;
        assert_eq!(limits.turn(client, Instant::now()), Turn::Now);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_gives_its_turn_back() {
        let limits = FailedLogins::default();
        let client = key("192.0.2.1");
        let now = Instant::now();
        for _ in 0..3 * AUTH_FAILURE_BURST_PER_CLIENT {
            assert_eq!(limits.turn(client, now), Turn::Now);
            limits.give_back(client);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded_and_the_fullest_bucket_is_forgotten_first() {
        let limits = FailedLogins::new(4);
        let now = Instant::now();
        for i in 0..4 {
            for _ in 0..=i {
                limits.turn(key(&format!("192.0.2.{i}")), now);
            }
        }
        assert_eq!(limits.tracked(), 4);
        // A fifth address pushes out 192.0.2.0, whose bucket fills first.
        limits.turn(key("192.0.2.9"), now);
        assert_eq!(limits.tracked(), 4);
        // 192.0.2.3 is still known: 4 turns taken, 4 left.
        for _ in 4..AUTH_FAILURE_BURST_PER_CLIENT {
            assert_eq!(limits.turn(key("192.0.2.3"), now), Turn::Now);
        }
        assert!(matches!(limits.turn(key("192.0.2.3"), now), Turn::At(_)));
        // Once buckets are full again, addresses are forgotten wholesale to make room.
        tokio::time::advance(TURN * (AUTH_FAILURE_BURST_PER_CLIENT + 2)).await;
        for i in 10..14 {
            limits.turn(key(&format!("192.0.2.{i}")), Instant::now());
        }
        assert_eq!(limits.tracked(), 4);
    }
}
