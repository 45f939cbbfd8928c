//! The local-directory store: one file per item, named by the key's SHA-1 under the prefix.
//!
//! Used when no bucket is configured, so that `s3cached` works at once. Writes go to a
//! temporary file that is renamed over the item, so readers never see half an object and
//! items survive restarts. Conditional writes are atomic within this process (a lock per
//! hash stripe), and the process locks the directory (a `flock` on `_s3cached/.lock`), so
//! no second server shares it: the near tier in front may trust what it holds.
//!
//! An item that already exists is rewritten without making a new file: the write goes into
//! its lock stripe's spare file, which is then swapped with the item in one atomic
//! `renameat2(RENAME_EXCHANGE)`; the old item's file becomes the stripe's next spare. Creating
//! a file per write costs far more than the write itself on some filesystems (ext4 without a
//! journal scans every recently deleted inode to allocate one). Readers of an item hold its
//! stripe's read lock from open to end of read, and a spare is rewritten only under the
//! stripe's write lock, so no reader in this process ever reads a spare being rewritten.
//! New items, filesystems without the exchange, and control objects use a new temporary file
//! renamed over the target. Cheapest of all, when writes are not fsynced an item of at most
//! one page rewritten with the same length (a fixed-size value, a counter of as many digits)
//! is overwritten in place with one write: the kernel copies a page whole or not at all, so
//! a crash leaves the old object or the new one, and the stripe's write lock keeps readers
//! out meanwhile. A rename costs several times that write on ext4. Each stripe keeps the
//! files it last rewrote so open (opening a file costs more than the write): a bounded
//! number, checked before each use (still linked, same length), dropped when their item is
//! replaced, removed or swapped.
//!
//! A failed write removes its temporary file. Temporary files left by a crash are removed
//! when the store opens and on each full listing (the culler's), once they are older than
//! [`TEMP_GRACE`] (a live writer keeps touching its own), and until then `max_bytes` counts
//! them; spares are removed when the store opens and counted by `max_bytes`. With `fsync`, a
//! write is on disk before it is acknowledged: the file is fsynced before the rename or swap
//! and the directory after it (and after removals).

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::body::{self, Body, Chunks};
use super::charge::{self, BodyCharge};
use super::format::{
    decode_head, decode_header, Codec, Head, CHECKSUM_BYTES, FORMAT_VERSION, HEADER_BYTES,
    MAX_HEAD_BYTES,
};
use super::{
    admit, is_item_name, key_hash, normalize_prefix, push_hex, DumpPage, Dumped, Entry, ListPage,
    ObjectInfo, PutMode, Store, StoreError, StoreInfo, Version, Versioned, CONTROL_DIR,
};
use crate::protocol::MAX_KEY_BYTES;

/// Lock stripes: writes to one stripe (and reads against them) take turns; each stripe has
/// one spare file.
const LOCK_STRIPES: usize = 64;
/// Values up to this size are written on the calling (async) thread when writes are not
/// fsynced: a write into the page cache costs less than handing it to a blocking thread and
/// waking the caller again. Larger or fsynced writes, and reads (which may wait for the disk),
/// go to tokio's blocking pool.
const INLINE_WRITE_BYTES: usize = 16 * 1024;
/// Temporary files start with this.
const TEMP_PREFIX: &str = ".tmp-";
/// A stripe's spare file (the previous content of an item it swapped with) starts with this.
const SPARE_PREFIX: &str = ".spare-";
/// Objects up to this size are rewritten in place when their length does not change and
/// writes are not fsynced: one page, which the kernel writes whole or not at all.
const IN_PLACE_MAX_BYTES: usize = 4096;
/// A temporary file untouched this long belongs to no live write: it is debris of a crash.
pub const TEMP_GRACE: Duration = Duration::from_secs(60);
/// Item files kept open for in-place rewrites, unless the caller asks for fewer: the file
/// descriptors this store may hold besides the ones a request opens and closes.
pub const DEFAULT_OPEN_FILES: usize = 1024;

pub struct DirStore {
    inner: Arc<Inner>,
    /// The directory's lock file, locked for as long as the store is open: only this
    /// process writes here, so the near tier in front may trust what it holds.
    _lock: fs::File,
}

