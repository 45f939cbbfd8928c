//! The storage abstraction, in memcached's meanings, and its backends.
//!
//! A [`Store`] keeps whole items ([`Entry`]) by key and offers the three kinds of write that
//! memcached commands need: overwrite, create-if-absent and update-if-unchanged. It knows
//! nothing of expiry or flush (the command layer decides what is live) and nothing of the
//! wire protocol. All S3 types stay inside [`s3`].

pub mod body;
pub mod charge;
#[cfg(test)]
pub mod conformance;
pub mod dir;
pub mod fanout;
pub mod format;
pub mod memory;
pub mod s3;
#[cfg(test)]
pub mod test_utils;

use async_trait::async_trait;
use body::Body;
use bytes::Bytes;
use sha1::{Digest, Sha1};

/// One cached item as stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    pub key: Bytes,
    /// The client's opaque 32-bit flags.
    pub flags: u32,
    /// Absolute expiry in Unix seconds; 0 = never.
    pub expires_at: u64,
    /// When it was written, in Unix microseconds: `flush_all` compares against it.
    pub stored_at_us: u64,
    /// The cas unique: changed by every mutation.
    pub cas: u64,
    /// Marked stale by meta delete with `I`.
    pub stale: bool,
    /// A meta get has already handed out the recache win for it.
    pub win_sent: bool,
    /// The writes that led to this version: how a write whose answer was lost is settled.
    pub history: History,
    pub value: Bytes,
}

/// Most write ids an object keeps ([`History`]): 256 bytes an object. A write whose answer
/// was lost is recognised while fewer than this many writes followed it before it is settled
/// (a read right after the failed attempt); see docs/design.md, "Exactly once".
pub const HISTORY_LEN: usize = 32;

/// The ids of the writes that led to a stored object, newest first: the object's own write
/// id, then its predecessor's, and so on, at most [`HISTORY_LEN`]. A read-modify-write
/// carries its base's history on, so a writer whose answer was lost finds its id in the
/// object even after others wrote over it, and one whose write was not applied finds its
/// base followed by someone else's write (see [`s3::write`](crate::store::s3)).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct History {
    ids: Option<std::sync::Arc<[u64]>>,
    /// The chain is whole back to a create-if-absent: nothing was dropped from it and no
    /// blind write restarted it, so an `add` that is not in it was not the create.
    pub from_create: bool,
}

impl History {
    /// A chain that starts with this write: a create-if-absent (`from_create`) or a blind
    /// write, which does not read what it replaces.
    pub fn start(from_create: bool) -> History {
        History::from_ids(vec![rand::random()], from_create)
    }

    /// The history of a write over this version: a new id, then this chain, the oldest ids
    /// dropped past [`HISTORY_LEN`].
    pub fn next(&self) -> History {
        let old = self.ids();
        let kept = old.len().min(HISTORY_LEN - 1);
        let mut ids = Vec::with_capacity(kept + 1);
        ids.push(rand::random());
        ids.extend_from_slice(&old[..kept]);
        History::from_ids(ids, self.from_create && kept == old.len())
    }

    /// A history as stored (newest first; at most [`HISTORY_LEN`] are kept).
    pub fn from_ids(mut ids: Vec<u64>, from_create: bool) -> History {
        ids.truncate(HISTORY_LEN);
        History {
            ids: (!ids.is_empty()).then(|| ids.into()),
            from_create,
        }
    }

    pub fn ids(&self) -> &[u64] {
        self.ids.as_deref().unwrap_or_default()
    }

    /// This version's own write id (none on objects written before histories).
    pub fn own(&self) -> Option<u64> {
        self.ids().first().copied()
    }

    /// The write id of the version this one was written over, when it had one.
    pub fn base(&self) -> Option<u64> {
        self.ids().get(1).copied()
    }

    /// How many writes came after `id` (0: it is this version's own), if it is held.
    pub fn position(&self, id: u64) -> Option<usize> {
        self.ids().iter().position(|&i| i == id)
    }
}

/// An opaque token for the stored object as it was read (an ETag on S3).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version(pub String);

impl Version {
    /// What a write that was applied but already written over when it was settled returns:
    /// its own version is unknown, so nothing may be cached as it.
    pub fn superseded() -> Version {
        Version(String::new())
    }

    /// Whether this names a stored object (not [`superseded`](Version::superseded)).
    pub fn is_known(&self) -> bool {
        !self.0.is_empty()
    }
}

/// A stored entry and the version it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub entry: Entry,
    pub version: Version,
    /// `Some(len)`: the value, of `len` bytes, is longer than the store's `stream_above` and
    /// was not read (the entry's value is empty); [`Store::open`] streams it.
    pub large: Option<u64>,
}

impl Versioned {
    /// An entry read whole.
    pub fn whole(entry: Entry, version: Version) -> Versioned {
        Versioned {
            entry,
            version,
            large: None,
        }
    }
}

