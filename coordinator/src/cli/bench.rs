//! `endofm bench coordinator`: control-plane capacity. Starts a coordinator process and a
//! separate load process (`endofm bench-load`) that registers N simulated one-device workers,
//! heartbeats each once a second (and at once when its job ends, as a real agent does), and
//! submits a burst of M one-rank jobs; each simulated worker finishes its job at once.
//! Prints placements per second, heartbeat and submit latency percentiles, coordinator CPU and
//! peak RSS as JSON.

use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use endofm_coordinator::client;
use endofm_proto::v1 as pb;
use serde_json::json;
use tokio::sync::Mutex;

use super::up::start_coordinator;

/// Benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Control-plane capacity: placements/s and RPC latency with simulated workers.
    Coordinator {
        /// Simulated workers.
        #[arg(long, default_value_t = 1000)]
        workers: usize,
        /// One-rank jobs submitted in a burst.
        #[arg(long, default_value_t = 10_000)]
        jobs: usize,
    },
}

/// Arguments of the hidden load process.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Coordinator URL.
    #[arg(long)]
    url: String,
    /// Simulated workers.
    #[arg(long)]
    workers: usize,
    /// Jobs.
    #[arg(long)]
    jobs: usize,
}

fn proc_stat(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the command name: state is field 0, utime 11, stime 12 (clock ticks, 100 Hz).
    let cpu_s = (ticks(11) + ticks(12)) / 100.0;
    (rss_kb / 1024.0, cpu_s)
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    let BenchCommand::Coordinator { workers, jobs } = cmd;
    let dir = tempfile_dir()?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let (mut coord, url, _) = start_coordinator(
        &dir.join("state"),
        &logs,
        &[
            "--heartbeat-ms",
            "1000",
            "--lease-ms",
            "30000",
            "--log-format",
            "json",
        ],
    )?;
    let pid = coord.id();
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args([
            "bench-load",
            "--url",
            &url,
            "--workers",
            &workers.to_string(),
            "--jobs",
            &jobs.to_string(),
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running the load process")?;
    let (rss_mb, cpu_s) = proc_stat(pid);
    let _ = coord.kill();
    let _ = coord.wait();
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(out.status.success(), "the load process failed");
    let mut result: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("load output")?;
    result["rss_mb"] = json!((rss_mb * 10.0).round() / 10.0);
    result["coordinator_cpu_s"] = json!((cpu_s * 100.0).round() / 100.0);
    println!("{result}");
    Ok(ExitCode::SUCCESS)
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "endofm-bench-{}-{}",
        std::process::id(),
        endofm_coordinator::records::now_ms()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn spec(i: usize) -> String {
    json!({
        "name": format!("bench-{i}"),
        "kind": "pretrain",
        "data": {"uri": "s3://bench-corpus/clips"},
        "output": format!("s3://bench-runs/job-{i}"),
        "model": {"preset": "tiny"},
        "resources": {"world_size": 1, "device": "cpu"},
    })
    .to_string()
}

pub fn load(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(load_async(args))
}

async fn load_async(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let channels = 8usize;
    let mut worker_clients = Vec::new();
    for _ in 0..channels {
        worker_clients.push(client::workers(&args.url, None, Duration::from_secs(30)).await?);
    }
    let placed = Arc::new(AtomicU64::new(0));
    let hb_latency = Arc::new(Mutex::new(Vec::<f64>::with_capacity(args.workers * 64)));
    let done = Arc::new(tokio::sync::Notify::new());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let first_placement = Arc::new(Mutex::new(None::<Instant>));
    let mut ids = Vec::new();
    for i in 0..args.workers {
        let mut c = worker_clients[i % channels].clone();
        let resp = c
            .register(pb::RegisterRequest {
                worker_id: String::new(),
                hostname: format!("sim-{i}"),
                devices: vec![pb::Device {
                    kind: "cpu".into(),
                    index: 0,
                    name: "cpu".into(),
                    memory_bytes: 0,
                }],
                running: vec![],
                labels: Default::default(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("register: {s}"))?
            .into_inner();
        ids.push(resp.worker_id);
    }
    let target = args.jobs as u64;
    let mut tasks = Vec::new();
    for (i, id) in ids.into_iter().enumerate() {
        let mut c = worker_clients[i % channels].clone();
        let placed = Arc::clone(&placed);
        let hb_latency = Arc::clone(&hb_latency);
        let done = Arc::clone(&done);
        let stop = Arc::clone(&stop);
        let first = Arc::clone(&first_placement);
        tasks.push(tokio::spawn(async move {
            // Spread the workers' heartbeats over the second.
            tokio::time::sleep(Duration::from_millis(
                (i as u64 * 1000) / args.workers.max(1) as u64,
            ))
            .await;
            let mut exited: Vec<pb::RankExit> = Vec::new();
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let resp = c
                    .heartbeat(pb::HeartbeatRequest {
                        worker_id: id.clone(),
                        running: vec![],
                        exited: std::mem::take(&mut exited),
                    })
                    .await;
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                hb_latency.lock().await.push(ms);
                let Ok(resp) = resp else { break };
                let resp = resp.into_inner();
                for a in resp.assignments {
                    let n = placed.fetch_add(1, Ordering::SeqCst) + 1;
                    if n == 1 {
                        *first.lock().await = Some(Instant::now());
                    }
                    if n >= target {
                        done.notify_one();
                    }
                    exited.push(pb::RankExit {
                        rank: a.rank,
                        success: true,
                        message: String::new(),
                        failure_class: String::new(),
                    });
                }
                if exited.is_empty() {
                    next += Duration::from_secs(1);
                    let now = Instant::now();
                    if next > now {
                        tokio::time::sleep(next - now).await;
                    } else {
                        next = now;
                    }
                }
            }
        }));
    }
    // Let the heartbeat loops settle, then submit the burst.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let submit_latency = Arc::new(Mutex::new(Vec::<f64>::with_capacity(args.jobs)));
    let counter = Arc::new(AtomicU64::new(0));
    let burst_started = Instant::now();
    let mut submitters = Vec::new();
    for _ in 0..32 {
        let mut c = client::jobs(&args.url, None, Duration::from_secs(30)).await?;
        let counter = Arc::clone(&counter);
        let lat = Arc::clone(&submit_latency);
        let total = args.jobs as u64;
        submitters.push(tokio::spawn(async move {
            loop {
                let i = counter.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    break;
                }
                let t = Instant::now();
                let r = c
                    .submit_job(pb::SubmitJobRequest {
                        spec: spec(i as usize),
                        format: pb::SpecFormat::Json as i32,
                    })
                    .await;
                lat.lock().await.push(t.elapsed().as_secs_f64() * 1000.0);
                if let Err(s) = r {
                    eprintln!("submit failed: {s}");
                    break;
                }
            }
        }));
    }
    for s in submitters {
        let _ = s.await;
    }
    let submit_s = burst_started.elapsed().as_secs_f64();
    let waited = tokio::time::timeout(Duration::from_secs(600), async {
        while placed.load(Ordering::SeqCst) < target {
            done.notified().await;
        }
    })
    .await;
    let all_s = burst_started.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.abort();
    }
    anyhow::ensure!(
        waited.is_ok(),
        "only {} of {} jobs were placed within 600 s",
        placed.load(Ordering::SeqCst),
        target
    );
    let mut hb = hb_latency.lock().await.clone();
    hb.sort_by(f64::total_cmp);
    let mut sub = submit_latency.lock().await.clone();
    sub.sort_by(f64::total_cmp);
    let round = |v: f64| (v * 1000.0).round() / 1000.0;
    println!(
        "{}",
        json!({
            "bench": "coordinator",
            "workers": args.workers,
            "jobs": args.jobs,
            "placements_per_s": round(target as f64 / all_s),
            "seconds": round(all_s),
            "submit_s": round(submit_s),
            "heartbeats": hb.len(),
            "heartbeat_p50_ms": round(percentile(&hb, 0.5)),
            "heartbeat_p99_ms": round(percentile(&hb, 0.99)),
            "submit_p50_ms": round(percentile(&sub, 0.5)),
            "submit_p99_ms": round(percentile(&sub, 0.99)),
        })
    );
    Ok(ExitCode::SUCCESS)
}
