//! Training targets and losses of STFT-FCOS (`stft_core/modeling/rpn/fcos_stft/loss.py`,
//! `STFTFCOSLossComputation`).
//!
//! Targets per image: a location is an FCOS positive for the smallest-area box (area with the
//! published `+1`) that contains it within the centre-sampling radius (`radius · stride` around
//! the box centre, clipped to the box) and whose largest ltrb distance lies in the level's
//! range; its regression target is the ltrb distances in pixels and its centerness
//! `sqrt(min(l,r)/max(l,r) · min(t,b)/max(t,b))`. An STFT positive is a location whose
//! detached current-frame box overlaps some true box with IoU (with `+1`) ≥ `stft_iou_thresh`;
//! its target is the best box's class and `(gt − pre) / (pre_wh · bbox_std)`. The published
//! background label is `num_classes + 5`.
//!
//! Losses: sigmoid focal loss over all locations / #positives, GIoU (or IoU) on the positives
//! weighted by the centerness target / Σ centerness, centerness BCE / #positives, STFT focal
//! loss / #STFT positives, STFT smooth-L1 (beta `stft_reg_beta`) / #STFT positives; every
//! normaliser is the all-rank sum divided by the world size, at least 1.

use tch::{Kind, Reduction, Tensor};

use endofm_shared::{DetectorConfig, IouLossKind};

use super::head::HeadOutput;
use crate::{Error, Result};

/// The published `INF` of unassigned areas and the last level's range.
const INF: f64 = 100_000_000.0;

/// True boxes of one image.
#[derive(Debug)]
pub struct Targets {
    /// (K, 4) float32, x1 y1 x2 y2 in pixels of the network input.
    pub boxes: Tensor,
    /// (K,) int64 in `1..=num_classes`.
    pub labels: Tensor,
}

/// Targets at every location, levels concatenated (R = Σ h·w).
#[derive(Debug)]
pub struct GroundTruth {
    /// (B, R) int64: class, or the background label.
    pub classes: Tensor,
    /// (B, R, 4) ltrb distances to the assigned box, pixels.
    pub reg: Tensor,
    /// (B, R) centerness target (meaningful at positives only).
    pub centerness: Tensor,
    /// (B, R) int64: STFT class or background.
    pub stft_classes: Tensor,
    /// (B, R, 4) STFT refinement target (meaningful at STFT positives only).
    pub stft_reg: Tensor,
}

/// `(shifts − boxes[..., :2], boxes[..., 2:] − shifts)`: shifts (R, 2), boxes (..., 1, 4) or
/// (R, 4) → (..., R, 4).
fn deltas(shifts: &Tensor, boxes: &Tensor) -> Tensor {
    Tensor::cat(
        &[
            shifts - boxes.narrow(-1, 0, 2),
            boxes.narrow(-1, 2, 2) - shifts,
        ],
        -1,
    )
}

/// Pairwise IoU with the published `+1` convention: (R, 4) × (K, 4) → (R, K).
fn iou_plus_one(a: &Tensor, b: &Tensor) -> Tensor {
    let area = |t: &Tensor| {
        (t.select(1, 2) - t.select(1, 0) + 1.0) * (t.select(1, 3) - t.select(1, 1) + 1.0)
    };
    let (a1, a2) = (area(a), area(b));
    let lt = a.narrow(1, 0, 2).unsqueeze(1).maximum(&b.narrow(1, 0, 2));
    let rb = a.narrow(1, 2, 2).unsqueeze(1).minimum(&b.narrow(1, 2, 2));
    let wh = (rb - lt + 1.0).clamp_min(0.0);
    let inter = wh.select(2, 0) * wh.select(2, 1);
    &inter / (a1.unsqueeze(1) + a2 - &inter)
}

