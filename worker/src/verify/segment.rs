//! Segmentation reference directories (`task = "segment"`, e.g.
//! `shared/reference/endofm-tiny-segment`): the TransUNet hybrid built from `config.json`
//! (`vit_seg_config` for the stem/decoder, `encoder` for the Endo-FM blocks), its eval-mode
//! logits, one train-mode step (logits, the loss and its two terms, every gradient, the
//! decoder's BatchNorm running statistics after the step) and the published Dice on stored
//! prediction/mask pairs.

use std::collections::BTreeMap;

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use endofm_shared::{ModelConfig, SegmenterConfig};

use super::downstream::{
    Check, LOSS_REL, OUTPUT_REL, backbone_config, bad, compare_grads, config_json, need,
    output_check, vectors,
};
use crate::eval::metrics::MaskOverlap;
use crate::finetune::segment::loss::{predict_classes, seg_loss};
use crate::model::{LoadMode, Segmenter};
use crate::verify::ReferenceDir;
use crate::{Error, Result};

/// The network sizes of a segment directory: the Endo-FM blocks (its `img_size` the frame size)
/// and the stem/decoder. Every size comes from `config.json`; sizes that must agree (token width,
/// skip channels) are checked.
pub fn segment_config(dir: &ReferenceDir) -> Result<(ModelConfig, SegmenterConfig)> {
    let json = config_json(dir)?;
    let vit = json
        .get("vit_seg_config")
        .ok_or_else(|| bad(dir, "vit_seg_config", "missing"))?;
    let encoder = json
        .get("encoder")
        .ok_or_else(|| bad(dir, "encoder", "missing"))?;
    let count = |section: &Value, prefix: &str, key: &str| -> Result<usize> {
        section
            .get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| bad(dir, &format!("{prefix}.{key}"), "missing or not a count"))
    };
    let counts = |key: &str| -> Result<Vec<usize>> {
        vit.get(key)
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .map(|v| v.as_u64().map(|v| v as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| {
                bad(
                    dir,
                    &format!("vit_seg_config.{key}"),
                    "missing or not a list of counts",
                )
            })
    };
    let img = count(vit, "vit_seg_config", "img_size")?;
    let hidden = count(vit, "vit_seg_config", "hidden_size")?;
    // The blocks: the `encoder` section plus the frame size (T is the sequence length: no time
    // table is used).
    let mut section = encoder.clone();
    if let Value::Object(map) = &mut section {
        map.insert("img_size".into(), Value::from(img));
        map.insert("num_frames".into(), Value::from(1));
    }
    let model = backbone_config(dir, &section)?;
    if model.embed_dim != hidden {
        return Err(bad(
            dir,
            "encoder.embed_dim",
            format!(
                "{}: the tokens are hidden_size {hidden} wide",
                model.embed_dim
            ),
        ));
    }
    let resnet_width = match vit.get("resnet_width").and_then(Value::as_u64) {
        Some(w) => w as usize,
        None => {
            let factor = vit
                .get("resnet.width_factor")
                .and_then(Value::as_f64)
                .ok_or_else(|| bad(dir, "vit_seg_config.resnet_width", "missing"))?;
            (64.0 * factor) as usize
        }
    };
    let seg = SegmenterConfig {
        resnet_units: counts("resnet.num_layers")?,
        resnet_width,
        head_channels: vit
            .get("head_channels")
            .map_or(Ok(512), |_| count(vit, "vit_seg_config", "head_channels"))?,
        decoder_channels: counts("decoder_channels")?,
        n_skip: count(vit, "vit_seg_config", "n_skip")?,
        n_classes: count(vit, "vit_seg_config", "n_classes")?,
        dropout_rate: vit
            .get("transformer.dropout_rate")
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
    };
    seg.validate()?;
    if let Ok(skips) = counts("skip_channels") {
        let mut given = skips.clone();
        for s in given.iter_mut().skip(seg.n_skip) {
            *s = 0;
        }
        if given.len() != 4 || given[..] != seg.skip_channels()[..] {
            return Err(bad(
                dir,
                "vit_seg_config.skip_channels",
                format!(
                    "{skips:?} (n_skip {}) does not match the stem's features {:?}",
                    seg.n_skip,
                    seg.skip_channels()
                ),
            ));
        }
    }
    if let Some(grid) = vit.get("patches.grid").and_then(Value::as_array) {
        let g: Vec<u64> = grid.iter().filter_map(Value::as_u64).collect();
        if g.len() != 2 || g[0] != g[1] || g[0] as usize * 16 != img {
            return Err(bad(
                dir,
                "vit_seg_config.patches.grid",
                format!(
                    "{g:?}: the hybrid's token grid is img_size / 16 = {}",
                    img / 16
                ),
            ));
        }
    }
    Ok((model, seg))
}

