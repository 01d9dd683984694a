//! Checks against the test vectors of the published PyTorch code (a directory laid out like
//! `shared/reference/endofm-tiny`: `config.json`, `weights.safetensors`, `forward.safetensors`,
//! `train_step.safetensors`). Errors are measured relative to the reference's largest magnitude:
//! `max |ours − ref| / max |ref|`, per tensor.

pub mod detect;
pub mod downstream;
pub mod segment;
pub mod trajectory;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use endofm_shared::ModelConfig;

use crate::infer::{self, Precision};
use crate::model::{EndoFm, LoadMode, weights};
use crate::train::{loss, ssl};
use crate::{Error, Result};

/// Tolerances of the parity checks.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tolerances {
    /// Forward outputs (features, head), relative.
    pub forward_rel: f64,
    /// Student / teacher outputs of the training step, relative.
    pub outputs_rel: f64,
    /// The loss, absolute.
    pub loss_abs: f64,
    /// Every parameter's gradient, relative.
    pub grad_rel: f64,
}

impl Tolerances {
    /// fp32: the project's standard (forward 1e-4, loss 1e-5, gradients 1e-3).
    pub const FP32: Tolerances = Tolerances {
        forward_rel: 1e-4,
        outputs_rel: 1e-4,
        loss_abs: 1e-5,
        grad_rel: 1e-3,
    };
    /// Reduced-precision (bf16/fp16) autocast forward.
    pub const BF16: Tolerances = Tolerances {
        forward_rel: 2e-2,
        outputs_rel: 2e-2,
        loss_abs: 2e-2,
        grad_rel: 5e-2,
    };

    /// The tolerances for a precision.
    pub fn for_precision(p: Precision) -> Self {
        match p {
            Precision::Fp32 => Self::FP32,
            Precision::Bf16 | Precision::Fp16 => Self::BF16,
        }
    }
}

/// `max |ours − reference| / max |reference|` (absolute error when the reference is all zero).
pub fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    let ours = ours.to_device(Device::Cpu).to_kind(Kind::Double);
    let reference = reference.to_device(Device::Cpu).to_kind(Kind::Double);
    if ours.size() != reference.size() {
        return f64::INFINITY;
    }
    let diff = (&ours - &reference).abs().max().double_value(&[]);
    let scale = reference.abs().max().double_value(&[]);
    if diff.is_nan() {
        return f64::INFINITY;
    }
    if scale > 0.0 { diff / scale } else { diff }
}

/// Files of a reference directory.
#[derive(Debug, Clone)]
pub struct ReferenceDir {
    /// The directory.
    pub dir: PathBuf,
}

