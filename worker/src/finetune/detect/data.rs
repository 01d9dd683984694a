//! KUMC frames into detector inputs: training batches ([`TrainLoader`]) and one frame's
//! detections at test ([`predict_frame`]).
//!
//! A sample is the current frame and its reference frames of the same video
//! (`cvcvid_stft.py`): in training one from 1–[`FinetuneConfig::ref_max_offset`] frames before and
//! one from as many after ([`super::reference_frames`]); at test, as the published
//! `_forward_test`, half of `test_refs` drawn without replacement from the `ref_max_offset`
//! frames before and half from those after, clamped to the video (the published buffer repeats
//! the first frame before the start and the last after the end). Each frame is resized to the
//! network size ([`super::input_size`]; bilinear on the tensor, where the published code
//! resizes the PIL image), turned into the published input (`BGR·255 − PIXEL_MEAN`, std 1), and
//! the current frame's boxes are scaled alike; a horizontal flip mirrors boxes the published
//! way (`x1' = W − x2 − 1`). Every frame's draws (references, flip) come from its own
//! generator stream keyed by the seed, the epoch and the frame ([`item_rng`]), so ranks, thread
//! counts and resumed runs all see the same samples.

use std::collections::HashMap;

use rand::Rng;
use tch::{Kind, Tensor};

use endofm_shared::FinetuneConfig;

use super::metrics::ScoredBox;
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
    Ok(input_from_rgb(
        &pixels.data,
        (pixels.h, pixels.w),
        size,
        flip,
    ))
}

/// RGB pixels (`height × width × 3`) as the published input at `size` (height, width):
/// resized (bilinear), BGR·255 − [`PIXEL_MEAN_BGR`], (3, H, W) float32, mirrored when `flip`.
pub fn input_from_rgb(
    rgb: &[u8],
    (h, w): (usize, usize),
    size: (usize, usize),
    flip: bool,
) -> Tensor {
    let t = Tensor::from_slice(rgb)
        .view([h as i64, w as i64, 3])
        .permute([2, 0, 1])
        .to_kind(Kind::Float)
        .flip([0]) // RGB → BGR
        .unsqueeze(0)
        .upsample_bilinear2d([size.0 as i64, size.1 as i64], false, None, None)
        .squeeze_dim(0);
    let mean = Tensor::from_slice(&PIXEL_MEAN_BGR.map(|v| v as f32)).view([3, 1, 1]);
    let t = t - mean;
    if flip { t.flip([2]) } else { t }
}

/// Builds the sample of `frames[i]` with reference frame numbers `refs`.
pub fn load_sample(
    ds: &Kumc,
    frames: &[KumcFrame],
    index: &HashMap<(&str, usize), usize>,
    i: usize,
    refs: &[usize],
    cfg: &FinetuneConfig,
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

/// The true boxes of a frame, in its own pixels.
pub fn truth_of(frame: &KumcFrame) -> Vec<ScoredBox> {
    frame
        .annotation
        .boxes
        .iter()
        .map(|b| ScoredBox {
            label: b.class.id(),
            score: 1.0,
            xyxy: [b.xmin, b.ymin, b.xmax, b.ymax],
        })
        .collect()
}

/// A generator for the draws of item `index` under `seed` (its own stream, so every rank and
/// every resumed run draws the same for the same item).
pub fn item_rng(seed: u64, salt: u64, index: usize) -> rand_chacha::ChaCha8Rng {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ salt);
    rng.set_stream(index as u64);
    rng
}

/// Salt of test-time reference draws.
pub const TEST_SALT: u64 = 0x7E57_4EF5;