/// The targets of a batch: `locations` per level (h·w, 2), one [`Targets`] per sample, and the
/// head's detached current-frame boxes `pre_bbox` (B, R, 4).
///
/// Errors: a sample count that differs from `pre_bbox`'s, or malformed boxes/labels.
pub fn ground_truth(
    cfg: &DetectorConfig,
    locations: &[Tensor],
    targets: &[Targets],
    pre_bbox: &Tensor,
) -> Result<GroundTruth> {
    if pre_bbox.size()[0] != targets.len() as i64 {
        return Err(Error::Input {
            name: "targets".into(),
            reason: format!(
                "{} target sets for {} samples",
                targets.len(),
                pre_bbox.size()[0]
            ),
        });
    }
    let device = pre_bbox.device();
    let shifts = Tensor::cat(locations, 0); // (R, 2)
    let r = shifts.size()[0];
    let bg = cfg.background_label();
    let (lo, hi): (Vec<f32>, Vec<f32>) = locations
        .iter()
        .zip(&cfg.object_sizes)
        .flat_map(|(l, [lo, hi])| {
            std::iter::repeat_n((*lo as f32, *hi as f32), l.size()[0] as usize)
        })
        .unzip();
    let lo = Tensor::from_slice(&lo).to_device(device);
    let hi = Tensor::from_slice(&hi).to_device(device);
    let mut out: [Vec<Tensor>; 5] = Default::default();
    tch::no_grad(|| -> Result<()> {
        for (i, t) in targets.iter().enumerate() {
            let boxes = t.boxes.to_device(device).to_kind(Kind::Float);
            let labels = t.labels.to_device(device).to_kind(Kind::Int64);
            let k = boxes.size()[0];
            if boxes.size() != [k, 4] || labels.size() != [k] {
                return Err(Error::Input {
                    name: format!("targets[{i}]"),
                    reason: format!(
                        "boxes {:?} / labels {:?} are not (K, 4) / (K,)",
                        boxes.size(),
                        labels.size()
                    ),
                });
            }
            let pre = pre_bbox.get(i as i64);
            if k == 0 {
                let bg_all = Tensor::full([r], bg, (Kind::Int64, device));
                let zeros4 = Tensor::zeros([r, 4], (Kind::Float, device));
                out[0].push(bg_all.shallow_clone());
                out[1].push(zeros4.shallow_clone());
                out[2].push(Tensor::zeros([r], (Kind::Float, device)));
                out[3].push(bg_all);
                out[4].push(zeros4);
                continue;
            }
            let d = deltas(&shifts, &boxes.unsqueeze(1)); // (K, R, 4)
            let in_boxes = if cfg.center_sampling_radius > 0.0 {
                let centers = (boxes.narrow(1, 0, 2) + boxes.narrow(1, 2, 2)) / 2.0;
                let mut parts = Vec::new();
                for (loc, stride) in locations.iter().zip(&cfg.fpn_strides) {
                    let radius = *stride as f64 * cfg.center_sampling_radius;
                    let cb = Tensor::cat(
                        &[
                            (&centers - radius).maximum(&boxes.narrow(1, 0, 2)),
                            (&centers + radius).minimum(&boxes.narrow(1, 2, 2)),
                        ],
                        1,
                    );
                    parts.push(deltas(loc, &cb.unsqueeze(1)).amin(-1, false).gt(0.0));
                }
                Tensor::cat(&parts, 1)
            } else {
                d.amin(-1, false).gt(0.0)
            };
            let max_d = d.amax(-1, false);
            let cared = max_d.ge_tensor(&lo).logical_and(&max_d.le_tensor(&hi));
            let area = (boxes.select(1, 2) - boxes.select(1, 0) + 1.0)
                * (boxes.select(1, 3) - boxes.select(1, 1) + 1.0);
            let areas = area
                .unsqueeze(1)
                .expand([k, r], false)
                .masked_fill(&in_boxes.logical_not(), INF)
                .masked_fill(&cared.logical_not(), INF);
            let (min_area, matched) = areas.min_dim(0, false);
            let reg = deltas(&shifts, &boxes.index_select(0, &matched));
            let classes = labels
                .index_select(0, &matched)
                .masked_fill(&min_area.eq(INF), bg);
            let lr = Tensor::stack(&[reg.select(1, 0), reg.select(1, 2)], 1);
            let tb = Tensor::stack(&[reg.select(1, 1), reg.select(1, 3)], 1);
            let ratio = |t: &Tensor| (t.amin(-1, false) / t.amax(-1, false)).clamp_min(0.0);
            let centerness = (ratio(&lr) * ratio(&tb)).sqrt();

            let iou = iou_plus_one(&pre, &boxes); // (R, K)
            let (max_iou, best) = iou.max_dim(1, false);
            let stft_classes = labels
                .index_select(0, &best)
                .masked_fill(&max_iou.lt(cfg.stft_iou_thresh), bg);
            let std = Tensor::from_slice(&cfg.stft_bbox_std.map(|v| v as f32)).to_device(device);
            let wh = pre.narrow(1, 2, 2) - pre.narrow(1, 0, 2);
            let wh = Tensor::cat(&[&wh, &wh], 1);
            let stft_reg = (boxes.index_select(0, &best) - &pre) / (wh * std);
            out[0].push(classes);
            out[1].push(reg);
            out[2].push(centerness);
            out[3].push(stft_classes);
            out[4].push(stft_reg);
        }
        Ok(())
    })?;
    let [c, g, ctr, sc, sr] = out.map(|v| Tensor::stack(&v, 0));
    Ok(GroundTruth {
        classes: c,
        reg: g,
        centerness: ctr,
        stft_classes: sc,
        stft_reg: sr,
    })
}

