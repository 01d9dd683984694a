//! Post-processing of STFT-FCOS outputs into boxes (`stft_core/modeling/rpn/fcos_stft/
//! inference.py`, `STFTFCOSPostProcessor`): per level, a location/class is a candidate when
//! `sqrt(σ(cls)·σ(centerness)) > inference_th`; its score is
//! `sqrt(sqrt(σ(cls)·σ(centerness))·σ(stft_cls))`, its box the current frame's detached box
//! refined by `stft_reg · bbox_std · (w, h, w, h)`; the `pre_nms_top_n` best per level are kept;
//! then over all levels a class-wise NMS (IoU without `+1`, suppressing IoU > `nms_th`; the
//! result ordered by score), at most `detections_per_img` (ties at the cut kept, as the
//! published `kthvalue` threshold does), boxes clipped to `[0, w−1] × [0, h−1]`, and boxes with
//! `x2 − x1 + 1 < 0` or `y2 − y1 + 1 < 0` dropped (`remove_small_boxes(0)`).

use tch::{Device, Kind, Tensor};

use endofm_shared::DetectorConfig;

use super::head::HeadOutput;

/// Detections of one image, on the CPU, ordered by score (highest first).
#[derive(Debug)]
pub struct Detections {
    /// (n, 4) float32 x1 y1 x2 y2 in pixels of the network input.
    pub boxes: Tensor,
    /// (n,) float32 in [0, 1].
    pub scores: Tensor,
    /// (n,) int64 in `1..=num_classes`.
    pub labels: Tensor,
}

impl Detections {
    /// Number of boxes.
    pub fn len(&self) -> usize {
        self.scores.size()[0] as usize
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// IoU without `+1` (torchvision's), float32 as the published NMS computes it.
fn iou(a: &[f32], b: &[f32]) -> f32 {
    let area = |t: &[f32]| (t[2] - t[0]) * (t[3] - t[1]);
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    inter / (area(a) + area(b) - inter)
}

/// Detections of sample `sample` of `out` for an input of `height × width` pixels.
pub fn detect(
    cfg: &DetectorConfig,
    out: &HeadOutput,
    sample: i64,
    height: i64,
    width: i64,
) -> Detections {
    let k = cfg.num_classes as i64;
    let std = Tensor::from_slice(&cfg.stft_bbox_std.map(|v| v as f32));
    let mut boxes_all = Vec::new();
    let mut scores_all = Vec::new();
    let mut labels_all = Vec::new();
    tch::no_grad(|| {
        for l in 0..out.cls_logits.len() {
            let flat = |t: &Tensor, c: i64| {
                t.get(sample)
                    .to_device(Device::Cpu)
                    .to_kind(Kind::Float)
                    .permute([1, 2, 0])
                    .reshape([-1, c])
            };
            let cls = flat(&out.cls_logits[l], k).sigmoid();
            let ctr = flat(&out.centerness[l], 1).sigmoid();
            let stft = flat(&out.stft_cls_logits[l], k).sigmoid();
            let stft_reg = flat(&out.stft_bbox_reg[l], 4);
            let pre = out.pre_bbox[l]
                .get(sample)
                .to_device(Device::Cpu)
                .to_kind(Kind::Float);
            let prob = (cls * ctr).sqrt();
            let keep = prob.gt(cfg.inference_th);
            let candidates = (prob * stft).masked_select(&keep);
            let n = candidates.size()[0];
            if n == 0 {
                continue;
            }
            let top = (cfg.pre_nms_top_n as i64).min(n);
            let (sorted, order) = candidates.sort(0, true);
            let order = order.narrow(0, 0, top);
            let picked = keep.nonzero().index_select(0, &order); // (top, 2): location, class
            let loc = picked.select(1, 0);
            let pre = pre.index_select(0, &loc);
            let wh = pre.narrow(1, 2, 2) - pre.narrow(1, 0, 2);
            let wh = Tensor::cat(&[&wh, &wh], 1);
            boxes_all.push(&pre + stft_reg.index_select(0, &loc) * &std * wh);
            scores_all.push(sorted.narrow(0, 0, top).sqrt());
            labels_all.push(picked.select(1, 1) + 1);
        }
    });
    if boxes_all.is_empty() {
        return Detections {
            boxes: Tensor::zeros([0, 4], (Kind::Float, Device::Cpu)),
            scores: Tensor::zeros([0], (Kind::Float, Device::Cpu)),
            labels: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
        };
    }
    let boxes: Vec<f32> =
        Vec::try_from(Tensor::cat(&boxes_all, 0).reshape([-1])).unwrap_or_default();
    let scores: Vec<f32> = Vec::try_from(Tensor::cat(&scores_all, 0)).unwrap_or_default();
    let labels: Vec<i64> = Vec::try_from(Tensor::cat(&labels_all, 0)).unwrap_or_default();
    let bx = |i: usize| &boxes[4 * i..4 * i + 4];

    // Class-wise greedy NMS in score order.
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut suppressed = vec![false; scores.len()];
    let mut kept = Vec::new();
    for (pos, &i) in order.iter().enumerate() {
        if suppressed[i] {
            continue;
        }
        kept.push(i);
        for &j in &order[pos + 1..] {
            if !suppressed[j] && labels[j] == labels[i] && iou(bx(i), bx(j)) > cfg.nms_th as f32 {
                suppressed[j] = true;
            }
        }
    }
    if cfg.detections_per_img > 0 && kept.len() > cfg.detections_per_img {
        let cut = scores[kept[cfg.detections_per_img - 1]];
        kept.retain(|&i| scores[i] >= cut);
    }
    let (wm, hm) = ((width - 1) as f32, (height - 1) as f32);
    let mut out_boxes = Vec::new();
    let mut out_scores = Vec::new();
    let mut out_labels = Vec::new();
    for i in kept {
        let b = bx(i);
        let c = [
            b[0].clamp(0.0, wm),
            b[1].clamp(0.0, hm),
            b[2].clamp(0.0, wm),
            b[3].clamp(0.0, hm),
        ];
        if c[2] - c[0] + 1.0 >= 0.0 && c[3] - c[1] + 1.0 >= 0.0 {
            out_boxes.extend_from_slice(&c);
            out_scores.push(scores[i]);
            out_labels.push(labels[i]);
        }
    }
    let n = out_scores.len() as i64;
    Detections {
        boxes: Tensor::from_slice(&out_boxes).view([n, 4]),
        scores: Tensor::from_slice(&out_scores),
        labels: Tensor::from_slice(&out_labels),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_has_no_plus_one() {
        assert!((iou(&[0.0, 0.0, 2.0, 2.0], &[1.0, 1.0, 3.0, 3.0]) - 1.0 / 7.0).abs() < 1e-7);
        assert_eq!(iou(&[0.0, 0.0, 1.0, 1.0], &[2.0, 2.0, 3.0, 3.0]), 0.0);
    }
}
