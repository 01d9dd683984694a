//! The gRPC side of the coordinator: the `Jobs` and `Workers` services of `endofm.v1` over the
//! state machine, gRPC health and reflection, bearer-token checks, the group-commit flusher
//! that makes every change durable before it is acknowledged, the lease timer, and the metrics
//! endpoint.
//!
//! Invariants: an RPC that changed state answers only after the store has committed that
//! change (or fails with UNAVAILABLE), so a `kill -9` never loses anything a caller saw. The
//! flusher acknowledges an epoch only after a commit of everything up to it returned `Ok`: it
//! keeps each batch until then and puts it back on any failure, a panic of the writer included.
//! Every task the server starts (flusher, lease timer, metrics endpoint, watch streams) stops
//! and is joined on shutdown: streams end first (so the gRPC server can stop), the flusher
//! writes what is left last.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use endofm_proto::v1 as pb;
use endofm_proto::v1::jobs_server::{Jobs, JobsServer};
use endofm_proto::v1::workers_server::{Workers, WorkersServer};
use endofm_shared::JobSpec;
use endofm_shared::text::echo;
use futures::Stream;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

use crate::core::{Core, Refusal, SubmitRefusal, Timing};
use crate::metrics::{self, Metrics};
use crate::records::State;
use crate::store::{Batch, Store};
use crate::{Error, Result};

/// Largest request accepted (a job spec, a batch of reports).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Longest worker id a worker may register with (bytes).
const MAX_WORKER_ID: usize = 128;
/// Most device slots one worker may offer.
const MAX_DEVICES: usize = 4096;
/// How long an RPC waits for its changes to become durable.
const COMMIT_WAIT: Duration = Duration::from_secs(30);
/// Pause after a failed commit before the batch is written again.
const COMMIT_RETRY: Duration = Duration::from_millis(500);
/// How long shutdown waits for each task to finish.
const JOIN_WAIT: Duration = Duration::from_secs(10);

/// How to run a coordinator.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// gRPC address (port 0: any free port).
    pub listen: SocketAddr,
    /// Metrics address (none: no metrics endpoint).
    pub metrics_listen: Option<SocketAddr>,
    /// State directory (the store lives there).
    pub state: PathBuf,
    /// Heartbeat and lease timing.
    pub timing: Timing,
    /// Bearer token users must present (Jobs service), if any.
    pub user_token: Option<String>,
    /// Bearer token workers must present (Workers service), if any.
    pub worker_token: Option<String>,
    /// Folders local paths in job specs must stay inside (empty: no limit).
    pub local_roots: Vec<PathBuf>,
    /// Serve gRPC over TLS with this certificate chain and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Let queued jobs preempt lower-priority running ones.
    pub preemption: bool,
}

/// Addresses actually bound.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// gRPC.
    pub grpc: SocketAddr,
    /// Metrics, if served.
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug)]
struct Shared {
    core: Arc<Mutex<Core>>,
    local_roots: Vec<PathBuf>,
    kick: Arc<Notify>,
    flushed: watch::Receiver<u64>,
    metrics: Metrics,
    /// Turns true when the server shuts down: watch streams end.
    stopping: watch::Receiver<bool>,
    /// The watch streams' tasks, joined on shutdown.
    watchers: Mutex<JoinSet<()>>,
}

struct RpcTimer<'a> {
    metrics: &'a Metrics,
    method: &'static str,
    started: Instant,
}

impl Drop for RpcTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .observe_rpc(self.method, self.started.elapsed().as_secs_f64());
    }
}

impl Shared {
    fn lock(&self) -> std::result::Result<MutexGuard<'_, Core>, Status> {
        self.core
            .lock()
            .map_err(|_| Status::internal("coordinator state lock poisoned"))
    }

    /// Starts a watch stream's task (finished ones are reaped here, so the set stays small).
    fn spawn_watcher(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut set = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        while set.try_join_next().is_some() {}
        set.spawn(task);
    }

    fn timer(&self, method: &'static str) -> RpcTimer<'_> {
        RpcTimer {
            metrics: &self.metrics,
            method,
            started: Instant::now(),
        }
    }

    /// Waits until the store holds every change up to `epoch`.
    async fn durable(&self, epoch: u64) -> std::result::Result<(), Status> {
        let mut rx = self.flushed.clone();
        if *rx.borrow() >= epoch {
            return Ok(());
        }
        self.kick.notify_one();
        match tokio::time::timeout(COMMIT_WAIT, rx.wait_for(|v| *v >= epoch)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Status::unavailable(
                "the coordinator could not make the change durable (state store failing); retry",
            )),
        }
    }
}

