//! `endofm up`: a complete local cluster for a first run — the coordinator and N CPU worker
//! agents as child processes of this command, a generated endoscopy-like corpus when no data
//! is given, one pre-training job submitted and followed to its end. With `--pipeline`, also a
//! generated PolypDiag-layout dataset and two dependent jobs: fine-tuning (classify) from the
//! pre-training job's checkpoint, then evaluation on the test split from the fine-tuned one.
//! Logs of the children go to files in the run folder; the cluster is stopped when the jobs
//! end (or on Ctrl-C, which cancels them).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use endofm_coordinator::client;
use endofm_proto::v1 as pb;
use serde_json::json;

use super::jobs::{Printer, job_json, outcome, result_line};

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
    /// Pre-train, then fine-tune (classify) from its checkpoint, then evaluate the fine-tuned
    /// network on the test split: three jobs, each waiting for the one before.
    #[arg(long)]
    pipeline: bool,
    /// Fine-tuning epochs (--pipeline; default 2, or --ft-config's).
    #[arg(long)]
    ft_epochs: Option<usize>,
    /// Videos per rank per fine-tuning step (--pipeline; default 2, or --ft-config's).
    #[arg(long)]
    ft_batch: Option<usize>,
    /// PolypDiag-layout dataset (path or URI) for --pipeline; default: one generated into the
    /// run folder's parent.
    #[arg(long)]
    ft_data: Option<String>,
    /// Videos of the generated PolypDiag-layout dataset (default: the generator's).
    #[arg(long)]
    ft_videos: Option<usize>,
    /// Fine-tuning settings (--pipeline): a JSON object of `[finetune]` fields (lr, frames,
    /// window, crop, ...) laid over the defaults, under --ft-epochs/--ft-batch; validated by the
    /// coordinator at submit like any spec.
    #[arg(long)]
    ft_config: Option<PathBuf>,
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
        Some(d) => local_absolute(d, "--data")?,
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

    let downstream = match (&args.ft_data, args.pipeline) {
        (_, false) => None,
        (Some(d), true) => Some(local_absolute(d, "--ft-data")?),
        (None, true) => Some(polypdiag_dataset(&worker, &args.dir, args.ft_videos)?),
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
    if let Some(downstream) = downstream {
        let overrides = match &args.ft_config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading --ft-config {}", path.display()))?;
                let value: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("--ft-config {} is not JSON", path.display()))?;
                anyhow::ensure!(
                    value.is_object(),
                    "--ft-config {}: expected a JSON object of fine-tuning settings",
                    path.display()
                );
                Some(value)
            }
            None => None,
        };
        let mut specs = pipeline_specs(&args, spec, &downstream, &run_dir, threads);
        let mut over = match overrides {
            Some(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        if let Some(e) = args.ft_epochs {
            over.insert("epochs".into(), json!(e));
        }
        if let Some(b) = args.ft_batch {
            over.insert("batch_per_rank".into(), json!(b));
        }
        {
            for job in [&mut specs.finetune, &mut specs.evaluate] {
                if let Some(serde_json::Value::Object(table)) = job.get_mut("finetune") {
                    for (k, v) in &over {
                        table.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        let code = rt.block_on(run_pipeline(&url, token.as_deref(), specs))?;
        drop(cluster);
        return Ok(code);
    }
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

/// Generates (once; later runs reuse it) a PolypDiag-layout dataset with
/// A location given to `up` as the jobs will name it: object-store URIs as given, a local path
/// made absolute (the local workers of `up` share this machine, so the user's relative path
/// means this working directory; a job spec refuses relative paths).
fn local_absolute(text: &str, flag: &str) -> anyhow::Result<String> {
    if text.contains("://") {
        return Ok(text.to_string());
    }
    let path = std::path::Path::new(text);
    let absolute = path
        .canonicalize()
        .with_context(|| format!("{flag} {text}: no such file or folder here"))?;
    Ok(absolute.display().to_string())
}

/// `endofm-worker synth --kind polypdiag`; returns its absolute path.
fn polypdiag_dataset(worker: &Path, dir: &Path, videos: Option<usize>) -> anyhow::Result<String> {
    const SEED: u64 = 0;
    let name = match videos {
        Some(n) => format!("polypdiag-{n}v-s{SEED}"),
        None => format!("polypdiag-s{SEED}"),
    };
    let dataset = dir.join(name);
    // The generator writes labels.json last: its presence means a complete dataset.
    if !dataset.join("labels.json").is_file() {
        eprintln!(
            "generating a PolypDiag-layout dataset in {}",
            dataset.display()
        );
        let mut cmd = Command::new(worker);
        cmd.args(["synth", "--kind", "polypdiag", "--out"])
            .arg(&dataset)
            .args(["--seed", &SEED.to_string()]);
        if let Some(n) = videos {
            cmd.args(["--videos", &n.to_string()]);
        }
        let status = cmd
            .status()
            .context("running endofm-worker synth --kind polypdiag")?;
        anyhow::ensure!(
            status.success(),
            "generating the PolypDiag-layout dataset failed"
        );
    }
    Ok(dataset
        .canonicalize()
        .with_context(|| format!("locating {}", dataset.display()))?
        .display()
        .to_string())
}

/// The three jobs of `--pipeline`, in order. The finetune and evaluate specs name the job
/// before them as `init = "job:{}"`; `run_pipeline` fills in the ids.
struct PipelineSpecs {
    pretrain: serde_json::Value,
    finetune: serde_json::Value,
    evaluate: serde_json::Value,
    outputs: [PathBuf; 3],
}

fn pipeline_specs(
    args: &UpArgs,
    pretrain: serde_json::Value,
    data: &str,
    run_dir: &Path,
    threads: usize,
) -> PipelineSpecs {
    let finetune_out = run_dir.join("finetune");
    let evaluate_out = run_dir.join("evaluate");
    // One rank each: the generated dataset has a handful of videos.
    let resources = json!({"world_size": 1, "device": "cpu", "threads_per_rank": threads});
    let finetune = json!({
        "name": format!("up-{}-finetune-classify", args.preset),
        "kind": "finetune",
        "task": "classify",
        "data": {"uri": data, "threads": 1},
        "output": finetune_out.display().to_string(),
        "model": {"preset": args.preset},
        "resources": resources,
        "max_restarts": 2,
        "finetune": {"epochs": 2, "batch_per_rank": 2},
    });
    let evaluate = json!({
        "name": format!("up-{}-evaluate-classify", args.preset),
        "kind": "evaluate",
        "task": "classify",
        "split": "test",
        "data": {"uri": data, "threads": 1},
        "output": evaluate_out.display().to_string(),
        "model": {"preset": args.preset},
        "resources": resources,
        "max_restarts": 2,
        "finetune": {"batch_per_rank": 2},
    });
    PipelineSpecs {
        pretrain,
        finetune,
        evaluate,
        outputs: [run_dir.join("out"), finetune_out, evaluate_out],
    }
}

/// Submits the pipeline's jobs, each from the one before (`init = "job:<id>"`), follows them
/// in order and prints how each ended and the evaluation's result. Exit code: the first job
/// that did not succeed decides; 0 when all did.
async fn run_pipeline(
    url: &str,
    token: Option<&str>,
    specs: PipelineSpecs,
) -> anyhow::Result<ExitCode> {
    let mut c = client::jobs(url, token, Duration::from_secs(30)).await?;
    let mut ids: Vec<String> = Vec::new();
    for (stage, mut spec) in [
        ("pretrain", specs.pretrain),
        ("finetune", specs.finetune),
        ("evaluate", specs.evaluate),
    ] {
        if let Some(before) = ids.last() {
            spec["init"] = json!(format!("job:{before}"));
        }
        let submitted = c
            .submit_job(pb::SubmitJobRequest {
                spec: spec.to_string(),
                format: pb::SpecFormat::Json as i32,
            })
            .await;
        let job = match submitted {
            Ok(job) => job.into_inner(),
            Err(s) => {
                cancel_all(&mut c, &ids, "endofm up: a later stage was refused").await;
                bail!("{stage} submit refused: {}", s.message());
            }
        };
        let after = ids
            .last()
            .map_or(String::new(), |b| format!(", from {b}'s checkpoint"));
        eprintln!("submitted {} ({stage}{after})", job.id);
        ids.push(job.id);
    }
    let mut finals: Vec<pb::Job> = Vec::new();
    let followed = async {
        for id in &ids {
            let mut printer = Printer::new();
            let job = client::follow(url, token, id, 0, |u| printer.update(u)).await?;
            printer.finish();
            eprintln!(
                "{} ({}) ended {}: {}",
                job.id,
                job.kind,
                client::state_of(&job),
                job.message
            );
            finals.push(job);
        }
        anyhow::Ok(())
    };
    tokio::select! {
        r = followed => r?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted: cancelling {}", ids.join(", "));
            cancel_all(&mut c, &ids, "endofm up interrupted").await;
            bail!("interrupted");
        }
    }
    // The final snapshots are re-read: a result reported with the last exit is in the record.
    let mut code = ExitCode::SUCCESS;
    let mut failed = false;
    for (job, out) in finals.iter().zip(&specs.outputs) {
        let job = c
            .get_job(pb::GetJobRequest { id: job.id.clone() })
            .await
            .map_or_else(|_| job.clone(), tonic::Response::into_inner);
        println!("{}", job_json(&job));
        eprintln!("{} outputs: {}", job.kind, out.display());
        if !failed && job.state != pb::JobState::Succeeded as i32 {
            failed = true;
            code = outcome(&job);
        }
        if let Some(r) = &job.result {
            eprintln!("result of {} ({}): {}", job.id, job.kind, result_line(r));
            eprintln!("report: {}", r.report);
            let plots = out.join("plots");
            if plots.is_dir() {
                let mut names: Vec<String> = std::fs::read_dir(&plots)
                    .map(|d| {
                        d.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                names.sort();
                eprintln!("plots: {} ({})", plots.display(), names.join(", "));
            }
        }
    }
    Ok(code)
}

/// Cancels the jobs (best effort): cancelling one that already ended changes nothing.
async fn cancel_all(c: &mut client::Jobs, ids: &[String], reason: &str) {
    for id in ids.iter().rev() {
        let _ = c
            .cancel_job(pb::CancelJobRequest {
                id: id.clone(),
                reason: reason.into(),
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_locations_become_absolute_and_uris_stay() {
        let here = std::env::current_dir().unwrap();
        let got = local_absolute("src", "--data").unwrap();
        assert_eq!(
            got,
            here.join("src")
                .canonicalize()
                .unwrap()
                .display()
                .to_string()
        );
        assert_eq!(
            local_absolute("s3://bucket/corpus", "--data").unwrap(),
            "s3://bucket/corpus"
        );
        let err = local_absolute("no/such/folder", "--ft-data").unwrap_err();
        assert!(
            format!("{err:#}").contains("--ft-data no/such/folder"),
            "{err:#}"
        );
    }
}
