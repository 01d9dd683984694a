//! The pre-training report, written at the end of every run (rank 0) beside the checkpoints:
//! `report.json` (loss, the collapse diagnostics and any collapse episodes, the k-NN probe's
//! accuracy over the run, the schedules' end points, the resolved configuration) and PNG plots
//! under `plots/` ([`LOSS_PLOT`], [`DIAGNOSTICS_PLOT`], [`PROBE_PLOT`], [`SCHEDULES_PLOT`]),
//! built from the run's `metrics.jsonl` (so a resumed run's report covers every step). The
//! plots reuse the fine-tuning reports' renderer ([`crate::eval::plots`]).

use std::path::Path;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::eval::plots::{Corner, Panel, Series, step_panels};
use crate::eval::report::{REPORT_FILE, utc_timestamp, write_atomically};
use crate::store::Store;
use crate::train::diagnostics::{DOMINANT_FRACTION, UNIFORM_FRACTION};
use crate::{Error, Result};

/// Loss and student–teacher KL per step.
pub const LOSS_PLOT: &str = "loss.png";
/// Teacher entropy and batch-mean entropy per step, with ln K and the collapse thresholds.
pub const DIAGNOSTICS_PLOT: &str = "diagnostics.png";
/// k-NN probe accuracy per probe.
pub const PROBE_PLOT: &str = "probe.png";
/// Learning rate, weight decay, teacher momentum and temperature per step.
pub const SCHEDULES_PLOT: &str = "schedules.png";

/// A run of consecutive steps flagged with one kind of collapse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollapseEpisode {
    /// `uniform` or `dominant_prototype`.
    pub kind: String,
    /// First step flagged (0-based; the condition held for the window before it).
    pub from_step: usize,
    /// Last step flagged.
    pub to_step: usize,
}

/// The probe's results over the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeSummary {
    /// Accuracy of the initial weights (a fresh run only).
    pub before: Option<f64>,
    /// (steps done, accuracy) of every probe, in order.
    pub history: Vec<(usize, f64)>,
    /// The last probe's accuracy.
    pub last: Option<f64>,
    /// The best probe's accuracy and its steps done.
    pub best: Option<(usize, f64)>,
}

/// `report.json` of a pre-training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainReport {
    /// Format version.
    pub version: u32,
    /// Always `pretrain`.
    pub kind: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Creation time, UTC.
    pub created_utc: String,
    /// Steps recorded in `metrics.jsonl`.
    pub steps: usize,
    /// Steps of the whole schedule.
    pub total_steps: usize,
    /// Whether this invocation stopped early on request.
    pub interrupted: bool,
    /// Loss of the first and last step, and the mean of the last tenth of the steps.
    pub loss: LossSummary,
    /// ln K (K = the head's output dimension).
    pub ln_k: f64,
    /// The last step's diagnostics.
    pub last_diagnostics: Option<DiagnosticsRow>,
    /// Collapse episodes (empty for a healthy run).
    pub collapse: Vec<CollapseEpisode>,
    /// The k-NN probe, when the run had one.
    pub probe: Option<ProbeSummary>,
    /// The resolved configuration (`config.json`).
    pub config: serde_json::Value,
    /// How to read the numbers.
    pub notes: Vec<String>,
    /// Plot files beside the report (relative to the output location).
    pub plots: Vec<String>,
}

/// First, last and final-tenth mean loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossSummary {
    /// First step's loss.
    pub first: f64,
    /// Last step's loss.
    pub last: f64,
    /// Mean over the last tenth of the steps (at least one).
    pub tail_mean: f64,
}

/// One step's diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DiagnosticsRow {
    /// The step (0-based).
    pub step: usize,
    /// Mean teacher entropy (nats).
    pub teacher_entropy: f64,
    /// Entropy of the batch-mean teacher distribution (nats).
    pub batch_entropy: f64,
    /// Student–teacher KL (nats).
    pub kl: f64,
}

