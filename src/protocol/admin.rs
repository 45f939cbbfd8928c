//! Operator commands (`verbosity`, `cache_memlimit`, `shutdown`, `lru_crawler`): their typed
//! form and their parser, read as memcached 1.6.18's `proto_text.c` reads them.

use bytes::{BufMut, Bytes, BytesMut};

use super::lex::{parse_u64, quiet_error};
use super::meta_reply::encode_key;
use super::{put_decimal, valid_key, ProtocolError, Request};

/// memcached's longest crawler pause, in microseconds (`lru_crawler sleep`).
const MAX_CRAWLER_SLEEP_US: u32 = 1_000_000;
/// memcached's slab class ids run from 1 to 63 (its `MAX_NUMBER_OF_SLAB_CLASSES` is 64).
const MAX_SLAB_CLASS: u32 = 63;

/// What `shutdown` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// `shutdown`: memcached's SIGINT.
    Now,
    /// `shutdown graceful`: memcached's SIGUSR1.
    Graceful,
    /// Anything else: `CLIENT_ERROR invalid shutdown mode` (when shutdown is enabled).
    Invalid,
}

/// Which slab classes an `lru_crawler` command names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlabClasses {
    /// `all` or `hash`: every item.
    All,
    /// A comma-separated list of class ids, each in 1..=63 (empty for `,`).
    List(Vec<u8>),
    /// A list with something that is not a class id: `BADCLASS invalid class id`.
    Bad,
}

impl SlabClasses {
    /// Reads `all`, `hash` or `1,2,...` as memcached's `lru_crawler_crawl` does: each id by
    /// `safe_strtoul` (a 32-bit unsigned long, so larger values wrap), empty pieces skipped.
    fn parse(token: &[u8]) -> Self {
        if token == b"all" || token == b"hash" {
            return SlabClasses::All;
        }
        let mut ids = Vec::new();
        for piece in token.split(|&b| b == b',').filter(|p| !p.is_empty()) {
            match parse_u64(piece).map(|id| id as u32) {
                Some(id @ 1..=MAX_SLAB_CLASS) => ids.push(id as u8),
                _ => return SlabClasses::Bad,
            }
        }
        SlabClasses::List(ids)
    }
}

/// The format of an item dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpFormat {
    /// `lru_crawler metadump`: `key=<uri-encoded> exp=... la=... cas=... fetch=... cls=...
    /// size=...` lines, then `END`.
    Metadump,
    /// `lru_crawler mgdump` (memcached 1.6.19+): `mg <key>` lines (`mg <base64> b` for a
    /// key that is not a text key), then `EN`.
    Mgdump,
}

/// One item of a dump, as memcached's crawler shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpItem {
    pub key: Bytes,
    /// Absolute expiry in Unix seconds, -1 for none.
    pub exp: i64,
    /// Last access in Unix seconds.
    pub last_access: u64,
    pub cas: u64,
    /// Bytes the item takes.
    pub size: u64,
}

impl DumpItem {
    /// Appends the item's line in `format`.
    pub fn encode(&self, format: DumpFormat, out: &mut BytesMut) {
        match format {
            DumpFormat::Metadump => {
                out.put_slice(b"key=");
                uri_encode(&self.key, out);
                out.put_slice(b" exp=");
                put_decimal(out, self.exp);
                out.put_slice(b" la=");
                put_decimal(out, self.last_access);
                out.put_slice(b" cas=");
                put_decimal(out, self.cas);
                out.put_slice(b" fetch=no cls=1 size=");
                put_decimal(out, self.size);
                out.put_u8(b'\n');
            }
            DumpFormat::Mgdump => {
                out.put_slice(b"mg ");
                let text = valid_key(&self.key);
                encode_key(&self.key, !text, out);
                out.put_slice(if text { &b"\r\n"[..] } else { &b" b\r\n"[..] });
            }
        }
    }
}

/// Appends a page of a dump: its items' lines, then after the last page the end marker.
pub(super) fn encode_page(format: DumpFormat, items: &[DumpItem], last: bool, out: &mut BytesMut) {
    for item in items {
        item.encode(format, out);
    }
    if last {
        out.put_slice(format.end());
    }
}

impl DumpFormat {
    /// The line that ends a dump.
    pub fn end(self) -> &'static [u8] {
        match self {
            DumpFormat::Metadump => b"END\r\n",
            DumpFormat::Mgdump => b"EN\r\n",
        }
    }
}

/// memcached's `uriencode`: letters, digits and `-._~` as they are, every other byte as
/// `%XX`.
fn uri_encode(key: &[u8], out: &mut BytesMut) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in key {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.put_u8(b);
        } else {
            out.put_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
}

/// An `lru_crawler` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Crawler {
    /// `lru_crawler crawl <classes>`: reclaim expired items now.
    Crawl(SlabClasses),
    /// `lru_crawler metadump|mgdump <classes>`: list the live items.
    Dump {
        format: DumpFormat,
        classes: SlabClasses,
        /// Where the previous page of this dump ended: `None` from the parser; the command
        /// that answers a page names the request for the next.
        after: Option<String>,
    },
    /// `lru_crawler tocrawl <n>` or `sleep <usecs>`, valid: the crawler's pace.
    Pace,
    /// `lru_crawler enable`.
    Enable,
    /// `lru_crawler disable`.
    Disable,
}

