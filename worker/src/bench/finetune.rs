//! `bench finetune-step`: one complete fine-tuning iteration on in-memory inputs, through the
//! same step function fine-tuning runs: classification (forward in train mode with drop-path,
//! cross-entropy, backward, SGD momentum update: [`crate::finetune::classify::train_step`]) or
//! segmentation (the TransUNet hybrid on one sequence of `batch` frames, CE + Dice, AdamW:
//! [`crate::finetune::segment::train_step`]).

use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use endofm_shared::{FinetuneConfig, ModelConfig, TaskKind, TrainPrecision};

use crate::collective::Solo;
use crate::finetune::classify::{NUM_LABELS, optimizer_for, resolve_precision, train_step};
use crate::model::Classifier;
use crate::precision::Precision;
use crate::{Error, Result};

/// Options of `bench finetune-step`.
#[derive(Debug, Clone)]
pub struct FinetuneStepOptions {
    /// The task (classify).
    pub task: TaskKind,
    /// Preset name reported.
    pub preset: String,
    /// Videos per step (classification) or frames of the one sequence per step
    /// (segmentation).
    pub batch: i64,
    /// Segmentation: the stem/decoder.
    pub segmenter: endofm_shared::SegmenterConfig,
    /// Device.
    pub device: Device,
    /// Precision.
    pub precision: TrainPrecision,
    /// Timed steps (after one warm-up step).
    pub steps: usize,
    /// Fine-tuning settings (frames, crop, drop-path, momentum).
    pub cfg: FinetuneConfig,
}

/// Result of `bench finetune-step`.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneStepResult {
    /// Always "finetune-step".
    pub bench: &'static str,
    /// The task.
    pub task: TaskKind,
    /// Preset name.
    pub preset: String,
    /// Videos per step.
    pub batch: i64,
    /// Frames per video and crop side in pixels.
    pub clip: [usize; 2],
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
    /// Samples per second at the median.
    pub samples_per_s: f64,
    /// What a sample is: `videos` (classification) or `frames` (segmentation).
    pub sample_unit: &'static str,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mb: f64,
    /// Peak device memory, MiB (not measured yet: libtorch's allocator statistics are not
    /// exposed through tch; `null`).
    pub peak_device_mb: Option<f64>,
}

/// Runs `step` once untimed, then `opts.steps` times, returning the sorted step times
/// (seconds; CUDA synchronised).
fn time_steps(
    opts: &FinetuneStepOptions,
    mut step: impl FnMut(u64) -> Result<()>,
) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(opts.steps);
    for k in 0..=opts.steps {
        let started = Instant::now();
        step(k as u64)?;
        if let Device::Cuda(index) = opts.device {
            tch::Cuda::synchronize(index as i64);
        }
        if k > 0 {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}

/// Runs the benchmark.
pub fn finetune_step(
    model: &ModelConfig,
    opts: &FinetuneStepOptions,
) -> Result<FinetuneStepResult> {
    if opts.steps == 0 || opts.batch < 1 {
        return Err(Error::Input {
            name: "bench finetune-step".into(),
            reason: "needs at least one step and one sample per step".into(),
        });
    }
    let mut model_cfg = model.clone();
    model_cfg.drop_path_rate = opts.cfg.drop_path_rate;
    tch::manual_seed(0);
    let precision = resolve_precision(opts.precision, opts.device)?;
    let side = opts.cfg.crop as i64;
    let (times, unit, frames) = match opts.task {
        TaskKind::Classify => {
            let net = Classifier::new(&model_cfg, NUM_LABELS, opts.device)?;
            let mut sgd = optimizer_for(&net, &opts.cfg);
            let t = opts.cfg.frames as i64;
            let videos = Tensor::randn([opts.batch, 3, t, side, side], (Kind::Float, opts.device));
            let labels = Tensor::arange(opts.batch, (Kind::Int64, opts.device)).remainder(2);
            let lr = opts.cfg.scaled_lr(1);
            let times = time_steps(opts, |step| {
                train_step(
                    &net,
                    &mut sgd,
                    precision,
                    (&videos, &labels),
                    step,
                    lr,
                    &mut Solo,
                )
                .map(|_| ())
            })?;
            (times, "videos", opts.cfg.frames)
        }
        TaskKind::Segment => {
            model_cfg.img_size = opts.cfg.crop;
            let net = crate::model::Segmenter::new(&model_cfg, &opts.segmenter, opts.device)?;
            let mut adamw =
                crate::finetune::adamw::AdamW::for_store(net.var_store(), opts.cfg.weight_decay);
            let frames = Tensor::randn([opts.batch, 3, side, side], (Kind::Float, opts.device));
            // A disc in the middle of every frame: both classes present, like a polyp frame.
            let r = Tensor::arange(side, (Kind::Float, opts.device)) - side as f64 / 2.0;
            let disc = (r.unsqueeze(0).square() + r.unsqueeze(1).square())
                .lt(side as f64 * side as f64 / 16.0)
                .to_kind(Kind::Int64);
            let labels = disc
                .unsqueeze(0)
                .expand([opts.batch, side, side], false)
                .contiguous();
            let times = time_steps(opts, |step| {
                crate::finetune::segment::train_step(
                    &net,
                    &mut adamw,
                    precision,
                    (&frames, &labels),
                    step,
                    opts.cfg.lr,
                    &mut Solo,
                )
                .map(|_| ())
            })?;
            (times, "frames", opts.batch as usize)
        }
        TaskKind::Detect => {
            return Err(Error::Input {
                name: "task".into(),
                reason: "detection's step is measured by bench::detect::detect_step".into(),
            });
        }
    };
    let mut times = times;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    Ok(FinetuneStepResult {
        bench: "finetune-step",
        task: opts.task,
        preset: opts.preset.clone(),
        batch: opts.batch,
        clip: [frames, opts.cfg.crop],
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
        sample_unit: unit,
        peak_rss_mb: super::peak_rss_mb(),
        peak_device_mb: None,
    })
}