fn num(v: &serde_json::Value, k: &str) -> Option<f64> {
    v.get(k).and_then(serde_json::Value::as_f64)
}

fn series(lines: &[serde_json::Value], key: &str) -> Vec<(f64, f64)> {
    lines
        .iter()
        .filter_map(|l| Some((num(l, "step")?, num(l, key)?)))
        .collect()
}

impl PretrainReport {
    /// Builds the report from the step lines of `metrics.jsonl` (`lines`, in step order), the
    /// resolved `config` and `ln_k`. An error when there is no step line.
    pub fn from_metrics(
        lines: &[serde_json::Value],
        config: serde_json::Value,
        total_steps: usize,
        interrupted: bool,
        ln_k: f64,
    ) -> Result<Self> {
        let steps: Vec<&serde_json::Value> =
            lines.iter().filter(|l| num(l, "loss").is_some()).collect();
        let (Some(first), Some(last)) = (steps.first(), steps.last()) else {
            return Err(Error::Input {
                name: "metrics.jsonl".into(),
                reason: "holds no step line to report on".into(),
            });
        };
        let tail = (steps.len() / 10).max(1);
        let tail_mean = steps[steps.len() - tail..]
            .iter()
            .filter_map(|l| num(l, "loss"))
            .sum::<f64>()
            / tail as f64;
        let step_of = |l: &serde_json::Value| num(l, "step").unwrap_or(0.0) as usize;
        let mut collapse: Vec<CollapseEpisode> = Vec::new();
        for l in &steps {
            let Some(kind) = l.get("collapse").and_then(serde_json::Value::as_str) else {
                continue;
            };
            let s = step_of(l);
            match collapse.last_mut() {
                Some(e) if e.kind == kind && e.to_step + 1 == s => e.to_step = s,
                _ => collapse.push(CollapseEpisode {
                    kind: kind.to_string(),
                    from_step: s,
                    to_step: s,
                }),
            }
        }
        let before = steps.iter().find_map(|l| num(l, "probe_acc_before"));
        let history: Vec<(usize, f64)> = steps
            .iter()
            .filter_map(|l| Some((step_of(l) + 1, num(l, "probe_acc")?)))
            .collect();
        let probe = (before.is_some() || !history.is_empty()).then(|| ProbeSummary {
            before,
            last: history.last().map(|h| h.1),
            best: history
                .iter()
                .copied()
                .fold(None, |b: Option<(usize, f64)>, h| match b {
                    Some(x) if x.1 >= h.1 => Some(x),
                    _ => Some(h),
                }),
            history,
        });
        let last_diagnostics = Some(DiagnosticsRow {
            step: step_of(last),
            teacher_entropy: num(last, "teacher_entropy").unwrap_or(f64::NAN),
            batch_entropy: num(last, "batch_entropy").unwrap_or(f64::NAN),
            kl: num(last, "kl").unwrap_or(f64::NAN),
        })
        .filter(|d| d.teacher_entropy.is_finite());
        let created_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(Self {
            version: 1,
            kind: "pretrain".into(),
            created_unix,
            created_utc: utc_timestamp(created_unix),
            steps: steps.len(),
            total_steps,
            interrupted,
            loss: LossSummary {
                first: num(first, "loss").unwrap_or(f64::NAN),
                last: num(last, "loss").unwrap_or(f64::NAN),
                tail_mean,
            },
            ln_k,
            last_diagnostics,
            collapse,
            probe,
            config,
            notes: vec![
                "The DINO loss rises in healthy runs while the centre raises the teacher's entropy; judge learning by the probe and the diagnostics, not the loss alone.".into(),
                format!(
                    "Collapse: uniform when the teacher's entropy stays ≥ {UNIFORM_FRACTION} ln K; dominant prototype when the batch-mean entropy stays < {DOMINANT_FRACTION} ln(min(K, clips per step)); each sustained for a window of steps."
                ),
                "Probe: DINO's weighted k-NN (k nearest train videos by cosine similarity of the teacher's CLS features, votes exp(sim/0.07)), accuracy on the val split; probe_acc_before is the initial weights'.".into(),
            ],
            plots: Vec::new(),
        })
    }

