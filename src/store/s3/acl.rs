//! The canned ACL sent with each PUT, and the fallback for buckets that refuse ACLs.
//!
//! New AWS buckets have ACLs disabled (Object Ownership "bucket owner enforced"): a PUT that
//! carries a canned ACL such as `private` fails with 400 AccessControlListNotSupported,
//! before anything is written. Such a bucket refuses ACLs for good, so the first refusal
//! turns the ACL off for the life of the store (with one warning) and the PUT is sent again
//! without it. What is sent follows from one fact: whether the bucket has refused.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use aws_sdk_s3::types::ObjectCannedAcl;

use super::failure::Failure;

/// The S3 error code of a bucket that does not take ACLs.
const ACL_NOT_SUPPORTED: &str = "AccessControlListNotSupported";

/// `default_acl`, until the bucket refuses ACLs.
#[derive(Debug)]
pub(super) struct Acl {
    /// The configured canned ACL; `None` when none is configured.
    configured: Option<ObjectCannedAcl>,
    /// The bucket answered AccessControlListNotSupported: send no ACL from now on.
    refused: AtomicBool,
}

impl Acl {
    /// `name` is a canned ACL (`private`, `public-read`, …); empty for none.
    pub fn new(name: &str) -> Self {
        Acl {
            configured: (!name.is_empty()).then(|| ObjectCannedAcl::from(name)),
            refused: AtomicBool::new(false),
        }
    }

    /// The ACL to send with a PUT now.
    pub fn current(&self) -> Option<ObjectCannedAcl> {
        if self.refused.load(Relaxed) {
            None
        } else {
            self.configured.clone()
        }
    }

    /// Whether `f` is the bucket refusing an ACL we sent: if so, ACLs are off from now on
    /// (warning once) and the PUT, which was not applied, may be sent again.
    pub fn refused_by(&self, f: &Failure, bucket: &str) -> bool {
        if f.code != ACL_NOT_SUPPORTED || self.configured.is_none() {
            return false;
        }
        if !self.refused.swap(true, Relaxed) {
            tracing::warn!(
                bucket = %bucket,
                "the bucket refuses ACLs (Object Ownership: bucket owner enforced); \
                 writing without default_acl from now on"
            );
        }
        true
    }
}
