//! The agent's Prometheus metrics (`/metrics`, text format, and `/healthz`). Names are a contract
//! with the dashboard in `deploy/`: `endofm_worker_ranks_running`, `endofm_step_seconds`,
//! `endofm_samples_per_second`, `endofm_data_wait_seconds`, `endofm_allreduce_seconds_total`,
//! `endofm_allreduce_bytes_total`, `endofm_loss`, `endofm_learning_rate`,
//! `endofm_device_memory_bytes{device}`, `endofm_steps_total`; pre-training's collapse
//! diagnostics `endofm_teacher_entropy`, `endofm_batch_mean_entropy`,
//! `endofm_student_teacher_kl` and `endofm_collapse{kind}`; per-rank series carry `job` and
//! `rank` labels. Fed from the ranks' progress lines and the agent's process sampler.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::protocol::ProgressLine;
use crate::{Error, Result};

/// Labels of a per-rank series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RankLabels {
    /// Job id.
    pub job: String,
    /// Rank in the attempt.
    pub rank: String,
}

/// Labels of a per-device series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    /// `cpu:0`, `cuda:1`.
    pub device: String,
}

/// A family with per-rank series.
trait ForgetRank {
    /// Drops the series of these labels.
    fn forget(&self, labels: &RankLabels);
}

impl<M, C: Fn() -> M> ForgetRank for Family<RankLabels, M, C> {
    fn forget(&self, labels: &RankLabels) {
        self.remove(labels);
    }
}

type FloatGauge = Gauge<f64, AtomicU64>;
type FloatCounter = Counter<f64, AtomicU64>;
type HistogramFamily = Family<RankLabels, Histogram, fn() -> Histogram>;

fn step_histogram() -> Histogram {
    // 10 ms .. ~5.5 min.
    Histogram::new(exponential_buckets(0.01, 2.0, 16))
}

/// Every metric of the agent.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Rank processes alive.
    pub ranks_running: Gauge,
    step_seconds: HistogramFamily,
    samples_per_second: Family<RankLabels, FloatGauge>,
    data_wait_seconds: Family<RankLabels, FloatGauge>,
    allreduce_seconds: Family<RankLabels, FloatCounter>,
    allreduce_bytes: Family<RankLabels, Counter>,
    loss: Family<RankLabels, FloatGauge>,
    learning_rate: Family<RankLabels, FloatGauge>,
    device_memory: Family<DeviceLabels, Gauge>,
    steps: Family<RankLabels, Counter>,
    teacher_entropy: Family<RankLabels, FloatGauge>,
    batch_entropy: Family<RankLabels, FloatGauge>,
    kl: Family<RankLabels, FloatGauge>,
    collapse: Family<CollapseLabels, Gauge>,
}

/// Labels of the collapse indicator: a rank's series per kind.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CollapseLabels {
    /// Job id.
    pub job: String,
    /// Rank in the attempt.
    pub rank: String,
    /// `uniform` or `dominant_prototype`.
    pub kind: String,
}

