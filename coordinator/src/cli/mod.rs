//! Command-line parsing and dispatch for `endofm`.

mod bench;
mod jobs;
mod up;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use endofm_coordinator::core::Timing;
use endofm_coordinator::server::{self, ServeConfig};
use endofm_shared::Preset;
use endofm_shared::telemetry::{self, LogFormat};
use serde_json::json;

/// Exit code of `endofm wait` (and `up`) when the job failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code for errors of the command itself (bad arguments, unreachable coordinator).
pub const EXIT_ERROR: u8 = 2;
/// Exit code of `endofm wait` when the job was cancelled.
pub const EXIT_CANCELLED: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "endofm",
    version,
    about = "endofm: pre-train and fine-tune Endo-FM as a service"
)]
struct Cli {
    /// Coordinator address for the client commands.
    #[arg(
        long,
        global = true,
        env = "ENDOFM_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    coordinator: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the model presets with their parameter counts (JSON lines).
    Presets,
    /// Run the coordinator: gRPC API, durable job store, gang scheduler, metrics.
    Coordinator(CoordinatorArgs),
    /// Submit a job spec (TOML or JSON; kinds pretrain, finetune, evaluate; see deploy/jobs/);
    /// prints the job id.
    Submit {
        /// The spec file (`-` for standard input).
        file: PathBuf,
        /// Print the whole job as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List jobs.
    Jobs {
        /// Only jobs in this state (queued, running, succeeded, failed, cancelled).
        #[arg(long)]
        state: Vec<String>,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one job.
    Status {
        /// Job id.
        id: String,
        /// The job as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a job's events and logs; `--follow` keeps going (with a progress bar on a
    /// terminal) until the job ends.
    Logs {
        /// Job id.
        id: String,
        /// Keep following.
        #[arg(long, short)]
        follow: bool,
    },
    /// Cancel a job: its ranks stop, it ends CANCELLED.
    Cancel {
        /// Job id.
        id: String,
        /// Why (recorded in the job's events).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Wait for a job to end. Exit code: 0 succeeded, 1 failed, 3 cancelled, 2 error.
    Wait {
        /// Job id.
        id: String,
        /// Give up after this many seconds (exit 2).
        #[arg(long)]
        timeout_s: Option<f64>,
    },
    /// A whole local cluster: coordinator + N CPU workers on this machine, a generated corpus
    /// when no data is given, one pre-training job submitted and followed to its end; with
    /// `--pipeline`, then fine-tuning (classify) and evaluation on a generated PolypDiag-layout
    /// dataset, each job starting from the previous one's checkpoint.
    Up(up::UpArgs),
    /// Benchmarks printing JSON.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// (internal) The simulated workers of `bench coordinator`.
    #[command(hide = true)]
    BenchLoad(bench::LoadArgs),
}

#[derive(Debug, clap::Args)]
struct CoordinatorArgs {
    /// gRPC listen address (port 0: any free port; the bound addresses are printed as JSON).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Prometheus `/metrics` listen address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// State directory (the durable job store).
    #[arg(long)]
    state: PathBuf,
    /// Worker heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// A worker silent for this long is lost (milliseconds).
    #[arg(long, default_value_t = 10_000)]
    lease_ms: u64,
    /// Wait before the first restart of a failed attempt (milliseconds); doubled for every
    /// further restart, up to --restart-backoff-max-ms. Deterministic failures (non-finite
    /// loss, invalid input) are never restarted.
    #[arg(long, default_value_t = 5_000)]
    restart_backoff_ms: u64,
    /// The longest wait between restarts (milliseconds).
    #[arg(long, default_value_t = 300_000)]
    restart_backoff_max_ms: u64,
    /// Local folders that job specs may name (data, output, init); repeatable. Without it
    /// any local path is accepted.
    #[arg(long = "local-root")]
    local_roots: Vec<PathBuf>,
    /// Let a queued job stop running jobs of lower priority to get its devices (they
    /// checkpoint, are re-queued without using a restart, and resume later).
    #[arg(long)]
    preempt: bool,
    /// Serve gRPC over TLS: certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value = "auto")]
    log_format: LogFormatArg,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Auto,
    Text,
    Json,
}

fn token(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|t| !t.is_empty())
}

/// The user token (`ENDOFM_USER_TOKEN`).
pub fn user_token() -> Option<String> {
    token("ENDOFM_USER_TOKEN")
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    match term {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down");
}

fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    telemetry::init(
        match args.log_format {
            LogFormatArg::Auto => LogFormat::Auto,
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        },
        "info",
    );
    anyhow::ensure!(
        args.heartbeat_ms >= 10,
        "--heartbeat-ms must be at least 10"
    );
    anyhow::ensure!(
        args.lease_ms >= 2 * args.heartbeat_ms,
        "--lease-ms must be at least twice --heartbeat-ms"
    );
    let cfg = ServeConfig {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        state: args.state,
        timing: Timing {
            heartbeat_interval: Duration::from_millis(args.heartbeat_ms),
            lease: Duration::from_millis(args.lease_ms),
            restart_backoff: Duration::from_millis(args.restart_backoff_ms),
            restart_backoff_max: Duration::from_millis(args.restart_backoff_max_ms),
            ..Timing::default()
        },
        user_token: user_token(),
        worker_token: token("ENDOFM_WORKER_TOKEN"),
        local_roots: args.local_roots,
        tls: args.tls_cert.zip(args.tls_key),
        preemption: args.preempt,
    };
    runtime()?.block_on(server::serve(
        cfg,
        |bound| {
            println!(
                "{}",
                json!({
                    "grpc": bound.grpc.to_string(),
                    "metrics": bound.metrics.map(|m| m.to_string()),
                })
            );
        },
        shutdown_signal(),
    ))?;
    Ok(())
}

/// Parses the arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let url = cli.coordinator.clone();
    let result: anyhow::Result<ExitCode> = match cli.command {
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
            Ok(ExitCode::SUCCESS)
        }
        Command::Coordinator(args) => coordinator(args).map(|()| ExitCode::SUCCESS),
        Command::Submit { file, json } => {
            runtime().and_then(|rt| rt.block_on(jobs::submit(&url, &file, json)))
        }
        Command::Jobs { state, json } => {
            runtime().and_then(|rt| rt.block_on(jobs::list(&url, &state, json)))
        }
        Command::Status { id, json } => {
            runtime().and_then(|rt| rt.block_on(jobs::status(&url, &id, json)))
        }
        Command::Logs { id, follow } => {
            runtime().and_then(|rt| rt.block_on(jobs::logs(&url, &id, follow)))
        }
        Command::Cancel { id, reason } => {
            runtime().and_then(|rt| rt.block_on(jobs::cancel(&url, &id, &reason)))
        }
        Command::Wait { id, timeout_s } => {
            runtime().and_then(|rt| rt.block_on(jobs::wait(&url, &id, timeout_s)))
        }
        Command::Up(args) => up::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::BenchLoad(args) => bench::load(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
