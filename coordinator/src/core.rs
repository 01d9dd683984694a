//! The coordinator's state machine: jobs, workers, the priority queue, gang placement, attempt
//! failure and restart, cancellation, rendezvous data. Pure and synchronous: the gRPC layer
//! calls it under one mutex, then waits until the changes it made are durable
//! ([`Core::take_batch`] → the store) before answering.
//!
//! Invariants:
//! - A device slot belongs to at most one rank; it is freed only when the worker reports that
//!   rank's exit, re-registers without it, or is lost. So a new attempt never shares a device
//!   with a rank of an old one that is still stopping.
//! - All ranks of an attempt are placed in one step, or none (gang scheduling).
//! - Queue order: higher priority first, FIFO (submission order) within a priority. A job that
//!   does not fit blocks lower ones of the same device kind, unless it asks for more devices
//!   than all live workers have (then it waits without starving the others).
//! - The generation of a job grows by one per placement; only the current generation may use
//!   the rendezvous, report progress or finish the job.
//! - Dependencies (`after`, `init = "job:<id>"`) name jobs that existed at submission, so they
//!   never form a cycle. A job with a dependency that has not succeeded stays queued without
//!   blocking anyone; once a dependency ends otherwise, the job fails without running, and so
//!   do the jobs waiting for it, in the same state change.
//! - A live (queued or running) job owns its output: a submission whose output is the same
//!   place, or lies inside it or around it, is refused unless it waits for the owner (`after`).
//! - A failed attempt is classified ([`FailureClass`]): a deterministic failure (non-finite
//!   loss, invalid input) ends the job at once; any other is restarted after an exponential
//!   backoff while restarts are left. A job waiting out its backoff holds nothing up.
//! - Leases never expire for the coordinator's own stall: after a gap in its lease timer
//!   (SIGSTOP, a frozen VM), every worker's lease starts again from the end of the gap.
//! - Every stored message is bounded ([`endofm_shared::text`]): events and job messages quote
//!   user and rank text cut to a known length.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use endofm_proto::v1 as pb;
use endofm_shared::text::{MESSAGE_CHARS, clip, echo};
use endofm_shared::{DeviceKind, FailureClass, JobKind, JobSpec};
use tokio::sync::{Notify, broadcast};

use crate::metrics::Metrics;
use crate::records::{
    CheckpointRec, EventRec, JobRec, PlacementRec, ProgressRec, ResultRec, State, now_ms,
};
use crate::store::{Batch, Loaded};

/// (job id, generation, rank).
pub type RankKey = (String, u64, u32);

/// Timing of the worker protocol.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How often workers heartbeat.
    pub heartbeat_interval: Duration,
    /// A worker silent for longer is lost.
    pub lease: Duration,
    /// A stop order still unanswered after this long is sent again.
    pub stop_resend: Duration,
    /// Wait before the first restart of a failed attempt; doubled for every further restart.
    pub restart_backoff: Duration,
    /// The longest wait between restarts.
    pub restart_backoff_max: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(1000),
            lease: Duration::from_secs(10),
            stop_resend: Duration::from_secs(5),
            restart_backoff: Duration::from_secs(5),
            restart_backoff_max: Duration::from_secs(300),
        }
    }
}

impl Timing {
    /// The wait before restart number `restart` (1 for the first): `restart_backoff ·
    /// 2^(restart-1)`, at most `restart_backoff_max`.
    pub fn backoff(&self, restart: u32) -> Duration {
        let factor = 2u32.saturating_pow(restart.saturating_sub(1).min(20));
        self.restart_backoff
            .saturating_mul(factor)
            .min(self.restart_backoff_max.max(self.restart_backoff))
    }

    /// A pause of the lease timer longer than this is the coordinator's own stall: every lease
    /// restarts from its end.
    pub fn clock_gap(&self) -> Duration {
        (self.lease / 4).max(Duration::from_millis(200))
    }
}

/// Longest checkpoint location a report may carry (bytes); longer ones are ignored.
const MAX_REPORTED_URI: usize = 4096;
/// Most metrics a result report may carry.
const MAX_RESULT_METRICS: usize = 512;
/// Longest hostname kept for a worker (characters).
const MAX_HOSTNAME: usize = 255;

/// Why a submission is refused (nothing changes then).
#[derive(Debug)]
pub enum SubmitRefusal {
    /// The spec names something that does not exist or cannot be used (a dependency).
    Invalid(endofm_shared::Error),
    /// The spec conflicts with a live job (its output belongs to that job).
    Conflict(endofm_shared::Error),
}

impl std::fmt::Display for SubmitRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitRefusal::Invalid(e) | SubmitRefusal::Conflict(e) => write!(f, "{e}"),
        }
    }
}

#[derive(Debug)]
struct Worker {
    hostname: String,
    devices: Vec<(DeviceKind, u32)>,
    /// False for a placeholder rebuilt from stored placements after a coordinator restart,
    /// until the worker registers again.
    registered: bool,
    last_seen: Instant,
    busy: HashMap<(DeviceKind, u32), RankKey>,
    outbox_assign: Vec<pb::Assignment>,
    outbox_stop: Vec<pb::StopOrder>,
    stop_sent: HashMap<RankKey, Instant>,
    /// Assignments handed out but not yet seen running or exited, with the heartbeat number
    /// of the answer that carried them: resent when a later heartbeat still lacks them (the
    /// answer was lost).
    unacked: HashMap<RankKey, (pb::Assignment, u64)>,
    /// Heartbeats received since registration.
    beats: u64,
}

impl Worker {
    fn new(hostname: String, now: Instant) -> Self {
        Self {
            hostname,
            devices: Vec::new(),
            registered: false,
            last_seen: now,
            busy: HashMap::new(),
            outbox_assign: Vec::new(),
            outbox_stop: Vec::new(),
            stop_sent: HashMap::new(),
            unacked: HashMap::new(),
            beats: 0,
        }
    }

    fn free_rank(&mut self, key: &RankKey) -> bool {
        let slot = self
            .busy
            .iter()
            .find_map(|(slot, k)| (k == key).then_some(*slot));
        self.stop_sent.remove(key);
        self.unacked.remove(key);
        slot.map(|s| self.busy.remove(&s)).is_some()
    }

    fn order_stop(&mut self, key: &RankKey, reason: &str, now: Instant) {
        self.stop_sent.insert(key.clone(), now);
        self.outbox_stop.push(pb::StopOrder {
            rank: Some(rank_ref(key)),
            reason: reason.to_string(),
        });
    }
}

fn rank_ref(key: &RankKey) -> pb::RankRef {
    pb::RankRef {
        job_id: key.0.clone(),
        generation: key.1,
        rank: key.2,
    }
}

fn key_of(r: &pb::RankRef) -> RankKey {
    (r.job_id.clone(), r.generation, r.rank)
}

/// A rank's exit as the core handles it.
#[derive(Debug, Clone)]
struct Exit {
    success: bool,
    class: FailureClass,
    message: String,
}

impl Exit {
    fn failed(class: FailureClass, message: &str) -> Self {
        Self {
            success: false,
            class,
            message: message.to_string(),
        }
    }
}

/// Why a rendezvous or report call is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No such job.
    NotFound(String),
    /// The job is not running this generation (or the rank is out of range).
    Stale(String),
}

/// A rendezvous scope: the values of one attempt and a wake-up for waiters.
#[derive(Debug, Default)]
pub struct Meeting {
    values: HashMap<String, Vec<u8>>,
    /// Notified on every put.
    pub notify: Arc<Notify>,
}

/// The state machine.
#[derive(Debug)]
pub struct Core {
    timing: Timing,
    jobs: HashMap<String, JobRec>,
    events: HashMap<String, Vec<EventRec>>,
    queue: BTreeSet<(Reverse<i32>, u64, String)>,
    queued_since: HashMap<String, Instant>,
    workers: BTreeMap<String, Worker>,
    next_job: u64,
    worker_counter: u64,
    meetings: HashMap<(String, u64), Meeting>,
    updates: HashMap<String, broadcast::Sender<pb::JobUpdate>>,
    dirty_jobs: HashSet<String>,
    pending_events: Vec<(String, EventRec)>,
    next_job_dirty: bool,
    /// Bumped by every change that must reach the store.
    epoch: u64,
    metrics: Metrics,
    /// Whether a queued job may stop lower-priority running jobs to get its devices.
    preemption: bool,
    /// Restarted jobs waiting out their backoff: not placed before this instant.
    not_before: HashMap<String, Instant>,
    /// When the lease timer last ran (to notice the coordinator's own stalls).
    last_tick: Option<Instant>,
}

impl Core {
    /// Rebuilds the state from the store. Running jobs keep their placements; their workers
    /// are expected to re-register within one lease, or the attempt fails and restarts.
    pub fn new(loaded: Loaded, timing: Timing, metrics: Metrics) -> Self {
        let now = Instant::now();
        let mut core = Self {
            timing,
            jobs: HashMap::new(),
            events: loaded.events,
            queue: BTreeSet::new(),
            queued_since: HashMap::new(),
            workers: BTreeMap::new(),
            next_job: loaded.next_job.max(1),
            worker_counter: 0,
            meetings: HashMap::new(),
            updates: HashMap::new(),
            dirty_jobs: HashSet::new(),
            pending_events: Vec::new(),
            next_job_dirty: false,
            epoch: 0,
            metrics,
            preemption: false,
            not_before: HashMap::new(),
            last_tick: None,
        };
        let mut running = Vec::new();
        let wall = now_ms();
        for job in loaded.jobs {
            match job.state {
                State::Queued => {
                    core.enqueue(job.queue_key(), now);
                    if job.not_before_ms > wall {
                        let wait = Duration::from_millis((job.not_before_ms - wall) as u64);
                        core.not_before.insert(job.id.clone(), now + wait);
                    }
                }
                State::Running => running.push(job.id.clone()),
                _ => {}
            }
            core.jobs.insert(job.id.clone(), job);
        }
        for id in running {
            let Some(job) = core.jobs.get(&id) else {
                continue;
            };
            let kind = job.spec.resources.device;
            let generation = job.generation;
            for p in job.placement.clone() {
                // Workers back off while the coordinator is away: they get two leases to return.
                let grace = now + timing.lease;
                let worker = core
                    .workers
                    .entry(p.worker_id.clone())
                    .or_insert_with(|| Worker::new(String::new(), grace));
                worker
                    .busy
                    .insert((kind, p.device_index), (id.clone(), generation, p.rank));
            }
            core.event(
                &id,
                "coordinator_restarted",
                "coordinator restarted; waiting for the attempt's workers to reconnect".into(),
                generation,
                -1,
            );
        }
        core.settle_dependencies();
        core
    }

    /// Lets a queued job that cannot be placed stop lower-priority running jobs (they
    /// checkpoint, are re-queued without using a restart, and resume later).
    pub fn set_preemption(&mut self, on: bool) {
        self.preemption = on;
    }

    /// The metrics handles.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The change counter: callers wait until the store has flushed at least this epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Takes the pending changes (and the epoch they reach).
    pub fn take_batch(&mut self) -> (Batch, u64) {
        let mut batch = Batch::default();
        for id in self.dirty_jobs.drain() {
            if let Some(job) = self.jobs.get(&id) {
                batch.jobs.push(job.clone());
            }
        }
        batch.events = std::mem::take(&mut self.pending_events);
        if std::mem::take(&mut self.next_job_dirty) {
            batch.next_job = Some(self.next_job);
        }
        (batch, self.epoch)
    }