/// The lock file, in the control folder: no item name starts with a dot.
const LOCK_FILE: &str = ".lock";

struct Inner {
    /// `<data_dir>/<prefix>`: where item files live.
    root: PathBuf,
    codec: Codec,
    /// Per stripe of item names: readers share it, a write (and its spare file) owns it.
    locks: Vec<RwLock<Stripe>>,
    /// Item files each stripe keeps open.
    open_per_stripe: usize,
    /// fsync each written file before its rename, and the directory after.
    fsync: bool,
    /// The filesystem swaps two names atomically; cleared at its first refusal.
    exchange: AtomicBool,
}

impl DirStore {
    /// Opens (creating if needed) the store at `data_dir` joined with the `location` prefix.
    pub fn open(data_dir: &Path, location: &str, codec: Codec) -> std::io::Result<Self> {
        Self::open_with(data_dir, location, codec, false, DEFAULT_OPEN_FILES)
    }

    /// [`open`](DirStore::open), with writes fsynced before they are acknowledged when
    /// `fsync` is set, keeping at most `open_files` item files open for rewrites. Removes
    /// temporary files left by a crash.
    pub fn open_with(
        data_dir: &Path,
        location: &str,
        codec: Codec,
        fsync: bool,
        open_files: usize,
    ) -> std::io::Result<Self> {
        let root = data_dir.join(normalize_prefix(location));
        fs::create_dir_all(root.join(CONTROL_DIR))?;
        let lock = lock_dir(&root.join(CONTROL_DIR).join(LOCK_FILE))?;
        let inner = Inner {
            root,
            codec,
            locks: (0..LOCK_STRIPES)
                .map(|_| RwLock::new(Stripe::default()))
                .collect(),
            open_per_stripe: open_files / LOCK_STRIPES,
            fsync,
            exchange: AtomicBool::new(cfg!(target_os = "linux")),
        };
        inner.remove_spares()?;
        let (removed, kept_bytes) = inner.sweep_temp_files()?;
        if removed > 0 {
            tracing::info!(removed, "removed temporary files left by an earlier crash");
        }
        if kept_bytes > 0 {
            tracing::info!(
                bytes = kept_bytes,
                "recent temporary files kept until they are a minute old"
            );
        }
        Ok(DirStore {
            inner: Arc::new(inner),
            _lock: lock,
        })
    }

    /// Runs blocking file work off the async threads.
    async fn blocking<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|e| StoreError::Unavailable(format!("directory task failed: {e}")))?
    }
}

/// What a stripe's write lock guards besides its spare file: the item files it keeps open
/// for rewrites in place, the most recently used last.
#[derive(Default)]
struct Stripe {
    open: Vec<(String, fs::File)>,
}

impl Stripe {
    /// Takes `name`'s open file out, if the stripe holds one.
    fn take(&mut self, name: &str) -> Option<fs::File> {
        let at = self.open.iter().position(|(n, _)| n == name)?;
        Some(self.open.remove(at).1)
    }

    /// Keeps `file` open as `name`'s, closing the least recently used beyond `limit`.
    fn keep(&mut self, name: &str, file: fs::File, limit: usize) {
        if limit == 0 {
            return;
        }
        if self.open.len() >= limit {
            self.open.remove(0);
        }
        self.open.push((name.to_owned(), file));
    }

    /// Closes `name`'s file: the name is about to mean another file, or none.
    fn forget(&mut self, name: &str) {
        self.take(name);
    }
}

fn io_error(e: std::io::Error) -> StoreError {
    StoreError::Unavailable(format!("directory store: {e}"))
}

impl Inner {
    fn item_path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn control_path(&self, name: &str) -> PathBuf {
        self.root.join(CONTROL_DIR).join(name)
    }

    fn stripe(name: &str) -> usize {
        usize::from_str_radix(name.get(..2).unwrap_or(""), 16).unwrap_or(0) % LOCK_STRIPES
    }

