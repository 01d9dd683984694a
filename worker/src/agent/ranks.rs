//! The agent's rank processes: one child (`endofm-worker rank`) per assigned rank. The child's
//! stdin is a pipe the agent holds until the child ends, so a dead agent (even `kill -9`) ends its
//! ranks. Stop = SIGTERM (the trainer checkpoints at the next step and exits 0), then SIGKILL
//! after the grace period. Stdout lines (progress, checkpoints, results) become reports and
//! metrics, all queued before the exit is announced; stderr log lines are re-logged
//! under the rank's span and forwarded (warnings, errors, a sample of the rest). Every exit is
//! announced exactly once on the exit channel, with the last error line as its message.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use endofm_proto::v1;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use endofm_shared::FailureClass;

use super::devices::DeviceSlot;
use super::failure;
use super::metrics::Metrics;
use super::protocol::{AssignmentFile, RankLine};
use super::reports::ReportQueue;
use crate::{Error, Result};

/// Info lines forwarded: the first few, then one in this many.
const INFO_SAMPLE: u64 = 20;

/// Identifies a rank of an attempt.
pub type RankKey = (String, u64, u32);

/// Key of a rank reference.
pub fn key_of(r: &v1::RankRef) -> RankKey {
    (r.job_id.clone(), r.generation, r.rank)
}

/// How rank processes are started.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// The worker binary.
    pub exe: PathBuf,
    /// The coordinator's URL (ranks call the rendezvous).
    pub coordinator: String,
    /// Host ranks bind their ring listeners to.
    pub advertise_host: String,
    /// SIGTERM → SIGKILL.
    pub stop_grace: Duration,
}

/// A running rank.
#[derive(Debug)]
struct Running {
    stop: Option<oneshot::Sender<String>>,
    pid: Option<u32>,
    device: String,
}

/// Every rank process of this agent.
#[derive(Debug)]
pub struct Ranks {
    launch: LaunchConfig,
    running: HashMap<RankKey, Running>,
    exits: mpsc::UnboundedSender<v1::RankExit>,
    reports: Arc<ReportQueue>,
    metrics: Arc<Metrics>,
}

