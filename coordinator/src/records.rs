//! What the coordinator persists: job records and their append-only event logs, as serde types
//! independent of the wire format (so the API can evolve without rewriting stored state), and
//! their conversions to `endofm.v1` messages.

use endofm_proto::v1 as pb;
use endofm_shared::JobSpec;
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Life-cycle state of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Waiting for a gang of free devices.
    Queued,
    /// An attempt is placed.
    Running,
    /// Every rank finished.
    Succeeded,
    /// An attempt failed with no restarts left.
    Failed,
    /// Cancelled by a user.
    Cancelled,
}

impl State {
    /// Every state, in display order.
    pub const ALL: [State; 5] = [
        State::Queued,
        State::Running,
        State::Succeeded,
        State::Failed,
        State::Cancelled,
    ];

    /// Whether the job will not change again.
    pub fn is_final(self) -> bool {
        matches!(self, State::Succeeded | State::Failed | State::Cancelled)
    }

    /// Lower-case name.
    pub fn label(self) -> &'static str {
        self.to_pb().label()
    }

    /// The wire enum.
    pub fn to_pb(self) -> pb::JobState {
        match self {
            State::Queued => pb::JobState::Queued,
            State::Running => pb::JobState::Running,
            State::Succeeded => pb::JobState::Succeeded,
            State::Failed => pb::JobState::Failed,
            State::Cancelled => pb::JobState::Cancelled,
        }
    }

    /// From the wire enum (`None` for UNSPECIFIED).
    pub fn from_pb(state: pb::JobState) -> Option<Self> {
        match state {
            pb::JobState::Unspecified => None,
            pb::JobState::Queued => Some(State::Queued),
            pb::JobState::Running => Some(State::Running),
            pb::JobState::Succeeded => Some(State::Succeeded),
            pb::JobState::Failed => Some(State::Failed),
            pb::JobState::Cancelled => Some(State::Cancelled),
        }
    }
}

/// Where rank `rank` of the current attempt runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRec {
    /// Rank in the attempt.
    pub rank: u32,
    /// Worker holding it.
    pub worker_id: String,
    /// Device index on that worker.
    pub device_index: u32,
}

/// A committed checkpoint reported by rank 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRec {
    /// Steps completed.
    pub step: u64,
    /// Folder holding the manifest.
    pub uri: String,
    /// Attempt that wrote it.
    pub generation: u64,
}

/// The latest progress of rank 0.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgressRec {
    /// Steps done.
    pub step: u64,
    /// Steps of the run.
    pub total_steps: u64,
    /// Epoch.
    pub epoch: u32,
    /// Loss.
    pub loss: f64,
    /// Learning rate.
    pub lr: f64,
    /// Clips/s over all ranks.
    pub samples_per_s: f64,
    /// Seconds waiting for data in the last step.
    pub data_wait_s: f64,
    /// Seconds of the last step.
    pub step_s: f64,
    /// Estimated seconds left.
    pub eta_s: f64,
    /// All-reduce seconds so far (this attempt).
    pub allreduce_s: f64,
    /// All-reduce bytes so far (this attempt).
    pub allreduce_bytes: u64,
    /// Clips skipped so far.
    pub clips_failed: u64,
}

impl ProgressRec {
    /// From the wire.
    pub fn from_pb(p: &pb::Progress) -> Self {
        Self {
            step: p.step,
            total_steps: p.total_steps,
            epoch: p.epoch,
            loss: p.loss,
            lr: p.lr,
            samples_per_s: p.samples_per_s,
            data_wait_s: p.data_wait_s,
            step_s: p.step_s,
            eta_s: p.eta_s,
            allreduce_s: p.allreduce_s,
            allreduce_bytes: p.allreduce_bytes,
            clips_failed: p.clips_failed,
        }
    }

