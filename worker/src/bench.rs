//! Benchmarks that print one JSON object per case (see `shared/spec/benchmarks.md`):
//! `ssl-step`, one complete self-supervised iteration on in-memory views of the right shapes,
//! and `data`, MP4 clips through the pre-training loader to the normalised view tensors.

pub mod detect;
pub mod finetune;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use endofm_shared::{ModelConfig, PretrainConfig, StorageUri, TrainPrecision};

use crate::collective::Solo;
use crate::data::ViewConfig;
use crate::data::loader::{Corpus, Loader, LoaderConfig, LoaderStats};
use crate::precision::Precision;
use crate::synth::{CorpusSpec, write_pretrain_corpus};
use crate::train::step::SslTrainer;
use crate::{Error, Result};

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

/// Random views with the shapes `views` describes (global views first), for `batch` clips.
pub fn random_views(views: &ViewConfig, batch: i64, device: Device) -> Vec<Tensor> {
    let opts = (Kind::Float, device);
    let (g, l) = (views.global_size as i64, views.local_size as i64);
    views
        .global_frames
        .iter()
        .map(|&t| Tensor::randn([batch, 3, t as i64, g, g], opts))
        .chain(
            views
                .local_frames
                .iter()
                .map(|&t| Tensor::randn([batch, 3, t as i64, l, l], opts)),
        )
        .collect()
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
    /// View shapes (the sizes and frame counts of the views).
    pub views: ViewConfig,
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
    let views = random_views(&opts.views, opts.batch, opts.device);
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

/// Options of `bench data`.
#[derive(Debug, Clone)]
pub struct DataOptions {
    /// Corpus location; `None`: a synthetic corpus like the published one in a temporary folder.
    pub data: Option<StorageUri>,
    /// Clip list inside the corpus.
    pub list: String,
    /// Decode/augment threads of the loader.
    pub threads: usize,
    /// Clips timed, after one warm-up clip per thread.
    pub clips: usize,
    /// Preset name reported.
    pub preset: String,
    /// The views rendered.
    pub views: ViewConfig,
}

/// Result of `bench data`.
#[derive(Debug, Clone, Serialize)]
pub struct DataResult {
    /// Always "data".
    pub bench: &'static str,
    /// Preset whose views were rendered.
    pub preset: String,
    /// Global and local view sides in pixels.
    pub views_px: [usize; 2],
    /// Decode/augment threads.
    pub threads: usize,
    /// Clips timed.
    pub clips: usize,
    /// Wall time of the timed clips.
    pub seconds: f64,
    /// Clips per second from the files to the ten normalised view tensors, whole pipeline.
    pub clips_per_s: f64,
    /// Frames decoded per second (the distinct frames the views need).
    pub frames_decoded_per_s: f64,
    /// Fraction of the data threads' busy time spent reading and decoding (the rest renders
    /// the views).
    pub decode_share: f64,
    /// Mean milliseconds per clip reading and decoding, on one data thread.
    pub decode_ms_per_clip: f64,
    /// Mean milliseconds per clip rendering the views, on one data thread.
    pub render_ms_per_clip: f64,
    /// Clips that failed to read or decode (each attempt counts).
    pub clips_failed: u64,
}

/// A snapshot of the loader's counters.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    ok: u64,
    failed: u64,
    frames: u64,
    decode_ns: u64,
    render_ns: u64,
}

impl Counts {
    fn of(stats: &LoaderStats) -> Self {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        Self {
            ok: get(&stats.clips_ok),
            failed: get(&stats.clips_failed),
            frames: get(&stats.frames_decoded),
            decode_ns: get(&stats.decode_ns),
            render_ns: get(&stats.render_ns),
        }
    }
}

/// Clips of the synthetic corpus `bench data` writes when given none.
pub const DATA_BENCH_CLIPS: usize = 16;

