//! Meta commands (`mg`, `ms`, `md`, `ma`, `me`, `mn`): translations of the item core's
//! outcomes into typed meta replies.
//!
//! What S3 cannot give: `h` (hit before) and `l` (last access) would need a write on every
//! read, so they always answer `h0` and `l0`; `u` is accepted and has nothing to skip.

use bytes::Bytes;

use super::item::{
    Arith, Counted, Decision, Deleted, Found, Freshness, Invalidation, Items, Miss, NewCounter,
    Read, Removal, Write, WriteMode, Written,
};
use super::{Ctx, NON_NUMERIC, OUT_OF_MEMORY_STORING};
use crate::protocol::{
    Markers, MetaArithMode, MetaDebug, MetaFlag, MetaFlags, MetaReply, MetaRequest, MetaSetMode,
    MetaStatus, Response, ReturnFlag,
};
use crate::stats::Stats;
use crate::store::{Entry, Store, StoreError, Version};

pub(super) async fn execute(items: &Items<'_>, ctx: &Ctx, request: MetaRequest) -> Response {
    match request {
        MetaRequest::Noop => meta(MetaReply::new(MetaStatus::Mn, Vec::new())),
        MetaRequest::Get { key, flags } => get(items, ctx, key, flags).await,
        MetaRequest::Set { key, data, flags } => set(items, ctx, key, data, flags).await,
        MetaRequest::Delete { key, flags } => delete(items, ctx, key, flags).await,
        MetaRequest::Arith { key, flags } => arith(items, ctx, key, flags).await,
        MetaRequest::Debug { key, base64 } => debug(items, ctx, key, base64).await,
    }
}

fn meta(reply: MetaReply) -> Response {
    Response::Meta(reply)
}

/// A reply `q` hides (the common case of each command), unless it is an error.
fn quiet(flags: &MetaFlags, hide: bool, reply: MetaReply) -> Response {
    if flags.quiet && hide {
        Response::None
    } else {
        meta(reply)
    }
}

fn remaining_ttl(expires_at: u64, now_secs: u64) -> i64 {
    if expires_at == 0 {
        -1
    } else {
        expires_at.saturating_sub(now_secs) as i64
    }
}

/// New expiry moments (absolute, 0 = never) that memcached applies where `T` and `N` stand
/// among the flags, in request order.
#[derive(Clone, Copy, Default)]
struct Moves {
    /// `T`'s expiry, if the command applies it.
    ttl_at: Option<u64>,
    /// `N`'s expiry, if the item was just created.
    vivify_at: Option<u64>,
}

impl Moves {
    /// The expiry after every move, and as the `R` test saw it.
    fn walk(self, flags: &MetaFlags, initial: u64) -> (u64, u64) {
        let (mut at, mut at_recache) = (initial, initial);
        for f in &flags.ret {
            match (f, self.ttl_at, self.vivify_at) {
                (ReturnFlag::AtNewTtl, Some(t), _) | (ReturnFlag::AtVivify, _, Some(t)) => at = t,
                (ReturnFlag::AtRecache, _, _) => at_recache = at,
                _ => {}
            }
        }
        (at, at_recache)
    }
}

/// The returned flags `flags` asks for, for `entry` (only `k` and `O` when there is none),
/// with `T`/`N` moving the expiry that a later `t` shows.
fn returned(
    flags: &MetaFlags,
    key: &Bytes,
    entry: Option<&Entry>,
    now_secs: u64,
    moves: Moves,
) -> Vec<MetaFlag> {
    let mut out = Vec::with_capacity(flags.ret.len());
    let mut expires_at = entry.map(|e| e.expires_at);
    for f in &flags.ret {
        let moved = match f {
            ReturnFlag::AtNewTtl => moves.ttl_at,
            ReturnFlag::AtVivify => moves.vivify_at,
            _ => None,
        };
        if let (Some(at), Some(_)) = (moved, expires_at) {
            expires_at = Some(at);
        }
        let flag = match (f, entry) {
            // memcached returns `b` right after the key, and only with it.
            (ReturnFlag::Key, _) => MetaFlag::Key {
                key: key.clone(),
                base64: flags.base64,
            },
            (ReturnFlag::Opaque, _) => MetaFlag::Opaque(flags.opaque.clone().unwrap_or_default()),
            (ReturnFlag::Cas, Some(e)) => MetaFlag::Cas(e.cas),
            (ReturnFlag::Flags, Some(e)) => MetaFlag::ClientFlags(e.flags),
            (ReturnFlag::Size, Some(e)) => MetaFlag::Size(e.value.len()),
            (ReturnFlag::Ttl, Some(_)) => {
                MetaFlag::Ttl(remaining_ttl(expires_at.unwrap_or(0), now_secs))
            }
            (ReturnFlag::Hit, Some(_)) => MetaFlag::Hit(false),
            (ReturnFlag::LastAccess, Some(_)) => MetaFlag::LastAccess(0),
            _ => continue,
        };
        out.push(flag);
    }
    out
}

