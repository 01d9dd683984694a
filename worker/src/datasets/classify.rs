//! The clip pipeline of video classification fine-tuning, following the published
//! `eval_finetune.py` with its UCF101-style dataset (`datasets/ucf101.py`), the PyAV path of
//! `datasets/decoder.py`, `datasets/data_utils.py` (`tensor_normalize`, `spatial_sampling`) and
//! `datasets/transform.py`, under the config `models/configs/Kinetics/TimeSformer_divST_8x32_224.yaml`
//! (`NUM_FRAMES 8`, `SAMPLING_RATE 32`, `TRAIN_JITTER_SCALES [256, 320]`, crop 224,
//! `TARGET_FPS 30`, mean 0.45, std 0.225). Every size comes from [`FinetuneConfig`].
//!
//! **Frames** ([`temporal_indices`]). A window covers `window · fps / 30` frames of the video
//! (256 at 30 fps: `SAMPLING_RATE · NUM_FRAMES / TARGET_FPS · fps`). Its start `s` is uniform
//! in `[0, max(N − window, 0)]` in training and 0 in evaluation. The reference decodes the
//! frames from presentation time `s` on, i.e. from frame `f0 = ⌈s⌉` (its timestamps are
//! truncated to the stream's time base first, which moves `f0` down by one only when `s` lies
//! within one time-base tick above an integer), and takes
//! `⌊linspace(0, window − 1, T)⌋` (float32, truncated) of those, clamped to the last decoded
//! frame: frame `min(f0 + offset, N − 1)`. For 256 at 30 fps the offsets are
//! `0, 36, 72, 109, 145, 182, 218, 255`. A video shorter than its window has `s = 0` and its
//! last frame repeated (80 frames: `0, 36, 72, 79, 79, 79, 79, 79`).
//!
//! **Pixels** ([`ClipPlan`], [`render`]). Frames are scaled to [0, 1], normalised
//! (`(x − mean) / std`, float32, the reference's order), then resized so that the short side is
//! `S` (the long side `⌊long / short · S⌋`; no resize when the short side already is `S`) with
//! bilinear interpolation (`align_corners = false`, no antialiasing), then cropped to
//! `crop × crop`. Training: `S = round(U(train_short_min, train_short_max))` (half to even),
//! crop offsets `randint(0, side − crop)` (NumPy's exclusive upper end: the last offset is
//! never drawn), horizontal flip with probability ½. Evaluation: `S = test_short`, offsets
//! `⌈(side − crop) / 2⌉` ([`CropAnchor::Centre`]). Output: float32 `(3, T, crop, crop)`.
//!
//! **A note on the published evaluation.** `eval_finetune.py` builds the validation set with
//! `TEST.NUM_SPATIAL_CROPS = 1` and then sets it to 3 before the loader runs, so the dataset's
//! `__getitem__` takes the three-crop branch: short side `TEST_CROP_SIZE` (224 in the yaml) and
//! crop index 0, the *left* (landscape) or *top* (portrait) square. The project's spec and the
//! defaults of [`FinetuneConfig`] describe the intended transform (short side 256, centre
//! crop), which is the default here; [`ClipSampling::test_anchor`] = [`CropAnchor::Start`] with
//! `test_short = crop` reproduces the published run.
//!
//! **Random draws** come from a ChaCha8 stream keyed by (seed, epoch, video index), never from
//! libtorch's generator, so a resumed run draws exactly what an uninterrupted one did. Data
//! threads do not touch libtorch: they fill `Vec<f32>`s; tensors are made on the caller's thread.

mod loader;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::Tensor;

use endofm_shared::FinetuneConfig;

use super::bilinear::{Axis, blend};
use super::media::{Media, MediaInfo};
use crate::data::DrawKey;
use crate::data::views::{Uniform, linspace_indices};
use crate::video::Frames;
use crate::{Error, Result};

pub use loader::{ClassifyBatch, ClassifyEval, ClassifyLoader, eval_shard, iters_per_epoch};

