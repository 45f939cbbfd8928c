//! The `s3cached` binary: parse configuration, set up logging, run the app; or, with the
//! `check` subcommand, check a running server; or, with `lifecycle`, print or install the
//! bucket's expiry rules.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use s3cached::check::{self, CheckArgs};
use s3cached::cli::{Cli, Subcommand};
use s3cached::config::Config;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("s3cached: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Subcommand::Check(args)) = &cli.command {
        return run_check(&config, args);
    }
    if let Some(Subcommand::Lifecycle(args)) = &cli.command {
        return match s3cached::lifecycle::run(&config, args, &mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("s3cached lifecycle: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if cli.check_config {
        print!("{}", config.to_toml());
        println!("# configuration is valid");
        return ExitCode::SUCCESS;
    }
    s3cached::app::init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("s3cached: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(s3cached::app::run_until_signal(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(cause = %e, "s3cached stopped");
            eprintln!("s3cached: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `s3cached check`: 0 when the server works, 1 with the failed step otherwise.
fn run_check(config: &Config, args: &CheckArgs) -> ExitCode {
    let addr = match &args.addr {
        Some(a) => a.clone(),
        None => check::reachable(config.listen_addr()).to_string(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("s3cached check: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout();
    match runtime.block_on(check::run(&addr, args, &mut out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("s3cached check: FAILED at {e}");
            ExitCode::FAILURE
        }
    }
}
