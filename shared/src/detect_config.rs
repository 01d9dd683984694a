//! Detection (KUMC polyp boxes, STFT on FCOS) settings, defaults equal to the published code's
//! (`STFT/configs/STFT/kumc_R_50_STFT.yaml` over `stft_core/config/defaults.py`): the network's
//! head and post-processing ([`DetectorConfig`]) and the fine-tuning run ([`DetectConfig`]).
//! Both refuse unknown fields and [`DetectConfig::validate`] names the first bad field.

use serde::{Deserialize, Serialize};

use crate::error::check;
use crate::{Error, InitFrom, Result, TrainPrecision};

/// The box-regression loss of FCOS (`MODEL.FCOS.IOU_LOSS_TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IouLossKind {
    /// `-log(IoU)`.
    Iou,
    /// `1 - IoU`.
    LinearIou,
    /// `1 - GIoU` (the published setting).
    Giou,
}

/// The STFT-FCOS network beyond the backbone: pyramid width, FCOS head, STFT branch, targets
/// and post-processing. Field names follow the published config keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    /// Object classes without the background (`MODEL.FCOS.NUM_CLASSES - 1`; KUMC: 2).
    pub num_classes: usize,
    /// Channels of the FPN levels and the head (`MODEL.RESNETS.BACKBONE_OUT_CHANNELS`).
    pub fpn_channels: usize,
    /// Strides of P3–P7 in pixels (`MODEL.FCOS.FPN_STRIDES`).
    pub fpn_strides: Vec<u32>,
    /// Regression range of each level in pixels (`[lo, hi]`, the FCOS loss's
    /// `object_sizes_of_interest`).
    pub object_sizes: Vec<[f64; 2]>,
    /// Convolutions per tower (`MODEL.FCOS.NUM_CONVS`).
    pub num_convs: usize,
    /// Groups of the towers' GroupNorm (32 in the published head).
    pub group_norm_groups: usize,
    /// Deformable groups of the STFT branch's deformable convolution (4).
    pub deformable_groups: usize,
    /// Prior probability the classification biases start at (`MODEL.FCOS.PRIOR_PROB`).
    pub prior_prob: f64,
    /// `relu(x)·stride` regression instead of `exp(x)·stride` (`MODEL.FCOS.NORM_REG_TARGETS`).
    pub norm_reg_targets: bool,
    /// Centerness predicted from the regression tower (`MODEL.FCOS.CENTERNESS_ON_REG`).
    pub centerness_on_reg: bool,
    /// Centre-sampling radius in strides (`MODEL.FCOS.CENTER_SAMPLING_RADIUS`; 0 = whole box).
    pub center_sampling_radius: f64,
    /// Box loss (`MODEL.FCOS.IOU_LOSS_TYPE`).
    pub iou_loss: IouLossKind,
    /// Focal loss alpha (`MODEL.FCOS.LOSS_ALPHA`).
    pub focal_alpha: f64,
    /// Focal loss gamma (`MODEL.FCOS.LOSS_GAMMA`).
    pub focal_gamma: f64,
    /// Standard deviation of the offset convolution's initial weights
    /// (`MODEL.STFT.OFFSET_WEIGHT_STD`).
    pub offset_weight_std: f64,
    /// IoU with a true box from which a location is an STFT positive (`MODEL.STFT.IOU_THRESH`).
    pub stft_iou_thresh: f64,
    /// Scale of the STFT box refinement per coordinate (`MODEL.STFT.BBOX_STD`).
    pub stft_bbox_std: [f64; 4],
    /// Smooth-L1 beta of the STFT refinement loss (`MODEL.STFT.REG_BETA`).
    pub stft_reg_beta: f64,
    /// Candidate threshold on `sqrt(cls · centerness)` (`MODEL.FCOS.INFERENCE_TH`).
    pub inference_th: f64,
    /// Class-wise NMS IoU threshold (`MODEL.FCOS.NMS_TH`).
    pub nms_th: f64,
    /// Candidates kept per level before NMS (`MODEL.FCOS.PRE_NMS_TOP_N`).
    pub pre_nms_top_n: usize,
    /// Detections kept per image after NMS (`TEST.DETECTIONS_PER_IMG`; 0 = all).
    pub detections_per_img: usize,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            num_classes: 2,
            fpn_channels: 256,
            fpn_strides: vec![8, 16, 32, 64, 128],
            object_sizes: vec![
                [-1.0, 64.0],
                [64.0, 128.0],
                [128.0, 256.0],
                [256.0, 512.0],
                [512.0, 100_000_000.0],
            ],
            num_convs: 4,
            group_norm_groups: 32,
            deformable_groups: 4,
            prior_prob: 0.01,
            norm_reg_targets: true,
            centerness_on_reg: true,
            center_sampling_radius: 1.5,
            iou_loss: IouLossKind::Giou,
            focal_alpha: 0.25,
            focal_gamma: 2.0,
            offset_weight_std: 0.01,
            stft_iou_thresh: 0.1,
            stft_bbox_std: [0.5; 4],
            stft_reg_beta: 0.11,
            inference_th: 0.05,
            nms_th: 0.6,
            pre_nms_top_n: 1000,
            detections_per_img: 300,
        }
    }
}