/// `verbosity <level> [noreply]`; memcached reads the level with `safe_strtoul`.
pub(super) fn verbosity(tokens: &[&[u8]]) -> Request {
    let n = tokens.len();
    if n != 2 && n != 3 {
        return Request::Invalid(ProtocolError::UnknownCommand);
    }
    let noreply = noreply(tokens);
    match parse_u64(tokens[1]) {
        Some(level) => Request::Verbosity {
            level: Some(level as u32),
            noreply,
        },
        None => quiet_error(ProtocolError::BAD_FORMAT, noreply),
    }
}

/// `cache_memlimit <megabytes> [noreply]`: a number that does not read is `ERROR`.
pub(super) fn cache_memlimit(tokens: &[&[u8]]) -> Request {
    let n = tokens.len();
    if n != 2 && n != 3 {
        return Request::Invalid(ProtocolError::UnknownCommand);
    }
    let noreply = noreply(tokens);
    match parse_u64(tokens[1]) {
        // A 32-bit field, as memcached's `uint32_t memlimit`: larger values wrap.
        Some(megabytes) => Request::CacheMemlimit {
            megabytes: megabytes as u32,
            noreply,
        },
        None => quiet_error(ProtocolError::UnknownCommand, noreply),
    }
}

/// `shutdown [graceful]`; memcached takes no `noreply` here.
pub(super) fn shutdown(tokens: &[&[u8]]) -> Request {
    Request::Shutdown(match tokens {
        [_] => ShutdownMode::Now,
        [_, b"graceful"] => ShutdownMode::Graceful,
        _ => ShutdownMode::Invalid,
    })
}

/// `lru_crawler <crawl|metadump|mgdump|tocrawl|sleep> <arg>` or `lru_crawler enable|disable`.
pub(super) fn lru_crawler(tokens: &[&[u8]]) -> Request {
    let crawler = match tokens {
        [_, b"crawl", classes] => Crawler::Crawl(SlabClasses::parse(classes)),
        [_, b"metadump", classes] => dump(DumpFormat::Metadump, classes),
        [_, b"mgdump", classes] => dump(DumpFormat::Mgdump, classes),
        [_, b"tocrawl", n] => match parse_u64(n) {
            Some(_) => Crawler::Pace,
            None => return Request::Invalid(ProtocolError::BAD_FORMAT),
        },
        [_, b"sleep", usecs] => match parse_u64(usecs).map(|us| us as u32) {
            Some(0..=MAX_CRAWLER_SLEEP_US) => Crawler::Pace,
            Some(_) => {
                return Request::Invalid(ProtocolError::Client("sleep must be one second or less"))
            }
            None => return Request::Invalid(ProtocolError::BAD_FORMAT),
        },
        [_, b"enable"] => Crawler::Enable,
        [_, b"disable"] => Crawler::Disable,
        _ => return Request::Invalid(ProtocolError::UnknownCommand),
    };
    Request::LruCrawler(crawler)
}

fn dump(format: DumpFormat, classes: &[u8]) -> Crawler {
    Crawler::Dump {
        format,
        classes: SlabClasses::parse(classes),
        after: None,
    }
}

