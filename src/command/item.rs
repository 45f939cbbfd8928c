//! The item-operations core: read, write with a mode, mutate, delete, touch; typed outcomes.
//!
//! Every memcached meaning of an item lives here once; the classic and meta commands (and
//! any further protocol) translate the outcomes into their replies. A conditional write
//! reads the item, decides, and writes back with a precondition on the version it read, so
//! it stays atomic across replicas on a store that honours conditional writes; when another
//! writer got there first, it tries again under [`RETRY`], the one retry policy of the
//! command layer.

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use super::Ctx;
use crate::flush::{Epoch, Flush};
use crate::stats::Stats;
use crate::store::{Entry, History, PutMode, Store, StoreError, Version, Versioned};

/// How often a conditional write is tried before the command gives up on a contended key.
pub const MAX_WRITE_ATTEMPTS: usize = 64;
/// Longest pause between two attempts of a conditional write, in milliseconds.
pub const MAX_BACKOFF_MS: u64 = 50;

/// When a conditional write that lost a race is tried again.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: usize,
    /// Cap of the random pause before an attempt, in milliseconds; the cap doubles from
    /// 2 ms with each attempt, so writers that collide do not collide again in lockstep.
    pub max_backoff_ms: u64,
}

/// The retry policy of every conditional write. Each retry counts in `backend_retries`, each
/// command that runs out of attempts in `backend_retries_exhausted`.
pub const RETRY: RetryPolicy = RetryPolicy {
    max_attempts: MAX_WRITE_ATTEMPTS,
    max_backoff_ms: MAX_BACKOFF_MS,
};

/// The attempts of one conditional write under [`RETRY`].
struct Attempts<'s> {
    stats: &'s Stats,
    made: usize,
}

impl Attempts<'_> {
    /// After a lost race: pauses before the next attempt, or gives up when none is left.
    async fn lost_race(&mut self) -> Result<(), StoreError> {
        self.made += 1;
        if self.made >= RETRY.max_attempts {
            Stats::incr(&self.stats.backend_retries_exhausted);
            return Err(StoreError::Changed);
        }
        Stats::incr(&self.stats.backend_retries);
        let cap_ms = (1u64 << self.made.min(6)).min(RETRY.max_backoff_ms);
        let ms = rand::random::<u64>() % (cap_ms + 1);
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        Ok(())
    }
}

/// Why a read found no live item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// Nothing under the key.
    Absent,
    /// The item's expiry has passed.
    Expired,
    /// A `flush_all` hides the item.
    Flushed,
}

/// What a read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    Hit(Entry),
    /// A live item whose value is streamed: its entry without the value, the version to
    /// open, and the value's length.
    Large(Entry, Version, u64),
    Miss(Miss),
}

/// How fresh the read behind a decision must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// RAM may answer (within its revalidation window).
    Cached,
    /// As the store has it now, RAM serving only to make the read conditional: for decisions
    /// that may answer without writing (`add` finding an item, `cas` a different unique,
    /// `delete` finding none), where a stale RAM entry would answer otherwise than the store.
    Confirmed,
}

/// The item a decision is made on.
#[derive(Debug, Clone, Copy)]
pub struct Found<'e> {
    /// The live item, if any.
    pub live: Option<&'e Entry>,
    /// What the store holds under the key, live or not (expired, flushed).
    pub stored: Option<&'e Entry>,
    /// The stored value is streamed and was not read (the entries' values are empty): its
    /// version and length, for a decision that only shows it.
    pub large: Option<(&'e Version, u64)>,
}

/// What a decision makes of the item found; each carries the outcome it reports.
pub enum Decision<T> {
    /// Nothing to write.
    Answer(T),
    /// Write this entry over the version read.
    Write(Entry, T),
    /// Delete the version read.
    Delete(T),
}

/// How a write treats the item already there (`ms`'s `M`, classic's command name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    Set,
    Add,
    Replace,
    Append,
    Prepend,
}