/// The five loss terms (scalars).
#[derive(Debug)]
pub struct Losses {
    /// FCOS classification (focal).
    pub cls: Tensor,
    /// FCOS box regression (GIoU).
    pub reg: Tensor,
    /// FCOS centerness (BCE).
    pub centerness: Tensor,
    /// STFT classification (focal).
    pub stft_cls: Tensor,
    /// STFT box refinement (smooth L1).
    pub stft_reg: Tensor,
}

impl Losses {
    /// Names of the terms, in the published order (`loss_cls`, …).
    pub const NAMES: [&'static str; 5] = [
        "loss_cls",
        "loss_reg",
        "loss_centerness",
        "loss_stft_cls",
        "loss_stft_reg",
    ];

    /// The terms in [`Losses::NAMES`] order.
    pub fn terms(&self) -> [&Tensor; 5] {
        [
            &self.cls,
            &self.reg,
            &self.centerness,
            &self.stft_cls,
            &self.stft_reg,
        ]
    }

    /// Their sum (`loss_total`).
    pub fn total(&self) -> Tensor {
        &self.cls + &self.reg + &self.centerness + &self.stft_cls + &self.stft_reg
    }
}

/// This rank's loss normalisers before reduction: `[#positives, Σ centerness at positives,
/// #STFT positives]`. Sum them over ranks, divide by the world size, then take each at least 1
/// ([`Normalisers::from_reduced`]).
pub fn local_counts(cfg: &DetectorConfig, gt: &GroundTruth) -> [f64; 3] {
    let bg = cfg.background_label();
    let fg = gt.classes.ne(bg).logical_and(&gt.classes.ge(0));
    let fg_stft = gt.stft_classes.ne(bg).logical_and(&gt.stft_classes.ge(0));
    let num_fg = fg.sum(Kind::Float).double_value(&[]);
    let ctr = gt
        .centerness
        .masked_select(&fg)
        .sum(Kind::Float)
        .double_value(&[]);
    let num_stft = fg_stft.sum(Kind::Float).double_value(&[]);
    [num_fg, ctr, num_stft]
}

/// The divisors of the loss terms.
#[derive(Debug, Clone, Copy)]
pub struct Normalisers {
    /// Positives (focal and centerness losses).
    pub foreground: f64,
    /// Σ centerness targets at positives (box loss).
    pub centerness: f64,
    /// STFT positives (STFT losses).
    pub stft_foreground: f64,
}

impl Normalisers {
    /// From the all-rank sums of [`local_counts`] and the world size: `max(sum / world, 1)`.
    pub fn from_reduced(sums: [f64; 3], world: usize) -> Self {
        let w = world.max(1) as f64;
        Self {
            foreground: (sums[0] / w).max(1.0),
            centerness: (sums[1] / w).max(1.0),
            stft_foreground: (sums[2] / w).max(1.0),
        }
    }
}

/// Sigmoid focal loss, summed.
fn focal_sum(logits: &Tensor, targets: &Tensor, alpha: f64, gamma: f64) -> Tensor {
    let p = logits.sigmoid();
    let ce =
        logits.binary_cross_entropy_with_logits::<Tensor>(targets, None, None, Reduction::None);
    let p_t: Tensor = &p * targets + (1.0 - &p) * (1.0 - targets);
    let modulator = (-&p_t + 1.0).pow_tensor_scalar(gamma);
    let mut loss = ce * modulator;
    if alpha >= 0.0 {
        loss *= targets * alpha + (1.0 - targets) * (1.0 - alpha);
    }
    loss.sum(Kind::Float)
}

/// (N, A·K, h, w) per level → (N·R, K), levels concatenated per image.
fn flatten_levels(levels: &[Tensor], k: i64) -> Tensor {
    let parts: Vec<Tensor> = levels
        .iter()
        .map(|t| {
            let n = t.size()[0];
            t.permute([0, 2, 3, 1]).reshape([n, -1, k])
        })
        .collect();
    Tensor::cat(&parts, 1).reshape([-1, k])
}

/// One-hot class targets (N, K) for labels in `1..=K`; background rows all zero.
fn one_hot(classes: &Tensor, fg: &Tensor, k: i64) -> Tensor {
    let idx = classes.where_self(fg, &classes.zeros_like());
    idx.one_hot(k + 1).narrow(1, 1, k).to_kind(Kind::Float)
}

