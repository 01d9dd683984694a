//! `endofm`: the user-facing command line (and, with the service, the coordinator). It never
//! links libtorch or FFmpeg: everything that computes runs in `endofm-worker`.

use clap::{Parser, Subcommand};
use endofm_shared::Preset;
use endofm_shared::telemetry::{self, LogFormat};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "endofm",
    version,
    about = "endofm: pre-train and fine-tune Endo-FM as a service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the model presets with their parameter counts (JSON lines).
    Presets,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    telemetry::init(LogFormat::Auto, "info");
    match cli.command {
        Command::Presets => {
            for preset in Preset::ALL {
                let cfg = preset.config();
                let counts = cfg.param_counts();
                println!(
                    "{}",
                    json!({
                        "preset": preset.name(),
                        "params": counts.total,
                        "backbone_params": counts.backbone,
                        "config": cfg,
                    })
                );
            }
        }
    }
    std::process::ExitCode::SUCCESS
}
