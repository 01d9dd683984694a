//! The worker agent (`endofm-worker agent`): one per node. Registers its device slots with the
//! coordinator, heartbeats at the interval the coordinator gives, starts one rank process per
//! assignment (`ranks`), stops ranks when told, and reports every rank exit until a heartbeat
//! carrying it succeeded (the coordinator frees a slot only then). An unreachable coordinator
//! never stops running ranks: the agent keeps retrying and re-registers, with its id and running
//! ranks, when told. Progress, checkpoints, results and log lines go out as best-effort reports
//! (`reports`), flushed before a heartbeat carries exits so that a rank's last checkpoint and
//! result reach the coordinator before its exit; `/metrics` serves Prometheus metrics
//! (`metrics`).
//!
//! Submodules: `devices` (`--devices`), `client` (gRPC client + token), `protocol` (assignment
//! file, rank stdout lines), `ranks` (child processes), `reports` (bounded report queue),
//! `metrics`, `rank` (the rank process itself).

pub mod client;
pub mod devices;
pub mod failure;
pub mod metrics;
pub mod protocol;
pub mod rank;
pub mod ranks;
pub mod reports;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use endofm_proto::v1;
use endofm_shared::JobSpec;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use self::client::Client;
use self::devices::DeviceSlot;
use self::metrics::Metrics;
use self::ranks::{LaunchConfig, Ranks};
use self::reports::ReportQueue;
use crate::{Error, Result};

/// Reports kept while the coordinator is unreachable.
const REPORT_QUEUE: usize = 20_000;
/// Heartbeat interval until the coordinator says otherwise.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// Deadline of one register or heartbeat call: a coordinator that stalls (SIGSTOP, a frozen VM)
/// must not stall the agent, which still has exits to take and stop orders to carry out.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// `rpc` with [`CALL_TIMEOUT`]: a call that gets no answer in time fails with
/// DEADLINE_EXCEEDED (and is retried like any failed call).
async fn call<T>(
    rpc: impl std::future::Future<Output = std::result::Result<T, tonic::Status>>,
) -> std::result::Result<T, tonic::Status> {
    tokio::time::timeout(CALL_TIMEOUT, rpc)
        .await
        .unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded(format!(
                "no answer within {} s",
                CALL_TIMEOUT.as_secs()
            )))
        })
}

/// Heartbeats that hold exits back while the reports before them cannot be sent; after that the
/// exits go anyway (reports are best effort, a slot must not stay busy).
const EXIT_HOLDS: u32 = 3;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The coordinator's URL (`http://host:port`).
    pub coordinator: String,
    /// Slots offered.
    pub devices: Vec<DeviceSlot>,
    /// Where `/metrics` is served (none: not served).
    pub metrics_listen: Option<SocketAddr>,
    /// Host the ranks' ring listeners bind to and advertise.
    pub advertise_host: String,
    /// Keeps the worker id across agent restarts.
    pub state_file: Option<PathBuf>,
    /// SIGTERM → SIGKILL.
    pub stop_grace: Duration,
    /// libtorch threads per rank when the spec does not say.
    pub threads_per_rank: Option<usize>,
    /// The worker binary started for every rank.
    pub exe: PathBuf,
}