fn noreply(tokens: &[&[u8]]) -> bool {
    tokens.last() == Some(&&b"noreply"[..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{parse, Limits};

    fn req(line: &str) -> Request {
        parse(line.as_bytes(), &Limits::default())
            .expect("complete")
            .request
    }

    const ERROR: Request = Request::Invalid(ProtocolError::UnknownCommand);

    #[test]
    fn cache_memlimit_reads_a_32_bit_number_of_megabytes() {
        let limit = |megabytes, noreply| Request::CacheMemlimit { megabytes, noreply };
        assert_eq!(req("cache_memlimit 50\r\n"), limit(50, false));
        assert_eq!(req("cache_memlimit 50 noreply\r\n"), limit(50, true));
        assert_eq!(req("cache_memlimit +20\r\n"), limit(20, false));
        assert_eq!(req("cache_memlimit 50 x\r\n"), limit(50, false));
        // memcached's uint32_t: 2^32 wraps to 0, 2^32 + 8 to 8.
        assert_eq!(req("cache_memlimit 4294967296\r\n"), limit(0, false));
        assert_eq!(req("cache_memlimit 4294967304\r\n"), limit(8, false));
        assert_eq!(req("cache_memlimit\r\n"), ERROR);
        assert_eq!(req("cache_memlimit abc\r\n"), ERROR);
        assert_eq!(req("cache_memlimit -1\r\n"), ERROR);
        assert_eq!(req("cache_memlimit 20x\r\n"), ERROR);
        assert_eq!(req("cache_memlimit abc noreply\r\n"), Request::Silent);
        assert_eq!(req("cache_memlimit 50 noreply x\r\n"), ERROR);
    }

    #[test]
    fn verbosity_keeps_its_level() {
        let level = |l, noreply| Request::Verbosity {
            level: Some(l),
            noreply,
        };
        assert_eq!(req("verbosity 1\r\n"), level(1, false));
        assert_eq!(req("verbosity 1 noreply\r\n"), level(1, true));
        assert_eq!(req("verbosity 0 junk\r\n"), level(0, false));
        assert_eq!(req("verbosity\r\n"), ERROR);
        assert_eq!(req("verbosity 1 2 3\r\n"), ERROR);
        assert_eq!(
            req("verbosity -1\r\n"),
            Request::Invalid(ProtocolError::BAD_FORMAT)
        );
        assert_eq!(req("verbosity x noreply\r\n"), Request::Silent);
    }

    #[test]
    fn shutdown_modes() {
        assert_eq!(req("shutdown\r\n"), Request::Shutdown(ShutdownMode::Now));
        assert_eq!(
            req("shutdown graceful\r\n"),
            Request::Shutdown(ShutdownMode::Graceful)
        );
        for invalid in [
            "shutdown x\r\n",
            "shutdown noreply\r\n",
            "shutdown graceful x\r\n",
        ] {
            assert_eq!(req(invalid), Request::Shutdown(ShutdownMode::Invalid));
        }
    }

    #[test]
    fn lru_crawler_subcommands() {
        let crawler = |c| Request::LruCrawler(c);
        let dump = |format, classes| {
            crawler(Crawler::Dump {
                format,
                classes,
                after: None,
            })
        };
        assert_eq!(
            req("lru_crawler metadump all\r\n"),
            dump(DumpFormat::Metadump, SlabClasses::All)
        );
        assert_eq!(
            req("lru_crawler mgdump hash\r\n"),
            dump(DumpFormat::Mgdump, SlabClasses::All)
        );
        assert_eq!(
            req("lru_crawler metadump 2,1,\r\n"),
            dump(DumpFormat::Metadump, SlabClasses::List(vec![2, 1]))
        );
        assert_eq!(
            req("lru_crawler metadump ,\r\n"),
            dump(DumpFormat::Metadump, SlabClasses::List(vec![]))
        );
        for bad in ["0", "64", "x", "1,x", "-1"] {
            assert_eq!(
                req(&format!("lru_crawler crawl {bad}\r\n")),
                crawler(Crawler::Crawl(SlabClasses::Bad)),
                "{bad}"
            );
        }
        assert_eq!(req("lru_crawler tocrawl 5\r\n"), crawler(Crawler::Pace));
        assert_eq!(req("lru_crawler sleep 1000000\r\n"), crawler(Crawler::Pace));
        assert_eq!(
            req("lru_crawler sleep 1000001\r\n"),
            Request::Invalid(ProtocolError::Client("sleep must be one second or less"))
        );
        assert_eq!(
            req("lru_crawler tocrawl x\r\n"),
            Request::Invalid(ProtocolError::BAD_FORMAT)
        );
        assert_eq!(req("lru_crawler enable\r\n"), crawler(Crawler::Enable));
        assert_eq!(req("lru_crawler disable\r\n"), crawler(Crawler::Disable));
        for error in [
            "lru_crawler\r\n",
            "lru_crawler x\r\n",
            "lru_crawler metadump\r\n",
            "lru_crawler metadump all x\r\n",
            "lru_crawler crawl 1 noreply\r\n",
            "lru_crawler disable noreply\r\n",
        ] {
            assert_eq!(req(error), ERROR, "{error}");
        }
    }

    #[test]
    fn dump_lines_as_memcached_writes_them() {
        let item = |key: &[u8]| DumpItem {
            key: Bytes::copy_from_slice(key),
            exp: -1,
            last_access: 1_700_000_000,
            cas: 7,
            size: 61,
        };
        let line = |item: DumpItem, format| {
            let mut out = BytesMut::new();
            item.encode(format, &mut out);
            out
        };
        assert_eq!(
            line(item(b"b%20c"), DumpFormat::Metadump),
            &b"key=b%2520c exp=-1 la=1700000000 cas=7 fetch=no cls=1 size=61\n"[..]
        );
        assert_eq!(
            line(item(b"a-._~Z9/\xff"), DumpFormat::Metadump)[..22],
            b"key=a-._~Z9%2F%FF exp="[..]
        );
        assert_eq!(line(item(b"k"), DumpFormat::Mgdump), &b"mg k\r\n"[..]);
        assert_eq!(
            line(item(b"a b"), DumpFormat::Mgdump),
            &b"mg YSBi b\r\n"[..]
        );
    }

    #[test]
    fn commands_memcached_builds_only_for_debugging_are_unknown() {
        for line in ["misbehave\r\n", "debugtime 1\r\n", "debugtime p\r\n"] {
            assert_eq!(req(line), ERROR, "{line}");
        }
    }
}
