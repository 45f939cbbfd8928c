//! Listing item objects for the culler, and deleting them in batches.

use aws_sdk_s3::types::{Delete, ObjectIdentifier};

use super::failure::Failure;
use super::S3Store;
use crate::store::{is_item_name, ListPage, ObjectInfo, StoreError, DELETE_BATCH};

impl S3Store {
    /// One page of item objects after `cursor`, skipping pages that hold only control
    /// objects or foreign names (ListObjectsV2 returns at most 1,000 names a page).
    pub(super) async fn list_items(
        &self,
        cursor: Option<String>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        let mut objects = Vec::new();
        let mut after = cursor;
        loop {
            let req = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&self.prefix)
                .max_keys(limit.clamp(1, 1000) as i32)
                .set_start_after(after.clone());
            let out = self
                .call("ListObjectsV2", async { Ok(req.send().await) })
                .await?
                .map_err(|e| Failure::from_sdk(e).unavailable("ListObjectsV2"))?;
            let mut last = None;
            for o in out.contents() {
                let Some(name) = o.key() else { continue };
                last = Some(name.to_owned());
                let short = &name[self.prefix.len().min(name.len())..];
                if is_item_name(short) {
                    objects.push(ObjectInfo {
                        name: name.to_owned(),
                        size: o.size().unwrap_or(0).max(0) as u64,
                        modified_ms: o
                            .last_modified()
                            .map_or(0, |t| t.to_millis().unwrap_or(0).max(0) as u64),
                    });
                }
            }
            let truncated = out.is_truncated().unwrap_or(false) && last.is_some();
            if !truncated || !objects.is_empty() {
                return Ok(ListPage {
                    objects,
                    next: if truncated { last } else { None },
                    other_bytes: 0,
                });
            }
            after = last;
        }
    }

    /// Deletes `names` in batches of [`DELETE_BATCH`] (DeleteObjects takes at most 1,000
    /// keys); returns how many the store reported removed.
    pub(super) async fn delete_batches(&self, names: &[String]) -> Result<usize, StoreError> {
        let mut removed = 0;
        for batch in names.chunks(DELETE_BATCH) {
            let ids = batch
                .iter()
                .map(|n| ObjectIdentifier::builder().key(n).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| StoreError::Unavailable(format!("S3 DeleteObjects: {e}")))?;
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| StoreError::Unavailable(format!("S3 DeleteObjects: {e}")))?;
            let req = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete);
            let out = self
                .call("DeleteObjects", async { Ok(req.send().await) })
                .await?
                .map_err(|e| Failure::from_sdk(e).unavailable("DeleteObjects"))?;
            let failed = out.errors().len();
            if failed > 0 {
                tracing::warn!(failed, "some objects were not deleted");
            }
            removed += batch.len() - failed;
        }
        Ok(removed)
    }
}