/// The reference network with its weights, strictly loaded.
pub fn segmenter(dir: &ReferenceDir, device: Device) -> Result<Segmenter> {
    let (model, seg) = segment_config(dir)?;
    let mut net = Segmenter::new(&model, &seg, device)?;
    net.load(&dir.file("weights.safetensors"), LoadMode::Strict)?;
    Ok(net)
}

/// Whether `weights.safetensors` holds the BatchNorm buffers as they were *after* the
/// reference's training step (every `train.after.<key>` equal to the file's `<key>`): the
/// published-code generator saves its state dict after the step, while its eval-mode logits
/// were computed before it.
fn saved_after_step(net: &Segmenter, vectors: &BTreeMap<String, Tensor>) -> bool {
    let vars = net.var_store().variables();
    let mut any = false;
    for (key, after) in vectors {
        let Some(name) = key.strip_prefix("train.after.") else {
            continue;
        };
        let Some(ours) = vars.get(name) else {
            return false;
        };
        let ours = ours.to_device(Device::Cpu);
        if ours.size() != after.size() || ours.kind() != after.kind() || ours != *after {
            return false;
        }
        any = true;
    }
    any
}

/// The network in the state the reference's eval-mode pass ran in. When the file holds the
/// post-step BatchNorm buffers ([`saved_after_step`]), the pre-step ones are recovered exactly
/// by inverting the running-average update with the batch statistics of `train.input`
/// (`after = (1 − m)·before + m·batch` ⇒ `before = ((2 − m)·after − probe)/(1 − m)`, where
/// `probe` is one update applied to `after`), and the batch count goes back by one.
fn pre_step_segmenter(
    dir: &ReferenceDir,
    device: Device,
    vectors: &BTreeMap<String, Tensor>,
) -> Result<Segmenter> {
    let net = segmenter(dir, device)?;
    if !saved_after_step(&net, vectors) {
        return Ok(net);
    }
    let probe = segmenter(dir, device)?;
    let x = need(dir, vectors, "train.input")?;
    probe.check_input("train.input", x)?;
    let _ = tch::no_grad(|| probe.forward_t(&x.to_device(device), true));
    let probed = probe.var_store().variables();
    let m = crate::model::segmenter::decoder::BN_MOMENTUM;
    tch::no_grad(|| {
        for (key, var) in net.var_store().variables() {
            let mut var = var;
            if key.ends_with("running_mean") || key.ends_with("running_var") {
                let before = (&var * (2.0 - m) - &probed[&key]) / (1.0 - m);
                var.copy_(&before);
            } else if key.ends_with("num_batches_tracked") {
                let _ = var.g_sub_scalar_(1);
            }
        }
    });
    Ok(net)
}

/// The eval-mode outputs `model forward` writes: `eval.logits` (T, classes, S, S) float32.
pub fn segment_forward(dir: &ReferenceDir, device: Device) -> Result<BTreeMap<String, Tensor>> {
    let vectors = vectors(dir)?;
    let net = pre_step_segmenter(dir, device, &vectors)?;
    let x = need(dir, &vectors, "eval.input")?;
    net.check_input("eval.input", x)?;
    let logits = tch::no_grad(|| net.forward_t(&x.to_device(device), false));
    Ok(BTreeMap::from([(
        "eval.logits".to_string(),
        logits.to_kind(Kind::Float).to_device(Device::Cpu),
    )]))
}

fn loss_check(name: &str, ours: f64, reference: &Tensor) -> Check {
    let r = reference.reshape([-1]).double_value(&[0]);
    let e = (ours - r).abs() / r.abs().max(f64::MIN_POSITIVE);
    Check {
        check: name.to_string(),
        worst_err: e,
        tolerance: LOSS_REL,
        worst_key: None,
        pass: e <= LOSS_REL,
    }
}

/// The published volume Dice of `logits` (T, C, H, W) against `mask` (T, H, W): the prediction
/// (uint8, T × H × W) and the value.
pub fn volume_dice(logits: &Tensor, mask: &Tensor) -> Result<(Tensor, f64)> {
    let pred = predict_classes(logits);
    let p: Vec<u8> = Vec::try_from(pred.flatten(0, -1).eq(1).to_kind(Kind::Uint8))?;
    let m: Vec<u8> = Vec::try_from(mask.flatten(0, -1).eq(1).to_kind(Kind::Uint8))?;
    Ok((pred, MaskOverlap::of(&p, &m)?.published_dice()))
}

