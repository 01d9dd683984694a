//! KUMC frames into detector inputs, and scoring a detector on a split.
//!
//! A sample is the current frame and its reference frames of the same video
//! (`cvcvid_stft.py`): in training one from 1–[`DetectConfig::ref_max_offset`] frames before and
//! one from as many after ([`super::reference_frames`]); at test, as the published
//! `_forward_test`, half of `test_refs` drawn without replacement from the `ref_max_offset`
//! frames before and half from those after, clamped to the video (the published buffer repeats
//! the first frame before the start and the last after the end). Each frame is resized to the
//! network size ([`super::input_size`]; bilinear on the tensor, where the published code
//! resizes the PIL image), turned into the published input (`BGR·255 − PIXEL_MEAN`, std 1), and
//! the current frame's boxes are scaled alike; a horizontal flip mirrors boxes the published
//! way (`x1' = W − x2 − 1`).

use std::collections::HashMap;

use rand::Rng;
use tch::{Kind, Tensor};

use endofm_shared::DetectConfig;

use super::metrics::{DetectionScores, FrameBoxes, ScoredBox, score};
use crate::datasets::Split;
use crate::datasets::kumc::{Kumc, KumcFrame};
use crate::model::Detector;
use crate::model::detector::Targets;
use crate::{Error, Result};

/// The published `INPUT.PIXEL_MEAN` (BGR, 0–255).
pub const PIXEL_MEAN_BGR: [f64; 3] = [102.9801, 115.9465, 122.7717];

/// One sample: the clip and the current frame's boxes in network pixels.
#[derive(Debug)]
pub struct DetectSample {
    /// (3, T, H, W) float32, frame 0 the current frame.
    pub clip: Tensor,
    /// The current frame's boxes, scaled (and flipped) like the clip.
    pub targets: Targets,
    /// `(height, width)` of the original frame.
    pub original: (usize, usize),
}

/// Index of the frames of a split by `(video, number)`.
pub fn frame_index(frames: &[KumcFrame]) -> HashMap<(&str, usize), usize> {
    frames
        .iter()
        .enumerate()
        .map(|(i, f)| ((f.video.as_str(), f.number), i))
        .collect()
}

/// The frame `number` of the video of `frames[i]`, or the listed frame of that video nearest
/// to it (every frame of a KUMC video is listed; a partial list still gives a frame).
fn lookup<'a>(
    frames: &'a [KumcFrame],
    index: &HashMap<(&str, usize), usize>,
    i: usize,
    number: usize,
) -> &'a KumcFrame {
    let cur = &frames[i];
    if let Some(&j) = index.get(&(cur.video.as_str(), number)) {
        return &frames[j];
    }
    frames
        .iter()
        .filter(|f| f.video == cur.video)
        .min_by_key(|f| f.number.abs_diff(number))
        .unwrap_or(cur)
}

/// A frame as the published input at `size`: (3, H, W) float32.
fn input_frame(ds: &Kumc, frame: &KumcFrame, size: (usize, usize), flip: bool) -> Result<Tensor> {
    let pixels = ds.read_frame(frame)?;
    let t = Tensor::from_slice(&pixels.data)
        .view([pixels.h as i64, pixels.w as i64, 3])
        .permute([2, 0, 1])
        .to_kind(Kind::Float)
        .flip([0]) // RGB → BGR
        .unsqueeze(0)
        .upsample_bilinear2d([size.0 as i64, size.1 as i64], false, None, None)
        .squeeze_dim(0);
    let mean = Tensor::from_slice(&PIXEL_MEAN_BGR.map(|v| v as f32)).view([3, 1, 1]);
    let t = t - mean;
    Ok(if flip { t.flip([2]) } else { t })
}