/// What a revalidation of a known version found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revalidated {
    /// The stored object is still the version asked about.
    Unchanged,
    /// It changed (or is gone): what is stored now.
    Changed(Option<Versioned>),
}

/// How a write treats what is already there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutMode {
    /// Replace whatever is there.
    Overwrite,
    /// Write only if nothing is stored under the key ([`StoreError::Exists`] otherwise).
    Create,
    /// Write only if the stored object is still this version ([`StoreError::Changed`] otherwise,
    /// also when it is gone).
    Update(Version),
}

/// Why a store call did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A create found an object already stored.
    #[error("object exists")]
    Exists,
    /// An update found the object changed or gone.
    #[error("object changed")]
    Changed,
    /// The backend failed, timed out or refused: the client gets `SERVER_ERROR`.
    #[error("{0}")]
    Unavailable(String),
    /// A value of this many bytes was found, and the memory budget cannot take it now: it
    /// was not read ([`crate::budget::meter`]).
    #[error("memory budget: a value of {0} bytes must wait")]
    OverBudget(u64),
    /// The command needs the whole value of an item streamed for its length (an append,
    /// a touch): the client gets memcached's `SERVER_ERROR object too large for cache`.
    #[error("object too large for cache")]
    TooLarge,
}

/// One object found by listing, for the culler and flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The object's full name (prefix included).
    pub name: String,
    pub size: u64,
    /// Last write time, Unix milliseconds.
    pub modified_ms: u64,
}

/// A page of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectInfo>,
    /// Pass back to get the next page; `None` at the end.
    pub next: Option<String>,
    /// Bytes under the prefix that are not items yet take space (a directory store's
    /// unfinished writes), reported with the first page; `max_bytes` counts them.
    pub other_bytes: u64,
}

/// One item found by [`Store::dump`]: its entry without the value, and its stored size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dumped {
    /// Key, flags, expiry, write time and cas; the value is left empty.
    pub entry: Entry,
    /// Bytes the stored object takes (header, key, value).
    pub size: u64,
}

/// A page of a dump.
#[derive(Debug, Clone, Default)]
pub struct DumpPage {
    pub items: Vec<Dumped>,
    /// Pass back to get the next page; `None` at the end.
    pub next: Option<String>,
}

/// What a backend is and what it guarantees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreInfo {
    /// `memory`, `dir` or `s3`.
    pub kind: &'static str,
    /// Whether create and update are atomic against other writers (other replicas too).
    pub atomic: bool,
    /// Whether [`Store::dump`] lists items: only where reading an item's header is cheap.
    pub dumps: bool,
    /// Whether only this process writes the store (the directory store, locked): what the
    /// near tier holds cannot have changed behind it, so it never asks again.
    pub exclusive: bool,
}

/// A key-value store of cache items.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The entry stored under `key`, if any. Corrupt or foreign objects read as absent.
    async fn get(&self, key: &[u8]) -> Result<Option<Versioned>, StoreError>;

    /// Reads `key` again unless it is still at `version` (a conditional GET on S3, which
    /// answers 304 without a body when nothing changed).
    async fn get_if_changed(
        &self,
        key: &[u8],
        version: &Version,
    ) -> Result<Revalidated, StoreError> {
        Ok(match self.get(key).await? {
            Some(v) if &v.version == version => Revalidated::Unchanged,
            other => Revalidated::Changed(other),
        })
    }

    /// Writes `entry` under `entry.key`, as `mode` allows; returns the new version.
    async fn put(&self, entry: &Entry, mode: PutMode) -> Result<Version, StoreError>;

    /// The value of `key` as it arrives, if the stored object is still at `version`
    /// (`None`: it changed or is gone). Stores that hold items whole (they never answer
    /// [`Versioned::large`]) hand over the value read by `get`; stores that stream override it.
    async fn open(&self, key: &[u8], version: &Version) -> Result<Option<Body>, StoreError> {
        Ok(match self.get(key).await? {
            Some(v) if &v.version == version => Some(Body::whole(v.entry.value)),
            _ => None,
        })
    }

    /// Overwrites `entry.key` with `entry` (its value empty) and a value of `len` bytes
    /// taken from `value` as it arrives, in bounded memory; nothing is stored unless all of
    /// it arrives. Stores that hold items whole collect it.
    async fn put_streamed(
        &self,
        entry: &Entry,
        len: u64,
        mut value: body::Chunks,
    ) -> Result<Version, StoreError> {
        use futures::StreamExt;
        let mut whole = bytes::BytesMut::with_capacity(len as usize);
        while let Some(piece) = value.next().await {
            whole.extend_from_slice(&piece?);
        }
        if whole.len() as u64 != len {
            return Err(StoreError::Unavailable("streamed value cut short".into()));
        }
        let entry = Entry {
            value: whole.freeze(),
            ..entry.clone()
        };
        self.put(&entry, PutMode::Overwrite).await
    }

    /// Removes `key` (only if still at `version`, when given). `Ok(false)`: nothing was there.
    async fn delete(&self, key: &[u8], version: Option<&Version>) -> Result<bool, StoreError>;

    /// One page of the item objects under the prefix, in name order (control objects excluded).
    async fn list(&self, cursor: Option<String>, limit: usize) -> Result<ListPage, StoreError>;

    /// When the item object `name` (as [`list`](Store::list) gives it) was stored, read from
    /// its header; `None` if it is gone or unreadable. For the rare cases a listing's
    /// modification time cannot decide.
    async fn stored_at_us(&self, name: &str) -> Result<Option<u64>, StoreError>;

    /// Removes objects by name (as [`list`](Store::list) gives them); returns how many.
    async fn delete_objects(&self, names: &[String]) -> Result<usize, StoreError>;

    /// Reads a small control object (flush epoch, cull lease) kept beside the items.
    async fn get_control(&self, name: &str) -> Result<Option<(Bytes, Version)>, StoreError>;

    /// Writes a control object as `mode` allows.
    async fn put_control(
        &self,
        name: &str,
        body: Bytes,
        mode: PutMode,
    ) -> Result<Version, StoreError>;

    /// One page of the items under the prefix, each read without its value, in name order,
    /// for `lru_crawler metadump`; `None` from a store that cannot read them cheaply (on S3
    /// every item would cost a GET). Corrupt or foreign objects are left out.
    async fn dump(
        &self,
        cursor: Option<String>,
        limit: usize,
    ) -> Result<Option<DumpPage>, StoreError> {
        let _ = (cursor, limit);
        Ok(None)
    }

    fn info(&self) -> StoreInfo;

    /// The S3 requests this store sends, counted by price class (S3 stores only).
    fn request_counts(&self) -> Option<std::sync::Arc<crate::store::s3::S3Requests>> {
        None
    }
}