/// Every check of a segment directory.
pub fn check_segment(dir: &ReferenceDir, device: Device) -> Result<Vec<Check>> {
    let vectors = vectors(dir)?;
    let mut checks = Vec::new();
    for (key, ours) in segment_forward(dir, device)? {
        checks.push(output_check(&key, &ours, need(dir, &vectors, &key)?));
    }

    if vectors.contains_key("train.input") {
        let net = pre_step_segmenter(dir, device, &vectors)?;
        let x = need(dir, &vectors, "train.input")?;
        net.check_input("train.input", x)?;
        let labels = need(dir, &vectors, "train.label")?
            .to_kind(Kind::Int64)
            .to_device(device);
        let logits = net.forward_t(&x.to_device(device), true);
        let l = seg_loss(&logits, &labels);
        l.loss.backward();
        checks.push(output_check(
            "train.logits",
            &logits.to_device(Device::Cpu),
            need(dir, &vectors, "train.logits")?,
        ));
        for (name, ours) in [
            ("train.loss_ce", &l.ce),
            ("train.loss_dice", &l.dice),
            ("train.loss", &l.loss),
        ] {
            checks.push(loss_check(
                name,
                ours.double_value(&[]),
                need(dir, &vectors, name)?,
            ));
        }
        let vars: BTreeMap<String, Tensor> = net.var_store().variables().into_iter().collect();
        let trainable: BTreeMap<String, Tensor> = vars
            .iter()
            .filter(|(_, v)| v.requires_grad())
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        checks.push(compare_grads(dir, &trainable, &vectors)?);
        checks.push(running_stats_check(dir, &vars, &vectors)?);
    }

    let mut dice_values = Vec::new();
    for case in 0.. {
        let prefix = format!("metric.case{case}");
        let Some(reference_dice) = vectors.get(&format!("{prefix}.dice")) else {
            break;
        };
        let logits = if case == 0 {
            need(dir, &vectors, "eval.logits")?
        } else {
            need(dir, &vectors, &format!("{prefix}.logits"))?
        };
        let mask_key = if case == 0 {
            "eval.mask".to_string()
        } else {
            format!("{prefix}.mask")
        };
        let mask = need(dir, &vectors, &mask_key)?;
        let (pred, dice) = volume_dice(logits, mask)?;
        let reference_pred = need(dir, &vectors, &format!("{prefix}.pred"))?;
        let differing = pred
            .to_kind(Kind::Int64)
            .ne_tensor(&reference_pred.to_kind(Kind::Int64))
            .sum(Kind::Int64)
            .int64_value(&[]);
        checks.push(Check {
            check: format!("{prefix}.pred (pixels differing)"),
            worst_err: differing as f64,
            tolerance: 0.0,
            worst_key: None,
            pass: differing == 0,
        });
        let r = reference_dice.reshape([-1]).double_value(&[0]);
        let e = (dice - r).abs();
        checks.push(Check {
            check: format!("{prefix}.dice"),
            worst_err: e,
            tolerance: 1e-12,
            worst_key: None,
            pass: e <= 1e-12,
        });
        dice_values.push(dice);
    }
    if let Some(mean) = vectors.get("metric.mean_dice") {
        if dice_values.is_empty() {
            return Err(Error::Input {
                name: "metric.mean_dice".into(),
                reason: "given without metric.case* to average".into(),
            });
        }
        let ours = dice_values.iter().sum::<f64>() / dice_values.len() as f64;
        let e = (ours - mean.reshape([-1]).double_value(&[0])).abs();
        checks.push(Check {
            check: "metric.mean_dice".into(),
            worst_err: e,
            tolerance: 1e-12,
            worst_key: None,
            pass: e <= 1e-12,
        });
    }
    Ok(checks)
}

/// Compares the decoder's BatchNorm buffers after the training step with `train.after.<key>`:
/// running mean/variance within [`OUTPUT_REL`] of each tensor's largest value, batch counts
/// exactly.
fn running_stats_check(
    dir: &ReferenceDir,
    vars: &BTreeMap<String, Tensor>,
    vectors: &BTreeMap<String, Tensor>,
) -> Result<Check> {
    let mut worst = (String::new(), 0.0f64);
    let mut checked = 0;
    for (key, reference) in vectors {
        let Some(name) = key.strip_prefix("train.after.") else {
            continue;
        };
        let ours = vars.get(name).ok_or_else(|| Error::Input {
            name: format!("{}: {key}", dir.file("vectors.safetensors").display()),
            reason: "a buffer this network does not have".into(),
        })?;
        let ours = ours.to_device(Device::Cpu);
        let err = if name.ends_with("num_batches_tracked") {
            // Batch counts must be equal: any difference is over the bound.
            let (a, b) = (ours.int64_value(&[]), reference.int64_value(&[]));
            2.0 * (a - b).abs() as f64
        } else {
            super::rel_err(&ours, reference) / OUTPUT_REL
        };
        checked += 1;
        if err > worst.1 || worst.0.is_empty() {
            worst = (name.to_string(), err);
        }
    }
    Ok(Check {
        check: format!("train.after (BatchNorm buffers, {checked} tensors; error / bound)"),
        worst_err: worst.1,
        tolerance: 1.0,
        worst_key: (checked > 0).then_some(worst.0),
        pass: checked > 0 && worst.1 <= 1.0,
    })
}