/// The detections of `net` on `frames[i]` (test-time references drawn from `seed` and `i`),
/// in the frame's own pixels.
///
/// Errors: a frame that cannot be read (named).
pub fn predict_frame(
    net: &Detector,
    ds: &Kumc,
    frames: &[KumcFrame],
    index: &HashMap<(&str, usize), usize>,
    i: usize,
    cfg: &FinetuneConfig,
    seed: u64,
) -> Result<Vec<ScoredBox>> {
    let f = &frames[i];
    let mut rng = item_rng(seed, TEST_SALT, i);
    let refs = test_references(
        &mut rng,
        f.number,
        f.video_frames,
        cfg.ref_max_offset,
        cfg.test_refs,
    );
    let sample = load_sample(ds, frames, index, i, &refs, cfg, false)?;
    let clip = sample.clip.unsqueeze(0).to_device(net.device());
    let (_, dets) = net.detect(&clip)?;
    let size = (clip.size()[3] as f64, clip.size()[4] as f64);
    Ok(scaled_boxes(&dets[0], size, sample.original))
}

/// Detections at the network's input size `from` (height, width) as boxes in a frame of
/// `to` = (height, width) pixels.
pub fn scaled_boxes(
    det: &crate::model::detector::Detections,
    from: (f64, f64),
    to: (usize, usize),
) -> Vec<ScoredBox> {
    let (sy, sx) = (to.0 as f64 / from.0, to.1 as f64 / from.1);
    let boxes: Vec<f32> = Vec::try_from(det.boxes.reshape([-1])).unwrap_or_default();
    let scores: Vec<f32> = Vec::try_from(&det.scores).unwrap_or_default();
    let labels: Vec<i64> = Vec::try_from(&det.labels).unwrap_or_default();
    (0..scores.len().min(labels.len()).min(boxes.len() / 4))
        .map(|j| ScoredBox {
            label: labels[j],
            score: f64::from(scores[j]),
            xyxy: [
                f64::from(boxes[4 * j]) * sx,
                f64::from(boxes[4 * j + 1]) * sy,
                f64::from(boxes[4 * j + 2]) * sx,
                f64::from(boxes[4 * j + 3]) * sy,
            ],
        })
        .collect()
}

/// Salt of training draws (references and flip).
const TRAIN_SALT: u64 = 0x7EA1_4DE7;

/// Steps per epoch: each step takes `batch` frames per rank; the remainder of a split that
/// does not fill every rank's batch is dropped (like `DistributedSampler(drop_last=True)`).
pub fn iters_per_epoch(frames: usize, batch: usize, world: usize) -> usize {
    frames / (batch * world).max(1)
}

/// One training batch of a rank.
#[derive(Debug)]
pub struct TrainBatch {
    /// (B, 3, T, H, W) float32, frame 0 of each sample the current frame.
    pub clips: Tensor,
    /// The current frames' boxes.
    pub targets: Vec<Targets>,
    /// Seconds the consumer waited for it.
    pub wait_s: f64,
}

/// Training batches for one rank from global step `first` on, prefetched in order by
/// background threads. Step `k` of epoch `e` gives rank `r` the frames at positions
/// `(k·world + r)·B … + B` of epoch `e`'s order (a permutation drawn from the seed); each
/// frame's reference frames and flip are drawn from the seed, the epoch and the frame, so a
/// resumed run reads exactly what an uninterrupted one would.
#[derive(Debug)]
pub struct TrainLoader {
    pool: crate::datasets::prefetch::Prefetch<(Tensor, Vec<Targets>)>,
}