    /// Writes the plots the metrics have data for into `dir`; returns their file names.
    pub fn write_plots(&self, lines: &[serde_json::Value], dir: &Path) -> Result<Vec<String>> {
        let mut written = Vec::new();
        let s = |name: &str, key: &str, markers: bool| Series {
            name: name.into(),
            points: series(lines, key),
            markers,
        };
        step_panels(
            "Pre-training: loss and student-teacher KL per step",
            "step",
            &[
                Panel {
                    y_desc: "loss".into(),
                    series: vec![s("DINO loss", "loss", false)],
                    references: vec![],
                    legend: Corner::UpperRight,
                    y_range: None,
                },
                Panel {
                    y_desc: "KL (nats)".into(),
                    series: vec![s("student-teacher KL", "kl", false)],
                    references: vec![],
                    legend: Corner::UpperRight,
                    y_range: None,
                },
            ],
            &dir.join(LOSS_PLOT),
        )?;
        written.push(LOSS_PLOT.to_string());
        let teacher = s("teacher entropy (mean)", "teacher_entropy", false);
        if !teacher.points.is_empty() {
            step_panels(
                "Pre-training: collapse diagnostics (entropies of the teacher distribution)",
                "step",
                &[
                    Panel {
                        y_desc: "teacher entropy".into(),
                        series: vec![teacher],
                        references: vec![
                            ("ln K (uniform)".into(), self.ln_k),
                            (
                                format!("{UNIFORM_FRACTION} ln K (uniform collapse)"),
                                UNIFORM_FRACTION * self.ln_k,
                            ),
                        ],
                        legend: Corner::LowerRight,
                        y_range: None,
                    },
                    Panel {
                        y_desc: "batch-mean entropy".into(),
                        series: vec![s("entropy of the batch mean", "batch_entropy", false)],
                        references: vec![("ln K".into(), self.ln_k)],
                        legend: Corner::LowerRight,
                        y_range: None,
                    },
                ],
                &dir.join(DIAGNOSTICS_PLOT),
            )?;
            written.push(DIAGNOSTICS_PLOT.to_string());
        }
        if let Some(p) = &self.probe {
            let mut points: Vec<(f64, f64)> = p.before.map(|b| (0.0, b)).into_iter().collect();
            points.extend(p.history.iter().map(|&(s, a)| (s as f64, a)));
            step_panels(
                "Pre-training: k-NN probe accuracy (val split, teacher features)",
                "steps done",
                &[Panel {
                    y_desc: "accuracy".into(),
                    series: vec![Series {
                        name: "k-NN accuracy".into(),
                        points,
                        markers: true,
                    }],
                    references: p
                        .before
                        .map(|b| ("initial weights".to_string(), b))
                        .into_iter()
                        .collect(),
                    legend: Corner::LowerRight,
                    y_range: Some((0.0, 1.02)),
                }],
                &dir.join(PROBE_PLOT),
            )?;
            written.push(PROBE_PLOT.to_string());
        }
        step_panels(
            "Pre-training: schedules",
            "step",
            &[
                Panel {
                    y_desc: "lr".into(),
                    series: vec![s("learning rate", "lr", false)],
                    references: vec![],
                    legend: Corner::UpperRight,
                    y_range: None,
                },
                Panel {
                    y_desc: "wd".into(),
                    series: vec![s("weight decay", "wd", false)],
                    references: vec![],
                    legend: Corner::UpperRight,
                    y_range: None,
                },
                Panel {
                    y_desc: "momentum".into(),
                    series: vec![s("teacher EMA momentum", "momentum", false)],
                    references: vec![],
                    legend: Corner::UpperRight,
                    y_range: None,
                },
                Panel {
                    y_desc: "τ teacher".into(),
                    series: vec![s("teacher temperature", "teacher_temp", false)],
                    references: vec![],
                    legend: Corner::UpperRight,
                    y_range: None,
                },
            ],
            &dir.join(SCHEDULES_PLOT),
        )?;
        written.push(SCHEDULES_PLOT.to_string());
        Ok(written)
    }
}

