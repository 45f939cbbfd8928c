//! Meta commands (`mg`, `ms`, `md`, `ma`, `me`, `mn`) over the same store and rules.
//!
//! What S3 cannot give: `h` (hit before) and `l` (last access) would need a write on every
//! read, so they always answer `h0` and `l0`; `u` is accepted and has nothing to skip.

use base64::Engine;
use bytes::Bytes;

use super::{apply_delta, concat, counted, parse_counter, Ctx, Liveness, Step, NON_NUMERIC};
use crate::protocol::{
    MetaArithMode, MetaFlags, MetaReply, MetaRequest, MetaSetMode, MetaStatus, Response, ReturnFlag,
};
use crate::stats::Stats;
use crate::store::{Entry, PutMode, Store, StoreError, Versioned};

pub(super) async fn execute(ctx: &Ctx, request: MetaRequest) -> Response {
    match request {
        MetaRequest::Noop => meta(MetaStatus::Mn, Vec::new(), None),
        MetaRequest::Get { key, flags } => get(ctx, key, flags).await,
        MetaRequest::Set { key, data, flags } => set(ctx, key, data, flags).await,
        MetaRequest::Delete { key, flags } => delete(ctx, key, flags).await,
        MetaRequest::Arith { key, flags } => arith(ctx, key, flags).await,
        MetaRequest::Debug { key, base64 } => debug(ctx, key, base64).await,
    }
}

fn meta(status: MetaStatus, flags: Vec<Bytes>, value: Option<Bytes>) -> Response {
    Response::Meta(MetaReply {
        status,
        flags,
        value,
    })
}

/// A reply `q` hides (the common case of each command), unless it is an error.
fn quiet(flags: &MetaFlags, hide: bool, response: Response) -> Response {
    if flags.quiet && hide {
        Response::None
    } else {
        response
    }
}

fn remaining_ttl(entry: &Entry, now_secs: u64) -> i64 {
    if entry.expires_at == 0 {
        -1
    } else {
        entry.expires_at.saturating_sub(now_secs) as i64
    }
}

fn encode_key(key: &[u8], base64: bool) -> Vec<u8> {
    if base64 {
        base64::engine::general_purpose::STANDARD
            .encode(key)
            .into_bytes()
    } else {
        key.to_vec()
    }
}

/// One returned flag: its letter and its value, byte for byte.
fn flag(letter: u8, value: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(value.len() + 1);
    out.push(letter);
    out.extend_from_slice(value);
    Bytes::from(out)
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

/// The requested return flags rendered for `entry` (or only key/opaque when there is none).
fn render(flags: &MetaFlags, key: &[u8], entry: Option<&Entry>, now_secs: u64) -> Vec<Bytes> {
    render_moving(flags, key, entry, now_secs, Moves::default())
}

/// [`render`], with `T`/`N` moving the expiry that a later `t` shows.
fn render_moving(
    flags: &MetaFlags,
    key: &[u8],
    entry: Option<&Entry>,
    now_secs: u64,
    moves: Moves,
) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(flags.ret.len());
    let mut current = entry.cloned();
    for f in &flags.ret {
        let moved = match f {
            ReturnFlag::AtNewTtl => moves.ttl_at,
            ReturnFlag::AtVivify => moves.vivify_at,
            _ => None,
        };
        if let (Some(e), Some(at)) = (current.as_mut(), moved) {
            e.expires_at = at;
        }
        let entry = current.as_ref();
        let text = match (f, entry) {
            // memcached returns `b` right after the key, and only with it.
            (ReturnFlag::Base64, _) => continue,
            (ReturnFlag::Key, _) => {
                out.push(flag(b'k', &encode_key(key, flags.base64)));
                if flags.base64 {
                    out.push(Bytes::from_static(b"b"));
                }
                continue;
            }
            (ReturnFlag::Opaque, _) => {
                out.push(flag(b'O', flags.opaque.as_deref().unwrap_or_default()));
                continue;
            }
            (ReturnFlag::Cas, Some(e)) => format!("c{}", e.cas),
            (ReturnFlag::Flags, Some(e)) => format!("f{}", e.flags),
            (ReturnFlag::Size, Some(e)) => format!("s{}", e.value.len()),
            (ReturnFlag::Ttl, Some(e)) => format!("t{}", remaining_ttl(e, now_secs)),
            (ReturnFlag::Hit, Some(_)) => "h0".to_owned(),
            (ReturnFlag::LastAccess, Some(_)) => "l0".to_owned(),
            (ReturnFlag::AtNewTtl | ReturnFlag::AtVivify | ReturnFlag::AtRecache, _) => continue,
            (_, None) => continue,
        };
        out.push(Bytes::from(text));
    }
    out
}

