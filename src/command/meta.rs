//! Meta commands (`mg`, `ms`, `md`, `ma`, `me`, `mn`) over the same store and rules.
//!
//! What S3 cannot give: `h` (hit before) and `l` (last access) would need a write on every
//! read, so they always answer `h0` and `l0`; `u` is accepted and has nothing to skip.

use base64::Engine;
use bytes::Bytes;

use super::{apply_delta, concat, parse_counter, Ctx, Liveness, Step, NON_NUMERIC};
use crate::protocol::{
    MetaArithMode, MetaFlags, MetaReply, MetaRequest, MetaSetMode, MetaStatus, Response, ReturnFlag,
};
use crate::stats::Stats;
use crate::store::{Entry, PutMode, Store, StoreError};

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

fn meta(status: MetaStatus, flags: Vec<String>, value: Option<Bytes>) -> Response {
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

fn encode_key(key: &[u8], base64: bool) -> String {
    if base64 {
        base64::engine::general_purpose::STANDARD.encode(key)
    } else {
        String::from_utf8_lossy(key).into_owned()
    }
}

/// The requested return flags rendered for `entry` (or only key/opaque when there is none).
fn render(flags: &MetaFlags, key: &[u8], entry: Option<&Entry>, now_secs: u64) -> Vec<String> {
    let mut out = Vec::with_capacity(flags.ret.len());
    for flag in &flags.ret {
        let rendered = match (flag, entry) {
            // memcached returns `b` right after the key, and only with it.
            (ReturnFlag::Base64, _) => continue,
            (ReturnFlag::Key, _) => {
                out.push(format!("k{}", encode_key(key, flags.base64)));
                if flags.base64 {
                    out.push("b".to_owned());
                }
                continue;
            }
            (ReturnFlag::Opaque, _) => format!(
                "O{}",
                String::from_utf8_lossy(flags.opaque.as_deref().unwrap_or_default())
            ),
            (ReturnFlag::Cas, Some(e)) => format!("c{}", e.cas),
            (ReturnFlag::Flags, Some(e)) => format!("f{}", e.flags),
            (ReturnFlag::Size, Some(e)) => format!("s{}", e.value.len()),
            (ReturnFlag::Ttl, Some(e)) => format!("t{}", remaining_ttl(e, now_secs)),
            (ReturnFlag::Hit, Some(_)) => "h0".to_owned(),
            (ReturnFlag::LastAccess, Some(_)) => "l0".to_owned(),
            (_, None) => continue,
        };
        out.push(rendered);
    }
    out
}

/// Flags that only echo the request (for replies about a missing item).
fn echo(flags: &MetaFlags, key: &[u8]) -> Vec<String> {
    render(flags, key, None, 0)
        .into_iter()
        .filter(|f| f.starts_with('O') || f.starts_with('k') || f == "b")
        .collect()
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
                return quiet(&flags, true, meta(MetaStatus::En, Vec::new(), None));
            };
            // Vivify: create an empty stub whose creator wins the right to recache.
            let stub = Entry {
                key: key.clone(),
                expires_at: ctx.clock.expires_at(ttl),
                stored_at_us: ctx.clock.now_us(),
                cas: new_cas(ctx, &flags, read.as_ref().map(|v| &v.entry)),
                win_sent: true,
                ..Entry::default()
            };
            let mode = match &read {
                Some(v) => PutMode::Update(v.version.clone()),
                None => PutMode::Create,
            };
            match ctx.store.put(&stub, mode).await {
                Ok(_) => return hit_reply(&flags, &key, &stub, now_secs, &["W"]),
                Err(StoreError::Exists | StoreError::Changed) => continue,
                Err(e) => return ctx.failure(e),
            }
        };
        Stats::incr(&ctx.stats.get_hits);
        let mut entry = read.entry;
        let ttl_left = remaining_ttl(&entry, now_secs);
        let wants_win = entry.stale
            || flags
                .recache
                .is_some_and(|r| ttl_left != -1 && ttl_left < r);
        let won = wants_win && !entry.win_sent;
        let mut markers: Vec<&str> = Vec::new();
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
        if let Some(ttl) = flags.ttl {
            entry.expires_at = ctx.clock.expires_at(ttl);
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
        return hit_reply(&flags, &key, &entry, now_secs, &markers);
    }
    ctx.failure(StoreError::Changed)
}