    /// Excludes writes to `name`'s stripe (and rewrites of its spare) while reading.
    fn read_lock(&self, name: &str) -> RwLockReadGuard<'_, Stripe> {
        self.locks[Self::stripe(name)]
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Owns `name`'s stripe and its spare file: for writes and conditional writes.
    fn lock(&self, name: &str) -> RwLockWriteGuard<'_, Stripe> {
        self.locks[Self::stripe(name)]
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn spare_path(&self, name: &str) -> PathBuf {
        self.root
            .join(format!("{SPARE_PREFIX}{:02}", Self::stripe(name)))
    }

    /// Writes the item `name` into `stripe` (its write lock held): a small item of the same
    /// length is rewritten in place (writes not fsynced only); another existing item is
    /// swapped with the stripe's spare file holding `body`; otherwise a new file is renamed in.
    fn write_item(&self, stripe: &mut Stripe, name: &str, body: &[u8]) -> Result<(), StoreError> {
        if !self.fsync && body.len() <= IN_PLACE_MAX_BYTES {
            match rewrite_in_place(stripe.take(name), || self.item_path(name), body) {
                Ok(Some(file)) => {
                    stripe.keep(name, file, self.open_per_stripe);
                    return Ok(());
                }
                Ok(None) => {}
                Err(e) => return Err(io_error(e)),
            }
        }
        let path = self.item_path(name);
        if self.exchange.load(Relaxed) {
            match self.swap_in(name, &path, body) {
                Ok(true) => return self.sync_dir(&self.root),
                Ok(false) => {}
                Err(e) => {
                    let _ = fs::remove_file(self.spare_path(name));
                    return Err(io_error(e));
                }
            }
        }
        self.write(&path, body)
    }