/// Flags that only echo the request (for replies about a missing item).
fn echo(flags: &MetaFlags, key: &[u8]) -> Vec<Bytes> {
    render(flags, key, None, 0)
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

/// `ms` reply flags: `O`, `k` (with `b`) and `c`, which is 0 when nothing was stored.
fn set_flags(flags: &MetaFlags, key: &[u8], cas: u64) -> Vec<Bytes> {
    use ReturnFlag::{Base64, Cas, Key, Opaque};
    let entry = Entry {
        cas,
        ..Entry::default()
    };
    render(
        &only(flags, &[Base64, Cas, Key, Opaque]),
        key,
        Some(&entry),
        0,
    )
}

/// The cas of a new version: the client's `E` if given, else the next after `previous`.
fn new_cas(ctx: &Ctx, flags: &MetaFlags, previous: Option<&Entry>) -> u64 {
    flags.explicit_cas.unwrap_or_else(|| ctx.next_cas(previous))
}

async fn get(ctx: &Ctx, key: Bytes, flags: MetaFlags) -> Response {
    Stats::incr(&ctx.stats.cmd_get);
    for _ in 0..super::MAX_WRITE_RETRIES {
        let (read, liveness) = match ctx.read_live(&key).await {
            Ok(r) => r,
            Err(e) => return ctx.failure(e),
        };
        let now_secs = ctx.clock.now_secs();
        let Some(read) = read.clone().filter(|_| liveness == Liveness::Live) else {
            Stats::incr(&ctx.stats.get_misses);
            let Some(ttl) = flags.vivify else {
                return quiet(&flags, true, meta(MetaStatus::En, echo(&flags, &key), None));
            };
            match vivify(ctx, &key, &flags, read.as_ref(), ttl, now_secs).await {
                Some(reply) => return reply,
                None => continue,
            }
        };
        Stats::incr(&ctx.stats.get_hits);
        let mut entry = read.entry;
        let shown = entry.clone();
        let moves = Moves {
            ttl_at: flags.ttl.map(|t| ctx.clock.expires_at(t)),
            vivify_at: None,
        };
        let (expires_at, at_recache) = moves.walk(&flags, entry.expires_at);
        // As memcached: `R` is an exptime (relative, absolute or negative) and the item wins
        // a recache when, as of where `R` stands, it expires before that moment.
        let recache_at = flags.recache.map_or(0, |r| ctx.clock.expires_at(r));
        let wants_win =
            entry.stale || (recache_at != 0 && at_recache != 0 && at_recache < recache_at);
        let won = wants_win && !entry.win_sent;
        let mut markers: Vec<&'static str> = Vec::new();
        if won {
            if entry.stale {
                markers.push("X");
            }
            markers.push("W");
        } else {
            if entry.win_sent {
                markers.push("Z");
            }
            if entry.stale {
                markers.push("X");
            }
        }
        let mut write = won;
        if won {
            entry.win_sent = true;
        }
        if flags.ttl.is_some() {
            entry.expires_at = expires_at;
            Stats::incr(&ctx.stats.touch_hits);
            write = true;
        }
        if write {
            match ctx
                .store
                .put(&entry, PutMode::Update(read.version.clone()))
                .await
            {
                Ok(_) => {}
                Err(StoreError::Exists | StoreError::Changed) => continue,
                Err(e) => return ctx.failure(e),
            }
        }
        let shown = Entry {
            win_sent: entry.win_sent,
            ..shown
        };
        return hit_reply(&flags, &key, &shown, now_secs, &markers, moves);
    }
    ctx.failure(StoreError::Changed)
}

/// A miss with `N`: creates an empty stub whose creator wins the right to recache. As in
/// memcached it starts with no expiry; `N` and `T` set it where they stand. `None` = a
/// concurrent writer got there first: read again.
async fn vivify(
    ctx: &Ctx,
    key: &Bytes,
    flags: &MetaFlags,
    read: Option<&Versioned>,
    ttl: i64,
    now_secs: u64,
) -> Option<Response> {
    let moves = Moves {
        ttl_at: flags.ttl.map(|t| ctx.clock.expires_at(t)),
        vivify_at: Some(ctx.clock.expires_at(ttl)),
    };
    let shown = Entry {
        key: key.clone(),
        stored_at_us: ctx.clock.now_us(),
        cas: new_cas(ctx, flags, read.map(|v| &v.entry)),
        win_sent: true,
        ..Entry::default()
    };
    let stub = Entry {
        expires_at: moves.walk(flags, 0).0,
        ..shown.clone()
    };
    let mode = match read {
        Some(v) => PutMode::Update(v.version.clone()),
        None => PutMode::Create,
    };
    match ctx.store.put(&stub, mode).await {
        Ok(_) => Some(hit_reply(flags, key, &shown, now_secs, &["W"], moves)),
        Err(StoreError::Exists | StoreError::Changed) => None,
        Err(e) => Some(ctx.failure(e)),
    }
}

fn hit_reply(
    flags: &MetaFlags,
    key: &[u8],
    entry: &Entry,
    now_secs: u64,
    markers: &[&'static str],
    moves: Moves,
) -> Response {
    let mut out = render_moving(flags, key, Some(entry), now_secs, moves);
    out.extend(markers.iter().map(|m| Bytes::from_static(m.as_bytes())));
    // `q` on mg hides only a plain miss (EN), never a hit nor a vivified stub.
    if flags.value {
        meta(MetaStatus::Va, out, Some(entry.value.clone()))
    } else {
        meta(MetaStatus::Hd, out, None)
    }
}

async fn set(ctx: &Ctx, key: Bytes, data: Bytes, flags: MetaFlags) -> Response {
    Stats::incr(&ctx.stats.cmd_set);
    let fresh = Entry {
        key: key.clone(),
        flags: flags.client_flags.unwrap_or(0),
        expires_at: ctx.clock.expires_at(flags.ttl.unwrap_or(0)),
        value: data,
        ..Entry::default()
    };
    let mut written: Option<Entry> = None;
    let plain_set = flags.set_mode == MetaSetMode::Set && flags.compare_cas.is_none();
    let r = if plain_set {
        let mut entry = ctx.stamp(fresh, None);
        entry.cas = new_cas(ctx, &flags, None);
        match ctx.store.put(&entry, PutMode::Overwrite).await {
            Ok(_) => {
                written = Some(entry);
                Response::Stored
            }
            Err(e) => return ctx.failure(e),
        }
    } else {
        ctx.read_modify_write(&key, |live| {
            let step = set_step(ctx, &flags, &fresh, live);
            if let Step::Write(entry, _) = &step {
                written = Some(entry.clone());
            }
            step
        })
        .await
    };
    let failed = |status| meta(status, set_flags(&flags, &key, 0), None);
    match r {
        Response::Stored => {
            ctx.stored(written.as_ref().map(|e| (&e.key[..], e.expires_at)));
            let cas = written.as_ref().map_or(0, |e| e.cas);
            quiet(
                &flags,
                true,
                meta(MetaStatus::Hd, set_flags(&flags, &key, cas), None),
            )
        }
        Response::NotStored => failed(MetaStatus::Ns),
        Response::Exists => failed(MetaStatus::Ex),
        Response::NotFound => failed(MetaStatus::Nf),
        other => other,
    }
}

/// What an `ms` that reads first (a mode, or `C`) does with the live item.
fn set_step(ctx: &Ctx, flags: &MetaFlags, fresh: &Entry, live: Option<&Entry>) -> Step {
    // As memcached: `C` turns set and replace into cas (where `I` with an older cas stores
    // the value stale), is a plain check for append/prepend (0 = none), and add ignores it.
    let mut stale = false;
    let cas_mode = matches!(flags.set_mode, MetaSetMode::Set | MetaSetMode::Replace);
    if let Some(want) = flags.compare_cas.filter(|_| cas_mode) {
        match live {
            None => return Step::Answer(Response::NotFound),
            Some(old) if old.cas != want => {
                if flags.invalidate && want < old.cas {
                    stale = true;
                } else {
                    return Step::Answer(Response::Exists);
                }
            }
            Some(_) => {}
        }
    }
    let append_cas = flags.compare_cas.filter(|&c| c != 0 && !cas_mode);
    let mut entry = match (flags.set_mode, live) {
        (MetaSetMode::Add, Some(_)) => return Step::Answer(Response::NotStored),
        (MetaSetMode::Replace | MetaSetMode::Append | MetaSetMode::Prepend, None) => {
            return Step::Answer(Response::NotStored)
        }
        (MetaSetMode::Append | MetaSetMode::Prepend, Some(old))
            if append_cas.is_some_and(|want| want != old.cas) =>
        {
            return Step::Answer(Response::Exists)
        }
        (MetaSetMode::Append | MetaSetMode::Prepend, Some(old)) => {
            if old.value.len() + fresh.value.len() > ctx.settings.max_item_bytes {
                return Step::Answer(Response::ServerError("out of memory storing object".into()));
            }
            let value = if flags.set_mode == MetaSetMode::Append {
                concat(&old.value, &fresh.value)
            } else {
                concat(&fresh.value, &old.value)
            };
            Entry {
                value,
                ..old.clone()
            }
        }
        _ => fresh.clone(),
    };
    entry = ctx.stamp(entry, live);
    entry.cas = new_cas(ctx, flags, live);
    entry.stale = stale;
    entry.win_sent = false;
    if let Some(old) = live.filter(|_| stale) {
        // As memcached: a stale recache keeps the item's TTL and its handed-out win,
        // so the next mg sees Z and only one client wins the recache.
        entry.expires_at = old.expires_at;
        entry.win_sent = old.win_sent;
    }
    Step::Write(entry, Response::Stored)
}

async fn delete(ctx: &Ctx, key: Bytes, flags: MetaFlags) -> Response {
    for _ in 0..super::MAX_WRITE_RETRIES {
        let (read, liveness) = match ctx.read_confirmed(&key).await {
            Ok(r) => r,
            Err(e) => return ctx.failure(e),
        };
        let Some(read) = read.filter(|_| liveness == Liveness::Live) else {
            Stats::incr(&ctx.stats.delete_misses);
            return meta(MetaStatus::Nf, echo(&flags, &key), None);
        };
        if flags.compare_cas.is_some_and(|want| want != read.entry.cas) {
            return meta(MetaStatus::Ex, echo(&flags, &key), None);
        }
        let outcome = if flags.invalidate {
            let mut entry = read.entry.clone();
            entry.stale = true;
            entry.win_sent = false;
            entry.cas = new_cas(ctx, &flags, Some(&read.entry));
            if let Some(ttl) = flags.ttl {
                entry.expires_at = ctx.clock.expires_at(ttl);
            }
            ctx.store
                .put(&entry, PutMode::Update(read.version.clone()))
                .await
                .map(|_| true)
        } else {
            ctx.store.delete(&key, Some(&read.version)).await
        };
        match outcome {
            Ok(true) => {
                Stats::incr(&ctx.stats.delete_hits);
                let out = echo(&flags, &key);
                return quiet(&flags, true, meta(MetaStatus::Hd, out, None));
            }
            Ok(false) | Err(StoreError::Exists | StoreError::Changed) => continue,
            Err(e) => return ctx.failure(e),
        }
    }
    ctx.failure(StoreError::Changed)
}

async fn arith(ctx: &Ctx, key: Bytes, flags: MetaFlags) -> Response {
    let incr = flags.arith_mode == MetaArithMode::Incr;
    let delta = flags.delta.unwrap_or(1);
    let mut written: Option<Entry> = None;
    let mut created = false;
    // As memcached: T (and N for a created counter) set the expiry where they stand, so a
    // `t` before them shows the expiry as it was.
    let mut moves = Moves {
        ttl_at: flags.ttl.map(|t| ctx.clock.expires_at(t)),
        vivify_at: None,
    };
    let r = ctx
        .read_modify_write(&key, |live| {
            created = live.is_none();
            let entry = match live {
                None => {
                    let Some(ttl) = flags.vivify else {
                        return Step::Answer(Response::NotFound);
                    };
                    moves.vivify_at = Some(ctx.clock.expires_at(ttl));
                    Entry {
                        key: key.clone(),
                        value: Bytes::from(flags.initial.unwrap_or(0).to_string()),
                        ..Entry::default()
                    }
                }
                Some(old) => {
                    // C0 compares nothing, as in memcached.
                    if flags
                        .compare_cas
                        .is_some_and(|want| want != 0 && want != old.cas)
                    {
                        return Step::Answer(Response::Exists);
                    }
                    let Some(current) = parse_counter(&old.value) else {
                        return Step::Answer(Response::Error(NON_NUMERIC));
                    };
                    counted(old, apply_delta(current, delta, incr))
                }
            };
            let mut entry = ctx.stamp(entry, live);
            entry.cas = new_cas(ctx, &flags, live);
            written = Some(entry.clone());
            entry.expires_at = moves.walk(&flags, entry.expires_at).0;
            Step::Write(entry, Response::Stored)
        })
        .await;
    let now_secs = ctx.clock.now_secs();
    let (hits, misses) = if incr {
        (&ctx.stats.incr_hits, &ctx.stats.incr_misses)
    } else {
        (&ctx.stats.decr_hits, &ctx.stats.decr_misses)
    };
    match r {
        Response::Stored => {
            Stats::incr(hits);
            let entry = written.expect("written on success");
            use ReturnFlag::{AtNewTtl, AtVivify, Base64, Cas, Key, Opaque, Ttl};
            let shown = only(&flags, &[AtNewTtl, AtVivify, Base64, Cas, Key, Opaque, Ttl]);
            let out = render_moving(&shown, &key, Some(&entry), now_secs, moves);
            // `q` hides an ordinary success, never an auto-created counter.
            let reply = if flags.value {
                // The number alone, without the padding memcached keeps in the item.
                let len = entry.value.iter().take_while(|&&b| b != b' ').count();
                meta(MetaStatus::Va, out, Some(entry.value.slice(..len)))
            } else {
                meta(MetaStatus::Hd, out, None)
            };
            quiet(&flags, !created, reply)
        }
        Response::NotFound => {
            Stats::incr(misses);
            meta(MetaStatus::Nf, echo(&flags, &key), None)
        }
        Response::Exists => meta(MetaStatus::Ex, echo(&flags, &key), None),
        other => other,
    }
}

async fn debug(ctx: &Ctx, key: Bytes, base64: bool) -> Response {
    match ctx.read_live(&key).await {
        Ok((Some(read), Liveness::Live)) => {
            let e = read.entry;
            Response::Debug {
                key: String::from_utf8_lossy(&encode_key(&key, base64)).into_owned(),
                fields: format!(
                    "exp={} la=0 cas={} fetch=no cls=1 size={}",
                    remaining_ttl(&e, ctx.clock.now_secs()),
                    e.cas,
                    e.value.len()
                ),
            }
        }
        Ok(_) => meta(MetaStatus::En, Vec::new(), None),
        Err(e) => ctx.failure(e),
    }
}
