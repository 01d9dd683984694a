//! The run report: one `report.json` per fine-tuning or evaluation run, with the metrics of
//! each split, the per-epoch history, the model selection, the configuration and the plots.
//! Generic over tasks: metrics are named numbers, with optional classification extras.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use endofm_shared::TaskKind;

use super::metrics::{BinaryMetrics, ConfusionMatrix, RocPoint};
use crate::{Error, Result};

/// File name of the report in a run's output folder.
pub const REPORT_FILE: &str = "report.json";

/// Format version written in [`Report::version`].
pub const REPORT_VERSION: u32 = 1;

/// The name of the split models are selected on.
pub const VALIDATION_SPLIT: &str = "val";

/// The metric a task is judged by (the paper's number): `f1` for classification (PolypDiag)
/// and detection (KUMC), `dice` for segmentation (CVC-12k).
pub fn primary_metric(task: TaskKind) -> &'static str {
    match task {
        TaskKind::Classify | TaskKind::Detect => "f1",
        TaskKind::Segment => "dice",
    }
}

/// Everything a run found, as written to `report.json`. Every number is finite
/// ([`Report::write`] refuses others; an undefined metric goes to
/// [`SplitMetrics::undefined`] with its reason instead).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// [`REPORT_VERSION`] at writing.
    pub version: u32,
    /// The downstream task.
    pub task: TaskKind,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Creation time, UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub created_utc: String,
    /// Where the backbone's weights came from (checkpoint and network, "random", ...).
    pub init: String,
    /// The run's configuration, as the run saw it.
    pub config: serde_json::Value,
    /// Name of the metric the task is judged by ([`primary_metric`]).
    pub primary_metric: String,
    /// The epoch whose model the split metrics describe, and why; `None` when no selection
    /// was made (an evaluation-only run).
    #[serde(default)]
    pub selection: Option<Selection>,
    /// One record per trained epoch, in order.
    #[serde(default)]
    pub history: Vec<EpochRecord>,
    /// Metrics of the selected model per split (`train`, `val`, `test`).
    #[serde(default)]
    pub splits: BTreeMap<String, SplitMetrics>,
    /// Remarks a reader needs to interpret the numbers, e.g. how the model was selected.
    #[serde(default)]
    pub notes: Vec<String>,
    /// Plot files written beside the report (names relative to its folder).
    #[serde(default)]
    pub plots: Vec<String>,
}

/// How the reported model was chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    /// The chosen epoch (numbered as the trainer numbers epochs, from 0).
    pub epoch: usize,
    /// The split the choice was made on (normally [`VALIDATION_SPLIT`]).
    pub split: String,
    /// The metric maximised.
    pub metric: String,
    /// Its value at the chosen epoch.
    pub value: f64,
}

/// What one epoch of training produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// The epoch (from 0).
    pub epoch: usize,
    /// Mean training loss over the epoch's steps; `None` when the epoch had no steps recorded.
    pub train_loss_mean: Option<f64>,
    /// Metrics on the validation split after the epoch; empty when it was not evaluated.
    #[serde(default)]
    pub val: BTreeMap<String, f64>,
}

/// Metrics of one split, generic over tasks, with the classification extras when they apply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitMetrics {
    /// Scalar metrics by name (`f1`, `auroc`, `dice`, `samples`, ...), all finite.
    pub metrics: BTreeMap<String, f64>,
    /// Metrics that could not be computed, with the reason (e.g. `auroc` on one class).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub undefined: BTreeMap<String, String>,
    /// Class names by class index (`["normal", "abnormal"]`); empty when not a classification.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class_names: Vec<String>,
    /// The confusion matrix (rows true, columns predicted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confusion: Option<ConfusionMatrix>,
    /// The ROC curve of a binary classification.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roc: Vec<RocPoint>,
}

impl SplitMetrics {
    /// Just scalar metrics (segmentation, detection).
    pub fn from_scalars(metrics: BTreeMap<String, f64>) -> Self {
        Self {
            metrics,
            ..Self::default()
        }
    }

    /// A binary classification's metrics, with its confusion matrix and ROC curve;
    /// `class_names` are classes 0 and 1.
    pub fn from_binary(m: &BinaryMetrics, class_names: [&str; 2]) -> Self {
        let mut undefined = BTreeMap::new();
        if let Some(reason) = &m.auroc_undefined {
            undefined.insert("auroc".to_string(), reason.clone());
        }
        Self {
            metrics: m.scalars(),
            undefined,
            class_names: class_names.map(str::to_string).to_vec(),
            confusion: Some(m.confusion.clone()),
            roc: m.roc.clone(),
        }
    }
}

