//! Hyper-parameters of fine-tuning on a downstream task, defaults equal to the published code's
//! (`eval_finetune.py` and the authors' `scripts/eval_finetune_polypdiag.sh` for classification),
//! typed and validated so that a job spec can be refused at submission with the field named.

use serde::{Deserialize, Serialize};

use crate::error::check;
use crate::{Error, Result, TrainPrecision};

/// A downstream task of the paper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Video-level classification (PolypDiag: normal vs abnormal).
    Classify,
    /// Polyp segmentation (CVC-12k, TransUNet hybrid).
    Segment,
    /// Polyp detection (KUMC, STFT-FCOS).
    Detect,
}

impl TaskKind {
    /// The name used in specs, flags and the API.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Classify => "classify",
            TaskKind::Segment => "segment",
            TaskKind::Detect => "detect",
        }
    }

    /// Parses `classify`, `segment` or `detect`.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "classify" => Ok(TaskKind::Classify),
            "segment" => Ok(TaskKind::Segment),
            "detect" => Ok(TaskKind::Detect),
            other => Err(Error::invalid(
                "task",
                format!("unknown task `{other}` (known: classify, segment, detect)"),
            )),
        }
    }
}

impl std::fmt::Display for TaskKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which network of a pre-training checkpoint the backbone is taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitFrom {
    /// The EMA teacher (what the published fine-tuning scripts load, `--checkpoint_key teacher`).
    #[default]
    Teacher,
    /// The student.
    Student,
}

impl InitFrom {
    /// `teacher` or `student`.
    pub fn name(self) -> &'static str {
        match self {
            InitFrom::Teacher => "teacher",
            InitFrom::Student => "student",
        }
    }
}

/// Fine-tuning hyper-parameters (classification defaults: the published PolypDiag script).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    /// Epochs over the training split.
    pub epochs: usize,
    /// Videos per rank per step.
    pub batch_per_rank: usize,
    /// Learning rate. Classification: the base SGD rate at a global batch of 256, scaled
    /// linearly like the published script (`lr · batch_per_rank · world_size / 256`: 0.001 →
    /// 1.5625e-5 for 4 videos on one GPU). Segmentation: AdamW's rate as given (the published
    /// `base_lr`).
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Weight decay (the published classifier uses none).
    pub weight_decay: f64,
    /// Final learning rate of the per-epoch cosine (absolute, `CosineAnnealingLR`'s `eta_min`).
    pub min_lr: f64,
    /// Stochastic-depth rate of the backbone while fine-tuning.
    pub drop_path_rate: f64,
    /// Frames sampled per video.
    pub frames: usize,
    /// Frames of the window the samples are spread over (8 over 256: every 32nd frame).
    pub window: usize,
    /// Crop size in pixels (the network's input size).
    pub crop: usize,
    /// Training: the short side is resized to a random value in `[train_short_min, train_short_max]`.
    pub train_short_min: usize,
    /// Upper end of the training short side.
    pub train_short_max: usize,
    /// Evaluation: the short side is resized to this, then centre-cropped.
    pub test_short: usize,
    /// Normalisation mean (every channel).
    pub mean: f64,
    /// Normalisation standard deviation (every channel).
    pub std: f64,
    /// Which network of a pre-training checkpoint initialises the backbone.
    pub init_from: InitFrom,
    /// Seed of the classifier's initialisation, data order, augmentation and drop-path.
    pub seed: u64,
    /// Numeric precision.
    pub precision: TrainPrecision,
    /// Evaluate on the validation split every this many epochs (and after the last).
    pub val_every: usize,
    /// Write a checkpoint every this many steps (and at every epoch end); 0 = epoch ends only.
    pub checkpoint_every: usize,
    /// Step checkpoints kept (the best and the last epoch's are always kept).
    pub keep_checkpoints: usize,
    /// Write a metrics line every this many steps.
    pub log_every: usize,
    /// Segmentation: training frames are resized to this square before the random crop (the
    /// published `img_size + 32`).
    pub train_resize: usize,
    /// Segmentation: largest training rotation in degrees (uniform in ±, bilinear, zero fill).
    pub rotation_degrees: f64,
    /// Segmentation: power of the per-step polynomial decay `lr · (1 − step/steps)^power`.
    pub poly_power: f64,
    /// Segmentation: frames of a training sequence fed at once (a random run of consecutive
    /// frames); 0 = the whole sequence, as published.
    pub max_frames: usize,
    /// Detection: learning-rate factor of biases (`SOLVER.BIAS_LR_FACTOR`).
    pub bias_lr_factor: f64,
    /// Detection: weight decay of biases (`SOLVER.WEIGHT_DECAY_BIAS`).
    pub weight_decay_bias: f64,
    /// Detection: linear warm-up starts at `warmup_factor · lr` (`SOLVER.WARMUP_FACTOR`).
    pub warmup_factor: f64,
    /// Detection: warm-up length in steps (`SOLVER.WARMUP_ITERS`).
    pub warmup_iters: usize,
    /// Detection: steps after which the learning rate is multiplied by `decay_gamma`
    /// (`SOLVER.STEPS`).
    pub decay_steps: Vec<usize>,
    /// Detection: step-decay factor (`SOLVER.GAMMA`).
    pub decay_gamma: f64,
    /// Detection: resize every frame to `max_size × max_size`, as the published
    /// `Resize.get_size` does; `false` keeps the aspect ratio (short side `min_size`, long side
    /// at most `max_size`, the published `get_size_`).
    pub square_resize: bool,
    /// Detection: short side in pixels when `square_resize` is off (`INPUT.MIN_SIZE_TRAIN`).
    pub min_size: usize,
    /// Detection: longest side in pixels after resizing (`INPUT.MAX_SIZE_TRAIN`).
    pub max_size: usize,
    /// Detection: resized sides are rounded down to a multiple of this (32 keeps every pyramid
    /// level integral).
    pub size_divisor: usize,
    /// Detection: reference frames are drawn 1..=`ref_max_offset` frames before and after the
    /// current one (`MODEL.VID.STFT.MAX_OFFSET`).
    pub ref_max_offset: usize,
    /// Detection: reference frames at test (half before, half after; the published
    /// `MODEL.VID.STFT.TEST_REF_NUM` 10).
    pub test_refs: usize,
    /// Detection: probability of a horizontal flip in training
    /// (`INPUT.HORIZONTAL_FLIP_PROB_TRAIN`).
    pub flip_prob: f64,
    /// Detection: score from which a detection counts in the image-level and box-level
    /// precision, recall and F1 (the paper's 0.5).
    pub score_threshold: f64,
}

