//! Fine-tuning the STFT-FCOS detector ([`crate::model::Detector`]) as the published KUMC
//! training does it (`STFT/tools/train_net.py`, `stft_core/engine/trainer.py`,
//! `stft_core/solver/build.py`): SGD with momentum over every parameter that receives a
//! gradient, biases at `bias_lr_factor` × the learning rate and `weight_decay_bias`, linear
//! warm-up then step decay ([`FinetuneConfig::warmup_step_lr`]); one step = the ViT on each sample's
//! clip (current frame + references), the five losses summed, backward, gradients averaged over
//! the ranks (the loss normalisers are the ranks' mean counts, as the published `reduce_sum`),
//! the update.
//!
//! Also here: the published input size ([`input_size`]) and reference-frame draw
//! ([`reference_frames`]), and the scores ([`metrics`]: the paper's image-level F1 and box-level
//! P/R/F1, AP50, AP50:95).

pub mod data;
pub mod metrics;
pub mod predict;
pub mod run;

use rand::Rng;
use tch::{Kind, Tensor};

use endofm_shared::FinetuneConfig;

use crate::Result;
use crate::collective::Collective;
use crate::finetune::sgd::Sgd;
use crate::model::Detector;
use crate::model::detector::{Targets, loss};
use crate::precision::{Precision, with_precision};

/// The two parameter groups of the published optimiser.
#[derive(Debug)]
pub struct DetectOptimizer {
    /// Weights (`weight_decay`, base learning rate).
    pub weights: Sgd,
    /// Biases (`weight_decay_bias`, `bias_lr_factor` × the learning rate).
    pub biases: Sgd,
    bias_lr_factor: f64,
}

impl DetectOptimizer {
    /// Every trainable parameter of `net` that receives a gradient (not the unused `fpn1`
    /// branch, not the offset convolutions, whose gradient the published code never computes),
    /// in key order; a parameter is a bias when its key contains `bias` (the published rule).
    pub fn new(net: &Detector, cfg: &FinetuneConfig) -> Self {
        let mut params: Vec<(String, Tensor)> = net
            .var_store()
            .variables()
            .into_iter()
            .filter(|(k, t)| t.requires_grad() && !Detector::is_gradient_free(k))
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let (biases, weights): (Vec<_>, Vec<_>) =
            params.into_iter().partition(|(k, _)| k.contains("bias"));
        Self {
            weights: Sgd::new(weights, cfg.momentum, cfg.weight_decay),
            biases: Sgd::new(biases, cfg.momentum, cfg.weight_decay_bias),
            bias_lr_factor: cfg.bias_lr_factor,
        }
    }

    /// Averages the gradients over the ranks.
    pub fn all_reduce_grads(&mut self, collective: &mut dyn Collective) -> Result<()> {
        self.weights.all_reduce_grads(collective)?;
        self.biases.all_reduce_grads(collective)
    }

    /// One update at learning rate `lr` (biases at `bias_lr_factor · lr`).
    pub fn step(&mut self, lr: f64) {
        self.weights.step(lr);
        self.biases.step(lr * self.bias_lr_factor);
    }

    /// Updates done.
    pub fn steps(&self) -> u64 {
        self.weights.steps
    }

    /// Host copies of both groups' momentum buffers (`momentum_buffer.<key>`).
    pub fn state(&self) -> std::collections::BTreeMap<String, Tensor> {
        let mut state = self.weights.state();
        state.extend(self.biases.state());
        state
    }

    /// Restores both groups from [`DetectOptimizer::state`]'s tensors (`origin` names the
    /// file in errors); `steps` updates were done.
    pub fn load_state(
        &mut self,
        state: &std::collections::BTreeMap<String, Tensor>,
        origin: &std::path::Path,
        steps: u64,
    ) -> Result<()> {
        self.weights.load_state(state, origin, steps)?;
        self.biases.load_state(state, origin, steps)
    }
}

/// The loss terms of one step (this rank's, normalised by the all-rank counts).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct StepLosses {
    /// `[loss_cls, loss_reg, loss_centerness, loss_stft_cls, loss_stft_reg]`.
    pub terms: [f64; 5],
    /// Their sum.
    pub total: f64,
}

