//! A pre-training run on one rank: resolves and validates the configuration, opens the corpus
//! and the output location (refusing bad input before any work), resumes from the newest
//! checkpoint there or initialises the networks, then loops over loader batches and trainer
//! steps, writing metrics, progress and checkpoints. The distributed service runs the same
//! function on every rank with its own [`Collective`].

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tch::Device;

use endofm_shared::{ModelConfig, PretrainConfig, StorageUri};

use crate::checkpoint::{self, Writer};
use crate::collective::Collective;
use crate::data::ViewConfig;
use crate::data::loader::{self, Corpus, Loader, LoaderConfig};
use crate::store::Store;
use crate::train::step::{SslTrainer, StepStats};
use crate::{Error, Result};

/// The configuration file of a run: every section optional, defaults = the reference's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The network (default: the preset's).
    #[serde(default)]
    pub model: Option<ModelConfig>,
    /// Training hyper-parameters.
    #[serde(default)]
    pub train: PretrainConfig,
    /// The views (default: sized for the model).
    #[serde(default)]
    pub views: Option<ViewConfig>,
}

/// Default views for a model: the reference's set with global views at the model's image size
/// and local views at 96/224 of it.
pub fn views_for(model: &ModelConfig) -> ViewConfig {
    let mut v = ViewConfig::reference();
    v.global_size = model.img_size;
    v.local_size = (model.img_size * 96 / 224).max(model.patch_size);
    v
}

/// Where the initial weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitSource {
    /// A folder with `student.safetensors` (and maybe `teacher.safetensors`): one of our
    /// checkpoints or an imported published checkpoint.
    Folder(PathBuf),
    /// One safetensors file: the student, the teacher starts as its copy.
    Weights(PathBuf),
    /// A PyTorch checkpoint (`.pth`), converted with the venv's torch first.
    Pickle(PathBuf),
}

impl InitSource {
    /// Classifies a path given on the command line.
    pub fn parse(path: &Path) -> Result<Self> {
        if path.is_dir() {
            if !path.join("student.safetensors").is_file() {
                return Err(Error::Input {
                    name: "--init".into(),
                    reason: format!("{} has no student.safetensors", path.display()),
                });
            }
            return Ok(Self::Folder(path.to_path_buf()));
        }
        if !path.is_file() {
            return Err(Error::Input {
                name: "--init".into(),
                reason: format!("{} does not exist", path.display()),
            });
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => Ok(Self::Weights(path.to_path_buf())),
            Some("pth" | "pt" | "ckpt") => Ok(Self::Pickle(path.to_path_buf())),
            _ => Err(Error::Input {
                name: "--init".into(),
                reason: format!(
                    "{}: expected a checkpoint folder, a .safetensors file or a .pth checkpoint",
                    path.display()
                ),
            }),
        }
    }
}