/// Fields every task reads.
const COMMON_FIELDS: &[&str] = &[
    "epochs",
    "batch_per_rank",
    "lr",
    "weight_decay",
    "drop_path_rate",
    "init_from",
    "seed",
    "precision",
    "val_every",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
];

/// Fields only classification reads.
const CLASSIFY_FIELDS: &[&str] = &[
    "crop",
    "mean",
    "std",
    "momentum",
    "min_lr",
    "frames",
    "window",
    "train_short_min",
    "train_short_max",
    "test_short",
];

/// Fields only segmentation reads.
const SEGMENT_FIELDS: &[&str] = &[
    "crop",
    "mean",
    "std",
    "train_resize",
    "rotation_degrees",
    "poly_power",
    "max_frames",
];

/// Fields only detection reads.
const DETECT_FIELDS: &[&str] = &[
    "momentum",
    "bias_lr_factor",
    "weight_decay_bias",
    "warmup_factor",
    "warmup_iters",
    "decay_steps",
    "decay_gamma",
    "square_resize",
    "min_size",
    "max_size",
    "size_divisor",
    "ref_max_offset",
    "test_refs",
    "flip_prob",
    "score_threshold",
];

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            epochs: 20,
            batch_per_rank: 4,
            lr: 1e-3,
            momentum: 0.9,
            weight_decay: 0.0,
            min_lr: 0.0,
            drop_path_rate: 0.1,
            frames: 8,
            window: 256,
            crop: 224,
            train_short_min: 256,
            train_short_max: 320,
            test_short: 256,
            mean: 0.45,
            std: 0.225,
            init_from: InitFrom::Teacher,
            seed: 0,
            precision: TrainPrecision::Auto,
            val_every: 1,
            checkpoint_every: 0,
            keep_checkpoints: 2,
            log_every: 1,
            train_resize: 256,
            rotation_degrees: 5.0,
            poly_power: 0.9,
            max_frames: 0,
            bias_lr_factor: 2.0,
            weight_decay_bias: 0.0,
            warmup_factor: 1.0 / 3.0,
            warmup_iters: 8000,
            decay_steps: vec![64000, 80000, 88000],
            decay_gamma: 0.5,
            square_resize: true,
            min_size: 600,
            max_size: 640,
            size_divisor: 32,
            ref_max_offset: 9,
            test_refs: 10,
            flip_prob: 0.5,
            score_threshold: 0.5,
        }
    }
}

