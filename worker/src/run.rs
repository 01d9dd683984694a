//! The run machinery every training task shares (pre-training, fine-tuning): output location
//! and resolved configuration, resume from the newest checkpoint or a fresh start, the step
//! loop with `metrics.jsonl`, progress bar or log lines, checkpoints through the background
//! writer, epoch-end hooks (validation), stop agreement across ranks after SIGTERM, and the
//! observer the service's rank process reports through. A task ([`Task`]) supplies its model,
//! its data, its step and its checkpoint contents; it never re-implements the loop.
//!
//! Layering: `run` depends on `store`, `collective`, `data::CorpusFingerprint` and
//! `model::weights`; tasks (`pretrain`, `finetune`) depend on `run`; nothing here names a task.

pub mod checkpoint;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;
use tch::Device;

use endofm_shared::{ModelConfig, StorageUri};

use crate::collective::Collective;
use crate::data::CorpusFingerprint;
use crate::store::Store;
use crate::{Error, Result};
pub use checkpoint::{Checkpointable, Committed, Manifest, Snapshot, Writer};

/// One line of `metrics.jsonl`: the step's common statistics, the task's own values flattened
/// beside them, and the run's throughput.
#[derive(Debug, Clone, Serialize)]
pub struct MetricsLine {
    /// Global iteration index (0-based).
    pub step: usize,
    /// Epoch of the iteration.
    pub epoch: usize,
    /// Loss (this rank's batch).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// The task's own values (weight decay, momentum, temperatures, ...).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Samples per second over all ranks.
    pub samples_per_s: f64,
    /// Seconds waiting for data.
    pub data_wait_s: f64,
    /// Seconds of the whole step.
    pub step_s: f64,
    /// Inputs skipped so far.
    pub clips_failed: u64,
}

