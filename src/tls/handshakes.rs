//! TLS handshakes in progress, in a pool of their own apart from the connection cap: bounded,
//! and when it is full the oldest silent handshake gives way to a newcomer.
//!
//! A client that means to talk sends its ClientHello as soon as it connects; a socket that
//! has sent nothing is the cheapest to drop. So a newcomer to a full pool takes the slot of
//! the oldest handshake that has not been heard from, and only when every one has been,
//! of the oldest. Sockets opened and left silent, however fast they are re-opened, then only
//! push each other out, never a client whose handshake is under way.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// The handshakes in progress, each with the token that drops it.
#[derive(Debug)]
pub struct Handshakes {
    /// Most handshakes in progress at once.
    max: usize,
    /// The handshakes by age, silent and heard apart.
    state: Mutex<State>,
}

/// Handshakes by number (the order they entered in).
#[derive(Debug, Default)]
struct State {
    /// The next handshake's number.
    next: u64,
    /// Handshakes whose client has sent nothing yet.
    silent: BTreeMap<u64, CancellationToken>,
    /// Handshakes whose client has sent its first bytes.
    heard: BTreeMap<u64, CancellationToken>,
}

/// One handshake's place in the pool, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    /// The pool it belongs to.
    pool: Arc<Handshakes>,
    /// Its number in the pool.
    id: u64,
    /// Cancelled when it gives way to a newer handshake while silent in the pool.
    dropped_silent: CancellationToken,
    /// Cancelled when it gives way to a newer handshake once heard from.
    dropped_heard: CancellationToken,
    /// Its client has sent its first bytes (whether or not the pool still holds it).
    heard: AtomicBool,
}

impl Handshakes {
    /// A pool of `max` slots (at least one).
    pub fn new(max: usize) -> Arc<Handshakes> {
        Arc::new(Handshakes {
            max: max.max(1),
            state: Mutex::new(State::default()),
        })
    }

    /// A slot for a new handshake; when the pool is full, the oldest silent handshake (or
    /// with none silent, the oldest) is dropped to make room.
    pub fn enter(self: &Arc<Self>) -> Slot {
        let mut state = self.lock();
        if state.silent.len() + state.heard.len() >= self.max {
            let oldest = match state.silent.pop_first() {
                Some(silent) => Some(silent),
                None => state.heard.pop_first(),
            };
            if let Some((_, token)) = oldest {
                token.cancel();
            }
        }
        let id = state.next;
        state.next += 1;
        let dropped_silent = CancellationToken::new();
        state.silent.insert(id, dropped_silent.clone());
        Slot {
            pool: self.clone(),
            id,
            dropped_silent,
            dropped_heard: CancellationToken::new(),
            heard: AtomicBool::new(false),
        }
    }

    /// How many handshakes are in progress.
    pub fn in_progress(&self) -> usize {
        let state = self.lock();
        state.silent.len() + state.heard.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Slot {
    /// The client has sent its first bytes: its handshake is no longer silent.
    pub fn heard(&self) {
        self.heard.store(true, Relaxed);
        let mut state = self.pool.lock();
        if state.silent.remove(&self.id).is_some() {
            state.heard.insert(self.id, self.dropped_heard.clone());
        }
    }

    /// Resolves when this handshake has given way to a newer one. One chosen as silent
    /// whose client turns out to have sent its bytes already (they waited for its task to
    /// run, on a loaded server) goes on: its handshake continues outside the pool, under
    /// its deadline.
    pub async fn dropped(&self) {
        tokio::select! {
            () = self.dropped_heard.cancelled() => {}
            () = self.dropped_silent.cancelled() => {
                if self.heard.load(Relaxed) {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        if state.silent.remove(&self.id).is_none() {
            state.heard.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gave_way(slot: &Slot) -> bool {
        slot.dropped_silent.is_cancelled() || slot.dropped_heard.is_cancelled()
    }

    #[test]
    fn a_newcomer_takes_the_place_of_the_oldest_silent_handshake() {
        let pool = Handshakes::new(3);
        let (first, second, third) = (pool.enter(), pool.enter(), pool.enter());
        first.heard();
        let fourth = pool.enter();
        assert!(!gave_way(&first), "heard from: kept");
        assert!(gave_way(&second), "the oldest silent one gave way");
        assert!(!gave_way(&third) && !gave_way(&fourth));
        drop(second);
        assert_eq!(pool.in_progress(), 3);
        // Silent newcomers push each other out, never the one heard from.
        let churn: Vec<Slot> = (0..10).map(|_| pool.enter()).collect();
        assert!(!gave_way(&first));
        assert!(gave_way(&third) && gave_way(&fourth));
        assert_eq!(churn.iter().filter(|s| !gave_way(s)).count(), 2);
    }

    #[test]
    fn with_every_handshake_heard_from_the_oldest_gives_way() {
        let pool = Handshakes::new(2);
        let (first, second) = (pool.enter(), pool.enter());
        first.heard();
        second.heard();
        let third = pool.enter();
        assert!(gave_way(&first) && !gave_way(&second) && !gave_way(&third));
    }

    #[test]
    fn a_finished_handshake_gives_its_slot_back() {
        let pool = Handshakes::new(1);
        let first = pool.enter();
        first.heard();
        drop(first);
        assert_eq!(pool.in_progress(), 0);
        let second = pool.enter();
        assert!(!gave_way(&second));
        assert_eq!(pool.in_progress(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_chosen_as_silent_but_already_heard_goes_on() {
        let pool = Handshakes::new(1);
        let waiting = pool.enter();
        let newcomer = pool.enter();
        assert!(
            gave_way(&waiting),
            "chosen as silent: its task had not run yet"
        );
        // Its task runs now and finds the client's bytes in: no longer dropped.
        waiting.heard();
        let wait = tokio::time::timeout(std::time::Duration::from_secs(1), waiting.dropped());
        assert!(wait.await.is_err(), "a client heard from goes on");
        // One silent when chosen, and still silent, is dropped.
        let _third = pool.enter();
        let dropped = tokio::time::timeout(std::time::Duration::from_secs(1), newcomer.dropped());
        assert!(dropped.await.is_ok());
    }
}