impl DetectorConfig {
    /// Checks every field (prefix `field_prefix` in the error, e.g. `detector.`).
    pub fn validate_at(&self, field_prefix: &str) -> Result<()> {
        let f = |name: &str| format!("{field_prefix}{name}");
        for (name, v) in [
            ("num_classes", self.num_classes),
            ("fpn_channels", self.fpn_channels),
            ("num_convs", self.num_convs),
            ("group_norm_groups", self.group_norm_groups),
            ("deformable_groups", self.deformable_groups),
            ("pre_nms_top_n", self.pre_nms_top_n),
        ] {
            check(v >= 1, &f(name), || "must be at least 1".into())?;
        }
        check(
            self.fpn_channels.is_multiple_of(self.group_norm_groups),
            &f("group_norm_groups"),
            || {
                format!(
                    "{} does not divide fpn_channels {}",
                    self.group_norm_groups, self.fpn_channels
                )
            },
        )?;
        check(
            self.fpn_channels.is_multiple_of(self.deformable_groups),
            &f("deformable_groups"),
            || {
                format!(
                    "{} does not divide fpn_channels {}",
                    self.deformable_groups, self.fpn_channels
                )
            },
        )?;
        check(self.fpn_strides.len() == 5, &f("fpn_strides"), || {
            format!(
                "{} strides given; the pyramid has five levels (P3-P7)",
                self.fpn_strides.len()
            )
        })?;
        for (i, pair) in self.fpn_strides.windows(2).enumerate() {
            check(
                pair[0] >= 1 && pair[1] == 2 * pair[0],
                &f("fpn_strides"),
                || {
                    format!(
                        "level {} stride {} must be twice level {}'s {}",
                        i + 1,
                        pair[1],
                        i,
                        pair[0]
                    )
                },
            )?;
        }
        check(
            self.object_sizes.len() == self.fpn_strides.len(),
            &f("object_sizes"),
            || {
                format!(
                    "{} ranges for {} levels",
                    self.object_sizes.len(),
                    self.fpn_strides.len()
                )
            },
        )?;
        for (i, [lo, hi]) in self.object_sizes.iter().enumerate() {
            check(
                lo.is_finite() && hi.is_finite() && lo < hi,
                &f("object_sizes"),
                || format!("level {i}: [{lo}, {hi}] is not an increasing range"),
            )?;
        }
        check(
            self.prior_prob > 0.0 && self.prior_prob < 1.0,
            &f("prior_prob"),
            || format!("{} is outside (0, 1)", self.prior_prob),
        )?;
        for (name, v) in [
            ("center_sampling_radius", self.center_sampling_radius),
            ("focal_gamma", self.focal_gamma),
            ("offset_weight_std", self.offset_weight_std),
            ("stft_reg_beta", self.stft_reg_beta),
        ] {
            check(v.is_finite() && v >= 0.0, &f(name), || {
                format!("{v} must be zero or positive")
            })?;
        }
        for (name, v) in [
            ("focal_alpha", self.focal_alpha),
            ("stft_iou_thresh", self.stft_iou_thresh),
            ("inference_th", self.inference_th),
            ("nms_th", self.nms_th),
        ] {
            check((0.0..=1.0).contains(&v), &f(name), || {
                format!("{v} is outside [0, 1]")
            })?;
        }
        check(
            self.stft_bbox_std.iter().all(|v| v.is_finite() && *v > 0.0),
            &f("stft_bbox_std"),
            || format!("{:?}: every entry must be positive", self.stft_bbox_std),
        )?;
        Ok(())
    }

    /// [`DetectorConfig::validate_at`] with field names at the top level.
    pub fn validate(&self) -> Result<()> {
        self.validate_at("")
    }

    /// Background label of the published targets (`num_classes + 5`).
    pub fn background_label(&self) -> i64 {
        self.num_classes as i64 + 5
    }
}

