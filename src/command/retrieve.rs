//! The classic retrievals (`get`, `gets`, `gat`, `gats`): keys read concurrently, answered
//! in order, each value charged to the memory budget as it arrives.
//!
//! A retrieval run by a connection has a meter ([`crate::budget::meter`]): a value the budget
//! cannot take now stops the read, everything it holds is given back, and it waits for a
//! grant of what it now knows it needs, then reads again. Reads are counted in `stats` once,
//! for the attempt that answers.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use futures::future::Either;
use futures::stream::{self, StreamExt};

use super::item::{Items, Miss, Read, Touched};
use super::{count_read, to_value, Ctx, MAX_GET_FANOUT, MAX_RESPONSE_BYTES};
use crate::budget::meter::{self, Meter};
use crate::protocol::{ProtocolError, Response, Streamed, Value};
use crate::stats::Stats;
use crate::store::body::{Body, READ_HOLD_BYTES};
use crate::store::{self, Store, StoreError};

/// Charged for a value's line and framing in the reply, beyond its key and data.
const VALUE_LINE_BYTES: usize = 64;
/// Times a streamed value is opened again when it changed between its read and its open.
pub(super) const OPEN_ATTEMPTS: usize = 3;

/// One key's answer: its value, or why it has none.
type Answer = Result<Value, Miss>;

/// Why an attempt stopped before every key was answered.
enum Stop {
    /// A failure to answer with.
    Failed(Response),
    /// A value of this many bytes the budget could not take now.
    OverBudget(u64),
}

/// Reads `keys` (touching them with `touch`'s exptime for a gat) and answers in key order.
pub(super) async fn retrieve(
    items: &Items<'_>,
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
    let duplicates = has_duplicates(&keys);
    let fanout = if touch.is_some() && duplicates {
        1
    } else {
        MAX_GET_FANOUT
    };
    // A key named twice in one get is read once; its value is repeated (shared, not copied).
    let asked = (touch.is_none() && duplicates).then(|| keys.clone());
    let keys = match &asked {
        Some(all) => distinct(all),
        None => keys,
    };
    let meter = meter::current();
    let answers = loop {
        // The store judges the keys' reads together (a slow one is hedged next to the rest).
        let attempt = gather(items, ctx, &keys, touch, fanout, meter.as_deref());
        let attempt = match keys.len() {
            1 => Either::Left(attempt),
            _ => Either::Right(store::fanout::scope(attempt)),
        };
        match attempt.await {
            Ok(answers) => break answers,
            Err(Stop::Failed(response)) => return response,
            Err(Stop::OverBudget(needed)) => {
                if !wait_for_budget(ctx, meter.as_deref(), needed).await {
                    return Response::Error(ProtocolError::Server("out of memory"));
                }
            }
        }
    };
    let mut values = Vec::with_capacity(answers.len());
    let mut bytes = 0;
    for (key, answer) in answers {
        count_read(ctx, &key, answer.as_ref().err().copied(), true);
        if let Ok(value) = answer {
            bytes += value.data.len() + value.key.len();
            values.push(value);
        }
    }
    if bytes > MAX_RESPONSE_BYTES {
        return Response::Error(ProtocolError::Server("out of memory writing get response"));
    }
    if let Some(asked) = asked {
        values = repeat_values(ctx, &asked, values);
        // A streamed value named twice is opened again: its pieces are sent once.
        let mut seen = HashSet::new();
        for value in &mut values {
            if value.stream.is_some() && !seen.insert(value.key.clone()) {
                // Each stream opened holds its pieces: charged as the first one was.
                let held = (READ_HOLD_BYTES + value.key.len() + VALUE_LINE_BYTES) as u64;
                if meter.as_deref().is_some_and(|m| !m.charge_value(held)) {
                    Stats::incr(&stats.budget_timeouts);
                    return Response::Error(ProtocolError::Server("out of memory"));
                }
                match reopen(items, ctx, &value.key).await {
                    Ok(Ok(again)) => *value = again,
                    Ok(Err(_)) | Err(_) => {
                        return Response::ServerError("a streamed value changed while read".into())
                    }
                }
            }
        }
    }
    Response::Values {
        values,
        with_cas,
        end,
    }
}

/// After a refused charge of `needed` bytes: gives back what the attempt held and waits for
/// it and `needed` together (counted in `budget_waits`); false when the wait timed out
/// (counted in `budget_timeouts`).
async fn wait_for_budget(ctx: &Ctx, meter: Option<&Meter>, needed: u64) -> bool {
    // Only a meter refuses; without one, nothing can be waited for.
    let Some(meter) = meter else {
        Stats::incr(&ctx.stats.budget_timeouts);
        return false;
    };
    Stats::incr(&ctx.stats.budget_waits);
    if meter.wait_for(meter.used_bytes() + needed).await {
        return true;
    }
    Stats::incr(&ctx.stats.budget_timeouts);
    false
}