/// The frame rate the window is defined at (the published `DATA.TARGET_FPS`); frame folders,
/// which have no rate, count as this.
pub const TARGET_FPS: f64 = 30.0;

/// Where the evaluation crop sits along the long side (the published `uniform_crop` indices
/// 0, 1, 2); along the short side it is always centred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CropAnchor {
    /// Left (landscape) or top (portrait): index 0.
    Start,
    /// Centre, rounded up: index 1.
    #[default]
    Centre,
    /// Right or bottom: index 2.
    End,
}

/// The sizes and constants of the classification clip pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipSampling {
    /// Frames per clip `T`.
    pub frames: usize,
    /// Window in frames at [`TARGET_FPS`].
    pub window: usize,
    /// Output side.
    pub crop: usize,
    /// Training short side range, inclusive.
    pub train_short: [usize; 2],
    /// Evaluation short side.
    pub test_short: usize,
    /// Normalisation mean (every channel).
    pub mean: f32,
    /// Normalisation standard deviation (every channel).
    pub std: f32,
    /// Where the evaluation crop sits (see the module documentation).
    pub test_anchor: CropAnchor,
}

impl ClipSampling {
    /// The pipeline of `cfg` (centre crop at evaluation).
    pub fn from_config(cfg: &FinetuneConfig) -> Self {
        Self {
            frames: cfg.frames,
            window: cfg.window,
            crop: cfg.crop,
            train_short: [cfg.train_short_min, cfg.train_short_max],
            test_short: cfg.test_short,
            mean: cfg.mean as f32,
            std: cfg.std as f32,
            test_anchor: CropAnchor::Centre,
        }
    }

    /// Checks the sizes.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::Input {
                name: "clip sampling".into(),
                reason,
            })
        };
        if self.frames == 0 || self.window < self.frames {
            return bad(format!(
                "{} frames over a window of {}: need 1 ≤ frames ≤ window",
                self.frames, self.window
            ));
        }
        let [lo, hi] = self.train_short;
        if self.crop == 0 || lo < self.crop || hi < lo || self.test_short < self.crop {
            return bad(format!(
                "crop {} with short sides {lo}..={hi} (train) and {} (test): every short side must be at least the crop",
                self.crop, self.test_short
            ));
        }
        if !(self.std.is_finite() && self.std > 0.0 && self.mean.is_finite()) {
            return bad(format!("mean {} / std {}", self.mean, self.std));
        }
        Ok(())
    }

    /// Frames of the video one window spans: `window · fps / 30` (fps 30 when unknown).
    pub fn window_frames(&self, fps: Option<f64>) -> f64 {
        self.window as f64 * fps.unwrap_or(TARGET_FPS) / TARGET_FPS
    }

    /// Floats of one rendered clip, `3·T·crop²`.
    pub fn clip_len(&self) -> usize {
        3 * self.frames * self.crop * self.crop
    }
}

/// The per-video generator: ChaCha8 keyed by (seed, epoch, video index) with its own stream
/// tag, so that its draws differ from the pre-training views' and are independent of threads.
#[derive(Debug, Clone)]
pub struct ClipRng(ChaCha8Rng);

impl ClipRng {
    /// The generator of video `key.clip` in epoch `key.epoch`.
    pub fn new(key: DrawKey) -> Self {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&key.seed.to_le_bytes());
        seed[8..16].copy_from_slice(&key.epoch.to_le_bytes());
        seed[16..24].copy_from_slice(&key.clip.to_le_bytes());
        seed[24..].copy_from_slice(b"endofmcl");
        Self(ChaCha8Rng::from_seed(seed))
    }
}

impl Uniform for ClipRng {
    fn uniform(&mut self) -> f64 {
        self.0.random::<f64>()
    }
}