/// Fine-tuning the detector (defaults: the published KUMC config on one GPU).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    /// The network beyond the backbone.
    pub detector: DetectorConfig,
    /// Epochs over the training frames.
    pub epochs: usize,
    /// Current frames (each with its reference frames) per rank per step
    /// (`SOLVER.IMS_PER_BATCH` per GPU).
    pub batch_per_rank: usize,
    /// SGD learning rate (`SOLVER.BASE_LR`), not scaled with the batch.
    pub lr: f64,
    /// Learning-rate factor of biases (`SOLVER.BIAS_LR_FACTOR`).
    pub bias_lr_factor: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Weight decay of weights (`SOLVER.WEIGHT_DECAY`).
    pub weight_decay: f64,
    /// Weight decay of biases (`SOLVER.WEIGHT_DECAY_BIAS`).
    pub weight_decay_bias: f64,
    /// Linear warm-up from `warmup_factor · lr` over `warmup_iters` steps.
    pub warmup_factor: f64,
    /// Warm-up length in steps.
    pub warmup_iters: usize,
    /// Steps after which the learning rate is multiplied by `gamma` (`SOLVER.STEPS`).
    pub decay_steps: Vec<usize>,
    /// Step-decay factor (`SOLVER.GAMMA`).
    pub gamma: f64,
    /// Stochastic-depth rate of the backbone while fine-tuning (published 0.1).
    pub drop_path_rate: f64,
    /// Resize every frame to `max_size × max_size`, as the published `Resize.get_size` does
    /// (its aspect-keeping variant, `get_size_`, is unused); `false` keeps the aspect ratio
    /// (short side `min_size`, long side at most `max_size`).
    pub square_resize: bool,
    /// Short side frames are resized to when `square_resize` is off (`INPUT.MIN_SIZE_TRAIN`).
    pub min_size: usize,
    /// Longest side allowed after resizing (`INPUT.MAX_SIZE_*`).
    pub max_size: usize,
    /// Resized sides are rounded down to a multiple of this (the patch grid; 32 keeps every
    /// pyramid level integral).
    pub size_divisor: usize,
    /// Reference frames are drawn 1..=`ref_max_offset` frames before and after the current one
    /// (`MODEL.VID.STFT.MAX_OFFSET`).
    pub ref_max_offset: usize,
    /// Probability of a horizontal flip in training (`INPUT.HORIZONTAL_FLIP_PROB_TRAIN`).
    pub flip_prob: f64,
    /// Score from which a detection counts in the image-level and box-level P/R/F1.
    pub score_threshold: f64,
    /// Which network of a pre-training checkpoint initialises the backbone.
    pub init_from: InitFrom,
    /// Seed of initialisation, data order, reference draws and flips.
    pub seed: u64,
    /// Numeric precision.
    pub precision: TrainPrecision,
    /// Evaluate on the validation split every this many epochs (and after the last).
    pub val_every: usize,
    /// Write a checkpoint every this many steps (and at every epoch end); 0 = epoch ends only.
    pub checkpoint_every: usize,
    /// Step checkpoints kept.
    pub keep_checkpoints: usize,
    /// Write a metrics line every this many steps.
    pub log_every: usize,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            detector: DetectorConfig::default(),
            epochs: 20,
            batch_per_rank: 1,
            lr: 0.0025,
            bias_lr_factor: 2.0,
            momentum: 0.9,
            weight_decay: 1e-4,
            weight_decay_bias: 0.0,
            warmup_factor: 1.0 / 3.0,
            warmup_iters: 8000,
            decay_steps: vec![64000, 80000, 88000],
            gamma: 0.5,
            drop_path_rate: 0.1,
            square_resize: true,
            min_size: 600,
            max_size: 640,
            size_divisor: 32,
            ref_max_offset: 9,
            flip_prob: 0.5,
            score_threshold: 0.5,
            init_from: InitFrom::Teacher,
            seed: 0,
            precision: TrainPrecision::Auto,
            val_every: 1,
            checkpoint_every: 0,
            keep_checkpoints: 2,
            log_every: 1,
        }
    }
}

