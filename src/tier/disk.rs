//! The optional disk tier: items on local disk through foyer's hybrid cache (its block
//! engine), so a restarted replica starts warm and the hot set may exceed RAM.
//!
//! The RAM tier is a separate foyer cache, with the tier's own freshness rules around it;
//! this hybrid cache's memory part admits nothing, so it holds only what is on disk, its
//! index and its write buffers. Each record carries the item as the store holds it (flags, expiry, store
//! time, cas, version) and the wall-clock moment the store last vouched for it, so a
//! restarted replica serves a record checked less than a window ago with no backend
//! request and revalidates an older one. foyer checksums every record; on top of that a
//! record carries its own format tag and CRC-32, and any record that fails a check, or any
//! read that fails, is a miss.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use foyer::{
    BlockEngineConfig, Code, DeviceBuilder, FsDeviceBuilder, HybridCache, HybridCacheBuilder,
    HybridCachePolicy, PsyncIoEngineConfig, RecoverMode,
};

use crate::store::{Entry, History, Version, Versioned};

/// Default disk tier size when `disk_cache_dir` is set: 1 GiB.
pub const DEFAULT_DISK_CACHE_BYTES: u64 = 1024 * 1024 * 1024;
/// Smallest block: foyer evicts and reclaims whole blocks, and a block bounds the largest
/// record.
const MIN_BLOCK_BYTES: usize = 1024 * 1024;
/// Room in a block beyond the item's value: key, header, version, foyer's framing.
const BLOCK_SLACK_BYTES: usize = 64 * 1024;
/// The disk tier must hold at least this many blocks (foyer keeps some clean for writes).
pub const MIN_DISK_BLOCKS: u64 = 8;
/// The tag every record starts with: the record format's name and version.
const RECORD_TAG: &[u8; 4] = b"s3c1";
/// Longest version (ETag) a record may carry.
const MAX_VERSION_BYTES: usize = 1024;

/// Where the disk tier lives and how big it may grow.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub dir: PathBuf,
    /// Bytes of disk the tier may use (its files; records are 4 KiB-aligned).
    pub bytes: u64,
    /// The largest item value, which a block must hold.
    pub max_item_bytes: usize,
}

impl DiskConfig {
    /// Bytes per block: the largest record rounded up to 4 KiB, at least 1 MiB.
    pub fn block_bytes(&self) -> usize {
        let need = self.max_item_bytes.saturating_add(BLOCK_SLACK_BYTES);
        need.max(MIN_BLOCK_BYTES).next_multiple_of(4096)
    }

    /// Bytes of RAM the tier's write path may hold: foyer's flush buffers and its queue of
    /// records waiting for them, two blocks each (records beyond it are not written: a
    /// later miss).
    pub fn buffer_bytes(&self) -> usize {
        4 * self.block_bytes()
    }
}

/// The key of a record: the item's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DiskKey(pub Bytes);

/// One item as the store holds it, and when the store last confirmed it.
#[derive(Debug, Clone)]
pub struct Record {
    pub item: Versioned,
    /// Unix milliseconds when the store last confirmed this version.
    pub checked_unix_ms: u64,
}

fn bad(what: &str) -> foyer::Error {
    foyer::Error::new(foyer::ErrorKind::Parse, "disk tier record").with_context("bad", what)
}

fn io(e: std::io::Error) -> foyer::Error {
    foyer::Error::io_error(e)
}

fn read_n(reader: &mut impl Read, n: usize) -> foyer::Result<Vec<u8>> {
    let mut out = Vec::new();
    reader.take(n as u64).read_to_end(&mut out).map_err(io)?;
    if out.len() != n {
        return Err(bad("truncated"));
    }
    Ok(out)
}

fn read_array<const N: usize>(reader: &mut impl Read) -> foyer::Result<[u8; N]> {
    let mut buf = [0u8; N];
    reader.read_exact(&mut buf).map_err(|_| bad("truncated"))?;
    Ok(buf)
}

