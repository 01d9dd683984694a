//! Evaluation metrics of the downstream tasks: binary classification (F1 of the positive class,
//! the paper's PolypDiag number, with scikit-learn's semantics), ROC/AUROC, confusion matrices,
//! and Dice/IoU on binary segmentation masks. Pure arithmetic: no libtorch.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::EvalInput {
        what: what.into(),
        reason: reason.into(),
    }
}

/// One evaluated sample of a two-class problem (class 0 = negative, e.g. "normal"; class 1 =
/// positive, e.g. "abnormal"). Built only through the checking constructors, so its score is
/// always a probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BinaryPrediction {
    label: bool,
    predicted: bool,
    score: f64,
}

impl BinaryPrediction {
    /// A sample from its true class (0 or 1), the predicted class (0 or 1) and the probability
    /// of class 1 in `[0, 1]` (the score ranked by the ROC curve).
    pub fn new(label: i64, predicted: i64, score: f64) -> Result<Self> {
        let class = |v: i64, what: &str| match v {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(invalid(what, format!("class {other} is neither 0 nor 1"))),
        };
        if !(0.0..=1.0).contains(&score) {
            return Err(invalid(
                "score",
                format!("{score} is not a probability in [0, 1]"),
            ));
        }
        Ok(Self {
            label: class(label, "label")?,
            predicted: class(predicted, "predicted class")?,
            score,
        })
    }

    /// A sample from its true class (0 or 1) and the network's two logits: the score is the
    /// softmax probability of class 1, the prediction the argmax (class 0 on a tie, like
    /// `torch.argmax`, which returns the first maximum). Non-finite logits are refused.
    pub fn from_logits(label: i64, logits: [f32; 2]) -> Result<Self> {
        let [l0, l1] = logits;
        if !(l0.is_finite() && l1.is_finite()) {
            return Err(invalid("logits", format!("{logits:?} are not finite")));
        }
        // softmax over two classes = logistic of the difference; exp over/underflow saturates
        // to exactly 0 or 1, never NaN.
        let score = 1.0 / (1.0 + (f64::from(l0) - f64::from(l1)).exp());
        Self::new(label, i64::from(l1 > l0), score)
    }

    /// Samples from a batch: `labels[i]` with logits `logits[2i..2i+2]` (a row-major `[n, 2]`
    /// tensor's data). The error names the first bad sample.
    pub fn from_logits_batch(labels: &[i64], logits: &[f32]) -> Result<Vec<Self>> {
        if logits.len() != 2 * labels.len() {
            return Err(invalid(
                "logits",
                format!(
                    "{} values for {} labels; expected 2 per label",
                    logits.len(),
                    labels.len()
                ),
            ));
        }
        labels
            .iter()
            .zip(logits.chunks_exact(2))
            .enumerate()
            .map(|(i, (&label, pair))| {
                Self::from_logits(label, [pair[0], pair[1]]).map_err(|e| match e {
                    Error::EvalInput { what, reason } => {
                        invalid(format!("sample {i}: {what}"), reason)
                    }
                    other => other,
                })
            })
            .collect()
    }

    /// The true class is 1.
    pub fn label(&self) -> bool {
        self.label
    }

    /// The predicted class is 1.
    pub fn predicted(&self) -> bool {
        self.predicted
    }

    /// Probability of class 1, in `[0, 1]`.
    pub fn score(&self) -> f64 {
        self.score
    }
}

/// A square confusion matrix over classes `0..n`: rows are true classes, columns predicted
/// classes (scikit-learn's `confusion_matrix` layout).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ConfusionRows", into = "ConfusionRows")]
pub struct ConfusionMatrix {
    counts: Vec<Vec<u64>>,
}

/// The serialised form of [`ConfusionMatrix`], checked to be square on reading.
#[derive(Serialize, Deserialize)]
struct ConfusionRows {
    /// `counts[true][predicted]`.
    counts: Vec<Vec<u64>>,
}

