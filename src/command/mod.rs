//! Executes requests against the store: memcached's semantics, returned as a [`Response`].
//!
//! Execution never touches the socket. Store errors become wire replies in exactly one
//! place, [`Ctx::failure`]. Read-modify-write commands (add, replace, append, prepend, cas,
//! incr/decr, touch) read the item and write back with a precondition on the version read,
//! retrying when another writer got there first, so they stay atomic across replicas on a
//! store that honours conditional writes.

mod detail;
mod meta;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::stream::{self, StreamExt};

use crate::clock::Clock;
use crate::culler::WriteHint;
use crate::flush::{Epoch, Flush};
use crate::protocol::{ProtocolError, Request, Response, StoreMode, Value};
use crate::stats::Stats;
use crate::store::{Entry, PutMode, Store, StoreError, Versioned};
use crate::tier::Tiered;

/// How many keys of one multi-key get are fetched at once.
pub const MAX_GET_FANOUT: usize = 64;
/// How often a read-modify-write is retried after losing a race.
pub const MAX_WRITE_RETRIES: usize = 64;
/// Largest retrieval reply held in memory; beyond it memcached's own error is returned.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// cas uniques stay in 1..=MAX_CAS.
pub const MAX_CAS: u64 = u32::MAX as u64;

/// Server settings the commands consult.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_item_bytes: usize,
    /// `flush_all` allowed (memcached's `-F` turns it off).
    pub flush_enabled: bool,
    /// Answer a failed read as a miss instead of `SERVER_ERROR`.
    pub miss_on_backend_error: bool,
    /// Rows of `stats settings`.
    pub settings_rows: Vec<(String, String)>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_item_bytes: crate::protocol::Limits::default().max_item_bytes,
            flush_enabled: true,
            miss_on_backend_error: false,
            settings_rows: Vec::new(),
        }
    }
}

/// Everything a command needs; shared by all connections.
pub struct Ctx {
    /// The backend behind the near tier.
    pub store: Arc<Tiered>,
    pub flush: Arc<Flush>,
    pub stats: Arc<Stats>,
    pub clock: Clock,
    pub settings: Settings,
    pub started_us: u64,
    /// Tells the culler about writes, so it can run early when the bound is near.
    pub write_hint: Arc<WriteHint>,
    /// `stats detail` counts.
    pub detail: detail::PrefixStats,
}

/// What a read-modify-write step decides, given the live item (if any).
enum Step {
    /// Reply without writing.
    Answer(Response),
    /// Write this entry; reply with the response on success.
    Write(Entry, Response),
}

impl Ctx {
    pub fn new(
        store: Arc<Tiered>,
        flush: Arc<Flush>,
        stats: Arc<Stats>,
        clock: Clock,
        settings: Settings,
        write_hint: Arc<WriteHint>,
    ) -> Self {
        Ctx {
            store,
            flush,
            stats,
            started_us: clock.now_us(),
            clock,
            settings,
            write_hint,
            detail: detail::PrefixStats::default(),
        }
    }

    /// Counts a stored item, with its key and expiry when the caller knows them.
    fn stored(&self, written: Option<(&[u8], u64)>) {
        Stats::incr(&self.stats.total_items);
        self.write_hint.wrote(written);
    }

    /// The cas unique for a new version of an item: one more than the version it replaces
    /// when that is known (a chain that conditional writes keep linear, so never repeated),
    /// else random. Always nonzero and below 2^32, because clients parse cas values into
    /// 32-bit fields (meta-memcache) or signed integers (PHP, Java) and memcached's own
    /// counter stays small in practice.
    pub fn next_cas(&self, previous: Option<&Entry>) -> u64 {
        match previous {
            Some(old) => (old.cas % MAX_CAS) + 1,
            None => rand::random::<u64>() % MAX_CAS + 1,
        }
    }

    /// Whether a stored entry is visible now: not expired and not flushed.
    fn live(&self, entry: &Entry, epoch_us: Epoch, now_us: u64) -> Liveness {
        if entry.expires_at != 0 && entry.expires_at <= now_us / 1_000_000 {
            Liveness::Expired
        } else if Flush::hides(epoch_us, entry, now_us) {
            Liveness::Flushed
        } else {
            Liveness::Live
        }
    }