/// What a task's step reports.
#[derive(Debug, Clone, Default)]
pub struct StepOutcome {
    /// Epoch of the step.
    pub epoch: usize,
    /// Loss of this rank's batch.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Further values for `metrics.jsonl`.
    pub extra: serde_json::Map<String, serde_json::Value>,
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

/// A training task driven by [`drive`].
pub trait Task: Checkpointable {
    /// What one step consumes.
    type Batch;
    /// Steps per epoch.
    fn iters_per_epoch(&self) -> usize;
    /// Steps of the whole schedule.
    fn total_steps(&self) -> usize;
    /// Samples per step over all ranks.
    fn samples_per_step(&self) -> usize;
    /// Refuses to resume from a checkpoint of another run (other hyper-parameters, task...);
    /// the model, data fingerprint, world size and steps per epoch are checked by the driver.
    fn check_resume(&self, manifest: &Manifest) -> Result<()>;
    /// A fresh run (no checkpoint in the output location): load the initial weights.
    fn initialise(&mut self) -> Result<()>;
    /// Starts the data at `step` (after resume or initialisation).
    fn start_data(&mut self, step: usize) -> Result<()>;
    /// The next batch and the seconds spent waiting for it.
    fn next_batch(&mut self) -> Result<(Self::Batch, f64)>;
    /// One complete iteration on this rank (gradients all-reduced through `collective`).
    fn step(
        &mut self,
        batch: Self::Batch,
        step: usize,
        collective: &mut dyn Collective,
    ) -> Result<StepOutcome>;
    /// Inputs that failed so far (0 when the task never skips).
    fn inputs_failed(&self) -> u64 {
        0
    }
    /// The inputs this rank skipped, each once: (URI, reason). Written to the output as
    /// `bad_inputs/rank-R.json` when the run ends.
    fn bad_inputs(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Called on every rank after the last step of `epoch` (before that step's checkpoint):
    /// validation, model selection. A returned record is appended to `metrics.jsonl`.
    fn end_epoch(
        &mut self,
        _epoch: usize,
        _collective: &mut dyn Collective,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
        Ok(None)
    }
    /// Whether every epoch end is checkpointed (besides `checkpoint_every`).
    fn checkpoint_epochs(&self) -> bool {
        false
    }
    /// The progress bar's message after a step.
    fn progress_message(&self, line: &MetricsLine) -> String {
        format!("loss {:.4} {:.2} samples/s", line.loss, line.samples_per_s)
    }
}

/// How [`drive`] runs a task.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Output location (checkpoints, metrics, resolved config).
    pub out: StorageUri,
    /// The backbone configuration (checked on resume).
    pub model: ModelConfig,
    /// The data's fingerprint (checked on resume).
    pub corpus: CorpusFingerprint,
    /// Written as `config.json` by rank 0.
    pub resolved_config: serde_json::Value,
    /// Stop after this many steps in total (the schedules still span the whole run).
    pub max_steps: Option<usize>,
    /// Checkpoint every this many steps (0: only at the end, and at epoch ends when the task
    /// asks).
    pub checkpoint_every: usize,
    /// Step checkpoints kept.
    pub keep_checkpoints: usize,
    /// Write a metrics line every this many steps.
    pub log_every: usize,
    /// Draw a progress bar (otherwise a log line per logged step).
    pub progress: bool,
    /// Device of the run (the stop flag travels on it).
    pub device: Device,
    /// Set (by a signal handler) to stop at the next step boundary with a checkpoint.
    pub stop: Arc<AtomicBool>,
    /// Told about every step and committed checkpoint.
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
    /// Inputs that failed.
    pub clips_failed: u64,
    /// Where the last checkpoint is.
    pub checkpoint: String,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Whether the run stopped early on request (SIGTERM/SIGINT), after checkpointing.
    pub interrupted: bool,
}

fn refuse(out: &StorageUri, reason: String) -> Error {
    Error::Input {
        name: "--out".into(),
        reason: format!("{out} {reason}; use a new output location or the same settings"),
    }
}

/// Results runs write beside their checkpoints (`report.json`; a fine-tuning run's chosen
/// model): an output holding one of them without checkpoints belongs to another run.
const RESULT_FILES: [&str; 2] = [crate::eval::report::REPORT_FILE, "best/model.safetensors"];

/// Runs (or resumes) `task` on this rank until the end of its schedule, `max_steps`, or a stop
/// request. `out` must be the store of `settings.out`.
pub fn drive<T: Task>(
    task: &mut T,
    settings: &RunSettings,
    out: &Store,
    collective: &mut dyn Collective,
) -> Result<Summary> {
    let started = Instant::now();
    let rank = collective.rank();
    let world = collective.world_size();
    let _lock = if rank == 0 {
        lock_output(&settings.out)?
    } else {
        None
    };
    let ipe = task.iters_per_epoch();
    let mut start_step = 0;
    // Start-up: the output location answers within seconds or the run says why.
    let first = out.startup();
    if rank == 0 {
        first.remove_temporaries("")?;
    }
    match checkpoint::latest(&first)? {
        Some(m) => {
            // The task first: it knows whether the checkpoints are of its kind at all.
            task.check_resume(&m)?;
            if m.model != settings.model {
                return Err(refuse(
                    &settings.out,
                    "holds checkpoints of another model configuration".into(),
                ));
            }
            if m.corpus != settings.corpus {
                return Err(refuse(
                    &settings.out,
                    format!(
                        "holds checkpoints of a run on other data ({} inputs listed there, {} here)",
                        m.corpus.clips, settings.corpus.clips
                    ),
                ));
            }
            if m.world_size != world {
                return Err(refuse(
                    &settings.out,
                    format!(
                        "holds checkpoints of a run on {} ranks, this one has {world}",
                        m.world_size
                    ),
                ));
            }
            if m.iters_per_epoch != ipe {
                return Err(refuse(
                    &settings.out,
                    format!(
                        "holds checkpoints of a run with {} steps per epoch, this one has {ipe} (another batch size)",
                        m.iters_per_epoch
                    ),
                ));
            }
            checkpoint::restore(out, &m, task)?;
            start_step = m.step;
            tracing::info!(step = start_step, epoch = m.epoch, out = %settings.out, "resuming from checkpoint");
        }
        None => {
            // A fresh run would replace results that another run left without checkpoints
            // (an evaluation's report, a model folder): refused, naming what is there.
            for key in RESULT_FILES {
                if first.exists(key)? {
                    return Err(refuse(
                        &settings.out,
                        format!(
                            "holds {key} but no checkpoints: results of another run (an evaluation?) that this run would replace"
                        ),
                    ));
                }
            }
            task.initialise()?
        }
    }
    // Written once the output is known to be this run's (a refused run changes nothing).
    if rank == 0 {
        first.put(
            "config.json",
            Bytes::from(serde_json::to_vec_pretty(&settings.resolved_config).unwrap_or_default()),
        )?;
    }

    let total = task.total_steps();
    let end = settings.max_steps.map_or(total, |m| m.min(total));
    let mut metrics_text = match first.get_opt("metrics.jsonl")? {
        Some(bytes) => String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|m| m["step"].as_u64())
                    .is_some_and(|s| (s as usize) < start_step)
            })
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
        None => String::new(),
    };
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
    let mut writer = (rank == 0).then(|| {
        Writer::with_observer(
            out.clone(),
            settings.keep_checkpoints,
            settings.observer.clone(),
        )
    });
    task.start_data(start_step)?;
    let bar = (settings.progress && rank == 0).then(|| progress_bar(end, start_step));
    let digests = std::env::var_os(PARAM_DIGESTS_ENV).map(PathBuf::from);
    let global_batch = task.samples_per_step() as f64;
    let mut last_saved = start_step;
    for step in start_step..end {
        let step_started = Instant::now();
        let (batch, wait_s) = task.next_batch()?;
        let outcome = task.step(batch, step, collective)?;
        let step_s = step_started.elapsed().as_secs_f64();
        if let Some(dir) = &digests {
            append_digest(dir, rank, step + 1, task);
        }
        let failed = task.inputs_failed();
        summary.last_loss = outcome.loss;
        summary.steps = step + 1;
        summary.clips_failed = failed;
        let mut extra = outcome.extra;
        if let Some(failed) = writer.as_ref().map(Writer::failed).filter(|&f| f > 0) {
            extra.insert("checkpoints_failed".into(), serde_json::json!(failed));
        }
        let line = MetricsLine {
            step,
            epoch: outcome.epoch,
            loss: outcome.loss,
            lr: outcome.lr,
            extra,
            samples_per_s: global_batch / step_s,
            data_wait_s: wait_s,
            step_s,
            clips_failed: failed,
        };
        if let Some(observer) = &settings.observer {
            observer.on_step(&line, end);
        }
        if rank == 0 && (step % settings.log_every == 0 || step + 1 == end) {
            metrics_text.push_str(&serde_json::to_string(&line).unwrap_or_default());
            metrics_text.push('\n');
            if let Some(bar) = &bar {
                bar.set_prefix(format!("epoch {}", line.epoch));
                bar.set_message(task.progress_message(&line));
            } else {
                tracing::info!(
                    step,
                    epoch = line.epoch,
                    loss = line.loss,
                    lr = line.lr,
                    samples_per_s = line.samples_per_s,
                    data_wait_s = wait_s,
                    progress = %task.progress_message(&line),
                    "step"
                );
            }
        }
        if let Some(bar) = &bar {
            bar.set_position((step + 1) as u64);
        }
        let done = step + 1;
        let epoch_end = done % ipe == 0;
        if epoch_end && let Some(record) = task.end_epoch(done / ipe - 1, collective)? {
            let mut record = record;
            record.insert("step".into(), serde_json::json!(step));
            record.insert("epoch_end".into(), serde_json::json!(done / ipe - 1));
            if rank == 0 {
                let text = serde_json::Value::Object(record).to_string();
                if bar.is_none() {
                    tracing::info!(record = %text, "epoch end");
                }
                metrics_text.push_str(&text);
                metrics_text.push('\n');
            }
        }
        let every = settings.checkpoint_every;
        let stopping = agree_stop(
            collective,
            settings.stop.load(Ordering::SeqCst),
            settings.device,
        )? && done < end;
        if let Some(w) = writer.as_mut()
            && ((every > 0 && done % every == 0)
                || done == end
                || stopping
                || (epoch_end && task.checkpoint_epochs()))
        {
            let manifest = Manifest {
                version: 1,
                step: done,
                epoch: done / ipe,
                iters_per_epoch: ipe,
                total_steps: total,
                world_size: world,
                corpus: settings.corpus.clone(),
                model: settings.model.clone(),
                files: Default::default(),
                created_unix: 0,
                extra: Default::default(),
            };
            // metrics.jsonl goes with the checkpoint, on the writer's thread: the training
            // thread never waits on storage.
            w.save_with(
                task,
                manifest,
                vec![(
                    "metrics.jsonl".into(),
                    Bytes::from(metrics_text.clone().into_bytes()),
                )],
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
    if let Some(bar) = bar {
        bar.finish();
    }
    let bad = task.bad_inputs();
    if !bad.is_empty() {
        let list: Vec<serde_json::Value> = bad
            .iter()
            .map(|(uri, reason)| serde_json::json!({"uri": uri, "reason": reason}))
            .collect();
        let key = format!("bad_inputs/rank-{rank}.json");
        // After the last step: the training thread has nothing left to wait for.
        if let Err(e) = out.put(
            &key,
            Bytes::from(serde_json::to_vec_pretty(&list).unwrap_or_default()),
        ) {
            tracing::warn!(key, error = %e, "writing the list of bad inputs failed");
        } else {
            tracing::warn!(count = bad.len(), list = %out.describe(&key), "inputs were skipped; their list and reasons");
        }
    }
    if let Some(w) = writer {
        if summary.interrupted {
            // Under a grace period (Kubernetes: 30 s): a stalled store must not keep us.
            w.finish_within(stop_grace())?;
        } else {
            w.finish()?;
        }
    }
    summary.checkpoint = out.describe(&checkpoint::folder(last_saved));
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Holds an exclusive advisory lock on `<out>/run.lock` for a local output location, so that a
/// second run into the same folder is refused instead of interleaving checkpoints. The lock
/// dies with the process (no stale lock after a crash). Object stores have no such lock.
fn lock_output(out: &StorageUri) -> Result<Option<std::fs::File>> {
    let StorageUri::Local { path } = out else {
        return Ok(None);
    };
    let file_path = path.join("run.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&file_path)
        .map_err(|source| Error::Io {
            action: "opening the run lock",
            path: file_path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Input {
            name: "--out".into(),
            reason: format!(
                "{out} is in use by another run (it holds {})",
                file_path.display()
            ),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(Error::Io {
            action: "locking",
            path: file_path,
            source,
        }),
    }
}

fn progress_bar(end: usize, start: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(end as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_position(start as u64);
    bar
}

/// Whether any rank was asked to stop (SIGTERM on one pod, a cancel reaching ranks at different
/// moments): one one-element all-reduce per step, so that every rank stops after the same step
/// and rank 0's checkpoint is the state of all of them.
pub fn agree_stop(collective: &mut dyn Collective, local: bool, device: Device) -> Result<bool> {
    if collective.world_size() == 1 {
        return Ok(local);
    }
    let mut flag = tch::Tensor::from_slice(&[if local { 1.0f32 } else { 0.0 }]).to_device(device);
    collective.all_reduce_sum(&mut flag)?;
    Ok(flag.double_value(&[0]) > 0.0)
}

/// Diagnostic switch: when this environment variable names a folder, every rank appends
/// `step digest` lines (a 64-bit FNV-1a hash of the bits of every tensor of its checkpoint
/// snapshot's first file: the student, or the fine-tuned model) to `rank-<r>.txt` there, so that
/// tests and operators can check that ranks hold bit-identical parameters. Costs one host copy
/// of the parameters per step; off by default.
pub const PARAM_DIGESTS_ENV: &str = "ENDOFM_PARAM_DIGESTS";

fn append_digest(dir: &Path, rank: usize, step: usize, task: &dyn Checkpointable) {
    use std::io::Write;
    let snap = task.snapshot();
    let Some((_, tensors)) = snap.files.first() else {
        return;
    };
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for t in tensors.values() {
        let values: Vec<f32> =
            match Vec::<f32>::try_from(t.to_kind(tch::Kind::Float).flatten(0, -1)) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "parameter digest skipped");
                    return;
                }
            };
        for v in values {
            for b in v.to_bits().to_le_bytes() {
                hash ^= u64::from(b);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
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

/// Environment variable: seconds a stopping run (SIGTERM) waits for its last checkpoint to be
/// written before it exits anyway (default 20, under Kubernetes' 30 s grace period).
pub const STOP_GRACE_ENV: &str = "ENDOFM_STOP_GRACE_S";

/// The stop grace period ([`STOP_GRACE_ENV`]).
pub fn stop_grace() -> std::time::Duration {
    std::env::var(STOP_GRACE_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(
            std::time::Duration::from_secs(20),
            std::time::Duration::from_secs_f64,
        )
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
    crate::data::loader::watch_stop_flag(Arc::clone(&flag));
    Ok(flag)
}

/// Whether to draw a progress bar by default (stderr is a terminal).
pub fn progress_default() -> bool {
    std::io::stderr().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_run_into_the_same_local_output_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let uri = StorageUri::parse(dir.path().to_str().unwrap()).unwrap();
        let first = lock_output(&uri).unwrap();
        assert!(first.is_some());
        let err = lock_output(&uri).unwrap_err().to_string();
        assert!(err.contains("in use by another run"), "{err}");
        drop(first);
        assert!(
            lock_output(&uri).unwrap().is_some(),
            "released with its holder"
        );
    }
}
