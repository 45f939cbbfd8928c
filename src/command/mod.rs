//! Executes requests against the store: memcached's semantics, returned as a [`Response`].
//!
//! Execution never touches the socket. Item semantics live once in [`item`], whose typed
//! outcomes the classic commands here and the meta commands in `meta` translate into
//! replies. Store errors become wire replies in exactly one place, [`Ctx::failure`].

mod admin;
mod detail;
mod dump;
pub mod item;
mod meta;
mod report;
mod retrieve;
pub mod upload;

use std::future::{Future, Ready};
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::{BoxFuture, Either};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::culler::WriteListener;
use crate::flush::Flush;
use crate::protocol::{ProtocolError, Request, Response, StoreMode, Value};
use crate::stats::Stats;
use crate::store::{Entry, Store, StoreError};
use crate::tier::Tiered;
use item::{Arith, Counted, Deleted, Items, Miss, Removal, Touched, Write, WriteMode, Written};

/// How many keys of one multi-key get are fetched at once.
pub const MAX_GET_FANOUT: usize = 64;
/// How often a conditional write is tried before giving up on a contended key.
pub const MAX_WRITE_RETRIES: usize = item::MAX_WRITE_ATTEMPTS;
/// Largest retrieval reply held in memory; beyond it memcached's own error is returned.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// cas uniques stay in 1..=MAX_CAS.
pub const MAX_CAS: u64 = u32::MAX as u64;
pub use crate::MEMCACHED_COMPAT_VERSION;

/// Server settings the commands consult.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_item_bytes: usize,
    /// `flush_all` allowed (memcached's `-F` turns it off).
    pub flush_enabled: bool,
    /// Answer a failed read as a miss instead of `SERVER_ERROR`.
    pub miss_on_backend_error: bool,
    /// The `shutdown` command stops the server (memcached's `-A`).
    pub shutdown_enabled: bool,
    /// Rows of `stats settings`; the report fills in those that change at run time.
    pub settings_rows: Vec<(String, String)>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_item_bytes: crate::protocol::Limits::default().max_item_bytes,
            flush_enabled: true,
            miss_on_backend_error: false,
            shutdown_enabled: false,
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
    /// Hears of every stored item (the culler, which runs early when the bound is near).
    pub writes: Arc<dyn WriteListener>,
    /// `stats detail` counts.
    pub detail: detail::PrefixStats,
    /// memcached's verbosity as `verbosity` last set it, shown by `stats settings` (logging
    /// follows `log_level`).
    pub verbosity: AtomicU32,
    /// `lru_crawler` serves dumps: on where the store can dump, until `lru_crawler disable`.
    pub crawler: AtomicBool,
    /// Cancelled by the `shutdown` command; the server then drains as on SIGTERM.
    pub stop: CancellationToken,
    /// The listener and the client connections, for `stats conns`.
    pub conns: Arc<crate::conns::Conns>,
}