    /// Puts `body` under `path` through the stripe's spare file; `Ok(false)` when this write
    /// needs a file of its own (nothing or a non-file under the name, or no exchange here).
    fn swap_in(&self, name: &str, path: &Path, body: &[u8]) -> std::io::Result<bool> {
        match fs::symlink_metadata(path) {
            // A streamed value's file may still be read by a stream that opened it: it is
            // replaced by a rename, never recycled as a spare and rewritten.
            Ok(meta) if meta.is_file() && !self.streams(meta.len()) => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        let spare = self.spare_path(name);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&spare)?;
        // Truncating costs as much as the write (ext4 dirties the inode even to the same
        // size): only a longer spare needs it.
        let spare_len = file.metadata()?.len();
        file.write_all(body)?;
        if spare_len > body.len() as u64 {
            file.set_len(body.len() as u64)?;
        }
        if self.fsync {
            file.sync_all()?;
        }
        drop(file);
        match exchange(&spare, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                // This filesystem cannot swap names: the spare goes in by rename.
                self.exchange.store(false, Relaxed);
                fs::rename(&spare, path).map(|()| true)
            }
            Err(e) => Err(e),
        }
    }

    /// Removes every spare file: no write is running when the store opens.
    fn remove_spares(&self) -> std::io::Result<()> {
        for dirent in fs::read_dir(&self.root)? {
            let dirent = dirent?;
            if dirent
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(SPARE_PREFIX))
            {
                let _ = fs::remove_file(dirent.path());
            }
        }
        Ok(())
    }

    /// The item `name` without its value, and the size of its file: its header and key are
    /// all that is read. `None` when it is gone, or is not an item whose key has this name.
    fn read_header(&self, name: &str) -> Result<Option<Dumped>, StoreError> {
        let _reading = self.read_lock(name);
        let file = match fs::File::open(self.item_path(name)) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(e)),
        };
        let size = file.metadata().map_err(io_error)?.len();
        let mut head = Vec::with_capacity(HEADER_BYTES + MAX_KEY_BYTES);
        file.take((HEADER_BYTES + MAX_KEY_BYTES) as u64)
            .read_to_end(&mut head)
            .map_err(io_error)?;
        let entry = decode_header(&head)
            .ok()
            .filter(|entry| key_hash(&entry.key) == name);
        Ok(entry.map(|entry| Dumped { entry, size }))
    }

    /// Reads an open item file of `len` bytes whole, charging `meter` its size first.
    fn read_charged(
        mut file: fs::File,
        len: u64,
        meter: Option<&dyn BodyCharge>,
    ) -> Result<Bytes, StoreError> {
        if meter.is_some_and(|meter| !meter.charge_body(len)) {
            return Err(StoreError::OverBudget(len));
        }
        let mut raw = Vec::with_capacity(len as usize);
        file.read_to_end(&mut raw).map_err(io_error)?;
        Ok(Bytes::from(raw))
    }

    fn read(path: &Path) -> Result<Option<Bytes>, StoreError> {
        match fs::read(path) {
            Ok(raw) => Ok(Some(Bytes::from(raw))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(e)),
        }
    }

    /// Writes `body` to `path` atomically (temporary file, then rename).
    fn write(&self, path: &Path, body: &[u8]) -> Result<(), StoreError> {
        self.write_with(path, |file| file.write_all(body))
    }

    /// Writes a temporary file with `fill`, then renames it over `path` (fsyncing both when
    /// asked); on any failure the temporary file is removed.
    fn write_with(
        &self,
        path: &Path,
        fill: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
    ) -> Result<(), StoreError> {
        let tmp = temp_path(path);
        let written = (|| {
            let mut file = fs::File::create(&tmp)?;
            fill(&mut file)?;
            if self.fsync {
                file.sync_all()?;
            }
            drop(file);
            fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_error(e));
        }
        self.sync_dir(path.parent().unwrap_or(&self.root))
    }

    /// With `fsync`, makes a rename or removal in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> Result<(), StoreError> {
        if !self.fsync {
            return Ok(());
        }
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error)
    }

    /// Removes temporary files older than [`TEMP_GRACE`] from the item and control folders;
    /// returns how many went and the bytes of those that are still too recent to remove,
    /// plus the spare files' (in use, never removed here).
    fn sweep_temp_files(&self) -> std::io::Result<(usize, u64)> {
        let (mut removed, mut kept_bytes) = (0, 0);
        let now = SystemTime::now();
        for dir in [self.root.clone(), self.root.join(CONTROL_DIR)] {
            for dirent in fs::read_dir(&dir)? {
                let dirent = dirent?;
                let name = dirent.file_name();
                let name = name.to_str().unwrap_or("");
                let spare = name.starts_with(SPARE_PREFIX);
                if !spare && !name.starts_with(TEMP_PREFIX) {
                    continue;
                }
                let Ok(meta) = dirent.metadata() else {
                    continue; // renamed or removed meanwhile
                };
                if spare {
                    kept_bytes += meta.len();
                    continue;
                }
                let age = meta
                    .modified()
                    .ok()
                    .and_then(|m| now.duration_since(m).ok())
                    .unwrap_or_default();
                if age < TEMP_GRACE {
                    kept_bytes += meta.len();
                } else if fs::remove_file(dirent.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok((removed, kept_bytes))
    }

    /// Reads an item; a retrieval's `meter` is charged its file's size before it is read.
    /// An item whose value is longer than the codec's `stream_above` is read up to its head
    /// only.
    fn read_item(
        &self,
        key: &[u8],
        meter: Option<&dyn BodyCharge>,
    ) -> Result<Option<Versioned>, StoreError> {
        let name = key_hash(key);
        let _reading = self.read_lock(&name);
        let (file, len) = match self.open_streamed(&name, key)? {
            Opened::Head(head, version, _) => {
                let len = head.value_len as u64;
                return Ok(Some(Versioned {
                    entry: head.entry,
                    version,
                    large: Some(len),
                }));
            }
            Opened::Missing => return Ok(None),
            Opened::Whole(file, len) => (file, len),
        };
        let raw = Self::read_charged(file, len, meter)?;
        Ok(self.decode_item(raw, key, &name))
    }

    /// Whether an object of `len` bytes holds a value streamed (longer than `stream_above`).
    fn streams(&self, len: u64) -> bool {
        len > (self
            .codec
            .stream_above
            .saturating_add(MAX_HEAD_BYTES + CHECKSUM_BYTES)) as u64
    }

    /// Opens `name` for `key` and reads its head if its value is streamed; the file stays
    /// open for the value. The caller holds the stripe's read lock (or write lock).
    fn open_streamed(&self, name: &str, key: &[u8]) -> Result<Opened, StoreError> {
        use std::os::unix::fs::FileExt;
        let file = match fs::File::open(self.item_path(name)) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Opened::Missing),
            Err(e) => return Err(io_error(e)),
        };
        let len = file.metadata().map_err(io_error)?.len();
        if !self.streams(len) {
            return Ok(Opened::Whole(file, len));
        }
        let mut first = vec![0; MAX_HEAD_BYTES];
        let n = read_at_most(&file, &mut first, 0).map_err(io_error)?;
        let head = match decode_head(&first[..n]) {
            Ok(Some(head)) if !head.gzipped && head.entry.key == key => head,
            _ => return Ok(Opened::Whole(file, len)),
        };
        if head.object_len() as u64 != len || !head.checksum {
            return Ok(Opened::Whole(file, len));
        }
        let mut trailer = [0; CHECKSUM_BYTES];
        file.read_exact_at(&mut trailer, len - CHECKSUM_BYTES as u64)
            .map_err(io_error)?;
        let version = version_of(&first[..head.value_at], &trailer, len);
        first.truncate(head.value_at);
        Ok(Opened::Head(head, version, Some((file, first))))
    }

    fn decode_item(&self, raw: Bytes, key: &[u8], name: &str) -> Option<Versioned> {
        self.codec
            .decode_item(&raw, key, name)
            .map(|entry| Versioned::whole(entry, item_version(&raw)))
    }

    /// Writes a streamed value's object from a temporary file already filled: renamed over
    /// the item under its stripe's lock.
    fn install(&self, name: &str, tmp: &Path) -> Result<(), StoreError> {
        let mut stripe = self.lock(name);
        stripe.forget(name);
        let renamed = (|| {
            if self.fsync {
                fs::File::open(tmp)?.sync_all()?;
            }
            fs::rename(tmp, self.item_path(name))
        })();
        if let Err(e) = renamed {
            let _ = fs::remove_file(tmp);
            return Err(io_error(e));
        }
        self.sync_dir(&self.root)
    }

    /// Writes `entry` as `mode` allows; returns its version.
    fn put(&self, entry: &Entry, mode: &PutMode) -> Result<Version, StoreError> {
        let name = key_hash(&entry.key);
        let body = self.codec.encode(entry);
        let mut stripe = self.lock(&name);
        if *mode != PutMode::Overwrite {
            admit(self.current_version(&entry.key)?.as_ref(), mode)?;
        }
        self.write_item(&mut stripe, &name, &body)?;
        Ok(item_version(&body))
    }

    /// The version of what is stored under `key` now, for conditional writes; the caller
    /// holds the key's stripe write lock.
    /// A streamed value's version is read from its head and checksum alone.
    fn current_version(&self, key: &[u8]) -> Result<Option<Version>, StoreError> {
        let name = key_hash(key);
        match self.open_streamed(&name, key)? {
            Opened::Missing => Ok(None),
            Opened::Head(_, version, _) => Ok(Some(version)),
            Opened::Whole(file, len) => {
                let raw = Self::read_charged(file, len, None)?;
                Ok(self.decode_item(raw, key, &name).map(|v| v.version))
            }
        }
    }
}