/// One training step: `clips` (B, 3, T, H, W) on the model's device (frame 0 of each sample
/// the current frame), one [`Targets`] per sample in pixels of the clip; drop-path masks from
/// `seed`.
pub fn train_step(
    net: &Detector,
    opt: &mut DetectOptimizer,
    precision: Precision,
    (clips, targets): (&Tensor, &[Targets]),
    seed: u64,
    lr: f64,
    collective: &mut dyn Collective,
) -> Result<StepLosses> {
    net.check_input("clip", clips)?;
    let device = net.device();
    let frames = clips.size()[2];
    let cfg = net.config();
    let losses = crate::model::timesformer::with_drop_path_seed(seed, || {
        with_precision(precision, device, || -> Result<_> {
            let out = net.head(&net.features_clip(clips, true), frames)?;
            let pre = Tensor::cat(&out.pre_bbox, 1).to_kind(Kind::Float);
            let gt = loss::ground_truth(cfg, &out.locations, targets, &pre)?;
            let counts = loss::local_counts(cfg, &gt);
            // Float32 on the model's device, as every collective takes; the counts are whole
            // numbers far below 2^24, exact in float32.
            let mut buffer = Tensor::from_slice(&counts.map(|c| c as f32)).to_device(device);
            collective.all_reduce_sum(&mut buffer)?;
            let sums: Vec<f64> =
                Vec::try_from(buffer.to_device(tch::Device::Cpu).to_kind(Kind::Double))?;
            let norm = loss::Normalisers::from_reduced(
                [sums[0], sums[1], sums[2]],
                collective.world_size(),
            );
            // The losses in float32 whatever the autocast precision of the network.
            let out = out.to_float();
            Ok(loss::losses(cfg, &out, &gt, norm))
        })
    })??;
    let total = losses.total();
    total.backward();
    opt.all_reduce_grads(collective)?;
    opt.step(lr);
    let terms = losses.terms().map(|t| t.double_value(&[]));
    Ok(StepLosses {
        terms,
        total: total.double_value(&[]),
    })
}

/// The network input size (height, width) for a frame of `height × width` pixels: the
/// published `Resize.get_size` returns `(max_size, max_size)` whatever the frame (a square),
/// which `cfg.square_resize` keeps; otherwise the short side goes to `min_size` with the long
/// side at most `max_size` (the published `get_size_`). Either way rounded down to a multiple
/// of `size_divisor` (at least one).
pub fn input_size(cfg: &FinetuneConfig, height: usize, width: usize) -> (usize, usize) {
    let d = cfg.size_divisor.max(1);
    let round = |v: usize| (v / d).max(1) * d;
    if cfg.square_resize {
        return (round(cfg.max_size), round(cfg.max_size));
    }
    let (short, long) = (height.min(width) as f64, height.max(width) as f64);
    let mut size = cfg.min_size as f64;
    if long / short * size > cfg.max_size as f64 {
        size = (cfg.max_size as f64 * short / long).round();
    }
    let (oh, ow) = if width < height {
        (size * height as f64 / width as f64, size)
    } else {
        (size, size * width as f64 / height as f64)
    };
    (round(oh as usize), round(ow as usize))
}

/// The reference frames of frame `k` (1-based) of a video of `n` frames in training: one drawn
/// from the `max_offset` frames before and one from the `max_offset` after (the published
/// `cvcvid_stft.py` draws offsets in `[-max_offset, -1]` and `[1, max_offset]`), clamped to the
/// video.
pub fn reference_frames(rng: &mut impl Rng, k: usize, n: usize, max_offset: usize) -> [usize; 2] {
    let m = max_offset.max(1);
    let before = rng.random_range(1..=m);
    let after = rng.random_range(1..=m);
    [k.saturating_sub(before).max(1), (k + after).min(n.max(1))]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn published_resize_is_square_and_the_aspect_variant_keeps_the_shape() {
        let cfg = FinetuneConfig::for_task(endofm_shared::TaskKind::Detect);
        assert_eq!(input_size(&cfg, 1080, 1350), (640, 640));
        let aspect = FinetuneConfig {
            square_resize: false,
            ..FinetuneConfig::for_task(endofm_shared::TaskKind::Detect)
        };
        // Short side 600 would make the long side 750 > 640: short side 512 (rounded to 32).
        assert_eq!(input_size(&aspect, 1080, 1350), (512, 640));
        assert_eq!(input_size(&aspect, 600, 600), (576, 576));
    }

    #[test]
    fn references_are_before_and_after_within_the_video() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let [a, b] = reference_frames(&mut rng, 5, 12, 9);
            assert!((1..5).contains(&a) && (6..=12).contains(&b), "{a} {b}");
        }
        assert_eq!(reference_frames(&mut rng, 1, 1, 9), [1, 1]);
    }
}
