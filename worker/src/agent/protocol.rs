//! What flows between the agent and its rank processes: the assignment file the agent writes for
//! a rank, and the JSON lines a rank prints on stdout (`{"type":"progress",..}` after every step,
//! `{"type":"checkpoint",..}` when a checkpoint is committed, `{"type":"result",..}` once at the
//! end of a fine-tuning or evaluation run). Non-finite numbers travel as `null` and come back as
//! NaN.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use endofm_proto::v1;

use crate::{Error, Result};

/// One rank of one attempt, as the agent hands it to the rank process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssignmentFile {
    /// The job.
    pub job_id: String,
    /// The attempt.
    pub generation: u64,
    /// This rank.
    pub rank: u32,
    /// Ranks of the attempt.
    pub world_size: u32,
    /// `cpu` or `cuda`.
    pub device_kind: String,
    /// Index of the device on this worker.
    pub device_index: u32,
    /// The job's validated spec (JSON).
    pub spec_json: String,
}

impl AssignmentFile {
    /// From the coordinator's assignment; refuses one without a rank.
    pub fn from_proto(a: &v1::Assignment) -> Result<Self> {
        let rank = a.rank.as_ref().ok_or_else(|| Error::Service {
            what: "assignment".into(),
            reason: "has no rank".into(),
        })?;
        Ok(Self {
            job_id: rank.job_id.clone(),
            generation: rank.generation,
            rank: rank.rank,
            world_size: a.world_size,
            device_kind: a.device_kind.clone(),
            device_index: a.device_index,
            spec_json: a.spec_json.clone(),
        })
    }

    /// The rank reference used in every call about this rank.
    pub fn rank_ref(&self) -> v1::RankRef {
        v1::RankRef {
            job_id: self.job_id.clone(),
            generation: self.generation,
            rank: self.rank,
        }
    }
}

fn nan_for_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn nan_for_null_values<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<BTreeMap<String, f64>, D::Error> {
    let map = BTreeMap::<String, Option<f64>>::deserialize(d)?;
    Ok(map
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or(f64::NAN)))
        .collect())
}

/// A rank's progress after one step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgressLine {
    /// Steps completed in total.
    pub step: u64,
    /// The step this run ends at.
    pub total_steps: u64,
    /// Epoch of the last step.
    pub epoch: u32,
    /// Loss of the last step (this rank's batch).
    #[serde(deserialize_with = "nan_for_null")]
    pub loss: f64,
    /// Learning rate of the last step.
    #[serde(deserialize_with = "nan_for_null")]
    pub lr: f64,
    /// Clips per second over all ranks.
    #[serde(deserialize_with = "nan_for_null")]
    pub samples_per_s: f64,
    /// Seconds the step waited for data.
    #[serde(deserialize_with = "nan_for_null")]
    pub data_wait_s: f64,
    /// Seconds of the step.
    #[serde(deserialize_with = "nan_for_null")]
    pub step_s: f64,
    /// Estimated seconds to the end of the run.
    #[serde(deserialize_with = "nan_for_null")]
    pub eta_s: f64,
    /// Seconds in all-reduce during the step.
    #[serde(deserialize_with = "nan_for_null")]
    pub allreduce_s: f64,
    /// Bytes all-reduced during the step.
    pub allreduce_bytes: u64,
    /// Clips skipped so far.
    pub clips_failed: u64,
    /// Pre-training: mean entropy of the centred, sharpened teacher distribution (nats; NaN
    /// for other tasks).
    #[serde(default = "nan", deserialize_with = "nan_for_null")]
    pub teacher_entropy: f64,
    /// Pre-training: entropy of the teacher distribution's batch mean (nats).
    #[serde(default = "nan", deserialize_with = "nan_for_null")]
    pub batch_entropy: f64,
    /// Pre-training: student–teacher KL (nats).
    #[serde(default = "nan", deserialize_with = "nan_for_null")]
    pub kl: f64,
    /// Pre-training: the collapse sustained now (`uniform`, `dominant_prototype`), or empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub collapse: String,
}

fn nan() -> f64 {
    f64::NAN
}

impl ProgressLine {
    /// As the API's progress message.
    pub fn to_proto(&self) -> v1::Progress {
        v1::Progress {
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
            collapse: crate::train::diagnostics::Collapse::from_name(&self.collapse)
                .map(|c| c.sentence())
                .unwrap_or_default(),
        }
    }
}

