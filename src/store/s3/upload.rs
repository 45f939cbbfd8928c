//! Streamed writes: a value longer than `stream_above_bytes` is written as it arrives. An
//! object no longer than one part ([`PART_BYTES`]) goes in one PUT, exactly once
//! ([`super::write`]); a longer one in a multipart upload of parts of [`PART_BYTES`], up to
//! three uploading while the next fills (so a write holds at most four parts:
//! `STREAM_HOLD_BYTES`): fewer parts at once fell behind a direct PUT of the same value
//! (docs/benchmarks.md, "Large values").
//!
//! Nothing is stored unless every part is: S3 makes the object only at
//! `CompleteMultipartUpload`. A failed part (after the SDK's retries: a part is sent again
//! whole, so a retry is harmless), a value cut short, or a request dropped (the client went
//! away) aborts the upload; an abort that never ran (the process died) is cleaned up by the
//! lifecycle rule for incomplete uploads (`s3cached lifecycle`). A completion whose answer
//! was lost is settled by reading the object's head back: its newest write id is this
//! write's, or the write is reported as failed.

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::{Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::StreamExt;

use super::failure::Failure;
use super::read::Object;
use super::S3Store;
use crate::store::body::{Chunks, PART_BYTES};
use crate::store::format::{encode_head, CHECKSUM_BYTES};
use crate::store::{Entry, PutMode, StoreError, Version};

/// Most parts an upload may have (S3's limit): 10,000 parts of 8 MiB hold any value up to
/// `max_item_size`'s 1 GiB bound many times over.
const MAX_PARTS: usize = 10_000;
/// Parts uploading at once, at most, while the next fills.
const UPLOADING: usize = 3;

impl S3Store {
    /// Writes `entry` (its value empty) with a value of `len` bytes taken from `value` as it
    /// arrives.
    pub(super) async fn put_streamed_object(
        &self,
        entry: &Entry,
        len: u64,
        mut value: Chunks,
    ) -> Result<Version, StoreError> {
        let name = self.object_name(&entry.key);
        let head = encode_head(entry, len as usize);
        let total = head.len() as u64 + len + CHECKSUM_BYTES as u64;
        let mut object = Filling::new(head, len);
        if total <= PART_BYTES as u64 {
            while let Some(piece) = value.next().await {
                object.take(&piece?)?;
            }
            let body = object.finish()?;
            let history = Some(&entry.history).filter(|h| h.own().is_some());
            return self
                .put_raw(&name, body, &PutMode::Overwrite, history)
                .await;
        }
        let id = self.create_upload(&name).await?;
        let mut upload = Upload {
            store: self,
            name: &name,
            id,
            parts: Vec::new(),
            done: false,
        };
        let result = upload.send(object, value).await;
        let parts = match result {
            Ok(parts) => parts,
            Err(e) => {
                upload.abort();
                return Err(e);
            }
        };
        let completed = self.complete(&name, &upload.id, parts, entry).await;
        match completed {
            Ok(version) => {
                upload.done = true;
                Ok(version)
            }
            Err(e) => {
                upload.abort();
                Err(e)
            }
        }
    }

    async fn create_upload(&self, name: &str) -> Result<String, StoreError> {
        let create = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(name)
            .set_acl(self.acl.current())
            .set_storage_class(self.storage_class.clone())
            .set_server_side_encryption(self.sse.mode.clone())
            .set_ssekms_key_id(self.sse.kms_key_id.clone());
        let out = self
            .call("CreateMultipartUpload", async {
                create
                    .send()
                    .await
                    .map_err(|e| Failure::from_sdk(e).unavailable("CreateMultipartUpload"))
            })
            .await?;
        out.upload_id()
            .map(str::to_owned)
            .ok_or_else(|| StoreError::Unavailable("CreateMultipartUpload: no upload id".into()))
    }

    async fn upload_part(
        &self,
        name: &str,
        id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<CompletedPart, StoreError> {
        let send = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(name)
            .upload_id(id)
            .part_number(number)
            .body(ByteStream::from(body))
            .send();
        let out = self
            .call("UploadPart", async {
                send.await
                    .map_err(|e| Failure::from_sdk(e).unavailable("UploadPart"))
            })
            .await?;
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(out.e_tag().map(str::to_owned))
            .build())
    }

    /// Completes the upload; a completion whose answer was lost is settled by the object's
    /// head.
    async fn complete(
        &self,
        name: &str,
        id: &str,
        parts: Vec<CompletedPart>,
        entry: &Entry,
    ) -> Result<Version, StoreError> {
        let send = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(name)
            .upload_id(id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .customize()
            .config_override(super::write::no_sdk_retries())
            .send();
        let failed = match self
            .call("CompleteMultipartUpload", async {
                send.await
                    .map_err(|e| Failure::from_sdk(e).unavailable("CompleteMultipartUpload"))
            })
            .await
        {
            Ok(out) => return Ok(Version(out.e_tag().unwrap_or_default().to_owned())),
            Err(e) => e,
        };
        let ours = entry.history.own();
        match self.get_item_object(name, Some(0)).await {
            Ok(Some(Object::Head(head, version, _))) if head.entry.history.own() == ours => {
                Ok(version)
            }
            _ => Err(failed),
        }
    }
}

/// An object being assembled: its head, then its value as it arrives, then its checksum.
struct Filling {
    buf: BytesMut,
    crc: crc32fast::Hasher,
    /// Value bytes still expected.
    left: u64,
}

impl Filling {
    fn new(head: BytesMut, len: u64) -> Filling {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        Filling {
            buf: head,
            crc,
            left: len,
        }
    }

    fn take(&mut self, piece: &[u8]) -> Result<(), StoreError> {
        if piece.len() as u64 > self.left {
            return Err(StoreError::Unavailable("streamed value too long".into()));
        }
        self.left -= piece.len() as u64;
        self.crc.update(piece);
        self.buf.extend_from_slice(piece);
        Ok(())
    }

    /// The bytes gathered so far, once a part's worth is in.
    fn part(&mut self) -> Option<Bytes> {
        (self.buf.len() >= PART_BYTES).then(|| self.buf.split().freeze())
    }

    /// The rest, with the checksum: the value must be whole.
    fn finish(mut self) -> Result<Bytes, StoreError> {
        if self.left > 0 {
            return Err(StoreError::Unavailable("streamed value cut short".into()));
        }
        let checksum = self.crc.finalize();
        self.buf.extend_from_slice(&checksum.to_be_bytes());
        Ok(self.buf.freeze())
    }
}

/// A multipart upload in progress: aborted when dropped before it is done.
struct Upload<'s> {
    store: &'s S3Store,
    name: &'s str,
    id: String,
    parts: Vec<CompletedPart>,
    done: bool,
}

impl Upload<'_> {
    /// Sends `object`'s parts as they fill, up to [`UPLOADING`] at once while the next
    /// fills.
    async fn send(
        &mut self,
        mut object: Filling,
        mut value: Chunks,
    ) -> Result<Vec<CompletedPart>, StoreError> {
        let mut uploading = FuturesUnordered::new();
        let mut number = 0;
        loop {
            while uploading.len() < UPLOADING {
                let Some(part) = object.part() else {
                    break;
                };
                number += 1;
                if number > MAX_PARTS {
                    return Err(StoreError::TooLarge);
                }
                let (store, name, id) = (self.store, self.name, self.id.clone());
                uploading
                    .push(async move { store.upload_part(name, &id, number as i32, part).await });
            }
            let piece = if uploading.is_empty() {
                value.next().await
            } else if object.buf.len() >= PART_BYTES {
                // A full part waits for an upload to end: the value is read no further.
                let sent = uploading.next().await.expect("an upload");
                self.parts.push(sent?);
                continue;
            } else {
                tokio::select! {
                    sent = uploading.next() => {
                        self.parts.push(sent.expect("an upload")?);
                        continue;
                    }
                    piece = value.next() => piece,
                }
            };
            let Some(piece) = piece else {
                break;
            };
            object.take(&piece?)?;
        }
        while let Some(sent) = uploading.next().await {
            self.parts.push(sent?);
        }
        let last = object.finish()?;
        number += 1;
        let last = self
            .store
            .upload_part(self.name, &self.id, number as i32, last);
        self.parts.push(last.await?);
        let mut parts = std::mem::take(&mut self.parts);
        parts.sort_by_key(|p| p.part_number());
        Ok(parts)
    }

    /// Aborts the upload in the background (S3 frees its parts).
    fn abort(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let abort = self
            .store
            .client
            .abort_multipart_upload()
            .bucket(&self.store.bucket)
            .key(self.name)
            .upload_id(&self.id);
        let name = self.name.to_owned();
        runtime.spawn(async move {
            if let Err(e) = abort.send().await {
                let f = Failure::from_sdk(e);
                tracing::warn!(object = %name, cause = %f.describe("AbortMultipartUpload"), "an aborted upload may linger until the lifecycle rule removes it");
            }
        });
    }
}

impl Drop for Upload<'_> {
    fn drop(&mut self) {
        // Dropped mid-way: the client went away, or the server is stopping.
        self.abort();
    }
}
