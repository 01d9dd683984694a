//! Detection scores, the paper's and the honest ones.
//!
//! - Image level, as the published evaluation computes the KUMC F1
//!   (`stft_core/data/datasets/evaluation/cvcvid/cvcvideo_eval.py`,
//!   `cvcvideo_detection_eval`): a frame with a polyp whose predictions include any box with
//!   score ≥ the threshold is a true positive, wherever the box is; a frame without a polyp
//!   with such a box is a false positive. No overlap is tested, so a box in the wrong place
//!   counts as found.
//! - Box level: per class, predictions with score ≥ the threshold matched greedily (highest
//!   score first) to unmatched true boxes of the class in the same frame with IoU ≥ 0.5; matched
//!   = TP, unmatched predictions = FP, unmatched true boxes = FN; "overall" sums the classes'
//!   counts. AP at IoU t: every prediction of the class (any score), ranked by score over all
//!   frames, matched the same way at t; area under the precision envelope (all-point
//!   interpolation); AP50 at t = 0.5, AP50:95 the mean over t = 0.50, 0.55, …, 0.95; "overall"
//!   is the mean over classes that have true boxes.
//!
//! Boxes are x1 y1 x2 y2 pixel edges (IoU without the `+1` of the published training code).

use std::collections::BTreeMap;

use serde::Serialize;

/// A box with a class (1-based label) and, for predictions, a score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ScoredBox {
    /// Class label (1..=classes).
    pub label: i64,
    /// Score in [0, 1] (1 for true boxes).
    pub score: f64,
    /// x1 y1 x2 y2.
    pub xyxy: [f64; 4],
}

/// True and predicted boxes of one frame.
#[derive(Debug, Clone, Default)]
pub struct FrameBoxes {
    /// Ground truth.
    pub truth: Vec<ScoredBox>,
    /// Predictions (any score).
    pub predicted: Vec<ScoredBox>,
}

/// IoU of two x1 y1 x2 y2 boxes (0 when either is empty).
pub fn iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |t: &[f64; 4]| (t[2] - t[0]).max(0.0) * (t[3] - t[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// Precision, recall and F1 from counts (0 when undefined).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Prf {
    /// True positives.
    pub tp: u64,
    /// False positives.
    pub fp: u64,
    /// False negatives.
    pub fn_: u64,
    /// TP / (TP + FP).
    pub precision: f64,
    /// TP / (TP + FN).
    pub recall: f64,
    /// Harmonic mean of the two.
    pub f1: f64,
}

impl Prf {
    /// From counts.
    pub fn new(tp: u64, fp: u64, fn_: u64) -> Self {
        let ratio = |a: u64, b: u64| if b > 0 { a as f64 / b as f64 } else { 0.0 };
        let precision = ratio(tp, tp + fp);
        let recall = ratio(tp, tp + fn_);
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        Self {
            tp,
            fp,
            fn_,
            precision,
            recall,
            f1,
        }
    }
}

/// Box-level scores of one class (or overall).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BoxScores {
    /// P/R/F1 at IoU ≥ 0.5 and score ≥ the threshold.
    pub at_threshold: Prf,
    /// AP at IoU 0.5.
    pub ap50: f64,
    /// Mean AP over IoU 0.50:0.05:0.95.
    pub ap50_95: f64,
}

/// Every detection score of a split.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DetectionScores {
    /// The paper's image-level P/R/F1 (no overlap test).
    pub image: Prf,
    /// Box-level scores per class label.
    pub per_class: BTreeMap<i64, BoxScores>,
    /// Box-level scores over all classes.
    pub overall: BoxScores,
    /// Overall precision–recall points at IoU 0.5 (every score), for the report's curve:
    /// `(recall, precision)` in rank order.
    pub pr_curve: Vec<(f64, f64)>,
    /// Box-level P/R/F1 at IoU ≥ 0.5 and the threshold with the class ignored (any predicted
    /// box may match any true box): where the boxes are, whatever they are called.
    pub located: Prf,
}