#[async_trait]
impl Store for DirStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Versioned>, StoreError> {
        let key = key.to_vec();
        let meter = charge::current();
        self.blocking(move |inner| inner.read_item(&key, meter.as_deref()))
            .await
    }

    async fn open(&self, key: &[u8], version: &Version) -> Result<Option<Body>, StoreError> {
        let key = key.to_vec();
        let want = version.clone();
        let opened = self
            .blocking(move |inner| {
                let name = key_hash(&key);
                let _reading = inner.read_lock(&name);
                inner.open_streamed(&name, &key)
            })
            .await?;
        let (head, file, first) = match opened {
            Opened::Head(head, version, Some((file, first))) if version == want => {
                (head, file, first)
            }
            _ => return Ok(None),
        };
        let mut crc = crc32fast::Hasher::new();
        crc.update(&first);
        let len = head.value_len as u64;
        Ok(Some(Body {
            len,
            chunks: body::value_stream(crc, file_pieces(file, head.value_at as u64), len, true),
        }))
    }

    async fn put_streamed(
        &self,
        entry: &Entry,
        len: u64,
        value: Chunks,
    ) -> Result<Version, StoreError> {
        let name = key_hash(&entry.key);
        let tmp = temp_path(&self.inner.item_path(&name));
        let written = self.fill(&tmp, entry, len, value).await;
        let version = match written {
            Ok(version) => version,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        self.blocking(move |inner| inner.install(&name, &tmp))
            .await?;
        Ok(version)
    }

    async fn put(&self, entry: &Entry, mode: PutMode) -> Result<Version, StoreError> {
        if !self.inner.fsync && entry.value.len() <= INLINE_WRITE_BYTES {
            return self.inner.put(entry, &mode);
        }
        let entry = entry.clone();
        self.blocking(move |inner| inner.put(&entry, &mode)).await
    }

    async fn delete(&self, key: &[u8], want: Option<&Version>) -> Result<bool, StoreError> {
        let key = key.to_vec();
        let want = want.cloned();
        self.blocking(move |inner| {
            let name = key_hash(&key);
            let mut stripe = inner.lock(&name);
            stripe.forget(&name);
            if let Some(want) = want {
                admit(
                    inner.current_version(&key)?.as_ref(),
                    &PutMode::Update(want),
                )?;
            }
            match fs::remove_file(inner.item_path(&name)) {
                Ok(()) => inner.sync_dir(&inner.root).map(|()| true),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
                Err(e) => Err(io_error(e)),
            }
        })
        .await
    }

    async fn list(&self, cursor: Option<String>, limit: usize) -> Result<ListPage, StoreError> {
        self.blocking(move |inner| {
            // A full listing (the culler's) starts here: clear crash debris, count the rest.
            let other_bytes = match cursor {
                None => inner.sweep_temp_files().map_err(io_error)?.1,
                Some(_) => 0,
            };
            let mut names = Vec::new();
            for dirent in fs::read_dir(&inner.root).map_err(io_error)? {
                let dirent = dirent.map_err(io_error)?;
                if let Some(name) = dirent.file_name().to_str() {
                    if is_item_name(name) && cursor.as_deref().is_none_or(|c| name > c) {
                        names.push(name.to_owned());
                    }
                }
            }
            names.sort_unstable();
            let more = names.len() > limit;
            names.truncate(limit);
            let mut objects = Vec::with_capacity(names.len());
            for name in names {
                let Ok(meta) = fs::metadata(inner.item_path(&name)) else {
                    continue; // removed meanwhile
                };
                let modified_ms = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as u64);
                objects.push(ObjectInfo {
                    name,
                    size: meta.len(),
                    modified_ms,
                });
            }
            let next = if more {
                objects.last().map(|o| o.name.clone())
            } else {
                None
            };
            Ok(ListPage {
                objects,
                next,
                other_bytes,
            })
        })
        .await
    }

    async fn stored_at_us(&self, name: &str) -> Result<Option<u64>, StoreError> {
        if !is_item_name(name) {
            return Ok(None);
        }
        let name = name.to_owned();
        self.blocking(move |inner| {
            // A streamed value's header alone; another item whole, checked.
            match inner.read_header(&name)? {
                Some(header) if inner.streams(header.size) => {
                    return Ok(Some(header.entry.stored_at_us));
                }
                Some(_) => {}
                None => return Ok(None),
            }
            let raw = {
                let _reading = inner.read_lock(&name);
                Inner::read(&inner.item_path(&name))?
            };
            Ok(raw.and_then(|raw| inner.codec.decode(&raw).ok().map(|e| e.stored_at_us)))
        })
        .await
    }

    async fn delete_objects(&self, names: &[String]) -> Result<usize, StoreError> {
        let names = names.to_vec();
        self.blocking(move |inner| {
            let mut removed = 0;
            for name in names.iter().filter(|n| is_item_name(n)) {
                let mut stripe = inner.lock(name);
                stripe.forget(name);
                match fs::remove_file(inner.item_path(name)) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error(e)),
                }
            }
            if removed > 0 {
                inner.sync_dir(&inner.root)?;
            }
            Ok(removed)
        })
        .await
    }

    async fn get_control(&self, name: &str) -> Result<Option<(Bytes, Version)>, StoreError> {
        let name = name.to_owned();
        self.blocking(move |inner| {
            Ok(Inner::read(&inner.control_path(&name))?.map(|body| {
                let version = content_version(&body);
                (body, version)
            }))
        })
        .await
    }

    async fn put_control(
        &self,
        name: &str,
        body: Bytes,
        mode: PutMode,
    ) -> Result<Version, StoreError> {
        let name = name.to_owned();
        self.blocking(move |inner| {
            let path = inner.control_path(&name);
            let _guard = inner.lock("");
            let current = Inner::read(&path)?.map(|b| content_version(&b));
            admit(current.as_ref(), &mode)?;
            inner.write(&path, &body)?;
            Ok(content_version(&body))
        })
        .await
    }

    /// A listing's page, then each item's header and key: a few hundred bytes read per
    /// item, from local files.
    async fn dump(
        &self,
        cursor: Option<String>,
        limit: usize,
    ) -> Result<Option<DumpPage>, StoreError> {
        let listed = self.list(cursor, limit).await?;
        self.blocking(move |inner| {
            let mut items = Vec::with_capacity(listed.objects.len());
            for object in &listed.objects {
                items.extend(inner.read_header(&object.name)?);
            }
            Ok(Some(DumpPage {
                items,
                next: listed.next,
            }))
        })
        .await
    }

    fn info(&self) -> StoreInfo {
        StoreInfo {
            kind: "dir",
            atomic: true,
            dumps: true,
            exclusive: true,
        }
    }
}

