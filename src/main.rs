//! The `s3cached` binary: parse configuration, set up logging, run the app.
#![forbid(unsafe_code)]

use clap::Parser;
use s3cached::config::{Cli, Config};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("s3cached: invalid configuration: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if cli.check_config {
        for (key, value) in config.rows() {
            println!("{key} = {value:?}");
        }
        println!("# configuration is valid");
        return std::process::ExitCode::SUCCESS;
    }
    s3cached::app::init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("s3cached: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(s3cached::app::run_until_signal(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(cause = %e, "s3cached stopped");
            eprintln!("s3cached: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
