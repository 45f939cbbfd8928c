//! `s3cached lifecycle`: prints, or with `--apply` installs, the S3 lifecycle rules that
//! expire item objects under the configured prefix (see [`crate::store::s3::lifecycle`]).

use crate::config::Config;
use crate::store::normalize_prefix;
use crate::store::s3::lifecycle::{expiry_rules, install, rules_json};

/// Default age, in days, after which an item object expires.
pub const DEFAULT_EXPIRE_DAYS: i32 = 30;

/// Options of `s3cached lifecycle`.
#[derive(clap::Args, Debug, Clone)]
pub struct LifecycleArgs {
    /// Days after an object's last write when S3 deletes it. Pick more than the longest
    /// TTL your clients set (and more than items live unread): an item expired early is a
    /// cache miss, never a wrong value.
    #[arg(long, default_value_t = DEFAULT_EXPIRE_DAYS,
          value_parser = clap::value_parser!(i32).range(1..))]
    pub days: i32,
    /// Print the rules as JSON for `aws s3api put-bucket-lifecycle-configuration` (the default).
    #[arg(long)]
    pub print: bool,
    /// Install the rules in the bucket (keeping its other rules), then print what it holds.
    #[arg(long, conflicts_with = "print")]
    pub apply: bool,
}

/// Prints or installs the rules; an error says why not.
pub fn run(
    config: &Config,
    args: &LifecycleArgs,
    out: &mut dyn std::io::Write,
) -> Result<(), String> {
    let rules = expiry_rules(&normalize_prefix(&config.location), args.days);
    if !args.apply {
        return out
            .write_all(rules_json(&rules).as_bytes())
            .map_err(|e| e.to_string());
    }
    if !config.uses_s3() {
        return Err("--apply needs a bucket (storage_bucket_name)".into());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let settings = config.s3_settings();
    let installed = runtime
        .block_on(install(&settings, &rules))
        .map_err(|e| e.to_string())?;
    let ours: Vec<_> = installed
        .into_iter()
        .filter(|r| rules.iter().any(|w| w.prefix == r.prefix))
        .collect();
    if ours.len() != rules.len() || ours.iter().any(|r| r.days != args.days) {
        return Err(format!(
            "the bucket holds {} of the {} rules after installing them",
            ours.len(),
            rules.len()
        ));
    }
    let _ = writeln!(
        out,
        "installed in bucket {}: {} rules expiring objects under {:?} after {} days",
        config.storage_bucket_name,
        ours.len(),
        normalize_prefix(&config.location),
        args.days
    );
    out.write_all(rules_json(&ours).as_bytes())
        .map_err(|e| e.to_string())
}