/// Checks a write's precondition against the version stored now (`None`: nothing stored);
/// for backends that enforce preconditions themselves, under their own lock.
pub fn admit(current: Option<&Version>, mode: &PutMode) -> Result<(), StoreError> {
    match (mode, current) {
        (PutMode::Overwrite, _) | (PutMode::Create, None) => Ok(()),
        (PutMode::Create, Some(_)) => Err(StoreError::Exists),
        (PutMode::Update(want), Some(have)) if want == have => Ok(()),
        (PutMode::Update(_), _) => Err(StoreError::Changed),
    }
}

/// Maximum names one [`Store::delete_objects`] call is given (S3's DeleteObjects limit).
pub const DELETE_BATCH: usize = 1000;

/// Removes every item object; returns how many. Used by flush and tests.
pub async fn clear(store: &dyn Store) -> Result<usize, StoreError> {
    let mut removed = 0;
    loop {
        let page = store.list(None, DELETE_BATCH).await?;
        if page.objects.is_empty() {
            return Ok(removed);
        }
        let names: Vec<String> = page.objects.into_iter().map(|o| o.name).collect();
        removed += store.delete_objects(&names).await?;
    }
}

/// The SHA-1 of a key, in lower-case hex: the object's name under the prefix.
pub fn key_hash(key: &[u8]) -> String {
    let mut hex = String::with_capacity(40);
    push_hex(&mut hex, &Sha1::digest(key));
    hex
}

/// Appends `bytes` to `out` in lower-case hex, two digits a byte.
pub(crate) fn push_hex<'a>(out: &mut String, bytes: impl IntoIterator<Item = &'a u8>) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = std::mem::take(out).into_bytes();
    for &byte in bytes {
        text.push(DIGITS[usize::from(byte >> 4)]);
        text.push(DIGITS[usize::from(byte & 15)]);
    }
    *out = String::from_utf8(text).expect("a string with ASCII digits pushed");
}

/// The prefix as a folder: empty, or ending in exactly one `/`, with no leading `/`.
pub fn normalize_prefix(location: &str) -> String {
    let trimmed = location.trim_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("{trimmed}/")
    }
}

/// Whether an object name (after the prefix) is an item: 40 lower-case hex digits.
pub fn is_item_name(name: &str) -> bool {
    name.len() == 40
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The folder under the prefix that holds control objects.
pub const CONTROL_DIR: &str = "_s3cached";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha1_hex_names() {
        assert_eq!(key_hash(b"abc"), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert!(is_item_name(&key_hash(b"anything")));
        assert!(!is_item_name("_s3cached"));
    }

    #[test]
    fn prefix_is_a_folder() {
        assert_eq!(normalize_prefix(""), "");
        assert_eq!(normalize_prefix("/"), "");
        assert_eq!(normalize_prefix("cache"), "cache/");
        assert_eq!(normalize_prefix("/a/b/"), "a/b/");
    }
}
