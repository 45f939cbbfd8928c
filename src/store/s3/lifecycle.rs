//! A bucket lifecycle safety net: rules that expire item objects under the prefix after a
//! number of days, so the bucket stays bounded even when no replica runs to cull it.
//!
//! Items are named `<prefix><40 hex digits>`, control objects `<prefix>_s3cached/...`. S3
//! filters can include prefixes but not exclude them, so there is one rule per first hex
//! digit (16 rules): the flush epoch and the cull lease never expire. Were the flush epoch
//! to expire while flushed items remain, they would be visible again.
//!
//! Each rule also aborts multipart uploads left incomplete for [`ABORT_INCOMPLETE_DAYS`]
//! under its prefix: a streamed `set` aborts its own upload when it fails, but not when its
//! process dies mid-way, and S3 keeps (and bills) the parts of such an upload until then.

use aws_sdk_s3::types::{
    AbortIncompleteMultipartUpload, BucketLifecycleConfiguration, ExpirationStatus,
    LifecycleExpiration, LifecycleRule, LifecycleRuleFilter,
};

use super::counts::S3Requests;
use super::failure::Failure;
use super::S3Settings;
use crate::clock::StoreTime;
use crate::store::StoreError;

const HEX_DIGITS: &str = "0123456789abcdef";
/// Longest rule ID S3 accepts.
const MAX_RULE_ID_CHARS: usize = 255;
/// Days after which an incomplete multipart upload under an item prefix is aborted.
pub const ABORT_INCOMPLETE_DAYS: i32 = 1;

/// One expiry rule: objects under `prefix` expire `days` after their last write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiryRule {
    pub id: String,
    pub prefix: String,
    pub days: i32,
}

/// The rules for items under `prefix` (already normalized: empty or ending in `/`).
pub fn expiry_rules(prefix: &str, days: i32) -> Vec<ExpiryRule> {
    HEX_DIGITS
        .chars()
        .map(|digit| {
            let prefix = format!("{prefix}{digit}");
            let id: String = format!("s3cached-expire {prefix}")
                .chars()
                .take(MAX_RULE_ID_CHARS)
                .collect();
            ExpiryRule { id, prefix, days }
        })
        .collect()
}

/// The rules as the JSON that `aws s3api put-bucket-lifecycle-configuration
/// --lifecycle-configuration` takes.
pub fn rules_json(rules: &[ExpiryRule]) -> String {
    let rules: Vec<serde_json::Value> = rules
        .iter()
        .map(|r| {
            serde_json::json!({
                "ID": r.id,
                "Filter": {"Prefix": r.prefix},
                "Status": "Enabled",
                "Expiration": {"Days": r.days},
                "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_INCOMPLETE_DAYS},
            })
        })
        .collect();
    let mut text =
        serde_json::to_string_pretty(&serde_json::json!({ "Rules": rules })).unwrap_or_default();
    text.push('\n');
    text
}

/// Installs `rules` in the bucket, keeping every other rule it has (a rule on the same
/// prefix is replaced), and returns the expiry rules the bucket holds afterwards, read back.
pub async fn install(
    settings: &S3Settings,
    rules: &[ExpiryRule],
) -> Result<Vec<ExpiryRule>, StoreError> {
    let time = StoreTime::leak(0);
    let client = settings
        .client(
            time,
            std::sync::Arc::new(S3Requests::new(
                settings.prices,
                settings.max_in_flight,
                super::HedgeSettings::OFF,
            )),
        )
        .await;
    let bucket = &settings.bucket;
    let mut kept = current_rules(&client, bucket).await?;
    kept.retain(|r| {
        let prefix = rule_prefix(r);
        !rules
            .iter()
            .any(|ours| Some(ours.prefix.as_str()) == prefix)
    });
    for rule in rules {
        kept.push(
            LifecycleRule::builder()
                .id(&rule.id)
                .filter(LifecycleRuleFilter::builder().prefix(&rule.prefix).build())
                .status(ExpirationStatus::Enabled)
                .expiration(LifecycleExpiration::builder().days(rule.days).build())
                .abort_incomplete_multipart_upload(
                    AbortIncompleteMultipartUpload::builder()
                        .days_after_initiation(ABORT_INCOMPLETE_DAYS)
                        .build(),
                )
                .build()
                .map_err(|e| StoreError::Unavailable(format!("lifecycle rule: {e}")))?,
        );
    }
    let config = BucketLifecycleConfiguration::builder()
        .set_rules(Some(kept))
        .build()
        .map_err(|e| StoreError::Unavailable(format!("lifecycle configuration: {e}")))?;
    client
        .put_bucket_lifecycle_configuration()
        .bucket(bucket)
        .lifecycle_configuration(config)
        .send()
        .await
        .map_err(|e| Failure::from_sdk(e).unavailable("PutBucketLifecycleConfiguration"))?;
    let installed = current_rules(&client, bucket).await?;
    Ok(installed
        .iter()
        .filter_map(|r| {
            let prefix = rule_prefix(r)?;
            let days = r.expiration()?.days()?;
            Some(ExpiryRule {
                id: r.id().unwrap_or_default().to_owned(),
                prefix: prefix.to_owned(),
                days,
            })
        })
        .collect())
}

/// The prefix a rule applies to: its filter's, or the legacy top-level one that rules
/// written by older tools still carry.
#[allow(deprecated)]
fn rule_prefix(rule: &LifecycleRule) -> Option<&str> {
    rule.filter().and_then(|f| f.prefix()).or(rule.prefix())
}

/// The bucket's lifecycle rules; none when it has no configuration (S3 answers 404).
async fn current_rules(
    client: &aws_sdk_s3::Client,
    bucket: &str,
) -> Result<Vec<LifecycleRule>, StoreError> {
    match client
        .get_bucket_lifecycle_configuration()
        .bucket(bucket)
        .send()
        .await
    {
        Ok(out) => Ok(out.rules().to_vec()),
        Err(e) => {
            let f = Failure::from_sdk(e);
            if f.is(404) {
                Ok(Vec::new())
            } else {
                Err(f.unavailable("GetBucketLifecycleConfiguration"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_per_hex_digit_leaves_control_objects_alone() {
        let rules = expiry_rules("cache/", 7);
        assert_eq!(rules.len(), 16);
        let item = format!("cache/{}", crate::store::key_hash(b"k"));
        assert_eq!(
            rules.iter().filter(|r| item.starts_with(&r.prefix)).count(),
            1
        );
        let control = format!("cache/{}/flush", crate::store::CONTROL_DIR);
        assert!(rules.iter().all(|r| !control.starts_with(&r.prefix)));
        let json = rules_json(&expiry_rules("a\"b/", 3));
        let parsed: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        let last = &parsed["Rules"][15];
        assert_eq!(last["Filter"]["Prefix"], "a\"b/f", "{json}");
        assert_eq!(last["Expiration"]["Days"], 3, "{json}");
        assert_eq!(last["Status"], "Enabled", "{json}");
        let abort = &last["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"];
        assert_eq!(*abort, ABORT_INCOMPLETE_DAYS, "{json}");
    }
}
