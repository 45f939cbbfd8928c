//! Test doubles: a memory store with one behaviour changed. A test store implements
//! [`Layer`] (its `inner` memory store, plus only the methods it changes) and is a
//! [`Store`] through the blanket impl below, every other method forwarded.

use async_trait::async_trait;
use bytes::Bytes;

use super::memory::MemoryStore;
use super::{
    Entry, ListPage, PutMode, Revalidated, Store, StoreError, StoreInfo, Version, Versioned,
};

/// A memory store with some of its methods changed; each method forwards by default.
#[async_trait]
pub trait Layer: Send + Sync + 'static {
    /// The store underneath.
    fn inner(&self) -> &MemoryStore;

    async fn get(&self, key: &[u8]) -> Result<Option<Versioned>, StoreError> {
        self.inner().get(key).await
    }
    async fn get_if_changed(
        &self,
        key: &[u8],
        version: &Version,
    ) -> Result<Revalidated, StoreError> {
        self.inner().get_if_changed(key, version).await
    }
    async fn put(&self, entry: &Entry, mode: PutMode) -> Result<Version, StoreError> {
        self.inner().put(entry, mode).await
    }
    async fn delete(&self, key: &[u8], version: Option<&Version>) -> Result<bool, StoreError> {
        self.inner().delete(key, version).await
    }
    async fn list(&self, cursor: Option<String>, limit: usize) -> Result<ListPage, StoreError> {
        self.inner().list(cursor, limit).await
    }
    async fn stored_at_us(&self, name: &str) -> Result<Option<u64>, StoreError> {
        self.inner().stored_at_us(name).await
    }
    async fn delete_objects(&self, names: &[String]) -> Result<usize, StoreError> {
        self.inner().delete_objects(names).await
    }
}

#[async_trait]
impl<L: Layer> Store for L {
    async fn get(&self, key: &[u8]) -> Result<Option<Versioned>, StoreError> {
        Layer::get(self, key).await
    }
    async fn get_if_changed(
        &self,
        key: &[u8],
        version: &Version,
    ) -> Result<Revalidated, StoreError> {
        Layer::get_if_changed(self, key, version).await
    }
    async fn put(&self, entry: &Entry, mode: PutMode) -> Result<Version, StoreError> {
        Layer::put(self, entry, mode).await
    }
    async fn delete(&self, key: &[u8], version: Option<&Version>) -> Result<bool, StoreError> {
        Layer::delete(self, key, version).await
    }
    async fn list(&self, cursor: Option<String>, limit: usize) -> Result<ListPage, StoreError> {
        Layer::list(self, cursor, limit).await
    }
    async fn stored_at_us(&self, name: &str) -> Result<Option<u64>, StoreError> {
        Layer::stored_at_us(self, name).await
    }
    async fn delete_objects(&self, names: &[String]) -> Result<usize, StoreError> {
        Layer::delete_objects(self, names).await
    }
    async fn get_control(&self, name: &str) -> Result<Option<(Bytes, Version)>, StoreError> {
        self.inner().get_control(name).await
    }
    async fn put_control(
        &self,
        name: &str,
        body: Bytes,
        mode: PutMode,
    ) -> Result<Version, StoreError> {
        self.inner().put_control(name, body, mode).await
    }
    fn info(&self) -> StoreInfo {
        self.inner().info()
    }
}
