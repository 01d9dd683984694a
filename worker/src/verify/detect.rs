//! Detection reference directories (`task = "detect"`, e.g.
//! `shared/reference/endofm-tiny-detect`): `config.json` describes the ViT (`backbone_vit`), the
//! FPN (`fpn`) and the published config keys of the head (`cfg`); `weights.safetensors` holds
//! the detector under the published keys; `vectors.safetensors` the three input frames
//! (`input.cur`, `input.ref0`, `input.ref1`, float16), the targets, and the outputs of the
//! training path (`train.*`: ViT on the whole T = 3 clip, losses, gradients) and of the test
//! path (`test.*`: ViT frame by frame, raw head outputs, post-processed detections).
//!
//! Tolerances: pyramid and head outputs within 1e-4 of each tensor's largest reference
//! magnitude, each loss term 1e-5 relative, gradients `1e-3 · max |ref| + 1e-6`, targets exact
//! (classes) or 1e-4 (centerness at positives), detections with the same count, labels and
//! order, boxes within 1e-3 px and scores within 1e-5.

use std::collections::BTreeMap;

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use endofm_shared::{DetectorConfig, IouLossKind, ModelConfig};

use super::downstream::{
    Check, LOSS_REL, backbone_config, bad, compare_grads, config_json, need, output_check, vectors,
};
use crate::infer::{Precision, with_precision};
use crate::model::LoadMode;
use crate::model::detector::{Detections, Detector, HeadOutput, Losses, Targets, loss};
use crate::verify::ReferenceDir;
use crate::{Error, Result};

/// Detection boxes: absolute tolerance in pixels.
pub const BOX_ABS_PX: f64 = 1e-3;
/// Detection scores: absolute tolerance.
pub const SCORE_ABS: f64 = 1e-5;

/// Names of the head outputs per level, as the vectors store them.
pub const HEAD_OUTPUTS: [&str; 6] = [
    "cls_logits",
    "bbox_reg",
    "centerness",
    "stft_cls_logits",
    "stft_bbox_reg",
    "pre_bbox",
];