impl TryFrom<ConfusionRows> for ConfusionMatrix {
    type Error = String;

    fn try_from(rows: ConfusionRows) -> std::result::Result<Self, String> {
        let n = rows.counts.len();
        match rows.counts.iter().position(|r| r.len() != n) {
            Some(i) => Err(format!(
                "confusion matrix row {i} has {} counts, expected {n}",
                rows.counts[i].len()
            )),
            None if n == 0 => Err("confusion matrix has no classes".into()),
            None => Ok(Self {
                counts: rows.counts,
            }),
        }
    }
}

impl From<ConfusionMatrix> for ConfusionRows {
    fn from(m: ConfusionMatrix) -> Self {
        Self { counts: m.counts }
    }
}

impl ConfusionMatrix {
    /// An empty matrix over `n_classes` classes (at least one).
    pub fn new(n_classes: usize) -> Result<Self> {
        if n_classes == 0 {
            return Err(invalid("confusion matrix", "needs at least one class"));
        }
        Ok(Self {
            counts: vec![vec![0; n_classes]; n_classes],
        })
    }

    /// The matrix of `(true class, predicted class)` pairs over `n_classes` classes.
    pub fn from_pairs(
        n_classes: usize,
        pairs: impl IntoIterator<Item = (usize, usize)>,
    ) -> Result<Self> {
        let mut m = Self::new(n_classes)?;
        for (truth, predicted) in pairs {
            m.add(truth, predicted)?;
        }
        Ok(m)
    }

    /// Counts one sample; classes outside `0..n` are refused.
    pub fn add(&mut self, truth: usize, predicted: usize) -> Result<()> {
        let n = self.n_classes();
        if truth >= n || predicted >= n {
            return Err(invalid(
                "confusion matrix",
                format!("pair (true {truth}, predicted {predicted}) is outside the {n} classes"),
            ));
        }
        self.counts[truth][predicted] += 1;
        Ok(())
    }

    /// Number of classes.
    pub fn n_classes(&self) -> usize {
        self.counts.len()
    }

    /// Samples of true class `truth` predicted as `predicted` (0 outside the classes).
    pub fn count(&self, truth: usize, predicted: usize) -> u64 {
        self.counts
            .get(truth)
            .and_then(|r| r.get(predicted))
            .copied()
            .unwrap_or(0)
    }

    /// The rows: `rows()[true][predicted]`.
    pub fn rows(&self) -> &[Vec<u64>] {
        &self.counts
    }

    /// All samples counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    /// Samples of true class `class` (the row sum).
    pub fn support(&self, class: usize) -> u64 {
        self.counts.get(class).map_or(0, |r| r.iter().sum())
    }

    /// Fraction of samples on the diagonal; `None` for an empty matrix.
    pub fn accuracy(&self) -> Option<f64> {
        let correct: u64 = (0..self.n_classes()).map(|c| self.counts[c][c]).sum();
        ratio(correct, self.total())
    }
}

/// `num / den`, `None` when `den` is 0.
fn ratio(num: u64, den: u64) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// One point of a ROC curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RocPoint {
    /// False-positive rate (1 − specificity) in `[0, 1]`.
    pub fpr: f64,
    /// True-positive rate (recall) in `[0, 1]`.
    pub tpr: f64,
    /// Samples with a score ≥ this are called positive at this point; `None` for the first
    /// point (0, 0), whose threshold is above every score (scikit-learn writes `inf`).
    pub threshold: Option<f64>,
}

/// Why a ROC curve and its area do not exist for a set of samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RocUndefined {
    /// No samples at all.
    NoSamples,
    /// Every sample has true class `0` or every one class `1` (`class`): one of the two rates
    /// has no denominator. scikit-learn's `roc_auc_score` raises an error here.
    OneClass {
        /// The only class present.
        class: u8,
    },
}