impl Code for DiskKey {
    fn encode(&self, writer: &mut impl Write) -> foyer::Result<()> {
        let len = u32::try_from(self.0.len()).map_err(|_| bad("key length"))?;
        writer.write_all(&len.to_le_bytes()).map_err(io)?;
        writer.write_all(&self.0).map_err(io)
    }

    fn decode(reader: &mut impl Read) -> foyer::Result<Self> {
        let len = u32::from_le_bytes(read_array(reader)?) as usize;
        // memcached keys are at most 250 bytes; anything longer is damage.
        if len > 4096 {
            return Err(bad("key length"));
        }
        Ok(DiskKey(Bytes::from(read_n(reader, len)?)))
    }

    fn estimated_size(&self) -> usize {
        4 + self.0.len()
    }
}

/// A record's fixed-size head: the tag, the entry's fields and the checked moment.
const HEAD_BYTES: usize = 4 + 4 + 8 + 8 + 8 + 1 + 8 + 2 + 4;

impl Record {
    fn head(&self, version: &[u8], value_len: u32) -> [u8; HEAD_BYTES] {
        let e = &self.item.entry;
        let mut head = [0u8; HEAD_BYTES];
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            head[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(RECORD_TAG);
        put(&e.flags.to_le_bytes());
        put(&e.expires_at.to_le_bytes());
        put(&e.stored_at_us.to_le_bytes());
        put(&e.cas.to_le_bytes());
        put(&[u8::from(e.stale) | (u8::from(e.win_sent) << 1)]);
        put(&self.checked_unix_ms.to_le_bytes());
        put(&(version.len() as u16).to_le_bytes());
        put(&value_len.to_le_bytes());
        head
    }
}

impl Code for Record {
    fn encode(&self, writer: &mut impl Write) -> foyer::Result<()> {
        let version = self.item.version.0.as_bytes();
        if version.len() > MAX_VERSION_BYTES {
            return Err(bad("version length"));
        }
        let value = &self.item.entry.value;
        let value_len = u32::try_from(value.len()).map_err(|_| bad("value length"))?;
        let head = self.head(version, value_len);
        let mut crc = crc32fast::Hasher::new();
        for part in [&head[..], version, value] {
            crc.update(part);
            writer.write_all(part).map_err(io)?;
        }
        writer.write_all(&crc.finalize().to_le_bytes()).map_err(io)
    }

    fn decode(reader: &mut impl Read) -> foyer::Result<Self> {
        let head: [u8; HEAD_BYTES] = read_array(reader)?;
        if &head[..4] != RECORD_TAG {
            return Err(bad("tag"));
        }
        let u64_at = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().expect("8"));
        let bits = head[32];
        let version_len = u16::from_le_bytes([head[41], head[42]]) as usize;
        let value_len = u32::from_le_bytes(head[43..47].try_into().expect("4")) as usize;
        if version_len > MAX_VERSION_BYTES {
            return Err(bad("version length"));
        }
        let version = read_n(reader, version_len)?;
        let value = read_n(reader, value_len)?;
        let stored_crc = u32::from_le_bytes(read_array(reader)?);
        let mut crc = crc32fast::Hasher::new();
        for part in [&head[..], &version, &value] {
            crc.update(part);
        }
        if crc.finalize() != stored_crc {
            return Err(bad("checksum"));
        }
        let version = String::from_utf8(version).map_err(|_| bad("version text"))?;
        let entry = Entry {
            key: Bytes::new(),
            flags: u32::from_le_bytes(head[4..8].try_into().expect("4")),
            expires_at: u64_at(8),
            stored_at_us: u64_at(16),
            cas: u64_at(24),
            stale: bits & 1 != 0,
            win_sent: bits & 2 != 0,
            // Not kept on disk: a write over a version read from disk starts a new chain,
            // and a lost answer to it is settled by the version alone.
            history: History::default(),
            value: Bytes::from(value),
        };
        Ok(Record {
            item: Versioned {
                entry,
                version: Version(version),
                large: None,
            },
            checked_unix_ms: u64_at(33),
        })
    }

