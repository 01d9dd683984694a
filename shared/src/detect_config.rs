//! The detection network's settings (KUMC polyp boxes, STFT on FCOS), defaults equal to the
//! published code's (`STFT/configs/STFT/kumc_R_50_STFT.yaml` over
//! `stft_core/config/defaults.py`): pyramid width, head, STFT branch, targets and
//! post-processing ([`DetectorConfig`], the `[detector]` section of a job spec or `--config`
//! file). The fine-tuning run's settings (optimiser, schedule, input size, reference frames)
//! are detection's fields of [`crate::FinetuneConfig`]. Unknown fields are refused and
//! [`DetectorConfig::validate`] names the first bad field.

use serde::{Deserialize, Serialize};

#[cfg(test)]
use crate::Error;
use crate::Result;
use crate::error::check;

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

    /// The published network (`kumc_R_50_STFT.yaml`: 256 FPN channels).
    pub fn published() -> Self {
        Self::default()
    }

    /// The small network of `shared/reference/endofm-tiny-detect` (64 FPN channels; for tests
    /// and CPU runs).
    pub fn tiny() -> Self {
        Self {
            fpn_channels: 64,
            ..Self::default()
        }
    }

    /// The preset of this name (`vit_b` → published, `tiny` → tiny).
    pub fn for_preset(name: &str) -> Option<Self> {
        match name {
            "vit_b" => Some(Self::published()),
            "tiny" => Some(Self::tiny()),
            _ => None,
        }
    }

    /// The network of a run: the fields of `given` (a JSON object) over the preset's network
    /// (`tiny` → [`DetectorConfig::tiny`], anything else or none → the published one),
    /// validated.
    ///
    /// # Errors
    /// `given` not an object, an unknown field or a bad value; the error names the field.
    pub fn resolve(preset: Option<&str>, given: Option<&serde_json::Value>) -> Result<Self> {
        let base = preset
            .and_then(Self::for_preset)
            .unwrap_or_else(Self::published);
        let cfg: Self = crate::overlay::overlay(&base, given, "detector")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Background label of the published targets (`num_classes + 5`).
    pub fn background_label(&self) -> i64 {
        self.num_classes as i64 + 5
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FinetuneConfig, TaskKind};

    #[test]
    fn defaults_are_the_published_config_and_valid() {
        let d = DetectorConfig::published();
        d.validate().unwrap();
        assert_eq!(d.fpn_strides, [8, 16, 32, 64, 128]);
        assert_eq!(d.background_label(), 7);
        assert_eq!(DetectorConfig::for_preset("tiny").unwrap().fpn_channels, 64);
        let c = FinetuneConfig::for_task(TaskKind::Detect);
        c.validate_for(TaskKind::Detect).unwrap();
        assert_eq!((c.lr, c.weight_decay, c.decay_gamma), (0.0025, 1e-4, 0.5));
        assert_eq!((c.min_size, c.max_size, c.batch_per_rank), (600, 640, 1));
    }

    #[test]
    fn bad_fields_are_named() {
        let field = |preset: Option<&str>, v: serde_json::Value| match DetectorConfig::resolve(
            preset,
            Some(&v),
        ) {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(None, serde_json::json!({"nms_th": 2})), "nms_th");
        assert_eq!(field(None, serde_json::json!({"bogus": 1})), "bogus");
        assert_eq!(
            field(Some("tiny"), serde_json::json!({"fpn_channels": 48})),
            "group_norm_groups"
        );
        assert_eq!(
            field(
                None,
                serde_json::json!({"fpn_strides": [8, 16, 32, 64, 100]})
            ),
            "fpn_strides"
        );
        let tiny =
            DetectorConfig::resolve(Some("tiny"), Some(&serde_json::json!({"num_convs": 1})))
                .unwrap();
        assert_eq!((tiny.fpn_channels, tiny.num_convs), (64, 1));
        let ft =
            |v: serde_json::Value| match FinetuneConfig::resolve(TaskKind::Detect, 112, Some(&v)) {
                Err(Error::InvalidConfig { field, .. }) => field,
                other => panic!("{other:?}"),
            };
        assert_eq!(
            ft(serde_json::json!({"decay_steps": [5, 3]})),
            "decay_steps"
        );
        assert_eq!(
            ft(serde_json::json!({"max_size": 64, "min_size": 96})),
            "max_size"
        );
        assert_eq!(ft(serde_json::json!({"test_refs": 3})), "test_refs");
        assert_eq!(ft(serde_json::json!({"crop": 96})), "crop");
        assert_eq!(ft(serde_json::json!({"flip_prob": "half"})), "flip_prob");
    }

    #[test]
    fn warmup_then_step_decay() {
        let c = FinetuneConfig {
            warmup_iters: 10,
            decay_steps: vec![20, 30],
            ..FinetuneConfig::for_task(TaskKind::Detect)
        };
        assert!((c.warmup_step_lr(0) - c.lr / 3.0).abs() < 1e-12);
        assert!((c.warmup_step_lr(5) - c.lr * (1.0 / 3.0 * 0.5 + 0.5)).abs() < 1e-12);
        assert_eq!(c.warmup_step_lr(10), c.lr);
        assert_eq!(c.warmup_step_lr(20), c.lr * 0.5);
        assert_eq!(c.warmup_step_lr(35), c.lr * 0.25);
    }
}