impl Report {
    /// An empty report of `task` created now, judged by the task's [`primary_metric`].
    pub fn new(task: TaskKind, init: impl Into<String>, config: serde_json::Value) -> Self {
        let created_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            version: REPORT_VERSION,
            task,
            created_unix,
            created_utc: utc_timestamp(created_unix),
            init: init.into(),
            config,
            primary_metric: primary_metric(task).to_string(),
            selection: None,
            history: Vec::new(),
            splits: BTreeMap::new(),
            notes: Vec::new(),
            plots: Vec::new(),
        }
    }

    /// Chooses the epoch with the highest validation `metric` in the history (the first one
    /// on ties: a later epoch must be strictly better) and records it as the selection.
    /// `None` (and no change) when no epoch has that metric.
    pub fn select_best(&mut self, metric: &str) -> Option<&Selection> {
        let mut best: Option<(usize, f64)> = None;
        for r in &self.history {
            if let Some(&v) = r.val.get(metric)
                && best.is_none_or(|(_, b)| v > b)
            {
                best = Some((r.epoch, v));
            }
        }
        let (epoch, value) = best?;
        self.selection = Some(Selection {
            epoch,
            split: VALIDATION_SPLIT.to_string(),
            metric: metric.to_string(),
            value,
        });
        self.selection.as_ref()
    }

    /// The number to quote: `("{split}_{primary metric}", value)` from the `test` split,
    /// else `val`, else the first split (by name) that has the primary metric.
    pub fn headline(&self) -> Option<(String, f64)> {
        let metric = self.primary_metric.as_str();
        let of = |split: &str| {
            self.splits
                .get(split)
                .and_then(|s| s.metrics.get(metric))
                .map(|&v| (format!("{split}_{metric}"), v))
        };
        of("test").or_else(|| of(VALIDATION_SPLIT)).or_else(|| {
            self.splits.iter().find_map(|(name, s)| {
                s.metrics
                    .get(metric)
                    .map(|&v| (format!("{name}_{metric}"), v))
            })
        })
    }

    /// The first non-finite number, named by its place (`splits.test.metrics.f1`), if any.
    fn non_finite(&self) -> Option<(String, f64)> {
        let map = |prefix: String, m: &BTreeMap<String, f64>| {
            m.iter()
                .find(|(_, v)| !v.is_finite())
                .map(|(k, &v)| (format!("{prefix}.{k}"), v))
        };
        let selection = self
            .selection
            .as_ref()
            .filter(|s| !s.value.is_finite())
            .map(|s| ("selection.value".to_string(), s.value));
        let history = self.history.iter().find_map(|r| match r.train_loss_mean {
            Some(l) if !l.is_finite() => {
                Some((format!("history[epoch {}].train_loss_mean", r.epoch), l))
            }
            _ => map(format!("history[epoch {}].val", r.epoch), &r.val),
        });
        let splits = self
            .splits
            .iter()
            .find_map(|(name, s)| map(format!("splits.{name}.metrics"), &s.metrics));
        selection.or(history).or(splits)
    }

    /// Checks that every number is finite (JSON has no others).
    fn check_finite(&self) -> std::result::Result<(), String> {
        match self.non_finite() {
            Some((place, v)) => Err(format!(
                "{place} is {v}: a report holds finite numbers only (record an undefined metric under `undefined` with its reason)"
            )),
            None => Ok(()),
        }
    }

    /// The report as pretty-printed JSON (for object storage); refuses non-finite numbers.
    pub fn to_json(&self) -> Result<String> {
        let invalid = |reason| Error::EvalInput {
            what: "report".into(),
            reason,
        };
        self.check_finite().map_err(invalid)?;
        serde_json::to_string_pretty(self).map_err(|e| invalid(e.to_string()))
    }

    /// Writes the report to `path` (normally `<out>/report.json`) through a temporary file
    /// renamed into place, so a reader never sees half a report. Refuses non-finite numbers.
    pub fn write(&self, path: &Path) -> Result<()> {
        let report_error = |reason| Error::Report {
            path: path.to_path_buf(),
            reason,
        };
        self.check_finite().map_err(report_error)?;
        let text = serde_json::to_string_pretty(self).map_err(|e| report_error(e.to_string()))?;
        write_atomically(path, text.as_bytes(), "writing report")
    }

    /// Reads a report written by [`Report::write`].
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            action: "reading report",
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| Error::Report {
            path: path.to_path_buf(),
            reason: format!("not a readable report: {e}"),
        })
    }
}