/// A write: the new item and the conditions it is stored under.
#[derive(Debug, Clone)]
pub struct Write {
    /// Key, client flags, expiry and value; the core sets the cas and the write stamp.
    pub item: Entry,
    pub mode: WriteMode,
    /// `cas`/`C`: set and replace store only over an item with this cas (none: not found);
    /// append and prepend check it when nonzero; add ignores it.
    pub compare_cas: Option<u64>,
    /// `I`: a set whose `compare_cas` is older than the item's stores the value stale
    /// instead of failing.
    pub invalidate: bool,
    /// `E`: the cas of the new version (else the next after the old).
    pub new_cas: Option<u64>,
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Stored this entry.
    Stored(Entry),
    /// The mode's condition failed (add over a live item; replace, append, prepend of none).
    NotStored,
    /// The cas did not match.
    Exists,
    /// A cas write found no item.
    NotFound,
    /// Appending or prepending would pass the item size limit.
    TooLarge,
}

/// An incr/decr, meta's options included.
#[derive(Debug, Clone)]
pub struct Arith {
    pub incr: bool,
    pub delta: u64,
    /// `C`: fail unless the item's cas is this (0 compares nothing, as memcached).
    pub compare_cas: Option<u64>,
    /// `N`/`J`: on a miss, create the counter instead of answering not found.
    pub create: Option<NewCounter>,
    /// `E`: the cas of the new version.
    pub new_cas: Option<u64>,
    /// `T`: the counter's new expiry (absolute, 0 = never).
    pub expires_at: Option<u64>,
}

/// A counter an incr/decr creates on a miss.
#[derive(Debug, Clone, Copy)]
pub struct NewCounter {
    pub initial: u64,
    pub expires_at: u64,
}

/// What an incr/decr did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Counted {
    Done {
        /// The item as written.
        entry: Entry,
        /// The counter's new value.
        value: u64,
        /// Created on a miss.
        created: bool,
        /// The expiry before this command (0 for a created counter).
        was_expiring_at: u64,
    },
    NotFound,
    Exists,
    NonNumeric,
}

/// A delete, meta's options included.
#[derive(Debug, Clone, Copy, Default)]
pub struct Removal {
    /// `C`: delete only an item with this cas.
    pub compare_cas: Option<u64>,
    /// `I`: mark the item stale instead of deleting it.
    pub invalidate: Option<Invalidation>,
}

/// How `md ... I` leaves the item.
#[derive(Debug, Clone, Copy, Default)]
pub struct Invalidation {
    /// `E`: the cas of the stale version.
    pub new_cas: Option<u64>,
    /// `T`: its new expiry.
    pub expires_at: Option<u64>,
}

/// What a delete did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Done,
    NotFound,
    Exists,
}

/// What a touch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Touched {
    /// The item with its new expiry.
    Done(Entry),
    NotFound,
}

/// One request's view of the items: the shared context and when the request arrived.
pub struct Items<'c> {
    ctx: &'c Ctx,
    /// A flush-epoch read started after this moment is fresh enough for the request, so a
    /// burst of pipelined requests shares one.
    arrived: Instant,
}

impl<'c> Items<'c> {
    pub fn new(ctx: &'c Ctx, arrived: Instant) -> Self {
        Items { ctx, arrived }
    }

    /// The live item under `key`, or why there is none.
    pub async fn read(&self, key: &[u8]) -> Result<Read, StoreError> {
        let (read, miss) = self.fetch(key, Freshness::Cached).await?;
        Ok(match (read, miss) {
            (Some(v), None) => match v.large {
                Some(len) => Read::Large(v.entry, v.version, len),
                None => Read::Hit(v.entry),
            },
            (_, miss) => Read::Miss(miss.unwrap_or(Miss::Absent)),
        })
    }

    /// Reads a key with the flush epoch: the stored version and, when it is not live, why.
    async fn fetch(
        &self,
        key: &[u8],
        freshness: Freshness,
    ) -> Result<(Option<Versioned>, Option<Miss>), StoreError> {
        let ctx = self.ctx;
        let read = async {
            match freshness {
                Freshness::Cached => ctx.store.get(key).await,
                Freshness::Confirmed => ctx.store.get_confirmed(key).await,
            }
        };
        let (read, epoch_us) = tokio::try_join!(read, ctx.flush.current(self.arrived))?;
        let now_us = ctx.clock.now_us();
        let miss = match &read {
            None => Some(Miss::Absent),
            Some(v) => hidden(&v.entry, epoch_us, now_us),
        };
        Ok((read, miss))
    }