impl Ctx {
    pub fn new(
        store: Arc<Tiered>,
        flush: Arc<Flush>,
        stats: Arc<Stats>,
        clock: Clock,
        settings: Settings,
        writes: Arc<dyn WriteListener>,
    ) -> Self {
        Ctx {
            flush,
            stats,
            started_us: clock.now_us(),
            clock,
            settings,
            crawler: AtomicBool::new(store.info().dumps),
            store,
            writes,
            detail: detail::PrefixStats::default(),
            verbosity: AtomicU32::new(0),
            stop: CancellationToken::new(),
            conns: Arc::default(),
        }
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

    /// The one place a store error becomes a reply.
    fn failure(&self, err: StoreError) -> Response {
        let why = match err {
            // Only a retrieval's values are charged as they arrive, and it waits and reads
            // again; anything else refused is answered as memcached answers.
            StoreError::OverBudget(_) => {
                Stats::incr(&self.stats.budget_timeouts);
                return Response::Error(ProtocolError::Server("out of memory"));
            }
            StoreError::Unavailable(why) => why,
            // memcached's words for an item it cannot hold.
            StoreError::TooLarge => return Response::Error(ProtocolError::TOO_LARGE),
            StoreError::Exists | StoreError::Changed => {
                Stats::incr(&self.stats.backend_errors);
                return Response::ServerError("too much contention on key".into());
            }
        };
        Stats::incr(&self.stats.backend_errors);
        tracing::warn!(cause = %why, "backend call failed");
        Response::ServerError(short_reason(&why))
    }
}

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

/// memcached's reply when appending or prepending would pass the item size limit.
const OUT_OF_MEMORY_STORING: ProtocolError = ProtocolError::Server("out of memory storing object");
/// memcached's reply to incr/decr of an item that is not a number.
const NON_NUMERIC: ProtocolError =
    ProtocolError::Client("cannot increment or decrement non-numeric value");

/// Executes one request that arrives now.
pub async fn execute(ctx: &Ctx, request: Request) -> Response {
    execute_arrived(ctx, request, Instant::now()).await
}

/// Executes one request that arrived at `arrived`: a flush epoch read started after that
/// moment is fresh enough for it, so a burst of pipelined reads shares one. Its kind,
/// result and time to the reply go to the metrics.
pub fn execute_arrived(
    ctx: &Ctx,
    request: Request,
    arrived: Instant,
) -> impl Future<Output = Response> + Send + '_ {
    let kind = crate::metrics::kind_of(&request);
    let running = dispatch(ctx, request, arrived);
    async move {
        let response = running.await;
        ctx.stats
            .timings
            .command(kind, &response, arrived.elapsed());
        response
    }
}

/// A command running: its reply at once, or its work, boxed. A command's future can take
/// kilobytes (the largest of the commands' futures); boxed, it is written once, where a
/// request's future is otherwise copied whole at each move (into the connection's
/// pipeline, say).
type Running<'a> = Either<Ready<Response>, BoxFuture<'a, Response>>;

fn done(response: Response) -> Running<'static> {
    Either::Left(std::future::ready(response))
}

fn boxed<'a>(work: impl Future<Output = Response> + Send + 'a) -> Running<'a> {
    Either::Right(Box::pin(work))
}

/// Starts `request`: what needs no I/O is answered here.
fn dispatch(ctx: &Ctx, request: Request, arrived: Instant) -> Running<'_> {
    let items = Items::new(ctx, arrived);
    match request {
        Request::Get { keys, cas, end } => {
            boxed(async move { retrieve::retrieve(&items, ctx, keys, cas, None, end).await })
        }
        Request::Gat {
            exptime,
            keys,
            cas,
            end,
        } => boxed(
            async move { retrieve::retrieve(&items, ctx, keys, cas, Some(exptime), end).await },
        ),
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
            let item = Entry {
                key,
                flags,
                expires_at: ctx.clock.expires_at(exptime),
                value: data,
                ..Entry::default()
            };
            boxed(async move { reply(noreply, store(&items, ctx, mode, item, cas_unique).await) })
        }
        // Its data block streams through the connection, which runs it with
        // `upload::store_streamed`; alone, it has no value to store.
        Request::StoreStreamed { noreply, .. } => done(reply(
            noreply,
            Response::Error(ProtocolError::Server("streamed set without its data")),
        )),
        Request::TooLarge {
            key,
            remove_old,
            noreply,
        } => boxed(async move { too_large(&items, ctx, &key, remove_old, noreply).await }),
        Request::Delete { key, noreply } => {
            ctx.detail.delete(&key);
            boxed(async move { reply(noreply, delete(&items, ctx, &key).await) })
        }
        Request::Arith {
            key,
            delta,
            incr,
            noreply,
        } => boxed(async move { reply(noreply, arith(&items, ctx, &key, delta, incr).await) }),
        Request::Touch {
            key,
            exptime,
            noreply,
        } => boxed(async move { reply(noreply, touch(&items, ctx, &key, exptime).await) }),
        Request::FlushAll { delay, noreply } => {
            boxed(async move { reply(noreply, report::flush_all(ctx, delay).await) })
        }
        Request::Version => done(Response::Version(report::version())),
        Request::Verbosity { level, noreply } => done(reply(noreply, admin::verbosity(ctx, level))),
        Request::CacheMemlimit { megabytes, noreply } => {
            boxed(async move { reply(noreply, admin::cache_memlimit(ctx, megabytes).await) })
        }
        Request::Shutdown(mode) => done(admin::shutdown(ctx, mode)),
        Request::LruCrawler(crawler) => boxed(admin::lru_crawler(ctx, crawler)),
        Request::Stats { arg } => done(report::stats(ctx, arg.as_deref())),
        Request::Meta(m) => boxed(async move { meta::execute(&items, ctx, m).await }),
        Request::Invalid(e) => done(Response::Error(e)),
        Request::Silent => done(Response::None),
        Request::Quit => done(Response::Close),
        Request::Hangup(why) => {
            if let Some(suppressed) = crate::throttle::REFUSED_CONNECTIONS.allow() {
                tracing::info!(reason = why, suppressed, "closing connection");
            }
            done(Response::Close)
        }
    }
}