    /// The one place a store error becomes a reply.
    fn failure(&self, err: StoreError) -> Response {
        Stats::incr(&self.stats.backend_errors);
        match err {
            StoreError::Unavailable(why) => {
                tracing::warn!(cause = %why, "backend call failed");
                Response::ServerError(short_reason(&why))
            }
            StoreError::Exists | StoreError::Changed => {
                Response::ServerError("too much contention on key".into())
            }
        }
    }

    /// Reads a key, answering what is live (with its stored version).
    async fn read_live(&self, key: &[u8]) -> Result<(Option<Versioned>, Liveness), StoreError> {
        self.read_live_from(key, false).await
    }

    /// Reads a key as the store has it now, RAM serving only to make the read conditional:
    /// for commands that may answer from what they read without writing (`add` finding an
    /// item, `cas` a different unique, `delete` finding none), where a stale RAM entry would
    /// give another answer than the store.
    async fn read_confirmed(
        &self,
        key: &[u8],
    ) -> Result<(Option<Versioned>, Liveness), StoreError> {
        self.read_live_from(key, true).await
    }

    async fn read_live_from(
        &self,
        key: &[u8],
        confirmed: bool,
    ) -> Result<(Option<Versioned>, Liveness), StoreError> {
        let asked_at = ARRIVED
            .try_with(|t| *t)
            .unwrap_or_else(|_| tokio::time::Instant::now());
        let read = async {
            if confirmed {
                self.store.get_confirmed(key).await
            } else {
                self.store.get(key).await
            }
        };
        let (read, epoch_us) = tokio::try_join!(read, self.flush.current(asked_at))?;
        let now = self.clock.now_us();
        let liveness = match &read {
            Some(v) => self.live(&v.entry, epoch_us, now),
            None => Liveness::Missing,
        };
        Ok((read, liveness))
    }

    /// Read, decide, write with a precondition on what was read; retry on a lost race.
    async fn read_modify_write<F>(&self, key: &[u8], mut decide: F) -> Response
    where
        F: FnMut(Option<&Entry>) -> Step,
    {
        for attempt in 0..MAX_WRITE_RETRIES {
            if attempt > 0 {
                Stats::incr(&self.stats.backend_retries);
                contention_backoff(attempt).await;
            }
            let (read, liveness) = match self.read_confirmed(key).await {
                Ok(r) => r,
                Err(e) => return self.failure(e),
            };
            let live = read
                .as_ref()
                .filter(|_| liveness == Liveness::Live)
                .map(|v| &v.entry);
            let (entry, reply) = match decide(live) {
                Step::Answer(reply) => return reply,
                Step::Write(entry, reply) => (entry, reply),
            };
            let mode = match &read {
                Some(v) => PutMode::Update(v.version.clone()),
                None => PutMode::Create,
            };
            match self.store.put(&entry, mode).await {
                Ok(_) => return reply,
                Err(StoreError::Exists | StoreError::Changed) => continue,
                Err(e) => return self.failure(e),
            }
        }
        self.failure(StoreError::Changed)
    }