/// Runs clips through the pre-training [`Loader`] (one clip per batch, so the numbers are per
/// clip) with `threads` data threads: read, demux, decode the frames the views need, render and
/// normalise the views. The first clip of each thread is a warm-up; the decode and render times
/// come from the loader's per-clip counters over the timed clips.
pub fn data(opts: &DataOptions) -> Result<DataResult> {
    if opts.threads == 0 || opts.clips == 0 {
        return Err(Error::Input {
            name: "bench data".into(),
            reason: "threads and clips must be at least 1".into(),
        });
    }
    let generated;
    let uri = match &opts.data {
        Some(uri) => uri.clone(),
        None => {
            generated = tempfile::tempdir().map_err(|source| Error::Io {
                action: "creating a temporary folder",
                path: std::env::temp_dir(),
                source,
            })?;
            let spec = CorpusSpec {
                clips: DATA_BENCH_CLIPS,
                frames: 150,
                short_side: 256,
                ..CorpusSpec::default()
            };
            tracing::info!(
                clips = spec.clips,
                "writing a synthetic corpus for the benchmark"
            );
            write_pretrain_corpus(generated.path(), &spec)?;
            StorageUri::Local {
                path: generated.path().to_path_buf(),
            }
        }
    };
    let corpus = Arc::new(Corpus::open(&uri, &opts.list)?);
    let cfg = LoaderConfig {
        seed: 0,
        batch: 1,
        rank: 0,
        world: 1,
        threads: opts.threads,
        prefetch: 2 * opts.threads,
        views: opts.views.clone(),
    };
    let mut loader = Loader::start(corpus, cfg, 0)?;
    for _ in 0..opts.threads {
        loader.next_batch()?;
    }
    let before = Counts::of(loader.stats());
    let started = Instant::now();
    for _ in 0..opts.clips {
        std::hint::black_box(loader.next_batch()?);
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = Counts::of(loader.stats());
    drop(loader);

    let produced = (after.ok - before.ok).max(1) as f64;
    let decode_ns = (after.decode_ns - before.decode_ns) as f64;
    let render_ns = (after.render_ns - before.render_ns) as f64;
    let clips_per_s = opts.clips as f64 / seconds.max(f64::MIN_POSITIVE);
    let frames_per_clip = (after.frames - before.frames) as f64 / produced;
    Ok(DataResult {
        bench: "data",
        preset: opts.preset.clone(),
        views_px: [opts.views.global_size, opts.views.local_size],
        threads: opts.threads,
        clips: opts.clips,
        seconds,
        clips_per_s,
        frames_decoded_per_s: frames_per_clip * clips_per_s,
        decode_share: decode_ns / (decode_ns + render_ns).max(1.0),
        decode_ms_per_clip: decode_ns / produced / 1e6,
        render_ms_per_clip: render_ns / produced / 1e6,
        clips_failed: after.failed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_bench_reports_rates_and_the_decode_share() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = CorpusSpec {
            clips: 3,
            frames: 16,
            short_side: 64,
            threads: 2,
            ..CorpusSpec::default()
        };
        write_pretrain_corpus(dir.path(), &spec).expect("writing the corpus");
        let opts = DataOptions {
            data: Some(StorageUri::Local {
                path: dir.path().to_path_buf(),
            }),
            list: "train.csv".into(),
            threads: 2,
            clips: 4,
            preset: "test".into(),
            views: ViewConfig {
                global_size: 32,
                local_size: 16,
                ..ViewConfig::default()
            },
        };
        let r = data(&opts).expect("bench data");
        assert_eq!((r.bench, r.threads, r.clips), ("data", 2, 4));
        assert!(r.clips_per_s > 0.0 && r.seconds > 0.0, "{r:?}");
        // A 16-frame clip: global view 2 alone needs frames 5..=15, and no view goes beyond.
        let frames_per_clip = r.frames_decoded_per_s / r.clips_per_s;
        assert!(
            (11.0..=16.0).contains(&frames_per_clip),
            "{frames_per_clip} frames per clip"
        );
        assert!(r.decode_share > 0.0 && r.decode_share < 1.0, "{r:?}");
        assert_eq!(r.clips_failed, 0);
        let json = serde_json::to_value(&r).expect("json");
        for field in [
            "bench",
            "threads",
            "clips",
            "clips_per_s",
            "frames_decoded_per_s",
            "decode_share",
        ] {
            assert!(json.get(field).is_some(), "missing `{field}`: {json}");
        }
        let mut bad = opts;
        bad.threads = 0;
        assert!(data(&bad).is_err());
    }
}

/// One `allreduce` case: the median time of an all-reduce of `mb` MiB of f32 over the group.
#[derive(Debug, Clone, Serialize)]
pub struct AllReduceBench {
    /// Always "allreduce".
    pub bench: &'static str,
    /// "tcp-ring", "nccl", ...
    pub backend: &'static str,
    /// Ranks.
    pub world: usize,
    /// Buffer size in MiB (2^20 bytes).
    pub mb: usize,
    /// Median seconds per all-reduce.
    pub time_s: f64,
    /// Bytes / time, in GB/s (10^9 bytes).
    #[serde(rename = "algbw_GBps")]
    pub algbw_gbps: f64,
    /// algbw · 2(W-1)/W: the bandwidth each link sustains.
    #[serde(rename = "busbw_GBps")]
    pub busbw_gbps: f64,
}

/// Times `iters` all-reduces of each size in `sizes_mb` (after one warm-up each) on this rank,
/// with the buffers on `device`; every rank of the group must call it with the same arguments.
pub fn allreduce(
    group: &mut dyn crate::collective::Collective,
    backend: &'static str,
    device: Device,
    sizes_mb: &[usize],
    iters: usize,
) -> Result<Vec<AllReduceBench>> {
    let world = group.world_size();
    // The ranks share the machine's cores: one libtorch thread each, or idle OpenMP workers
    // spin against the ring's own threads.
    tch::set_num_threads(1);
    let mut out = Vec::new();
    for &mb in sizes_mb {
        let bytes = mb << 20;
        let mut buffer = Tensor::ones([(bytes / 4) as i64], (Kind::Float, device));
        group.all_reduce_sum(&mut buffer)?;
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            // Keep the values small and finite however many rounds run.
            let _ = buffer.fill_(1.0);
            if let Device::Cuda(index) = device {
                // Time the all-reduce only, not the fill queued before it.
                tch::Cuda::synchronize(index as i64);
            }
            let started = Instant::now();
            group.all_reduce_sum(&mut buffer)?;
            times.push(started.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let time_s = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
        let algbw_gbps = bytes as f64 / time_s / 1e9;
        out.push(AllReduceBench {
            bench: "allreduce",
            backend,
            world,
            mb,
            time_s,
            algbw_gbps,
            busbw_gbps: algbw_gbps * 2.0 * (world as f64 - 1.0) / world as f64,
        });
    }
    Ok(out)
}