    /// Reads, decides, and writes (or deletes) with a precondition on the version read;
    /// decides again on a fresh read when another writer got there first, under [`RETRY`].
    /// A decision that `needs_value` is not made on an item whose value is streamed (it is
    /// not held: [`StoreError::TooLarge`]); others see it with an empty value.
    pub async fn mutate<T>(
        &self,
        key: &[u8],
        freshness: Freshness,
        needs_value: bool,
        mut decide: impl FnMut(Found<'_>) -> Decision<T>,
    ) -> Result<T, StoreError> {
        let mut attempts = Attempts {
            stats: &self.ctx.stats,
            made: 0,
        };
        loop {
            let (read, miss) = self.fetch(key, freshness).await?;
            if needs_value && read.as_ref().is_some_and(|v| v.large.is_some()) {
                return Err(StoreError::TooLarge);
            }
            let stored = read.as_ref().map(|v| &v.entry);
            let found = Found {
                live: stored.filter(|_| miss.is_none()),
                stored,
                large: read.as_ref().and_then(|v| Some((&v.version, v.large?))),
            };
            let version = read.as_ref().map(|v| &v.version);
            let (done, outcome) = match (decide(found), version) {
                (Decision::Answer(outcome), _) | (Decision::Delete(outcome), None) => {
                    return Ok(outcome)
                }
                (Decision::Write(mut entry, outcome), version) => {
                    // The write carries on the history of the version it read, so that if
                    // its answer is lost the store can tell whether it was applied.
                    entry.history = match &read {
                        Some(base) => base.entry.history.next(),
                        None => History::start(true),
                    };
                    let mode = version.map_or(PutMode::Create, |v| PutMode::Update(v.clone()));
                    (
                        self.ctx.store.put(&entry, mode).await.map(|_| true),
                        outcome,
                    )
                }
                (Decision::Delete(outcome), Some(version)) => {
                    (self.ctx.store.delete(key, Some(version)).await, outcome)
                }
            };
            match done {
                Ok(true) => return Ok(outcome),
                Ok(false) | Err(StoreError::Exists | StoreError::Changed) => {
                    attempts.lost_race().await?
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stores an item under its mode and conditions.
    pub async fn write(&self, write: Write) -> Result<Written, StoreError> {
        Stats::incr(&self.ctx.stats.cmd_set);
        let plain = write.mode == WriteMode::Set && write.compare_cas.is_none();
        let outcome = if plain {
            let mut entry = self.stamp(write.item, None, write.new_cas);
            // A blind write reads nothing: its history starts with it.
            entry.history = History::start(false);
            self.ctx.store.put(&entry, PutMode::Overwrite).await?;
            Written::Stored(entry)
        } else {
            let key = write.item.key.clone();
            let joins = matches!(write.mode, WriteMode::Append | WriteMode::Prepend);
            // Boxed: a plain set's future stays small (see `command::dispatch`).
            Box::pin(self.mutate(&key, Freshness::Confirmed, joins, |found| {
                self.decide_write(&write, found.live)
            }))
            .await?
        };
        if let Written::Stored(entry) = &outcome {
            Stats::incr(&self.ctx.stats.total_items);
            self.ctx.writes.stored(&entry.key, entry.expires_at);
        }
        Ok(outcome)
    }

    /// What a conditional write does with the live item.
    fn decide_write(&self, w: &Write, live: Option<&Entry>) -> Decision<Written> {
        // As memcached: the cas turns set and replace into cas (where `I` with an older cas
        // stores the value stale), is a plain check for append/prepend, and add ignores it.
        let mut stale = false;
        let cas_mode = matches!(w.mode, WriteMode::Set | WriteMode::Replace);
        if let Some(want) = w.compare_cas.filter(|_| cas_mode) {
            match live {
                None => return Decision::Answer(Written::NotFound),
                Some(old) if old.cas != want => {
                    if !(w.invalidate && want < old.cas) {
                        return Decision::Answer(Written::Exists);
                    }
                    stale = true;
                }
                Some(_) => {}
            }
        }
        let check = w.compare_cas.filter(|&c| c != 0 && !cas_mode);
        let entry = match (w.mode, live) {
            (WriteMode::Add, Some(_)) => return Decision::Answer(Written::NotStored),
            (WriteMode::Set | WriteMode::Add, _) | (WriteMode::Replace, Some(_)) => w.item.clone(),
            (_, None) => return Decision::Answer(Written::NotStored),
            (_, Some(old)) if check.is_some_and(|want| want != old.cas) => {
                return Decision::Answer(Written::Exists)
            }
            (_, Some(old)) => match self.joined(old, &w.item.value, w.mode) {
                Some(entry) => entry,
                None => return Decision::Answer(Written::TooLarge),
            },
        };
        let mut entry = self.stamp(entry, live, w.new_cas);
        entry.stale = stale;
        entry.win_sent = false;
        if let Some(old) = live.filter(|_| stale) {
            // As memcached: a stale recache keeps the item's TTL and its handed-out win,
            // so the next mg sees Z and only one client wins the recache.
            entry.expires_at = old.expires_at;
            entry.win_sent = old.win_sent;
        }
        Decision::Write(entry.clone(), Written::Stored(entry))
    }

    /// `old` with `data` appended or prepended, unless that passes the item size limit.
    fn joined(&self, old: &Entry, data: &[u8], mode: WriteMode) -> Option<Entry> {
        if old.value.len() + data.len() > self.ctx.settings.max_item_bytes {
            return None;
        }
        let (first, second) = match mode {
            WriteMode::Prepend => (data, &old.value[..]),
            _ => (&old.value[..], data),
        };
        let mut value = BytesMut::with_capacity(first.len() + second.len());
        value.extend_from_slice(first);
        value.extend_from_slice(second);
        Some(Entry {
            value: value.freeze(),
            ..old.clone()
        })
    }

    /// Adds to or subtracts from a counter, as memcached's incr/decr and `ma`.
    pub async fn arith(&self, key: &Bytes, a: &Arith) -> Result<Counted, StoreError> {
        let outcome = self
            // A streamed value (empty here) is never a number: non-numeric, as in memcached.
            .mutate(key, Freshness::Confirmed, false, |found| {
                self.decide_arith(key, a, found)
            })
            .await?;
        let stats = &self.ctx.stats;
        let (hits, misses) = if a.incr {
            (&stats.incr_hits, &stats.incr_misses)
        } else {
            (&stats.decr_hits, &stats.decr_misses)
        };
        match outcome {
            Counted::Done { .. } => Stats::incr(hits),
            Counted::NotFound => Stats::incr(misses),
            Counted::Exists | Counted::NonNumeric => {}
        }
        Ok(outcome)
    }

    fn decide_arith(&self, key: &Bytes, a: &Arith, found: Found<'_>) -> Decision<Counted> {
        let (entry, value, expires_at) = match found.live {
            None => {
                let Some(new) = a.create else {
                    return Decision::Answer(Counted::NotFound);
                };
                let entry = Entry {
                    key: key.clone(),
                    value: Bytes::from(new.initial.to_string()),
                    ..Entry::default()
                };
                (entry, new.initial, new.expires_at)
            }
            Some(old) => {
                // memcached refuses an empty value as non-numeric before it compares a cas.
                if old.value.is_empty() {
                    return Decision::Answer(Counted::NonNumeric);
                }
                if a.compare_cas
                    .is_some_and(|want| want != 0 && want != old.cas)
                {
                    return Decision::Answer(Counted::Exists);
                }
                let Some(current) = crate::protocol::parse_counter(&old.value) else {
                    return Decision::Answer(Counted::NonNumeric);
                };
                let value = apply_delta(current, a.delta, a.incr);
                (
                    counted(old, value),
                    value,
                    a.expires_at.unwrap_or(old.expires_at),
                )
            }
        };
        let was_expiring_at = entry.expires_at;
        let mut entry = self.stamp(entry, found.live, a.new_cas);
        entry.expires_at = expires_at;
        let outcome = Counted::Done {
            entry: entry.clone(),
            value,
            created: found.live.is_none(),
            was_expiring_at,
        };
        Decision::Write(entry, outcome)
    }

    /// Deletes the live item (or marks it stale), under its conditions.
    pub async fn delete(&self, key: &[u8], removal: Removal) -> Result<Deleted, StoreError> {
        // Marking stale writes the item back, value and all.
        let rewrites = removal.invalidate.is_some();
        let outcome = self
            .mutate(key, Freshness::Confirmed, rewrites, |found| {
                let Some(old) = found.live else {
                    return Decision::Answer(Deleted::NotFound);
                };
                if removal.compare_cas.is_some_and(|want| want != old.cas) {
                    return Decision::Answer(Deleted::Exists);
                }
                let Some(how) = removal.invalidate else {
                    return Decision::Delete(Deleted::Done);
                };
                let entry = Entry {
                    stale: true,
                    win_sent: false,
                    cas: how.new_cas.unwrap_or_else(|| self.ctx.next_cas(Some(old))),
                    expires_at: how.expires_at.unwrap_or(old.expires_at),
                    ..old.clone()
                };
                Decision::Write(entry, Deleted::Done)
            })
            .await?;
        match outcome {
            Deleted::Done => Stats::incr(&self.ctx.stats.delete_hits),
            Deleted::NotFound => Stats::incr(&self.ctx.stats.delete_misses),
            Deleted::Exists => {}
        }
        Ok(outcome)
    }

    /// Deletes whatever is under `key`, unconditionally (a `set` too large for the cache).
    pub async fn discard(&self, key: &[u8]) -> Result<(), StoreError> {
        self.ctx.store.delete(key, None).await.map(|_| ())
    }

    /// Gives the live item a new expiry (absolute, 0 = never); its cas stays.
    pub async fn touch(&self, key: &[u8], expires_at: u64) -> Result<Touched, StoreError> {
        let outcome = self
            .mutate(key, Freshness::Confirmed, true, |found| match found.live {
                None => Decision::Answer(Touched::NotFound),
                Some(old) => {
                    let entry = Entry {
                        expires_at,
                        ..old.clone()
                    };
                    Decision::Write(entry.clone(), Touched::Done(entry))
                }
            })
            .await?;
        match outcome {
            Touched::Done(_) => Stats::incr(&self.ctx.stats.touch_hits),
            Touched::NotFound => Stats::incr(&self.ctx.stats.touch_misses),
        }
        Ok(outcome)
    }

    /// A new version of an item: the given cas, else the next after `previous`; written now.
    pub fn stamp(&self, mut entry: Entry, previous: Option<&Entry>, cas: Option<u64>) -> Entry {
        entry.cas = cas.unwrap_or_else(|| self.ctx.next_cas(previous));
        entry.stored_at_us = self.ctx.clock.now_us();
        entry
    }
}

/// Why a stored entry is not visible at `now_us` under the flush epoch (`None`: it is).
pub(super) fn hidden(entry: &Entry, epoch_us: Epoch, now_us: u64) -> Option<Miss> {
    if entry.expires_at != 0 && entry.expires_at <= now_us / 1_000_000 {
        Some(Miss::Expired)
    } else if Flush::hides(epoch_us, entry, now_us) {
        Some(Miss::Flushed)
    } else {
        None
    }
}

/// The incr/decr arithmetic: incr wraps at 2^64, decr stops at 0.
fn apply_delta(current: u64, delta: u64, incr: bool) -> u64 {
    if incr {
        current.wrapping_add(delta)
    } else {
        current.saturating_sub(delta)
    }
}

/// The stored form of a new counter value: as memcached writes it in place, padded with
/// spaces to the old length when it is shorter (`decr` of `10` reads back as `9 `).
fn counter_bytes(value: u64, old_len: usize) -> Bytes {
    let mut text = value.to_string().into_bytes();
    if text.len() < old_len {
        text.resize(old_len, b' ');
    }
    Bytes::from(text)
}

/// An item after incr/decr to `value`. memcached rewrites it in place when the number
/// fits (keeping its meta stale/win marks) and else writes a new item without them.
fn counted(old: &Entry, value: u64) -> Entry {
    let value = counter_bytes(value, old.value.len());
    let in_place = value.len() <= old.value.len();
    Entry {
        value,
        stale: old.stale && in_place,
        win_sent: old.win_sent && in_place,
        ..old.clone()
    }
}
