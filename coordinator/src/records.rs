//! What the coordinator persists: job records and their append-only event logs, as serde types
//! independent of the wire format (so the API can evolve without rewriting stored state), and
//! their conversions to `endofm.v1` messages.

use std::collections::BTreeMap;

use endofm_proto::v1 as pb;
use endofm_shared::{FailureClass, JobSpec};
use serde::{Deserialize, Deserializer, Serialize};

/// JSON has no NaN or infinity: serde_json writes them as `null`; this reads `null` back as NaN
/// (a record holding a diverged loss must still load).
fn nan_for_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// [`nan_for_null`] for the values of a map.
fn nan_for_null_values<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<BTreeMap<String, f64>, D::Error> {
    let map = BTreeMap::<String, Option<f64>>::deserialize(d)?;
    Ok(map
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or(f64::NAN)))
        .collect())
}

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
    #[serde(deserialize_with = "nan_for_null")]
    pub loss: f64,
    /// Learning rate.
    #[serde(deserialize_with = "nan_for_null")]
    pub lr: f64,
    /// Clips/s over all ranks.
    #[serde(deserialize_with = "nan_for_null")]
    pub samples_per_s: f64,
    /// Seconds waiting for data in the last step.
    #[serde(deserialize_with = "nan_for_null")]
    pub data_wait_s: f64,
    /// Seconds of the last step.
    #[serde(deserialize_with = "nan_for_null")]
    pub step_s: f64,
    /// Estimated seconds left.
    #[serde(deserialize_with = "nan_for_null")]
    pub eta_s: f64,
    /// All-reduce seconds so far (this attempt).
    #[serde(deserialize_with = "nan_for_null")]
    pub allreduce_s: f64,
    /// All-reduce bytes so far (this attempt).
    pub allreduce_bytes: u64,
    /// Clips skipped so far.
    pub clips_failed: u64,
    /// Pre-training: the collapse sustained now, as a sentence (empty when none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub collapse: String,
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
            collapse: p.collapse.clone(),
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
            collapse: self.collapse.clone(),
        }
    }
}

/// The result rank 0 reported at the end of a finetune or evaluate run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRec {
    /// The metric that sums the run up (e.g. `test_f1`).
    pub headline: String,
    /// Its value (NaN when it could not be computed).
    #[serde(deserialize_with = "nan_for_null")]
    pub value: f64,
    /// Every metric by name.
    #[serde(deserialize_with = "nan_for_null_values")]
    pub metrics: BTreeMap<String, f64>,
    /// Where the full report was written.
    pub report: String,
    /// The attempt that produced it.
    pub generation: u64,
    /// When the coordinator received it.
    pub unix_ms: i64,
}

impl ResultRec {
    /// From the wire (the generation is the reporting rank's).
    pub fn from_pb(r: &pb::JobResult, generation: u64) -> Self {
        Self {
            headline: r.headline.clone(),
            value: r.value,
            metrics: r.metrics.clone(),
            report: r.report.clone(),
            generation,
            unix_ms: now_ms(),
        }
    }

    /// To the wire.
    pub fn to_pb(&self) -> pb::JobResult {
        pb::JobResult {
            headline: self.headline.clone(),
            value: self.value,
            metrics: self.metrics.clone(),
            report: self.report.clone(),
            generation: self.generation,
            unix_ms: self.unix_ms,
        }
    }

