//! The command line: the server's options (the table in [`crate::config`]), a config file,
//! and the subcommands that check a server or print lifecycle rules instead of serving.

use std::path::PathBuf;

use clap::Parser;

use crate::config::{Config, ConfigError, Options};

/// The command line.
#[derive(Parser, Debug)]
#[command(
    name = "s3cached",
    version,
    about = "A memcached-protocol cache server on S3"
)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "S3CACHED_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print it (secrets hidden) and exit.
    #[arg(long)]
    pub check_config: bool,
    #[command(flatten)]
    pub options: Options,
    /// With no subcommand, s3cached runs the server.
    #[command(subcommand)]
    pub command: Option<Subcommand>,
}

/// What the binary does instead of serving.
#[derive(clap::Subcommand, Debug)]
pub enum Subcommand {
    /// Check a running server: version, a set/get/delete round trip of a unique key, stats.
    /// Exits 0 when all is well, 1 with the reason otherwise (usable as a health check).
    Check(crate::check::CheckArgs),
    /// Print (or, with --apply, install) S3 lifecycle rules that expire item objects under
    /// the prefix after --days days: a bound on the bucket even when no replica runs.
    Lifecycle(crate::lifecycle::LifecycleArgs),
}

impl Cli {
    /// The configuration: flags and environment over the file, validated.
    pub fn config(&self) -> Result<Config, ConfigError> {
        Config::load(self.config.as_deref(), self.options.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_and_env_beat_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "max_entries = 10\ncull_frequency = 5\n").unwrap();
        let cli = Cli::try_parse_from([
            "s3cached",
            "--config",
            path.to_str().unwrap(),
            "--max-entries",
            "20",
        ])
        .unwrap();
        let c = cli.config().unwrap();
        assert_eq!(c.max_entries, 20);
        assert_eq!(c.cull_frequency, 5);
    }
}
