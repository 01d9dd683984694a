//! `bench finetune-step --task detect`: one complete detector training iteration (the ViT on a
//! clip of the current frame and two references, pyramid, head with the STFT branch, targets,
//! the five losses, backward, SGD update with the bias group) through the step fine-tuning runs
//! ([`crate::finetune::detect::train_step`]), on in-memory frames at the published input size
//! scaled to the preset (`640 · img_size / 224`, a multiple of 32: 640 px for ViT-B), plus the
//! deformable convolution's share of the step: every call a step makes is recorded and replayed
//! alone (forward and backward to its input and weight, as in the step), and the replay time is
//! divided by the median step time.

use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use endofm_shared::{DetectorConfig, FinetuneConfig, ModelConfig, TrainPrecision};

use crate::collective::Solo;
use crate::finetune::classify::resolve_precision;
use crate::finetune::detect::{DetectOptimizer, train_step};
use crate::model::Detector;
use crate::model::detector::Targets;
use crate::model::detector::deform::{deform_conv2d, record_calls};
use crate::precision::Precision;
use crate::{Error, Result};

/// Options of the detection step benchmark.
#[derive(Debug, Clone)]
pub struct DetectStepOptions {
    /// Preset name reported.
    pub preset: String,
    /// Clips (current frame + references) per step.
    pub batch: i64,
    /// Device.
    pub device: Device,
    /// Precision.
    pub precision: TrainPrecision,
    /// Timed steps (after one warm-up step).
    pub steps: usize,
    /// Training settings (optimiser).
    pub cfg: FinetuneConfig,
    /// The network beyond the backbone.
    pub detector: DetectorConfig,
}

/// The deformable convolution's part of a step.
#[derive(Debug, Clone, Serialize)]
pub struct DeformShare {
    /// Calls per step (2 branches × 5 levels).
    pub calls: usize,
    /// Seconds of those calls replayed alone, forward and backward.
    pub seconds: f64,
    /// `seconds / step_s_median`.
    pub share: f64,
}

/// Result of `bench finetune-step --task detect`.
#[derive(Debug, Clone, Serialize)]
pub struct DetectStepResult {
    /// Always "finetune-step".
    pub bench: &'static str,
    /// Always "detect".
    pub task: &'static str,
    /// Preset name.
    pub preset: String,
    /// Clips per step.
    pub batch: i64,
    /// Frames per clip, height and width in pixels.
    pub clip: [i64; 3],
    /// FPN/head channels.
    pub fpn_channels: usize,
    /// Device.
    pub device: String,
    /// libtorch intra-op threads.
    pub threads: i32,
    /// fp32 or bf16.
    pub dtype: &'static str,
    /// Timed steps.
    pub steps: usize,
    /// Median seconds per step.
    pub step_s_median: f64,
    /// Fastest step, seconds.
    pub step_s_min: f64,
    /// Clips per second at the median.
    pub samples_per_s: f64,
    /// The deformable convolution's share of the step.
    pub deform_conv: DeformShare,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mb: f64,
    /// Peak device memory, MiB (not exposed through tch; `null`).
    pub peak_device_mb: Option<f64>,
}

fn sync(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// Runs the benchmark for the backbone `model`.
pub fn detect_step(model: &ModelConfig, opts: &DetectStepOptions) -> Result<DetectStepResult> {
    if opts.steps == 0 || opts.batch < 1 {
        return Err(Error::Input {
            name: "bench finetune-step".into(),
            reason: "needs at least one step and one clip per step".into(),
        });
    }
    let mut model_cfg = model.clone();
    model_cfg.drop_path_rate = opts.cfg.drop_path_rate;
    tch::manual_seed(0);
    let net = Detector::new(&model_cfg, &opts.detector, opts.device)?;
    let mut opt = DetectOptimizer::new(&net, &opts.cfg);
    let precision = resolve_precision(opts.precision, opts.device)?;
    let side = ((640 * model.img_size / 224) / 32).max(1) as i64 * 32;
    let clips = Tensor::randn([opts.batch, 3, 3, side, side], (Kind::Float, opts.device)) * 50.0;
    let s = side as f32;
    let targets: Vec<Targets> = (0..opts.batch)
        .map(|_| Targets {
            boxes: Tensor::from_slice(&[
                0.3 * s,
                0.3 * s,
                0.6 * s,
                0.65 * s,
                0.1 * s,
                0.6 * s,
                0.25 * s,
                0.8 * s,
            ])
            .view([2, 4])
            .to_device(opts.device),
            labels: Tensor::from_slice(&[1i64, 2]).to_device(opts.device),
        })
        .collect();
    let lr = opts.cfg.lr;
    let mut times = Vec::with_capacity(opts.steps);
    let mut calls = Vec::new();
    for step in 0..=opts.steps {
        let started = Instant::now();
        let (result, recorded) = record_calls(|| {
            train_step(
                &net,
                &mut opt,
                precision,
                (&clips, &targets),
                step as u64,
                lr,
                &mut Solo,
            )
        });
        result?;
        sync(opts.device);
        if step > 0 {
            times.push(started.elapsed().as_secs_f64());
        } else {
            calls = recorded;
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];

    // Replay every deformable convolution of a step alone, forward and backward.
    let kind = match precision {
        Precision::Fp32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
        Precision::Fp16 => Kind::Half,
    };
    let inputs: Vec<(Tensor, Tensor, Tensor, i64, i64)> = calls
        .iter()
        .map(|c| {
            let x = Tensor::randn(c.input.as_slice(), (kind, opts.device)).set_requires_grad(true);
            let w = Tensor::randn(c.weight.as_slice(), (kind, opts.device)).set_requires_grad(true);
            let k = c.weight[2];
            let (ho, wo) = (
                c.input[2] + 2 * c.padding - k + 1,
                c.input[3] + 2 * c.padding - k + 1,
            );
            let off = Tensor::randn(
                [c.input[0], c.groups * 2 * k * k, ho, wo],
                (kind, opts.device),
            );
            (x, off, w, c.padding, c.groups)
        })
        .collect();
    let replay = || -> Result<f64> {
        let started = Instant::now();
        for (x, off, w, padding, groups) in &inputs {
            let y = deform_conv2d(x, off, w, *padding, *groups)?;
            let g = Tensor::run_backward(&[y.sum(Kind::Float)], &[x, w], false, false);
            drop(g);
        }
        sync(opts.device);
        Ok(started.elapsed().as_secs_f64())
    };
    replay()?; // warm-up
    let reps = 3;
    let mut replays = (0..reps).map(|_| replay()).collect::<Result<Vec<_>>>()?;
    replays.sort_by(f64::total_cmp);
    let deform_s = replays[reps / 2];

    Ok(DetectStepResult {
        bench: "finetune-step",
        task: "detect",
        preset: opts.preset.clone(),
        batch: opts.batch,
        clip: [3, side, side],
        fpn_channels: opts.detector.fpn_channels,
        device: format!("{:?}", opts.device).to_lowercase(),
        threads: tch::get_num_threads(),
        dtype: match precision {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        },
        steps: times.len(),
        step_s_median: median,
        step_s_min: times[0],
        samples_per_s: opts.batch as f64 / median,
        deform_conv: DeformShare {
            calls: calls.len(),
            seconds: deform_s,
            share: deform_s / median,
        },
        peak_rss_mb: super::peak_rss_mb(),
        peak_device_mb: None,
    })
}