/// libtorch threads for a rank: the spec's, else the agent's flag, else the cores shared out.
pub fn threads_for(spec: Option<usize>, flag: Option<usize>, cores: usize, slots: usize) -> usize {
    spec.or(flag).unwrap_or(cores / slots.max(1)).max(1)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

fn read_state(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn write_state(path: &Option<PathBuf>, id: &str) {
    if let Some(p) = path {
        let tmp = p.with_extension("tmp");
        let written = std::fs::write(&tmp, id).and_then(|_| std::fs::rename(&tmp, p));
        if let Err(e) = written {
            tracing::warn!(path = %p.display(), error = %e, "cannot save the worker id");
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT (which stops its ranks gracefully first).
pub fn run(cfg: AgentConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Service {
            what: "starting the agent runtime".into(),
            reason: e.to_string(),
        })?;
    rt.block_on(serve(cfg))
}

struct Agent {
    cfg: AgentConfig,
    client: Client,
    ranks: Ranks,
    worker_id: String,
    id_tx: watch::Sender<String>,
    registered: bool,
    interval: Duration,
    /// Exits not yet carried by a successful heartbeat.
    pending_exits: Vec<v1::RankExit>,
    /// The ranks' reports (flushed before exits go out).
    reports: Arc<ReportQueue>,
    /// Heartbeats in a row that held exits back because the reports could not be flushed.
    exit_holds: u32,
    failures: u32,
    cores: usize,
}

impl Agent {
    async fn register(&mut self) -> bool {
        let req = v1::RegisterRequest {
            worker_id: self.worker_id.clone(),
            hostname: hostname(),
            devices: self.cfg.devices.iter().map(DeviceSlot::to_proto).collect(),
            running: self.ranks.refs(),
            labels: [(
                "advertise_host".to_string(),
                self.cfg.advertise_host.clone(),
            )]
            .into_iter()
            .collect(),
        };
        // A first registration is not cut short: repeating it would register a second worker.
        let answer = if self.worker_id.is_empty() {
            self.client.register(req).await
        } else {
            call(self.client.register(req)).await
        };
        match answer {
            Ok(resp) => {
                let resp = resp.into_inner();
                if !self.worker_id.is_empty() && resp.worker_id != self.worker_id {
                    tracing::warn!(old = %self.worker_id, new = %resp.worker_id, "the coordinator gave this worker a new id");
                }
                self.worker_id = resp.worker_id;
                write_state(&self.cfg.state_file, &self.worker_id);
                let _ = self.id_tx.send(self.worker_id.clone());
                if resp.heartbeat_interval_ms > 0 {
                    self.interval = Duration::from_millis(u64::from(resp.heartbeat_interval_ms));
                }
                self.registered = true;
                self.failures = 0;
                tracing::info!(worker_id = %self.worker_id, interval_ms = self.interval.as_millis() as u64, lease_ms = resp.lease_ms, running = self.ranks.len(), "registered");
                true
            }
            Err(s) => {
                self.failed("register", &s);
                false
            }
        }
    }

    fn failed(&mut self, call: &str, s: &tonic::Status) {
        self.failures += 1;
        if self.failures == 1 || self.failures.is_power_of_two() {
            tracing::warn!(call, code = ?s.code(), status = %s.message(), failures = self.failures, running = self.ranks.len(), "coordinator call failed; retrying");
        }
    }

    /// Time to the next call: the interval, or a capped backoff while calls fail.
    fn next_delay(&self) -> Duration {
        if self.failures == 0 {
            return self.interval;
        }
        let backoff = Duration::from_millis(250) * 2u32.saturating_pow(self.failures.min(6));
        backoff.min(self.interval.max(Duration::from_secs(5)))
    }

    /// Whether the pending exits may go out: the reports queued before them (a final
    /// checkpoint, a result) were sent first, or holding them any longer would keep the
    /// coordinator waiting for nothing.
    async fn reports_before_exits(&mut self) -> bool {
        if self.pending_exits.is_empty() {
            return true;
        }
        match self.reports.flush(&mut self.client, &self.worker_id).await {
            Ok(()) => {
                self.exit_holds = 0;
                true
            }
            Err(s) => {
                self.exit_holds += 1;
                let release = self.exit_holds > EXIT_HOLDS;
                tracing::warn!(code = ?s.code(), status = %s.message(), holds = self.exit_holds, release, "reports before rank exits could not be sent");
                if release {
                    self.exit_holds = 0;
                }
                release
            }
        }
    }

    async fn heartbeat(&mut self) {
        let exits = if self.reports_before_exits().await {
            self.pending_exits.clone()
        } else {
            Vec::new()
        };
        let sent = exits.len();
        let req = v1::HeartbeatRequest {
            worker_id: self.worker_id.clone(),
            running: self.ranks.refs(),
            exited: exits,
        };
        let resp = match call(self.client.heartbeat(req)).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                self.failed("heartbeat", &s);
                return;
            }
        };
        self.failures = 0;
        self.pending_exits.drain(..sent);
        if resp.reregister {
            tracing::info!("coordinator asked to register again");
            self.registered = false;
            if !self.register().await {
                return;
            }
        }
        for a in &resp.assignments {
            self.start(a);
        }
        for s in &resp.stop {
            if let Some(r) = &s.rank {
                tracing::info!(job = %r.job_id, generation = r.generation, rank = r.rank, reason = %s.reason, "stop order");
                self.ranks.stop(r, &s.reason);
            }
        }
    }

    fn start(&mut self, a: &v1::Assignment) {
        let slot = self
            .cfg
            .devices
            .iter()
            .find(|d| d.kind.name() == a.device_kind && d.index == a.device_index)
            .copied();
        if slot.is_none() {
            tracing::warn!(kind = %a.device_kind, index = a.device_index, "assignment names a device this worker did not register");
        }
        let spec_threads = JobSpec::from_json(&a.spec_json)
            .ok()
            .and_then(|s| s.resources.threads_per_rank);
        let threads = threads_for(
            spec_threads,
            self.cfg.threads_per_rank,
            self.cores,
            self.cfg.devices.len(),
        );
        self.ranks.start(a, slot, threads);
    }
}

async fn sample_memory(metrics: Arc<Metrics>, procs: Vec<(u32, String)>, devices: Vec<DeviceSlot>) {
    let gpu = if procs.iter().any(|(_, d)| d.starts_with("cuda")) {
        tokio::task::spawn_blocking(metrics::gpu_memory_by_pid)
            .await
            .unwrap_or_default()
    } else {
        Default::default()
    };
    for slot in devices {
        let label = slot.label();
        let bytes: u64 = procs
            .iter()
            .filter(|(_, d)| *d == label)
            .map(|(pid, _)| match slot.kind {
                endofm_shared::DeviceKind::Cpu => metrics::process_rss(*pid).unwrap_or(0),
                endofm_shared::DeviceKind::Cuda => gpu.get(pid).copied().unwrap_or(0),
            })
            .sum();
        metrics.set_device_memory(&label, bytes);
    }
}

async fn serve(cfg: AgentConfig) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    if let Some(addr) = cfg.metrics_listen {
        let bound = metrics::serve(addr, Arc::clone(&metrics)).await?;
        tracing::info!(%bound, "serving /metrics");
    }
    let client = client::connect(&cfg.coordinator)?;
    let queue = Arc::new(ReportQueue::new(REPORT_QUEUE));
    let (id_tx, id_rx) = watch::channel(String::new());
    tokio::spawn(reports::send_loop(
        client.clone(),
        Arc::clone(&queue),
        id_rx,
        Duration::from_millis(500),
    ));
    let (exit_tx, mut exit_rx) = mpsc::unbounded_channel();
    let launch = LaunchConfig {
        exe: cfg.exe.clone(),
        coordinator: cfg.coordinator.clone(),
        advertise_host: cfg.advertise_host.clone(),
        stop_grace: cfg.stop_grace,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut agent = Agent {
        worker_id: read_state(&cfg.state_file),
        ranks: Ranks::new(launch, exit_tx, Arc::clone(&queue), Arc::clone(&metrics)),
        reports: queue,
        exit_holds: 0,
        cfg,
        client,
        id_tx,
        registered: false,
        interval: DEFAULT_INTERVAL,
        pending_exits: Vec::new(),
        failures: 0,
        cores,
    };
    tracing::info!(coordinator = %agent.cfg.coordinator, devices = ?agent.cfg.devices.iter().map(DeviceSlot::label).collect::<Vec<_>>(), "agent starting");
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Service {
        what: "installing the SIGTERM handler".into(),
        reason: e.to_string(),
    })?;
    let mut next = Instant::now();
    let mut next_sample = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                if agent.registered {
                    agent.heartbeat().await;
                } else {
                    agent.register().await;
                }
                next = Instant::now() + agent.next_delay();
                if Instant::now() >= next_sample {
                    next_sample = Instant::now() + Duration::from_secs(5);
                    tokio::spawn(sample_memory(Arc::clone(&metrics), agent.ranks.processes(), agent.cfg.devices.clone()));
                }
            }
            Some(exit) = exit_rx.recv() => {
                if let Some(r) = &exit.rank {
                    agent.ranks.exited(r);
                }
                agent.pending_exits.push(exit);
                // Tell the coordinator soon: the slot is free and the attempt may need action.
                next = next.min(Instant::now() + Duration::from_millis(50));
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    tracing::info!(
        running = agent.ranks.len(),
        "agent stopping: stopping its ranks"
    );
    agent.ranks.stop_all("agent shutting down");
    let deadline = Instant::now() + agent.cfg.stop_grace + Duration::from_secs(5);
    while !agent.ranks.is_empty() {
        match tokio::time::timeout_at(deadline, exit_rx.recv()).await {
            Ok(Some(exit)) => {
                if let Some(r) = &exit.rank {
                    agent.ranks.exited(r);
                }
                agent.pending_exits.push(exit);
            }
            _ => break,
        }
    }
    if agent.registered && !agent.pending_exits.is_empty() {
        // The last chance: the exits go even if the reports before them cannot.
        agent.exit_holds = EXIT_HOLDS;
        agent.heartbeat().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_come_from_spec_then_flag_then_cores() {
        assert_eq!(threads_for(Some(3), Some(2), 16, 2), 3);
        assert_eq!(threads_for(None, Some(2), 16, 2), 2);
        assert_eq!(threads_for(None, None, 16, 3), 5);
        assert_eq!(threads_for(None, None, 2, 4), 1);
    }
}