impl Ranks {
    /// No ranks yet; exits will be sent on `exits`.
    pub fn new(
        launch: LaunchConfig,
        exits: mpsc::UnboundedSender<v1::RankExit>,
        reports: Arc<ReportQueue>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            launch,
            running: HashMap::new(),
            exits,
            reports,
            metrics,
        }
    }

    /// The ranks still running (an exited rank is removed by [`Ranks::exited`]).
    pub fn refs(&self) -> Vec<v1::RankRef> {
        self.running
            .keys()
            .map(|(job_id, generation, rank)| v1::RankRef {
                job_id: job_id.clone(),
                generation: *generation,
                rank: *rank,
            })
            .collect()
    }

    /// Number of running ranks.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Whether none runs.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Process ids and devices of the running ranks (for memory sampling).
    pub fn processes(&self) -> Vec<(u32, String)> {
        self.running
            .values()
            .filter_map(|r| r.pid.map(|p| (p, r.device.clone())))
            .collect()
    }

    /// Forgets a rank whose exit was announced.
    pub fn exited(&mut self, rank: &v1::RankRef) {
        self.running.remove(&key_of(rank));
        self.metrics.ranks_running.set(self.running.len() as i64);
    }

    /// Starts a rank (a repeated assignment of a running rank is ignored). A rank that cannot
    /// be started is announced as a failed exit.
    pub fn start(&mut self, a: &v1::Assignment, slot: Option<DeviceSlot>, threads: usize) {
        let Some(rank) = a.rank.clone() else {
            tracing::warn!("assignment without a rank ignored");
            return;
        };
        let key = key_of(&rank);
        if self.running.contains_key(&key) {
            return;
        }
        let span = tracing::info_span!("rank", job = %rank.job_id, generation = rank.generation, rank = rank.rank);
        let device = slot.map_or_else(
            || format!("{}:{}", a.device_kind, a.device_index),
            |s| s.label(),
        );
        let (stop_tx, stop_rx) = oneshot::channel();
        let pid = match self.spawn(a, threads, stop_rx, span.clone()) {
            Ok(pid) => pid,
            Err(e) => {
                span.in_scope(|| tracing::error!(error = %e, "cannot start the rank"));
                let _ = self.exits.send(v1::RankExit {
                    rank: Some(rank.clone()),
                    success: false,
                    message: format!("cannot start the rank: {e}"),
                    failure_class: String::new(),
                });
                None
            }
        };
        span.in_scope(|| {
            tracing::info!(device, threads, pid, world = a.world_size, "rank started")
        });
        self.running.insert(
            key,
            Running {
                stop: Some(stop_tx),
                pid,
                device,
            },
        );
        self.metrics.ranks_running.set(self.running.len() as i64);
    }

    /// Asks a rank to stop (SIGTERM, then SIGKILL after the grace period).
    pub fn stop(&mut self, rank: &v1::RankRef, reason: &str) {
        if let Some(r) = self.running.get_mut(&key_of(rank))
            && let Some(tx) = r.stop.take()
        {
            let _ = tx.send(reason.to_string());
        }
    }

    /// Asks every rank to stop.
    pub fn stop_all(&mut self, reason: &str) {
        for r in self.running.values_mut() {
            if let Some(tx) = r.stop.take() {
                let _ = tx.send(reason.to_string());
            }
        }
    }

    fn spawn(
        &self,
        a: &v1::Assignment,
        threads: usize,
        stop: oneshot::Receiver<String>,
        span: tracing::Span,
    ) -> Result<Option<u32>> {
        let file = AssignmentFile::from_proto(a)?;
        let rank = file.rank_ref();
        let dir = tempfile::Builder::new()
            .prefix("endofm-rank-")
            .tempdir()
            .map_err(|source| Error::Io {
                action: "creating the rank's folder",
                path: std::env::temp_dir(),
                source,
            })?;
        let path = dir.path().join("assignment.json");
        std::fs::write(&path, serde_json::to_vec(&file).unwrap_or_default()).map_err(|source| {
            Error::Io {
                action: "writing the assignment",
                path: path.clone(),
                source,
            }
        })?;
        let mut child = Command::new(&self.launch.exe)
            .args(["--log-format", "json", "rank", "--coordinator"])
            .arg(&self.launch.coordinator)
            .arg("--assignment")
            .arg(&path)
            .arg("--threads")
            .arg(threads.to_string())
            .arg("--advertise-host")
            .arg(&self.launch.advertise_host)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::Service {
                what: format!("starting {}", self.launch.exe.display()),
                reason: e.to_string(),
            })?;
        let pid = child.id();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().map(|out| {
            tokio::spawn(
                read_stdout(
                    out,
                    rank.clone(),
                    Arc::clone(&self.reports),
                    Arc::clone(&self.metrics),
                )
                .instrument(span.clone()),
            )
        });
        let stderr = child.stderr.take().map(|err| {
            tokio::spawn(
                read_stderr(err, rank.clone(), Arc::clone(&self.reports)).instrument(span.clone()),
            )
        });
        let exits = self.exits.clone();
        let metrics = Arc::clone(&self.metrics);
        let grace = self.launch.stop_grace;
        tokio::spawn(
            async move {
                let (status, stop_reason) = wait(&mut child, stop, grace).await;
                drop(stdin);
                let class = match stdout {
                    Some(t) => tokio::time::timeout(Duration::from_secs(5), t)
                        .await
                        .ok()
                        .and_then(|r| r.ok())
                        .flatten(),
                    None => None,
                };
                let last_error = match stderr {
                    Some(t) => tokio::time::timeout(Duration::from_secs(5), t)
                        .await
                        .ok()
                        .and_then(|r| r.ok())
                        .flatten(),
                    None => None,
                };
                drop(dir);
                metrics.forget(&rank.job_id, rank.rank);
                let exit = describe_exit(rank, status, stop_reason, last_error, class);
                if exit.success {
                    tracing::info!(status = %exit.message, "rank exited");
                } else {
                    tracing::warn!(status = %exit.message, "rank failed");
                }
                let _ = exits.send(exit);
            }
            .instrument(span),
        );
        Ok(pid)
    }
}