impl FinetuneConfig {
    /// Checks every field and the relations between them; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("epochs", self.epochs),
            ("batch_per_rank", self.batch_per_rank),
            ("frames", self.frames),
            ("window", self.window),
            ("crop", self.crop),
            ("val_every", self.val_every),
            ("keep_checkpoints", self.keep_checkpoints),
            ("log_every", self.log_every),
        ] {
            check(v >= 1, field, || "must be at least 1".into())?;
        }
        check(self.window >= self.frames, "window", || {
            format!(
                "{} frames cannot be spread over a window of {}",
                self.frames, self.window
            )
        })?;
        check(self.lr.is_finite() && self.lr > 0.0, "lr", || {
            format!("{} must be a positive number", self.lr)
        })?;
        for (field, v) in [("weight_decay", self.weight_decay), ("min_lr", self.min_lr)] {
            check(v.is_finite() && v >= 0.0, field, || {
                format!("{v} must be zero or positive")
            })?;
        }
        check((0.0..1.0).contains(&self.momentum), "momentum", || {
            format!("{} is outside [0, 1)", self.momentum)
        })?;
        check(
            (0.0..1.0).contains(&self.drop_path_rate),
            "drop_path_rate",
            || format!("{} is outside [0, 1)", self.drop_path_rate),
        )?;
        check(self.std.is_finite() && self.std > 0.0, "std", || {
            format!("{} must be a positive number", self.std)
        })?;
        check(self.mean.is_finite(), "mean", || "must be a number".into())?;
        check(self.train_short_min >= self.crop, "train_short_min", || {
            format!(
                "{} is smaller than the crop {}",
                self.train_short_min, self.crop
            )
        })?;
        check(
            self.train_short_max >= self.train_short_min,
            "train_short_max",
            || {
                format!(
                    "{} is smaller than train_short_min {}",
                    self.train_short_max, self.train_short_min
                )
            },
        )?;
        check(self.test_short >= self.crop, "test_short", || {
            format!("{} is smaller than the crop {}", self.test_short, self.crop)
        })?;
        Ok(())
    }

    /// The defaults of `task`: classification's are the published PolypDiag script's
    /// ([`Default`]); segmentation's the published TransUNet `train.py`/`trainer.py` (150
    /// epochs, one sequence per step, AdamW lr 1e-4 (absolute, not scaled by the batch) with
    /// weight decay 0.05 and polynomial decay 0.9, resize 256 → random crop 224, flip,
    /// rotation ±5°, per-image min–max scaling then mean/std 0.5, drop-path 0.1); detection's
    /// the published STFT-FCOS KUMC config (`kumc_R_50_STFT.yaml`: one frame with its reference
    /// frames per step, SGD lr 0.0025 (absolute) with momentum 0.9, weight decay 1e-4, biases
    /// at twice the rate without decay, warm-up then step decay, 640² frames, drop-path 0.1).
    pub fn for_task(task: TaskKind) -> Self {
        let base = Self::default();
        match task {
            TaskKind::Segment => Self {
                epochs: 150,
                batch_per_rank: 1,
                lr: 1e-4,
                weight_decay: 0.05,
                mean: 0.5,
                std: 0.5,
                ..base
            },
            TaskKind::Detect => Self {
                batch_per_rank: 1,
                lr: 0.0025,
                weight_decay: 1e-4,
                ..base
            },
            TaskKind::Classify => base,
        }
    }

    /// The fields `task` reads (a setting of another task's field is refused by
    /// [`FinetuneConfig::resolve`]).
    pub fn fields_of(task: TaskKind) -> Vec<&'static str> {
        let own: &[&str] = match task {
            TaskKind::Classify => CLASSIFY_FIELDS,
            TaskKind::Segment => SEGMENT_FIELDS,
            TaskKind::Detect => DETECT_FIELDS,
        };
        COMMON_FIELDS.iter().chain(own).copied().collect()
    }

    /// The settings of a `task` run on a network of input size `img`: the task's defaults
    /// sized for `img` ([`FinetuneConfig::sized_for`]), with the fields of `overrides` (a JSON
    /// object) laid over them, validated for the task.
    ///
    /// # Errors
    /// `overrides` not an object, an unknown field, a field `task` does not read, or an invalid
    /// value; the error names the field.
    pub fn resolve(
        task: TaskKind,
        img: usize,
        overrides: Option<&serde_json::Value>,
    ) -> Result<Self> {
        // Segmentation's resize follows the crop the overrides give (published `crop + 32`);
        // classification's short sides follow the network's input size.
        let crop = overrides
            .and_then(|o| o.get("crop"))
            .and_then(serde_json::Value::as_u64)
            .map_or(img, |c| c as usize);
        let mut base = Self::for_task(task).sized_for(img);
        if task == TaskKind::Segment {
            base.train_resize = crop + 32;
        }
        if let Some(serde_json::Value::Object(over)) = overrides {
            let used = Self::fields_of(task);
            let all: Vec<&str> = COMMON_FIELDS
                .iter()
                .chain(CLASSIFY_FIELDS)
                .chain(SEGMENT_FIELDS)
                .chain(DETECT_FIELDS)
                .copied()
                .collect();
            for key in over.keys() {
                if !all.contains(&key.as_str()) {
                    return Err(Error::invalid(
                        key.clone(),
                        format!(
                            "unknown field; {task} fine-tuning reads {}",
                            used.join(", ")
                        ),
                    ));
                }
                if !used.contains(&key.as_str()) {
                    return Err(Error::invalid(
                        key.clone(),
                        format!("is not a setting of {task} fine-tuning"),
                    ));
                }
            }
        }
        let cfg: Self = crate::overlay::overlay(&base, overrides, "finetune")?;
        cfg.validate_for(task)?;
        Ok(cfg)
    }

    /// [`FinetuneConfig::validate`] plus the rules of `task`.
    pub fn validate_for(&self, task: TaskKind) -> Result<()> {
        self.validate()?;
        if task == TaskKind::Segment {
            check(self.batch_per_rank == 1, "batch_per_rank", || {
                format!(
                    "{}: segmentation feeds one sequence per rank per step (its frames are the batch)",
                    self.batch_per_rank
                )
            })?;
            check(
                self.crop >= 32 && self.crop.is_multiple_of(16),
                "crop",
                || {
                    format!(
                        "{}: the segmentation network takes square frames of at least 32 px, a multiple of 16",
                        self.crop
                    )
                },
            )?;
            check(self.train_resize >= self.crop, "train_resize", || {
                format!(
                    "{} is smaller than the crop {}",
                    self.train_resize, self.crop
                )
            })?;
            check(
                self.rotation_degrees.is_finite() && (0.0..=180.0).contains(&self.rotation_degrees),
                "rotation_degrees",
                || format!("{} is outside [0, 180]", self.rotation_degrees),
            )?;
            check(
                self.poly_power.is_finite() && self.poly_power > 0.0,
                "poly_power",
                || format!("{} must be a positive number", self.poly_power),
            )?;
        }
        if task == TaskKind::Detect {
            self.validate_detect()?;
        }
        Ok(())
    }

    /// The rules of detection's fields.
    fn validate_detect(&self) -> Result<()> {
        for (field, v) in [
            ("min_size", self.min_size),
            ("max_size", self.max_size),
            ("size_divisor", self.size_divisor),
            ("ref_max_offset", self.ref_max_offset),
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
        check(self.test_refs.is_multiple_of(2), "test_refs", || {
            format!(
                "{}: test references are drawn half before and half after the frame",
                self.test_refs
            )
        })?;
        check(
            self.bias_lr_factor.is_finite() && self.bias_lr_factor > 0.0,
            "bias_lr_factor",
            || format!("{} must be a positive number", self.bias_lr_factor),
        )?;
        check(
            self.weight_decay_bias.is_finite() && self.weight_decay_bias >= 0.0,
            "weight_decay_bias",
            || format!("{} must be zero or positive", self.weight_decay_bias),
        )?;
        check(
            self.warmup_factor > 0.0 && self.warmup_factor <= 1.0,
            "warmup_factor",
            || format!("{} is outside (0, 1]", self.warmup_factor),
        )?;
        check(
            self.decay_gamma > 0.0 && self.decay_gamma <= 1.0,
            "decay_gamma",
            || format!("{} is outside (0, 1]", self.decay_gamma),
        )?;
        check(
            self.decay_steps.windows(2).all(|w| w[0] < w[1]),
            "decay_steps",
            || format!("{:?} must be increasing", self.decay_steps),
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

    /// Detection's learning rate at 0-based `step` before the bias factor: linear warm-up from
    /// `warmup_factor` to 1 over `warmup_iters`, times `decay_gamma` per decay step passed (the
    /// published `WarmupMultiStepLR`, linear method).
    pub fn warmup_step_lr(&self, step: usize) -> f64 {
        let warm = if step < self.warmup_iters {
            let alpha = step as f64 / self.warmup_iters as f64;
            self.warmup_factor * (1.0 - alpha) + alpha
        } else {
            1.0
        };
        let passed = self.decay_steps.iter().filter(|s| **s <= step).count();
        self.lr * warm * self.decay_gamma.powi(passed as i32)
    }

    /// The learning rate the run starts at: `lr · batch_per_rank · world_size / 256`.
    pub fn scaled_lr(&self, world_size: usize) -> f64 {
        self.lr * (self.batch_per_rank * world_size) as f64 / 256.0
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

    /// Sizes scaled for a network of input size `img`: crop = `img`, the short sides kept in
    /// the published proportions (256/224, 320/224), the segmentation resize `img + 32`.
    pub fn sized_for(mut self, img: usize) -> Self {
        self.crop = img;
        self.train_resize = img + 32;
        self.train_short_min = img * 256 / 224;
        self.train_short_max = img * 320 / 224;
        self.test_short = img * 256 / 224;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_published_script_and_valid() {
        let c = FinetuneConfig::default();
        c.validate().unwrap();
        assert_eq!(
            (c.epochs, c.batch_per_rank, c.frames, c.window),
            (20, 4, 8, 256)
        );
        assert_eq!(c.scaled_lr(1), 1.5625e-5);
        let s = c.sized_for(112);
        s.validate().unwrap();
        assert_eq!(
            (s.crop, s.train_short_min, s.train_short_max, s.test_short),
            (112, 128, 160, 128)
        );
    }

    #[test]
    fn segmentation_defaults_and_task_fields() {
        let s = FinetuneConfig::resolve(TaskKind::Segment, 224, None).unwrap();
        assert_eq!((s.epochs, s.batch_per_rank, s.lr), (150, 1, 1e-4));
        assert_eq!((s.weight_decay, s.mean, s.std), (0.05, 0.5, 0.5));
        assert_eq!((s.crop, s.train_resize, s.poly_power), (224, 256, 0.9));
        let small = FinetuneConfig::resolve(TaskKind::Segment, 64, None).unwrap();
        assert_eq!((small.crop, small.train_resize), (64, 96));
        // A crop given over a bigger network's defaults carries its own resize.
        let given = serde_json::json!({"crop": 64});
        let cropped = FinetuneConfig::resolve(TaskKind::Segment, 112, Some(&given)).unwrap();
        assert_eq!((cropped.crop, cropped.train_resize), (64, 96));
        let err = FinetuneConfig::resolve(
            TaskKind::Segment,
            64,
            Some(&serde_json::json!({"std": [0.5, 0.5]})),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`std`"), "{err}");
        for (doc, field) in [
            (serde_json::json!({"momentum": 0.5}), "`momentum`"),
            (serde_json::json!({"batch_per_rank": 2}), "`batch_per_rank`"),
            (serde_json::json!({"train_resize": 10}), "`train_resize`"),
            (
                serde_json::json!({"rotation_degrees": -1.0}),
                "`rotation_degrees`",
            ),
        ] {
            let err = FinetuneConfig::resolve(TaskKind::Segment, 64, Some(&doc))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{doc}: {err}");
        }
        let refused = |task, doc: serde_json::Value| {
            FinetuneConfig::resolve(task, 64, Some(&doc))
                .unwrap_err()
                .to_string()
        };
        let err = refused(TaskKind::Classify, serde_json::json!({"poly_power": 1.0}));
        assert!(err.contains("`poly_power`"), "{err}");
        // A misspelt field lists what this task reads, not every task's fields.
        let err = refused(TaskKind::Detect, serde_json::json!({"epochz": 3}));
        assert!(
            err.contains("`epochz`") && err.contains("warmup_iters") && !err.contains("crop"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_name_the_field() {
        for (doc, field) in [
            (r#"{"lr": 0}"#, "`lr`"),
            (r#"{"frames": 9, "window": 4}"#, "`window`"),
            (r#"{"momentum": 1.0}"#, "`momentum`"),
            (r#"{"crop": 300}"#, "`train_short_min`"),
            (r#"{"train_short_max": 100}"#, "`train_short_max`"),
            (r#"{"epochz": 1}"#, "epochz"),
        ] {
            let err = FinetuneConfig::from_json_str(doc, "t")
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{doc}: {err}");
        }
        assert_eq!(TaskKind::parse("segment").unwrap(), TaskKind::Segment);
        assert!(
            TaskKind::parse("detection")
                .unwrap_err()
                .to_string()
                .contains("`task`")
        );
    }
}