/// The kinds of collapse `endofm_collapse` reports.
const COLLAPSE_KINDS: [&str; 2] = ["uniform", "dominant_prototype"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let ranks_running = Gauge::default();
        registry.register(
            "endofm_worker_ranks_running",
            "Rank processes running on this worker",
            ranks_running.clone(),
        );
        let step_seconds: HistogramFamily = Family::new_with_constructor(step_histogram);
        registry.register(
            "endofm_step_seconds",
            "Seconds per training step",
            step_seconds.clone(),
        );
        let samples_per_second = Family::default();
        registry.register(
            "endofm_samples_per_second",
            "Clips per second over all ranks at the last step",
            samples_per_second.clone(),
        );
        let data_wait_seconds = Family::default();
        registry.register(
            "endofm_data_wait_seconds",
            "Seconds the last step waited for data",
            data_wait_seconds.clone(),
        );
        // Counters get their `_total` suffix from the encoder.
        let allreduce_seconds = Family::default();
        registry.register(
            "endofm_allreduce_seconds",
            "Seconds spent in all-reduce",
            allreduce_seconds.clone(),
        );
        let allreduce_bytes = Family::default();
        registry.register(
            "endofm_allreduce_bytes",
            "Bytes all-reduced",
            allreduce_bytes.clone(),
        );
        let loss = Family::default();
        registry.register("endofm_loss", "Loss at the last step", loss.clone());
        let learning_rate = Family::default();
        registry.register(
            "endofm_learning_rate",
            "Learning rate at the last step",
            learning_rate.clone(),
        );
        let device_memory = Family::default();
        registry.register(
            "endofm_device_memory_bytes",
            "Memory used by the rank processes on each device (resident set size for CPU slots)",
            device_memory.clone(),
        );
        let steps = Family::default();
        registry.register("endofm_steps", "Training steps completed", steps.clone());
        let teacher_entropy = Family::default();
        registry.register(
            "endofm_teacher_entropy",
            "Pre-training: mean entropy of the centred, sharpened teacher distribution at the last step (nats; ln K when uniform)",
            teacher_entropy.clone(),
        );
        let batch_entropy = Family::default();
        registry.register(
            "endofm_batch_mean_entropy",
            "Pre-training: entropy of the batch mean of the teacher distribution at the last step (nats; near 0 when one prototype dominates)",
            batch_entropy.clone(),
        );
        let kl = Family::default();
        registry.register(
            "endofm_student_teacher_kl",
            "Pre-training: student-teacher KL at the last step (nats)",
            kl.clone(),
        );
        let collapse = Family::default();
        registry.register(
            "endofm_collapse",
            "Pre-training: 1 while a collapse of this kind has been sustained (uniform, dominant_prototype)",
            collapse.clone(),
        );
        Self {
            registry,
            ranks_running,
            step_seconds,
            samples_per_second,
            data_wait_seconds,
            allreduce_seconds,
            allreduce_bytes,
            loss,
            learning_rate,
            device_memory,
            steps,
            teacher_entropy,
            batch_entropy,
            kl,
            collapse,
        }
    }

    /// Feeds one progress line of `rank` of `job`.
    pub fn observe(&self, job: &str, rank: u32, p: &ProgressLine) {
        let labels = RankLabels {
            job: job.to_string(),
            rank: rank.to_string(),
        };
        if p.step_s.is_finite() {
            self.step_seconds.get_or_create(&labels).observe(p.step_s);
        }
        self.samples_per_second
            .get_or_create(&labels)
            .set(p.samples_per_s);
        self.data_wait_seconds
            .get_or_create(&labels)
            .set(p.data_wait_s);
        if p.allreduce_s.is_finite() && p.allreduce_s > 0.0 {
            self.allreduce_seconds
                .get_or_create(&labels)
                .inc_by(p.allreduce_s);
        }
        self.allreduce_bytes
            .get_or_create(&labels)
            .inc_by(p.allreduce_bytes);
        self.loss.get_or_create(&labels).set(p.loss);
        self.learning_rate.get_or_create(&labels).set(p.lr);
        self.steps.get_or_create(&labels).inc();
        // Pre-training's collapse diagnostics (NaN from tasks without them: no series).
        if p.teacher_entropy.is_finite() {
            self.teacher_entropy
                .get_or_create(&labels)
                .set(p.teacher_entropy);
            self.batch_entropy
                .get_or_create(&labels)
                .set(p.batch_entropy);
            self.kl.get_or_create(&labels).set(p.kl);
            for kind in COLLAPSE_KINDS {
                self.collapse
                    .get_or_create(&CollapseLabels {
                        job: labels.job.clone(),
                        rank: labels.rank.clone(),
                        kind: kind.to_string(),
                    })
                    .set(i64::from(p.collapse == kind));
            }
        }
    }

    /// Removes every series of `rank` of `job` (called when the rank process exits): per-job
    /// series never outlive their rank, so the exposition does not grow with past jobs and sums
    /// over it count only live work. A later rank of the same job starts its series afresh.
    pub fn forget(&self, job: &str, rank: u32) {
        let labels = RankLabels {
            job: job.to_string(),
            rank: rank.to_string(),
        };
        let families: [&dyn ForgetRank; 11] = [
            &self.step_seconds,
            &self.samples_per_second,
            &self.data_wait_seconds,
            &self.allreduce_seconds,
            &self.allreduce_bytes,
            &self.loss,
            &self.learning_rate,
            &self.steps,
            &self.teacher_entropy,
            &self.batch_entropy,
            &self.kl,
        ];
        for family in families {
            family.forget(&labels);
        }
        for kind in COLLAPSE_KINDS {
            self.collapse.remove(&CollapseLabels {
                job: labels.job.clone(),
                rank: labels.rank.clone(),
                kind: kind.to_string(),
            });
        }
    }

    /// Sets the memory used on `device`.
    pub fn set_device_memory(&self, device: &str, bytes: u64) {
        self.device_memory
            .get_or_create(&DeviceLabels {
                device: device.to_string(),
            })
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        endofm_shared::prom_text::from_openmetrics(&text)
    }
}

/// Serves `/metrics` and `/healthz` on `addr` until the process ends; the bind happens before
/// returning, so a taken port is an error at start.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Service {
            what: format!("--metrics-listen {addr}"),
            reason: e.to_string(),
        })?;
    let bound = listener.local_addr().map_err(|e| Error::Service {
        what: format!("--metrics-listen {addr}"),
        reason: e.to_string(),
    })?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = Arc::clone(&metrics);
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            endofm_shared::prom_text::CONTENT_TYPE,
                        )],
                        metrics.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}