    fn estimated_size(&self) -> usize {
        HEAD_BYTES + self.item.version.0.len() + self.item.entry.value.len() + 4
    }
}

/// Unix milliseconds now, by this machine's clock.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a disk lookup found.
pub enum Lookup {
    Found(Record),
    Missing,
    /// The record could not be read or failed a check: dropped, and a miss.
    Damaged,
}

/// The disk tier: foyer's hybrid cache with a memory part that admits nothing.
pub struct DiskTier {
    cache: HybridCache<DiskKey, Record>,
    dir: PathBuf,
}

impl DiskTier {
    /// Opens (and recovers) the tier in `config.dir`; must run inside the tokio runtime.
    pub async fn open(config: &DiskConfig) -> std::io::Result<DiskTier> {
        std::fs::create_dir_all(&config.dir)?;
        let block = config.block_bytes();
        let capacity = usize::try_from(config.bytes).unwrap_or(usize::MAX) / block * block;
        let device = FsDeviceBuilder::new(&config.dir)
            .with_capacity(capacity)
            .build()
            .map_err(std::io::Error::other)?;
        let engine = BlockEngineConfig::new(device)
            .with_block_size(block)
            .with_indexer_shards(16)
            .with_recover_concurrency(2)
            .with_buffer_pool_size(config.buffer_bytes() / 2)
            .with_submit_queue_size_threshold(config.buffer_bytes() / 2)
            // Deletes must survive a restart, or a deleted item would come back.
            .with_tombstone_log(true);
        let cache = HybridCacheBuilder::new()
            .with_name("s3cached-disk")
            .with_policy(HybridCachePolicy::WriteOnInsertion)
            .with_flush_on_close(false)
            .memory(0)
            .with_filter(|_: &DiskKey, _: &Record| false)
            .storage()
            .with_io_engine_config(PsyncIoEngineConfig::new())
            .with_engine_config(engine)
            // A damaged record is dropped during recovery instead of failing the start.
            .with_recover_mode(RecoverMode::Quiet)
            .build()
            .await
            .map_err(std::io::Error::other)?;
        Ok(DiskTier {
            cache,
            dir: config.dir.clone(),
        })
    }

    /// The record for `key`, if the disk holds a sound one.
    pub async fn lookup(&self, key: &Bytes) -> Lookup {
        let key = DiskKey(key.clone());
        match self.cache.get(&key).await {
            Ok(Some(entry)) => Lookup::Found(entry.value().clone()),
            Ok(None) => Lookup::Missing,
            Err(e) => {
                tracing::warn!(cause = %e, "disk tier record unreadable: dropped");
                self.cache.remove(&key);
                Lookup::Damaged
            }
        }
    }

    /// Queues `record` for writing (foyer writes in the background, in blocks).
    pub fn insert(&self, key: Bytes, record: Record) {
        self.cache.insert(DiskKey(key), record);
    }

    /// Drops `key`'s record (a tombstone on disk, so it stays dropped after a restart).
    pub fn remove(&self, key: &[u8]) {
        self.cache.remove(&DiskKey(Bytes::copy_from_slice(key)));
    }

    /// Drops every record.
    pub async fn clear(&self) {
        if let Err(e) = self.cache.clear().await {
            tracing::warn!(cause = %e, "disk tier clear failed");
        }
    }

    /// Writes out what is queued and closes the files.
    pub async fn close(&self) {
        if let Err(e) = self.cache.close().await {
            tracing::warn!(cause = %e, "disk tier close failed");
        }
    }

    /// Bytes the tier's files take on disk (its files are sparse: written blocks only).
    pub fn disk_bytes(&self) -> u64 {
        dir_bytes(&self.dir)
    }

    /// Bytes written to the tier's files since it opened.
    pub fn written_bytes(&self) -> u64 {
        self.cache.statistics().disk_write_bytes() as u64
    }
}

/// Bytes allocated on disk to the files in `dir` (not below it).
fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

#[cfg(test)]
mod tests;
