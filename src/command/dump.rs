//! `lru_crawler metadump` and `mgdump`: the live items, a page at a time.
//!
//! Each page is one reply: the store reads a page of item headers (no values), the expired
//! and flushed ones are left out as memcached's crawler leaves them out, and the reply names
//! the request for the next page, which the connection runs once the page is written. So a
//! dump of any size holds one page in memory.

use tokio::time::Instant;

use super::{item, Ctx};
use crate::protocol::{
    Crawler, DumpFormat, DumpItem, ProtocolError, Request, Response, SlabClasses,
};
use crate::store::{Dumped, Store};

/// What memcached answers a crawler command while its crawler is off.
pub(super) const CRAWLER_DISABLED: ProtocolError = ProtocolError::Client("lru crawler disabled");

/// Items read per page of a dump: a page's lines stay under a megabyte.
pub const DUMP_PAGE_ITEMS: usize = 1000;

/// The page of the dump after `after` (from the start when `None`).
pub(super) async fn page(
    ctx: &Ctx,
    format: DumpFormat,
    classes: SlabClasses,
    after: Option<String>,
) -> Response {
    // Every item here is reported in class 1 (as `me` reports it): a list of other
    // classes holds none.
    let listed = match &classes {
        SlabClasses::All => true,
        SlabClasses::List(ids) => ids.contains(&1),
        SlabClasses::Bad => false,
    };
    if !listed {
        return Response::Dump {
            format,
            items: Vec::new(),
            more: None,
        };
    }
    let page = match ctx.store.dump(after, DUMP_PAGE_ITEMS).await {
        Ok(Some(page)) => page,
        Ok(None) => return Response::Error(CRAWLER_DISABLED),
        Err(e) => return ctx.failure(e),
    };
    let epoch = match ctx.flush.current(Instant::now()).await {
        Ok(epoch) => epoch,
        Err(e) => return ctx.failure(e),
    };
    let now_us = ctx.clock.now_us();
    let items = page
        .items
        .into_iter()
        .filter(|d| item::hidden(&d.entry, epoch, now_us).is_none())
        .map(dump_item)
        .collect();
    let more = page.next.map(|next| {
        Box::new(Request::LruCrawler(Crawler::Dump {
            format,
            classes,
            after: Some(next),
        }))
    });
    Response::Dump {
        format,
        items,
        more,
    }
}

/// What the dump shows of an item: its last write stands for its last access (reads are
/// not recorded).
fn dump_item(dumped: Dumped) -> DumpItem {
    let entry = dumped.entry;
    DumpItem {
        exp: match entry.expires_at {
            0 => -1,
            at => i64::try_from(at).unwrap_or(i64::MAX),
        },
        last_access: entry.stored_at_us / 1_000_000,
        cas: entry.cas,
        size: dumped.size,
        key: entry.key,
    }
}
