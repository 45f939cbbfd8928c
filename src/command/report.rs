//! The commands about the server rather than its items: `stats`, `flush_all`, `version`.

use std::sync::atomic::Ordering::Relaxed;

use super::Ctx;
use crate::protocol::{ProtocolError, Response};
use crate::stats::Stats;
use crate::store::Store;

/// The version string clients see: memcached's release, then s3cached's.
pub(super) fn version() -> String {
    crate::VERSION.to_owned()
}

pub(super) async fn flush_all(ctx: &Ctx, delay: i64) -> Response {
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

pub(super) fn stats(ctx: &Ctx, arg: Option<&str>) -> Response {
    let words: Vec<&str> = arg.map(|a| a.split(' ').collect()).unwrap_or_default();
    match words.first().copied() {
        None => Response::Stats(general_stats(ctx)),
        Some("settings") => Response::Stats(settings(ctx)),
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
        Some("conns") => Response::Stats(ctx.conns.rows()),
        Some("peers") => Response::Stats(
            ctx.stats
                .peers
                .lock()
                .map_or_else(|e| e.into_inner().clone(), |rows| rows.clone()),
        ),
        // Slab and item-class internals have no counterpart on S3: empty lists.
        Some("items" | "slabs" | "sizes") => Response::Stats(Vec::new()),
        Some(_) => Response::Error(ProtocolError::UnknownCommand),
    }
}

/// `stats settings`: the rows made at start, with what commands have changed since.
fn settings(ctx: &Ctx) -> Vec<(String, String)> {
    let yes = |on: bool| if on { "yes" } else { "no" }.to_owned();
    let mut rows = ctx.settings.settings_rows.clone();
    for (name, value) in &mut rows {
        match name.as_str() {
            "maxbytes" | "ram_cache_bytes" => *value = ctx.store.ram_bytes().to_string(),
            "verbosity" => *value = ctx.verbosity.load(Relaxed).to_string(),
            "detail_enabled" => *value = yes(ctx.detail.enabled()),
            "lru_crawler" => *value = yes(ctx.crawler.load(Relaxed)),
            _ => {}
        }
    }
    rows
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
        ("version".into(), version()),
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
