//! The job commands: submit, jobs, status, logs, cancel, wait.

use std::io::{IsTerminal, Read};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use endofm_coordinator::client::{self, is_final, state_of};
use endofm_proto::v1 as pb;
use serde_json::json;

use super::{EXIT_CANCELLED, EXIT_ERROR, EXIT_FAILED, user_token};

const PATIENCE: Duration = Duration::from_secs(10);

async fn connect(url: &str) -> anyhow::Result<client::Jobs> {
    Ok(client::jobs(url, user_token().as_deref(), PATIENCE).await?)
}

fn status_error(call: &str, s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::InvalidArgument => anyhow::anyhow!("{call} refused: {}", s.message()),
        tonic::Code::NotFound => anyhow::anyhow!("{}", s.message()),
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            anyhow::anyhow!("{call}: {} (set ENDOFM_USER_TOKEN)", s.message())
        }
        _ => anyhow::anyhow!("{call}: {} ({:?})", s.message(), s.code()),
    }
}

/// A job as JSON for `--json` outputs.
pub fn job_json(job: &pb::Job) -> serde_json::Value {
    let spec: serde_json::Value = serde_json::from_str(&job.spec_json).unwrap_or_default();
    json!({
        "id": job.id,
        "name": job.name,
        "kind": job.kind,
        "state": state_of(job),
        "priority": job.priority,
        "world_size": job.world_size,
        "device": job.device,
        "generation": job.generation,
        "restarts": job.restarts,
        "max_restarts": job.max_restarts,
        "submitted_unix_ms": job.submitted_unix_ms,
        "started_unix_ms": job.started_unix_ms,
        "finished_unix_ms": job.finished_unix_ms,
        "message": job.message,
        "failure_class": (!job.failure_class.is_empty()).then_some(&job.failure_class),
        "not_before_unix_ms": (job.not_before_unix_ms > 0).then_some(job.not_before_unix_ms),
        "progress": job.progress.as_ref().map(|p| json!({
            "step": p.step, "total_steps": p.total_steps, "epoch": p.epoch, "loss": p.loss,
            "lr": p.lr, "samples_per_s": p.samples_per_s, "eta_s": p.eta_s,
            "collapse": (!p.collapse.is_empty()).then_some(&p.collapse),
        })),
        "last_checkpoint": job.last_checkpoint.as_ref().map(|c| json!({
            "step": c.step, "uri": c.uri, "generation": c.generation,
        })),
        "placement": job.placement.iter().map(|p| json!({
            "rank": p.rank, "worker": p.worker_id, "device_index": p.device_index,
        })).collect::<Vec<_>>(),
        "after": job.after,
        "waiting_for": job.waiting_for,
        "init_resolved": (!job.init_resolved.is_empty()).then_some(&job.init_resolved),
        "result": job.result.as_ref().map(|r| json!({
            "headline": r.headline, "value": r.value, "metrics": r.metrics, "report": r.report,
            "generation": r.generation,
        })),
        "spec": spec,
    })
}

/// `test_f1 0.9310 (report: /runs/eval/report.json)`.
pub fn result_line(r: &pb::JobResult) -> String {
    format!("{} {:.4} (report: {})", r.headline, r.value, r.report)
}

pub async fn submit(url: &str, file: &Path, json_out: bool) -> anyhow::Result<ExitCode> {
    let text = if file == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the spec from stdin")?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let format = match file.extension().and_then(|e| e.to_str()) {
        Some("toml") => pb::SpecFormat::Toml,
        Some("json") => pb::SpecFormat::Json,
        _ => pb::SpecFormat::Auto,
    };
    let mut c = connect(url).await?;
    let job = c
        .submit_job(pb::SubmitJobRequest {
            spec: text,
            format: format as i32,
        })
        .await
        .map_err(|s| status_error("submit", s))?
        .into_inner();
    if json_out {
        println!("{}", job_json(&job));
    } else {
        println!("{}", job.id);
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_state(s: &str) -> anyhow::Result<pb::JobState> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "queued" => pb::JobState::Queued,
        "running" => pb::JobState::Running,
        "succeeded" => pb::JobState::Succeeded,
        "failed" => pb::JobState::Failed,
        "cancelled" | "canceled" => pb::JobState::Cancelled,
        other => anyhow::bail!(
            "--state: `{other}` is not a job state (queued, running, succeeded, failed, cancelled)"
        ),
    })
}