    /// Puts back a batch whose commit failed, so the next flush writes it again.
    pub fn restore_batch(&mut self, batch: Batch) {
        for job in batch.jobs {
            self.dirty_jobs.insert(job.id);
        }
        let mut events = batch.events;
        events.append(&mut self.pending_events);
        self.pending_events = events;
        if batch.next_job.is_some() {
            self.next_job_dirty = true;
        }
        self.epoch += 1;
    }

    /// Puts a job in the queue (at its priority and submission position) from `now`.
    fn enqueue(&mut self, key: (Reverse<i32>, u64, String), now: Instant) {
        self.queued_since.insert(key.2.clone(), now);
        self.queue.insert(key);
    }

    /// Marks a job for the next batch. Every change to a job passes here, so this is where its
    /// message is bounded before it is stored.
    fn touch(&mut self, id: &str) {
        if let Some(job) = self.jobs.get_mut(id)
            && job.message.chars().nth(MESSAGE_CHARS).is_some()
        {
            job.message = clip(&job.message, MESSAGE_CHARS);
        }
        self.dirty_jobs.insert(id.to_string());
        self.epoch += 1;
    }

    /// Appends an event (its message bounded to [`MESSAGE_CHARS`]).
    fn event(&mut self, id: &str, kind: &str, message: String, generation: u64, rank: i32) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        job.events += 1;
        let event = EventRec {
            seq: job.events,
            unix_ms: now_ms(),
            kind: kind.to_string(),
            message: clip(&message, MESSAGE_CHARS),
            generation,
            rank,
        };
        tracing::info!(job = id, generation, rank, kind, message = %event.message, "job event");
        self.events
            .entry(id.to_string())
            .or_default()
            .push(event.clone());
        self.pending_events.push((id.to_string(), event.clone()));
        self.emit(id, pb::job_update::Update::Event(event.to_pb()));
        self.touch(id);
    }

    fn emit(&mut self, id: &str, update: pb::job_update::Update) {
        if let Some(tx) = self.updates.get(id) {
            if tx.receiver_count() == 0 {
                self.updates.remove(id);
            } else {
                let _ = tx.send(pb::JobUpdate {
                    update: Some(update),
                });
            }
        }
    }

    fn emit_job(&mut self, id: &str) {
        if let Some(job) = self.jobs.get(id) {
            let pb = job.to_pb();
            self.emit(id, pb::job_update::Update::Job(pb));
        }
    }

    // ------------------------------------------------------------------------------------
    // Jobs API
    // ------------------------------------------------------------------------------------

    /// Checks what only the coordinator knows about a spec: every job it depends on exists, and
    /// a job named by `init` can provide weights. The error names the field.
    pub fn check_dependencies(&self, spec: &JobSpec) -> Result<(), endofm_shared::Error> {
        use endofm_shared::Error;
        for (i, id) in spec.after.iter().enumerate() {
            if !self.jobs.contains_key(id) {
                return Err(Error::invalid(
                    format!("after[{i}]"),
                    format!("no job `{id}` (`endofm jobs` lists them)"),
                ));
            }
        }
        if let Some(id) = spec.init_job() {
            let Some(from) = self.jobs.get(id) else {
                return Err(Error::invalid(
                    "init",
                    format!("no job `{id}` to start from (`endofm jobs` lists them)"),
                ));
            };
            if from.spec.kind == JobKind::Evaluate {
                return Err(Error::invalid(
                    "init",
                    format!("`{id}` is an evaluate job; it writes no weights to start from"),
                ));
            }
            // What each kind can start from: pre-training and fine-tuning from pre-training
            // weights (or a fine-tuned backbone for fine-tuning), evaluation from a fine-tuned
            // model only.
            let fits = match spec.kind {
                JobKind::Pretrain => from.spec.kind == JobKind::Pretrain,
                JobKind::Finetune => true,
                JobKind::Evaluate => from.spec.kind == JobKind::Finetune,
            };
            if !fits {
                return Err(Error::invalid(
                    "init",
                    format!(
                        "`{id}` is a {} job; {} job cannot start from its weights",
                        from.spec.kind.name(),
                        match spec.kind {
                            JobKind::Evaluate => "an evaluate",
                            JobKind::Pretrain => "a pretrain",
                            JobKind::Finetune => "a finetune",
                        }
                    ),
                ));
            }
            if from.state == State::Succeeded && from.last_checkpoint.is_none() {
                return Err(Error::invalid(
                    "init",
                    format!(
                        "`{id}` succeeded without committing a checkpoint; there are no weights to start from"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Refuses a spec whose output belongs to a live (queued or running) job: the same place,
    /// or one inside the other. A job that waits for the owner (`after`, `init = "job:<id>"`)
    /// may share it: the two never run at once (this is how to queue behind a job).
    pub fn check_output(&self, spec: &JobSpec) -> Result<(), endofm_shared::Error> {
        let deps = spec.dependencies();
        let mut owners: Vec<&JobRec> = self
            .jobs
            .values()
            .filter(|j| !j.state.is_final() && !deps.contains(&j.id))
            .filter(|j| j.spec.output_overlaps(spec))
            .collect();
        owners.sort_by_key(|j| j.seq);
        if let Some(owner) = owners.first() {
            return Err(endofm_shared::Error::invalid(
                "output",
                format!(
                    "`{}` overlaps the output `{}` of {} ({}), which owns it until it ends; use another output, or queue behind it with after = [\"{}\"]",
                    echo(&spec.output),
                    echo(&owner.spec.output),
                    owner.id,
                    owner.state.label(),
                    owner.id
                ),
            ));
        }
        Ok(())
    }

    /// Queues a validated spec; returns the new job, or why the spec cannot be queued (see
    /// [`Core::check_dependencies`] and [`Core::check_output`]; nothing changes then). A job
    /// with dependencies waits for them; one whose dependency already failed fails at once.
    pub fn submit(&mut self, spec: JobSpec, now: Instant) -> Result<JobRec, SubmitRefusal> {
        self.check_dependencies(&spec)
            .map_err(SubmitRefusal::Invalid)?;
        self.check_output(&spec).map_err(SubmitRefusal::Conflict)?;
        let n = self.next_job;
        self.next_job += 1;
        self.next_job_dirty = true;
        let id = format!("job-{n}");
        let waiting_for = spec.dependencies();
        let message = if waiting_for.is_empty() {
            "waiting for devices".to_string()
        } else {
            format!("waiting for {}", waiting_for.join(", "))
        };
        let job = JobRec {
            id: id.clone(),
            seq: n,
            state: State::Queued,
            generation: 0,
            restarts: 0,
            submitted_ms: now_ms(),
            started_ms: 0,
            finished_ms: 0,
            message,
            placement: vec![],
            ranks_done: vec![],
            last_checkpoint: None,
            progress: None,
            events: 0,
            waiting_for,
            init_resolved: None,
            result: None,
            failure_class: None,
            not_before_ms: 0,
            spec,
        };
        let mut summary = format!(
            "{} `{}`: {} × {} rank(s), priority {}, max_restarts {}",
            job.spec.kind.name(),
            job.spec.name,
            job.spec.resources.world_size,
            job.spec.resources.device.name(),
            job.spec.priority,
            job.spec.max_restarts
        );
        if !job.waiting_for.is_empty() {
            summary.push_str(&format!("; after {}", job.waiting_for.join(", ")));
        }
        self.enqueue(job.queue_key(), now);
        let fallback = job.clone();
        self.jobs.insert(id.clone(), job);
        self.event(&id, "submitted", summary, 0, -1);
        self.schedule(now);
        let snapshot = self.jobs.get(&id).cloned();
        Ok(snapshot.unwrap_or(fallback))
    }

    /// A job by id.
    pub fn job(&self, id: &str) -> Option<&JobRec> {
        self.jobs.get(id)
    }

    /// Jobs in submission order, optionally only those in `states`.
    pub fn list(&self, states: &[State]) -> Vec<&JobRec> {
        let mut jobs: Vec<&JobRec> = self
            .jobs
            .values()
            .filter(|j| states.is_empty() || states.contains(&j.state))
            .collect();
        jobs.sort_by_key(|j| j.seq);
        jobs
    }

    /// A job's events with `seq > after`.
    pub fn events_after(&self, id: &str, after: u64) -> Vec<EventRec> {
        self.events
            .get(id)
            .map(|evs| evs.iter().filter(|e| e.seq > after).cloned().collect())
            .unwrap_or_default()
    }

    /// A receiver of the job's future updates.
    pub fn subscribe(&mut self, id: &str) -> broadcast::Receiver<pb::JobUpdate> {
        self.updates
            .entry(id.to_string())
            .or_insert_with(|| broadcast::channel(1024).0)
            .subscribe()
    }

    /// Cancels a job (no-op when it is final). Running ranks are told to stop; their devices
    /// are freed as their exits come in.
    pub fn cancel(&mut self, id: &str, reason: &str, now: Instant) -> Option<JobRec> {
        let job = self.jobs.get(id)?;
        let state = job.state;
        if state.is_final() {
            return Some(job.clone());
        }
        let generation = job.generation;
        let reason = if reason.trim().is_empty() {
            "cancelled by a user".to_string()
        } else {
            format!("cancelled: {}", echo(reason))
        };
        if state == State::Queued {
            self.queue.retain(|(_, _, j)| j != id);
            self.queued_since.remove(id);
            self.not_before.remove(id);
        } else {
            self.stop_ranks(id, &reason, now);
        }
        if let Some(job) = self.jobs.get_mut(id) {
            job.state = State::Cancelled;
            job.finished_ms = now_ms();
            job.message = reason.clone();
            job.waiting_for.clear();
        }
        self.event(id, "cancelled", reason, generation, -1);
        self.emit_job(id);
        self.schedule(now);
        self.jobs.get(id).cloned()
    }

    // ------------------------------------------------------------------------------------
    // Workers API
    // ------------------------------------------------------------------------------------

    /// Registers a worker (or a reconnecting one): returns its id.
    pub fn register(&mut self, req: &pb::RegisterRequest, now: Instant) -> String {
        let id = if req.worker_id.is_empty() {
            self.worker_counter += 1;
            format!(
                "worker-{:x}{:02x}",
                (now_ms() as u64) & 0xff_ffff_ffff,
                self.worker_counter & 0xff
            )
        } else {
            req.worker_id.clone()
        };
        let running: HashSet<RankKey> = req.running.iter().map(key_of).collect();
        let mut devices: Vec<(DeviceKind, u32)> = req
            .devices
            .iter()
            .filter_map(|d| DeviceKind::parse(&d.kind).map(|k| (k, d.index)))
            .collect();
        devices.sort();
        devices.dedup();
        let hostname = clip(&req.hostname, MAX_HOSTNAME);
        let worker = self
            .workers
            .entry(id.clone())
            .or_insert_with(|| Worker::new(hostname.clone(), now));
        worker.hostname = hostname.clone();
        worker.devices = devices;
        worker.registered = true;
        worker.last_seen = now;
        // Ranks placed here that the worker no longer runs have died with it.
        let vanished: Vec<RankKey> = worker
            .busy
            .values()
            .filter(|k| !running.contains(*k))
            .cloned()
            .collect();
        tracing::info!(worker = %id, %hostname, devices = ?req.devices.len(), running = running.len(), "worker registered");
        for key in vanished {
            self.rank_exit(
                &id,
                &key,
                Exit::failed(
                    FailureClass::WorkerLost,
                    "the rank was gone when its worker registered again",
                ),
                now,
            );
        }
        for key in running {
            self.adopt_or_stop(&id, &key, now);
        }
        self.schedule(now);
        id
    }

    /// A rank a worker says it runs: kept if it is part of the current attempt, else stopped.
    fn adopt_or_stop(&mut self, worker_id: &str, key: &RankKey, now: Instant) {
        let current = self.jobs.get(&key.0).and_then(|job| {
            (job.state == State::Running && job.generation == key.1)
                .then(|| {
                    job.placement
                        .iter()
                        .find(|p| p.rank == key.2 && p.worker_id == worker_id)
                        .map(|p| (job.spec.resources.device, p.device_index))
                })
                .flatten()
        });
        let resend = self.timing.stop_resend;
        let Some(worker) = self.workers.get_mut(worker_id) else {
            return;
        };
        match current {
            Some(slot) => {
                worker.busy.insert(slot, key.clone());
            }
            None => {
                let due = worker
                    .stop_sent
                    .get(key)
                    .is_none_or(|t| now.duration_since(*t) >= resend);
                if due {
                    worker.order_stop(key, "not part of the job's current attempt", now);
                }
            }
        }
    }

    /// A heartbeat: renews the lease, takes exits, returns assignments and stop orders.
    pub fn heartbeat(&mut self, req: &pb::HeartbeatRequest, now: Instant) -> pb::HeartbeatResponse {
        for exit in &req.exited {
            if let Some(r) = &exit.rank {
                let message = if exit.message.is_empty() {
                    "rank failed".to_string()
                } else {
                    clip(&exit.message, MESSAGE_CHARS / 2)
                };
                let exit = Exit {
                    success: exit.success,
                    class: FailureClass::parse(&exit.failure_class),
                    message,
                };
                self.rank_exit(&req.worker_id, &key_of(r), exit, now);
            }
        }
        let known = self
            .workers
            .get(&req.worker_id)
            .is_some_and(|w| w.registered);
        if !known {
            return pb::HeartbeatResponse {
                reregister: true,
                ..Default::default()
            };
        }
        if let Some(w) = self.workers.get_mut(&req.worker_id) {
            w.last_seen = now;
        }
        for r in &req.running {
            let key = key_of(r);
            let busy_here = self
                .workers
                .get(&req.worker_id)
                .is_some_and(|w| w.busy.values().any(|k| *k == key));
            let current = self
                .jobs
                .get(&key.0)
                .is_some_and(|j| j.state == State::Running && j.generation == key.1);
            if !(busy_here && current) {
                self.adopt_or_stop(&req.worker_id, &key, now);
            }
        }
        if !req.exited.is_empty() {
            self.schedule(now);
        }
        let current: HashSet<RankKey> = self
            .workers
            .get(&req.worker_id)
            .map(|w| {
                w.unacked
                    .keys()
                    .filter(|k| {
                        self.jobs
                            .get(&k.0)
                            .is_some_and(|j| j.state == State::Running && j.generation == k.1)
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let Some(w) = self.workers.get_mut(&req.worker_id) else {
            return pb::HeartbeatResponse::default();
        };
        w.beats += 1;
        for r in &req.running {
            w.unacked.remove(&key_of(r));
        }
        w.unacked.retain(|k, _| current.contains(k));
        let beat = w.beats;
        let mut assignments = std::mem::take(&mut w.outbox_assign);
        for (key, (a, sent)) in &mut w.unacked {
            if *sent < beat {
                tracing::warn!(job = %key.0, generation = key.1, rank = key.2, "assignment not acknowledged; sending it again");
                *sent = beat;
                assignments.push(a.clone());
            }
        }
        for a in &assignments {
            if let Some(r) = &a.rank {
                w.unacked.insert(key_of(r), (a.clone(), beat));
            }
        }
        pb::HeartbeatResponse {
            assignments,
            stop: std::mem::take(&mut w.outbox_stop),
            reregister: false,
        }
    }

    /// The epoch a heartbeat answer must wait for: the current one when the heartbeat changed
    /// state or hands out orders (made by changes that must be durable first), else none.
    pub fn heartbeat_epoch(&self, before: u64, resp: &pb::HeartbeatResponse) -> u64 {
        if self.epoch != before || !resp.assignments.is_empty() || !resp.stop.is_empty() {
            self.epoch
        } else {
            0
        }
    }

    /// A rank ended (reported by a worker, or found gone).
    fn rank_exit(&mut self, worker_id: &str, key: &RankKey, exit: Exit, now: Instant) {
        let success = exit.success;
        let mut freed = false;
        if let Some(w) = self.workers.get_mut(worker_id) {
            freed = w.free_rank(key);
        }
        if !freed {
            for w in self.workers.values_mut() {
                if w.free_rank(key) {
                    break;
                }
            }
        }
        let Some(job) = self.jobs.get_mut(&key.0) else {
            return;
        };
        if job.state == State::Queued
            && job.generation == key.1
            && !success
            && !exit.class.restartable()
        {
            // The attempt already failed (another rank's exit, e.g. a peer's collective error
            // when this rank stopped on a NaN loss) and waits for its restart: a deterministic
            // cause from the same attempt means the restart would fail the same way.
            self.fail_waiting_restart(key, &exit, worker_id);
            return;
        }
        if job.state != State::Running || job.generation != key.1 {
            return;
        }
        let (id, generation, rank) = key.clone();
        if success {
            if !job.ranks_done.contains(&rank) {
                job.ranks_done.push(rank);
            }
            let world = job.spec.resources.world_size as usize;
            let done = job.ranks_done.len() >= world;
            self.event(
                &id,
                "rank_finished",
                format!("rank {rank} finished on {worker_id}"),
                generation,
                rank as i32,
            );
            if done {
                if let Some(job) = self.jobs.get_mut(&id) {
                    job.state = State::Succeeded;
                    job.finished_ms = now_ms();
                    job.message = format!("all {world} rank(s) finished");
                }
                self.meetings.remove(&(id.clone(), generation));
                self.event(
                    &id,
                    "succeeded",
                    format!("all {world} rank(s) finished"),
                    generation,
                    -1,
                );
                self.emit_job(&id);
            }
        } else {
            let reason = format!(
                "rank {rank} on {worker_id} failed ({}): {}",
                exit.class, exit.message
            );
            self.event(&id, "rank_failed", reason.clone(), generation, rank as i32);
            self.fail_attempt(&id, &reason, exit.class, now);
        }
    }

    /// Sends stop orders to every rank of the job's current attempt.
    fn stop_ranks(&mut self, id: &str, reason: &str, now: Instant) {
        let Some(job) = self.jobs.get(id) else { return };
        let generation = job.generation;
        let placement = job.placement.clone();
        for p in placement {
            let key = (id.to_string(), generation, p.rank);
            if let Some(w) = self.workers.get_mut(&p.worker_id)
                && w.busy.values().any(|k| *k == key)
            {
                w.order_stop(&key, reason, now);
            }
        }
    }

    /// The current attempt of a running job failed: stop its ranks; then fail the job when the
    /// failure is deterministic or no restarts are left, else queue a restart from its last
    /// checkpoint after the backoff ([`Timing::backoff`]).
    fn fail_attempt(&mut self, id: &str, reason: &str, class: FailureClass, now: Instant) {
        let Some(job) = self.jobs.get(id) else { return };
        if job.state != State::Running {
            return;
        }
        let generation = job.generation;
        self.stop_ranks(id, "the attempt failed", now);
        self.meetings.remove(&(id.to_string(), generation));
        self.event(
            id,
            "attempt_failed",
            format!("[{class}] {reason}"),
            generation,
            -1,
        );
        let timing = self.timing;
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        job.ranks_done.clear();
        job.failure_class = Some(class);
        let ending = if !class.restartable() {
            Some(format!(
                "failed without a restart: {} ({class}), which another attempt would repeat: {reason}",
                class.describe()
            ))
        } else if job.restarts >= job.spec.max_restarts {
            Some(format!(
                "failed: no restarts left ({} used); last failure: {} ({class}): {reason}",
                job.spec.max_restarts,
                class.describe()
            ))
        } else {
            None
        };
        match ending {
            None => {
                job.restarts += 1;
                job.state = State::Queued;
                let wait = timing.backoff(job.restarts);
                job.not_before_ms = now_ms() + wait.as_millis() as i64;
                job.message = format!(
                    "restarting in {:.1} s after {} ({class}): {reason}",
                    wait.as_secs_f64(),
                    class.describe()
                );
                let from = job.resume_point();
                let restarts = job.restarts;
                let max = job.spec.max_restarts;
                let key = job.queue_key();
                self.enqueue(key, now);
                self.not_before.insert(id.to_string(), now + wait);
                self.metrics.attempt_restarts.inc();
                self.event(
                    id,
                    "restarting",
                    format!(
                        "restart {restarts} of {max} in {:.1} s ({class}): the next attempt resumes {from}",
                        wait.as_secs_f64()
                    ),
                    generation,
                    -1,
                );
                self.schedule(now);
            }
            Some(message) => {
                job.state = State::Failed;
                job.finished_ms = now_ms();
                job.message = message.clone();
                self.event(id, "failed", message, generation, -1);
                self.emit_job(id);
            }
        }
    }

    /// Ends a job whose failed attempt waits for its restart, because a rank of that attempt
    /// reported a deterministic failure after the attempt was failed for another reason.
    fn fail_waiting_restart(&mut self, key: &RankKey, exit: &Exit, worker_id: &str) {
        let (id, generation, rank) = key.clone();
        let reason = format!(
            "rank {rank} on {worker_id} failed ({}): {}",
            exit.class, exit.message
        );
        self.event(&id, "rank_failed", reason.clone(), generation, rank as i32);
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let queue_key = job.queue_key();
        let class = exit.class;
        let message = format!(
            "failed without a restart: {} ({class}), which another attempt would repeat: {reason}",
            class.describe()
        );
        job.state = State::Failed;
        job.finished_ms = now_ms();
        job.failure_class = Some(class);
        job.not_before_ms = 0;
        job.message = message.clone();
        self.queue.remove(&queue_key);
        self.queued_since.remove(&id);
        self.not_before.remove(&id);
        self.event(&id, "failed", message, generation, -1);
        self.emit_job(&id);
    }

    /// The lease timer's work: grants every worker a fresh lease after a gap in the timer (the
    /// coordinator itself was stalled, so their silence proves nothing), expires the leases
    /// that ran out, and places jobs whose restart backoff ended.
    pub fn tick(&mut self, now: Instant) {
        let gap = self
            .last_tick
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.last_tick = Some(now);
        if gap > self.timing.clock_gap() {
            tracing::warn!(
                gap_s = gap.as_secs_f64(),
                workers = self.workers.len(),
                "the coordinator was stalled (its lease timer paused); every worker's lease starts again now"
            );
            for w in self.workers.values_mut() {
                w.last_seen = w.last_seen.max(now);
            }
        }
        self.expire_leases(now);
        let due: Vec<String> = self
            .not_before
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(id, _)| id.clone())
            .collect();
        if !due.is_empty() {
            for id in &due {
                self.not_before.remove(id);
            }
            self.schedule(now);
        }
    }

    /// Marks workers whose lease ran out as lost (their attempts fail).
    pub fn expire_leases(&mut self, now: Instant) -> usize {
        let lease = self.timing.lease;
        let lost: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| now.duration_since(w.last_seen) > lease)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &lost {
            let Some(worker) = self.workers.remove(id) else {
                continue;
            };
            self.metrics.workers_lost.inc();
            tracing::warn!(worker = %id, hostname = %worker.hostname, "worker lost (lease expired)");
            let mut jobs: Vec<(String, u64, u32)> = worker.busy.into_values().collect();
            jobs.sort();
            for (job, generation, rank) in jobs {
                let current = self
                    .jobs
                    .get(&job)
                    .is_some_and(|j| j.state == State::Running && j.generation == generation);
                if current {
                    let reason = format!(
                        "worker {id} lost (no heartbeat for {:.1} s) while running rank {rank}",
                        lease.as_secs_f64()
                    );
                    self.event(&job, "worker_lost", reason.clone(), generation, rank as i32);
                    self.fail_attempt(&job, &reason, FailureClass::WorkerLost, now);
                }
            }
        }
        if !lost.is_empty() {
            self.schedule(now);
        }
        lost.len()
    }

    /// Progress, checkpoints, logs and results from ranks. Only the job's current attempt is
    /// heard, while it runs; a result is also taken just after the attempt succeeded (it may
    /// arrive after the exits).
    pub fn report(&mut self, req: &pb::ReportRequest) {
        for report in &req.reports {
            let Some(r) = &report.rank else { continue };
            let Some(job) = self.jobs.get(&r.job_id) else {
                continue;
            };
            let this_attempt = job.generation == r.generation;
            let running = this_attempt && job.state == State::Running;
            let finished = this_attempt && job.state == State::Succeeded;
            match &report.report {
                Some(pb::rank_report::Report::Progress(p)) if running && r.rank == 0 => {
                    if let Some(job) = self.jobs.get_mut(&r.job_id) {
                        job.progress = Some(ProgressRec::from_pb(p));
                    }
                    self.emit(&r.job_id, pb::job_update::Update::Progress(p.clone()));
                }
                Some(pb::rank_report::Report::Checkpoint(c))
                    if r.generation <= job.generation
                        && !c.uri.is_empty()
                        && c.uri.len() <= MAX_REPORTED_URI =>
                {
                    // A committed checkpoint is a fact whenever its report arrives: one from
                    // an attempt that has since failed (its report was held up, e.g. while the
                    // coordinator was stalled) still counts when it is newer. Same step,
                    // another location, from the running attempt: the final word on that state
                    // (a fine-tuning job reports its chosen model, `best/`, after its last
                    // step).
                    let newer = job.last_checkpoint.as_ref().is_none_or(|old| {
                        c.step > old.step || (running && c.step == old.step && c.uri != old.uri)
                    });
                    if newer {
                        if let Some(job) = self.jobs.get_mut(&r.job_id) {
                            job.last_checkpoint = Some(CheckpointRec {
                                step: c.step,
                                uri: c.uri.clone(),
                                generation: r.generation,
                            });
                        }
                        self.event(
                            &r.job_id,
                            "checkpoint",
                            format!("checkpoint committed at step {}: {}", c.step, c.uri),
                            r.generation,
                            r.rank as i32,
                        );
                    }
                }
                Some(pb::rank_report::Report::Log(line)) if running => {
                    let message = if line.level.is_empty() {
                        line.message.clone()
                    } else {
                        format!("{} {}", line.level, line.message)
                    };
                    self.event(&r.job_id, "log", message, r.generation, r.rank as i32);
                }
                Some(pb::rank_report::Report::Result(res))
                    if (running || finished)
                        && r.rank == 0
                        && res.metrics.len() <= MAX_RESULT_METRICS
                        && res.report.len() <= MAX_REPORTED_URI =>
                {
                    let mut rec = ResultRec::from_pb(res, r.generation);
                    rec.headline = echo(&rec.headline);
                    let summary = rec.summary();
                    tracing::info!(job = %r.job_id, generation = r.generation, headline = %rec.headline, value = rec.value, report = %rec.report, "job result");
                    if let Some(job) = self.jobs.get_mut(&r.job_id) {
                        job.result = Some(rec);
                    }
                    self.event(&r.job_id, "result", summary, r.generation, 0);
                }
                _ => {}
            }
        }
    }

    /// The meeting of a rank's attempt, if the rank belongs to the job's current attempt.
    pub fn meeting(&mut self, r: &pb::RankRef) -> Result<&mut Meeting, Refusal> {
        let Some(job) = self.jobs.get(&r.job_id) else {
            return Err(Refusal::NotFound(format!("no job `{}`", r.job_id)));
        };
        if job.state != State::Running || job.generation != r.generation {
            return Err(Refusal::Stale(format!(
                "job {} is {} at generation {}; generation {} may not meet",
                job.id,
                job.state.label(),
                job.generation,
                r.generation
            )));
        }
        if r.rank >= job.spec.resources.world_size {
            return Err(Refusal::Stale(format!(
                "rank {} is outside the job's world size {}",
                r.rank, job.spec.resources.world_size
            )));
        }
        Ok(self
            .meetings
            .entry((r.job_id.clone(), r.generation))
            .or_default())
    }

    /// Stores a rendezvous value.
    pub fn rendezvous_put(
        &mut self,
        r: &pb::RankRef,
        key: &str,
        value: Vec<u8>,
    ) -> Result<(), Refusal> {
        let meeting = self.meeting(r)?;
        meeting.values.insert(key.to_string(), value);
        meeting.notify.notify_waiters();
        Ok(())
    }

    /// Looks a rendezvous value up; also returns the notifier to wait on when it is missing.
    pub fn rendezvous_get(
        &mut self,
        r: &pb::RankRef,
        key: &str,
    ) -> Result<(Option<Vec<u8>>, Arc<Notify>), Refusal> {
        let meeting = self.meeting(r)?;
        Ok((
            meeting.values.get(key).cloned(),
            Arc::clone(&meeting.notify),
        ))
    }

    // ------------------------------------------------------------------------------------
    // Scheduling
    // ------------------------------------------------------------------------------------

    /// Places queued jobs on free devices; returns how many were placed. Settles dependencies
    /// first: every path that ends a job leads here.
    pub fn schedule(&mut self, now: Instant) -> usize {
        self.settle_dependencies();
        if self.queue.is_empty() {
            return 0;
        }
        let mut free: HashMap<DeviceKind, Vec<(String, u32)>> = HashMap::new();
        let mut capacity: HashMap<DeviceKind, usize> = HashMap::new();
        for (id, w) in &self.workers {
            if !w.registered {
                continue;
            }
            for &(kind, index) in &w.devices {
                *capacity.entry(kind).or_default() += 1;
                if !w.busy.contains_key(&(kind, index)) {
                    free.entry(kind).or_default().push((id.clone(), index));
                }
            }
        }
        // Take slots from the front: ranks of a job pack onto as few workers as possible.
        for slots in free.values_mut() {
            slots.reverse();
        }
        let mut blocked: HashSet<DeviceKind> = HashSet::new();
        let mut placements: Vec<(String, Vec<(String, u32)>)> = Vec::new();
        for (_, _, id) in &self.queue {
            if free.values().all(Vec::is_empty) {
                break;
            }
            let Some(job) = self.jobs.get(id) else {
                continue;
            };
            if !job.waiting_for.is_empty() || self.not_before.get(id).is_some_and(|t| *t > now) {
                continue; // not ready, or waiting out a restart backoff: holds nothing up
            }
            let kind = job.spec.resources.device;
            if blocked.contains(&kind) {
                continue;
            }
            let world = job.spec.resources.world_size as usize;
            let slots = free.entry(kind).or_default();
            if slots.len() >= world {
                let taken: Vec<(String, u32)> = (0..world).filter_map(|_| slots.pop()).collect();
                placements.push((id.clone(), taken));
            } else if world <= capacity.get(&kind).copied().unwrap_or(0) {
                blocked.insert(kind);
            }
        }
        let placed = placements.len();
        for (id, slots) in placements {
            self.place(&id, slots, now);
        }
        if self.preemption {
            self.preempt(now);
        }
        placed
    }

    /// Brings waiting jobs up to date with their dependencies: drops those that succeeded,
    /// fails (without running) a job whose dependency ended otherwise, and resolves an
    /// `init = "job:<id>"` once everything succeeded. Repeats until nothing changes, so a
    /// failure cascades down a chain in one call.
    fn settle_dependencies(&mut self) {
        loop {
            let waiting: Vec<String> = self
                .queue
                .iter()
                .map(|(_, _, id)| id)
                .filter(|id| {
                    self.jobs
                        .get(*id)
                        .is_some_and(|j| !j.waiting_for.is_empty())
                })
                .cloned()
                .collect();
            let mut failed_any = false;
            for id in waiting {
                let Some(job) = self.jobs.get(&id) else {
                    continue;
                };
                let mut still = Vec::new();
                let mut broken = None;
                for dep in &job.waiting_for {
                    match self.jobs.get(dep) {
                        Some(d) if d.state == State::Succeeded => {}
                        Some(d) if d.state.is_final() => {
                            let why = if d.message.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", d.message)
                            };
                            broken = Some(format!(
                                "dependency {dep} ended {}{why}",
                                d.state.label().to_uppercase()
                            ));
                            break;
                        }
                        Some(_) => still.push(dep.clone()),
                        None => {
                            broken = Some(format!("dependency {dep} does not exist"));
                            break;
                        }
                    }
                }
                if let Some(reason) = broken {
                    self.fail_unplaced(&id, &format!("never ran: {reason}"));
                    failed_any = true;
                    continue;
                }
                if still.len() == job.waiting_for.len() {
                    continue;
                }
                let done: Vec<String> = job
                    .waiting_for
                    .iter()
                    .filter(|d| !still.contains(d))
                    .cloned()
                    .collect();
                let ready = still.is_empty();
                if let Some(job) = self.jobs.get_mut(&id) {
                    job.message = if ready {
                        "waiting for devices".into()
                    } else {
                        format!("waiting for {}", still.join(", "))
                    };
                    job.waiting_for = still;
                }
                self.touch(&id);
                if ready {
                    failed_any |= !self.dependencies_met(&id, &done);
                }
            }
            if !failed_any {
                return;
            }
        }
    }

    /// Every dependency of `id` succeeded (`last` are the ones that just did): resolves an
    /// `init = "job:<id>"` to that job's last checkpoint. Returns false when the job failed
    /// because there is none.
    fn dependencies_met(&mut self, id: &str, last: &[String]) -> bool {
        let Some(job) = self.jobs.get(id) else {
            return true;
        };
        let mut message = format!("dependencies succeeded ({})", last.join(", "));
        if let Some(from) = job.spec.init_job().map(str::to_string) {
            let checkpoint = self.jobs.get(&from).and_then(|j| j.last_checkpoint.clone());
            let Some(checkpoint) = checkpoint else {
                let reason = format!(
                    "never ran: init job:{from} succeeded without committing a checkpoint; there are no weights to start from"
                );
                self.fail_unplaced(id, &reason);
                return false;
            };
            message.push_str(&format!(
                "; init job:{from} resolved to its checkpoint at step {}: {}",
                checkpoint.step, checkpoint.uri
            ));
            if let Some(job) = self.jobs.get_mut(id) {
                job.init_resolved = Some(checkpoint.uri);
            }
        }
        message.push_str("; waiting for devices");
        self.event(id, "ready", message, 0, -1);
        self.emit_job(id);
        true
    }

    /// Ends a queued job that never ran as FAILED.
    fn fail_unplaced(&mut self, id: &str, reason: &str) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        if job.state != State::Queued {
            return;
        }
        let key = job.queue_key();
        job.state = State::Failed;
        job.finished_ms = now_ms();
        job.message = reason.to_string();
        job.waiting_for.clear();
        let generation = job.generation;
        self.queue.remove(&key);
        self.queued_since.remove(id);
        self.event(id, "failed", reason.to_string(), generation, -1);
        self.emit_job(id);
    }

    /// For each device kind, the first queued job that fits the cluster but not the free
    /// devices may stop running jobs of lower priority (lowest first, newest first) until the
    /// devices it needs are free or being freed.
    fn preempt(&mut self, now: Instant) {
        let mut capacity: HashMap<DeviceKind, usize> = HashMap::new();
        let mut free: HashMap<DeviceKind, usize> = HashMap::new();
        let mut stopping: HashMap<DeviceKind, usize> = HashMap::new();
        for w in self.workers.values().filter(|w| w.registered) {
            for &(kind, index) in &w.devices {
                *capacity.entry(kind).or_default() += 1;
                match w.busy.get(&(kind, index)) {
                    None => *free.entry(kind).or_default() += 1,
                    Some(k) => {
                        let current = self
                            .jobs
                            .get(&k.0)
                            .is_some_and(|j| j.state == State::Running && j.generation == k.1);
                        if !current {
                            *stopping.entry(kind).or_default() += 1;
                        }
                    }
                }
            }
        }
        let mut heads: Vec<(String, DeviceKind, usize, i32)> = Vec::new();
        for (_, _, id) in &self.queue {
            let Some(job) = self.jobs.get(id) else {
                continue;
            };
            if !job.waiting_for.is_empty() || self.not_before.get(id).is_some_and(|t| *t > now) {
                continue;
            }
            let kind = job.spec.resources.device;
            let world = job.spec.resources.world_size as usize;
            if heads.iter().any(|h| h.1 == kind)
                || world > capacity.get(&kind).copied().unwrap_or(0)
            {
                continue;
            }
            heads.push((id.clone(), kind, world, job.spec.priority));
        }
        for (head, kind, world, priority) in heads {
            let available =
                free.get(&kind).copied().unwrap_or(0) + stopping.get(&kind).copied().unwrap_or(0);
            if available >= world {
                continue;
            }
            let mut victims: Vec<(i32, i64, String, usize)> = self
                .jobs
                .values()
                .filter(|j| {
                    j.state == State::Running
                        && j.spec.resources.device == kind
                        && j.spec.priority < priority
                })
                .map(|j| {
                    (
                        j.spec.priority,
                        -j.started_ms,
                        j.id.clone(),
                        j.spec.resources.world_size as usize,
                    )
                })
                .collect();
            victims.sort();
            let mut chosen = Vec::new();
            let mut gained = 0;
            for (_, _, id, size) in victims {
                if available + gained >= world {
                    break;
                }
                gained += size;
                chosen.push(id);
            }
            if available + gained < world {
                continue;
            }
            for id in chosen {
                self.preempt_job(&id, &head, now);
                *stopping.entry(kind).or_default() += self
                    .jobs
                    .get(&id)
                    .map_or(0, |j| j.spec.resources.world_size as usize);
            }
        }
    }

    fn preempt_job(&mut self, id: &str, by: &str, now: Instant) {
        let by_priority = self.jobs.get(by).map_or(0, |j| j.spec.priority);
        let reason = format!("preempted by {by} (priority {by_priority})");
        self.stop_ranks(id, &reason, now);
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        let generation = job.generation;
        job.state = State::Queued;
        job.ranks_done.clear();
        job.message = format!("{reason}; waiting to resume");
        let from = job.resume_point();
        let key = job.queue_key();
        self.enqueue(key, now);
        self.meetings.remove(&(id.to_string(), generation));
        self.event(
            id,
            "preempted",
            format!(
                "{reason}: ranks checkpoint and stop; the job resumes {from} when devices free up"
            ),
            generation,
            -1,
        );
    }

    fn place(&mut self, id: &str, slots: Vec<(String, u32)>, now: Instant) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        self.queue.remove(&job.queue_key());
        self.not_before.remove(id);
        job.not_before_ms = 0;
        job.generation += 1;
        job.state = State::Running;
        job.ranks_done.clear();
        if job.started_ms == 0 {
            job.started_ms = now_ms();
        }
        job.message = format!("attempt {} running", job.generation);
        job.placement = slots
            .iter()
            .enumerate()
            .map(|(rank, (worker, index))| PlacementRec {
                rank: rank as u32,
                worker_id: worker.clone(),
                device_index: *index,
            })
            .collect();
        let generation = job.generation;
        let kind = job.spec.resources.device;
        let world = job.spec.resources.world_size;
        let spec_json = job.worker_spec_json();
        let map = job
            .placement
            .iter()
            .map(|p| {
                format!(
                    "rank {} → {}/{}:{}",
                    p.rank,
                    p.worker_id,
                    kind.name(),
                    p.device_index
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        for (rank, (worker, index)) in slots.iter().enumerate() {
            let key = (id.to_string(), generation, rank as u32);
            if let Some(w) = self.workers.get_mut(worker) {
                w.busy.insert((kind, *index), key.clone());
                w.outbox_assign.push(pb::Assignment {
                    rank: Some(rank_ref(&key)),
                    world_size: world,
                    device_index: *index,
                    device_kind: kind.name().to_string(),
                    spec_json: spec_json.clone(),
                });
            }
        }
        if let Some(since) = self.queued_since.remove(id) {
            self.metrics
                .scheduling_latency
                .observe(now.duration_since(since).as_secs_f64());
        }
        self.metrics.placements.inc();
        self.meetings.retain(|(j, _), _| j != id);
        self.event(
            id,
            "scheduled",
            format!("attempt {generation}: {map}"),
            generation,
            -1,
        );
        self.emit_job(id);
    }

    /// Numbers for the gauges: jobs by state, queue depth, live workers.
    pub fn gauges(&self) -> (HashMap<State, i64>, i64, i64) {
        let mut by_state: HashMap<State, i64> = State::ALL.iter().map(|s| (*s, 0)).collect();
        for job in self.jobs.values() {
            *by_state.entry(job.state).or_default() += 1;
        }
        let alive = self.workers.values().filter(|w| w.registered).count() as i64;
        (by_state, self.queue.len() as i64, alive)
    }

    /// The heartbeat interval and lease handed to workers.
    pub fn timing(&self) -> Timing {
        self.timing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    /// A core that restarts failed attempts without a backoff.
    fn core() -> Core {
        core_with(Timing {
            restart_backoff: Duration::ZERO,
            ..Timing::default()
        })
    }

    fn core_with(timing: Timing) -> Core {
        let mut registry = Registry::default();
        Core::new(Loaded::default(), timing, Metrics::new(&mut registry))
    }

    /// A distinct output folder per call (a live job owns its output).
    fn fresh_output(prefix: &str) -> String {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("/out/{prefix}-{n}")
    }

    fn spec(world: u32, priority: i32, max_restarts: u32) -> JobSpec {
        JobSpec::from_json(
            &serde_json::json!({
                "kind": "pretrain",
                "data": {"uri": "/corpus"},
                "output": fresh_output("pretrain"),
                "model": {"preset": "tiny"},
                "resources": {"world_size": world, "device": "cpu"},
                "priority": priority,
                "max_restarts": max_restarts,
            })
            .to_string(),
        )
        .expect("spec")
    }

    fn submit(core: &mut Core, spec: JobSpec, now: Instant) -> JobRec {
        core.submit(spec, now).expect("submitted")
    }

    /// A one-rank CPU finetune or evaluate spec with the given dependencies.
    fn downstream(kind: &str, init: Option<&str>, after: &[&str]) -> JobSpec {
        let mut doc = serde_json::json!({
            "kind": kind,
            "task": "classify",
            "data": {"uri": "/polypdiag"},
            "output": fresh_output(kind),
            "model": {"preset": "tiny"},
            "resources": {"world_size": 1, "device": "cpu"},
            "max_restarts": 0,
            "after": after,
        });
        if let Some(init) = init {
            doc["init"] = serde_json::json!(init);
        }
        JobSpec::from_json(&doc.to_string()).expect("spec")
    }

    fn checkpoint(core: &mut Core, id: &str, generation: u64, step: u64, uri: &str) {
        core.report(&pb::ReportRequest {
            worker_id: "a".into(),
            reports: vec![pb::RankReport {
                rank: Some(pb::RankRef {
                    job_id: id.into(),
                    generation,
                    rank: 0,
                }),
                report: Some(pb::rank_report::Report::Checkpoint(pb::CheckpointRef {
                    step,
                    uri: uri.into(),
                    generation,
                })),
            }],
        });
    }

    fn state(core: &Core, id: &str) -> Option<State> {
        core.job(id).map(|j| j.state)
    }

    fn last_event(core: &Core, id: &str) -> (String, String) {
        core.events[id]
            .last()
            .map(|e| (e.kind.clone(), e.message.clone()))
            .unwrap_or_default()
    }

    fn register(core: &mut Core, id: &str, slots: u32, now: Instant) -> String {
        core.register(
            &pb::RegisterRequest {
                worker_id: id.into(),
                hostname: id.into(),
                devices: (0..slots)
                    .map(|i| pb::Device {
                        kind: "cpu".into(),
                        index: i,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
            now,
        )
    }

    fn beat(
        core: &mut Core,
        id: &str,
        exited: Vec<(RankKey, bool)>,
        now: Instant,
    ) -> pb::HeartbeatResponse {
        let running: Vec<pb::RankRef> = core
            .workers
            .get(id)
            .map(|w| {
                w.busy
                    .values()
                    .filter(|k| !exited.iter().any(|(e, _)| e == *k))
                    .map(rank_ref)
                    .collect()
            })
            .unwrap_or_default();
        core.heartbeat(
            &pb::HeartbeatRequest {
                worker_id: id.into(),
                running,
                exited: exited
                    .into_iter()
                    .map(|(k, success)| pb::RankExit {
                        rank: Some(rank_ref(&k)),
                        success,
                        message: if success {
                            String::new()
                        } else {
                            "boom".into()
                        },
                        failure_class: String::new(),
                    })
                    .collect(),
            },
            now,
        )
    }

    #[test]
    fn gang_waits_for_enough_workers_and_priority_goes_first() {
        let mut c = core();
        let now = Instant::now();
        register(&mut c, "a", 1, now);
        register(&mut c, "b", 1, now);
        let big = submit(&mut c, spec(3, 0, 0), now);
        assert_eq!(c.job(&big.id).map(|j| j.state), Some(State::Queued));
        // Nothing was placed on a or b: no partial gang.
        assert!(beat(&mut c, "a", vec![], now).assignments.is_empty());
        register(&mut c, "c", 1, now);
        assert_eq!(c.job(&big.id).map(|j| j.state), Some(State::Running));
        let ranks: Vec<u32> = ["a", "b", "c"]
            .iter()
            .flat_map(|w| beat(&mut c, w, vec![], now).assignments)
            .filter_map(|a| a.rank.map(|r| r.rank))
            .collect();
        assert_eq!(ranks.len(), 3);
        // While it runs, a low- then a high-priority job queue up; the high one goes first.
        let low = submit(&mut c, spec(1, 0, 0), now);
        let high = submit(&mut c, spec(1, 5, 0), now);
        for (i, w) in ["a", "b", "c"].iter().enumerate() {
            beat(&mut c, w, vec![((big.id.clone(), 1, i as u32), true)], now);
            if i == 0 {
                assert_eq!(c.job(&high.id).map(|j| j.state), Some(State::Running));
                assert_eq!(c.job(&low.id).map(|j| j.state), Some(State::Queued));
            }
        }
        assert_eq!(c.job(&big.id).map(|j| j.state), Some(State::Succeeded));
        assert_eq!(c.job(&low.id).map(|j| j.state), Some(State::Running));
    }

    #[test]
    fn an_assignment_whose_answer_was_lost_is_sent_again_once() {
        let mut c = core();
        let now = Instant::now();
        register(&mut c, "a", 1, now);
        let job = submit(&mut c, spec(1, 0, 0), now);
        let first = c.heartbeat(
            &pb::HeartbeatRequest {
                worker_id: "a".into(),
                ..Default::default()
            },
            now,
        );
        assert_eq!(first.assignments.len(), 1);
        // That answer never arrived: the next heartbeat lists nothing running.
        let again = c.heartbeat(
            &pb::HeartbeatRequest {
                worker_id: "a".into(),
                ..Default::default()
            },
            now,
        );
        assert_eq!(again.assignments.len(), 1);
        assert_eq!(again.assignments[0].rank, first.assignments[0].rank);
        // Once the rank shows up as running, it is not sent again.
        let running = vec![pb::RankRef {
            job_id: job.id.clone(),
            generation: 1,
            rank: 0,
        }];
        for _ in 0..3 {
            let r = c.heartbeat(
                &pb::HeartbeatRequest {
                    worker_id: "a".into(),
                    running: running.clone(),
                    exited: vec![],
                },
                now,
            );
            assert!(r.assignments.is_empty());
        }
    }

    #[test]
    fn preemption_stops_lower_priority_jobs_and_requeues_them() {
        let mut c = core();
        c.set_preemption(true);
        let now = Instant::now();
        register(&mut c, "a", 2, now);
        let low = submit(&mut c, spec(1, 0, 0), now);
        let mid = submit(&mut c, spec(1, 5, 0), now);
        assert_eq!(beat(&mut c, "a", vec![], now).assignments.len(), 2);
        let high = submit(&mut c, spec(1, 9, 0), now);
        // One device is needed: only the lowest-priority job is stopped.
        let resp = beat(&mut c, "a", vec![], now);
        assert_eq!(resp.stop.len(), 1);
        assert_eq!(
            resp.stop[0].rank.as_ref().map(|r| r.job_id.clone()),
            Some(low.id.clone())
        );
        assert_eq!(
            c.job(&low.id).map(|j| (j.state, j.restarts)),
            Some((State::Queued, 0))
        );
        assert_eq!(c.job(&mid.id).map(|j| j.state), Some(State::Running));
        // Its exit (a failure: it stopped early) frees the device for the high-priority job.
        let resp = beat(&mut c, "a", vec![((low.id.clone(), 1, 0), false)], now);
        assert_eq!(resp.assignments.len(), 1);
        assert_eq!(c.job(&high.id).map(|j| j.state), Some(State::Running));
        assert_eq!(c.job(&low.id).map(|j| j.state), Some(State::Queued));
        // Equal or higher priority is never preempted.
        let other = submit(&mut c, spec(2, 5, 0), now);
        assert!(beat(&mut c, "a", vec![], now).stop.is_empty());
        assert_eq!(c.job(&other.id).map(|j| j.state), Some(State::Queued));
    }

    #[test]
    fn a_job_larger_than_the_cluster_does_not_block_others() {
        let mut c = core();
        let now = Instant::now();
        register(&mut c, "a", 2, now);
        let huge = submit(&mut c, spec(3, 9, 0), now);
        let small = submit(&mut c, spec(2, 0, 0), now);
        assert_eq!(c.job(&huge.id).map(|j| j.state), Some(State::Queued));
        assert_eq!(c.job(&small.id).map(|j| j.state), Some(State::Running));
    }

    #[test]
    fn failed_rank_restarts_the_attempt_until_restarts_run_out() {
        let mut c = core();
        let now = Instant::now();
        register(&mut c, "a", 2, now);
        let job = submit(&mut c, spec(2, 0, 1), now);
        assert_eq!(beat(&mut c, "a", vec![], now).assignments.len(), 2);
        // Rank 1 fails: rank 0 is told to stop; the job is queued for attempt 2 but its
        // devices stay busy until rank 0's exit arrives.
        let resp = beat(&mut c, "a", vec![((job.id.clone(), 1, 1), false)], now);
        assert_eq!(resp.stop.len(), 1);
        assert_eq!(
            c.job(&job.id).map(|j| (j.state, j.restarts)),
            Some((State::Queued, 1))
        );
        // The exit frees the devices; the new attempt comes back in the same answer.
        let resp = beat(&mut c, "a", vec![((job.id.clone(), 1, 0), false)], now);
        assert_eq!(resp.assignments.len(), 2);
        assert!(
            resp.assignments
                .iter()
                .all(|a| a.rank.as_ref().map(|r| r.generation) == Some(2))
        );
        // The old generation may not meet any more; the new one may.
        let old = pb::RankRef {
            job_id: job.id.clone(),
            generation: 1,
            rank: 0,
        };
        assert!(matches!(
            c.rendezvous_put(&old, "k", vec![1]),
            Err(Refusal::Stale(_))
        ));
        let new = pb::RankRef {
            job_id: job.id.clone(),
            generation: 2,
            rank: 0,
        };
        assert!(c.rendezvous_put(&new, "k", vec![1]).is_ok());
        beat(&mut c, "a", vec![((job.id.clone(), 2, 0), false)], now);
        let j = c.job(&job.id).expect("job");
        assert_eq!(j.state, State::Failed);
        let kinds: Vec<&str> = c.events[&job.id].iter().map(|e| e.kind.as_str()).collect();
        assert!(
            kinds.contains(&"restarting") && kinds.contains(&"failed"),
            "{kinds:?}"
        );
    }

    #[test]
    fn lost_worker_fails_the_attempt_and_frees_its_devices() {
        let mut c = core();
        let t0 = Instant::now();
        register(&mut c, "a", 1, t0);
        register(&mut c, "b", 1, t0);
        let job = submit(&mut c, spec(2, 0, 3), t0);
        beat(&mut c, "a", vec![], t0);
        beat(&mut c, "b", vec![], t0);
        let later = t0 + Duration::from_secs(8);
        beat(&mut c, "a", vec![], later);
        let expired = t0 + Duration::from_secs(11);
        assert_eq!(c.expire_leases(expired), 1);
        let j = c.job(&job.id).expect("job");
        assert_eq!((j.state, j.restarts), (State::Queued, 1));
        // b comes back as a new process: the job is placed again with generation 2.
        register(&mut c, "b2", 1, expired);
        let resp = beat(&mut c, "a", vec![((job.id.clone(), 1, 0), false)], expired);
        assert_eq!(resp.assignments.len(), 1);
        assert_eq!(c.job(&job.id).map(|j| j.generation), Some(2));
    }

    #[test]
    fn cancel_stops_ranks_and_is_final() {
        let mut c = core();
        let now = Instant::now();
        register(&mut c, "a", 1, now);
        let job = submit(&mut c, spec(1, 0, 3), now);
        beat(&mut c, "a", vec![], now);
        let cancelled = c.cancel(&job.id, "", now).expect("job");
        assert_eq!(cancelled.state, State::Cancelled);
        let resp = beat(&mut c, "a", vec![], now);
        assert_eq!(resp.stop.len(), 1);
        // The slot frees when the exit comes; a failure report no longer changes the job.
        beat(&mut c, "a", vec![((job.id.clone(), 1, 0), false)], now);
        assert_eq!(c.job(&job.id).map(|j| j.state), Some(State::Cancelled));
        let queued = submit(&mut c, spec(1, 0, 0), now);
        assert_eq!(c.job(&queued.id).map(|j| j.state), Some(State::Running));
        let q2 = submit(&mut c, spec(1, 0, 0), now);
        assert_eq!(
            c.cancel(&q2.id, "changed my mind", now).map(|j| j.state),
            Some(State::Cancelled)
        );
    }

    #[test]
    fn restart_of_the_coordinator_keeps_running_attempts_when_workers_return() {
        let mut c = core();
        let now = Instant::now();
        register(&mut c, "a", 1, now);
        let job = submit(&mut c, spec(1, 0, 3), now);
        beat(&mut c, "a", vec![], now);
        let (_batch, _) = c.take_batch();
        let loaded = Loaded {
            jobs: c.jobs.values().cloned().collect(),
            events: c.events.clone(),
            next_job: c.next_job,
        };
        let mut registry = Registry::default();
        let mut c2 = Core::new(loaded, Timing::default(), Metrics::new(&mut registry));
        // The worker's first heartbeat is refused with "register again".
        assert!(beat(&mut c2, "a", vec![], now).reregister);
        c2.register(
            &pb::RegisterRequest {
                worker_id: "a".into(),
                hostname: "a".into(),
                devices: vec![pb::Device {
                    kind: "cpu".into(),
                    index: 0,
                    ..Default::default()
                }],
                running: vec![pb::RankRef {
                    job_id: job.id.clone(),
                    generation: 1,
                    rank: 0,
                }],
                labels: Default::default(),
            },
            now,
        );
        assert_eq!(
            c2.job(&job.id).map(|j| (j.state, j.generation)),
            Some((State::Running, 1))
        );
        beat(&mut c2, "a", vec![((job.id.clone(), 1, 0), true)], now);
        assert_eq!(c2.job(&job.id).map(|j| j.state), Some(State::Succeeded));
        // Without the worker coming back, the attempt fails after two leases and restarts.
        let mut registry = Registry::default();
        let loaded = Loaded {
            jobs: c.jobs.values().cloned().collect(),
            events: c.events.clone(),
            next_job: c.next_job,
        };
        let mut c3 = Core::new(loaded, Timing::default(), Metrics::new(&mut registry));
        c3.expire_leases(now + Duration::from_secs(11));
        assert_eq!(
            c3.job(&job.id).map(|j| j.state),
            Some(State::Running),
            "within the grace"
        );
        c3.expire_leases(now + Duration::from_secs(21));
        assert_eq!(
            c3.job(&job.id).map(|j| (j.state, j.restarts)),
            Some((State::Queued, 1))
        );
    }

    #[test]
    fn a_dependent_job_waits_without_blocking_then_runs_from_the_resolved_checkpoint() {
        let mut c = core();
        let now = Instant::now();
        register(&mut c, "a", 2, now);
        let pre = submit(&mut c, spec(1, 0, 0), now);
        let mut ft_spec = downstream("finetune", Some(&format!("job:{}", pre.id)), &[]);
        ft_spec.priority = 9;
        let ft = submit(&mut c, ft_spec, now);
        assert_eq!(ft.waiting_for, std::slice::from_ref(&pre.id));
        assert_eq!(ft.message, format!("waiting for {}", pre.id));
        // The waiting job is first in the queue but holds nothing up.
        let other = submit(&mut c, spec(1, 0, 0), now);
        assert_eq!(state(&c, &other.id), Some(State::Running));
        assert_eq!(state(&c, &ft.id), Some(State::Queued));
        let first = beat(&mut c, "a", vec![], now);
        assert_eq!(first.assignments.len(), 2);
        assert!(
            first
                .assignments
                .iter()
                .all(|a| a.rank.as_ref().is_some_and(|r| r.job_id != ft.id))
        );
        checkpoint(&mut c, &pre.id, 1, 4, "file:///out/checkpoints/000004");
        checkpoint(&mut c, &pre.id, 1, 8, "file:///out/checkpoints/000008");
        let resp = beat(&mut c, "a", vec![((pre.id.clone(), 1, 0), true)], now);
        assert_eq!(state(&c, &pre.id), Some(State::Succeeded));
        let j = c.job(&ft.id).expect("job");
        assert_eq!((j.state, j.generation), (State::Running, 1));
        assert!(j.waiting_for.is_empty());
        assert_eq!(
            j.init_resolved.as_deref(),
            Some("file:///out/checkpoints/000008")
        );
        let kinds: Vec<&str> = c.events[&ft.id].iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["submitted", "ready", "scheduled"]);
        // The workers get the checkpoint; users still see what they wrote.
        let assignment = resp
            .assignments
            .iter()
            .find(|a| a.rank.as_ref().is_some_and(|r| r.job_id == ft.id))
            .expect("the dependent job's assignment");
        let sent = JobSpec::from_json(&assignment.spec_json).expect("spec");
        assert_eq!(sent.init.as_deref(), Some("file:///out/checkpoints/000008"));
        assert!(j.to_pb().spec_json.contains(&format!("job:{}", pre.id)));
    }

    #[test]
    fn a_failed_dependency_fails_the_dependent_without_running_it() {
        let mut c = core();
        let now = Instant::now();
        register(&mut c, "a", 1, now);
        let pre = submit(&mut c, spec(1, 0, 0), now);
        let ft = submit(&mut c, downstream("finetune", None, &[&pre.id]), now);
        beat(&mut c, "a", vec![], now);
        let resp = beat(&mut c, "a", vec![((pre.id.clone(), 1, 0), false)], now);
        assert!(resp.assignments.is_empty(), "the dependent never runs");
        assert_eq!(state(&c, &pre.id), Some(State::Failed));
        let j = c.job(&ft.id).expect("job");
        assert_eq!((j.state, j.generation, j.started_ms), (State::Failed, 0, 0));
        assert!(j.waiting_for.is_empty(), "a final job waits for nothing");
        let (kind, message) = last_event(&c, &ft.id);
        assert_eq!(kind, "failed");
        assert!(
            message.contains(&format!("dependency {} ended FAILED", pre.id)),
            "{message}"
        );
        // A job submitted after a dependency already failed fails at once.
        let late = submit(&mut c, downstream("finetune", None, &[&pre.id]), now);
        assert_eq!(late.state, State::Failed);
    }

    #[test]
    fn cancelling_a_dependency_fails_the_dependent() {
        let mut c = core();
        let now = Instant::now();
        let pre = submit(&mut c, spec(1, 0, 0), now);
        // An evaluation needs a fine-tuned model: a pre-training job is refused at submit.
        let refused = c
            .submit(
                downstream("evaluate", Some(&format!("job:{}", pre.id)), &[]),
                now,
            )
            .map(|_| ())
            .unwrap_err();
        assert!(
            refused.to_string().contains("is a pretrain job"),
            "{refused}"
        );
        let ev = submit(
            &mut c,
            downstream("finetune", Some(&format!("job:{}", pre.id)), &[]),
            now,
        );
        c.cancel(&pre.id, "", now);
        assert_eq!(state(&c, &ev.id), Some(State::Failed));
        let (_, message) = last_event(&c, &ev.id);
        assert!(
            message.contains("ended CANCELLED: cancelled by a user"),
            "{message}"
        );
        // Cancelling the dependent itself while it waits is a plain cancel.
        let pre2 = submit(&mut c, spec(1, 0, 0), now);
        let ft2 = submit(&mut c, downstream("finetune", None, &[&pre2.id]), now);
        assert_eq!(
            c.cancel(&ft2.id, "", now).map(|j| j.state),
            Some(State::Cancelled)
        );
        assert_eq!(state(&c, &pre2.id), Some(State::Queued));
    }

    #[test]
    fn a_failure_cascades_down_a_chain() {
        let mut c = core();
        let now = Instant::now();
        let a = submit(&mut c, spec(1, 0, 0), now);
        let b = submit(
            &mut c,
            downstream("finetune", Some(&format!("job:{}", a.id)), &[]),
            now,
        );
        let d = submit(
            &mut c,
            downstream("evaluate", Some(&format!("job:{}", b.id)), &[]),
            now,
        );
        let e = submit(&mut c, spec(1, 0, 0), now);
        let f = submit(&mut c, downstream("finetune", None, &[&e.id, &d.id]), now);
        let (batch_before, _) = c.take_batch();
        drop(batch_before);
        c.cancel(&a.id, "", now);
        for (id, cause) in [(&b.id, &a.id), (&d.id, &b.id), (&f.id, &d.id)] {
            assert_eq!(state(&c, id), Some(State::Failed), "{id}");
            let (_, message) = last_event(&c, id);
            assert!(
                message.contains(&format!("dependency {cause} ended")),
                "{id}: {message}"
            );
        }
        assert_eq!(
            state(&c, &e.id),
            Some(State::Queued),
            "unrelated jobs are untouched"
        );
        // The whole cascade is in the batch of the cancel.
        let (batch, _) = c.take_batch();
        let written: HashSet<&str> = batch.jobs.iter().map(|j| j.id.as_str()).collect();
        for id in [&a.id, &b.id, &d.id, &f.id] {
            assert!(written.contains(id.as_str()), "{id} not written");
        }
    }

    #[test]
    fn a_dependency_without_a_checkpoint_fails_the_dependent_with_the_reason() {
        let mut c = core();
        let now = Instant::now();
        register(&mut c, "a", 1, now);
        let pre = submit(&mut c, spec(1, 0, 0), now);
        let ft = submit(
            &mut c,
            downstream("finetune", Some(&format!("job:{}", pre.id)), &[]),
            now,
        );
        beat(&mut c, "a", vec![], now);
        let resp = beat(&mut c, "a", vec![((pre.id.clone(), 1, 0), true)], now);
        assert!(resp.assignments.is_empty());
        assert_eq!(state(&c, &ft.id), Some(State::Failed));
        let (_, message) = last_event(&c, &ft.id);
        assert!(
            message.contains("without committing a checkpoint"),
            "{message}"
        );
    }

    #[test]
    fn submit_refuses_unknown_dependencies_naming_the_field() {
        let mut c = core();
        let now = Instant::now();
        let field = |r: Result<JobRec, SubmitRefusal>| match r {
            Err(SubmitRefusal::Invalid(endofm_shared::Error::InvalidConfig { field, reason })) => {
                format!("{field}: {reason}")
            }
            other => panic!("accepted: {other:?}"),
        };
        let e = field(c.submit(downstream("finetune", None, &["job-7"]), now));
        assert!(e.starts_with("after[0]: no job `job-7`"), "{e}");
        let e = field(c.submit(downstream("evaluate", Some("job:job-9"), &[]), now));
        assert!(e.starts_with("init: no job `job-9`"), "{e}");
        assert!(c.list(&[]).is_empty(), "nothing was queued");
        assert_eq!(c.next_job, 1, "no id was used");
        // An evaluate job writes no weights; a job that succeeded without a checkpoint has none.
        register(&mut c, "a", 1, now);
        let pre = submit(&mut c, spec(1, 0, 0), now);
        let ev = submit(
            &mut c,
            downstream("evaluate", Some("/weights/x.safetensors"), &[]),
            now,
        );
        let e = field(c.submit(
            downstream("evaluate", Some(&format!("job:{}", ev.id)), &[]),
            now,
        ));
        assert!(e.contains("evaluate job"), "{e}");
        beat(&mut c, "a", vec![], now);
        beat(&mut c, "a", vec![((pre.id.clone(), 1, 0), true)], now);
        let e = field(c.submit(
            downstream("finetune", Some(&format!("job:{}", pre.id)), &[]),
            now,
        ));
        assert!(e.contains("without committing a checkpoint"), "{e}");
    }

    #[test]
    fn dependencies_and_results_survive_a_coordinator_restart() {
        let mut c = core();
        let now = Instant::now();
        register(&mut c, "a", 1, now);
        let pre = submit(&mut c, spec(1, 0, 0), now);
        let ft = submit(
            &mut c,
            downstream("finetune", Some(&format!("job:{}", pre.id)), &[]),
            now,
        );
        let ev = submit(
            &mut c,
            downstream("evaluate", Some(&format!("job:{}", ft.id)), &[]),
            now,
        );
        beat(&mut c, "a", vec![], now);
        checkpoint(&mut c, &pre.id, 1, 2, "/out/checkpoints/000002");
        let restart = |c: &Core| {
            let mut registry = Registry::default();
            let loaded = Loaded {
                jobs: c.jobs.values().cloned().collect(),
                events: c.events.clone(),
                next_job: c.next_job,
            };
            Core::new(loaded, Timing::default(), Metrics::new(&mut registry))
        };
        let mut c2 = restart(&c);
        assert_eq!(
            c2.job(&ft.id).map(|j| j.waiting_for.clone()),
            Some(vec![pre.id.clone()])
        );
        c2.register(
            &pb::RegisterRequest {
                worker_id: "a".into(),
                hostname: "a".into(),
                devices: vec![pb::Device {
                    kind: "cpu".into(),
                    index: 0,
                    ..Default::default()
                }],
                running: vec![pb::RankRef {
                    job_id: pre.id.clone(),
                    generation: 1,
                    rank: 0,
                }],
                labels: Default::default(),
            },
            now,
        );
        beat(&mut c2, "a", vec![((pre.id.clone(), 1, 0), true)], now);
        assert_eq!(state(&c2, &ft.id), Some(State::Running));
        checkpoint(&mut c2, &ft.id, 1, 10, "/out/finetune/checkpoints/best");
        beat(&mut c2, "a", vec![((ft.id.clone(), 1, 0), true)], now);
        let mut c3 = restart(&c2);
        let j = c3.job(&ev.id).expect("job");
        assert_eq!(j.state, State::Running);
        assert_eq!(
            j.init_resolved.as_deref(),
            Some("/out/finetune/checkpoints/best")
        );
        // The evaluation's result, reported just after its rank exited, is kept too.
        beat(&mut c3, "a", vec![], now);
        beat(&mut c3, "a", vec![((ev.id.clone(), 1, 0), true)], now);
        let result = |generation: u64, value: f64| pb::ReportRequest {
            worker_id: "a".into(),
            reports: vec![pb::RankReport {
                rank: Some(pb::RankRef {
                    job_id: ev.id.clone(),
                    generation,
                    rank: 0,
                }),
                report: Some(pb::rank_report::Report::Result(pb::JobResult {
                    headline: "test_f1".into(),
                    value,
                    metrics: [("test_f1".to_string(), value), ("test_acc".into(), 0.9)]
                        .into_iter()
                        .collect(),
                    report: "/out/evaluate/report.json".into(),
                    ..Default::default()
                })),
            }],
        };
        c3.report(&result(1, 0.931));
        c3.report(&result(7, 0.1)); // another attempt's: ignored
        let c4 = restart(&c3);
        let r = c4
            .job(&ev.id)
            .and_then(|j| j.result.clone())
            .expect("result");
        assert_eq!(
            (r.headline.as_str(), r.value, r.generation),
            ("test_f1", 0.931, 1)
        );
        assert_eq!(r.report, "/out/evaluate/report.json");
        let shown = c4
            .job(&ev.id)
            .map(|j| j.to_pb())
            .and_then(|j| j.result)
            .expect("wire");
        assert_eq!(shown.metrics.len(), 2);
        assert_eq!(last_event(&c4, &ev.id).0, "result");
    }

    fn exit_with(
        core: &mut Core,
        worker: &str,
        key: RankKey,
        class: FailureClass,
        message: &str,
        now: Instant,
    ) -> pb::HeartbeatResponse {
        core.heartbeat(
            &pb::HeartbeatRequest {
                worker_id: worker.into(),
                running: vec![],
                exited: vec![pb::RankExit {
                    rank: Some(rank_ref(&key)),
                    success: false,
                    message: message.into(),
                    failure_class: class.name().into(),
                }],
            },
            now,
        )
    }

    /// Issue 11 item 7: the same spec submitted twice no longer runs twice into one output.
    #[test]
    fn a_live_job_owns_its_output() {
        let mut c = core();
        let now = Instant::now();
        register(&mut c, "a", 2, now);
        let first = submit(&mut c, spec(1, 0, 0), now);
        let same = first.spec.clone();
        match c.submit(same.clone(), now) {
            Err(SubmitRefusal::Conflict(endofm_shared::Error::InvalidConfig { field, reason })) => {
                assert_eq!(field, "output");
                assert!(reason.contains(&first.id), "{reason}");
                assert!(reason.contains("after"), "{reason}");
            }
            other => panic!("accepted: {other:?}"),
        }
        // Nested either way is the same folder tree; a sibling is not.
        let mut inside = same.clone();
        inside.output = format!("{}/sub", same.output);
        assert!(matches!(
            c.submit(inside, now),
            Err(SubmitRefusal::Conflict(_))
        ));
        let mut around = same.clone();
        around.output = "/out".into();
        assert!(matches!(
            c.submit(around, now),
            Err(SubmitRefusal::Conflict(_))
        ));
        let mut sibling = same.clone();
        sibling.output = format!("{}-b", same.output);
        assert!(c.submit(sibling, now).is_ok());
        // Queued behind the owner: accepted, and it waits.
        let mut behind = same.clone();
        behind.after = vec![first.id.clone()];
        let behind = c.submit(behind, now).expect("queued behind the owner");
        assert_eq!(state(&c, &behind.id), Some(State::Queued));
        // A queued job (waiting for devices) owns its output too.
        let big = submit(&mut c, spec(5, 0, 0), now);
        assert!(matches!(
            c.submit(big.spec.clone(), now),
            Err(SubmitRefusal::Conflict(_))
        ));
        // Once the owner ended, the output is free again.
        beat(&mut c, "a", vec![((first.id.clone(), 1, 0), true)], now);
        assert_eq!(state(&c, &first.id), Some(State::Succeeded));
        c.cancel(&behind.id, "", now);
        assert!(c.submit(same, now).is_ok());
    }

    /// Issue 11 item 8: a deterministic failure ends the job at once, whatever restarts are
    /// left, and the job says why.
    #[test]
    fn deterministic_failures_are_not_restarted() {
        for class in [FailureClass::NonFiniteLoss, FailureClass::InvalidInput] {
            let mut c = core();
            let now = Instant::now();
            register(&mut c, "a", 2, now);
            let job = submit(&mut c, spec(2, 0, 3), now);
            beat(&mut c, "a", vec![], now);
            let resp = exit_with(
                &mut c,
                "a",
                (job.id.clone(), 1, 0),
                class,
                "error: input `loss`: is NaN at step 3",
                now,
            );
            assert_eq!(resp.stop.len(), 1, "the other rank is stopped");
            let j = c.job(&job.id).expect("job");
            assert_eq!((j.state, j.restarts), (State::Failed, 0), "{class}");
            assert_eq!(j.failure_class, Some(class));
            assert!(j.message.contains(class.name()), "{}", j.message);
            assert!(j.message.contains("without a restart"), "{}", j.message);
            let pb = j.to_pb();
            assert_eq!(pb.failure_class, class.name());
        }
    }

    /// Issue 11 item 8: transient failures restart, each after a longer backoff; the waiting
    /// job holds nothing up and is placed by the timer once its backoff ended.
    #[test]
    fn transient_failures_restart_after_a_growing_backoff() {
        let timing = Timing {
            restart_backoff: Duration::from_secs(2),
            ..Timing::default()
        };
        assert_eq!(timing.backoff(1), Duration::from_secs(2));
        assert_eq!(timing.backoff(3), Duration::from_secs(8));
        assert_eq!(timing.backoff(40), timing.restart_backoff_max);
        for class in [
            FailureClass::Storage,
            FailureClass::Collective,
            FailureClass::Unknown,
        ] {
            let mut c = core_with(timing);
            let t0 = Instant::now();
            register(&mut c, "a", 1, t0);
            let job = submit(&mut c, spec(1, 0, 3), t0);
            beat(&mut c, "a", vec![], t0);
            exit_with(&mut c, "a", (job.id.clone(), 1, 0), class, "boom", t0);
            let j = c.job(&job.id).expect("job");
            assert_eq!((j.state, j.restarts), (State::Queued, 1), "{class}");
            assert!(j.to_pb().not_before_unix_ms > 0);
            assert!(j.message.contains(class.name()), "{}", j.message);
            // Another job may use the free device meanwhile.
            let other = submit(&mut c, spec(1, 0, 0), t0);
            assert_eq!(state(&c, &other.id), Some(State::Running));
            beat(&mut c, "a", vec![((other.id.clone(), 1, 0), true)], t0);
            // Not before the backoff (ticks keep the worker's lease alive).
            let t1 = t0 + Duration::from_millis(1900);
            beat(&mut c, "a", vec![], t1);
            c.tick(t1);
            assert_eq!(state(&c, &job.id), Some(State::Queued));
            let t2 = t0 + Duration::from_millis(2100);
            c.tick(t2);
            assert_eq!(state(&c, &job.id), Some(State::Running));
            assert_eq!(
                c.job(&job.id).map(|j| j.to_pb().not_before_unix_ms),
                Some(0)
            );
            // The second restart waits twice as long.
            exit_with(&mut c, "a", (job.id.clone(), 2, 0), class, "boom", t2);
            c.tick(t2 + Duration::from_millis(3900));
            assert_eq!(state(&c, &job.id), Some(State::Queued));
            beat(&mut c, "a", vec![], t2 + Duration::from_millis(3900));
            c.tick(t2 + Duration::from_millis(4100));
            assert_eq!(state(&c, &job.id), Some(State::Running));
        }
    }

    /// Issue 11 item 9: a coordinator stalled for 30 s (SIGSTOP) does not declare its workers
    /// lost when it continues; a worker that stays silent afterwards still is.
    #[test]
    fn leases_restart_after_the_coordinators_own_stall() {
        let mut c = core();
        let t0 = Instant::now();
        register(&mut c, "a", 1, t0);
        register(&mut c, "b", 1, t0);
        let job = submit(&mut c, spec(2, 0, 3), t0);
        beat(&mut c, "a", vec![], t0);
        beat(&mut c, "b", vec![], t0);
        c.tick(t0);
        // Stopped for 30 s: the first tick after it sees the gap.
        let resumed = t0 + Duration::from_secs(30);
        c.tick(resumed);
        assert_eq!(state(&c, &job.id), Some(State::Running));
        assert_eq!(c.job(&job.id).map(|j| j.restarts), Some(0));
        // a heartbeats again, b never does: b's fresh lease runs out on time.
        let mut t = resumed;
        while t < resumed + Duration::from_secs(12) {
            t += Duration::from_millis(500);
            beat(&mut c, "a", vec![], t);
            c.tick(t);
        }
        let j = c.job(&job.id).expect("job");
        assert_eq!((j.state, j.restarts), (State::Queued, 1));
        let events: Vec<String> = c.events[&job.id]
            .iter()
            .map(|e| e.message.clone())
            .collect();
        assert!(
            events.iter().any(|e| e.contains("worker b lost")),
            "{events:?}"
        );
        // Without a stall, a silent worker is lost after one lease, as before.
        let mut c = core();
        register(&mut c, "a", 1, t0);
        let job = submit(&mut c, spec(1, 0, 3), t0);
        let mut t = t0;
        while t < t0 + Duration::from_secs(11) {
            t += Duration::from_millis(500);
            c.tick(t);
        }
        assert_eq!(c.job(&job.id).map(|j| j.restarts), Some(1));
    }

    /// Issue 11 item 9: a checkpoint report that arrives after its attempt failed still counts
    /// (the restart resumes from it, and says so).
    #[test]
    fn a_late_checkpoint_report_of_a_failed_attempt_is_kept() {
        let mut c = core();
        let now = Instant::now();
        register(&mut c, "a", 1, now);
        let job = submit(&mut c, spec(1, 0, 3), now);
        beat(&mut c, "a", vec![], now);
        checkpoint(&mut c, &job.id, 1, 4, "/out/ckpt/4");
        exit_with(
            &mut c,
            "a",
            (job.id.clone(), 1, 0),
            FailureClass::WorkerLost,
            "x",
            now,
        );
        checkpoint(&mut c, &job.id, 1, 6, "/out/ckpt/6");
        let j = c.job(&job.id).expect("job");
        assert_eq!(j.last_checkpoint.as_ref().map(|c| c.step), Some(6));
        assert!(j.resume_point().contains("step 6"));
        // An older one does not replace it; a future generation is not trusted.
        checkpoint(&mut c, &job.id, 1, 5, "/out/ckpt/5");
        checkpoint(&mut c, &job.id, 9, 50, "/out/ckpt/50");
        let j = c.job(&job.id).expect("job");
        assert_eq!(j.last_checkpoint.as_ref().map(|c| c.step), Some(6));
    }

    /// Issue 11 item 6: user and rank text is bounded in every stored message and event.
    #[test]
    fn stored_messages_never_hold_unbounded_user_text() {
        let mut c = core();
        let now = Instant::now();
        register(&mut c, "a", 1, now);
        let huge = "y".repeat(1 << 20);
        let job = submit(&mut c, spec(1, 0, 3), now);
        beat(&mut c, "a", vec![], now);
        c.report(&pb::ReportRequest {
            worker_id: "a".into(),
            reports: vec![pb::RankReport {
                rank: Some(rank_ref(&(job.id.clone(), 1, 0))),
                report: Some(pb::rank_report::Report::Log(pb::LogLine {
                    unix_ms: 0,
                    level: "warn".into(),
                    message: huge.clone(),
                })),
            }],
        });
        exit_with(
            &mut c,
            "a",
            (job.id.clone(), 1, 0),
            FailureClass::Storage,
            &huge,
            now,
        );
        let queued = submit(&mut c, spec(1, 0, 0), now);
        c.cancel(&queued.id, &huge, now);
        for id in [&job.id, &queued.id] {
            let j = c.job(id).expect("job");
            assert!(
                j.message.len() <= 4 * MESSAGE_CHARS + 64,
                "{}",
                j.message.len()
            );
            for e in &c.events[id] {
                assert!(
                    e.message.len() <= 4 * MESSAGE_CHARS + 64,
                    "{}: {}",
                    e.kind,
                    e.message.len()
                );
            }
        }
        assert!(c.job(&queued.id).unwrap().message.len() < 300);
    }

    /// Issue 11 item 8: when a peer's collective error reaches the coordinator before the rank
    /// that hit the NaN, the restart it queued is cancelled by the deterministic cause.
    #[test]
    fn a_deterministic_cause_arriving_second_still_ends_the_job() {
        let mut c = core_with(Timing {
            restart_backoff: Duration::from_secs(1),
            ..Timing::default()
        });
        let now = Instant::now();
        register(&mut c, "a", 2, now);
        let job = submit(&mut c, spec(2, 0, 3), now);
        beat(&mut c, "a", vec![], now);
        exit_with(
            &mut c,
            "a",
            (job.id.clone(), 1, 0),
            FailureClass::Collective,
            "peer closed",
            now,
        );
        assert_eq!(
            c.job(&job.id).map(|j| (j.state, j.restarts)),
            Some((State::Queued, 1))
        );
        exit_with(
            &mut c,
            "a",
            (job.id.clone(), 1, 1),
            FailureClass::NonFiniteLoss,
            "loss is NaN",
            now,
        );
        let j = c.job(&job.id).expect("job");
        assert_eq!(j.state, State::Failed);
        assert_eq!(j.failure_class, Some(FailureClass::NonFiniteLoss));
        assert!(j.message.contains("non_finite_loss"), "{}", j.message);
        // It is not placed when the backoff ends.
        c.tick(now + Duration::from_secs(2));
        assert_eq!(state(&c, &job.id), Some(State::Failed));
        assert!(c.queue.is_empty());
    }
}