impl DetectConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        self.detector.validate_at("detector.")?;
        for (field, v) in [
            ("epochs", self.epochs),
            ("batch_per_rank", self.batch_per_rank),
            ("min_size", self.min_size),
            ("max_size", self.max_size),
            ("size_divisor", self.size_divisor),
            ("ref_max_offset", self.ref_max_offset),
            ("val_every", self.val_every),
            ("keep_checkpoints", self.keep_checkpoints),
            ("log_every", self.log_every),
        ] {
            check(v >= 1, field, || "must be at least 1".into())?;
        }
        check(self.max_size >= self.min_size, "max_size", || {
            format!(
                "{} is smaller than min_size {}",
                self.max_size, self.min_size
            )
        })?;
        check(self.min_size >= self.size_divisor, "min_size", || {
            format!(
                "{} is smaller than size_divisor {}",
                self.min_size, self.size_divisor
            )
        })?;
        for (field, v) in [("lr", self.lr), ("bias_lr_factor", self.bias_lr_factor)] {
            check(v.is_finite() && v > 0.0, field, || {
                format!("{v} must be a positive number")
            })?;
        }
        for (field, v) in [
            ("weight_decay", self.weight_decay),
            ("weight_decay_bias", self.weight_decay_bias),
        ] {
            check(v.is_finite() && v >= 0.0, field, || {
                format!("{v} must be zero or positive")
            })?;
        }
        check((0.0..1.0).contains(&self.momentum), "momentum", || {
            format!("{} is outside [0, 1)", self.momentum)
        })?;
        check(
            self.warmup_factor > 0.0 && self.warmup_factor <= 1.0,
            "warmup_factor",
            || format!("{} is outside (0, 1]", self.warmup_factor),
        )?;
        check(self.gamma > 0.0 && self.gamma <= 1.0, "gamma", || {
            format!("{} is outside (0, 1]", self.gamma)
        })?;
        check(
            self.decay_steps.windows(2).all(|w| w[0] < w[1]),
            "decay_steps",
            || format!("{:?} must be increasing", self.decay_steps),
        )?;
        check(
            (0.0..1.0).contains(&self.drop_path_rate),
            "drop_path_rate",
            || format!("{} is outside [0, 1)", self.drop_path_rate),
        )?;
        for (field, v) in [
            ("flip_prob", self.flip_prob),
            ("score_threshold", self.score_threshold),
        ] {
            check((0.0..=1.0).contains(&v), field, || {
                format!("{v} is outside [0, 1]")
            })?;
        }
        Ok(())
    }

    /// The learning rate at 0-based `step` before the bias factor: linear warm-up from
    /// `warmup_factor` to 1 over `warmup_iters`, times `gamma` per decay step passed (the
    /// published `WarmupMultiStepLR`).
    pub fn lr_at(&self, step: usize) -> f64 {
        let warm = if step < self.warmup_iters {
            let alpha = step as f64 / self.warmup_iters as f64;
            self.warmup_factor * (1.0 - alpha) + alpha
        } else {
            1.0
        };
        let passed = self.decay_steps.iter().filter(|s| **s <= step).count();
        self.lr * warm * self.gamma.powi(passed as i32)
    }

    /// Reads a JSON document over the defaults; unknown fields are refused. The result is
    /// validated.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text).map_err(|source| Error::Parse {
            origin: origin.to_string(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_published_config_and_valid() {
        let c = DetectConfig::default();
        c.validate().unwrap();
        assert_eq!((c.lr, c.weight_decay, c.gamma), (0.0025, 1e-4, 0.5));
        assert_eq!((c.min_size, c.max_size), (600, 640));
        assert_eq!(c.detector.fpn_strides, [8, 16, 32, 64, 128]);
        assert_eq!(c.detector.background_label(), 7);
    }

    #[test]
    fn bad_fields_are_named() {
        let err = |text: &str| {
            DetectConfig::from_json_str(text, "t")
                .unwrap_err()
                .to_string()
        };
        assert!(err(r#"{"lr": 0}"#).contains("`lr`"));
        assert!(err(r#"{"bogus": 1}"#).contains("bogus"));
        assert!(err(r#"{"detector": {"nms_th": 2}}"#).contains("`detector.nms_th`"));
        assert!(
            err(r#"{"detector": {"fpn_channels": 48}}"#).contains("`detector.group_norm_groups`")
        );
        assert!(
            err(r#"{"detector": {"fpn_strides": [8, 16, 32, 64, 100]}}"#)
                .contains("`detector.fpn_strides`")
        );
        assert!(err(r#"{"decay_steps": [5, 3]}"#).contains("`decay_steps`"));
    }

    #[test]
    fn warmup_then_step_decay() {
        let c = DetectConfig {
            warmup_iters: 10,
            decay_steps: vec![20, 30],
            ..DetectConfig::default()
        };
        assert!((c.lr_at(0) - c.lr / 3.0).abs() < 1e-12);
        assert!((c.lr_at(5) - c.lr * (1.0 / 3.0 * 0.5 + 0.5)).abs() < 1e-12);
        assert_eq!(c.lr_at(10), c.lr);
        assert_eq!(c.lr_at(20), c.lr * 0.5);
        assert_eq!(c.lr_at(35), c.lr * 0.25);
    }
}