/// Opens and locks (`flock`, exclusive) the lock file at `path`; another process holding it
/// is an error that names it, so two servers never share a directory by accident.
fn lock_dir(path: &Path) -> std::io::Result<fs::File> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(std::io::Error::new(
            ErrorKind::WouldBlock,
            format!(
                "{} is locked: another s3cached serves this directory and location",
                path.display()
            ),
        )),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Overwrites the regular file at `path()` (made only when needed) with `body` in one write at offset 0, if it holds
/// exactly `body.len()` bytes; returns the file, to keep open, when it did, and `Ok(None)`
/// (nothing written) when it does not, is absent, or is not a regular file. `open` is the
/// file as this process last wrote it under `path`, if it kept it open: used if it is still
/// linked (a file that lost its name would swallow the write). `body` fits one page, and
/// the kernel copies a page into the page cache whole or not at all, so a crash of this
/// process leaves the old object or the new one, never a mix; a torn page after a power cut
/// fails the object's checksum and reads as a miss, as a torn spare file would. The caller
/// holds the item's stripe write lock, which keeps this process's readers out meanwhile.
fn rewrite_in_place(
    open: Option<fs::File>,
    path: impl FnOnce() -> PathBuf,
    body: &[u8],
) -> std::io::Result<Option<fs::File>> {
    use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
    let file = match open {
        Some(file) => file,
        None => {
            // Never follow a symbolic link, nor wait for a reader of a FIFO.
            let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
            match fs::OpenOptions::new()
                .write(true)
                .custom_flags(flags.bits() as i32)
                .open(path())
            {
                Ok(file) => file,
                // Absent, a directory, a symbolic link, anything unwritable: the usual path
                // decides.
                Err(_) => return Ok(None),
            }
        }
    };
    let meta = file.metadata()?;
    if !meta.is_file() || meta.nlink() == 0 || meta.len() != body.len() as u64 {
        return Ok(None);
    }
    file.write_all_at(body, 0)?;
    Ok(Some(file))
}