/// Reads `metrics.jsonl` and `config.json` from `out`, and writes `report.json` and the plots
/// (`plots/*.png`) there. A plot that cannot be drawn (no font) is left out with a note; the
/// report is still written. Returns the report's location.
pub fn publish(out: &Store, total_steps: usize, interrupted: bool, ln_k: f64) -> Result<String> {
    let text = out.get("metrics.jsonl")?;
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&text)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let config = match out.get_opt("config.json")? {
        Some(b) => serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null),
        None => serde_json::Value::Null,
    };
    let mut report = PretrainReport::from_metrics(&lines, config, total_steps, interrupted, ln_k)?;
    let tmp = tempfile::tempdir().map_err(|source| Error::Io {
        action: "creating a temporary directory",
        path: std::env::temp_dir(),
        source,
    })?;
    match report.write_plots(&lines, tmp.path()) {
        Ok(files) => {
            for f in files {
                let path = tmp.path().join(&f);
                let bytes = std::fs::read(&path).map_err(|source| Error::Io {
                    action: "reading",
                    path: path.clone(),
                    source,
                })?;
                out.put(&format!("plots/{f}"), Bytes::from(bytes))?;
                report.plots.push(format!("plots/{f}"));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "pre-training plots not written");
            report.notes.push(format!("plots not written: {e}"));
        }
    }
    let json = serde_json::to_vec_pretty(&report).map_err(|e| Error::Input {
        name: REPORT_FILE.into(),
        reason: format!("cannot be encoded: {e}"),
    })?;
    let local = tmp.path().join(REPORT_FILE);
    write_atomically(&local, &json, "writing the report")?;
    out.put(REPORT_FILE, Bytes::from(json))?;
    Ok(out.describe(REPORT_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step: usize, extra: serde_json::Value) -> serde_json::Value {
        let mut v = serde_json::json!({"step": step, "loss": 5.0 - step as f64 * 0.1, "lr": 0.1,
            "wd": 0.04, "momentum": 0.996, "teacher_temp": 0.04,
            "teacher_entropy": 3.0, "batch_entropy": 5.0, "kl": 1.0});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    #[test]
    fn collapse_episodes_and_probe_history_come_from_the_metrics() {
        let lines = vec![
            line(0, serde_json::json!({"probe_acc_before": 0.5})),
            line(1, serde_json::json!({"probe_acc": 0.6})),
            line(2, serde_json::json!({"collapse": "uniform"})),
            line(
                3,
                serde_json::json!({"collapse": "uniform", "probe_acc": 0.55}),
            ),
            line(4, serde_json::json!({})),
            line(5, serde_json::json!({"collapse": "dominant_prototype"})),
            serde_json::json!({"epoch_end": 0, "step": 5}),
        ];
        let r =
            PretrainReport::from_metrics(&lines, serde_json::Value::Null, 10, false, 6.0).unwrap();
        assert_eq!(r.steps, 6);
        assert_eq!(
            r.collapse,
            vec![
                CollapseEpisode {
                    kind: "uniform".into(),
                    from_step: 2,
                    to_step: 3
                },
                CollapseEpisode {
                    kind: "dominant_prototype".into(),
                    from_step: 5,
                    to_step: 5
                },
            ]
        );
        let p = r.probe.unwrap();
        assert_eq!(p.before, Some(0.5));
        assert_eq!(p.history, vec![(2, 0.6), (4, 0.55)]);
        assert_eq!((p.last, p.best), (Some(0.55), Some((2, 0.6))));
        assert_eq!(r.loss.first, 5.0);
        assert!((r.loss.tail_mean - 4.5).abs() < 1e-12);
        assert!(
            PretrainReport::from_metrics(&lines[6..], serde_json::Value::Null, 1, false, 1.0)
                .is_err()
        );
    }
}