/// A reply about a missing item: only the flags that echo the request.
fn echo(status: MetaStatus, flags: &MetaFlags, key: &Bytes) -> MetaReply {
    MetaReply::new(status, returned(flags, key, None, 0, Moves::default()))
}

/// `flags` with only the return flags `keep` allows (memcached's `ms` returns only `O k c b`,
/// its `ma` only `O k c t b`).
fn only(flags: &MetaFlags, keep: &[ReturnFlag]) -> MetaFlags {
    MetaFlags {
        ret: flags
            .ret
            .iter()
            .copied()
            .filter(|f| keep.contains(f))
            .collect(),
        ..flags.clone()
    }
}

/// What an `mg` found and did.
enum Got {
    Miss,
    /// The item's value is streamed and the command would write it back.
    TooLarge,
    /// A hit, or a stub created by `N` on a miss (`vivified`).
    Hit {
        shown: Entry,
        markers: Markers,
        moves: Moves,
        vivified: bool,
        now_secs: u64,
        /// The value is streamed: its version (to open it at) and length.
        large: Option<(Version, u64)>,
    },
}

async fn get(items: &Items<'_>, ctx: &Ctx, key: Bytes, flags: MetaFlags) -> Response {
    Stats::incr(&ctx.stats.cmd_get);
    // A streamed value that changed between the read and its open is read again.
    for _ in 0..super::retrieve::OPEN_ATTEMPTS {
        let got = items
            .mutate(&key, Freshness::Cached, false, |found| {
                decide_get(ctx, &key, &flags, found)
            })
            .await;
        let (shown, markers, moves, vivified, now_secs, large) = match got {
            Ok(Got::Miss) => {
                super::count_read(ctx, &key, Some(Miss::Absent), flags.classic);
                return quiet(&flags, true, echo(MetaStatus::En, &flags, &key));
            }
            Ok(Got::Hit {
                shown,
                markers,
                moves,
                vivified,
                now_secs,
                large,
            }) => (shown, markers, moves, vivified, now_secs, large),
            Ok(Got::TooLarge) => return ctx.failure(StoreError::TooLarge),
            Err(e) => return ctx.failure(e),
        };
        let mut out = returned(&flags, &key, Some(&shown), now_secs, moves);
        let (status, mut value, mut stream) = match flags.value {
            true => (MetaStatus::Va, Some(shown.value), None),
            false => (MetaStatus::Hd, None, None),
        };
        if let Some((version, len)) = large {
            for flag in &mut out {
                if let MetaFlag::Size(size) = flag {
                    *size = len as usize;
                }
            }
            if flags.value {
                match ctx.store.open(&key, &version).await {
                    Ok(Some(body)) => {
                        value = None;
                        stream = Some(super::retrieve::streamed(ctx, body));
                    }
                    Ok(None) => continue,
                    Err(e) => return ctx.failure(e),
                }
            }
        }
        if vivified {
            super::count_read(ctx, &key, Some(Miss::Absent), flags.classic);
        } else {
            super::count_read(ctx, &key, None, flags.classic);
            if flags.ttl.is_some() {
                Stats::incr(&ctx.stats.touch_hits);
            }
        }
        // `q` on mg hides only a plain miss (EN), never a hit nor a vivified stub.
        return meta(MetaReply {
            status,
            flags: out,
            markers,
            value,
            stream,
        });
    }
    ctx.failure(StoreError::Unavailable(
        "a streamed value kept changing while it was opened".into(),
    ))
}