fn hit_reply(
    flags: &MetaFlags,
    key: &[u8],
    entry: &Entry,
    now_secs: u64,
    markers: &[&str],
) -> Response {
    let mut out = render(flags, key, Some(entry), now_secs);
    out.extend(markers.iter().map(|m| (*m).to_owned()));
    if flags.value {
        meta(MetaStatus::Va, out, Some(entry.value.clone()))
    } else {
        quiet(flags, true, meta(MetaStatus::Hd, out, None))
    }
}

async fn set(ctx: &Ctx, key: Bytes, data: Bytes, flags: MetaFlags) -> Response {
    Stats::incr(&ctx.stats.cmd_set);
    let max = ctx.settings.max_item_bytes;
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
            let mut stale = false;
            if let Some(want) = flags.compare_cas {
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
            let mut entry = match (flags.set_mode, live) {
                (MetaSetMode::Add, Some(_)) => return Step::Answer(Response::NotStored),
                (MetaSetMode::Replace | MetaSetMode::Append | MetaSetMode::Prepend, None) => {
                    return Step::Answer(Response::NotStored)
                }
                (MetaSetMode::Append | MetaSetMode::Prepend, Some(old)) => {
                    if old.value.len() + fresh.value.len() > max {
                        return Step::Answer(Response::ServerError(
                            "out of memory storing object".into(),
                        ));
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
            entry.cas = new_cas(ctx, &flags, live);
            entry.stale = stale;
            entry.win_sent = false;
            written = Some(entry.clone());
            Step::Write(entry, Response::Stored)
        })
        .await
    };
    let now_secs = ctx.clock.now_secs();
    match r {
        Response::Stored => {
            ctx.stored(written.as_ref().map(|e| (&e.key[..], e.expires_at)));
            let out = render(&flags, &key, written.as_ref(), now_secs);
            quiet(&flags, true, meta(MetaStatus::Hd, out, None))
        }
        Response::NotStored => meta(MetaStatus::Ns, echo(&flags, &key), None),
        Response::Exists => meta(MetaStatus::Ex, echo(&flags, &key), None),
        Response::NotFound => meta(MetaStatus::Nf, echo(&flags, &key), None),
        other => other,
    }
}

async fn delete(ctx: &Ctx, key: Bytes, flags: MetaFlags) -> Response {
    for _ in 0..super::MAX_WRITE_RETRIES {
        let (read, liveness) = match ctx.read_live(&key).await {
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
    let r = ctx
        .read_modify_write(&key, |live| {
            let entry = match live {
                None => {
                    let Some(ttl) = flags.vivify else {
                        return Step::Answer(Response::NotFound);
                    };
                    Entry {
                        key: key.clone(),
                        expires_at: ctx.clock.expires_at(ttl),
                        value: Bytes::from(flags.initial.unwrap_or(0).to_string()),
                        ..Entry::default()
                    }
                }
                Some(old) => {
                    if flags.compare_cas.is_some_and(|want| want != old.cas) {
                        return Step::Answer(Response::Exists);
                    }
                    let Some(current) = parse_counter(&old.value) else {
                        return Step::Answer(Response::Error(NON_NUMERIC));
                    };
                    let mut e = old.clone();
                    e.value = Bytes::from(apply_delta(current, delta, incr).to_string());
                    if let Some(ttl) = flags.ttl {
                        e.expires_at = ctx.clock.expires_at(ttl);
                    }
                    e
                }
            };
            let mut entry = ctx.stamp(entry, live);
            entry.cas = new_cas(ctx, &flags, live);
            written = Some(entry.clone());
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
            let out = render(&flags, &key, Some(&entry), now_secs);
            if flags.value {
                meta(MetaStatus::Va, out, Some(entry.value))
            } else {
                quiet(&flags, true, meta(MetaStatus::Hd, out, None))
            }
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
                key: encode_key(&key, base64),
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