/// Resident set size of process `pid` (bytes), from `/proc`.
pub fn process_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// GPU memory used per process id, from `nvidia-smi` (empty when it is not available).
pub fn gpu_memory_by_pid() -> std::collections::HashMap<u32, u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .output();
    let mut map = std::collections::HashMap::new();
    if let Ok(out) = out
        && out.status.success()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut parts = line.split(',').map(str::trim);
            if let (Some(Ok(pid)), Some(Ok(mib))) = (
                parts.next().map(str::parse::<u32>),
                parts.next().map(str::parse::<u64>),
            ) {
                *map.entry(pid).or_default() += mib * 1024 * 1024;
            }
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering_contains_every_name() {
        let m = Metrics::new();
        m.ranks_running.set(2);
        let p = ProgressLine {
            step: 1,
            total_steps: 3,
            loss: 5.5,
            lr: 0.01,
            step_s: 0.3,
            samples_per_s: 4.0,
            data_wait_s: 0.01,
            allreduce_s: 0.02,
            allreduce_bytes: 4096,
            ..Default::default()
        };
        m.observe("job-1", 0, &p);
        m.observe("job-1", 0, &p);
        m.set_device_memory("cpu:0", 1 << 20);
        let text = m.render();
        for name in [
            "endofm_worker_ranks_running 2",
            "endofm_step_seconds_bucket{",
            "endofm_step_seconds_count{job=\"job-1\",rank=\"0\"} 2",
            "endofm_samples_per_second{",
            "endofm_data_wait_seconds{",
            "endofm_allreduce_seconds_total{",
            "endofm_allreduce_bytes_total{job=\"job-1\",rank=\"0\"} 8192",
            "endofm_loss{job=\"job-1\",rank=\"0\"} 5.5",
            "endofm_learning_rate{",
            "endofm_device_memory_bytes{device=\"cpu:0\"} 1048576",
            "endofm_steps_total{job=\"job-1\",rank=\"0\"} 2",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        assert!(process_rss(std::process::id()).is_some_and(|b| b > 0));
    }

    #[test]
    fn collapse_diagnostics_are_exported_for_pretraining_ranks_only() {
        let m = Metrics::new();
        let finetune = ProgressLine {
            teacher_entropy: f64::NAN,
            batch_entropy: f64::NAN,
            kl: f64::NAN,
            ..Default::default()
        };
        m.observe("job-2", 0, &finetune);
        let text = m.render();
        assert!(!text.contains("endofm_teacher_entropy{"), "{text}");
        let p = ProgressLine {
            teacher_entropy: 6.2,
            batch_entropy: 6.21,
            kl: 0.5,
            collapse: "uniform".into(),
            ..Default::default()
        };
        m.observe("job-1", 1, &p);
        let text = m.render();
        for line in [
            "endofm_teacher_entropy{job=\"job-1\",rank=\"1\"} 6.2",
            "endofm_batch_mean_entropy{job=\"job-1\",rank=\"1\"} 6.21",
            "endofm_student_teacher_kl{job=\"job-1\",rank=\"1\"} 0.5",
            "endofm_collapse{job=\"job-1\",rank=\"1\",kind=\"uniform\"} 1",
            "endofm_collapse{job=\"job-1\",rank=\"1\",kind=\"dominant_prototype\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    /// Issue 11 item 10: a job's series disappear when its rank exits; other jobs' stay.
    #[test]
    fn a_ranks_series_are_removed_when_it_exits() {
        let m = Metrics::new();
        let p = ProgressLine {
            step: 1,
            total_steps: 3,
            loss: 5.5,
            lr: 0.01,
            step_s: 0.3,
            samples_per_s: 4.0,
            data_wait_s: 0.01,
            allreduce_s: 0.02,
            allreduce_bytes: 4096,
            teacher_entropy: 6.2,
            batch_entropy: 6.2,
            kl: 0.1,
            collapse: "uniform".into(),
            ..Default::default()
        };
        m.observe("job-1", 1, &p);
        m.observe("job-2", 0, &p);
        m.set_device_memory("cpu:0", 1 << 20);
        assert!(
            m.render()
                .contains("endofm_learning_rate{job=\"job-1\",rank=\"1\"}")
        );
        m.forget("job-1", 1);
        let text = m.render();
        let left: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("job=\"job-1\""))
            .collect();
        assert!(left.is_empty(), "series of an exited rank remain: {left:?}");
        assert!(
            text.contains("endofm_loss{job=\"job-2\",rank=\"0\"} 5.5"),
            "{text}"
        );
        assert!(text.contains("endofm_device_memory_bytes{device=\"cpu:0\"}"));
        // A new rank of the job starts from zero.
        m.observe("job-1", 1, &p);
        assert!(
            m.render()
                .contains("endofm_steps_total{job=\"job-1\",rank=\"1\"} 1")
        );
    }
}