    /// To the wire.
    pub fn to_pb(&self) -> pb::Progress {
        pb::Progress {
            step: self.step,
            total_steps: self.total_steps,
            epoch: self.epoch,
            loss: self.loss,
            lr: self.lr,
            samples_per_s: self.samples_per_s,
            data_wait_s: self.data_wait_s,
            step_s: self.step_s,
            eta_s: self.eta_s,
            allreduce_s: self.allreduce_s,
            allreduce_bytes: self.allreduce_bytes,
            clips_failed: self.clips_failed,
        }
    }
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRec {
    /// `job-N`.
    pub id: String,
    /// Submission order (FIFO within a priority).
    pub seq: u64,
    /// The validated spec.
    pub spec: JobSpec,
    /// State.
    pub state: State,
    /// Generation of the current (last) attempt; 0 before the first placement.
    pub generation: u64,
    /// Attempts restarted so far.
    pub restarts: u32,
    /// Submission time.
    pub submitted_ms: i64,
    /// First placement time (0 if never).
    pub started_ms: i64,
    /// Final-state time (0 if not final).
    pub finished_ms: i64,
    /// Why the job is in its state.
    pub message: String,
    /// Rank map of the current attempt (empty when queued or final).
    pub placement: Vec<PlacementRec>,
    /// Ranks of the current attempt that finished successfully.
    #[serde(default)]
    pub ranks_done: Vec<u32>,
    /// Newest committed checkpoint.
    pub last_checkpoint: Option<CheckpointRec>,
    /// Latest progress (persisted with state changes and checkpoints).
    pub progress: Option<ProgressRec>,
    /// Number of events logged so far (the next event gets `events + 1`).
    pub events: u64,
}

impl JobRec {
    /// Position in the queue: higher priority first, then submission order.
    pub fn queue_key(&self) -> (std::cmp::Reverse<i32>, u64, String) {
        (
            std::cmp::Reverse(self.spec.priority),
            self.seq,
            self.id.clone(),
        )
    }

    /// Where the next attempt resumes, for events.
    pub fn resume_point(&self) -> String {
        self.last_checkpoint
            .as_ref()
            .map_or("from the start (no checkpoint yet)".to_string(), |c| {
                format!("from checkpoint step {} ({})", c.step, c.uri)
            })
    }

    /// The wire form.
    pub fn to_pb(&self) -> pb::Job {
        pb::Job {
            id: self.id.clone(),
            name: self.spec.name.clone(),
            kind: self.spec.kind.name().to_string(),
            state: self.state.to_pb() as i32,
            priority: self.spec.priority,
            world_size: self.spec.resources.world_size,
            device: self.spec.resources.device.name().to_string(),
            generation: self.generation,
            restarts: self.restarts,
            max_restarts: self.spec.max_restarts,
            submitted_unix_ms: self.submitted_ms,
            started_unix_ms: self.started_ms,
            finished_unix_ms: self.finished_ms,
            message: self.message.clone(),
            progress: self.progress.as_ref().map(ProgressRec::to_pb),
            last_checkpoint: self.last_checkpoint.as_ref().map(|c| pb::CheckpointRef {
                step: c.step,
                uri: c.uri.clone(),
                generation: c.generation,
            }),
            placement: self
                .placement
                .iter()
                .map(|p| pb::Placement {
                    rank: p.rank,
                    worker_id: p.worker_id.clone(),
                    device_index: p.device_index,
                })
                .collect(),
            spec_json: self.spec.to_json(),
        }
    }
}

/// One entry of a job's append-only log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRec {
    /// Position, from 1.
    pub seq: u64,
    /// When.
    pub unix_ms: i64,
    /// What kind of event (see the proto's `Event.kind`).
    pub kind: String,
    /// Details for people.
    pub message: String,
    /// Attempt it concerns.
    pub generation: u64,
    /// Rank it concerns, -1 for the job.
    pub rank: i32,
}

impl EventRec {
    /// The wire form.
    pub fn to_pb(&self) -> pb::Event {
        pb::Event {
            seq: self.seq,
            unix_ms: self.unix_ms,
            kind: self.kind.clone(),
            message: self.message.clone(),
            generation: self.generation,
            rank: self.rank,
        }
    }
}