/// One attempt: every key's answer, in key order, each value charged to `meter` as it
/// comes (in any order).
async fn gather(
    items: &Items<'_>,
    ctx: &Ctx,
    keys: &[Bytes],
    touch: Option<i64>,
    fanout: usize,
    meter: Option<&Meter>,
) -> Result<Vec<(Bytes, Answer)>, Stop> {
    // Taken as they come: a slow key holds no place that a later key could start in.
    let mut results = stream::iter(keys.iter().cloned().enumerate())
        .map(|(at, key)| async move {
            let answer = answer(items, ctx, &key, touch).await;
            (at, key, answer)
        })
        .buffer_unordered(fanout);
    let mut answers = Vec::with_capacity(keys.len());
    while let Some((at, key, answer)) = results.next().await {
        let answer = match answer {
            Ok(Ok(value)) => {
                // A streamed value holds a few pieces at a time until it is sent.
                let held = match value.stream {
                    Some(_) => READ_HOLD_BYTES,
                    None => value.data.len(),
                };
                let bytes = value.key.len() + held + VALUE_LINE_BYTES;
                if meter.is_some_and(|m| !m.charge_value(bytes as u64)) {
                    return Err(Stop::OverBudget(bytes as u64));
                }
                Ok(value)
            }
            Ok(Err(miss)) => Err(miss),
            Err(StoreError::OverBudget(bytes)) => return Err(Stop::OverBudget(bytes)),
            Err(e) if touch.is_none() && ctx.settings.miss_on_backend_error => {
                ctx.failure(e);
                Err(Miss::Absent)
            }
            Err(e) => return Err(Stop::Failed(ctx.failure(e))),
        };
        answers.push((at, key, answer));
    }
    answers.sort_unstable_by_key(|(at, ..)| *at);
    Ok(answers
        .into_iter()
        .map(|(_, key, answer)| (key, answer))
        .collect())
}

/// One key: its live value (for a gat, with the new expiry written back) or why not.
async fn answer(
    items: &Items<'_>,
    ctx: &Ctx,
    key: &[u8],
    touch: Option<i64>,
) -> Result<Answer, StoreError> {
    Ok(match touch {
        None => reopen(items, ctx, key).await?,
        Some(exptime) => match items.touch(key, ctx.clock.expires_at(exptime)).await? {
            Touched::Done(entry) => Ok(to_value(entry)),
            Touched::NotFound => Err(Miss::Absent),
        },
    })
}

/// One key's live value, a streamed one opened at the version read (read again, up to
/// [`OPEN_ATTEMPTS`] times, when it changed in between).
async fn reopen(items: &Items<'_>, ctx: &Ctx, key: &[u8]) -> Result<Answer, StoreError> {
    for _ in 0..OPEN_ATTEMPTS {
        let (entry, version, len) = match items.read(key).await? {
            Read::Hit(entry) => return Ok(Ok(to_value(entry))),
            Read::Miss(miss) => return Ok(Err(miss)),
            Read::Large(entry, version, len) => (entry, version, len),
        };
        let Some(body) = ctx.store.open(key, &version).await? else {
            continue;
        };
        debug_assert_eq!(body.len, len);
        return Ok(Ok(Value {
            stream: Some(streamed(ctx, body)),
            ..to_value(entry)
        }));
    }
    Err(StoreError::Unavailable(
        "a streamed value kept changing while it was opened".into(),
    ))
}

/// A value opened as a stream, as a reply carries it.
pub(super) fn streamed(ctx: &Ctx, body: Body) -> Streamed {
    Stats::incr(&ctx.stats.streamed_gets);
    let pieces = body
        .chunks
        .map(|piece| piece.map_err(std::io::Error::other))
        .boxed();
    Streamed::new(body.len, pieces)
}

/// The keys in order, each once.
fn distinct(keys: &[Bytes]) -> Vec<Bytes> {
    let mut seen = HashSet::with_capacity(keys.len());
    keys.iter().filter(|k| seen.insert(*k)).cloned().collect()
}

/// The values of a get whose keys repeat, one per key asked, counted as memcached counts.
fn repeat_values(ctx: &Ctx, asked: &[Bytes], values: Vec<Value>) -> Vec<Value> {
    let found: HashMap<Bytes, Value> = values.into_iter().map(|v| (v.key.clone(), v)).collect();
    let mut seen = HashSet::with_capacity(asked.len());
    let mut out = Vec::with_capacity(asked.len());
    for key in asked {
        let again = !seen.insert(key);
        let hit = found.get(key);
        if again {
            Stats::incr(if hit.is_some() {
                &ctx.stats.get_hits
            } else {
                &ctx.stats.get_misses
            });
            ctx.detail.get(key, hit.is_some());
        }
        out.extend(hit.cloned());
    }
    out
}

fn has_duplicates(keys: &[Bytes]) -> bool {
    let mut seen = HashSet::with_capacity(keys.len());
    !keys.iter().all(|k| seen.insert(k))
}