/// Swaps the names `a` and `b` atomically (both must exist).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    use rustix::io::Errno;
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).map_err(|e| match e {
        Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP => ErrorKind::Unsupported.into(),
        e => std::io::Error::from(e),
    })
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(ErrorKind::Unsupported.into())
}

/// A content hash as the version, as S3's ETag is: every write stamps a new time, so two
/// versions of an item never share it. For control objects and items of format version 1.
/// What opening an item for a stream found.
enum Opened {
    Missing,
    /// Not a streamed value: read it whole (the open file, its length).
    Whole(fs::File, u64),
    /// A streamed value's head, its version, and the open file with the head's bytes.
    Head(Head, Version, Option<(fs::File, Vec<u8>)>),
}

/// Reads into `buf` from `at` until it is full or the file ends; returns how many bytes.
fn read_at_most(file: &fs::File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], at + n as u64)? {
            0 => break,
            read => n += read,
        }
    }
    Ok(n)
}

/// Bytes read from a file at a time for a stream.
const FILE_PIECE_BYTES: usize = 64 * 1024;

/// The pieces of `file` from `from` to its end, each read on the blocking pool.
fn file_pieces(file: fs::File, from: u64) -> Chunks {
    let file = Arc::new(file);
    futures::stream::unfold(Some(from), move |at| {
        let file = file.clone();
        async move {
            let at = at?;
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0; FILE_PIECE_BYTES];
                let n = read_at_most(&file, &mut buf, at)?;
                buf.truncate(n);
                Ok::<_, std::io::Error>(buf)
            })
            .await;
            match read {
                Ok(Ok(buf)) if buf.is_empty() => None,
                Ok(Ok(buf)) => {
                    let next = at + buf.len() as u64;
                    Some((Ok(Bytes::from(buf)), Some(next)))
                }
                Ok(Err(e)) => Some((Err(io_error(e)), None)),
                Err(e) => Some((
                    Err(StoreError::Unavailable(format!(
                        "directory task failed: {e}"
                    ))),
                    None,
                )),
            }
        }
    })
    .boxed()
}