    /// One line for people: `test_f1 0.9310 (report: /runs/eval/report.json)`.
    pub fn summary(&self) -> String {
        format!(
            "{} {:.4} (report: {})",
            self.headline, self.value, self.report
        )
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
    /// Dependencies (`after` and an `init = "job:<id>"`) that have not succeeded yet; the job
    /// is not placed while any remain.
    #[serde(default)]
    pub waiting_for: Vec<String>,
    /// The checkpoint `init = "job:<id>"` resolved to when the dependencies succeeded.
    #[serde(default)]
    pub init_resolved: Option<String>,
    /// Rank 0's result (finetune and evaluate jobs).
    #[serde(default)]
    pub result: Option<ResultRec>,
    /// Class of the last attempt failure (none while no attempt failed).
    #[serde(default)]
    pub failure_class: Option<FailureClass>,
    /// While a restart waits out its backoff: when the job may be placed (Unix ms; 0 otherwise).
    #[serde(default)]
    pub not_before_ms: i64,
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

    /// The spec as the workers receive it: JSON with every default filled in, and an
    /// `init = "job:<id>"` replaced by the checkpoint it resolved to.
    pub fn worker_spec_json(&self) -> String {
        match (&self.init_resolved, self.spec.init_job()) {
            (Some(uri), Some(_)) => JobSpec {
                init: Some(uri.clone()),
                ..self.spec.clone()
            }
            .to_json(),
            _ => self.spec.to_json(),
        }
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
            after: self.spec.dependencies(),
            waiting_for: self.waiting_for.clone(),
            init_resolved: self.init_resolved.clone().unwrap_or_default(),
            result: self.result.as_ref().map(ResultRec::to_pb),
            failure_class: self
                .failure_class
                .map(|c| c.name().to_string())
                .unwrap_or_default(),
            not_before_unix_ms: if self.state == State::Queued {
                self.not_before_ms
            } else {
                0
            },
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(spec: &str) -> JobRec {
        JobRec {
            id: "job-2".into(),
            seq: 2,
            spec: JobSpec::parse_auto(spec).expect("spec"),
            state: State::Queued,
            generation: 0,
            restarts: 0,
            submitted_ms: 1,
            started_ms: 0,
            finished_ms: 0,
            message: String::new(),
            placement: vec![],
            ranks_done: vec![],
            last_checkpoint: None,
            progress: None,
            events: 0,
            waiting_for: vec![],
            init_resolved: None,
            result: None,
            failure_class: None,
            not_before_ms: 0,
        }
    }

    const EVALUATE: &str = "kind = \"evaluate\"\ntask = \"classify\"\ninit = \"job:job-1\"\noutput = \"/o\"\n[data]\nuri = \"/d\"\n";

    #[test]
    fn a_collapse_warning_survives_the_store_format() {
        let mut j = job(EVALUATE);
        j.progress = Some(ProgressRec::from_pb(&pb::Progress {
            collapse: "uniform collapse: lower teacher_temp".into(),
            ..Default::default()
        }));
        let text = serde_json::to_string(&j).expect("encode");
        let back: JobRec = serde_json::from_str(&text).expect("decode");
        let p = back.progress.expect("progress");
        assert_eq!(p.to_pb().collapse, "uniform collapse: lower teacher_temp");
        // Progress stored before the field existed reads as no collapse.
        let old = text.replace(r#","collapse":"uniform collapse: lower teacher_temp""#, "");
        assert_ne!(old, text);
        let back: JobRec = serde_json::from_str(&old).expect("decode an older record");
        assert_eq!(back.progress.expect("progress").collapse, "");
    }

    #[test]
    fn non_finite_numbers_survive_the_store_format() {
        let mut j = job(EVALUATE);
        j.progress = Some(ProgressRec {
            loss: f64::NAN,
            eta_s: f64::INFINITY,
            ..Default::default()
        });
        j.result = Some(ResultRec {
            headline: "test_f1".into(),
            value: f64::NAN,
            metrics: [("test_f1".to_string(), f64::NAN), ("test_acc".into(), 0.5)]
                .into_iter()
                .collect(),
            report: "/o/report.json".into(),
            generation: 1,
            unix_ms: 3,
        });
        let text = serde_json::to_string(&j).expect("encode");
        let back: JobRec = serde_json::from_str(&text).expect("a NaN must not corrupt a record");
        let p = back.progress.expect("progress");
        assert!(p.loss.is_nan() && p.eta_s.is_nan());
        let r = back.result.expect("result");
        assert!(r.value.is_nan() && r.metrics["test_f1"].is_nan());
        assert_eq!(r.metrics["test_acc"], 0.5);
        // Records written before these fields existed still load.
        let mut old: serde_json::Value = serde_json::from_str(&text).expect("value");
        for field in ["waiting_for", "init_resolved", "result"] {
            old.as_object_mut().map(|o| o.remove(field));
        }
        let back: JobRec = serde_json::from_value(old).expect("old record");
        assert!(back.result.is_none() && back.waiting_for.is_empty());
    }

    #[test]
    fn workers_get_the_resolved_init_and_users_see_what_they_wrote() {
        let mut j = job(EVALUATE);
        assert_eq!(j.to_pb().after, ["job-1"]);
        j.init_resolved = Some("file:///runs/ft/checkpoints/000040".into());
        let worker = JobSpec::from_json(&j.worker_spec_json()).expect("worker spec");
        assert_eq!(
            worker.init.as_deref(),
            Some("file:///runs/ft/checkpoints/000040")
        );
        let shown = j.to_pb();
        assert!(shown.spec_json.contains("job:job-1"), "{}", shown.spec_json);
        assert_eq!(shown.init_resolved, "file:///runs/ft/checkpoints/000040");
    }
}