/// Greedy matching in one frame: `preds` (indices into `frame.predicted`, already ranked) to
/// the frame's true boxes of `label` at IoU ≥ `t`; returns one flag per prediction (TP) and the
/// number of true boxes left unmatched.
fn match_frame(frame: &FrameBoxes, preds: &[usize], label: i64, t: f64) -> (Vec<bool>, u64) {
    let truths: Vec<&ScoredBox> = frame.truth.iter().filter(|b| b.label == label).collect();
    let mut used = vec![false; truths.len()];
    let flags = preds
        .iter()
        .map(|&i| {
            let p = &frame.predicted[i];
            let best = truths
                .iter()
                .enumerate()
                .filter(|(j, _)| !used[*j])
                .map(|(j, g)| (j, iou(&p.xyxy, &g.xyxy)))
                .filter(|(_, o)| *o >= t)
                .max_by(|a, b| a.1.total_cmp(&b.1));
            match best {
                Some((j, _)) => {
                    used[j] = true;
                    true
                }
                None => false,
            }
        })
        .collect();
    (flags, used.iter().filter(|u| !**u).count() as u64)
}

/// Ranks `frame.predicted` of `label` (score ≥ `min_score`) by score, highest first.
fn ranked(frame: &FrameBoxes, label: i64, min_score: f64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..frame.predicted.len())
        .filter(|&i| frame.predicted[i].label == label && frame.predicted[i].score >= min_score)
        .collect();
    idx.sort_by(|&a, &b| {
        frame.predicted[b]
            .score
            .total_cmp(&frame.predicted[a].score)
    });
    idx
}

/// AP of `label` at IoU `t` and its (recall, precision) points.
fn average_precision(frames: &[FrameBoxes], label: i64, t: f64) -> (f64, Vec<(f64, f64)>) {
    let n_truth: u64 = frames
        .iter()
        .map(|f| f.truth.iter().filter(|b| b.label == label).count() as u64)
        .sum();
    // Match per frame in score order (the greedy match of a frame only depends on the frame's
    // own ranking), then rank every prediction globally.
    let mut all: Vec<(f64, bool)> = Vec::new();
    for f in frames {
        let preds = ranked(f, label, f64::NEG_INFINITY);
        let (flags, _) = match_frame(f, &preds, label, t);
        all.extend(
            preds
                .iter()
                .zip(flags)
                .map(|(&i, tp)| (f.predicted[i].score, tp)),
        );
    }
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    if n_truth == 0 {
        return (0.0, Vec::new());
    }
    let (mut tp, mut fp) = (0u64, 0u64);
    let mut points = Vec::with_capacity(all.len());
    for (_, hit) in &all {
        if *hit {
            tp += 1;
        } else {
            fp += 1;
        }
        points.push((tp as f64 / n_truth as f64, tp as f64 / (tp + fp) as f64));
    }
    // All-point interpolation: the precision envelope (the best precision at this recall or
    // beyond, a running maximum from the end) integrated over recall.
    let mut envelope = vec![0.0; points.len()];
    let mut best = 0.0_f64;
    for (e, p) in envelope.iter_mut().zip(&points).rev() {
        best = best.max(p.1);
        *e = best;
    }
    let mut ap = 0.0;
    let mut prev_recall = 0.0;
    for (p, e) in points.iter().zip(&envelope) {
        ap += (p.0 - prev_recall) * e;
        prev_recall = p.0;
    }
    (ap, points)
}