/// What `mg` does with the item found: answers, and writes back a new TTL (`T`), a won
/// recache, or (`N` on a miss) an empty stub whose creator wins the right to recache.
fn decide_get(ctx: &Ctx, key: &Bytes, flags: &MetaFlags, found: Found<'_>) -> Decision<Got> {
    let now_secs = ctx.clock.now_secs();
    let mut moves = Moves {
        ttl_at: flags.ttl.map(|t| ctx.clock.expires_at(t)),
        vivify_at: None,
    };
    let Some(live) = found.live else {
        let Some(ttl) = flags.vivify else {
            return Decision::Answer(Got::Miss);
        };
        // As in memcached the stub starts with no expiry; `N` and `T` set it where they stand.
        moves.vivify_at = Some(ctx.clock.expires_at(ttl));
        let shown = Entry {
            key: key.clone(),
            stored_at_us: ctx.clock.now_us(),
            cas: flags
                .explicit_cas
                .unwrap_or_else(|| ctx.next_cas(found.stored)),
            win_sent: true,
            ..Entry::default()
        };
        let stub = Entry {
            expires_at: moves.walk(flags, 0).0,
            ..shown.clone()
        };
        let markers = Markers {
            won: true,
            ..Markers::default()
        };
        return Decision::Write(stub, got(shown, markers, moves, true, now_secs, None));
    };
    let (expires_at, at_recache) = moves.walk(flags, live.expires_at);
    // As memcached: `R` is an exptime (relative, absolute or negative) and the item wins
    // a recache when, as of where `R` stands, it expires before that moment.
    let recache_at = flags.recache.map_or(0, |r| ctx.clock.expires_at(r));
    let wants_win = live.stale || (recache_at != 0 && at_recache != 0 && at_recache < recache_at);
    let won = wants_win && !live.win_sent;
    let markers = Markers {
        won,
        already_won: live.win_sent && !won,
        stale: live.stale,
    };
    let mut entry = live.clone();
    entry.win_sent |= won;
    let shown = Entry {
        win_sent: entry.win_sent,
        ..live.clone()
    };
    let large = found.large.map(|(version, len)| (version.clone(), len));
    let writes = flags.ttl.is_some() || won;
    if writes && large.is_some() {
        // A new TTL or a won recache writes the item back, value and all: a streamed
        // value is not held to write.
        return Decision::Answer(Got::TooLarge);
    }
    let outcome = got(shown, markers, moves, false, now_secs, large);
    if flags.ttl.is_some() {
        entry.expires_at = expires_at;
    } else if !won {
        return Decision::Answer(outcome);
    }
    Decision::Write(entry, outcome)
}

fn got(
    shown: Entry,
    markers: Markers,
    moves: Moves,
    vivified: bool,
    now_secs: u64,
    large: Option<(Version, u64)>,
) -> Got {
    Got::Hit {
        shown,
        markers,
        moves,
        vivified,
        now_secs,
        large,
    }
}

async fn set(items: &Items<'_>, ctx: &Ctx, key: Bytes, data: Bytes, flags: MetaFlags) -> Response {
    let mode = match flags.set_mode {
        MetaSetMode::Set => WriteMode::Set,
        MetaSetMode::Add => WriteMode::Add,
        MetaSetMode::Replace => WriteMode::Replace,
        MetaSetMode::Append => WriteMode::Append,
        MetaSetMode::Prepend => WriteMode::Prepend,
    };
    let write = Write {
        item: Entry {
            key: key.clone(),
            flags: flags.client_flags.unwrap_or(0),
            expires_at: ctx.clock.expires_at(flags.ttl.unwrap_or(0)),
            value: data,
            ..Entry::default()
        },
        mode,
        compare_cas: flags.compare_cas,
        invalidate: flags.invalidate,
        new_cas: flags.explicit_cas,
    };
    // `ms` returns only `O`, `k` (with `b`) and `c`, which is 0 when nothing was stored.
    use ReturnFlag::{Base64, Cas, Key, Opaque};
    let shown = only(&flags, &[Base64, Cas, Key, Opaque]);
    let reply = |status, cas| {
        let entry = Entry {
            cas,
            ..Entry::default()
        };
        let out = returned(&shown, &key, Some(&entry), 0, Moves::default());
        MetaReply::new(status, out)
    };
    match items.write(write).await {
        Ok(Written::Stored(entry)) => quiet(&flags, true, reply(MetaStatus::Hd, entry.cas)),
        Ok(Written::NotStored) => meta(reply(MetaStatus::Ns, 0)),
        Ok(Written::Exists) => meta(reply(MetaStatus::Ex, 0)),
        Ok(Written::NotFound) => meta(reply(MetaStatus::Nf, 0)),
        Ok(Written::TooLarge) => Response::Error(OUT_OF_MEMORY_STORING),
        Err(e) => ctx.failure(e),
    }
}