impl DirStore {
    /// Writes a streamed value's object into `tmp`: its head, the value as it arrives, the
    /// checksum. Returns the object's version.
    async fn fill(
        &self,
        tmp: &Path,
        entry: &Entry,
        len: u64,
        mut value: Chunks,
    ) -> Result<Version, StoreError> {
        use tokio::io::AsyncWriteExt;
        let head = super::format::encode_head(entry, len as usize);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        let mut file = tokio::fs::File::create(tmp).await.map_err(io_error)?;
        file.write_all(&head).await.map_err(io_error)?;
        let mut written = 0u64;
        while let Some(piece) = value.next().await {
            let piece = piece?;
            written += piece.len() as u64;
            if written > len {
                return Err(StoreError::Unavailable("streamed value too long".into()));
            }
            crc.update(&piece);
            file.write_all(&piece).await.map_err(io_error)?;
        }
        if written != len {
            return Err(StoreError::Unavailable("streamed value cut short".into()));
        }
        let checksum = crc.finalize().to_be_bytes();
        file.write_all(&checksum).await.map_err(io_error)?;
        file.flush().await.map_err(io_error)?;
        let object_len = head.len() as u64 + len + CHECKSUM_BYTES as u64;
        Ok(version_of(&head, &checksum, object_len))
    }
}

/// A fresh temporary file's name beside `path`: removed as debris if a crash leaves it.
fn temp_path(path: &Path) -> PathBuf {
    path.with_file_name(format!(
        "{TEMP_PREFIX}{}-{:016x}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x"),
        rand::random::<u64>()
    ))
}

fn content_version(body: &[u8]) -> Version {
    Version(key_hash(body))
}

/// An item object's version, without hashing its value again: a version 2 object ends in the
/// CRC32 of every byte before it, and its header holds the write stamp (unique per write:
/// the store clock never repeats a microsecond) and the cas; length, stamp, cas and checksum
/// together tell two writes apart as surely as a hash of the bytes. Other objects fall back
/// to [`content_version`]. This spares a SHA-1 pass over the whole object on every write
/// and every read.
fn item_version(body: &[u8]) -> Version {
    if body.len() < HEADER_BYTES + CHECKSUM_BYTES || body[4] != FORMAT_VERSION {
        return content_version(body);
    }
    version_of(
        body,
        &body[body.len() - CHECKSUM_BYTES..],
        body.len() as u64,
    )
}

/// [`item_version`] of a version 3 object from its head, its checksum and its length.
fn version_of(head: &[u8], checksum: &[u8], len: u64) -> Version {
    // The header's stamp and cas (16 bytes from offset 22), the trailing CRC32 and the
    // length, in hex: no formatting machinery on every write and read.
    let body = head;
    let length = len.to_be_bytes();
    let mut text = String::with_capacity(3 + 2 * (16 + CHECKSUM_BYTES + 8));
    text.push_str("v2-");
    push_hex(
        &mut text,
        body[22..38].iter().chain(checksum).chain(&length),
    );
    Version(text)
}

#[cfg(test)]
mod tests;