/// Builds the sample of `frames[i]` with reference frame numbers `refs`.
pub fn load_sample(
    ds: &Kumc,
    frames: &[KumcFrame],
    index: &HashMap<(&str, usize), usize>,
    i: usize,
    refs: &[usize],
    cfg: &DetectConfig,
    flip: bool,
) -> Result<DetectSample> {
    let cur = &frames[i];
    let (h, w) = (cur.annotation.height, cur.annotation.width);
    let size = super::input_size(cfg, h, w);
    let mut clip = vec![input_frame(ds, cur, size, flip)?];
    for &r in refs {
        clip.push(input_frame(ds, lookup(frames, index, i, r), size, flip)?);
    }
    let (sy, sx) = (size.0 as f64 / h as f64, size.1 as f64 / w as f64);
    let width = size.1 as f64;
    let mut boxes = Vec::new();
    let mut labels = Vec::new();
    for b in &cur.annotation.boxes {
        let (mut x1, x2) = (b.xmin * sx, b.xmax * sx);
        let mut x2 = x2;
        if flip {
            (x1, x2) = (width - x2 - 1.0, width - x1 - 1.0);
        }
        boxes.extend([
            x1 as f32,
            (b.ymin * sy) as f32,
            x2 as f32,
            (b.ymax * sy) as f32,
        ]);
        labels.push(b.class.id());
    }
    let k = labels.len() as i64;
    Ok(DetectSample {
        clip: Tensor::stack(&clip, 1),
        targets: Targets {
            boxes: Tensor::from_slice(&boxes).view([k, 4]),
            labels: Tensor::from_slice(&labels),
        },
        original: (h, w),
    })
}

/// `amount` distinct values of `0..m` (partial Fisher–Yates).
fn sample(rng: &mut impl Rng, m: usize, amount: usize) -> Vec<usize> {
    let mut pool: Vec<usize> = (0..m).collect();
    for i in 0..amount.min(m) {
        let j = rng.random_range(i..m);
        pool.swap(i, j);
    }
    pool.truncate(amount.min(m));
    pool
}

/// The published test-time references of frame `k` of `n`: `count / 2` distinct offsets from
/// the `max_offset` frames before and as many after, clamped to the video.
pub fn test_references(
    rng: &mut impl Rng,
    k: usize,
    n: usize,
    max_offset: usize,
    count: usize,
) -> Vec<usize> {
    let m = max_offset.max(1);
    let half = (count / 2).min(m);
    let mut refs: Vec<usize> = sample(rng, m, half)
        .into_iter()
        .map(|o| k.saturating_sub(o + 1).max(1))
        .collect();
    refs.extend(
        sample(rng, m, half)
            .into_iter()
            .map(|o| (k + o + 1).min(n.max(1))),
    );
    refs
}

/// Runs `net` on every frame of `split` (test-time references from a generator seeded with
/// `seed`) and scores the detections in original-frame pixels. Returns the scores and the
/// per-frame boxes (for plots).
///
/// Errors: a frame that cannot be read (named).
pub fn evaluate_split(
    net: &Detector,
    ds: &Kumc,
    split: Split,
    cfg: &DetectConfig,
    test_refs: usize,
    seed: u64,
) -> Result<(DetectionScores, Vec<FrameBoxes>)> {
    use rand::SeedableRng;
    let frames = ds.split(split)?;
    if frames.is_empty() {
        return Err(Error::Input {
            name: format!("{split} split"),
            reason: "has no frames to score".into(),
        });
    }
    let index = frame_index(frames);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let device = net.device();
    let mut all = Vec::with_capacity(frames.len());
    for (i, f) in frames.iter().enumerate() {
        let refs = test_references(
            &mut rng,
            f.number,
            f.video_frames,
            cfg.ref_max_offset,
            test_refs,
        );
        let sample = load_sample(ds, frames, &index, i, &refs, cfg, false)?;
        let clip = sample.clip.unsqueeze(0).to_device(device);
        let (_, dets) = net.detect(&clip)?;
        let det = &dets[0];
        let (h, w) = sample.original;
        let size = (clip.size()[3] as f64, clip.size()[4] as f64);
        let (sy, sx) = (h as f64 / size.0, w as f64 / size.1);
        let boxes: Vec<f32> = Vec::try_from(det.boxes.reshape([-1])).unwrap_or_default();
        let scores: Vec<f32> = Vec::try_from(&det.scores).unwrap_or_default();
        let labels: Vec<i64> = Vec::try_from(&det.labels).unwrap_or_default();
        let predicted = (0..scores.len())
            .map(|j| ScoredBox {
                label: labels[j],
                score: scores[j] as f64,
                xyxy: [
                    boxes[4 * j] as f64 * sx,
                    boxes[4 * j + 1] as f64 * sy,
                    boxes[4 * j + 2] as f64 * sx,
                    boxes[4 * j + 3] as f64 * sy,
                ],
            })
            .collect();
        let truth = f
            .annotation
            .boxes
            .iter()
            .map(|b| ScoredBox {
                label: b.class.id(),
                score: 1.0,
                xyxy: [b.xmin, b.ymin, b.xmax, b.ymax],
            })
            .collect();
        all.push(FrameBoxes { truth, predicted });
    }
    Ok((
        score(&all, net.config().num_classes, cfg.score_threshold),
        all,
    ))
}
