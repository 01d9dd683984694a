//! Reference directories of the downstream networks (`shared/reference/endofm-tiny-classify`
//! and kin): `config.json` names a `task` and describes every size, `weights.safetensors` holds
//! the network under the published keys, `vectors.safetensors` its inputs (float16), outputs,
//! loss and every gradient (`grad.<key>`). Everything is built from `config.json`; nothing is
//! fitted to one directory.
//!
//! Tolerances (fp32): outputs within 1e-4 of each tensor's largest reference magnitude, losses
//! 1e-5 relative, gradients `max |ours − ref| ≤ 1e-3 · max |ref| + 1e-6`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use endofm_shared::{ModelConfig, Preset, TaskKind};

use crate::infer::{Precision, with_precision};
use crate::model::{Classifier, LoadMode, weights};
use crate::verify::{ReferenceDir, rel_err};
use crate::{Error, Result};

/// Outputs: error relative to the tensor's largest reference magnitude.
pub const OUTPUT_REL: f64 = 1e-4;
/// Losses: relative error.
pub const LOSS_REL: f64 = 1e-5;
/// Gradients: relative part of the bound.
pub const GRAD_REL: f64 = 1e-3;
/// Gradients: absolute part of the bound.
pub const GRAD_ABS: f64 = 1e-6;

/// An error naming a field of `config.json`.
pub(crate) fn bad(dir: &ReferenceDir, field: &str, reason: impl Into<String>) -> Error {
    Error::Input {
        name: format!("{}: {field}", dir.file("config.json").display()),
        reason: reason.into(),
    }
}

/// The parsed `config.json` of a reference directory.
pub fn config_json(dir: &ReferenceDir) -> Result<Value> {
    let path = dir.file("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        action: "reading",
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Input {
        name: path.display().to_string(),
        reason: format!("not valid JSON: {e}"),
    })
}

/// The downstream task a reference directory describes (`task` in `config.json`), or `None`
/// for the pre-training vectors.
pub fn task_of(dir: &ReferenceDir) -> Result<Option<TaskKind>> {
    match config_json(dir)?.get("task") {
        None => Ok(None),
        Some(Value::String(name)) => Ok(Some(TaskKind::parse(name)?)),
        Some(other) => Err(bad(dir, "task", format!("{other} is not a task name"))),
    }
}

/// The backbone configuration of a downstream reference (its `backbone` section): the
/// TimeSformer sizes, with a placeholder projection head (the downstream networks have none).
pub fn backbone_config(dir: &ReferenceDir, section: &Value) -> Result<ModelConfig> {
    let num = |key: &str| -> Result<f64> {
        section
            .get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| bad(dir, &format!("backbone.{key}"), "missing or not a number"))
    };
    let count = |key: &str| -> Result<usize> {
        let v = num(key)?;
        if v < 0.0 || v.fract() != 0.0 {
            return Err(bad(
                dir,
                &format!("backbone.{key}"),
                format!("{v} is not a count"),
            ));
        }
        Ok(v as usize)
    };
    if let Some(kind) = section.get("attention_type").and_then(Value::as_str)
        && kind != "divided_space_time"
    {
        return Err(bad(
            dir,
            "backbone.attention_type",
            format!("`{kind}`: only divided_space_time attention is implemented"),
        ));
    }
    let mut cfg = ModelConfig {
        embed_dim: count("embed_dim")?,
        depth: count("depth")?,
        num_heads: count("num_heads")?,
        patch_size: section
            .get("patch_size")
            .map_or(Ok(16), |_| count("patch_size"))?,
        mlp_ratio: section
            .get("mlp_ratio")
            .map_or(Ok(4.0), |_| num("mlp_ratio"))?,
        qkv_bias: section
            .get("qkv_bias")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        layer_norm_eps: section
            .get("layer_norm_eps")
            .map_or(Ok(1e-6), |_| num("layer_norm_eps"))?,
        img_size: count("img_size")?,
        num_frames: count("num_frames")?,
        in_chans: section
            .get("in_chans")
            .map_or(Ok(3), |_| count("in_chans"))?,
        drop_path_rate: section
            .get("drop_path_rate")
            .map_or(Ok(0.0), |_| num("drop_path_rate"))?,
        head: Preset::Tiny.config().head,
    };
    if let Some(grid) = section.get("pos_embed_grid") {
        let grid = grid.as_u64().unwrap_or(0) as usize;
        if grid == 0 {
            return Err(bad(
                dir,
                "backbone.pos_embed_grid",
                "not a positive integer",
            ));
        }
        // The position table is sized from img_size / patch_size; a table of another grid is
        // the same network at another nominal image size.
        if grid != cfg.grid() {
            cfg.img_size = grid * cfg.patch_size;
        }
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The classifier a `task = "classify"` directory describes: backbone configuration and the
/// number of labels.
pub fn classify_config(dir: &ReferenceDir) -> Result<(ModelConfig, usize)> {
    let json = config_json(dir)?;
    let backbone = json
        .get("backbone")
        .ok_or_else(|| bad(dir, "backbone", "missing"))?;
    let cfg = backbone_config(dir, backbone)?;
    let classifier = json
        .get("classifier")
        .ok_or_else(|| bad(dir, "classifier", "missing"))?;
    let labels = classifier
        .get("num_labels")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad(dir, "classifier.num_labels", "missing or not a count"))?
        as usize;
    if let Some(in_dim) = classifier.get("in_dim").and_then(Value::as_u64)
        && in_dim as usize != cfg.embed_dim
    {
        return Err(bad(
            dir,
            "classifier.in_dim",
            format!(
                "{in_dim}: the published fine-tuning feeds the CLS feature ({} wide) to the classifier",
                cfg.embed_dim
            ),
        ));
    }
    if classifier
        .get("avgpool_patchtokens")
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        return Err(bad(
            dir,
            "classifier.avgpool_patchtokens",
            "pooled patch tokens are not part of the published fine-tuning classifier",
        ));
    }
    Ok((cfg, labels))
}