impl fmt::Display for RocUndefined {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RocUndefined::NoSamples => f.write_str("no samples"),
            RocUndefined::OneClass { class } => write!(
                f,
                "only class {class} is present in the labels: ROC AUC is not defined"
            ),
        }
    }
}

/// True/false positives among the samples scoring at least each distinct score, highest
/// score first (scikit-learn's `_binary_clf_curve`): `(threshold, tp, fp)`.
fn cumulative_counts(samples: &[BinaryPrediction]) -> Vec<(f64, u64, u64)> {
    let mut order: Vec<&BinaryPrediction> = samples.iter().collect();
    order.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut out: Vec<(f64, u64, u64)> = Vec::new();
    let (mut tp, mut fp) = (0u64, 0u64);
    for (i, s) in order.iter().enumerate() {
        if s.label {
            tp += 1;
        } else {
            fp += 1;
        }
        // Samples with equal scores are one threshold: only the last of a run closes it.
        if order.get(i + 1).is_none_or(|next| next.score != s.score) {
            out.push((s.score, tp, fp));
        }
    }
    out
}

/// The ROC curve: the point (0, 0), then one point per distinct score from the highest down
/// (scikit-learn's `roc_curve(y, score, drop_intermediate=False)`, tied scores forming one
/// point). Ends at (1, 1).
pub fn roc_curve(samples: &[BinaryPrediction]) -> std::result::Result<Vec<RocPoint>, RocUndefined> {
    let (positives, negatives) = class_sizes(samples)?;
    let mut points = vec![RocPoint {
        fpr: 0.0,
        tpr: 0.0,
        threshold: None,
    }];
    points.extend(
        cumulative_counts(samples)
            .into_iter()
            .map(|(threshold, tp, fp)| RocPoint {
                fpr: fp as f64 / negatives as f64,
                tpr: tp as f64 / positives as f64,
                threshold: Some(threshold),
            }),
    );
    Ok(points)
}

/// Area under the ROC curve by the trapezoidal rule over [`roc_curve`]'s points, as
/// scikit-learn's `roc_auc_score` computes it. This equals the Mann–Whitney statistic
/// P(score of a positive > score of a negative) + ½·P(equal scores). Computed exactly in
/// integers and divided once at the end.
pub fn roc_auc(samples: &[BinaryPrediction]) -> std::result::Result<f64, RocUndefined> {
    let (positives, negatives) = class_sizes(samples)?;
    // Twice the area times positives × negatives: Σ Δfp · (tp_prev + tp).
    let (mut twice_area, mut prev_tp, mut prev_fp) = (0u128, 0u64, 0u64);
    for (_, tp, fp) in cumulative_counts(samples) {
        twice_area += u128::from(fp - prev_fp) * u128::from(tp + prev_tp);
        (prev_tp, prev_fp) = (tp, fp);
    }
    Ok(twice_area as f64 / (2.0 * positives as f64 * negatives as f64))
}

/// (positives, negatives), or why the ROC curve is undefined.
fn class_sizes(samples: &[BinaryPrediction]) -> std::result::Result<(u64, u64), RocUndefined> {
    let positives = samples.iter().filter(|s| s.label).count() as u64;
    let negatives = samples.len() as u64 - positives;
    match (positives, negatives) {
        (0, 0) => Err(RocUndefined::NoSamples),
        (0, _) => Err(RocUndefined::OneClass { class: 0 }),
        (_, 0) => Err(RocUndefined::OneClass { class: 1 }),
        sizes => Ok(sizes),
    }
}