/// The ViT and head configurations a detect directory describes (published config keys in
/// `cfg`; a key left out keeps the published value; a setting this implementation does not
/// have is refused naming the key).
pub fn detect_config(dir: &ReferenceDir) -> Result<(ModelConfig, DetectorConfig)> {
    let json = config_json(dir)?;
    let vit = json
        .get("backbone_vit")
        .ok_or_else(|| bad(dir, "backbone_vit", "missing"))?;
    let model = backbone_config(dir, vit)?;
    let empty = Value::Object(Default::default());
    let cfg = json.get("cfg").unwrap_or(&empty);
    let mut det = DetectorConfig::default();
    let field = |key: &str| cfg.get(key);
    let num = |key: &str| -> Result<Option<f64>> {
        match field(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| bad(dir, &format!("cfg.{key}"), format!("{v} is not a number"))),
        }
    };
    let count = |key: &str| -> Result<Option<usize>> {
        match num(key)? {
            Some(v) if v < 0.0 || v.fract() != 0.0 => Err(bad(
                dir,
                &format!("cfg.{key}"),
                format!("{v} is not a count"),
            )),
            other => Ok(other.map(|v| v as usize)),
        }
    };
    let flag = |key: &str| -> Result<Option<bool>> {
        match field(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| bad(dir, &format!("cfg.{key}"), format!("{v} is not a boolean"))),
        }
    };
    let list = |key: &str| -> Result<Option<Vec<f64>>> {
        match field(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_f64().ok_or_else(|| {
                        bad(dir, &format!("cfg.{key}"), format!("{v} is not a number"))
                    })
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(bad(
                dir,
                &format!("cfg.{key}"),
                format!("{v} is not a list"),
            )),
        }
    };
    if let Some(n) = count("MODEL.FCOS.NUM_CLASSES")? {
        if n < 2 {
            return Err(bad(
                dir,
                "cfg.MODEL.FCOS.NUM_CLASSES",
                format!("{n}: counts the background, so at least 2"),
            ));
        }
        det.num_classes = n - 1;
    }
    if let Some(c) = count("MODEL.RESNETS.BACKBONE_OUT_CHANNELS")? {
        det.fpn_channels = c;
    }
    if let Some(c) = count("MODEL.RESNETS.RES2_OUT_CHANNELS")?
        && c != model.embed_dim
    {
        return Err(bad(
            dir,
            "cfg.MODEL.RESNETS.RES2_OUT_CHANNELS",
            format!(
                "{c}: the FPN's inputs are the ViT's maps, {} wide",
                model.embed_dim
            ),
        ));
    }
    if let Some(s) = list("MODEL.FCOS.FPN_STRIDES")? {
        det.fpn_strides = s.iter().map(|v| *v as u32).collect();
    }
    if let Some(n) = count("MODEL.FCOS.NUM_CONVS")? {
        det.num_convs = n;
    }
    if let Some(v) = num("MODEL.FCOS.PRIOR_PROB")? {
        det.prior_prob = v;
    }
    if let Some(v) = num("MODEL.FCOS.INFERENCE_TH")? {
        det.inference_th = v;
    }
    if let Some(v) = num("MODEL.FCOS.NMS_TH")? {
        det.nms_th = v;
    }
    if let Some(n) = count("MODEL.FCOS.PRE_NMS_TOP_N")? {
        det.pre_nms_top_n = n;
    }
    if let Some(b) = flag("MODEL.FCOS.NORM_REG_TARGETS")? {
        det.norm_reg_targets = b;
    }
    if let Some(b) = flag("MODEL.FCOS.CENTERNESS_ON_REG")? {
        det.centerness_on_reg = b;
    }
    if let Some(v) = num("MODEL.FCOS.CENTER_SAMPLING_RADIUS")? {
        det.center_sampling_radius = v;
    }
    if let Some(v) = field("MODEL.FCOS.IOU_LOSS_TYPE") {
        det.iou_loss = match v.as_str() {
            Some("giou") => IouLossKind::Giou,
            Some("iou") => IouLossKind::Iou,
            Some("linear_iou") => IouLossKind::LinearIou,
            _ => {
                return Err(bad(
                    dir,
                    "cfg.MODEL.FCOS.IOU_LOSS_TYPE",
                    format!("{v}: expected giou, iou or linear_iou"),
                ));
            }
        };
    }
    if let Some(v) = num("MODEL.FCOS.LOSS_ALPHA")? {
        det.focal_alpha = v;
    }
    if let Some(v) = num("MODEL.FCOS.LOSS_GAMMA")? {
        det.focal_gamma = v;
    }
    if flag("MODEL.FCOS.USE_DCN_IN_TOWER")? == Some(true) {
        return Err(bad(
            dir,
            "cfg.MODEL.FCOS.USE_DCN_IN_TOWER",
            "deformable convolutions in the towers are not part of the published KUMC detector",
        ));
    }
    if let Some(v) = num("MODEL.STFT.OFFSET_WEIGHT_STD")? {
        det.offset_weight_std = v;
    }
    if let Some(v) = num("MODEL.STFT.IOU_THRESH")? {
        det.stft_iou_thresh = v;
    }
    if let Some(v) = list("MODEL.STFT.BBOX_STD")? {
        det.stft_bbox_std = <[f64; 4]>::try_from(v.as_slice()).map_err(|_| {
            bad(
                dir,
                "cfg.MODEL.STFT.BBOX_STD",
                format!("{v:?}: four numbers expected"),
            )
        })?;
    }
    if let Some(v) = num("MODEL.STFT.REG_BETA")? {
        det.stft_reg_beta = v;
    }
    if let Some(n) = count("TEST.DETECTIONS_PER_IMG")? {
        det.detections_per_img = n;
    }
    if let Some(v) = num("postprocess_min_size")?
        && v != 0.0
    {
        return Err(bad(
            dir,
            "cfg.postprocess_min_size",
            format!("{v}: the published post-processor uses 0"),
        ));
    }
    if let Some(Value::Array(ranges)) = field("object_sizes_of_interest") {
        det.object_sizes = ranges
            .iter()
            .map(|r| {
                r.as_array()
                    .and_then(|p| Some([p.first()?.as_f64()?, p.get(1)?.as_f64()?]))
                    .ok_or_else(|| {
                        bad(
                            dir,
                            "cfg.object_sizes_of_interest",
                            format!("{r} is not a [lo, hi] pair"),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
    }
    // "GroupNorm(32, 64), ..." and "... deformable_groups 4 ...": the descriptive strings.
    if let Some(text) = field("head.group_norm").and_then(Value::as_str) {
        let groups = text
            .strip_prefix("GroupNorm(")
            .and_then(|t| t.split(',').next())
            .and_then(|t| t.trim().parse::<usize>().ok())
            .ok_or_else(|| {
                bad(
                    dir,
                    "cfg.head.group_norm",
                    format!("`{text}`: no GroupNorm(groups, …)"),
                )
            })?;
        det.group_norm_groups = groups;
    }
    if let Some(text) = field("stft_branch").and_then(Value::as_str)
        && let Some(rest) = text.split("deformable_groups").nth(1)
    {
        let groups = rest
            .split(|c: char| !c.is_ascii_digit())
            .find(|t| !t.is_empty())
            .and_then(|t| t.parse::<usize>().ok())
            .ok_or_else(|| {
                bad(
                    dir,
                    "cfg.stft_branch",
                    format!("`{text}`: no deformable_groups N"),
                )
            })?;
        det.deformable_groups = groups;
    }
    if let Some(fpn) = json.get("fpn") {
        for key in ["use_gn", "use_relu"] {
            if fpn.get(key).and_then(Value::as_bool) == Some(true) {
                return Err(bad(
                    dir,
                    &format!("fpn.{key}"),
                    "the published detector's FPN has plain convolutions",
                ));
            }
        }
        if let Some(out) = fpn.get("out_channels").and_then(Value::as_u64)
            && out as usize != det.fpn_channels
        {
            return Err(bad(
                dir,
                "fpn.out_channels",
                format!(
                    "{out} differs from cfg.MODEL.RESNETS.BACKBONE_OUT_CHANNELS {}",
                    det.fpn_channels
                ),
            ));
        }
    }
    det.validate().map_err(|e| bad(dir, "cfg", e.to_string()))?;
    Ok((model, det))
}

/// The reference detector with its weights, strictly loaded.
pub fn detector(dir: &ReferenceDir, device: Device) -> Result<Detector> {
    let (model, det) = detect_config(dir)?;
    let mut net = Detector::new(&model, &det, device)?;
    net.load(&dir.file("weights.safetensors"), LoadMode::Strict)?;
    Ok(net)
}

/// The clip (1, 3, 3, H, W) of `input.cur`, `input.ref0`, `input.ref1`.
fn clip(dir: &ReferenceDir, v: &BTreeMap<String, Tensor>, device: Device) -> Result<Tensor> {
    let frames = ["input.cur", "input.ref0", "input.ref1"]
        .iter()
        .map(|k| need(dir, v, k).map(|t| t.to_kind(Kind::Float).to_device(device)))
        .collect::<Result<Vec<_>>>()?;
    let shape = frames[0].size();
    if let Some(i) = frames
        .iter()
        .position(|f| f.size() != shape || shape.len() != 4)
    {
        return Err(Error::Input {
            name: ["input.cur", "input.ref0", "input.ref1"][i].into(),
            reason: format!(
                "shape {:?}; every frame must be (1, 3, H, W) like input.cur",
                frames[i].size()
            ),
        });
    }
    Ok(Tensor::stack(&frames, 2))
}

/// Head outputs under the vectors' names: `{prefix}.head.{level}.{output}`.
fn head_tensors(prefix: &str, out: &HeadOutput, into: &mut BTreeMap<String, Tensor>) {
    for l in 0..out.cls_logits.len() {
        let parts = [
            &out.cls_logits[l],
            &out.bbox_reg[l],
            &out.centerness[l],
            &out.stft_cls_logits[l],
            &out.stft_bbox_reg[l],
            &out.pre_bbox[l],
        ];
        for (name, t) in HEAD_OUTPUTS.iter().zip(parts) {
            into.insert(
                format!("{prefix}.head.{l}.{name}"),
                t.detach().to_kind(Kind::Float).to_device(Device::Cpu),
            );
        }
    }
}

/// The test path of a detect directory (eval mode, ViT frame by frame): `test.fpn.{0..4}`
/// (3, C, h, w), `test.head.{level}.{output}` and `test.detections.{boxes, scores, labels}`.
pub fn detect_forward(
    dir: &ReferenceDir,
    device: Device,
    precision: Precision,
) -> Result<BTreeMap<String, Tensor>> {
    let net = detector(dir, device)?;
    let v = vectors(dir)?;
    let x = clip(dir, &v, device)?;
    net.check_input("input.cur/ref0/ref1", &x)?;
    let (h, w) = (x.size()[3], x.size()[4]);
    let (fpn, out) = with_precision(precision, device, || {
        tch::no_grad(|| -> Result<_> {
            let fpn = net.features_per_frame(&x, false);
            let out = net.head(&fpn, 3)?;
            Ok((fpn, out))
        })
    })??;
    let mut map = BTreeMap::new();
    for (l, t) in fpn.iter().enumerate() {
        map.insert(
            format!("test.fpn.{l}"),
            t.to_kind(Kind::Float).to_device(Device::Cpu),
        );
    }
    head_tensors("test", &out, &mut map);
    let dets = crate::model::detector::postprocess::detect(net.config(), &out, 0, h, w);
    map.insert("test.detections.boxes".into(), dets.boxes);
    map.insert("test.detections.scores".into(), dets.scores);
    map.insert("test.detections.labels".into(), dets.labels);
    Ok(map)
}

/// Compares detections with `test.detections.*`: count, labels and order exact, boxes within
/// [`BOX_ABS_PX`], scores within [`SCORE_ABS`].
pub fn compare_detections(
    dir: &ReferenceDir,
    ours: &Detections,
    v: &BTreeMap<String, Tensor>,
) -> Result<Vec<Check>> {
    let boxes = need(dir, v, "test.detections.boxes")?;
    let scores = need(dir, v, "test.detections.scores")?;
    let labels = need(dir, v, "test.detections.labels")?;
    let n_ref = scores.size()[0] as usize;
    let same_count = ours.len() == n_ref;
    let mut checks = vec![Check {
        check: format!(
            "test.detections.count (ours {}, reference {n_ref})",
            ours.len()
        ),
        worst_err: (ours.len() as f64 - n_ref as f64).abs(),
        tolerance: 0.0,
        worst_key: None,
        pass: same_count,
    }];
    if !same_count {
        return Ok(checks);
    }
    let label_mismatch = ours
        .labels
        .ne_tensor(&labels.to_kind(Kind::Int64))
        .sum(Kind::Int64)
        .int64_value(&[]);
    checks.push(Check {
        check: "test.detections.labels (mismatches, in order)".into(),
        worst_err: label_mismatch as f64,
        tolerance: 0.0,
        worst_key: None,
        pass: label_mismatch == 0,
    });
    let abs = |a: &Tensor, b: &Tensor| {
        if a.numel() == 0 {
            0.0
        } else {
            (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
                .abs()
                .max()
                .double_value(&[])
        }
    };
    let box_err = abs(&ours.boxes, boxes);
    checks.push(Check {
        check: "test.detections.boxes (px, absolute)".into(),
        worst_err: box_err,
        tolerance: BOX_ABS_PX,
        worst_key: None,
        pass: box_err <= BOX_ABS_PX,
    });
    let score_err = abs(&ours.scores, scores);
    checks.push(Check {
        check: "test.detections.scores (absolute)".into(),
        worst_err: score_err,
        tolerance: SCORE_ABS,
        worst_key: None,
        pass: score_err <= SCORE_ABS,
    });
    Ok(checks)
}

fn count_mismatches(name: &str, ours: &Tensor, reference: &Tensor) -> Check {
    let n = if ours.size() == reference.size() {
        ours.ne_tensor(&reference.to_kind(ours.kind()))
            .sum(Kind::Int64)
            .int64_value(&[])
    } else {
        i64::MAX
    };
    Check {
        check: format!("{name} (mismatching locations)"),
        worst_err: n as f64,
        tolerance: 0.0,
        worst_key: None,
        pass: n == 0,
    }
}

/// Every check of a detect directory with the network `net` (the reference weights, or a
/// perturbed copy in a negative test): the test path (pyramid, head, detections) and the
/// training path (ViT pyramid, FPN, head, targets, the five losses and their sum, gradients).
pub fn check_detect_with(dir: &ReferenceDir, net: &Detector, device: Device) -> Result<Vec<Check>> {
    let v = vectors(dir)?;
    let x = clip(dir, &v, device)?;
    net.check_input("input.cur/ref0/ref1", &x)?;
    let (h, w) = (x.size()[3], x.size()[4]);
    let mut checks = Vec::new();

    // Test path.
    let (fpn, out) = tch::no_grad(|| -> Result<_> {
        let fpn = net.features_per_frame(&x, false);
        let out = net.head(&fpn, 3)?;
        Ok((fpn, out))
    })?;
    for (l, t) in fpn.iter().enumerate() {
        let key = format!("test.fpn.{l}");
        checks.push(output_check(&key, t, need(dir, &v, &key)?));
    }
    let mut ours = BTreeMap::new();
    head_tensors("test", &out, &mut ours);
    for (key, t) in &ours {
        checks.push(output_check(key, t, need(dir, &v, key)?));
    }
    let dets = crate::model::detector::postprocess::detect(net.config(), &out, 0, h, w);
    checks.extend(compare_detections(dir, &dets, &v)?);

    // Training path.
    let boxes = need(dir, &v, "targets.boxes")?.to_kind(Kind::Float);
    let labels = need(dir, &v, "targets.labels")?.to_kind(Kind::Int64);
    let targets = [Targets { boxes, labels }];
    let body = net.body_clip(&x, true);
    for (l, t) in body.iter().enumerate() {
        let key = format!("train.body.{l}");
        checks.push(output_check(&key, t, need(dir, &v, &key)?));
    }
    let fpn = net.features_clip(&x, true);
    for (l, t) in fpn.iter().enumerate() {
        let key = format!("train.fpn.{l}");
        checks.push(output_check(&key, t, need(dir, &v, &key)?));
    }
    let out = net.head(&fpn, 3)?;
    let mut ours = BTreeMap::new();
    head_tensors("train", &out, &mut ours);
    for (key, t) in &ours {
        if key.ends_with(".pre_bbox") {
            continue; // stored with the levels concatenated
        }
        checks.push(output_check(key, t, need(dir, &v, key)?));
    }
    let pre_bbox = Tensor::cat(&out.pre_bbox, 1);
    checks.push(output_check(
        "train.head.pre_bbox",
        &pre_bbox,
        need(dir, &v, "train.head.pre_bbox")?,
    ));
    let cfg = net.config();
    let gt = loss::ground_truth(cfg, &out.locations, &targets, &pre_bbox)?;
    let ref_classes = need(dir, &v, "train.gt.classes")?;
    checks.push(count_mismatches(
        "train.gt.classes",
        &gt.classes,
        ref_classes,
    ));
    checks.push(count_mismatches(
        "train.gt.stft_classes",
        &gt.stft_classes,
        need(dir, &v, "train.gt.stft_classes")?,
    ));
    let fg = ref_classes.ne(cfg.background_label());
    checks.push(output_check(
        "train.gt.centerness (at positives)",
        &gt.centerness
            .masked_select(&fg.to_device(gt.centerness.device())),
        &need(dir, &v, "train.gt.centerness")?.masked_select(&fg),
    ));
    let norm = loss::Normalisers::from_reduced(loss::local_counts(cfg, &gt), 1);
    let losses = loss::losses(cfg, &out, &gt, norm);
    let total = losses.total();
    let loss_check = |name: &str, ours: &Tensor| -> Result<Check> {
        let key = format!("train.{name}");
        let ours = ours.to_kind(Kind::Double).double_value(&[]);
        let reference = need(dir, &v, &key)?.reshape([-1]).double_value(&[0]);
        let e = (ours - reference).abs() / reference.abs().max(f64::MIN_POSITIVE);
        Ok(Check {
            check: key,
            worst_err: if e.is_nan() { f64::INFINITY } else { e },
            tolerance: LOSS_REL,
            worst_key: None,
            pass: e <= LOSS_REL,
        })
    };
    for (name, t) in Losses::NAMES.iter().zip(losses.terms()) {
        checks.push(loss_check(name, t)?);
    }
    checks.push(loss_check("loss_total", &total)?);
    net.var_store().variables().values().for_each(|v| {
        let mut g = v.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    });
    total.backward();
    let vars: BTreeMap<String, Tensor> = net.var_store().variables().into_iter().collect();
    checks.push(compare_grads(dir, &vars, &v)?);
    Ok(checks)
}

/// [`check_detect_with`] on the directory's own weights.
pub fn check_detect(dir: &ReferenceDir, device: Device) -> Result<Vec<Check>> {
    let net = detector(dir, device)?;
    check_detect_with(dir, &net, device)
}
