//! Hyper-parameters of self-supervised pre-training, defaults equal to the reference's
//! (`train_ssl.py` and the authors' script), typed and validated so that a job spec can be
//! refused at submission with the field named.

use serde::{Deserialize, Serialize};

use crate::error::check;
use crate::{Error, Result};

/// Numeric precision of training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainPrecision {
    /// bf16 autocast on CUDA, fp32 on the CPU.
    Auto,
    /// float32 everywhere.
    Fp32,
    /// bf16 autocast.
    Bf16,
    /// fp16 autocast with a dynamic loss scaler (CUDA).
    Fp16,
}

/// Pre-training hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    /// Epochs over the corpus.
    pub epochs: usize,
    /// Clips per rank per step.
    pub batch_per_rank: usize,
    /// Base learning rate at global batch 256 (scaled linearly with the global batch).
    pub lr: f64,
    /// Final learning rate of the cosine.
    pub min_lr: f64,
    /// Linear warm-up epochs of the learning rate.
    pub warmup_epochs: usize,
    /// Initial weight decay.
    pub weight_decay: f64,
    /// Final weight decay.
    pub weight_decay_end: f64,
    /// Initial teacher EMA momentum (cosine to 1).
    pub momentum_teacher: f64,
    /// Per-tensor gradient norm limit (0 disables clipping).
    pub clip_grad: f64,
    /// Epochs during which the head's last layer is not updated.
    pub freeze_last_layer: usize,
    /// Teacher temperature after warm-up.
    pub teacher_temp: f64,
    /// Teacher temperature at the start of its warm-up.
    pub warmup_teacher_temp: f64,
    /// Epochs of teacher-temperature warm-up.
    pub warmup_teacher_temp_epochs: usize,
    /// Student temperature.
    pub student_temp: f64,
    /// Centre EMA momentum.
    pub center_momentum: f64,
    /// Overrides the model's stochastic-depth rate when set.
    pub drop_path_rate: Option<f64>,
    /// Seed of initialisation, data order, augmentation and drop-path.
    pub seed: u64,
    /// Numeric precision.
    pub precision: TrainPrecision,
    /// Write a checkpoint every this many steps (and at the end); 0 = only at the end.
    pub checkpoint_every: usize,
    /// Checkpoints kept (older ones are deleted after a newer one is committed).
    pub keep_checkpoints: usize,
    /// Write a metrics line every this many steps.
    pub log_every: usize,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            epochs: 100,
            batch_per_rank: 3,
            lr: 5e-4,
            min_lr: 1e-6,
            warmup_epochs: 10,
            weight_decay: 0.04,
            weight_decay_end: 0.4,
            momentum_teacher: 0.996,
            clip_grad: 3.0,
            freeze_last_layer: 1,
            teacher_temp: 0.04,
            warmup_teacher_temp: 0.04,
            warmup_teacher_temp_epochs: 0,
            student_temp: 0.1,
            center_momentum: 0.9,
            drop_path_rate: None,
            seed: 0,
            precision: TrainPrecision::Auto,
            checkpoint_every: 500,
            keep_checkpoints: 3,
            log_every: 1,
        }
    }
}

impl PretrainConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        check(self.epochs >= 1, "epochs", || "must be at least 1".into())?;
        check(self.batch_per_rank >= 1, "batch_per_rank", || {
            "must be at least 1".into()
        })?;
        let positive = [
            ("lr", self.lr),
            ("teacher_temp", self.teacher_temp),
            ("warmup_teacher_temp", self.warmup_teacher_temp),
            ("student_temp", self.student_temp),
        ];
        for (field, v) in positive {
            check(v.is_finite() && v > 0.0, field, || {
                format!("{v} must be a positive number")
            })?;
        }
        let non_negative = [
            ("min_lr", self.min_lr),
            ("weight_decay", self.weight_decay),
            ("weight_decay_end", self.weight_decay_end),
            ("clip_grad", self.clip_grad),
        ];
        for (field, v) in non_negative {
            check(v.is_finite() && v >= 0.0, field, || {
                format!("{v} must be zero or positive")
            })?;
        }
        let unit = [
            ("momentum_teacher", self.momentum_teacher),
            ("center_momentum", self.center_momentum),
        ];
        for (field, v) in unit {
            check((0.0..=1.0).contains(&v), field, || {
                format!("{v} is outside [0, 1]")
            })?;
        }
        if let Some(rate) = self.drop_path_rate {
            check((0.0..1.0).contains(&rate), "drop_path_rate", || {
                format!("{rate} is outside [0, 1)")
            })?;
        }
        check(self.keep_checkpoints >= 1, "keep_checkpoints", || {
            "must be at least 1".into()
        })?;
        check(self.log_every >= 1, "log_every", || {
            "must be at least 1".into()
        })?;
        Ok(())
    }

    /// The learning rate at the end of warm-up for a global batch: `lr · global / 256`.
    pub fn scaled_lr(&self, world_size: usize) -> f64 {
        self.lr * (self.batch_per_rank * world_size) as f64 / 256.0
    }

    /// Reads a JSON document over the defaults;
    /// unknown fields are refused. The result is validated.
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
    fn defaults_are_the_reference_and_valid() {
        let c = PretrainConfig::default();
        c.validate().unwrap();
        assert_eq!(c.lr, 5e-4);
        assert!((c.scaled_lr(4) - 5e-4 * 12.0 / 256.0).abs() < 1e-15);
    }

    #[test]
    fn bad_values_and_unknown_fields_name_the_field() {
        let err = PretrainConfig::from_json_str(r#"{"lr": -1}"#, "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`lr`"), "{err}");
        let err = PretrainConfig::from_json_str(r#"{"epochz": 3}"#, "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("epochz"), "{err}");
        let err = PretrainConfig::from_json_str(r#"{"momentum_teacher": 1.5}"#, "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("momentum_teacher"), "{err}");
        let ok =
            PretrainConfig::from_json_str(r#"{"epochs": 3, "precision": "bf16"}"#, "t").unwrap();
        assert_eq!((ok.epochs, ok.precision), (3, TrainPrecision::Bf16));
    }
}