/// The reference classifier with its weights, strictly loaded.
pub fn classifier(dir: &ReferenceDir, device: Device) -> Result<Classifier> {
    let (cfg, labels) = classify_config(dir)?;
    let mut model = Classifier::new(&cfg, labels, device)?;
    model.load(&dir.file("weights.safetensors"), LoadMode::Strict)?;
    Ok(model)
}

/// Reads `vectors.safetensors`, casting float16 inputs to float32.
pub fn vectors(dir: &ReferenceDir) -> Result<BTreeMap<String, Tensor>> {
    let path = dir.file("vectors.safetensors");
    let mut map = weights::read(&path)?;
    for t in map.values_mut() {
        if matches!(t.kind(), Kind::Half | Kind::BFloat16) {
            *t = t.to_kind(Kind::Float);
        }
    }
    Ok(map)
}

/// Names `NAME` of every `NAME.input` of eval-mode cases (`fwd*`), in order.
fn forward_cases(vectors: &BTreeMap<String, Tensor>) -> Vec<String> {
    vectors
        .keys()
        .filter_map(|k| k.strip_suffix(".input"))
        .filter(|n| n.starts_with("fwd"))
        .map(str::to_string)
        .collect()
}

/// Runs the eval-mode cases of a classify directory: `fwd*.features` (B, D) and `fwd*.logits`
/// (B, labels), float32 on the CPU.
pub fn classify_forward(
    dir: &ReferenceDir,
    device: Device,
    precision: Precision,
) -> Result<BTreeMap<String, Tensor>> {
    let model = classifier(dir, device)?;
    let vectors = vectors(dir)?;
    let cases = forward_cases(&vectors);
    if cases.is_empty() {
        return Err(Error::Input {
            name: dir.file("vectors.safetensors").display().to_string(),
            reason: "holds no fwd*.input case".into(),
        });
    }
    let mut out = BTreeMap::new();
    for name in cases {
        let key = format!("{name}.input");
        let x = &vectors[&key];
        model.backbone().check_input(&key, x)?;
        let x = x.to_device(device);
        let (features, logits) = with_precision(precision, device, || {
            tch::no_grad(|| model.forward_t(&x, false))
        })?;
        out.insert(
            format!("{name}.features"),
            features.to_kind(Kind::Float).to_device(Device::Cpu),
        );
        out.insert(
            format!("{name}.logits"),
            logits.to_kind(Kind::Float).to_device(Device::Cpu),
        );
    }
    Ok(out)
}

/// One comparison of a downstream check, printed as one JSON line by `model verify`.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was compared (`fwd0.logits`, `train.loss`, `train.grads`, ...).
    pub check: String,
    /// The worst error (relative, or for gradients the worst ratio of error to bound).
    pub worst_err: f64,
    /// The tolerance it is held to.
    pub tolerance: f64,
    /// For gradient checks: the tensor with the worst error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worst_key: Option<String>,
    /// Within tolerance.
    pub pass: bool,
}

/// The vector `key`, or an error naming it and the file.
pub(crate) fn need<'a>(
    dir: &ReferenceDir,
    v: &'a BTreeMap<String, Tensor>,
    key: &str,
) -> Result<&'a Tensor> {
    v.get(key).ok_or_else(|| Error::Input {
        name: key.to_string(),
        reason: format!("missing from {}", dir.file("vectors.safetensors").display()),
    })
}