/// Answers a `get`/`gets` that arrived at `arrived` (when its bytes were read) from the near
/// tier alone, with no I/O, when every key is there and fresh, the flush epoch is known and
/// `admit` takes the reply (the connection charges its memory budget what it will take);
/// `None` sends the request down the usual path, with nothing counted. Freshness is judged
/// at the arrival, so the monotonic clock is read once more, for the latency histogram.
pub fn answer_from_tier(
    ctx: &Ctx,
    request: &Request,
    arrived: Instant,
    admit: impl FnOnce(&Response) -> bool,
) -> Option<Response> {
    let Request::Get { keys, cas, end } = request else {
        return None;
    };
    let epoch = ctx.flush.current_at(arrived)?;
    let now_us = ctx.clock.now_us();
    let mut values = Vec::with_capacity(keys.len());
    let mut bytes = 0;
    let now = ctx.store.now_at(arrived);
    // Keys the tier remembers as missing (no allocation unless there are some).
    let mut absent = Vec::new();
    for (at, key) in keys.iter().enumerate() {
        let Some(entry) = ctx.store.peek_fresh_entry(key, now)? else {
            absent.push(at);
            continue;
        };
        if item::hidden(&entry, epoch, now_us).is_some() {
            return None;
        }
        bytes += entry.value.len() + entry.key.len();
        if bytes > MAX_RESPONSE_BYTES {
            return None;
        }
        values.push(to_value(entry));
    }
    let response = Response::Values {
        values,
        with_cas: *cas,
        end: *end,
    };
    if !admit(&response) {
        return None;
    }
    // Counted as the store path counts a read the near tier answers (Tiered::get).
    let n = keys.len() as u64;
    Stats::add(&ctx.stats.cmd_get, n);
    Stats::add(&ctx.stats.tier_hits, n);
    Stats::add(&ctx.stats.tier_miss_hits, absent.len() as u64);
    for (at, key) in keys.iter().enumerate() {
        let miss = absent.contains(&at).then_some(Miss::Absent);
        count_read(ctx, key, miss, true);
    }
    let kind = crate::metrics::kind_of(request);
    ctx.stats
        .timings
        .command(kind, &response, arrived.elapsed());
    Some(response)
}

/// A storage command refused as too large; a `set` also removes the old item, as
/// memcached's does.
async fn too_large(
    items: &Items<'_>,
    ctx: &Ctx,
    key: &[u8],
    remove_old: bool,
    noreply: bool,
) -> Response {
    ctx.detail.set(key);
    if remove_old {
        if let Err(e) = items.discard(key).await {
            return ctx.failure(e);
        }
    }
    reply(noreply, Response::Error(ProtocolError::TOO_LARGE))
}