    /// A new entry stamped with the next cas after `previous` and the current time.
    fn stamp(&self, mut entry: Entry, previous: Option<&Entry>) -> Entry {
        entry.cas = self.next_cas(previous);
        entry.stored_at_us = self.clock.now_us();
        entry
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Liveness {
    Missing,
    Live,
    Expired,
    Flushed,
}

/// A short random pause after losing a race, growing with the attempt, so writers that
/// collide on one key do not collide again in lockstep.
async fn contention_backoff(attempt: usize) {
    let cap_ms = (1u64 << attempt.min(6)).min(MAX_BACKOFF_MS);
    let ms = rand::random::<u64>() % (cap_ms + 1);
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}

/// Longest pause between read-modify-write attempts.
const MAX_BACKOFF_MS: u64 = 50;

/// The first line of a backend error, bounded, for `SERVER_ERROR`.
fn short_reason(why: &str) -> String {
    let line = why.lines().next().unwrap_or("backend error");
    line.chars().take(120).collect()
}

fn reply(noreply: bool, response: Response) -> Response {
    // memcached suppresses every reply under noreply, errors included (its out_string skips
    // the reply whenever the command set noreply), so a client's replies never shift.
    if noreply {
        Response::None
    } else {
        response
    }
}

tokio::task_local! {
    /// When the request being executed arrived: a flush epoch read started after this
    /// moment is fresh enough for it, so a burst of pipelined reads shares one.
    static ARRIVED: tokio::time::Instant;
}

/// Executes one request that arrived at `arrived`.
pub async fn execute_arrived(
    ctx: &Ctx,
    request: Request,
    arrived: tokio::time::Instant,
) -> Response {
    ARRIVED.scope(arrived, execute(ctx, request)).await
}

/// Executes one request.
pub async fn execute(ctx: &Ctx, request: Request) -> Response {
    match request {
        Request::Get { keys, cas, end } => retrieve(ctx, keys, cas, None, end).await,
        Request::Gat {
            exptime,
            keys,
            cas,
            end,
        } => retrieve(ctx, keys, cas, Some(exptime), end).await,
        Request::Store {
            mode,
            key,
            flags,
            exptime,
            data,
            cas_unique,
            noreply,
        } => {
            ctx.detail.set(&key);
            let r = store(ctx, mode, key, flags, exptime, data, cas_unique).await;
            reply(noreply, r)
        }
        Request::TooLarge {
            key,
            remove_old,
            noreply,
        } => {
            ctx.detail.set(&key);
            if remove_old {
                if let Err(e) = ctx.store.delete(&key, None).await {
                    return ctx.failure(e);
                }
            }
            reply(noreply, Response::Error(ProtocolError::TOO_LARGE))
        }
        Request::Delete { key, noreply } => {
            ctx.detail.delete(&key);
            reply(noreply, delete(ctx, &key).await)
        }
        Request::Arith {
            key,
            delta,
            incr,
            noreply,
        } => reply(noreply, arith(ctx, &key, delta, incr).await),
        Request::Touch {
            key,
            exptime,
            noreply,
        } => reply(noreply, touch(ctx, &key, exptime).await),
        Request::FlushAll { delay, noreply } => reply(noreply, flush_all(ctx, delay).await),
        Request::Version => Response::Version(crate::VERSION.into()),
        Request::Verbosity { noreply } => reply(noreply, Response::Ok),
        Request::Stats { arg } => stats(ctx, arg.as_deref()),
        Request::Meta(m) => meta::execute(ctx, m).await,
        Request::Invalid(e) => Response::Error(e),
        Request::Silent => Response::None,
        Request::Quit => Response::Close,
        Request::Hangup(why) => {
            if let Some(suppressed) = crate::throttle::REFUSED_CONNECTIONS.allow() {
                tracing::info!(reason = why, suppressed, "closing connection");
            }
            Response::Close
        }
    }
}

/// Answers a `get`/`gets` from the near tier alone, with no I/O, when every key is there
/// and fresh and the flush epoch is known; `None` sends the request down the usual path.
pub fn answer_from_tier(ctx: &Ctx, request: &Request) -> Option<Response> {
    let Request::Get { keys, cas, end } = request else {
        return None;
    };
    let epoch = ctx.flush.current_now()?;
    let now_us = ctx.clock.now_us();
    let mut values = Vec::with_capacity(keys.len());
    let mut bytes = 0;
    for key in keys {
        let item = ctx.store.peek_fresh(key)?;
        if ctx.live(&item.entry, epoch, now_us) != Liveness::Live {
            return None;
        }
        bytes += item.entry.value.len() + item.entry.key.len();
        if bytes > MAX_RESPONSE_BYTES {
            return None;
        }
        values.push(to_value(item.entry));
    }
    for key in keys {
        ctx.detail.get(key, true);
    }
    let n = keys.len() as u64;
    Stats::add(&ctx.stats.cmd_get, n);
    Stats::add(&ctx.stats.get_hits, n);
    Stats::add(&ctx.stats.tier_hits, n);
    Some(Response::Values {
        values,
        with_cas: *cas,
        end: *end,
    })
}

async fn retrieve(
    ctx: &Ctx,
    keys: Vec<Bytes>,
    with_cas: bool,
    touch: Option<i64>,
    end: bool,
) -> Response {
    let stats = &ctx.stats;
    Stats::add(&stats.cmd_get, keys.len() as u64);
    if touch.is_some() {
        Stats::add(&stats.cmd_touch, keys.len() as u64);
    }
    // A key named twice in one gat is touched twice in order, as memcached does: the second
    // sees what the first wrote.
    let fanout = if touch.is_some() && has_duplicates(&keys) {
        1
    } else {
        MAX_GET_FANOUT
    };
    let mut results = stream::iter(keys)
        .map(|key| async move {
            let counted = key.clone();
            let r = match touch {
                None => get_one(ctx, key).await,
                Some(exptime) => touch_one(ctx, key, exptime).await,
            };
            ctx.detail.get(&counted, matches!(r, Ok(Some(_))));
            r
        })
        .buffered(fanout);
    let mut values = Vec::new();
    let mut bytes = 0;
    while let Some(r) = results.next().await {
        match r {
            Ok(Some(v)) => {
                bytes += v.data.len() + v.key.len();
                if bytes > MAX_RESPONSE_BYTES {
                    return Response::Error(ProtocolError::Server(
                        "out of memory writing get response",
                    ));
                }
                values.push(v);
            }
            Ok(None) => {}
            Err(failure) => return failure,
        }
    }
    Response::Values {
        values,
        with_cas,
        end,
    }
}

fn has_duplicates(keys: &[Bytes]) -> bool {
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    !keys.iter().all(|k| seen.insert(k))
}

fn to_value(entry: Entry) -> Value {
    Value {
        key: entry.key,
        flags: entry.flags,
        cas: entry.cas,
        data: entry.value,
    }
}

/// One key of a get: the live value, a miss, or the failure reply.
async fn get_one(ctx: &Ctx, key: Bytes) -> Result<Option<Value>, Response> {
    let stats = &ctx.stats;
    match ctx.read_live(&key).await {
        Ok((Some(v), Liveness::Live)) => {
            Stats::incr(&stats.get_hits);
            Ok(Some(to_value(v.entry)))
        }
        Ok((_, liveness)) => {
            Stats::incr(&stats.get_misses);
            match liveness {
                Liveness::Expired => Stats::incr(&stats.get_expired),
                Liveness::Flushed => Stats::incr(&stats.get_flushed),
                _ => {}
            }
            Ok(None)
        }
        Err(e) if ctx.settings.miss_on_backend_error => {
            ctx.failure(e);
            Stats::incr(&stats.get_misses);
            Ok(None)
        }
        Err(e) => Err(ctx.failure(e)),
    }
}

/// One key of a gat: the live value with its new expiry written back.
async fn touch_one(ctx: &Ctx, key: Bytes, exptime: i64) -> Result<Option<Value>, Response> {
    let expires_at = ctx.clock.expires_at(exptime);
    let mut found = None;
    let r = ctx
        .read_modify_write(&key, |live| match live {
            None => Step::Answer(Response::NotFound),
            Some(e) => {
                let touched = Entry {
                    expires_at,
                    ..e.clone()
                };
                found = Some(touched.clone());
                Step::Write(touched, Response::Touched)
            }
        })
        .await;
    match r {
        Response::Touched => {
            Stats::incr(&ctx.stats.get_hits);
            Stats::incr(&ctx.stats.touch_hits);
            Ok(found.map(to_value))
        }
        Response::NotFound => {
            Stats::incr(&ctx.stats.get_misses);
            Stats::incr(&ctx.stats.touch_misses);
            Ok(None)
        }
        failure => Err(failure),
    }
}

// Over 80 lines: split by the core refactor (issue 9).
#[allow(clippy::too_many_lines)]
async fn store(
    ctx: &Ctx,
    mode: StoreMode,
    key: Bytes,
    flags: u32,
    exptime: i64,
    data: Bytes,
    cas_unique: u64,
) -> Response {
    Stats::incr(&ctx.stats.cmd_set);
    let fresh = Entry {
        key: key.clone(),
        flags,
        expires_at: ctx.clock.expires_at(exptime),
        value: data,
        ..Entry::default()
    };
    let max = ctx.settings.max_item_bytes;
    let expires_at = fresh.expires_at;
    let response = match mode {
        StoreMode::Set => match ctx
            .store
            .put(&ctx.stamp(fresh, None), PutMode::Overwrite)
            .await
        {
            Ok(_) => Response::Stored,
            Err(e) => return ctx.failure(e),
        },
        StoreMode::Add => {
            ctx.read_modify_write(&key, |live| match live {
                Some(_) => Step::Answer(Response::NotStored),
                None => Step::Write(ctx.stamp(fresh.clone(), None), Response::Stored),
            })
            .await
        }
        StoreMode::Replace => {
            ctx.read_modify_write(&key, |live| match live {
                None => Step::Answer(Response::NotStored),
                Some(old) => Step::Write(ctx.stamp(fresh.clone(), Some(old)), Response::Stored),
            })
            .await
        }
        StoreMode::Append | StoreMode::Prepend => {
            ctx.read_modify_write(&key, |live| {
                let Some(old) = live else {
                    return Step::Answer(Response::NotStored);
                };
                if old.value.len() + fresh.value.len() > max {
                    return Step::Answer(Response::ServerError(
                        "out of memory storing object".into(),
                    ));
                }
                let value = if mode == StoreMode::Append {
                    concat(&old.value, &fresh.value)
                } else {
                    concat(&fresh.value, &old.value)
                };
                let entry = Entry {
                    value,
                    stale: false,
                    win_sent: false,
                    ..old.clone()
                };
                Step::Write(ctx.stamp(entry, Some(old)), Response::Stored)
            })
            .await
        }
        StoreMode::Cas => {
            let r = ctx
                .read_modify_write(&key, |live| match live {
                    None => Step::Answer(Response::NotFound),
                    Some(old) if old.cas != cas_unique => Step::Answer(Response::Exists),
                    Some(old) => Step::Write(ctx.stamp(fresh.clone(), Some(old)), Response::Stored),
                })
                .await;
            match r {
                Response::Stored => Stats::incr(&ctx.stats.cas_hits),
                Response::Exists => Stats::incr(&ctx.stats.cas_badval),
                Response::NotFound => Stats::incr(&ctx.stats.cas_misses),
                _ => {}
            }
            r
        }
    };
    if response == Response::Stored {
        // Append and prepend keep the old expiry, which is not known here.
        let keeps_expiry = matches!(mode, StoreMode::Append | StoreMode::Prepend);
        ctx.stored((!keeps_expiry).then_some((&key[..], expires_at)));
    }
    response
}

fn concat(a: &[u8], b: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(a.len() + b.len());
    out.extend_from_slice(a);
    out.extend_from_slice(b);
    out.freeze()
}

async fn delete(ctx: &Ctx, key: &[u8]) -> Response {
    for _ in 0..MAX_WRITE_RETRIES {
        let (read, liveness) = match ctx.read_confirmed(key).await {
            Ok(r) => r,
            Err(e) => return ctx.failure(e),
        };
        let Some(read) = read.filter(|_| liveness == Liveness::Live) else {
            Stats::incr(&ctx.stats.delete_misses);
            return Response::NotFound;
        };
        match ctx.store.delete(key, Some(&read.version)).await {
            Ok(true) => {
                Stats::incr(&ctx.stats.delete_hits);
                return Response::Deleted;
            }
            Ok(false) | Err(StoreError::Changed | StoreError::Exists) => continue,
            Err(e) => return ctx.failure(e),
        }
    }
    ctx.failure(StoreError::Changed)
}

/// Parses an item's data as memcached's incr does.
fn parse_counter(value: &[u8]) -> Option<u64> {
    crate::protocol::parse_counter(value)
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

const NON_NUMERIC: ProtocolError =
    ProtocolError::Client("cannot increment or decrement non-numeric value");

async fn arith(ctx: &Ctx, key: &[u8], delta: u64, incr: bool) -> Response {
    let r = ctx
        .read_modify_write(key, |live| {
            let Some(old) = live else {
                return Step::Answer(Response::NotFound);
            };
            let Some(current) = parse_counter(&old.value) else {
                return Step::Answer(Response::Error(NON_NUMERIC));
            };
            let next = apply_delta(current, delta, incr);
            let entry = counted(old, next);
            Step::Write(ctx.stamp(entry, Some(old)), Response::Number(next))
        })
        .await;
    let (hits, misses) = if incr {
        (&ctx.stats.incr_hits, &ctx.stats.incr_misses)
    } else {
        (&ctx.stats.decr_hits, &ctx.stats.decr_misses)
    };
    match r {
        Response::Number(_) => Stats::incr(hits),
        Response::NotFound => Stats::incr(misses),
        _ => {}
    }
    r
}

async fn touch(ctx: &Ctx, key: &[u8], exptime: i64) -> Response {
    Stats::incr(&ctx.stats.cmd_touch);
    let expires_at = ctx.clock.expires_at(exptime);
    let r = ctx
        .read_modify_write(key, |live| match live {
            None => Step::Answer(Response::NotFound),
            Some(e) => Step::Write(
                Entry {
                    expires_at,
                    ..e.clone()
                },
                Response::Touched,
            ),
        })
        .await;
    match r {
        Response::Touched => Stats::incr(&ctx.stats.touch_hits),
        Response::NotFound => Stats::incr(&ctx.stats.touch_misses),
        _ => {}
    }
    r
}

async fn flush_all(ctx: &Ctx, delay: i64) -> Response {
    if !ctx.settings.flush_enabled {
        return Response::Error(ProtocolError::Client("flush_all not allowed"));
    }
    Stats::incr(&ctx.stats.cmd_flush);
    let now_us = ctx.clock.now_us();
    // The parser keeps the delay in memcached's 32-bit range, so this cannot overflow.
    let at_us = if delay <= 0 {
        now_us
    } else {
        ctx.clock.expires_at(delay).saturating_mul(1_000_000)
    };
    match ctx.flush.flush_at(at_us, now_us).await {
        Ok(()) => {
            if at_us <= now_us {
                // What the epoch now hides need not take room in RAM.
                ctx.store.clear();
            }
            Response::Ok
        }
        Err(e) => ctx.failure(e),
    }
}

fn stats(ctx: &Ctx, arg: Option<&str>) -> Response {
    let words: Vec<&str> = arg.map(|a| a.split(' ').collect()).unwrap_or_default();
    match words.first().copied() {
        None => Response::Stats(general_stats(ctx)),
        Some("settings") => Response::Stats(ctx.settings.settings_rows.clone()),
        Some("reset") => {
            ctx.stats.reset();
            ctx.detail.clear();
            Response::Reset
        }
        Some("detail") => match words.get(1).copied() {
            Some(on @ ("on" | "off")) => {
                ctx.detail.set_enabled(on == "on");
                Response::Ok
            }
            Some("dump") => Response::Prefixes(ctx.detail.dump()),
            _ => Response::Error(ProtocolError::Client("usage: stats detail on|off|dump")),
        },
        Some("cachedump") => cachedump(&words),
        // Slab and item-class internals have no counterpart on S3: empty lists.
        Some("items" | "slabs" | "sizes" | "conns") => Response::Stats(Vec::new()),
        Some(_) => Response::Error(ProtocolError::UnknownCommand),
    }
}

/// memcached's slab classes, the ids `stats cachedump` accepts.
const MAX_SLAB_CLASSES: u64 = 64;

/// `stats cachedump <class> <limit>`: memcached's checks, then an empty listing (there are
/// no slab classes to walk here).
fn cachedump(words: &[&str]) -> Response {
    if words.len() < 3 {
        return Response::Error(ProtocolError::Client("bad command line"));
    }
    let number = |w: &str| crate::protocol::parse_u32_field(w.as_bytes());
    match (number(words[1]), number(words[2])) {
        (Some(id), Some(_)) if u64::from(id) < MAX_SLAB_CLASSES => Response::Stats(Vec::new()),
        (Some(_), Some(_)) => Response::Error(ProtocolError::Client("Illegal slab id")),
        _ => Response::Error(ProtocolError::BAD_FORMAT),
    }
}

fn general_stats(ctx: &Ctx) -> Vec<(String, String)> {
    let now_us = ctx.clock.now_us();
    let info = ctx.store.info();
    let mut rows: Vec<(String, String)> = vec![
        ("pid".into(), std::process::id().to_string()),
        (
            "uptime".into(),
            ((now_us.saturating_sub(ctx.started_us)) / 1_000_000).to_string(),
        ),
        ("time".into(), (now_us / 1_000_000).to_string()),
        ("version".into(), crate::VERSION.into()),
        ("pointer_size".into(), (usize::BITS).to_string()),
    ];
    rows.extend(
        ctx.stats
            .snapshot()
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value.to_string())),
    );
    rows.push(("backend".into(), info.kind.into()));
    rows.push(("backend_atomic".into(), u8::from(info.atomic).to_string()));
    rows.push(("flush_epoch_us".into(), ctx.flush.epoch_us().to_string()));
    let (tier_items, tier_bytes) = ctx.store.usage();
    rows.push(("tier_items".into(), tier_items.to_string()));
    rows.push(("tier_bytes".into(), tier_bytes.to_string()));
    rows
}

#[cfg(test)]
mod tests;