/// Compares gradients with `grad.<key>` reference tensors: for each, the ratio
/// `max |ours − ref| / (GRAD_REL · max |ref| + GRAD_ABS)`; passes when the worst ratio is ≤ 1
/// and every reference gradient has a parameter here with a gradient (and the reverse).
pub fn compare_grads(
    dir: &ReferenceDir,
    vars: &BTreeMap<String, Tensor>,
    vectors: &BTreeMap<String, Tensor>,
) -> Result<Check> {
    let mut worst = (String::new(), 0.0f64);
    let mut checked = 0;
    for (key, reference) in vectors {
        let Some(name) = key.strip_prefix("grad.") else {
            continue;
        };
        let var = vars.get(name).ok_or_else(|| Error::Input {
            name: format!("{}: {key}", dir.file("vectors.safetensors").display()),
            reason: "a reference gradient for a parameter this network does not have".into(),
        })?;
        let ours = var.grad();
        if !ours.defined() {
            return Err(Error::Input {
                name: key.clone(),
                reason: "the reference has a gradient, this network computed none".into(),
            });
        }
        let ours = ours.to_device(Device::Cpu).to_kind(Kind::Double);
        let r = reference.to_kind(Kind::Double);
        let ratio = if ours.size() != r.size() {
            f64::INFINITY
        } else {
            let diff = (&ours - &r).abs().max().double_value(&[]);
            let bound = GRAD_REL * r.abs().max().double_value(&[]) + GRAD_ABS;
            if diff.is_nan() {
                f64::INFINITY
            } else {
                diff / bound
            }
        };
        checked += 1;
        if ratio > worst.1 || worst.0.is_empty() {
            worst = (name.to_string(), ratio);
        }
    }
    let missing: Vec<&String> = vars
        .iter()
        .filter(|(k, v)| v.grad().defined() && !vectors.contains_key(&format!("grad.{k}")))
        .map(|(k, _)| k)
        .collect();
    if let Some(k) = missing.first() {
        return Err(Error::Input {
            name: format!("grad.{k}"),
            reason: format!(
                "this network computed a gradient the reference does not hold ({} such)",
                missing.len()
            ),
        });
    }
    Ok(Check {
        check: format!("train.grads ({checked} tensors; error / bound)"),
        worst_err: worst.1,
        tolerance: 1.0,
        worst_key: Some(worst.0),
        pass: checked > 0 && worst.1 <= 1.0,
    })
}

/// An output comparison (error relative to the reference's largest magnitude).
pub(crate) fn output_check(name: &str, ours: &Tensor, reference: &Tensor) -> Check {
    let e = rel_err(ours, reference);
    Check {
        check: name.to_string(),
        worst_err: e,
        tolerance: OUTPUT_REL,
        worst_key: None,
        pass: e <= OUTPUT_REL,
    }
}

/// Every check of a classify directory: each eval case's features and logits, the training
/// step's logits, loss and gradients (train mode, the directory's drop-path rate, which the
/// vectors set to 0).
pub fn check_classify(dir: &ReferenceDir, device: Device) -> Result<Vec<Check>> {
    let vectors = vectors(dir)?;
    let mut checks = Vec::new();
    let outputs = classify_forward(dir, device, Precision::Fp32)?;
    for (key, ours) in &outputs {
        checks.push(output_check(key, ours, need(dir, &vectors, key)?));
    }
    if vectors.contains_key("train.input") {
        let model = classifier(dir, device)?;
        let x = need(dir, &vectors, "train.input")?.to_device(device);
        let labels = need(dir, &vectors, "train.labels")?
            .to_kind(Kind::Int64)
            .to_device(device);
        model.backbone().check_input("train.input", &x)?;
        let (_, logits) = model.forward_t(&x, true);
        let loss = logits.cross_entropy_for_logits(&labels);
        loss.backward();
        checks.push(output_check(
            "train.logits",
            &logits,
            need(dir, &vectors, "train.logits")?,
        ));
        let ours = loss.double_value(&[]);
        let reference = need(dir, &vectors, "train.loss")?
            .reshape([-1])
            .double_value(&[0]);
        let e = (ours - reference).abs() / reference.abs().max(f64::MIN_POSITIVE);
        checks.push(Check {
            check: "train.loss".into(),
            worst_err: e,
            tolerance: LOSS_REL,
            worst_key: None,
            pass: e <= LOSS_REL,
        });
        let vars: BTreeMap<String, Tensor> = model.var_store().variables().into_iter().collect();
        checks.push(compare_grads(dir, &vars, &vectors)?);
    }
    Ok(checks)
}

/// Whether `dir` looks like a downstream reference directory (has `vectors.safetensors`).
pub fn is_downstream(dir: &Path) -> bool {
    dir.join("vectors.safetensors").is_file()
}