fn to_value(entry: Entry) -> Value {
    Value {
        key: entry.key,
        flags: entry.flags,
        cas: entry.cas,
        data: entry.value,
        stream: None,
    }
}

/// Counts how one key of a read ended, in `stats` and, for classic reads (text or binary
/// `get`, `gat`; memcached leaves `mg` out), in `stats detail`: every get and every answer
/// (near tier or store) counts here, once per key.
pub(crate) fn count_read(ctx: &Ctx, key: &[u8], miss: Option<Miss>, classic: bool) {
    let stats = &ctx.stats;
    match miss {
        None => Stats::incr(&stats.get_hits),
        Some(why) => {
            Stats::incr(&stats.get_misses);
            match why {
                Miss::Expired => Stats::incr(&stats.get_expired),
                Miss::Flushed => Stats::incr(&stats.get_flushed),
                Miss::Absent => {}
            }
        }
    }
    if classic {
        ctx.detail.get(key, miss.is_none());
    }
}

async fn store(
    items: &Items<'_>,
    ctx: &Ctx,
    mode: StoreMode,
    item: Entry,
    cas_unique: u64,
) -> Response {
    let (mode, compare_cas) = match mode {
        StoreMode::Set => (WriteMode::Set, None),
        StoreMode::Add => (WriteMode::Add, None),
        StoreMode::Replace => (WriteMode::Replace, None),
        StoreMode::Append => (WriteMode::Append, None),
        StoreMode::Prepend => (WriteMode::Prepend, None),
        StoreMode::Cas => (WriteMode::Set, Some(cas_unique)),
    };
    let write = Write {
        item,
        mode,
        compare_cas,
        invalidate: false,
        new_cas: None,
    };
    let outcome = match items.write(write).await {
        Ok(outcome) => outcome,
        Err(e) => return ctx.failure(e),
    };
    if compare_cas.is_some() {
        let stats = &ctx.stats;
        match outcome {
            Written::Stored(_) => Stats::incr(&stats.cas_hits),
            Written::Exists => Stats::incr(&stats.cas_badval),
            Written::NotFound => Stats::incr(&stats.cas_misses),
            Written::NotStored | Written::TooLarge => {}
        }
    }
    match outcome {
        Written::Stored(_) => Response::Stored,
        Written::NotStored => Response::NotStored,
        Written::Exists => Response::Exists,
        Written::NotFound => Response::NotFound,
        Written::TooLarge => Response::Error(OUT_OF_MEMORY_STORING),
    }
}

async fn delete(items: &Items<'_>, ctx: &Ctx, key: &[u8]) -> Response {
    match items.delete(key, Removal::default()).await {
        Ok(Deleted::Done) => Response::Deleted,
        Ok(Deleted::NotFound) => Response::NotFound,
        Ok(Deleted::Exists) => Response::Exists,
        Err(e) => ctx.failure(e),
    }
}

async fn arith(items: &Items<'_>, ctx: &Ctx, key: &Bytes, delta: u64, incr: bool) -> Response {
    let arith = Arith {
        incr,
        delta,
        compare_cas: None,
        create: None,
        new_cas: None,
        expires_at: None,
    };
    match items.arith(key, &arith).await {
        Ok(Counted::Done { value, .. }) => Response::Number(value),
        Ok(Counted::NotFound) => Response::NotFound,
        Ok(Counted::Exists) => Response::Exists,
        Ok(Counted::NonNumeric) => Response::Error(NON_NUMERIC),
        Err(e) => ctx.failure(e),
    }
}

async fn touch(items: &Items<'_>, ctx: &Ctx, key: &[u8], exptime: i64) -> Response {
    Stats::incr(&ctx.stats.cmd_touch);
    match items.touch(key, ctx.clock.expires_at(exptime)).await {
        Ok(Touched::Done(_)) => Response::Touched,
        Ok(Touched::NotFound) => Response::NotFound,
        Err(e) => ctx.failure(e),
    }
}

#[cfg(test)]
mod tests;