/// Scores `frames` for labels `1..=num_classes` at `score_threshold`.
pub fn score(frames: &[FrameBoxes], num_classes: usize, score_threshold: f64) -> DetectionScores {
    // Image level.
    let (mut tp, mut fp, mut fn_) = (0, 0, 0);
    for f in frames {
        let any = f.predicted.iter().any(|p| p.score >= score_threshold);
        match (!f.truth.is_empty(), any) {
            (true, true) => tp += 1,
            (true, false) => fn_ += 1,
            (false, true) => fp += 1,
            (false, false) => {}
        }
    }
    let image = Prf::new(tp, fp, fn_);

    // Class ignored: every box relabelled 1, matched as one class.
    let (mut ltp, mut lfp, mut lfn) = (0, 0, 0);
    for f in frames {
        let one = |b: &ScoredBox| ScoredBox { label: 1, ..*b };
        let agnostic = FrameBoxes {
            truth: f.truth.iter().map(one).collect(),
            predicted: f.predicted.iter().map(one).collect(),
        };
        let preds = ranked(&agnostic, 1, score_threshold);
        let (flags, missed) = match_frame(&agnostic, &preds, 1, 0.5);
        ltp += flags.iter().filter(|h| **h).count() as u64;
        lfp += flags.iter().filter(|h| !**h).count() as u64;
        lfn += missed;
    }
    let located = Prf::new(ltp, lfp, lfn);

    let mut per_class = BTreeMap::new();
    let (mut sum_tp, mut sum_fp, mut sum_fn) = (0, 0, 0);
    let (mut ap50s, mut ap5095s) = (Vec::new(), Vec::new());
    for label in 1..=num_classes as i64 {
        let (mut tp, mut fp, mut fn_) = (0, 0, 0);
        for f in frames {
            let preds = ranked(f, label, score_threshold);
            let (flags, missed) = match_frame(f, &preds, label, 0.5);
            tp += flags.iter().filter(|h| **h).count() as u64;
            fp += flags.iter().filter(|h| !**h).count() as u64;
            fn_ += missed;
        }
        sum_tp += tp;
        sum_fp += fp;
        sum_fn += fn_;
        let has_truth = frames
            .iter()
            .any(|f| f.truth.iter().any(|b| b.label == label));
        let (ap50, _) = average_precision(frames, label, 0.5);
        let ap50_95 = (0..10)
            .map(|i| average_precision(frames, label, 0.5 + 0.05 * i as f64).0)
            .sum::<f64>()
            / 10.0;
        if has_truth {
            ap50s.push(ap50);
            ap5095s.push(ap50_95);
        }
        per_class.insert(
            label,
            BoxScores {
                at_threshold: Prf::new(tp, fp, fn_),
                ap50,
                ap50_95,
            },
        );
    }
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    // Overall PR curve at IoU 0.5: classes pooled (each prediction matched within its class).
    let n_truth: u64 = frames.iter().map(|f| f.truth.len() as u64).sum();
    let mut pooled: Vec<(f64, bool)> = Vec::new();
    for f in frames {
        for label in 1..=num_classes as i64 {
            let preds = ranked(f, label, f64::NEG_INFINITY);
            let (flags, _) = match_frame(f, &preds, label, 0.5);
            pooled.extend(
                preds
                    .iter()
                    .zip(flags)
                    .map(|(&i, h)| (f.predicted[i].score, h)),
            );
        }
    }
    pooled.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut ctp, mut cfp) = (0u64, 0u64);
    let pr_curve = if n_truth == 0 {
        Vec::new()
    } else {
        pooled
            .iter()
            .map(|(_, h)| {
                if *h {
                    ctp += 1
                } else {
                    cfp += 1
                }
                (ctp as f64 / n_truth as f64, ctp as f64 / (ctp + cfp) as f64)
            })
            .collect()
    };
    DetectionScores {
        image,
        per_class,
        overall: BoxScores {
            at_threshold: Prf::new(sum_tp, sum_fp, sum_fn),
            ap50: mean(&ap50s),
            ap50_95: mean(&ap5095s),
        },
        pr_curve,
        located,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(label: i64, score: f64, xyxy: [f64; 4]) -> ScoredBox {
        ScoredBox { label, score, xyxy }
    }

    #[test]
    fn a_misplaced_box_counts_for_the_paper_but_not_at_iou() {
        let frames = vec![
            // Found in the right place.
            FrameBoxes {
                truth: vec![b(1, 1.0, [10.0, 10.0, 50.0, 50.0])],
                predicted: vec![b(1, 0.9, [12.0, 10.0, 50.0, 52.0])],
            },
            // A confident box far from the polyp: the paper's metric calls this found.
            FrameBoxes {
                truth: vec![b(1, 1.0, [10.0, 10.0, 50.0, 50.0])],
                predicted: vec![b(1, 0.8, [100.0, 100.0, 140.0, 140.0])],
            },
            // Nothing predicted on a polyp frame.
            FrameBoxes {
                truth: vec![b(2, 1.0, [0.0, 0.0, 20.0, 20.0])],
                predicted: vec![b(2, 0.3, [0.0, 0.0, 20.0, 20.0])],
            },
            // A frame without a polyp, with a box.
            FrameBoxes {
                truth: vec![],
                predicted: vec![b(2, 0.7, [0.0, 0.0, 20.0, 20.0])],
            },
        ];
        let s = score(&frames, 2, 0.5);
        assert_eq!((s.image.tp, s.image.fp, s.image.fn_), (2, 1, 1));
        let c1 = s.per_class[&1].at_threshold;
        assert_eq!((c1.tp, c1.fp, c1.fn_), (1, 1, 1));
        let c2 = s.per_class[&2].at_threshold;
        assert_eq!((c2.tp, c2.fp, c2.fn_), (0, 1, 1));
        assert_eq!(
            (s.overall.at_threshold.tp, s.overall.at_threshold.fp),
            (1, 2)
        );
        // Class 1: ranks 0.9 (hit), 0.8 (miss) over 2 truths → AP50 = 0.5.
        assert!((s.per_class[&1].ap50 - 0.5).abs() < 1e-12);
        // Class 2: 0.7 (miss, empty frame), 0.3 (hit) over 1 truth → envelope 0.5 → AP 0.5.
        assert!((s.per_class[&2].ap50 - 0.5).abs() < 1e-12);
        assert!(s.per_class[&1].ap50_95 < s.per_class[&1].ap50);
        assert_eq!(s.pr_curve.len(), 4);
        // Class ignored: the class-2 box on the polyp-free frame stays a false positive, the
        // low-score one is below the threshold.
        assert_eq!((s.located.tp, s.located.fp, s.located.fn_), (1, 2, 2));
    }

    #[test]
    fn perfect_detections_score_one_and_duplicates_are_false_positives() {
        let t = [5.0, 5.0, 25.0, 30.0];
        let frames = vec![FrameBoxes {
            truth: vec![b(1, 1.0, t)],
            predicted: vec![b(1, 0.9, t), b(1, 0.8, t)],
        }];
        let s = score(&frames, 1, 0.5);
        let p = s.per_class[&1].at_threshold;
        assert_eq!((p.tp, p.fp, p.fn_), (1, 1, 0));
        assert_eq!(s.per_class[&1].ap50, 1.0);
        assert_eq!(s.per_class[&1].ap50_95, 1.0);
        assert_eq!(iou(&t, &[25.0, 5.0, 45.0, 30.0]), 0.0);
    }

    #[test]
    fn average_precision_integrates_the_precision_envelope() {
        // Ranked hit (0.9), miss (0.8), hit (0.7), over 3 truths: points (1/3, 1), (1/3, 1/2),
        // (2/3, 2/3); the envelope lifts the middle point to 2/3: AP = 1/3 + 0 + 1/3 · 2/3.
        let t = [0.0, 0.0, 10.0, 10.0];
        let far = [50.0, 50.0, 60.0, 60.0];
        let frames = vec![
            FrameBoxes {
                truth: vec![b(1, 1.0, t)],
                predicted: vec![b(1, 0.9, t)],
            },
            FrameBoxes {
                truth: vec![b(1, 1.0, t)],
                predicted: vec![b(1, 0.8, far), b(1, 0.7, t)],
            },
            FrameBoxes {
                truth: vec![b(1, 1.0, t)],
                predicted: vec![],
            },
        ];
        let s = score(&frames, 1, 0.5);
        assert!((s.per_class[&1].ap50 - 5.0 / 9.0).abs() < 1e-12, "{s:?}");
        assert_eq!(s.pr_curve.len(), 3);
    }
}