pub async fn list(url: &str, states: &[String], json_out: bool) -> anyhow::Result<ExitCode> {
    let states = states
        .iter()
        .map(|s| parse_state(s).map(|s| s as i32))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut c = connect(url).await?;
    let jobs = c
        .list_jobs(pb::ListJobsRequest { states })
        .await
        .map_err(|s| status_error("jobs", s))?
        .into_inner()
        .jobs;
    if json_out {
        for job in &jobs {
            println!("{}", job_json(job));
        }
    } else {
        println!(
            "{:<10} {:<20} {:<9} {:<10} {:>5} {:>4} {:>8} {:>12} {:<18}  MESSAGE",
            "ID", "NAME", "KIND", "STATE", "PRIO", "GEN", "RANKS", "STEP", "RESULT"
        );
        for j in &jobs {
            let step = j
                .progress
                .as_ref()
                .map(|p| format!("{}/{}", p.step, p.total_steps))
                .unwrap_or_else(|| "-".into());
            let result = j.result.as_ref().map_or_else(
                || "-".into(),
                |r| truncate(&format!("{} {:.4}", r.headline, r.value), 18),
            );
            println!(
                "{:<10} {:<20} {:<9} {:<10} {:>5} {:>4} {:>8} {:>12} {:<18}  {}",
                j.id,
                truncate(&j.name, 20),
                j.kind,
                state_of(j),
                j.priority,
                j.generation,
                format!("{}×{}", j.world_size, j.device),
                step,
                result,
                j.message
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

pub async fn status(url: &str, id: &str, json_out: bool) -> anyhow::Result<ExitCode> {
    let mut c = connect(url).await?;
    let job = c
        .get_job(pb::GetJobRequest { id: id.to_string() })
        .await
        .map_err(|s| status_error("status", s))?
        .into_inner();
    if json_out {
        println!("{}", job_json(&job));
    } else {
        println!(
            "{} ({}, {}): {}",
            job.id,
            job.name,
            job.kind,
            state_of(&job)
        );
        println!(
            "  {} × {} rank(s), priority {}, attempt {} ({} of {} restarts used)",
            job.world_size,
            job.device,
            job.priority,
            job.generation,
            job.restarts,
            job.max_restarts
        );
        if let Some(p) = &job.progress {
            println!(
                "  step {}/{} epoch {} loss {:.4} {:.2} clips/s eta {}",
                p.step,
                p.total_steps,
                p.epoch,
                p.loss,
                p.samples_per_s,
                eta(p.eta_s)
            );
            if !p.collapse.is_empty() {
                println!("  WARNING: {}", p.collapse);
            }
        }
        if !job.after.is_empty() {
            println!("  after: {}", job.after.join(", "));
        }
        if !job.init_resolved.is_empty() {
            println!("  init: {}", job.init_resolved);
        }
        if let Some(c) = &job.last_checkpoint {
            println!("  last checkpoint: step {} at {}", c.step, c.uri);
        }
        if let Some(r) = &job.result {
            println!("  result: {}", result_line(r));
        }
        for p in &job.placement {
            println!(
                "  rank {} on {} (device {})",
                p.rank, p.worker_id, p.device_index
            );
        }
        if !job.failure_class.is_empty() {
            println!("  last failure class: {}", job.failure_class);
        }
        if !job.message.is_empty() {
            println!("  {}", job.message);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn eta(s: f64) -> String {
    if !s.is_finite() || s <= 0.0 {
        return "-".into();
    }
    let s = s.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn event_line(e: &pb::Event) -> String {
    let secs = e.unix_ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let who = if e.rank >= 0 {
        format!(" [attempt {} rank {}]", e.generation, e.rank)
    } else if e.generation > 0 {
        format!(" [attempt {}]", e.generation)
    } else {
        String::new()
    };
    format!("{h:02}:{m:02}:{s:02} {}{}: {}", e.kind, who, e.message)
}

/// Prints updates: events as lines; progress as a bar on a terminal, else a line at most every
/// few seconds.
pub struct Printer {
    bar: Option<indicatif::ProgressBar>,
    last_progress_line: Option<Instant>,
}

impl Printer {
    pub fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar
        });
        Self {
            bar,
            last_progress_line: None,
        }
    }

    pub fn update(&mut self, u: &pb::job_update::Update) {
        match u {
            pb::job_update::Update::Event(e) => {
                let line = event_line(e);
                match &self.bar {
                    Some(bar) => bar.println(line),
                    None => println!("{line}"),
                }
            }
            pb::job_update::Update::Progress(p) => {
                let msg = format!(
                    "loss {:.4} {:.2} clips/s eta {}",
                    p.loss,
                    p.samples_per_s,
                    eta(p.eta_s)
                );
                match &self.bar {
                    Some(bar) => {
                        bar.set_length(p.total_steps);
                        bar.set_position(p.step);
                        bar.set_prefix(format!("epoch {}", p.epoch));
                        bar.set_message(msg);
                    }
                    None => {
                        let due = self
                            .last_progress_line
                            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5));
                        if due || p.step == p.total_steps {
                            self.last_progress_line = Some(Instant::now());
                            println!(
                                "progress: step {}/{} epoch {} {msg}",
                                p.step, p.total_steps, p.epoch
                            );
                        }
                    }
                }
            }
            pb::job_update::Update::Job(_) => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

pub async fn logs(url: &str, id: &str, follow: bool) -> anyhow::Result<ExitCode> {
    let mut printer = Printer::new();
    if follow {
        let job =
            client::follow(url, user_token().as_deref(), id, 0, |u| printer.update(u)).await?;
        printer.finish();
        println!("{}: {} {}", job.id, state_of(&job), job.message);
        return Ok(ExitCode::SUCCESS);
    }
    let mut c = connect(url).await?;
    let mut stream = c
        .watch_job(pb::WatchJobRequest {
            id: id.to_string(),
            after_seq: 0,
            follow: false,
        })
        .await
        .map_err(|s| status_error("logs", s))?
        .into_inner();
    while let Some(update) = stream
        .message()
        .await
        .map_err(|s| status_error("logs", s))?
    {
        if let Some(u) = update.update {
            printer.update(&u);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn cancel(url: &str, id: &str, reason: &str) -> anyhow::Result<ExitCode> {
    let mut c = connect(url).await?;
    let job = c
        .cancel_job(pb::CancelJobRequest {
            id: id.to_string(),
            reason: reason.to_string(),
        })
        .await
        .map_err(|s| status_error("cancel", s))?
        .into_inner();
    println!("{}: {}", job.id, state_of(&job));
    Ok(ExitCode::SUCCESS)
}

/// Exit code for a final job.
pub fn outcome(job: &pb::Job) -> ExitCode {
    match pb::JobState::try_from(job.state) {
        Ok(pb::JobState::Succeeded) => ExitCode::SUCCESS,
        Ok(pb::JobState::Cancelled) => ExitCode::from(EXIT_CANCELLED),
        Ok(pb::JobState::Failed) => ExitCode::from(EXIT_FAILED),
        _ => ExitCode::from(EXIT_ERROR),
    }
}

pub async fn wait(url: &str, id: &str, timeout_s: Option<f64>) -> anyhow::Result<ExitCode> {
    let token = user_token();
    let follow = client::follow(url, token.as_deref(), id, u64::MAX, |_| {});
    let job = match timeout_s {
        Some(t) if t.is_finite() && t > 0.0 => {
            match tokio::time::timeout(Duration::from_secs_f64(t), follow).await {
                Ok(job) => job?,
                Err(_) => {
                    eprintln!("error: {id} did not end within {t} s");
                    return Ok(ExitCode::from(EXIT_ERROR));
                }
            }
        }
        _ => follow.await?,
    };
    debug_assert!(is_final(&job));
    println!("{}: {} {}", job.id, state_of(&job), job.message);
    Ok(outcome(&job))
}