/// Metrics of a two-class problem, class 1 positive. Ratios with a zero denominator are 0, as
/// scikit-learn's `precision_score`/`recall_score`/`f1_score` return with the default
/// `zero_division="warn"` (which warns and returns 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinaryMetrics {
    /// Samples evaluated.
    pub samples: usize,
    /// 2×2 confusion matrix, rows true class, columns predicted class:
    /// `[[tn, fp], [fn, tp]]`.
    pub confusion: ConfusionMatrix,
    /// F1 of class 1: 2·tp / (2·tp + fp + fn) (= the harmonic mean of precision and recall),
    /// scikit-learn's `f1_score(average="binary")`; the paper's PolypDiag number. In `[0, 1]`.
    pub f1: f64,
    /// tp / (tp + fp), in `[0, 1]`.
    pub precision: f64,
    /// tp / (tp + fn) (sensitivity), in `[0, 1]`.
    pub recall: f64,
    /// (tp + tn) / samples, in `[0, 1]`.
    pub accuracy: f64,
    /// tn / (tn + fp) (recall of class 0), in `[0, 1]`.
    pub specificity: f64,
    /// Area under the ROC curve in `[0, 1]`; `None` when undefined (see `auroc_undefined`).
    pub auroc: Option<f64>,
    /// Why `auroc` is `None`.
    pub auroc_undefined: Option<String>,
    /// The ROC curve ([`roc_curve`]); empty when undefined.
    pub roc: Vec<RocPoint>,
}

impl BinaryMetrics {
    /// Computes every metric; refuses an empty set of samples (scikit-learn raises there too).
    pub fn from_predictions(samples: &[BinaryPrediction]) -> Result<Self> {
        if samples.is_empty() {
            return Err(invalid("binary metrics", "no samples to evaluate"));
        }
        let confusion = ConfusionMatrix::from_pairs(
            2,
            samples
                .iter()
                .map(|s| (usize::from(s.label), usize::from(s.predicted))),
        )?;
        let [tn, fp, fn_, tp] =
            [(0, 0), (0, 1), (1, 0), (1, 1)].map(|(t, p)| confusion.count(t, p));
        let or_zero = |num: u64, den: u64| ratio(num, den).unwrap_or(0.0);
        let (auroc, auroc_undefined, roc) = match (roc_auc(samples), roc_curve(samples)) {
            (Ok(area), Ok(points)) => (Some(area), None, points),
            (Err(why), _) | (_, Err(why)) => (None, Some(why.to_string()), Vec::new()),
        };
        Ok(Self {
            samples: samples.len(),
            f1: or_zero(2 * tp, 2 * tp + fp + fn_),
            precision: or_zero(tp, tp + fp),
            recall: or_zero(tp, tp + fn_),
            accuracy: or_zero(tp + tn, samples.len() as u64),
            specificity: or_zero(tn, tn + fp),
            confusion,
            auroc,
            auroc_undefined,
            roc,
        })
    }

    /// The scalar metrics by name (`f1`, `precision`, `recall`, `accuracy`, `specificity`,
    /// `auroc` when defined, `samples`, `positives`): the form reports and logs use.
    pub fn scalars(&self) -> BTreeMap<String, f64> {
        let mut m: BTreeMap<String, f64> = [
            ("f1", self.f1),
            ("precision", self.precision),
            ("recall", self.recall),
            ("accuracy", self.accuracy),
            ("specificity", self.specificity),
            ("samples", self.samples as f64),
            ("positives", self.confusion.support(1) as f64),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if let Some(a) = self.auroc {
            m.insert("auroc".into(), a);
        }
        m
    }
}

/// A pixel of a binary mask: foreground or background.
pub trait MaskPixel: Copy {
    /// Whether the pixel belongs to the object.
    fn is_foreground(self) -> bool;
}

impl MaskPixel for bool {
    fn is_foreground(self) -> bool {
        self
    }
}

/// Any non-zero value is foreground (masks stored as 0/1 or 0/255 both work).
impl MaskPixel for u8 {
    fn is_foreground(self) -> bool {
        self != 0
    }
}

/// Pixel counts of a predicted mask against the true one; add several to pool images
/// (dataset-level Dice) or compute per image and average.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskOverlap {
    /// Pixels foreground in both masks.
    pub intersection: u64,
    /// Foreground pixels of the prediction.
    pub predicted: u64,
    /// Foreground pixels of the true mask.
    pub truth: u64,
}