/// Watches a run from outside (the service's rank process reports progress with it). Called on
/// the training thread after every step (every rank), and on the checkpoint writer's thread once
/// a checkpoint's manifest is committed (rank 0). Implementations must be quick and not fail.
pub trait RunObserver: Send + Sync + std::fmt::Debug {
    /// After every completed step: its statistics and the step the run ends at (exclusive).
    fn on_step(&self, _line: &MetricsLine, _end_step: usize) {}
    /// After the manifest of the checkpoint taken after `step` steps was written; `uri` is the
    /// checkpoint's folder.
    fn on_checkpoint(&self, _step: usize, _uri: &str) {}
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct PretrainJob {
    /// Corpus location (holding the clip list).
    pub data: StorageUri,
    /// Clip list name inside the corpus.
    pub list: String,
    /// Output location (checkpoints, metrics, resolved config).
    pub out: StorageUri,
    /// Name of the preset the model came from, for the record.
    pub preset: Option<String>,
    /// The network.
    pub model: ModelConfig,
    /// Hyper-parameters.
    pub train: PretrainConfig,
    /// Views.
    pub views: ViewConfig,
    /// Stop after this many steps in total (the schedules still span the whole run).
    pub max_steps: Option<usize>,
    /// Initial weights for a fresh run.
    pub init: Option<InitSource>,
    /// Device.
    pub device: Device,
    /// Decode/augment threads.
    pub data_threads: usize,
    /// Show a progress bar (otherwise a log line per logging step).
    pub progress: bool,
    /// Set (by a signal handler) to stop at the next step boundary with a checkpoint.
    pub stop: Arc<AtomicBool>,
    /// Told about every step and committed checkpoint (the service's progress reports).
    pub observer: Option<Arc<dyn RunObserver>>,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Step the run started at (0, or the resumed checkpoint's).
    pub started_at: usize,
    /// Steps completed in total.
    pub steps: usize,
    /// Steps of the whole schedule.
    pub total_steps: usize,
    /// Last loss.
    pub last_loss: f64,
    /// Clips that failed to decode.
    pub clips_failed: u64,
    /// Where the last checkpoint is.
    pub checkpoint: String,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Whether the run stopped early on request (SIGTERM/SIGINT), after checkpointing.
    pub interrupted: bool,
}

/// One line of `metrics.jsonl`: the step's statistics and the run's throughput.
#[derive(Debug, Clone, Serialize)]
pub struct MetricsLine {
    /// Step, epoch, loss and the scheduled values.
    #[serde(flatten)]
    pub stats: StepStats,
    /// Clips per second over all ranks.
    pub samples_per_s: f64,
    /// Seconds waiting for data.
    pub data_wait_s: f64,
    /// Seconds of the whole step.
    pub step_s: f64,
    /// Clips skipped so far.
    pub clips_failed: u64,
}

fn trained_fields_equal(a: &PretrainConfig, b: &PretrainConfig) -> bool {
    let norm = |c: &PretrainConfig| PretrainConfig {
        checkpoint_every: 0,
        keep_checkpoints: 1,
        log_every: 1,
        ..c.clone()
    };
    norm(a) == norm(b)
}

fn load_init(trainer: &mut SslTrainer, init: &InitSource) -> Result<()> {
    match init {
        InitSource::Folder(dir) => {
            let teacher = dir.join("teacher.safetensors");
            trainer.load_weights(
                &dir.join("student.safetensors"),
                teacher.is_file().then_some(teacher.as_path()),
            )?;
        }
        InitSource::Weights(path) => {
            trainer.load_weights(path, None)?;
        }
        InitSource::Pickle(path) => {
            let tmp = tempfile::tempdir().map_err(|source| Error::Io {
                action: "creating a temporary directory",
                path: std::env::temp_dir(),
                source,
            })?;
            crate::convert::import(&crate::convert::python(None), path, tmp.path(), false)?;
            load_init(trainer, &InitSource::Folder(tmp.path().to_path_buf()))?;
        }
    }
    Ok(())
}

/// Runs (or resumes) pre-training on this rank.
pub fn run(job: &PretrainJob, collective: &mut dyn Collective) -> Result<Summary> {
    let started = Instant::now();
    job.model.validate()?;
    job.train.validate()?;
    job.views.validate()?;
    let rank = collective.rank();
    let world = collective.world_size();

    // Bad input is refused before any work: corpus, then output location.
    let corpus = Arc::new(Corpus::open(&job.data, &job.list)?);
    let ipe = loader::iters_per_epoch(corpus.len(), job.train.batch_per_rank, world);
    if ipe == 0 {
        return Err(Error::Input {
            name: "corpus".into(),
            reason: format!(
                "{} lists {} clips, fewer than one global batch ({} per rank × {world} ranks)",
                job.data,
                corpus.len(),
                job.train.batch_per_rank
            ),
        });
    }
    let out = Store::open(&job.out, true)?;
    let resolved = serde_json::json!({
        "preset": job.preset,
        "data": job.data.to_string(),
        "list": job.list,
        "world_size": world,
        "model": job.model,
        "train": job.train,
        "views": job.views,
    });
    if rank == 0 {
        out.put(
            "config.json",
            Bytes::from(serde_json::to_vec_pretty(&resolved).unwrap_or_default()),
        )?;
    }

    let mut trainer = SslTrainer::new(&job.model, &job.train, job.device, ipe, world)?;
    let mut start_step = 0;
    match checkpoint::latest(&out)? {
        Some(m) => {
            if m.model != job.model {
                return Err(Error::Input {
                    name: "--out".into(),
                    reason: format!(
                        "{} holds checkpoints of another model configuration; use a new output location",
                        job.out
                    ),
                });
            }
            if m.corpus != corpus.fingerprint() || m.world_size != world || m.iters_per_epoch != ipe
            {
                return Err(Error::Input {
                    name: "--out".into(),
                    reason: format!(
                        "{} holds checkpoints of a run on another corpus or world size ({} clips, {} ranks); use a new output location",
                        job.out, m.corpus.clips, m.world_size
                    ),
                });
            }
            if !trained_fields_equal(&m.train, &job.train) {
                return Err(Error::Input {
                    name: "--out".into(),
                    reason: format!(
                        "{} holds checkpoints of a run with other hyper-parameters; use a new output location or the same settings",
                        job.out
                    ),
                });
            }
            checkpoint::restore(&out, &m, &mut trainer)?;
            start_step = m.step;
            tracing::info!(step = start_step, epoch = m.epoch, out = %job.out, "resuming from checkpoint");
        }
        None => {
            if let Some(init) = &job.init {
                load_init(&mut trainer, init)?;
                tracing::info!(?init, "initialised from weights");
            }
        }
    }

    let total = trainer.total_steps();
    let end = job.max_steps.map_or(total, |m| m.min(total));
    let mut metrics_text = match out.get("metrics.jsonl") {
        Ok(bytes) => String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|m| m["step"].as_u64())
                    .is_some_and(|s| (s as usize) < start_step)
            })
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
        Err(_) => String::new(),
    };
    let mut writer = (rank == 0).then(|| {
        Writer::with_observer(
            out.clone(),
            job.train.keep_checkpoints,
            job.observer.clone(),
        )
    });
    let mut summary = Summary {
        started_at: start_step,
        steps: start_step,
        total_steps: total,
        last_loss: f64::NAN,
        clips_failed: 0,
        checkpoint: String::new(),
        seconds: 0.0,
        interrupted: false,
    };
    if start_step >= end {
        tracing::info!(step = start_step, "nothing to do: the run is complete");
        summary.seconds = started.elapsed().as_secs_f64();
        summary.checkpoint = out.describe(&checkpoint::folder(start_step));
        return Ok(summary);
    }

    let mut loader = Loader::start(
        Arc::clone(&corpus),
        LoaderConfig {
            seed: job.train.seed,
            batch: job.train.batch_per_rank,
            rank,
            world,
            threads: job.data_threads,
            prefetch: job.train.batch_per_rank * 4,
            views: job.views.clone(),
        },
        start_step,
    )?;
    let bar = job.progress.then(|| {
        let bar = indicatif::ProgressBar::new(end as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_position(start_step as u64);
        bar
    });
    let corpus_fp = corpus.fingerprint();
    let digests = std::env::var_os(PARAM_DIGESTS_ENV).map(PathBuf::from);
    let global_batch = (job.train.batch_per_rank * world) as f64;
    let mut last_saved = start_step;
    for step in start_step..end {
        let step_started = Instant::now();
        let batch = loader.next_batch()?;
        let views: Vec<tch::Tensor> = batch
            .views
            .iter()
            .map(|v| v.to_device(job.device))
            .collect();
        let stats = trainer.step(&views, step, collective)?;
        let step_s = step_started.elapsed().as_secs_f64();
        if let Some(dir) = &digests {
            append_digest(dir, rank, step + 1, trainer.student_flat().buffer());
        }
        let failed = loader
            .stats()
            .clips_failed
            .load(std::sync::atomic::Ordering::Relaxed);
        summary.last_loss = stats.loss;
        summary.steps = step + 1;
        summary.clips_failed = failed;
        let line = MetricsLine {
            stats: stats.clone(),
            samples_per_s: global_batch / step_s,
            data_wait_s: batch.wait_s,
            step_s,
            clips_failed: failed,
        };
        if let Some(observer) = &job.observer {
            observer.on_step(&line, end);
        }
        if rank == 0 && (step % job.train.log_every == 0 || step + 1 == end) {
            let json = serde_json::to_string(&line).unwrap_or_default();
            metrics_text.push_str(&json);
            metrics_text.push('\n');
            if let Some(bar) = &bar {
                bar.set_prefix(format!("epoch {}", stats.epoch));
                bar.set_message(format!(
                    "loss {:.4} {:.2} clips/s",
                    stats.loss, line.samples_per_s
                ));
            } else {
                tracing::info!(
                    step,
                    epoch = stats.epoch,
                    loss = stats.loss,
                    lr = stats.lr,
                    samples_per_s = line.samples_per_s,
                    data_wait_s = batch.wait_s,
                    "step"
                );
            }
        }
        if let Some(bar) = &bar {
            bar.set_position((step + 1) as u64);
        }
        let every = job.train.checkpoint_every;
        let done = step + 1;
        let stopping =
            agree_stop(collective, job.stop.load(Ordering::SeqCst), job.device)? && done < end;
        if let Some(w) = writer.as_mut()
            && ((every > 0 && done % every == 0) || done == end || stopping)
        {
            w.save(
                &trainer,
                checkpoint::manifest_for(&trainer, &job.model, done, world, corpus_fp.clone()),
            )?;
            out.put(
                "metrics.jsonl",
                Bytes::from(metrics_text.clone().into_bytes()),
            )?;
            last_saved = done;
        }
        if stopping {
            tracing::warn!(
                step = done,
                "stop requested: checkpointed, exiting; rerun the same command to resume"
            );
            summary.interrupted = true;
            break;
        }
    }
    drop(loader);
    if let Some(bar) = bar {
        bar.finish();
    }
    if let Some(w) = writer {
        w.finish()?;
    }
    summary.checkpoint = out.describe(&checkpoint::folder(last_saved));
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Whether any rank was asked to stop (SIGTERM on one pod, a cancel reaching ranks at different
/// moments): one one-element all-reduce per step, so that every rank stops after the same step
/// and rank 0's checkpoint is the state of all of them.
fn agree_stop(collective: &mut dyn Collective, local: bool, device: Device) -> Result<bool> {
    if collective.world_size() == 1 {
        return Ok(local);
    }
    let mut flag = tch::Tensor::from_slice(&[if local { 1.0f32 } else { 0.0 }]).to_device(device);
    collective.all_reduce_sum(&mut flag)?;
    Ok(flag.double_value(&[0]) > 0.0)
}

/// Diagnostic switch: when this environment variable names a folder, every rank appends
/// `step digest` lines (a 64-bit FNV-1a hash of the student's parameter bits after the step) to
/// `rank-<r>.txt` there, so that tests and operators can check that ranks hold bit-identical
/// parameters. Costs one host copy of the parameters per step; off by default.
pub const PARAM_DIGESTS_ENV: &str = "ENDOFM_PARAM_DIGESTS";

fn append_digest(dir: &Path, rank: usize, step: usize, params: &tch::Tensor) {
    use std::io::Write;
    let values: Vec<f32> = match Vec::<f32>::try_from(
        params
            .detach()
            .to_device(Device::Cpu)
            .to_kind(tch::Kind::Float)
            .flatten(0, -1),
    ) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "parameter digest skipped");
            return;
        }
    };
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for b in v.to_bits().to_le_bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    let path = dir.join(format!("rank-{rank}.txt"));
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{step} {hash:016x}"));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the parameter digest");
    }
}

/// A flag set by SIGTERM and SIGINT (Kubernetes eviction, Ctrl-C): the run checkpoints at the
/// next step boundary and returns. A second signal of the same kind is left to the default
/// action only after the flag is set, so an impatient Ctrl-C still ends the process.
pub fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&flag))
            .and_then(|_| signal_hook::flag::register(sig, Arc::clone(&flag)))
            .map_err(|e| Error::Input {
                name: "signals".into(),
                reason: format!("cannot install the signal handler: {e}"),
            })?;
    }
    Ok(flag)
}

/// Whether to draw a progress bar by default (stderr is a terminal).
pub fn progress_default() -> bool {
    std::io::stderr().is_terminal()
}