/// Writes `bytes` to `path` by way of `path` + `.tmp` and a rename.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8], action: &'static str) -> Result<()> {
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".tmp");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    };
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (proleptic Gregorian calendar, UTC).
pub(crate) fn utc_timestamp(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    // Civil date from days since 1970-01-01, counting in 400-year eras that start on March 1st
    // so that the leap day is the last day of its year.
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3_600,
        secs % 3_600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::metrics::BinaryPrediction;

    fn epoch(epoch: usize, loss: f64, f1: f64) -> EpochRecord {
        EpochRecord {
            epoch,
            train_loss_mean: Some(loss),
            val: BTreeMap::from([("f1".to_string(), f1)]),
        }
    }

    fn classification_report() -> Report {
        let mut r = Report::new(
            TaskKind::Classify,
            "checkpoints/step-000001000 (teacher)",
            serde_json::json!({"epochs": 3, "lr": 1.5625e-5}),
        );
        r.history = vec![
            epoch(0, 0.69, 0.5),
            epoch(1, 0.41, 0.8),
            epoch(2, 0.30, 0.8),
        ];
        let samples = [(1, 0.9), (0, 0.2), (1, 0.4), (0, 0.6)]
            .map(|(l, s): (i64, f64)| BinaryPrediction::new(l, i64::from(s > 0.5), s).unwrap());
        let m = BinaryMetrics::from_predictions(&samples).unwrap();
        r.splits.insert(
            "test".into(),
            SplitMetrics::from_binary(&m, ["normal", "abnormal"]),
        );
        r.notes
            .push("model selection used the validation split".into());
        r
    }

    #[test]
    fn round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REPORT_FILE);
        let mut r = classification_report();
        r.select_best("f1");
        r.write(&path).unwrap();
        assert!(!dir.path().join("report.json.tmp").exists());
        let back = Report::read(&path).unwrap();
        assert_eq!(back, r);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"task\": \"classify\"") && text.contains("\"threshold\": null"),
            "{text}"
        );
        let err = Report::read(&dir.path().join("missing.json")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        std::fs::write(&path, "{}").unwrap();
        assert!(
            Report::read(&path)
                .unwrap_err()
                .to_string()
                .contains("not a readable report")
        );
    }

    /// Epochs 1 and 2 tie at 0.8: the first one is kept.
    #[test]
    fn selection_keeps_the_first_best_epoch() {
        let mut r = classification_report();
        let s = r.select_best("f1").unwrap().clone();
        assert_eq!((s.epoch, s.split.as_str(), s.value), (1, "val", 0.8));
        assert!(r.select_best("dice").is_none());
        assert_eq!(r.selection.as_ref().map(|s| s.epoch), Some(1));
    }

    #[test]
    fn headline_prefers_test_then_val() {
        let mut r = classification_report();
        // tp 1, fn 1 (0.4), fp 1 (0.6): F1 = 2 / (2 + 1 + 1).
        assert_eq!(r.headline(), Some(("test_f1".to_string(), 0.5)));
        r.splits.remove("test");
        assert_eq!(r.headline(), None);
        let scalars = BTreeMap::from([("f1".to_string(), 0.7)]);
        r.splits.insert(
            "holdout".into(),
            SplitMetrics::from_scalars(scalars.clone()),
        );
        assert_eq!(r.headline(), Some(("holdout_f1".to_string(), 0.7)));
        r.splits
            .insert("val".into(), SplitMetrics::from_scalars(scalars));
        assert_eq!(r.headline().unwrap().0, "val_f1");
        let seg = Report::new(TaskKind::Segment, "random", serde_json::Value::Null);
        assert_eq!(seg.primary_metric, "dice");
    }

    #[test]
    fn non_finite_numbers_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = classification_report();
        r.history[1].train_loss_mean = Some(f64::NAN);
        let err = r
            .write(&dir.path().join(REPORT_FILE))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("history[epoch 1].train_loss_mean is NaN"),
            "{err}"
        );
        let mut r = classification_report();
        r.splits
            .get_mut("test")
            .unwrap()
            .metrics
            .insert("auroc".into(), f64::INFINITY);
        let err = r.to_json().unwrap_err().to_string();
        assert!(err.contains("splits.test.metrics.auroc is inf"), "{err}");
    }

    #[test]
    fn one_class_split_records_why_auroc_is_missing() {
        let s = [BinaryPrediction::new(0, 0, 0.1).unwrap()];
        let m = BinaryMetrics::from_predictions(&s).unwrap();
        let split = SplitMetrics::from_binary(&m, ["normal", "abnormal"]);
        assert!(!split.metrics.contains_key("auroc"));
        assert!(split.undefined["auroc"].contains("only class 0"));
    }

    #[test]
    fn utc_timestamps() {
        for (unix, text) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_796_032_723, "2026-11-30T09:58:43Z"),
            (4_102_444_799, "2099-12-31T23:59:59Z"),
        ] {
            assert_eq!(utc_timestamp(unix), text);
        }
    }
}