/// Box loss on ltrb distances (published `iou_loss`, `box_mode = "ltrb"`), weighted, summed.
fn iou_loss_sum(pred: &Tensor, target: &Tensor, weight: &Tensor, kind: IouLossKind) -> Tensor {
    let eps = f32::EPSILON as f64;
    let (pl, pt, pr, pb) = (
        pred.select(1, 0),
        pred.select(1, 1),
        pred.select(1, 2),
        pred.select(1, 3),
    );
    let (tl, tt, tr, tb) = (
        target.select(1, 0),
        target.select(1, 1),
        target.select(1, 2),
        target.select(1, 3),
    );
    let pred_area = (&pr + &pl).clamp_min(0.0) * (&pb + &pt).clamp_min(0.0);
    let target_area = (&tr + &tl).clamp_min(0.0) * (&tb + &tt).clamp_min(0.0);
    // x1 = −l: max(−l_p, −l_t) = −min(l_p, l_t).
    let w_int = (pr.minimum(&tr) + pl.minimum(&tl)).clamp_min(0.0);
    let h_int = (pb.minimum(&tb) + pt.minimum(&tt)).clamp_min(0.0);
    let inter = w_int * h_int;
    let union = target_area + pred_area - &inter;
    let ious = &inter / union.clamp_min(eps);
    let loss = match kind {
        IouLossKind::Iou => -ious.clamp_min(eps).log(),
        IouLossKind::LinearIou => 1.0 - ious,
        IouLossKind::Giou => {
            let g_w = pr.maximum(&tr) + pl.maximum(&tl);
            let g_h = pb.maximum(&tb) + pt.maximum(&tt);
            let enclosing = g_w * g_h;
            let gious = ious - (&enclosing - &union) / enclosing.clamp_min(eps);
            1.0 - gious
        }
    };
    (loss * weight).sum(Kind::Float)
}

/// The five terms for head outputs `out` against `gt`, divided by `norm`.
pub fn losses(
    cfg: &DetectorConfig,
    out: &HeadOutput,
    gt: &GroundTruth,
    norm: Normalisers,
) -> Losses {
    let k = cfg.num_classes as i64;
    let bg = cfg.background_label();
    let cls = flatten_levels(&out.cls_logits, k);
    let reg = flatten_levels(&out.bbox_reg, 4);
    let ctr = flatten_levels(&out.centerness, 1);
    let stft_cls = flatten_levels(&out.stft_cls_logits, k);
    let stft_reg = flatten_levels(&out.stft_bbox_reg, 4);

    let classes = gt.classes.reshape([-1]);
    let valid = classes.ge(0);
    let fg = valid.logical_and(&classes.ne(bg));
    let fg_idx = fg.nonzero().squeeze_dim(1);
    let valid_idx = valid.nonzero().squeeze_dim(1);
    let targets = one_hot(&classes, &fg, k);
    let loss_cls = focal_sum(
        &cls.index_select(0, &valid_idx),
        &targets.index_select(0, &valid_idx),
        cfg.focal_alpha,
        cfg.focal_gamma,
    ) / norm.foreground;
    let gt_ctr = gt.centerness.reshape([-1, 1]).index_select(0, &fg_idx);
    let loss_reg = iou_loss_sum(
        &reg.index_select(0, &fg_idx),
        &gt.reg.reshape([-1, 4]).index_select(0, &fg_idx),
        &gt_ctr.reshape([-1]),
        cfg.iou_loss,
    ) / norm.centerness;
    let loss_ctr = ctr
        .index_select(0, &fg_idx)
        .binary_cross_entropy_with_logits::<Tensor>(&gt_ctr, None, None, Reduction::Sum)
        / norm.foreground;

    let s_classes = gt.stft_classes.reshape([-1]);
    let s_valid = s_classes.ge(0);
    let s_fg = s_valid.logical_and(&s_classes.ne(bg));
    let s_fg_idx = s_fg.nonzero().squeeze_dim(1);
    let s_valid_idx = s_valid.nonzero().squeeze_dim(1);
    let s_targets = one_hot(&s_classes, &s_fg, k);
    let loss_stft_cls = focal_sum(
        &stft_cls.index_select(0, &s_valid_idx),
        &s_targets.index_select(0, &s_valid_idx),
        cfg.focal_alpha,
        cfg.focal_gamma,
    ) / norm.stft_foreground;
    let loss_stft_reg = stft_reg.index_select(0, &s_fg_idx).smooth_l1_loss(
        &gt.stft_reg.reshape([-1, 4]).index_select(0, &s_fg_idx),
        Reduction::Sum,
        cfg.stft_reg_beta,
    ) / norm.stft_foreground;
    Losses {
        cls: loss_cls,
        reg: loss_reg,
        centerness: loss_ctr,
        stft_cls: loss_stft_cls,
        stft_reg: loss_stft_reg,
    }
}
