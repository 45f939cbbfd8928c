//! Operator commands: `verbosity`, `cache_memlimit`, `shutdown` and `lru_crawler`, answered in
//! memcached 1.6's words.

use std::sync::atomic::Ordering::Relaxed;

use super::dump::{self, CRAWLER_DISABLED};
use super::Ctx;
use crate::protocol::{Crawler, ProtocolError, Response, ShutdownMode, SlabClasses};
use crate::store::Store;

/// memcached's highest verbosity: larger levels are kept as this.
const MAX_VERBOSITY: u32 = 2;
/// memcached's smallest `cache_memlimit`, in megabytes.
const MIN_MEMLIMIT_MB: u32 = 8;
/// memcached's largest `cache_memlimit`, in megabytes: larger ones were meant as bytes.
const MAX_MEMLIMIT_MB: u32 = 1_000_000_000;
/// Bytes in one of `cache_memlimit`'s megabytes.
const MEGABYTE_BYTES: u64 = 1024 * 1024;

/// `verbosity <level>`: kept for `stats settings`; `slabs automove` has nothing to tune.
pub(super) fn verbosity(ctx: &Ctx, level: Option<u32>) -> Response {
    if let Some(level) = level {
        ctx.verbosity.store(level.min(MAX_VERBOSITY), Relaxed);
    }
    Response::Ok
}

/// `cache_memlimit <megabytes>`: the near tier's RAM becomes that size, with memcached's
/// bounds; a server whose RAM tier is off answers as memcached does when it cannot adjust.
pub(super) async fn cache_memlimit(ctx: &Ctx, megabytes: u32) -> Response {
    if megabytes < MIN_MEMLIMIT_MB {
        return Response::Line("MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m");
    }
    if megabytes > MAX_MEMLIMIT_MB {
        return Response::Line("MEMLIMIT_ADJUST_FAILED input value is megabytes not bytes");
    }
    let tier = ctx.store.clone();
    let bytes = u64::from(megabytes) * MEGABYTE_BYTES;
    // foyer evicts what no longer fits before the resize returns: off the async threads.
    let resized = tokio::task::spawn_blocking(move || tier.resize_ram(bytes)).await;
    if resized.unwrap_or(false) {
        tracing::info!(bytes, "cache_memlimit: the RAM tier was resized");
        Response::Ok
    } else {
        Response::Line("MEMLIMIT_ADJUST_FAILED out of bounds or unable to adjust")
    }
}

/// `shutdown [graceful]`: refused unless enabled; else the connection closes and the server
/// drains as on SIGTERM (both modes: a drain is already graceful).
pub(super) fn shutdown(ctx: &Ctx, mode: ShutdownMode) -> Response {
    if !ctx.settings.shutdown_enabled {
        return Response::Line("ERROR: shutdown not enabled");
    }
    if mode == ShutdownMode::Invalid {
        return Response::Error(ProtocolError::Client("invalid shutdown mode"));
    }
    let graceful = mode == ShutdownMode::Graceful;
    tracing::info!(graceful, "shutdown requested by a client");
    ctx.stop.cancel();
    Response::Close
}

/// `lru_crawler ...`. The crawler is on where the store can list its items cheaply; on S3
/// every command that would crawl answers as memcached's does with its crawler disabled.
pub(super) async fn lru_crawler(ctx: &Ctx, crawler: Crawler) -> Response {
    let on = ctx.crawler.load(Relaxed);
    match crawler {
        // The next page of a dump already under way.
        Crawler::Dump {
            format,
            classes,
            after: Some(after),
        } => dump::page(ctx, format, classes, Some(after)).await,
        Crawler::Crawl(_) | Crawler::Dump { .. } if !on => Response::Error(CRAWLER_DISABLED),
        Crawler::Crawl(classes) => match started(&classes) {
            // Expired items are misses already, and the culler removes objects.
            Ok(_) => Response::Ok,
            Err(refused) => refused,
        },
        Crawler::Dump {
            format, classes, ..
        } => match started(&classes) {
            Ok(_) => dump::page(ctx, format, classes, None).await,
            Err(refused) => refused,
        },
        Crawler::Pace => Response::Ok,
        // memcached answers this when its crawler already runs, too.
        Crawler::Enable if on || !ctx.store.info().dumps => {
            Response::Line("ERROR failed to start lru crawler thread")
        }
        Crawler::Enable => {
            ctx.crawler.store(true, Relaxed);
            Response::Ok
        }
        Crawler::Disable => {
            ctx.crawler.store(false, Relaxed);
            Response::Ok
        }
    }
}

/// Whether a crawl of `classes` starts, or memcached's refusal.
fn started(classes: &SlabClasses) -> Result<(), Response> {
    match classes {
        SlabClasses::Bad => Err(Response::Line("BADCLASS invalid class id")),
        SlabClasses::List(ids) if ids.is_empty() => {
            Err(Response::Line("NOTSTARTED no items to crawl"))
        }
        _ => Ok(()),
    }
}
