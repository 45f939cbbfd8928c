//! The local-directory store: one file per item, named by the key's SHA-1 under the prefix.
//!
//! Used when no bucket is configured, so that `s3cached` works at once. Writes go to a
//! temporary file that is renamed over the item, so readers never see half an object and
//! items survive restarts. Conditional writes are atomic within this process (a lock per
//! hash stripe); several processes sharing one directory get no such guarantee.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use async_trait::async_trait;
use bytes::Bytes;

use super::format::Codec;
use super::{
    admit, is_item_name, key_hash, normalize_prefix, Entry, ListPage, ObjectInfo, PutMode, Store,
    StoreError, StoreInfo, Version, Versioned, CONTROL_DIR,
};

/// Lock stripes for conditional writes.
const LOCK_STRIPES: usize = 64;

pub struct DirStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// `<data_dir>/<prefix>`: where item files live.
    root: PathBuf,
    codec: Codec,
    locks: Vec<std::sync::Mutex<()>>,
}

impl DirStore {
    /// Opens (creating if needed) the store at `data_dir` joined with the `location` prefix.
    pub fn open(data_dir: &Path, location: &str, codec: Codec) -> std::io::Result<Self> {
        let root = data_dir.join(normalize_prefix(location));
        fs::create_dir_all(root.join(CONTROL_DIR))?;
        Ok(DirStore {
            inner: Arc::new(Inner {
                root,
                codec,
                locks: (0..LOCK_STRIPES)
                    .map(|_| std::sync::Mutex::new(()))
                    .collect(),
            }),
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

    fn lock(&self, name: &str) -> std::sync::MutexGuard<'_, ()> {
        let stripe = usize::from_str_radix(&name[..2.min(name.len())], 16).unwrap_or(0);
        self.locks[stripe % LOCK_STRIPES]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read(path: &Path) -> Result<Option<Bytes>, StoreError> {
        match fs::read(path) {
            Ok(raw) => Ok(Some(Bytes::from(raw))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(e)),
        }
    }

    /// Writes `body` to `path` atomically (temporary file, then rename).
    fn write(path: &Path, body: &[u8]) -> Result<(), StoreError> {
        let tmp = path.with_file_name(format!(
            ".tmp-{}-{:016x}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("x"),
            rand::random::<u64>()
        ));
        fs::write(&tmp, body).map_err(io_error)?;
        fs::rename(&tmp, path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_error(e)
        })
    }

    fn read_item(&self, key: &[u8]) -> Result<Option<Versioned>, StoreError> {
        let name = key_hash(key);
        let Some(raw) = Self::read(&self.item_path(&name))? else {
            return Ok(None);
        };
        Ok(self
            .codec
            .decode_item(&raw, key, &name)
            .map(|entry| Versioned {
                version: content_version(&raw),
                entry,
            }))
    }

    /// The version of what is stored under `key` now, for conditional writes.
    fn current_version(&self, key: &[u8]) -> Result<Option<Version>, StoreError> {
        Ok(self.read_item(key)?.map(|v| v.version))
    }
}

#[async_trait]
impl Store for DirStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Versioned>, StoreError> {
        let key = key.to_vec();
        self.blocking(move |inner| inner.read_item(&key)).await
    }

    async fn put(&self, entry: &Entry, mode: PutMode) -> Result<Version, StoreError> {
        let entry = entry.clone();
        self.blocking(move |inner| {
            let name = key_hash(&entry.key);
            let body = inner.codec.encode(&entry);
            let _guard = inner.lock(&name);
            if mode != PutMode::Overwrite {
                admit(inner.current_version(&entry.key)?.as_ref(), &mode)?;
            }
            Inner::write(&inner.item_path(&name), &body)?;
            Ok(content_version(&body))
        })
        .await
    }

    async fn delete(&self, key: &[u8], want: Option<&Version>) -> Result<bool, StoreError> {
        let key = key.to_vec();
        let want = want.cloned();
        self.blocking(move |inner| {
            let name = key_hash(&key);
            let _guard = inner.lock(&name);
            if let Some(want) = want {
                admit(
                    inner.current_version(&key)?.as_ref(),
                    &PutMode::Update(want),
                )?;
            }
            match fs::remove_file(inner.item_path(&name)) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
                Err(e) => Err(io_error(e)),
            }
        })
        .await
    }

    async fn list(&self, cursor: Option<String>, limit: usize) -> Result<ListPage, StoreError> {
        self.blocking(move |inner| {
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
            Ok(ListPage { objects, next })
        })
        .await
    }

    async fn stored_at_us(&self, name: &str) -> Result<Option<u64>, StoreError> {
        if !is_item_name(name) {
            return Ok(None);
        }
        let name = name.to_owned();
        self.blocking(move |inner| {
            let raw = Inner::read(&inner.item_path(&name))?;
            Ok(raw.and_then(|raw| inner.codec.decode(&raw).ok().map(|e| e.stored_at_us)))
        })
        .await
    }

    async fn delete_objects(&self, names: &[String]) -> Result<usize, StoreError> {
        let names = names.to_vec();
        self.blocking(move |inner| {
            let mut removed = 0;
            for name in names.iter().filter(|n| is_item_name(n)) {
                match fs::remove_file(inner.item_path(name)) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error(e)),
                }
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
            Inner::write(&path, &body)?;
            Ok(content_version(&body))
        })
        .await
    }

    fn info(&self) -> StoreInfo {
        StoreInfo {
            kind: "dir",
            atomic: true,
        }
    }
}

/// A content hash as the version, as S3's ETag is: every write stamps a new time, so two
/// versions of an item never share it.
fn content_version(body: &[u8]) -> Version {
    Version(key_hash(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[tokio::test]
    async fn conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::open(dir.path(), "cache", Codec::default()).unwrap();
        conformance::run_all(&store).await;
    }

    #[tokio::test]
    async fn items_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let entry = Entry {
            key: Bytes::from("k"),
            value: Bytes::from("v"),
            cas: 7,
            ..Entry::default()
        };
        {
            let store = DirStore::open(dir.path(), "p", Codec::default()).unwrap();
            store.put(&entry, PutMode::Overwrite).await.unwrap();
        }
        let store = DirStore::open(dir.path(), "p", Codec::default()).unwrap();
        assert_eq!(store.get(b"k").await.unwrap().unwrap().entry, entry);
        assert!(dir.path().join("p").join(key_hash(b"k")).is_file());
    }
}
