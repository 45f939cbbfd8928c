//! Startup checks of the S3 store: the bucket (created if asked), and whether the store
//! enforces conditional writes. Some S3-compatible stores (Garage, s3rver) silently ignore
//! `If-None-Match` and `If-Match` and overwrite: on those, read-modify-write commands cannot
//! be atomic across replicas, so the probe finds out and the store reports it.

use aws_sdk_s3::types::{BucketCannedAcl, CreateBucketConfiguration};
use bytes::Bytes;

use super::failure::Failure;
use super::S3Store;
use crate::store::{PutMode, StoreError};

impl S3Store {
    /// Creates the bucket unless it exists.
    pub(super) async fn ensure_bucket(&self, acl: &str, region: &str) -> Result<(), StoreError> {
        let head = self.client.head_bucket().bucket(&self.bucket).send().await;
        match head {
            Ok(_) => return Ok(()),
            Err(e) => {
                let f = Failure::from_sdk(e);
                if !f.is(404) {
                    return Err(f.unavailable("HeadBucket"));
                }
            }
        }
        let mut create = self.client.create_bucket().bucket(&self.bucket);
        if !acl.is_empty() {
            create = create.acl(BucketCannedAcl::from(acl));
        }
        if !region.is_empty() && region != "us-east-1" {
            create = create.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(region.into())
                    .build(),
            );
        }
        match create.send().await {
            Ok(_) => {
                tracing::info!(bucket = %self.bucket, "created bucket");
                Ok(())
            }
            Err(e) => {
                let f = Failure::from_sdk(e);
                match f.code.as_str() {
                    "BucketAlreadyOwnedByYou" | "BucketAlreadyExists" => Ok(()),
                    _ => Err(f.unavailable("CreateBucket")),
                }
            }
        }
    }

    /// Writes a probe object twice with `If-None-Match: *`: the second must be refused.
    pub(super) async fn probe_conditional_writes(&self) -> Result<bool, StoreError> {
        let name = self.control_name(&format!("probe-{:016x}", rand::random::<u64>()));
        // Two different bodies, so a lost answer to the second is never taken for success.
        let first = Bytes::from_static(b"probe 1");
        self.put_raw(&name, first, &PutMode::Create, None).await?;
        let second = Bytes::from_static(b"probe 2");
        let second = self.put_raw(&name, second, &PutMode::Create, None).await;
        let _ = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&name)
            .send()
            .await;
        match second {
            Err(StoreError::Exists) => Ok(true),
            Ok(_) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