/// `⌊linspace(0, span − 1, count)⌋` with torch's float32 arithmetic: offsets of the sampled
/// frames inside a window of `span` frames.
pub fn window_offsets(span: f64, count: usize) -> Vec<usize> {
    let end = span - 1.0;
    if end.fract() == 0.0 && end >= 0.0 {
        // Exact in integers (what torch's float32 linspace lands on, see `linspace_indices`).
        let end = end as i64;
        return linspace_indices(0, end, count, end as usize + 1);
    }
    let end = end as f32;
    if count == 1 {
        return vec![0];
    }
    let step = end / (count - 1) as f32;
    let half = count / 2;
    (0..count)
        .map(|i| {
            let v = if i < half {
                step * i as f32
            } else {
                end - step * (count - 1 - i) as f32
            };
            v.max(0.0) as usize
        })
        .collect()
}

/// The `count` frame indices of a window of `span` frames starting at time `start` (in frames)
/// in a video of `n` frames: `min(⌈start⌉ + offset, n − 1)` (see the module documentation).
pub fn temporal_indices(n: usize, span: f64, count: usize, start: f64) -> Vec<usize> {
    let first = start.max(0.0).ceil() as usize;
    let last = n.saturating_sub(1);
    window_offsets(span, count)
        .into_iter()
        .map(|o| (first + o).min(last))
        .collect()
}

/// Size after resizing the short side to `short` (the published
/// `random_short_side_scale_jitter`): `[height, width]`.
pub fn short_side_size(height: usize, width: usize, short: usize) -> [usize; 2] {
    if (width <= height && width == short) || (height <= width && height == short) {
        [height, width]
    } else if width < height {
        [
            (height as f64 / width as f64 * short as f64).floor() as usize,
            short,
        ]
    } else {
        [
            short,
            (width as f64 / height as f64 * short as f64).floor() as usize,
        ]
    }
}

/// Everything one clip needs: which frames, how to resize, where to crop, whether to flip.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipPlan {
    /// Source frame indices, `T` of them, ascending (repeats at the end of short videos).
    pub frames: Vec<usize>,
    /// Source frame `[height, width]`.
    pub source: [usize; 2],
    /// `[height, width]` after the short-side resize.
    pub resized: [usize; 2],
    /// First row of the crop in the resized frame.
    pub top: usize,
    /// First column of the crop in the resized frame.
    pub left: usize,
    /// Horizontal flip of the crop.
    pub flip: bool,
}

impl ClipPlan {
    /// The training draw: random window start, short side, crop position and flip, drawn in
    /// that order from `draws`.
    pub fn train(s: &ClipSampling, info: &MediaInfo, draws: &mut impl Uniform) -> Result<Self> {
        check_info(info)?;
        let span = s.window_frames(info.fps);
        let delta = (info.frames as f64 - span).max(0.0);
        let start = draws.between(0.0, delta);
        let [lo, hi] = s.train_short;
        let short = draws.between(lo as f64, hi as f64).round_ties_even() as usize;
        let resized = short_side_size(info.height, info.width, short);
        let top = draws.below(resized[0].saturating_sub(s.crop));
        let left = draws.below(resized[1].saturating_sub(s.crop));
        let flip = draws.uniform() < 0.5;
        Ok(Self {
            frames: temporal_indices(info.frames, span, s.frames, start),
            source: [info.height, info.width],
            resized,
            top,
            left,
            flip,
        })
    }

    /// The deterministic evaluation plan of the window starting at frame time `start` (0 for
    /// the published evaluation; later windows for prediction).
    pub fn test(s: &ClipSampling, info: &MediaInfo, start: f64) -> Result<Self> {
        check_info(info)?;
        let span = s.window_frames(info.fps);
        let resized = short_side_size(info.height, info.width, s.test_short);
        let [h, w] = resized;
        let (mut top, mut left) = ((h - s.crop).div_ceil(2), (w - s.crop).div_ceil(2));
        match (s.test_anchor, h > w) {
            (CropAnchor::Centre, _) => {}
            (CropAnchor::Start, true) => top = 0,
            (CropAnchor::Start, false) => left = 0,
            (CropAnchor::End, true) => top = h - s.crop,
            (CropAnchor::End, false) => left = w - s.crop,
        }
        Ok(Self {
            frames: temporal_indices(info.frames, span, s.frames, start),
            source: [info.height, info.width],
            resized,
            top,
            left,
            flip: false,
        })
    }
}