fn refusal(r: Refusal) -> Status {
    match r {
        Refusal::NotFound(m) => Status::not_found(m),
        Refusal::Stale(m) => Status::failed_precondition(m),
    }
}

#[derive(Debug, Clone)]
struct JobsSvc(Arc<Shared>);

#[derive(Debug, Clone)]
struct WorkersSvc(Arc<Shared>);

type UpdateStream = Pin<Box<dyn Stream<Item = std::result::Result<pb::JobUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Jobs for JobsSvc {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> std::result::Result<Response<pb::Job>, Status> {
        let _t = self.0.timer("SubmitJob");
        let req = req.into_inner();
        let parsed = match pb::SpecFormat::try_from(req.format).unwrap_or(pb::SpecFormat::Auto) {
            pb::SpecFormat::Toml => JobSpec::from_toml(&req.spec),
            pb::SpecFormat::Json => JobSpec::from_json(&req.spec),
            pb::SpecFormat::Auto => JobSpec::parse_auto(&req.spec),
        };
        let spec = parsed
            .and_then(|spec| spec.check_local_roots(&self.0.local_roots).map(|()| spec))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (job, epoch) = {
            let mut core = self.0.lock()?;
            let job = core.submit(spec, Instant::now()).map_err(|e| match e {
                SubmitRefusal::Invalid(e) => Status::invalid_argument(e.to_string()),
                SubmitRefusal::Conflict(e) => Status::failed_precondition(e.to_string()),
            })?;
            (job.to_pb(), core.epoch())
        };
        self.0.durable(epoch).await?;
        tracing::info!(job = %job.id, name = %job.name, "job submitted");
        Ok(Response::new(job))
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> std::result::Result<Response<pb::Job>, Status> {
        let _t = self.0.timer("GetJob");
        let id = req.into_inner().id;
        let core = self.0.lock()?;
        core.job(&id)
            .map(|j| Response::new(j.to_pb()))
            .ok_or_else(|| Status::not_found(format!("no job `{}`", echo(&id))))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> std::result::Result<Response<pb::ListJobsResponse>, Status> {
        let _t = self.0.timer("ListJobs");
        let states: Vec<State> = req
            .into_inner()
            .states
            .into_iter()
            .filter_map(|s| pb::JobState::try_from(s).ok().and_then(State::from_pb))
            .collect();
        let core = self.0.lock()?;
        let jobs = core.list(&states).into_iter().map(|j| j.to_pb()).collect();
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> std::result::Result<Response<pb::Job>, Status> {
        let _t = self.0.timer("CancelJob");
        let req = req.into_inner();
        let (job, epoch) = {
            let mut core = self.0.lock()?;
            let job = core
                .cancel(&req.id, &req.reason, Instant::now())
                .ok_or_else(|| Status::not_found(format!("no job `{}`", echo(&req.id))))?;
            (job.to_pb(), core.epoch())
        };
        self.0.durable(epoch).await?;
        Ok(Response::new(job))
    }

    type WatchJobStream = UpdateStream;

    async fn watch_job(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> std::result::Result<Response<Self::WatchJobStream>, Status> {
        let _t = self.0.timer("WatchJob");
        let req = req.into_inner();
        let (mut updates, history, job) = {
            let mut core = self.0.lock()?;
            let job = core
                .job(&req.id)
                .map(|j| j.to_pb())
                .ok_or_else(|| Status::not_found(format!("no job `{}`", echo(&req.id))))?;
            let updates = core.subscribe(&req.id);
            (updates, core.events_after(&req.id, req.after_seq), job)
        };
        let (tx, rx) = mpsc::channel(256);
        let mut stopping = self.0.stopping.clone();
        self.0.spawn_watcher(async move {
            let final_now = pb::JobState::try_from(job.state).is_ok_and(|s| s.is_final());
            let send = |u: pb::job_update::Update| pb::JobUpdate { update: Some(u) };
            if tx
                .send(Ok(send(pb::job_update::Update::Job(job))))
                .await
                .is_err()
            {
                return;
            }
            let mut last_seq = req.after_seq;
            for e in history {
                last_seq = e.seq;
                if tx
                    .send(Ok(send(pb::job_update::Update::Event(e.to_pb()))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if !req.follow || final_now {
                return;
            }
            loop {
                let received = tokio::select! {
                    r = updates.recv() => Some(r),
                    _ = stopping.wait_for(|s| *s) => None,
                };
                let Some(received) = received else {
                    // The client reconnects (`endofm logs --follow` follows restarts).
                    let _ = tx
                        .send(Err(Status::unavailable("the coordinator is shutting down")))
                        .await;
                    return;
                };
                match received {
                    Ok(update) => {
                        let mut done = false;
                        match &update.update {
                            Some(pb::job_update::Update::Event(e)) => {
                                if e.seq <= last_seq {
                                    continue;
                                }
                                last_seq = e.seq;
                            }
                            Some(pb::job_update::Update::Job(j)) => {
                                done = pb::JobState::try_from(j.state).is_ok_and(|s| s.is_final());
                            }
                            _ => {}
                        }
                        if tx.send(Ok(update)).await.is_err() || done {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(skipped = n, "a job watcher fell behind");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl Workers for WorkersSvc {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> std::result::Result<Response<pb::RegisterResponse>, Status> {
        let _t = self.0.timer("Register");
        let req = req.into_inner();
        if req.devices.is_empty() {
            return Err(Status::invalid_argument(
                "devices: a worker must offer at least one device",
            ));
        }
        if req.worker_id.len() > MAX_WORKER_ID || req.devices.len() > MAX_DEVICES {
            return Err(Status::invalid_argument(format!(
                "worker_id: at most {MAX_WORKER_ID} bytes; devices: at most {MAX_DEVICES}"
            )));
        }
        if let Some(bad) = req
            .devices
            .iter()
            .find(|d| endofm_shared::DeviceKind::parse(&d.kind).is_none())
        {
            return Err(Status::invalid_argument(format!(
                "devices.kind: `{}` is not a device kind (cpu, cuda)",
                echo(&bad.kind)
            )));
        }
        let (id, timing, epoch) = {
            let mut core = self.0.lock()?;
            let id = core.register(&req, Instant::now());
            (id, core.timing(), core.epoch())
        };
        self.0.durable(epoch).await?;
        Ok(Response::new(pb::RegisterResponse {
            worker_id: id,
            heartbeat_interval_ms: timing.heartbeat_interval.as_millis() as u32,
            lease_ms: timing.lease.as_millis() as u32,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> std::result::Result<Response<pb::HeartbeatResponse>, Status> {
        let _t = self.0.timer("Heartbeat");
        let req = req.into_inner();
        let (resp, epoch) = {
            let mut core = self.0.lock()?;
            let before = core.epoch();
            let resp = core.heartbeat(&req, Instant::now());
            let epoch = core.heartbeat_epoch(before, &resp);
            (resp, epoch)
        };
        // Assignments and state changes are handed out only once they are durable.
        self.0.durable(epoch).await?;
        Ok(Response::new(resp))
    }

    async fn report(
        &self,
        req: Request<pb::ReportRequest>,
    ) -> std::result::Result<Response<pb::ReportResponse>, Status> {
        let _t = self.0.timer("Report");
        let req = req.into_inner();
        let epoch = {
            let mut core = self.0.lock()?;
            let before = core.epoch();
            core.report(&req);
            if core.epoch() == before {
                0
            } else {
                core.epoch()
            }
        };
        self.0.durable(epoch).await?;
        Ok(Response::new(pb::ReportResponse {}))
    }

    async fn rendezvous_put(
        &self,
        req: Request<pb::RendezvousPutRequest>,
    ) -> std::result::Result<Response<pb::RendezvousPutResponse>, Status> {
        let _t = self.0.timer("RendezvousPut");
        let req = req.into_inner();
        let rank = req
            .rank
            .ok_or_else(|| Status::invalid_argument("rank: missing"))?;
        if req.key.is_empty() || req.key.len() > 256 || req.value.len() > 64 * 1024 {
            return Err(Status::invalid_argument(
                "key/value: key must be 1-256 bytes, value at most 64 KiB",
            ));
        }
        let mut core = self.0.lock()?;
        core.rendezvous_put(&rank, &req.key, req.value)
            .map_err(refusal)?;
        Ok(Response::new(pb::RendezvousPutResponse {}))
    }

    async fn rendezvous_get(
        &self,
        req: Request<pb::RendezvousGetRequest>,
    ) -> std::result::Result<Response<pb::RendezvousGetResponse>, Status> {
        let _t = self.0.timer("RendezvousGet");
        let req = req.into_inner();
        let rank = req
            .rank
            .ok_or_else(|| Status::invalid_argument("rank: missing"))?;
        let deadline = Instant::now() + Duration::from_millis(u64::from(req.wait_ms.min(60_000)));
        loop {
            let notify = {
                let mut core = self.0.lock()?;
                let (value, notify) = core.rendezvous_get(&rank, &req.key).map_err(refusal)?;
                if let Some(value) = value {
                    return Ok(Response::new(pb::RendezvousGetResponse {
                        found: true,
                        value,
                    }));
                }
                notify
            };
            let now = Instant::now();
            if now >= deadline {
                return Ok(Response::new(pb::RendezvousGetResponse {
                    found: false,
                    value: vec![],
                }));
            }
            // A put between the check and this wait is caught by the short timeout.
            let wait = (deadline - now).min(Duration::from_millis(200));
            let _ = tokio::time::timeout(wait, notify.notified()).await;
        }
    }
}

fn check_token(
    expected: Option<String>,
    other: Option<String>,
) -> impl Fn(Request<()>) -> std::result::Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let Some(expected) = &expected else {
            return Ok(req);
        };
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        match presented {
            Some(t) if t == *expected => Ok(req),
            Some(t) if other.as_deref() == Some(t.as_str()) => Err(Status::permission_denied(
                "this token may not call this service",
            )),
            Some(_) => Err(Status::unauthenticated("invalid bearer token")),
            None => Err(Status::unauthenticated(
                "missing bearer token (authorization: Bearer ...)",
            )),
        }
    }
}

/// Where the flusher writes batches: the store, or a test's stand-in that fails on purpose.
pub trait Durable: Send + Sync + 'static {
    /// Writes a batch durably; `Ok` only when all of it is.
    fn commit(&self, batch: &Batch) -> Result<()>;
}

impl Durable for Store {
    fn commit(&self, batch: &Batch) -> Result<()> {
        Store::commit(self, batch)
    }
}

/// Writes one batch off the async threads. The batch stays the flusher's: on an error or a
/// panic of the writer it is handed back with the failure, never lost.
async fn write_batch<D: Durable>(
    store: &Arc<D>,
    batch: Batch,
) -> std::result::Result<(), (Batch, String)> {
    let batch = Arc::new(batch);
    let (writer, shared) = (Arc::clone(store), Arc::clone(&batch));
    let outcome = tokio::task::spawn_blocking(move || writer.commit(&shared)).await;
    let failure = match outcome {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => format!("state store commit failed: {e}"),
        Err(e) => format!("state store writer panicked: {e}"),
    };
    let batch = Arc::try_unwrap(batch).unwrap_or_else(|shared| (*shared).clone());
    Err((batch, failure))
}

/// Writes every pending change; returns whether everything up to the epoch it read is
/// durable. `flushed` only ever moves to the epoch of a batch whose commit returned `Ok` (or of
/// an empty batch: nothing was pending, and no batch is out, since a failed one is put back
/// before the next is taken).
async fn flush_pending<D: Durable>(
    core: &Mutex<Core>,
    store: &Arc<D>,
    flushed: &watch::Sender<u64>,
) -> std::result::Result<(), String> {
    let reached = |epoch: u64| {
        flushed.send_if_modified(|v| {
            let changed = epoch > *v;
            *v = (*v).max(epoch);
            changed
        });
    };
    loop {
        let (batch, epoch) = core
            .lock()
            .map(|mut c| c.take_batch())
            .map_err(|_| "coordinator state lock poisoned".to_string())?;
        if batch.is_empty() {
            reached(epoch);
            return Ok(());
        }
        match write_batch(store, batch).await {
            Ok(()) => reached(epoch),
            Err((batch, failure)) => {
                if let Ok(mut c) = core.lock() {
                    c.restore_batch(batch);
                }
                return Err(failure);
            }
        }
    }
}

/// The group-commit flusher: writes pending changes when kicked, retrying failed commits every
/// `retry`; when `stop` turns true it writes what is left (a few tries) and returns.
async fn flusher<D: Durable>(
    core: Arc<Mutex<Core>>,
    store: Arc<D>,
    kick: Arc<Notify>,
    flushed: watch::Sender<u64>,
    mut stop: watch::Receiver<bool>,
    retry: Duration,
) {
    let mut failing = false;
    loop {
        let stopping = if failing {
            tokio::select! {
                _ = tokio::time::sleep(retry) => false,
                _ = stop.wait_for(|s| *s) => true,
            }
        } else {
            tokio::select! {
                _ = kick.notified() => false,
                _ = stop.wait_for(|s| *s) => true,
            }
        };
        if stopping {
            for attempt in 1..=3 {
                match flush_pending(&core, &store, &flushed).await {
                    Ok(()) => return,
                    Err(failure) => {
                        tracing::error!(%failure, attempt, "final flush failed");
                        tokio::time::sleep(retry).await;
                    }
                }
            }
            return;
        }
        match flush_pending(&core, &store, &flushed).await {
            Ok(()) => failing = false,
            Err(failure) => {
                // Nothing is lost: the batch went back and the next round writes it again.
                tracing::error!(%failure, "state store write failed; retrying");
                failing = true;
            }
        }
    }
}

/// Waits for a task to end (at most [`JOIN_WAIT`]), naming it when it does not.
async fn join(name: &str, task: JoinHandle<()>) {
    match tokio::time::timeout(JOIN_WAIT, task).await {
        Ok(Ok(())) => tracing::debug!(task = name, "stopped"),
        Ok(Err(e)) => tracing::error!(task = name, error = %e, "task failed"),
        Err(_) => tracing::error!(task = name, "task did not stop in time"),
    }
}

/// Opens the store, binds the sockets, calls `ready` with the bound addresses, and serves until
/// `shutdown` resolves.
pub async fn serve(
    cfg: ServeConfig,
    ready: impl FnOnce(Bound),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let store = Arc::new(Store::open(&cfg.state)?);
    let loaded = store.load()?;
    tracing::info!(
        state = %store.path().display(),
        jobs = loaded.jobs.len(),
        "state store opened"
    );
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let mut state = Core::new(loaded, cfg.timing, metrics.clone());
    state.set_preemption(cfg.preemption);
    let core = Arc::new(Mutex::new(state));
    let (flushed_tx, flushed_rx) = watch::channel(0u64);
    let (stop_tx, stop_rx) = watch::channel(false);
    let kick = Arc::new(Notify::new());
    let flusher_task = tokio::spawn(flusher(
        Arc::clone(&core),
        Arc::clone(&store),
        Arc::clone(&kick),
        flushed_tx,
        stop_rx.clone(),
        COMMIT_RETRY,
    ));
    kick.notify_one(); // persist the restart events

    // Lease timer: leases, restart backoffs, grace after the coordinator's own stalls.
    let lease_task = {
        let core = Arc::clone(&core);
        let kick = Arc::clone(&kick);
        let mut stop = stop_rx.clone();
        let tick =
            (cfg.timing.lease / 8).clamp(Duration::from_millis(50), Duration::from_millis(500));
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let Ok(mut c) = core.lock() else { return };
                let before = c.epoch();
                c.tick(Instant::now());
                if c.epoch() != before {
                    kick.notify_one();
                }
            }
        })
    };

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| Error::Io {
            action: format!("binding the gRPC address {}", cfg.listen),
            source,
        })?;
    let grpc = listener.local_addr().map_err(|source| Error::Io {
        action: "reading the bound address".into(),
        source,
    })?;
    let mut metrics_addr = None;
    let mut metrics_task = None;
    if let Some(addr) = cfg.metrics_listen {
        let l = metrics::bind(addr).await.map_err(|source| Error::Io {
            action: format!("binding the metrics address {addr}"),
            source,
        })?;
        metrics_addr = l.local_addr().ok();
        let registry = Arc::new(registry);
        let core = Arc::clone(&core);
        let mut stop = stop_rx.clone();
        metrics_task = Some(tokio::spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = metrics::serve(l, registry, core, stopped).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        }));
    }

    let shared = Arc::new(Shared {
        core,
        local_roots: cfg.local_roots.clone(),
        kick,
        flushed: flushed_rx,
        metrics,
        stopping: stop_rx,
        watchers: Mutex::new(JoinSet::new()),
    });
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<JobsServer<JobsSvc>>().await;
    health_reporter
        .set_serving::<WorkersServer<WorkersSvc>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Invalid(format!("building the reflection service: {e}")))?;
    let jobs =
        JobsServer::new(JobsSvc(Arc::clone(&shared))).max_decoding_message_size(MAX_REQUEST_BYTES);
    let workers = WorkersServer::new(WorkersSvc(Arc::clone(&shared)))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let jobs = tonic::service::interceptor::InterceptedService::new(
        jobs,
        check_token(cfg.user_token.clone(), cfg.worker_token.clone()),
    );
    let workers = tonic::service::interceptor::InterceptedService::new(
        workers,
        check_token(cfg.worker_token.clone(), cfg.user_token.clone()),
    );
    ready(Bound {
        grpc,
        metrics: metrics_addr,
    });
    tracing::info!(grpc = %grpc, metrics = ?metrics_addr, "coordinator serving");
    let mut builder = tonic::transport::Server::builder();
    if let Some((cert, key)) = &cfg.tls {
        endofm_proto::tls::install_crypto_provider();
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| Error::Io {
                action: format!("reading the TLS file {}", p.display()),
                source,
            })
        };
        let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| Error::Invalid(format!("TLS configuration: {e}")))?;
    }
    // On the signal, streams are told to end first: the server waits for open streams.
    let signal_stop = stop_tx.clone();
    let served = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(jobs)
        .add_service(workers)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutdown.await;
            tracing::info!("shutting down: ending watch streams");
            let _ = signal_stop.send(true);
        })
        .await
        .map_err(|e| Error::Invalid(format!("gRPC server stopped: {e}")));
    // Whatever ended the server, every task stops and is joined; the flusher writes last.
    let _ = stop_tx.send(true);
    let watchers = std::mem::take(&mut *shared.watchers.lock().unwrap_or_else(|e| e.into_inner()));
    if tokio::time::timeout(JOIN_WAIT, watchers.join_all())
        .await
        .is_err()
    {
        tracing::error!("watch streams did not stop in time");
    }
    join("lease timer", lease_task).await;
    if let Some(task) = metrics_task {
        join("metrics endpoint", task).await;
    }
    join("flusher", flusher_task).await;
    tracing::info!("coordinator stopped");
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Loaded;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A store that panics on its first write, fails its second, and keeps what it is given
    /// from then on.
    #[derive(Default)]
    struct Faulty {
        calls: AtomicUsize,
        written: Mutex<Vec<String>>,
    }

    impl Durable for Faulty {
        fn commit(&self, batch: &Batch) -> Result<()> {
            match self.calls.fetch_add(1, Ordering::SeqCst) {
                0 => panic!("injected writer panic"),
                1 => Err(Error::Invalid("injected write failure".into())),
                _ => {
                    let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
                    written.extend(batch.jobs.iter().map(|j| j.id.clone()));
                    Ok(())
                }
            }
        }
    }

    fn spec(out: &str) -> JobSpec {
        JobSpec::from_toml(&format!(
            "kind = \"pretrain\"\noutput = \"{out}\"\n[data]\nuri = \"/corpus\"\n"
        ))
        .expect("spec")
    }

    /// Issue 11 item 18: a batch whose write panicked or failed is never acknowledged; it is
    /// written again, and only then is its epoch reached.
    #[tokio::test]
    async fn a_failed_write_is_never_acknowledged() {
        let mut registry = Registry::default();
        let core = Arc::new(Mutex::new(Core::new(
            Loaded::default(),
            Timing::default(),
            Metrics::new(&mut registry),
        )));
        let store = Arc::new(Faulty::default());
        let (flushed_tx, mut flushed) = watch::channel(0u64);
        let (stop_tx, stop_rx) = watch::channel(false);
        let kick = Arc::new(Notify::new());
        let task = tokio::spawn(flusher(
            Arc::clone(&core),
            Arc::clone(&store),
            Arc::clone(&kick),
            flushed_tx,
            stop_rx,
            Duration::from_millis(5),
        ));
        let epoch = {
            let mut c = core.lock().expect("lock");
            c.submit(spec("/out/a"), Instant::now()).expect("submit");
            c.epoch()
        };
        kick.notify_one();
        // The first write panics, the second fails: the epoch is reached only after the
        // third, which holds the job.
        // (The borrow `wait_for` returns is dropped at once: holding it would block the sender.)
        let reached =
            tokio::time::timeout(Duration::from_secs(10), flushed.wait_for(|v| *v >= epoch))
                .await
                .map(|r| r.is_ok());
        assert_eq!(reached, Ok(true), "never flushed");
        assert!(store.calls.load(Ordering::SeqCst) >= 3);
        assert_eq!(
            store.written.lock().expect("written").as_slice(),
            ["job-1"],
            "the acknowledged change is in the store"
        );
        // A later change, then shutdown: the final flush writes it before the task ends.
        {
            let mut c = core.lock().expect("lock");
            c.submit(spec("/out/b"), Instant::now()).expect("submit");
        }
        stop_tx.send(true).expect("stop");
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the flusher stops")
            .expect("no panic");
        assert_eq!(
            store.written.lock().expect("written").as_slice(),
            ["job-1", "job-2"]
        );
    }
}