/// One line of a rank's stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RankLine {
    /// After every step.
    Progress(ProgressLine),
    /// A committed checkpoint.
    Checkpoint {
        /// Steps completed when it was taken.
        step: u64,
        /// Its folder.
        uri: String,
    },
    /// The outcome of a fine-tuning or evaluation run (rank 0, once, before it exits).
    Result {
        /// The metric that sums the run up (e.g. `test_f1`).
        headline: String,
        /// Its value.
        #[serde(deserialize_with = "nan_for_null")]
        value: f64,
        /// Every metric by name.
        #[serde(deserialize_with = "nan_for_null_values")]
        metrics: BTreeMap<String, f64>,
        /// Where the full report (`report.json`) was written.
        report: String,
    },
    /// Why the rank is about to exit with a failure (printed last): the class decides whether
    /// the coordinator restarts the attempt.
    Failure {
        /// The class ([`endofm_shared::FailureClass`]).
        class: endofm_shared::FailureClass,
        /// The error, cut to a bounded length.
        reason: String,
    },
}

impl RankLine {
    /// Parses one stdout line; `None` for anything else.
    pub fn parse(line: &str) -> Option<Self> {
        serde_json::from_str(line.trim()).ok()
    }

    /// The line as printed (one JSON object, no newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapse_diagnostics_ride_on_progress_lines() {
        // A line without them (another task, an older rank) reads as NaN / no collapse.
        let Some(RankLine::Progress(old)) = RankLine::parse(
            r#"{"type":"progress","step":1,"total_steps":2,"epoch":0,"loss":1.0,"lr":0.1,"samples_per_s":1.0,"data_wait_s":0.0,"step_s":1.0,"eta_s":1.0,"allreduce_s":0.0,"allreduce_bytes":0,"clips_failed":0}"#,
        ) else {
            panic!("older line not parsed");
        };
        assert!(old.teacher_entropy.is_nan() && old.kl.is_nan() && old.collapse.is_empty());
        let p = ProgressLine {
            teacher_entropy: 6.2,
            batch_entropy: 6.23,
            kl: 0.01,
            collapse: "uniform".into(),
            ..Default::default()
        };
        let Some(RankLine::Progress(back)) =
            RankLine::parse(&RankLine::Progress(p.clone()).to_json())
        else {
            panic!("not parsed");
        };
        assert_eq!(back, p);
        // The coordinator gets a sentence naming the kind and what helps (`endofm status`).
        let sentence = back.to_proto().collapse;
        assert!(
            sentence.contains("uniform collapse") && sentence.contains("teacher_temp"),
            "{sentence}"
        );
        assert_eq!(ProgressLine::default().to_proto().collapse, "");
    }

    #[test]
    fn progress_lines_round_trip_and_survive_nan() {
        let p = ProgressLine {
            step: 3,
            total_steps: 10,
            epoch: 1,
            loss: f64::NAN,
            lr: 0.5,
            samples_per_s: 2.0,
            allreduce_bytes: 1024,
            ..Default::default()
        };
        let text = RankLine::Progress(p.clone()).to_json();
        assert!(
            text.starts_with(r#"{"type":"progress","step":3,"#),
            "{text}"
        );
        let Some(RankLine::Progress(back)) = RankLine::parse(&text) else {
            panic!("not parsed: {text}");
        };
        assert!(back.loss.is_nan());
        assert_eq!((back.step, back.lr, back.allreduce_bytes), (3, 0.5, 1024));
        assert_eq!(back.to_proto().total_steps, 10);
        let c =
            RankLine::parse(r#"{"type":"checkpoint","step":2,"uri":"file:///o/checkpoints/x"}"#);
        assert_eq!(
            c,
            Some(RankLine::Checkpoint {
                step: 2,
                uri: "file:///o/checkpoints/x".into()
            })
        );
        assert_eq!(RankLine::parse("not json"), None);
        let result = RankLine::Result {
            headline: "test_f1".into(),
            value: 0.93,
            metrics: [("test_f1".to_string(), 0.93), ("test_auc".into(), f64::NAN)]
                .into_iter()
                .collect(),
            report: "file:///o/report.json".into(),
        };
        let text = result.to_json();
        assert!(
            text.starts_with(r#"{"type":"result","headline":"test_f1","value":0.93,"#),
            "{text}"
        );
        assert!(text.contains(r#""test_auc":null"#), "{text}");
        let Some(RankLine::Result {
            headline,
            value,
            metrics,
            report,
        }) = RankLine::parse(&text)
        else {
            panic!("not parsed: {text}");
        };
        assert_eq!((headline.as_str(), value), ("test_f1", 0.93));
        assert!(metrics["test_auc"].is_nan() && metrics["test_f1"] == 0.93);
        assert_eq!(report, "file:///o/report.json");
        let nan = RankLine::parse(
            r#"{"type":"result","headline":"val_f1","value":null,"metrics":{},"report":"r"}"#,
        );
        assert!(matches!(nan, Some(RankLine::Result { value, .. }) if value.is_nan()));
        assert_eq!(RankLine::parse(r#"{"type":"other"}"#), None);
    }
}
