//! `endofm up`: a complete local cluster for a first run — the coordinator and N CPU worker
//! agents as child processes of this command, a generated endoscopy-like corpus when no data
//! is given, one pre-training job submitted and followed to its end. Logs of the children go
//! to files in the run folder; the cluster is stopped when the job ends (or on Ctrl-C).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use endofm_coordinator::client;
use endofm_proto::v1 as pb;
use serde_json::json;

use super::jobs::{Printer, job_json, outcome};

/// Arguments of `endofm up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Worker processes (one CPU rank each).
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Corpus (path or URI); default: a corpus generated into the run folder's parent.
    #[arg(long)]
    data: Option<String>,
    /// Model preset.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Epochs.
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// Stop after this many steps.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Clips per rank per step.
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Checkpoint interval (steps).
    #[arg(long, default_value_t = 4)]
    checkpoint_every: usize,
    /// Folder for the runs (each run gets a new sub-folder).
    #[arg(long, default_value = ".endofm/up")]
    dir: PathBuf,
    /// Clips of the generated corpus.
    #[arg(long, default_value_t = 24)]
    clips: usize,
    /// Frames per generated clip.
    #[arg(long, default_value_t = 150)]
    frames: usize,
    /// Short side of the generated clips.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// The worker binary (default: next to this one).
    #[arg(long, env = "ENDOFM_WORKER_BIN")]
    worker_bin: Option<PathBuf>,
}

/// Child processes killed when dropped.
struct Cluster {
    children: Vec<(String, Child)>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Workers first (their ranks exit when the agent's pipe closes), then the coordinator.
        for (name, child) in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
            tracing::debug!(%name, "stopped");
        }
    }
}

fn worker_bin(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating this program")?;
    let sibling = exe.with_file_name("endofm-worker");
    if sibling.is_file() {
        return Ok(sibling);
    }
    bail!(
        "endofm-worker not found next to {} (build it with `cargo build -p endofm-worker`, or pass --worker-bin)",
        exe.display()
    )
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<File> {
    File::create(dir.join(format!("{name}.log"))).with_context(|| format!("creating {name}.log"))
}

/// Starts `endofm coordinator` on free ports; returns the child and its gRPC URL.
pub fn start_coordinator(
    state: &Path,
    logs: &Path,
    extra: &[&str],
) -> anyhow::Result<(Child, String, Option<String>)> {
    let exe = std::env::current_exe().context("locating this program")?;
    let mut child = Command::new(exe)
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--state",
        ])
        .arg(state)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file(logs, "coordinator")?)
        .spawn()
        .context("starting the coordinator")?;
    let stdout = child.stdout.take().context("coordinator stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the coordinator's address")?;
    let addr: serde_json::Value = serde_json::from_str(line.trim()).with_context(|| {
        format!(
            "the coordinator did not start (see {}/coordinator.log)",
            logs.display()
        )
    })?;
    let grpc = addr["grpc"]
        .as_str()
        .context("no grpc address")?
        .to_string();
    let metrics = addr["metrics"].as_str().map(str::to_string);
    Ok((child, format!("http://{grpc}"), metrics))
}

pub fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    let worker = worker_bin(args.worker_bin.clone())?;
    let run_dir = args
        .dir
        .join(format!("{}", endofm_coordinator::records::now_ms()));
    let logs = run_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let run_dir = run_dir.canonicalize()?;
    let logs = run_dir.join("logs");

    let data = match &args.data {
        Some(d) => d.clone(),
        None => {
            let corpus = args.dir.join(format!(
                "corpus-{}c-{}f-{}px",
                args.clips, args.frames, args.size
            ));
            if !corpus.join("train.csv").is_file() {
                eprintln!(
                    "generating a corpus of {} clips in {}",
                    args.clips,
                    corpus.display()
                );
                let status = Command::new(&worker)
                    .args(["synth", "--kind", "pretrain", "--out"])
                    .arg(&corpus)
                    .args([
                        "--clips",
                        &args.clips.to_string(),
                        "--frames",
                        &args.frames.to_string(),
                    ])
                    .args(["--size", &args.size.to_string(), "--seed", "0"])
                    .status()
                    .context("running endofm-worker synth")?;
                anyhow::ensure!(status.success(), "generating the corpus failed");
            }
            corpus.canonicalize()?.display().to_string()
        }
    };

    let mut cluster = Cluster {
        children: Vec::new(),
    };
    let (coord, url, metrics) = start_coordinator(&run_dir.join("state"), &logs, &[])?;
    cluster.children.push(("coordinator".into(), coord));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / args.workers as usize).max(1);
    for i in 0..args.workers {
        let child = Command::new(&worker)
            .args([
                "agent",
                "--coordinator",
                &url,
                "--devices",
                "cpu",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&logs, &format!("worker-{i}"))?)
            .spawn()
            .context("starting a worker agent")?;
        cluster.children.push((format!("worker-{i}"), child));
    }
    eprintln!(
        "cluster up: coordinator {url} (metrics {}), {} worker(s); logs in {}",
        metrics.as_deref().unwrap_or("-"),
        args.workers,
        logs.display()
    );

    let out = run_dir.join("out");
    let mut spec = json!({
        "name": format!("up-{}", args.preset),
        "kind": "pretrain",
        "data": {"uri": data, "threads": 1},
        "output": out.display().to_string(),
        "model": {"preset": args.preset},
        "resources": {"world_size": args.workers, "device": "cpu", "threads_per_rank": threads},
        "max_restarts": 2,
        "train": {"epochs": args.epochs, "batch_per_rank": args.batch, "checkpoint_every": args.checkpoint_every},
    });
    if let Some(m) = args.max_steps {
        spec["max_steps"] = json!(m);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let token = super::user_token();
    let job = rt.block_on(async {
        let mut c = client::jobs(&url, token.as_deref(), Duration::from_secs(30)).await?;
        let job = c
            .submit_job(pb::SubmitJobRequest { spec: spec.to_string(), format: pb::SpecFormat::Json as i32 })
            .await
            .map_err(|s| anyhow::anyhow!("submit refused: {}", s.message()))?
            .into_inner();
        eprintln!("submitted {} ({} × cpu)", job.id, args.workers);
        let mut printer = Printer::new();
        let job = tokio::select! {
            job = client::follow(&url, token.as_deref(), &job.id, 0, |u| printer.update(u)) => job?,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("interrupted: cancelling {}", job.id);
                let _ = c.cancel_job(pb::CancelJobRequest { id: job.id.clone(), reason: "endofm up interrupted".into() }).await;
                bail!("interrupted");
            }
        };
        printer.finish();
        anyhow::Ok(job)
    })?;
    println!("{}", job_json(&job));
    eprintln!(
        "outputs (checkpoints, metrics.jsonl, config.json): {}",
        out.display()
    );
    drop(cluster);
    Ok(outcome(&job))
}