/// Waits for the child, stopping it when asked: SIGTERM, then SIGKILL after `grace`.
async fn wait(
    child: &mut Child,
    stop: oneshot::Receiver<String>,
    grace: Duration,
) -> (std::io::Result<std::process::ExitStatus>, Option<String>) {
    tokio::select! {
        status = child.wait() => (status, None),
        reason = stop => {
            let reason = reason.unwrap_or_else(|_| "agent shutting down".into());
            tracing::info!(%reason, grace_s = grace.as_secs_f64(), "stopping rank (SIGTERM)");
            if let Some(pid) = child.id() {
                terminate(pid).await;
            }
            match tokio::time::timeout(grace, child.wait()).await {
                Ok(status) => (status, Some(reason)),
                Err(_) => {
                    tracing::warn!("rank did not stop within the grace period: SIGKILL");
                    let _ = child.start_kill();
                    (child.wait().await, Some(reason))
                }
            }
        }
    }
}

/// Sends SIGTERM (through `kill(1)`: the crate forbids `unsafe`, which `kill(2)` needs).
async fn terminate(pid: u32) {
    let sent = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if !sent.is_ok_and(|s| s.success()) {
        tracing::warn!(pid, "could not send SIGTERM");
    }
}

/// The exit as reported to the coordinator. `class` is the failure class the rank printed;
/// without one, the exit status decides ([`failure::of_exit`]), and a rank stopped on order
/// is `stopped`.
pub fn describe_exit(
    rank: v1::RankRef,
    status: std::io::Result<std::process::ExitStatus>,
    stop_reason: Option<String>,
    last_error: Option<String>,
    class: Option<FailureClass>,
) -> v1::RankExit {
    use std::os::unix::process::ExitStatusExt;
    let class = match (&status, class) {
        (Ok(s), _) if s.success() => None,
        (_, Some(class)) => Some(class),
        (_, None) if stop_reason.is_some() => Some(FailureClass::Stopped),
        (Ok(s), None) => Some(failure::of_exit(s.code())),
        (Err(_), None) => Some(FailureClass::Unknown),
    };
    let (success, mut message) = match &status {
        Ok(s) if s.success() => (true, "exit status 0".to_string()),
        Ok(s) => {
            let what = match (s.code(), s.signal()) {
                (Some(c), _) => format!("exit status {c}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => s.to_string(),
            };
            let why = last_error.unwrap_or_else(|| "no error message".into());
            (false, format!("{what}: {why}"))
        }
        Err(e) => (false, format!("waiting for the rank failed: {e}")),
    };
    if let Some(reason) = stop_reason {
        message = format!("stopped ({reason}); {message}");
    }
    v1::RankExit {
        rank: Some(rank),
        success,
        message,
        failure_class: class.map(|c| c.name().to_string()).unwrap_or_default(),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Turns stdout lines into reports and metrics; returns the failure class the rank printed
/// last, if any.
async fn read_stdout(
    out: tokio::process::ChildStdout,
    rank: v1::RankRef,
    reports: Arc<ReportQueue>,
    metrics: Arc<Metrics>,
) -> Option<FailureClass> {
    use v1::rank_report::Report;
    let mut failure = None;
    let mut lines = BufReader::new(out).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let report = match RankLine::parse(&line) {
            Some(RankLine::Progress(p)) => {
                metrics.observe(&rank.job_id, rank.rank, &p);
                tracing::debug!(step = p.step, loss = p.loss, "progress");
                Report::Progress(p.to_proto())
            }
            Some(RankLine::Checkpoint { step, uri }) => {
                tracing::debug!(step, %uri, "checkpoint reported");
                Report::Checkpoint(v1::CheckpointRef {
                    step,
                    uri,
                    generation: rank.generation,
                })
            }
            Some(RankLine::Result {
                headline,
                value,
                metrics,
                report,
            }) => {
                tracing::info!(%headline, value, %report, "result reported");
                Report::Result(v1::JobResult {
                    headline,
                    value,
                    metrics,
                    report,
                    generation: rank.generation,
                    unix_ms: now_ms(),
                })
            }
            Some(RankLine::Failure { class, reason }) => {
                tracing::info!(%class, %reason, "failure class reported");
                failure = Some(class);
                continue;
            }
            None => {
                tracing::info!(line = %line, "rank stdout");
                continue;
            }
        };
        reports.push(v1::RankReport {
            rank: Some(rank.clone()),
            report: Some(report),
        });
    }
    failure
}

/// One stderr line: level and text.
pub fn parse_log_line(line: &str) -> (String, String) {
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(v) if v.is_object() => {
            let level = v["level"].as_str().unwrap_or("INFO").to_ascii_lowercase();
            let mut text = v["fields"]["message"].as_str().unwrap_or("").to_string();
            if let Some(fields) = v["fields"].as_object() {
                for (k, val) in fields.iter().filter(|(k, _)| k.as_str() != "message") {
                    let val = val.as_str().map_or_else(|| val.to_string(), str::to_string);
                    text.push_str(&format!(" {k}={val}"));
                }
            }
            (level, text)
        }
        _ => {
            let level = if line.starts_with("error") {
                "error"
            } else {
                "warn"
            };
            (level.to_string(), line.to_string())
        }
    }
}

/// Re-logs and forwards stderr; returns the last error line.
async fn read_stderr(
    err: tokio::process::ChildStderr,
    rank: v1::RankRef,
    reports: Arc<ReportQueue>,
) -> Option<String> {
    let mut last_error = None::<String>;
    let mut lines = BufReader::new(err).lines();
    let mut infos = 0u64;
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        let (level, text) = parse_log_line(&line);
        let forward = match level.as_str() {
            "error" => {
                tracing::error!(from = "rank", "{text}");
                last_error = Some(text.clone());
                true
            }
            "warn" => {
                tracing::warn!(from = "rank", "{text}");
                true
            }
            "info" => {
                tracing::info!(from = "rank", "{text}");
                infos += 1;
                infos <= 10 || infos.is_multiple_of(INFO_SAMPLE)
            }
            _ => {
                tracing::debug!(from = "rank", "{text}");
                false
            }
        };
        if forward {
            reports.push(v1::RankReport {
                rank: Some(rank.clone()),
                report: Some(v1::rank_report::Report::Log(v1::LogLine {
                    unix_ms: now_ms(),
                    level,
                    message: text,
                })),
            });
        }
    }
    last_error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_and_exits_are_described() {
        let (level, text) = parse_log_line(
            r#"{"timestamp":"t","level":"WARN","fields":{"message":"slow","step":3},"target":"x"}"#,
        );
        assert_eq!((level.as_str(), text.as_str()), ("warn", "slow step=3"));
        let (level, text) = parse_log_line("error: corpus missing");
        assert_eq!(
            (level.as_str(), text.as_str()),
            ("error", "error: corpus missing")
        );
        use std::os::unix::process::ExitStatusExt;
        let r = v1::RankRef::default();
        let ok = describe_exit(
            r.clone(),
            Ok(std::process::ExitStatus::from_raw(0)),
            None,
            None,
            None,
        );
        assert!(ok.success);
        assert_eq!(ok.failure_class, "");
        let failed = describe_exit(
            r.clone(),
            Ok(std::process::ExitStatus::from_raw(1 << 8)),
            None,
            Some("error: boom".into()),
            None,
        );
        assert!(!failed.success);
        assert_eq!(failed.message, "exit status 1: error: boom");
        assert_eq!(failed.failure_class, "unknown");
        let killed = describe_exit(
            r.clone(),
            Ok(std::process::ExitStatus::from_raw(9)),
            Some("cancel".into()),
            None,
            None,
        );
        assert!(
            killed.message.contains("signal 9") && killed.message.contains("cancel"),
            "{}",
            killed.message
        );
        assert_eq!(killed.failure_class, "stopped");
        // The class the rank printed wins; an orphaned rank lost its worker.
        let nan = describe_exit(
            r.clone(),
            Ok(std::process::ExitStatus::from_raw(1 << 8)),
            None,
            Some("error: input `loss`: is NaN".into()),
            Some(FailureClass::NonFiniteLoss),
        );
        assert_eq!(nan.failure_class, "non_finite_loss");
        let orphan = describe_exit(
            r,
            Ok(std::process::ExitStatus::from_raw(
                super::super::rank::EXIT_ORPHANED << 8,
            )),
            None,
            None,
            None,
        );
        assert_eq!(orphan.failure_class, "worker_lost");
    }
}
