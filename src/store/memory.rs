//! An in-process store for unit tests and the conformance suite's reference run.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::format::{CHECKSUM_BYTES, HEADER_BYTES};
use super::{
    admit, key_hash, DumpPage, Dumped, Entry, ListPage, ObjectInfo, PutMode, Store, StoreError,
    StoreInfo, Version, Versioned,
};

#[derive(Default)]
struct State {
    /// Items by object name (the key's SHA-1 hex).
    items: BTreeMap<String, (Entry, u64)>,
    control: HashMap<String, (Bytes, u64)>,
    next_version: u64,
}

impl State {
    fn bump(&mut self) -> u64 {
        self.next_version += 1;
        self.next_version
    }
}

/// Items in a map behind a mutex; every operation is atomic.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

fn version(v: u64) -> Version {
    Version(v.to_string())
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Versioned>, StoreError> {
        let state = self.state.lock().expect("memory store lock");
        Ok(state
            .items
            .get(&key_hash(key))
            .filter(|(entry, _)| entry.key == key)
            .map(|(entry, v)| Versioned {
                entry: entry.clone(),
                version: version(*v),
                large: None,
            }))
    }

    async fn put(&self, entry: &Entry, mode: PutMode) -> Result<Version, StoreError> {
        let mut state = self.state.lock().expect("memory store lock");
        let name = key_hash(&entry.key);
        admit(
            state.items.get(&name).map(|(_, v)| version(*v)).as_ref(),
            &mode,
        )?;
        let v = state.bump();
        state.items.insert(name, (entry.clone(), v));
        Ok(version(v))
    }

    async fn delete(&self, key: &[u8], want: Option<&Version>) -> Result<bool, StoreError> {
        let mut state = self.state.lock().expect("memory store lock");
        let name = key_hash(key);
        let current = state.items.get(&name).map(|(_, v)| version(*v));
        if let Some(want) = want {
            admit(current.as_ref(), &PutMode::Update(want.clone()))?;
        }
        Ok(state.items.remove(&name).is_some())
    }

    async fn list(&self, cursor: Option<String>, limit: usize) -> Result<ListPage, StoreError> {
        let state = self.state.lock().expect("memory store lock");
        let start = cursor.unwrap_or_default();
        let mut objects: Vec<ObjectInfo> = state
            .items
            .range(start.clone()..)
            .filter(|(name, _)| **name != start)
            .take(limit + 1)
            .map(|(name, (entry, _))| ObjectInfo {
                name: name.clone(),
                size: entry.value.len() as u64,
                modified_ms: entry.stored_at_us / 1000,
            })
            .collect();
        let next = if objects.len() > limit {
            objects.truncate(limit);
            objects.last().map(|o| o.name.clone())
        } else {
            None
        };
        Ok(ListPage {
            objects,
            next,
            other_bytes: 0,
        })
    }

    async fn stored_at_us(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let state = self.state.lock().expect("memory store lock");
        Ok(state.items.get(name).map(|(entry, _)| entry.stored_at_us))
    }

    async fn delete_objects(&self, names: &[String]) -> Result<usize, StoreError> {
        let mut state = self.state.lock().expect("memory store lock");
        Ok(names
            .iter()
            .filter(|n| state.items.remove(*n).is_some())
            .count())
    }

    async fn get_control(&self, name: &str) -> Result<Option<(Bytes, Version)>, StoreError> {
        let state = self.state.lock().expect("memory store lock");
        Ok(state
            .control
            .get(name)
            .map(|(body, v)| (body.clone(), version(*v))))
    }

    async fn put_control(
        &self,
        name: &str,
        body: Bytes,
        mode: PutMode,
    ) -> Result<Version, StoreError> {
        let mut state = self.state.lock().expect("memory store lock");
        admit(
            state.control.get(name).map(|(_, v)| version(*v)).as_ref(),
            &mode,
        )?;
        let v = state.bump();
        state.control.insert(name.to_owned(), (body, v));
        Ok(version(v))
    }

    async fn dump(
        &self,
        cursor: Option<String>,
        limit: usize,
    ) -> Result<Option<DumpPage>, StoreError> {
        let state = self.state.lock().expect("memory store lock");
        let start = cursor.unwrap_or_default();
        let mut items = state
            .items
            .range(start.clone()..)
            .filter(|(name, _)| **name != start)
            .take(limit + 1);
        let mut page = DumpPage::default();
        for (name, (entry, _)) in items.by_ref().take(limit) {
            page.items.push(Dumped {
                entry: Entry {
                    value: Bytes::new(),
                    ..entry.clone()
                },
                // As the persistent stores would keep it.
                size: (HEADER_BYTES + entry.key.len() + entry.value.len() + CHECKSUM_BYTES) as u64,
            });
            page.next = Some(name.clone());
        }
        if items.next().is_none() {
            page.next = None;
        }
        Ok(Some(page))
    }

    fn info(&self) -> StoreInfo {
        StoreInfo {
            kind: "memory",
            atomic: true,
            dumps: true,
            // A stand-in for S3 in tests, where several "replicas" share one.
            exclusive: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[tokio::test]
    async fn conformance_suite() {
        conformance::run_all(&MemoryStore::new()).await;
    }
}