async fn delete(items: &Items<'_>, ctx: &Ctx, key: Bytes, flags: MetaFlags) -> Response {
    let removal = Removal {
        compare_cas: flags.compare_cas,
        invalidate: flags.invalidate.then(|| Invalidation {
            new_cas: flags.explicit_cas,
            expires_at: flags.ttl.map(|t| ctx.clock.expires_at(t)),
        }),
    };
    match items.delete(&key, removal).await {
        Ok(Deleted::Done) => quiet(&flags, true, echo(MetaStatus::Hd, &flags, &key)),
        Ok(Deleted::NotFound) => meta(echo(MetaStatus::Nf, &flags, &key)),
        Ok(Deleted::Exists) => meta(echo(MetaStatus::Ex, &flags, &key)),
        Err(e) => ctx.failure(e),
    }
}

async fn arith(items: &Items<'_>, ctx: &Ctx, key: Bytes, flags: MetaFlags) -> Response {
    // As memcached: T (and N for a created counter) set the expiry where they stand, so a
    // `t` before them shows the expiry as it was.
    let ttl_at = flags.ttl.map(|t| ctx.clock.expires_at(t));
    let vivify_at = flags.vivify.map(|t| ctx.clock.expires_at(t));
    let created_moves = Moves { ttl_at, vivify_at };
    let arith = Arith {
        incr: flags.arith_mode == MetaArithMode::Incr,
        delta: flags.delta.unwrap_or(1),
        compare_cas: flags.compare_cas,
        create: vivify_at.map(|_| NewCounter {
            initial: flags.initial.unwrap_or(0),
            expires_at: created_moves.walk(&flags, 0).0,
        }),
        new_cas: flags.explicit_cas,
        expires_at: ttl_at.filter(|_| flags.ret.contains(&ReturnFlag::AtNewTtl)),
    };
    let (entry, value, created, was_expiring_at) = match items.arith(&key, &arith).await {
        Ok(Counted::Done {
            entry,
            value,
            created,
            was_expiring_at,
        }) => (entry, value, created, was_expiring_at),
        Ok(Counted::NotFound) => return meta(echo(MetaStatus::Nf, &flags, &key)),
        Ok(Counted::Exists) => return meta(echo(MetaStatus::Ex, &flags, &key)),
        Ok(Counted::NonNumeric) => return Response::Error(NON_NUMERIC),
        Err(e) => return ctx.failure(e),
    };
    use ReturnFlag::{AtNewTtl, AtVivify, Base64, Cas, Key, Opaque, Ttl};
    let shown = only(&flags, &[AtNewTtl, AtVivify, Base64, Cas, Key, Opaque, Ttl]);
    let moves = Moves {
        ttl_at,
        vivify_at: vivify_at.filter(|_| created),
    };
    let before = Entry {
        expires_at: was_expiring_at,
        ..entry
    };
    let out = returned(&shown, &key, Some(&before), ctx.clock.now_secs(), moves);
    // The number alone, without the padding memcached keeps in the item.
    let reply = MetaReply {
        value: flags.value.then(|| Bytes::from(value.to_string())),
        ..MetaReply::new(
            if flags.value {
                MetaStatus::Va
            } else {
                MetaStatus::Hd
            },
            out,
        )
    };
    // `q` hides an ordinary success, never an auto-created counter.
    quiet(&flags, !created, reply)
}

async fn debug(items: &Items<'_>, ctx: &Ctx, key: Bytes, base64: bool) -> Response {
    match items.read(&key).await {
        Ok(Read::Hit(e)) => Response::Debug(MetaDebug {
            ttl: remaining_ttl(e.expires_at, ctx.clock.now_secs()),
            cas: e.cas,
            size: e.value.len(),
            key,
            base64,
        }),
        Ok(Read::Large(e, _, len)) => Response::Debug(MetaDebug {
            ttl: remaining_ttl(e.expires_at, ctx.clock.now_secs()),
            cas: e.cas,
            size: len as usize,
            key,
            base64,
        }),
        Ok(Read::Miss(_)) => meta(MetaReply::new(MetaStatus::En, Vec::new())),
        Err(e) => ctx.failure(e),
    }
}