fn check_info(info: &MediaInfo) -> Result<()> {
    if info.frames == 0 || info.height == 0 || info.width == 0 {
        return Err(Error::Input {
            name: "video".into(),
            reason: format!(
                "{} frames of {}×{}: nothing to sample",
                info.frames, info.width, info.height
            ),
        });
    }
    Ok(())
}

/// The float32 value of each byte after `/255`, `− mean`, `/ std` (the reference's order).
fn normalisation_table(mean: f32, std: f32) -> [f32; 256] {
    std::array::from_fn(|v| (v as f32 / 255.0 - mean) / std)
}

/// Renders the decoded frames of `plan` (in `plan.frames` order) into `out` as a
/// `(3, T, crop, crop)` float32 array (row-major), reusing its allocation.
pub fn render(
    s: &ClipSampling,
    plan: &ClipPlan,
    frames: &Frames,
    out: &mut Vec<f32>,
) -> Result<()> {
    if frames.t != plan.frames.len() || [frames.h, frames.w] != plan.source {
        return Err(Error::Input {
            name: "frames".into(),
            reason: format!(
                "{} frames of {}×{} for a plan of {} frames of {}×{}",
                frames.t,
                frames.w,
                frames.h,
                plan.frames.len(),
                plan.source[1],
                plan.source[0]
            ),
        });
    }
    let slices: Vec<&[u8]> = (0..frames.t).map(|i| frames.frame(i)).collect();
    render_frames(s, plan, &slices, out);
    Ok(())
}

/// [`render`] over frame slices of the plan's source size (checked by the callers).
fn render_frames(s: &ClipSampling, plan: &ClipPlan, frames: &[&[u8]], out: &mut Vec<f32>) {
    let crop = s.crop;
    let t_len = frames.len();
    let [h, w] = plan.source;
    let lut = normalisation_table(s.mean, s.std);
    let rows = Axis::new(h, plan.resized[0], plan.top, crop);
    let cols = Axis::new(w, plan.resized[1], plan.left, crop);
    out.clear();
    out.resize(3 * t_len * crop * crop, 0.0);
    let plane = crop * crop;
    for (t, frame) in frames.iter().enumerate() {
        for y in 0..crop {
            let [r0, r1] = rows.index[y];
            let hy = rows.weight[y];
            let top = &frame[r0 * w * 3..(r0 + 1) * w * 3];
            let bottom = &frame[r1 * w * 3..(r1 + 1) * w * 3];
            for x in 0..crop {
                let cx = if plan.flip { crop - 1 - x } else { x };
                let [c0, c1] = cols.index[cx];
                let wx = cols.weight[cx];
                for c in 0..3 {
                    let v = blend(
                        [lut[top[c0 * 3 + c] as usize], lut[top[c1 * 3 + c] as usize]],
                        [
                            lut[bottom[c0 * 3 + c] as usize],
                            lut[bottom[c1 * 3 + c] as usize],
                        ],
                        wx,
                        hy,
                    );
                    out[(c * t_len + t) * plane + y * crop + x] = v;
                }
            }
        }
    }
}

/// Wraps rendered clips as a tensor: `data` holds `n` clips of `(3, T, crop, crop)`; the result
/// is `(n, 3, T, crop, crop)` float32.
pub fn clips_tensor(data: &[f32], n: usize, s: &ClipSampling) -> Result<Tensor> {
    let shape = [n as i64, 3, s.frames as i64, s.crop as i64, s.crop as i64];
    if data.len() != n * s.clip_len() {
        return Err(Error::Input {
            name: "clips".into(),
            reason: format!("{} floats for shape {shape:?}", data.len()),
        });
    }
    Ok(Tensor::f_from_slice(data)?.f_view(shape)?)
}

