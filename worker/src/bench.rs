//! Benchmarks that print one JSON object per case (see `shared/spec/benchmarks.md`):
//! `ssl-step`, one complete self-supervised iteration on in-memory views of the right shapes.

use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use endofm_shared::{ModelConfig, PretrainConfig, TrainPrecision};

use crate::Result;
use crate::collective::Solo;
use crate::precision::Precision;
use crate::train::step::SslTrainer;

/// Peak resident set size of this process in MiB (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Shapes of the views of one step.
#[derive(Debug, Clone, Serialize)]
pub struct ViewShapes {
    /// Global view side in pixels.
    pub global_px: i64,
    /// Local view side in pixels.
    pub local_px: i64,
    /// Frames of each global view.
    pub global_frames: Vec<i64>,
    /// Frames of each local view.
    pub local_frames: Vec<i64>,
}

impl ViewShapes {
    /// The reference's view set for a model whose global size is `global_px` (local views at
    /// 96/224 of it: 96 px for ViT-B, 48 px for the tiny preset).
    pub fn reference(global_px: i64) -> Self {
        Self {
            global_px,
            local_px: global_px * 96 / 224,
            global_frames: vec![8, 16],
            local_frames: vec![2, 2, 4, 4, 8, 8, 16, 16],
        }
    }

    /// Random views of these shapes for `batch` clips.
    pub fn random(&self, batch: i64, device: Device) -> Vec<Tensor> {
        let opts = (Kind::Float, device);
        self.global_frames
            .iter()
            .map(|&t| Tensor::randn([batch, 3, t, self.global_px, self.global_px], opts))
            .chain(
                self.local_frames
                    .iter()
                    .map(|&t| Tensor::randn([batch, 3, t, self.local_px, self.local_px], opts)),
            )
            .collect()
    }
}

/// Result of `bench ssl-step`.
#[derive(Debug, Clone, Serialize)]
pub struct SslStepResult {
    /// Always "ssl-step".
    pub bench: &'static str,
    /// Preset or "custom".
    pub preset: String,
    /// Clips per step.
    pub batch: i64,
    /// Device.
    pub device: String,
    /// libtorch intra-op threads.
    pub threads: i32,
    /// Precision of the step.
    pub dtype: String,
    /// Student parameters.
    pub params: u64,
    /// Steps timed.
    pub steps: usize,
    /// Median seconds per step.
    pub step_s_median: f64,
    /// Fastest step.
    pub step_s_min: f64,
    /// Clips per second at the median.
    pub samples_per_s: f64,
    /// Peak resident memory.
    pub peak_rss_mb: f64,
    /// Peak device memory (CUDA only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_device_mb: Option<f64>,
}

/// Options of `bench ssl-step`.
#[derive(Debug, Clone)]
pub struct SslStepOptions {
    /// Name reported.
    pub preset: String,
    /// Clips per step.
    pub batch: i64,
    /// Device.
    pub device: Device,
    /// Precision.
    pub precision: TrainPrecision,
    /// Timed steps (after one warm-up step).
    pub steps: usize,
    /// View shapes.
    pub views: ViewShapes,
}

/// Times complete training steps (forward of teacher and student, loss, backward, clipping,
/// AdamW, EMA, centre) on random views.
pub fn ssl_step(model: &ModelConfig, opts: &SslStepOptions) -> Result<SslStepResult> {
    let cfg = PretrainConfig {
        epochs: 100,
        batch_per_rank: opts.batch as usize,
        precision: opts.precision,
        ..Default::default()
    };
    let mut trainer = SslTrainer::new(model, &cfg, opts.device, 1000, 1)?;
    let views = opts.views.random(opts.batch, opts.device);
    let mut times = Vec::with_capacity(opts.steps);
    for step in 0..=opts.steps {
        let started = Instant::now();
        trainer.step(&views, step + 1000, &mut Solo)?;
        if let Device::Cuda(index) = opts.device {
            tch::Cuda::synchronize(index as i64);
        }
        if step > 0 {
            times.push(started.elapsed().as_secs_f64());
        }
        tracing::debug!(step, secs = started.elapsed().as_secs_f64(), "bench step");
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let dtype = match trainer.precision() {
        Precision::Fp32 => "fp32",
        Precision::Bf16 => "bf16",
        Precision::Fp16 => "fp16",
    };
    Ok(SslStepResult {
        bench: "ssl-step",
        preset: opts.preset.clone(),
        batch: opts.batch,
        device: format!("{:?}", opts.device).to_lowercase(),
        threads: tch::get_num_threads(),
        dtype: dtype.to_string(),
        params: trainer.student().param_counts().total,
        steps: times.len(),
        step_s_median: median,
        step_s_min: times[0],
        samples_per_s: opts.batch as f64 / median,
        peak_rss_mb: peak_rss_mb(),
        peak_device_mb: None,
    })
}