impl ReferenceDir {
    /// Opens `dir`, checking the files are there.
    pub fn open(dir: &Path) -> Result<Self> {
        for f in ["config.json", "weights.safetensors"] {
            let p = dir.join(f);
            if !p.is_file() {
                return Err(Error::Io {
                    action: "opening reference vectors",
                    path: p,
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                });
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Path of a file in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The model configuration (`config.json`).
    pub fn model_config(&self) -> Result<ModelConfig> {
        let path = self.file("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            action: "reading",
            path: path.clone(),
            source,
        })?;
        Ok(ModelConfig::from_json_str(
            &text,
            &path.display().to_string(),
        )?)
    }

    /// A number from `config.json` outside the model configuration (temperatures), or `default`.
    pub fn extra(&self, key: &str, default: f64) -> f64 {
        std::fs::read_to_string(self.file("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get(key).and_then(serde_json::Value::as_f64))
            .unwrap_or(default)
    }

    /// The network with the reference weights, strictly loaded.
    pub fn model(&self, device: Device) -> Result<EndoFm> {
        let mut model = EndoFm::new(&self.model_config()?, device)?;
        model.load(&self.file("weights.safetensors"), LoadMode::Strict)?;
        Ok(model)
    }
}

/// One forward case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    /// Case name (`NAME` of `NAME.input`).
    pub name: String,
    /// Input shape.
    pub shape: Vec<i64>,
    /// Relative error of the CLS features.
    pub features_rel_err: f64,
    /// Relative error of the head outputs.
    pub head_rel_err: f64,
    /// Whether both are within tolerance.
    pub pass: bool,
}

/// Runs every case of `forward.safetensors` and compares with the stored outputs.
pub fn check_forward(
    model: &EndoFm,
    forward_file: &Path,
    precision: Precision,
    tol: &Tolerances,
) -> Result<Vec<CaseReport>> {
    let file = weights::read(forward_file)?;
    let outputs = infer::forward_named(model, &file, precision)?;
    let mut reports = Vec::new();
    for (key, input) in &file {
        let Some(name) = key.strip_suffix(infer::INPUT_SUFFIX) else {
            continue;
        };
        let get = |suffix: &str| -> Result<(&Tensor, &Tensor)> {
            let k = format!("{name}.{suffix}");
            match (outputs.get(&k), file.get(&k)) {
                (Some(o), Some(r)) => Ok((o, r)),
                _ => Err(Error::Input {
                    name: k,
                    reason: format!("missing from {}", forward_file.display()),
                }),
            }
        };
        let (f_ours, f_ref) = get("features")?;
        let (h_ours, h_ref) = get("head")?;
        let features_rel_err = rel_err(f_ours, f_ref);
        let head_rel_err = rel_err(h_ours, h_ref);
        reports.push(CaseReport {
            name: name.to_string(),
            shape: input.size(),
            features_rel_err,
            head_rel_err,
            pass: features_rel_err <= tol.forward_rel && head_rel_err <= tol.forward_rel,
        });
    }
    Ok(reports)
}

/// The training-step comparison.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Number of views in the step.
    pub views: usize,
    /// Relative error of the student outputs.
    pub student_out_rel_err: f64,
    /// Relative error of the teacher outputs.
    pub teacher_out_rel_err: f64,
    /// Our loss.
    pub loss: f64,
    /// The reference loss.
    pub reference_loss: f64,
    /// |loss − reference|.
    pub loss_abs_err: f64,
    /// Parameters whose gradient was compared.
    pub grads_checked: usize,
    /// The parameter with the largest relative gradient error.
    pub worst_grad: String,
    /// Its relative error.
    pub worst_grad_rel_err: f64,
    /// Parameters with a reference gradient but none here, or the other way round.
    pub grad_mismatches: Vec<String>,
    /// Whether everything is within tolerance.
    pub pass: bool,
}

/// One self-supervised step as the reference vectors define it (teacher = copy of the student,
/// centre zero, drop-path 0, gradients before clipping), compared with `train_step.safetensors`.
pub fn check_train_step(
    reference: &ReferenceDir,
    device: Device,
    precision: Precision,
    tol: &Tolerances,
) -> Result<StepReport> {
    let step_file = reference.file("train_step.safetensors");
    let file = weights::read(&step_file)?;
    let mut views = Vec::new();
    while let Some(v) = file.get(&format!("view{}", views.len())) {
        views.push(v.to_device(device));
    }
    if views.len() < 3 {
        return Err(Error::Input {
            name: "view0..".into(),
            reason: format!("{} holds {} views", step_file.display(), views.len()),
        });
    }
    let student = reference.model(device)?;
    let teacher = student.try_clone()?;
    let global_views = 2;
    let student_temp = reference.extra("student_temp", 0.1);
    let teacher_temp = reference.extra("teacher_temp", 0.04);
    let out_dim = student.config().head.out_dim as i64;
    let objective = loss::SslLoss::new(
        out_dim,
        loss::SslLossConfig {
            student_temp,
            global_views,
            ..Default::default()
        },
        device,
    );
    let (outs, loss) = infer::with_precision(precision, device, || {
        let outs = ssl::forward(&student, &teacher, &views, global_views);
        let loss = objective.loss(&outs.student, &outs.teacher, teacher_temp);
        (outs, loss)
    })?;
    loss.backward();

    let need = |k: &str| {
        file.get(k).ok_or_else(|| Error::Input {
            name: k.to_string(),
            reason: format!("missing from {}", step_file.display()),
        })
    };
    let student_out_rel_err = rel_err(&outs.student, need("student_out")?);
    let teacher_out_rel_err = rel_err(&outs.teacher, need("teacher_out")?);
    let loss_value = loss.to_kind(Kind::Double).double_value(&[]);
    let reference_loss = need("loss")?.reshape([-1]).double_value(&[0]);
    let loss_abs_err = (loss_value - reference_loss).abs();

    let ref_grads: BTreeMap<&str, &Tensor> = file
        .iter()
        .filter_map(|(k, t)| k.strip_prefix("grad.").map(|n| (n, t)))
        .collect();
    let mut worst = (String::new(), 0.0f64);
    let mut grad_mismatches = Vec::new();
    let mut grads_checked = 0;
    let vars: BTreeMap<String, Tensor> = student.var_store().variables().into_iter().collect();
    for (name, var) in &vars {
        let ours = var.grad();
        match (ours.defined(), ref_grads.get(name.as_str())) {
            (true, Some(r)) => {
                let e = rel_err(&ours, r);
                grads_checked += 1;
                if e > worst.1 || worst.0.is_empty() {
                    worst = (name.clone(), e);
                }
            }
            (false, None) => {}
            (true, None) => {
                grad_mismatches.push(format!("{name}: gradient here, none in reference"))
            }
            (false, Some(_)) => grad_mismatches.push(format!("{name}: no gradient here")),
        }
    }
    for name in ref_grads.keys() {
        if !vars.contains_key(*name) {
            grad_mismatches.push(format!("{name}: not a parameter of this network"));
        }
    }
    let pass = student_out_rel_err <= tol.outputs_rel
        && teacher_out_rel_err <= tol.outputs_rel
        && loss_abs_err <= tol.loss_abs
        && worst.1 <= tol.grad_rel
        && grad_mismatches.is_empty()
        && grads_checked > 0;
    Ok(StepReport {
        views: views.len(),
        student_out_rel_err,
        teacher_out_rel_err,
        loss: loss_value,
        reference_loss,
        loss_abs_err,
        grads_checked,
        worst_grad: worst.0,
        worst_grad_rel_err: worst.1,
        grad_mismatches,
        pass,
    })
}