impl MaskOverlap {
    /// Counts two masks of the same length (flattened in the same order).
    pub fn of<P: MaskPixel>(predicted: &[P], truth: &[P]) -> Result<Self> {
        if predicted.len() != truth.len() {
            return Err(invalid(
                "masks",
                format!(
                    "prediction has {} pixels, the true mask {}",
                    predicted.len(),
                    truth.len()
                ),
            ));
        }
        let mut o = Self::default();
        for (&p, &t) in predicted.iter().zip(truth) {
            let (p, t) = (p.is_foreground(), t.is_foreground());
            o.predicted += u64::from(p);
            o.truth += u64::from(t);
            o.intersection += u64::from(p && t);
        }
        Ok(o)
    }

    /// Pixels foreground in either mask.
    pub fn union(&self) -> u64 {
        self.predicted + self.truth - self.intersection
    }

    /// Dice = 2·|P ∩ T| / (|P| + |T|) in `[0, 1]`; 1 when both masks are empty (nothing to
    /// find, nothing found).
    pub fn dice(&self) -> f64 {
        ratio(2 * self.intersection, self.predicted + self.truth).unwrap_or(1.0)
    }

    /// The Dice of the published `calculate_metric_percase` (TransUNet `trainer.py`): medpy's
    /// `dc` when both masks have foreground, **1 when only the prediction has** (a quirk of the
    /// published code), 0 otherwise (an empty prediction of an empty mask scores 0).
    pub fn published_dice(&self) -> f64 {
        match (self.predicted > 0, self.truth > 0) {
            (true, true) => 2.0 * self.intersection as f64 / (self.predicted + self.truth) as f64,
            (true, false) => 1.0,
            _ => 0.0,
        }
    }

    /// IoU (Jaccard) = |P ∩ T| / |P ∪ T| in `[0, 1]`; 1 when both masks are empty.
    pub fn iou(&self) -> f64 {
        ratio(self.intersection, self.union()).unwrap_or(1.0)
    }
}

impl std::ops::AddAssign for MaskOverlap {
    fn add_assign(&mut self, other: Self) {
        self.intersection += other.intersection;
        self.predicted += other.predicted;
        self.truth += other.truth;
    }
}

/// Dice of two masks of the same length ([`MaskOverlap::dice`]).
pub fn dice<P: MaskPixel>(predicted: &[P], truth: &[P]) -> Result<f64> {
    MaskOverlap::of(predicted, truth).map(|o| o.dice())
}