impl TrainLoader {
    /// Starts the loader.
    ///
    /// Errors: a training split too small for one batch per rank; at run time, an unreadable
    /// frame (named) or frames of different sizes in one batch under the aspect-keeping
    /// resize.
    pub fn start(
        ds: std::sync::Arc<Kumc>,
        cfg: &FinetuneConfig,
        rank: usize,
        world: usize,
        threads: usize,
        first: usize,
    ) -> Result<Self> {
        let n = ds.split(Split::Train)?.len();
        let batch = cfg.batch_per_rank;
        let ipe = iters_per_epoch(n, batch, world);
        if ipe == 0 {
            return Err(Error::Input {
                name: "train split".into(),
                reason: format!("{n} frames cannot give each of {world} ranks a batch of {batch}"),
            });
        }
        let cfg = cfg.clone();
        let pool = crate::datasets::prefetch::Prefetch::start(
            "det-data",
            threads,
            2,
            (first, None),
            move |step| {
                let (epoch, k) = (step / ipe, step % ipe);
                let frames = ds.split(Split::Train)?;
                let index = frame_index(frames);
                let order = crate::datasets::segment::epoch_order(cfg.seed, epoch, frames.len());
                let mut clips = Vec::with_capacity(batch);
                let mut targets = Vec::with_capacity(batch);
                for b in 0..batch {
                    let i = order[(k * world + rank) * batch + b];
                    let f = &frames[i];
                    let mut rng = item_rng(cfg.seed ^ ((epoch as u64) << 32), TRAIN_SALT, i);
                    let refs = super::reference_frames(
                        &mut rng,
                        f.number,
                        f.video_frames,
                        cfg.ref_max_offset,
                    );
                    let flip = rng.random_bool(cfg.flip_prob);
                    let s = load_sample(&ds, frames, &index, i, &refs, &cfg, flip)?;
                    if let Some(first) = clips.first().map(Tensor::size)
                        && first != s.clip.size()
                    {
                        return Err(Error::Input {
                            name: f.image.clone(),
                            reason: format!(
                                "resized to {:?}, another frame of its batch to {first:?}: with square_resize off, use batch_per_rank 1 or frames of one size",
                                s.clip.size()
                            ),
                        });
                    }
                    clips.push(s.clip);
                    targets.push(s.targets);
                }
                Ok((Tensor::stack(&clips, 0), targets))
            },
        )?;
        Ok(Self { pool })
    }

    /// The next batch (blocks until it is ready).
    pub fn next_batch(&mut self) -> Result<TrainBatch> {
        let t0 = std::time::Instant::now();
        let (clips, targets) = self.pool.take()?;
        Ok(TrainBatch {
            clips,
            targets,
            wait_s: t0.elapsed().as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn item_streams_are_keyed_by_seed_salt_and_item() {
        let draw = |seed, salt, i| item_rng(seed, salt, i).random::<u64>();
        assert_eq!(draw(1, 2, 3), draw(1, 2, 3));
        assert_ne!(draw(1, 2, 3), draw(1, 2, 4));
        assert_ne!(draw(1, 2, 3), draw(1, 5, 3));
        assert_ne!(draw(1, 2, 3), draw(7, 2, 3));
        assert_eq!(iters_per_epoch(10, 2, 2), 2);
        assert_eq!(iters_per_epoch(3, 2, 2), 0);
    }

    #[test]
    fn detections_scale_back_to_the_frame() {
        let det = crate::model::detector::Detections {
            boxes: Tensor::from_slice(&[8.0f32, 16.0, 32.0, 48.0]).view([1, 4]),
            scores: Tensor::from_slice(&[0.75f32]),
            labels: Tensor::from_slice(&[2i64]),
        };
        let b = scaled_boxes(&det, (64.0, 64.0), (128, 80));
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].label, 2);
        assert_eq!(b[0].xyxy, [10.0, 32.0, 40.0, 96.0]);
    }

    #[test]
    fn the_input_is_bgr_minus_the_published_mean_and_flips() {
        // One red pixel row: R=255 at x = 0, black at x = 1.
        let rgb = [255u8, 0, 0, 0, 0, 0];
        let t = input_from_rgb(&rgb, (1, 2), (1, 2), false);
        let v: Vec<f32> = Vec::try_from(t.flatten(0, -1)).unwrap();
        // Channel 2 (R in BGR) at x = 0.
        assert!(
            (v[4] - (255.0 - PIXEL_MEAN_BGR[2] as f32)).abs() < 1e-4,
            "{v:?}"
        );
        assert!((v[0] + PIXEL_MEAN_BGR[0] as f32).abs() < 1e-4);
        let f = input_from_rgb(&rgb, (1, 2), (1, 2), true);
        let w: Vec<f32> = Vec::try_from(f.flatten(0, -1)).unwrap();
        assert!((w[5] - v[4]).abs() < 1e-6);
    }
}