/// The evaluation clips of every window of one video, for prediction.
#[derive(Debug)]
pub struct WindowClips {
    /// The video.
    pub uri: String,
    /// Its frame count.
    pub frames: usize,
    /// Its frame rate (`None`: a frame folder, counted as [`TARGET_FPS`]).
    pub fps: Option<f64>,
    /// Frames one window spans (`window · fps / 30`, rounded).
    pub span: usize,
    /// First frame of each window (`⌈k · span⌉` with the unrounded span).
    pub starts: Vec<usize>,
    /// The frames each window samples.
    pub indices: Vec<Vec<usize>>,
    /// `(windows, 3, T, crop, crop)` float32, each window rendered like the evaluation transform.
    pub clips: Tensor,
}

/// All windows of one video (a path or object-store URI; a file is a video, a folder holds
/// frames): consecutive windows of `window · fps / 30` frames from frame 0 while a window
/// starts inside the video, each sampled like the evaluation transform (the last one, when
/// partial, repeats the video's last frame). The frames of all windows are decoded once.
pub fn predict_windows(uri: &str, cfg: &FinetuneConfig) -> Result<WindowClips> {
    let s = ClipSampling::from_config(cfg);
    s.validate()?;
    let mut media = Media::open_uri(uri)?;
    let info = media.info();
    let wrap = |e: Error| match e {
        e @ (Error::ClipDecode { .. } | Error::Storage { .. } | Error::Io { .. }) => e,
        e => Error::ClipDecode {
            uri: uri.to_string(),
            reason: e.to_string(),
        },
    };
    let span = s.window_frames(info.fps);
    let mut plans = Vec::new();
    let mut starts = Vec::new();
    for k in 0.. {
        let start = k as f64 * span;
        let first = start.ceil() as usize;
        if first >= info.frames.max(1) {
            break;
        }
        plans.push(ClipPlan::test(&s, &info, start).map_err(wrap)?);
        starts.push(first);
    }
    let mut needed: Vec<usize> = plans
        .iter()
        .flat_map(|p| p.frames.iter().copied())
        .collect();
    needed.sort_unstable();
    needed.dedup();
    let mut frames = Frames::default();
    media.decode_into(&needed, &mut frames)?;
    let mut data = Vec::with_capacity(plans.len() * s.clip_len());
    let mut one = Vec::new();
    for plan in &plans {
        let slices: Vec<&[u8]> = plan
            .frames
            .iter()
            .map(|f| frames.frame(needed.partition_point(|&n| n < *f)))
            .collect();
        render_frames(&s, plan, &slices, &mut one);
        data.extend_from_slice(&one);
    }
    tracing::debug!(
        uri,
        windows = plans.len(),
        frames = info.frames,
        "prediction windows"
    );
    Ok(WindowClips {
        uri: media.uri().to_string(),
        frames: info.frames,
        fps: info.fps,
        span: span.round() as usize,
        starts,
        indices: plans.into_iter().map(|p| p.frames).collect(),
        clips: clips_tensor(&data, data.len() / s.clip_len().max(1), &s)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uniform draws given by hand.
    struct Fixed(Vec<f64>);
    impl Uniform for Fixed {
        fn uniform(&mut self) -> f64 {
            self.0.remove(0)
        }
    }

    fn sampling() -> ClipSampling {
        ClipSampling::from_config(&FinetuneConfig::default())
    }

    fn info(frames: usize, fps: Option<f64>, height: usize, width: usize) -> MediaInfo {
        MediaInfo {
            frames,
            fps,
            height,
            width,
        }
    }

    #[test]
    fn frame_indices_follow_the_published_sampling() {
        // 8 frames over 256 at 30 fps: ⌊linspace(0, 255, 8)⌋.
        let offsets = [0, 36, 72, 109, 145, 182, 218, 255];
        assert_eq!(window_offsets(256.0, 8), offsets);
        assert_eq!(temporal_indices(1000, 256.0, 8, 0.0), offsets);
        // A random start of 10.3 decodes from frame 11.
        let shifted: Vec<usize> = offsets.iter().map(|o| o + 11).collect();
        assert_eq!(temporal_indices(1000, 256.0, 8, 10.3), shifted);
        assert_eq!(temporal_indices(1000, 256.0, 8, 11.0), shifted);
        // Shorter than the window: the last frame repeats.
        assert_eq!(
            temporal_indices(80, 256.0, 8, 0.0),
            [0, 36, 72, 79, 79, 79, 79, 79]
        );
        assert_eq!(temporal_indices(1, 256.0, 8, 0.0), [0; 8]);
        // 25 fps: the window spans 256·25/30 = 213.33 frames.
        let s = sampling();
        assert!((s.window_frames(Some(25.0)) - 213.333_333).abs() < 1e-5);
        assert_eq!(
            window_offsets(s.window_frames(Some(25.0)), 8),
            [0, 30, 60, 91, 121, 151, 182, 212]
        );
        assert_eq!(window_offsets(16.0, 8), [0, 2, 4, 6, 8, 10, 12, 15]);
        assert_eq!(window_offsets(8.0, 1), [0]);
    }

    #[test]
    fn window_offsets_equal_torch_linspace() {
        for span in [256.0, 213.333_333_333_333_34, 96.0, 7.5, 64.0, 300.1] {
            for count in [1, 2, 4, 8, 16] {
                let want = Tensor::linspace(
                    0.0,
                    span - 1.0,
                    count as i64,
                    (tch::Kind::Float, tch::Device::Cpu),
                )
                .clamp_min(0.0)
                .to_kind(tch::Kind::Int64);
                let want: Vec<i64> = Vec::try_from(want).expect("ints");
                let got: Vec<i64> = window_offsets(span, count)
                    .iter()
                    .map(|&v| v as i64)
                    .collect();
                assert_eq!(got, want, "span {span}, count {count}");
            }
        }
    }

    #[test]
    fn training_plan_draws_start_scale_crop_and_flip() {
        let s = sampling();
        let video = info(600, Some(30.0), 288, 384);
        // start = 0.5·(600 − 256) = 172 → frames from 172; short side round(256 + 0.25·64) = 272
        // → 272×362; top ⌊0.5·48⌋ = 24, left ⌊0.999·138⌋ = 137; flip (0.2 < 0.5).
        let plan = ClipPlan::train(&s, &video, &mut Fixed(vec![0.5, 0.25, 0.5, 0.999, 0.2]))
            .expect("plan");
        assert_eq!(plan.frames, [172, 208, 244, 281, 317, 354, 390, 427]);
        assert_eq!(plan.resized, [272, 362]);
        assert_eq!((plan.top, plan.left, plan.flip), (24, 137, true));
        // Half-to-even rounding of the short side: 256 + 0.5 → 256 (and 257.5 → 258).
        let plan = ClipPlan::train(&s, &video, &mut Fixed(vec![0.0, 0.5 / 64.0, 0.0, 0.0, 0.9]))
            .expect("plan");
        assert_eq!((plan.resized, plan.flip), ([256, 341], false));
        let plan = ClipPlan::train(&s, &video, &mut Fixed(vec![0.0, 1.5 / 64.0, 0.0, 0.0, 0.9]))
            .expect("plan");
        assert_eq!(plan.resized, [258, 344]);
        // Portrait: the width is the short side.
        assert_eq!(short_side_size(400, 300, 256), [341, 256]);
        assert_eq!(short_side_size(256, 300, 256), [256, 300]);
        assert_eq!(short_side_size(300, 300, 256), [256, 256]);
    }

    #[test]
    fn test_plan_is_centred_or_anchored() {
        let mut s = sampling();
        let video = info(100, Some(30.0), 288, 384);
        let plan = ClipPlan::test(&s, &video, 0.0).expect("plan");
        // 288×384 → 256×341; centre offsets ⌈32/2⌉ = 16, ⌈117/2⌉ = 59.
        assert_eq!(
            (plan.resized, plan.top, plan.left, plan.flip),
            ([256, 341], 16, 59, false)
        );
        assert_eq!(plan.frames, [0, 36, 72, 99, 99, 99, 99, 99]);
        s.test_anchor = CropAnchor::Start;
        s.test_short = 224;
        let plan = ClipPlan::test(&s, &video, 0.0).expect("plan");
        assert_eq!((plan.resized, plan.top, plan.left), ([224, 298], 0, 0));
        s.test_anchor = CropAnchor::End;
        let plan = ClipPlan::test(&s, &info(10, None, 400, 300), 0.0).expect("plan");
        assert_eq!((plan.resized, plan.top, plan.left), ([298, 224], 74, 0));
        assert!(ClipPlan::test(&s, &info(0, None, 10, 10), 0.0).is_err());
    }

    /// The published transform on whole tensors with libtorch: normalise, bilinear resize,
    /// crop, flip, channels first.
    fn reference(s: &ClipSampling, plan: &ClipPlan, frames: &Frames) -> Tensor {
        let (t, h, w) = (frames.t as i64, frames.h as i64, frames.w as i64);
        let x = Tensor::from_slice(&frames.data)
            .reshape([t, h, w, 3])
            .to_kind(tch::Kind::Float)
            / 255.0;
        let x = (x - f64::from(s.mean)) / f64::from(s.std);
        let x = x.permute([3, 0, 1, 2]);
        let [rh, rw] = plan.resized;
        let x = x.upsample_bilinear2d([rh as i64, rw as i64], false, None, None);
        let c = s.crop as i64;
        let x = x
            .narrow(2, plan.top as i64, c)
            .narrow(3, plan.left as i64, c);
        if plan.flip { x.flip([-1]) } else { x }
    }

    #[test]
    fn render_matches_the_whole_tensor_reference() {
        let mut s = sampling();
        s.crop = 24;
        s.train_short = [28, 36];
        s.test_short = 28;
        s.frames = 3;
        s.window = 6;
        let frames = crate::data::synthetic_clip(crate::data::ClipShape {
            frames: 3,
            height: 30,
            width: 44,
        })
        .expect("clip");
        let video = info(3, None, 30, 44);
        let plans = [
            ClipPlan::test(&s, &video, 0.0).expect("plan"),
            ClipPlan::train(&s, &video, &mut Fixed(vec![0.0, 0.9, 0.3, 0.6, 0.1])).expect("plan"),
            ClipPlan::train(&s, &video, &mut Fixed(vec![0.0, 0.0, 0.7, 0.2, 0.9])).expect("plan"),
        ];
        for plan in plans {
            let mut out = Vec::new();
            let decoded = Frames::from_vec(3, 30, 44, frames.data.clone()).expect("frames");
            render(&s, &plan, &decoded, &mut out).expect("render");
            let got = clips_tensor(&out, 1, &s).expect("tensor").squeeze_dim(0);
            let want = reference(&s, &plan, &decoded);
            let worst = (&got - &want).abs().max().double_value(&[]);
            assert!(worst < 1e-5, "{plan:?}: worst {worst:e}");
        }
        let plan = ClipPlan::test(&s, &video, 0.0).expect("plan");
        let wrong = Frames::new(2, 30, 44);
        assert!(render(&s, &plan, &wrong, &mut Vec::new()).is_err());
    }

    #[test]
    fn sampling_is_validated() {
        let mut s = sampling();
        s.validate().expect("defaults");
        s.window = 4;
        assert!(s.validate().is_err());
        let mut s = sampling();
        s.test_short = 100;
        assert!(s.validate().is_err());
    }
}