/// IoU of two masks of the same length ([`MaskOverlap::iou`]).
pub fn iou<P: MaskPixel>(predicted: &[P], truth: &[P]) -> Result<f64> {
    MaskOverlap::of(predicted, truth).map(|o| o.iou())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn close(a: f64, b: f64, what: &str) {
        assert!(
            (a - b).abs() <= 1e-12,
            "{what}: {a} vs {b} (error {:e})",
            (a - b).abs()
        );
    }

    /// Samples from (label, score), predicted class 1 when the score is above ½.
    fn samples(pairs: &[(i64, f64)]) -> Vec<BinaryPrediction> {
        pairs
            .iter()
            .map(|&(l, s)| BinaryPrediction::new(l, i64::from(s > 0.5), s).unwrap())
            .collect()
    }

    /// Six samples worked by hand (scikit-learn 1.9.1 agrees): tp 2 (0.9, 0.8), fn 1 (0.4),
    /// fp 1 (0.7), tn 2, so precision = recall = F1 = accuracy = specificity = 2/3. AUROC:
    /// of the 9 (positive, negative) pairs the positive scores higher in 3 + 3 + 2 = 8.
    #[test]
    fn hand_worked_case() {
        let s = samples(&[(1, 0.9), (1, 0.8), (1, 0.4), (0, 0.7), (0, 0.2), (0, 0.1)]);
        let m = BinaryMetrics::from_predictions(&s).unwrap();
        assert_eq!(m.confusion.rows(), &[vec![2, 1], vec![1, 2]]);
        for (v, name) in [
            (m.f1, "f1"),
            (m.precision, "precision"),
            (m.recall, "recall"),
        ] {
            close(v, 2.0 / 3.0, name);
        }
        close(m.accuracy, 4.0 / 6.0, "accuracy");
        close(m.specificity, 2.0 / 3.0, "specificity");
        close(m.auroc.unwrap(), 8.0 / 9.0, "auroc");
        // roc_curve(..., drop_intermediate=False): thresholds inf, .9, .8, .7, .4, .2, .1.
        let want = [
            (0.0, 0.0, None),
            (0.0, 1.0 / 3.0, Some(0.9)),
            (0.0, 2.0 / 3.0, Some(0.8)),
            (1.0 / 3.0, 2.0 / 3.0, Some(0.7)),
            (1.0 / 3.0, 1.0, Some(0.4)),
            (2.0 / 3.0, 1.0, Some(0.2)),
            (1.0, 1.0, Some(0.1)),
        ];
        assert_eq!(m.roc.len(), want.len());
        for (p, (fpr, tpr, th)) in m.roc.iter().zip(want) {
            close(p.fpr, fpr, "fpr");
            close(p.tpr, tpr, "tpr");
            assert_eq!(p.threshold, th);
        }
        let sc = m.scalars();
        assert_eq!((sc["samples"], sc["positives"]), (6.0, 3.0));
        assert!(sc.contains_key("auroc"));
    }

    /// Tied scores form one ROC point, and count ½ in the Mann–Whitney sum: positives
    /// {0.8, 0.5} against negatives {0.5, 0.2}: 1 + 1 + ½ + 1 = 3.5 of 4 pairs.
    #[test]
    fn ties_are_one_point_and_count_half() {
        let s = samples(&[(1, 0.5), (0, 0.5), (1, 0.8), (0, 0.2)]);
        close(roc_auc(&s).unwrap(), 0.875, "auroc");
        let roc = roc_curve(&s).unwrap();
        let pts: Vec<(f64, f64)> = roc.iter().map(|p| (p.fpr, p.tpr)).collect();
        assert_eq!(pts, [(0.0, 0.0), (0.0, 0.5), (0.5, 1.0), (1.0, 1.0)]);
    }

    /// 20 samples with many ties; expected values printed by scikit-learn 1.9.1 for
    /// y = [(7i mod 3) == 0], score = ((37i mod 11) / 10), prediction = score > 0.5.
    #[test]
    fn matches_sklearn_on_a_tied_case() {
        let pairs: Vec<(i64, f64)> = (0..20)
            .map(|i| (i64::from((i * 7) % 3 == 0), f64::from((i * 37) % 11) / 10.0))
            .collect();
        let m = BinaryMetrics::from_predictions(&samples(&pairs)).unwrap();
        assert_eq!(m.confusion.rows(), &[vec![5, 8], vec![6, 1]]);
        close(m.f1, 0.125, "f1");
        close(m.precision, 0.1111111111111111, "precision");
        close(m.recall, 0.14285714285714285, "recall");
        close(m.accuracy, 0.3, "accuracy");
        close(m.auroc.unwrap(), 0.23076923076923075, "auroc");
    }

    /// scikit-learn's zero_division default: 0/0 ratios are 0 (f1_score([0, 0], [0, 0]) = 0).
    #[test]
    fn zero_division_gives_zero_and_one_class_has_no_auroc() {
        let m = BinaryMetrics::from_predictions(&samples(&[(0, 0.1), (0, 0.2)])).unwrap();
        assert_eq!((m.f1, m.precision, m.recall), (0.0, 0.0, 0.0));
        assert_eq!((m.accuracy, m.specificity), (1.0, 1.0));
        assert_eq!(m.auroc, None);
        assert!(m.roc.is_empty());
        assert!(
            m.auroc_undefined
                .as_deref()
                .unwrap()
                .contains("only class 0")
        );
        assert!(!m.scalars().contains_key("auroc"));

        let m = BinaryMetrics::from_predictions(&samples(&[(1, 0.1), (1, 0.2)])).unwrap();
        assert_eq!(
            (m.f1, m.precision, m.recall, m.accuracy, m.specificity),
            (0.0, 0.0, 0.0, 0.0, 0.0)
        );
        assert_eq!(
            roc_auc(&samples(&[(1, 0.3)])),
            Err(RocUndefined::OneClass { class: 1 })
        );
        assert_eq!(roc_curve(&[]), Err(RocUndefined::NoSamples));
        assert!(BinaryMetrics::from_predictions(&[]).is_err());
    }

    #[test]
    fn logits_give_softmax_and_first_argmax() {
        let p = BinaryPrediction::from_logits(1, [1.0, 3.0]).unwrap();
        close(p.score(), 1.0 / (1.0 + (-2.0f64).exp()), "softmax");
        assert!(p.predicted() && p.label());
        let tie = BinaryPrediction::from_logits(0, [0.5, 0.5]).unwrap();
        assert_eq!((tie.predicted(), tie.score()), (false, 0.5));
        let far = BinaryPrediction::from_logits(0, [f32::MAX, -f32::MAX]).unwrap();
        assert_eq!((far.predicted(), far.score()), (false, 0.0));
        let far = BinaryPrediction::from_logits(0, [-f32::MAX, f32::MAX]).unwrap();
        assert_eq!((far.predicted(), far.score()), (true, 1.0));

        for bad in [
            BinaryPrediction::from_logits(2, [0.0, 1.0]),
            BinaryPrediction::from_logits(-1, [0.0, 1.0]),
            BinaryPrediction::from_logits(0, [f32::NAN, 1.0]),
            BinaryPrediction::from_logits(0, [0.0, f32::INFINITY]),
            BinaryPrediction::new(0, 1, 1.5),
            BinaryPrediction::new(0, 1, f64::NAN),
            BinaryPrediction::new(0, 3, 0.5),
        ] {
            assert!(matches!(bad, Err(Error::EvalInput { .. })), "{bad:?}");
        }
        let batch = BinaryPrediction::from_logits_batch(&[0, 1], &[2.0, 1.0, 0.0, 4.0]).unwrap();
        assert_eq!(
            batch.iter().map(|p| p.predicted()).collect::<Vec<_>>(),
            [false, true]
        );
        let err = BinaryPrediction::from_logits_batch(&[0, 5], &[2.0, 1.0, 0.0, 4.0]).unwrap_err();
        assert!(err.to_string().contains("sample 1"), "{err}");
        assert!(BinaryPrediction::from_logits_batch(&[0, 1], &[2.0, 1.0, 0.0]).is_err());
    }

    /// Random samples with heavy ties: the trapezoid area equals the pairwise Mann–Whitney
    /// count, the curve is monotone from (0, 0) to (1, 1), and F1 is the harmonic mean.
    #[test]
    fn property_auroc_is_mann_whitney_and_curve_is_monotone() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for case in 0..300 {
            let n = rng.random_range(1..60);
            let levels = rng.random_range(1..12);
            let s: Vec<BinaryPrediction> = (0..n)
                .map(|_| {
                    let score = f64::from(rng.random_range(0..=levels)) / f64::from(levels);
                    BinaryPrediction::new(
                        i64::from(rng.random_bool(0.4)),
                        i64::from(rng.random_bool(0.5)),
                        score,
                    )
                    .unwrap()
                })
                .collect();
            let m = BinaryMetrics::from_predictions(&s).unwrap();
            assert_eq!(m.confusion.total(), n as u64);
            if m.precision + m.recall > 0.0 {
                let h = 2.0 * m.precision * m.recall / (m.precision + m.recall);
                close(m.f1, h, "f1 = harmonic mean");
            }
            let (pos, neg): (Vec<&BinaryPrediction>, Vec<&BinaryPrediction>) =
                s.iter().partition(|p| p.label());
            if pos.is_empty() || neg.is_empty() {
                assert!(m.auroc.is_none(), "case {case}");
                continue;
            }
            let mut wins = 0.0;
            for p in &pos {
                for q in &neg {
                    wins += if p.score() > q.score() {
                        1.0
                    } else if p.score() == q.score() {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
            let pairwise = wins / (pos.len() * neg.len()) as f64;
            close(m.auroc.unwrap(), pairwise, &format!("case {case} auroc"));
            let first = m.roc.first().unwrap();
            let last = m.roc.last().unwrap();
            assert_eq!(
                (first.fpr, first.tpr, last.fpr, last.tpr),
                (0.0, 0.0, 1.0, 1.0)
            );
            for w in m.roc.windows(2) {
                assert!(
                    w[1].fpr >= w[0].fpr && w[1].tpr >= w[0].tpr,
                    "case {case}: {w:?}"
                );
            }
        }
    }

    /// confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 0, 2, 2]) in scikit-learn.
    #[test]
    fn n_class_confusion_matrix() {
        let pairs = [(0, 0), (0, 1), (1, 1), (2, 0), (2, 2), (2, 2)];
        let m = ConfusionMatrix::from_pairs(3, pairs).unwrap();
        assert_eq!(m.rows(), &[vec![1, 1, 0], vec![0, 1, 0], vec![1, 0, 2]]);
        close(m.accuracy().unwrap(), 4.0 / 6.0, "accuracy");
        assert_eq!(
            (m.support(2), m.count(2, 2), m.count(7, 0), m.total()),
            (3, 2, 0, 6)
        );
        assert!(ConfusionMatrix::from_pairs(3, [(0, 3)]).is_err());
        assert!(ConfusionMatrix::new(0).is_err());
        assert_eq!(ConfusionMatrix::new(2).unwrap().accuracy(), None);

        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"counts":[[1,1,0],[0,1,0],[1,0,2]]}"#);
        assert_eq!(serde_json::from_str::<ConfusionMatrix>(&json).unwrap(), m);
        let ragged = serde_json::from_str::<ConfusionMatrix>(r#"{"counts":[[1,2],[3]]}"#);
        assert!(ragged.unwrap_err().to_string().contains("row 1"));
        assert!(serde_json::from_str::<ConfusionMatrix>(r#"{"counts":[]}"#).is_err());
    }

    /// pred 1100 vs truth 1010: |P ∩ T| = 1, |P| = |T| = 2, so Dice = 2/4 and IoU = 1/3.
    #[test]
    fn dice_and_iou() {
        close(
            dice(&[true, true, false, false], &[true, false, true, false]).unwrap(),
            0.5,
            "dice",
        );
        close(
            iou(&[1u8, 1, 0, 0], &[255u8, 0, 7, 0]).unwrap(),
            1.0 / 3.0,
            "iou",
        );
        assert_eq!(dice(&[0u8; 4], &[0u8; 4]).unwrap(), 1.0);
        assert_eq!(iou(&[false; 3], &[false; 3]).unwrap(), 1.0);
        assert_eq!(dice(&[true, false], &[false, true]).unwrap(), 0.0);
        assert!(dice(&[true], &[true, false]).is_err());

        let mut pooled = MaskOverlap::of(&[true, true], &[true, false]).unwrap();
        pooled += MaskOverlap::of(&[false, false], &[true, true]).unwrap();
        assert_eq!(
            pooled,
            MaskOverlap {
                intersection: 1,
                predicted: 2,
                truth: 3
            }
        );
        close(pooled.dice(), 2.0 / 5.0, "pooled dice");
        assert_eq!(pooled.union(), 4);
    }
}
