//! `endofm-worker`: the process that runs the Endo-FM network (see `endofm_worker::cli`).

use clap::Parser;
use endofm_shared::telemetry::{self, LogFormat};
use endofm_worker::cli::{self, Cli, LogFormatArg};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let format = match cli.log_format {
        LogFormatArg::Auto => LogFormat::Auto,
        LogFormatArg::Text => LogFormat::Text,
        LogFormatArg::Json => LogFormat::Json,
    };
    telemetry::init(format, "info");
    match cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
