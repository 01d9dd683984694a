//! Pre-training as a task of the run machinery ([`crate::run`]): validates the configuration,
//! opens the corpus and the output location (refusing bad input before any work), and hands
//! [`crate::run::drive`] a task made of the teacher-student trainer ([`SslTrainer`]) and the
//! multi-view loader; the checkpoint holds the student, the teacher, AdamW's moments and the
//! loss centre. The distributed service runs the same function on every rank with its own
//! [`Collective`].

pub mod probe;
pub mod report;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use endofm_shared::{ModelConfig, PretrainConfig, StorageUri};

use crate::collective::Collective;
use crate::data::ViewConfig;
use crate::data::loader::{self, Corpus, Loader, LoaderConfig};
use crate::model::{LoadMode, weights};
use crate::run::checkpoint::{Checkpointable, Committed, Manifest, Snapshot, host, host_vars};
use crate::run::{self, RunSettings, StepOutcome, Task};
use crate::store::Store;
use crate::train::diagnostics::CollapseMonitor;
use crate::train::step::{LossScaler, SslTrainer};
use crate::{Error, Result};
use probe::{Probe, ProbeSpec};

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

pub use crate::init::InitSource;
pub use crate::run::{MetricsLine, RunObserver, Summary, progress_default, stop_on_signals};

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
    /// A k-NN probe of the teacher's features on a labelled dataset, every few steps.
    pub probe: Option<ProbeSpec>,
}

/// The settings that shape training and differ between a checkpoint's run (`theirs`) and this
/// one, as `name theirs (here ours)`; checkpoint and logging intervals may change on resume.
fn changed_trained_fields(theirs: &PretrainConfig, ours: &PretrainConfig) -> Vec<String> {
    let norm = |c: &PretrainConfig| {
        serde_json::to_value(PretrainConfig {
            checkpoint_every: 0,
            keep_checkpoints: 1,
            log_every: 1,
            ..c.clone()
        })
        .unwrap_or_default()
    };
    let (theirs, ours) = (norm(theirs), norm(ours));
    ours.as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| theirs.get(k.as_str()) != Some(*v))
        .map(|(k, v)| {
            let was = theirs.get(k.as_str()).cloned().unwrap_or_default();
            format!("{k} {was} (here {v})")
        })
        .collect()
}

fn load_init(trainer: &mut SslTrainer, init: &InitSource) -> Result<()> {
    let local = init.localise()?;
    match &local.source {
        InitSource::Remote(_) => unreachable!("localise returns a local source"),
        InitSource::Folder(dir) => {
            let student = local.require(
                "student.safetensors",
                "pre-training starts from a student; a fine-tuned model cannot initialise it",
            )?;
            let teacher = dir.join("teacher.safetensors");
            trainer
                .load_weights(&student, teacher.is_file().then_some(teacher.as_path()))
                .map_err(|e| named_for_user(e, dir, local.origin()))?;
        }
        InitSource::Weights(path) => {
            trainer
                .load_weights(path, None)
                .map_err(|e| named_for_user(e, path, local.origin()))?;
        }
        InitSource::Pickle(path) => {
            let tmp = tempfile::tempdir().map_err(|source| Error::Io {
                action: "creating a temporary directory",
                path: std::env::temp_dir(),
                source,
            })?;
            crate::convert::import(&crate::convert::python(None), path, tmp.path(), false)?;
            load_init(trainer, &InitSource::Folder(tmp.path().to_path_buf()))
                .map_err(|e| named_for_user(e, tmp.path(), &path.display().to_string()))?;
        }
    }
    Ok(())
}

/// `e` with the temporary or downloaded location `local` replaced by what the user named
/// (`origin`), so that a message never points at a file that is gone when it is read.
fn named_for_user(e: Error, local: &std::path::Path, origin: &str) -> Error {
    let text = e.to_string();
    let shown = local.display().to_string();
    if shown == origin || !text.contains(&shown) {
        return e;
    }
    Error::Input {
        name: "--init".into(),
        reason: text.replace(&shown, origin.trim_end_matches('/')),
    }
}

/// Pre-training as a [`Task`]: the trainer, the corpus and (once started) its loader.
struct SslTask<'a> {
    job: &'a PretrainJob,
    trainer: SslTrainer,
    corpus: Arc<Corpus>,
    loader: Option<Loader>,
    rank: usize,
    world: usize,
    /// Watches the collapse diagnostics (not checkpointed: a resumed run starts a new window).
    monitor: CollapseMonitor,
    /// The k-NN probe, when asked for.
    probe: Option<Probe>,
}

impl SslTask<'_> {
    /// Runs the probe on the teacher; a failure is logged and recorded, never fatal (the probe
    /// only observes).
    fn probe(&self, extra: &mut serde_json::Map<String, serde_json::Value>, key: &str) {
        let Some(probe) = &self.probe else { return };
        let started = std::time::Instant::now();
        match probe.run(self.trainer.teacher()) {
            Ok(r) => {
                extra.insert(key.into(), serde_json::json!(r.accuracy));
                tracing::info!(
                    accuracy = r.accuracy,
                    bank = r.bank,
                    queries = r.queries,
                    k = r.k,
                    secs = started.elapsed().as_secs_f64(),
                    "{key}"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "k-NN probe failed");
                extra.insert(format!("{key}_error"), serde_json::json!(e.to_string()));
            }
        }
    }
}

const SSL_FILES: [&str; 4] = [
    "student.safetensors",
    "teacher.safetensors",
    "optimizer.safetensors",
    "state.safetensors",
];

impl Checkpointable for SslTrainer {
    fn snapshot(&self) -> Snapshot {
        let opt = self.optimizer();
        let mut optimizer = BTreeMap::new();
        for e in self.student_flat().trainable() {
            optimizer.insert(
                format!("exp_avg.{}", e.name),
                host(&opt.exp_avg().narrow(0, e.offset, e.numel)),
            );
            optimizer.insert(
                format!("exp_avg_sq.{}", e.name),
                host(&opt.exp_avg_sq().narrow(0, e.offset, e.numel)),
            );
        }
        let mut state = BTreeMap::new();
        state.insert("center".to_string(), host(self.objective().center()));
        let mut extra = serde_json::Map::new();
        extra.insert(
            "optimizer_steps".into(),
            serde_json::json!([opt.steps, opt.last_layer_steps]),
        );
        extra.insert(
            "scaler".into(),
            serde_json::to_value(self.scaler()).unwrap_or_default(),
        );
        extra.insert(
            "train".into(),
            serde_json::to_value(self.config()).unwrap_or_default(),
        );
        Snapshot {
            files: vec![
                (SSL_FILES[0].into(), host_vars(self.student().var_store())),
                (SSL_FILES[1].into(), host_vars(self.teacher().var_store())),
                (SSL_FILES[2].into(), optimizer),
                (SSL_FILES[3].into(), state),
            ],
            extra,
        }
    }

    fn restore(&mut self, c: &Committed<'_>) -> Result<()> {
        {
            let (student, teacher) = self.networks_mut();
            for (name, net) in [(SSL_FILES[0], student), (SSL_FILES[1], teacher)] {
                weights::load_tensors(
                    net.var_store(),
                    c.read(name)?,
                    &c.origin(name),
                    LoadMode::Strict,
                )?;
            }
        }
        let opt = c.read(SSL_FILES[2])?;
        let device = self.student().device();
        let mut m = Vec::new();
        let mut v = Vec::new();
        for e in self.student_flat().trainable() {
            for (prefix, out) in [("exp_avg", &mut m), ("exp_avg_sq", &mut v)] {
                let key = format!("{prefix}.{}", e.name);
                let t = opt.get(&key).ok_or_else(|| Error::MissingKey {
                    path: c.origin(SSL_FILES[2]),
                    key: key.clone(),
                    expected: vec![e.numel],
                })?;
                if t.numel() as i64 != e.numel {
                    return Err(Error::ShapeMismatch {
                        path: c.origin(SSL_FILES[2]),
                        key,
                        expected: vec![e.numel],
                        found: t.size(),
                    });
                }
                out.push(t.reshape([-1]).to_device(device));
            }
        }
        let (steps, last): (u64, u64) = c.manifest().field("optimizer_steps")?;
        self.optimizer_mut()
            .restore(&Tensor::cat(&m, 0), &Tensor::cat(&v, 0), steps, last)?;
        let state = c.read(SSL_FILES[3])?;
        let expected = self.objective().center().size();
        let center = state.get("center").ok_or_else(|| Error::MissingKey {
            path: c.origin(SSL_FILES[3]),
            key: "center".into(),
            expected: expected.clone(),
        })?;
        if center.size() != expected {
            return Err(Error::ShapeMismatch {
                path: c.origin(SSL_FILES[3]),
                key: "center".into(),
                expected,
                found: center.size(),
            });
        }
        self.objective_mut().set_center(center.to_device(device));
        let scaler: Option<LossScaler> = c.manifest().field("scaler").unwrap_or(None);
        self.set_scaler(scaler);
        Ok(())
    }
}

impl Checkpointable for SslTask<'_> {
    fn snapshot(&self) -> Snapshot {
        self.trainer.snapshot()
    }
    fn restore(&mut self, c: &Committed<'_>) -> Result<()> {
        self.trainer.restore(c)
    }
}

impl Task for SslTask<'_> {
    type Batch = Vec<Tensor>;

    fn bad_inputs(&self) -> Vec<(String, String)> {
        self.loader
            .as_ref()
            .map(|l| {
                l.bad_clips()
                    .into_values()
                    .map(|b| (b.uri, b.reason))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn iters_per_epoch(&self) -> usize {
        self.trainer.iters_per_epoch()
    }
    fn total_steps(&self) -> usize {
        self.trainer.total_steps()
    }
    fn samples_per_step(&self) -> usize {
        self.job.train.batch_per_rank * self.world
    }
    fn check_resume(&self, m: &Manifest) -> Result<()> {
        let theirs: PretrainConfig = m.field("train")?;
        let changed = changed_trained_fields(&theirs, &self.job.train);
        if !changed.is_empty() {
            return Err(Error::Input {
                name: "--out".into(),
                reason: format!(
                    "{} holds checkpoints of a run with other hyper-parameters: {}; use a new output location or the same settings",
                    self.job.out,
                    changed.join(", ")
                ),
            });
        }
        Ok(())
    }
    fn initialise(&mut self) -> Result<()> {
        if let Some(init) = &self.job.init {
            load_init(&mut self.trainer, init)?;
            tracing::info!(?init, "initialised from weights");
        }
        Ok(())
    }
    fn start_data(&mut self, step: usize) -> Result<()> {
        self.loader = Some(Loader::start(
            Arc::clone(&self.corpus),
            LoaderConfig {
                seed: self.job.train.seed,
                batch: self.job.train.batch_per_rank,
                rank: self.rank,
                world: self.world,
                threads: self.job.data_threads,
                prefetch: self.job.train.batch_per_rank * 4,
                views: self.job.views.clone(),
            },
            step,
        )?);
        Ok(())
    }
    fn next_batch(&mut self) -> Result<(Vec<Tensor>, f64)> {
        let loader = self.loader.as_mut().ok_or_else(|| Error::Input {
            name: "loader".into(),
            reason: "not started".into(),
        })?;
        let batch = loader.next_batch()?;
        let views = batch
            .views
            .iter()
            .map(|v| v.to_device(self.job.device))
            .collect();
        Ok((views, batch.wait_s))
    }
    fn step(
        &mut self,
        views: Vec<Tensor>,
        step: usize,
        collective: &mut dyn Collective,
    ) -> Result<StepOutcome> {
        let mut extra = serde_json::Map::new();
        if step == 0 {
            // The random (or given) initialisation's score, to compare against.
            self.probe(&mut extra, "probe_acc_before");
        }
        let stats = self.trainer.step(&views, step, collective)?;
        extra.insert("wd".into(), serde_json::json!(stats.wd));
        extra.insert("momentum".into(), serde_json::json!(stats.momentum));
        extra.insert("teacher_temp".into(), serde_json::json!(stats.teacher_temp));
        extra.insert("skipped".into(), serde_json::json!(stats.skipped));
        let d = stats.diagnostics;
        extra.insert(
            "teacher_entropy".into(),
            serde_json::json!(d.teacher_entropy),
        );
        extra.insert("batch_entropy".into(), serde_json::json!(d.batch_entropy));
        extra.insert("kl".into(), serde_json::json!(d.kl));
        if let Some(w) = self.monitor.observe(&d)
            && self.rank == 0
        {
            tracing::warn!(step, collapse = w.kind.name(), "{}", w.message);
        }
        if let Some(kind) = self.monitor.active() {
            extra.insert("collapse".into(), serde_json::json!(kind.name()));
        }
        let end = self.job.max_steps.map_or(self.trainer.total_steps(), |m| {
            m.min(self.trainer.total_steps())
        });
        if self.probe.as_ref().is_some_and(|p| p.due(step + 1, end)) {
            self.probe(&mut extra, "probe_acc");
        }
        Ok(StepOutcome {
            epoch: stats.epoch,
            loss: stats.loss,
            lr: stats.lr,
            extra,
        })
    }
    fn inputs_failed(&self) -> u64 {
        self.loader.as_ref().map_or(0, |l| {
            l.stats()
                .clips_failed
                .load(std::sync::atomic::Ordering::Relaxed)
        })
    }
    fn progress_message(&self, line: &run::MetricsLine) -> String {
        let num = |k: &str| line.extra.get(k).and_then(serde_json::Value::as_f64);
        let mut msg = format!("loss {:.4}", line.loss);
        if let (Some(h), Some(hb), Some(kl)) =
            (num("teacher_entropy"), num("batch_entropy"), num("kl"))
        {
            msg.push_str(&format!(
                " H(teacher) {h:.2}/{:.2} H(batch mean) {hb:.2} KL {kl:.3}",
                self.monitor.ln_k()
            ));
        }
        msg.push_str(&format!(" {:.2} clips/s", line.samples_per_s));
        if let Some(kind) = line
            .extra
            .get("collapse")
            .and_then(serde_json::Value::as_str)
        {
            msg.push_str(&format!(" COLLAPSE ({kind})"));
        }
        msg
    }
}

/// Runs (or resumes) pre-training on this rank.
pub fn run(job: &PretrainJob, collective: &mut dyn Collective) -> Result<Summary> {
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
    // The probe set is read (and decoded) before the output location is touched.
    let probe = match &job.probe {
        Some(spec) => Some(Probe::open(
            spec.clone(),
            &job.model,
            job.data_threads,
            ipe,
        )?),
        None => None,
    };
    let out = Store::open(&job.out, true)?;
    let settings = RunSettings {
        out: job.out.clone(),
        model: job.model.clone(),
        corpus: corpus.fingerprint(),
        resolved_config: serde_json::json!({
            "kind": "pretrain",
            "preset": job.preset,
            "data": job.data.to_string(),
            "list": job.list,
            "world_size": world,
            "model": job.model,
            "train": job.train,
            "views": job.views,
        }),
        max_steps: job.max_steps,
        checkpoint_every: job.train.checkpoint_every,
        keep_checkpoints: job.train.keep_checkpoints,
        log_every: job.train.log_every,
        progress: job.progress,
        device: job.device,
        stop: Arc::clone(&job.stop),
        observer: job.observer.clone(),
    };
    let trainer = SslTrainer::new(&job.model, &job.train, job.device, ipe, world)?;
    let monitor = CollapseMonitor::new(
        job.model.head.out_dim,
        job.train.batch_per_rank * world,
        CollapseMonitor::default_window(trainer.total_steps()),
    );
    let mut task = SslTask {
        job,
        trainer,
        corpus,
        loader: None,
        rank,
        world,
        monitor,
        probe,
    };
    let summary = run::drive(&mut task, &settings, &out, collective)?;
    if rank == 0 {
        // The report observes the run: failing to write it is logged, not fatal.
        let ln_k = (job.model.head.out_dim.max(1) as f64).ln();
        match report::publish(&out, summary.total_steps, summary.interrupted, ln_k) {
            Ok(at) => tracing::info!(report = %at, "pre-training report written"),
            Err(e) => tracing::warn!(error = %e, "pre-training report not written"),
        }
    }
    Ok(summary)
}

/// The rank digests' switch (see [`crate::run::PARAM_DIGESTS_ENV`]).
pub use crate::run::PARAM_DIGESTS_ENV;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Solo;
    use crate::data::CorpusFingerprint;
    use crate::run::checkpoint::{Writer, committed, latest, restore};
    use tch::Kind;

    fn small() -> ModelConfig {
        crate::test_support::small_model(1)
    }

    fn views(step: usize) -> Vec<Tensor> {
        let base = Tensor::arange(3 * 4 * 32 * 32, (Kind::Float, Device::Cpu));
        let g = (base * (0.001 * (step + 1) as f64))
            .sin()
            .reshape([1, 3, 4, 32, 32]);
        let l = g
            .narrow(2, 0, 2)
            .narrow(3, 0, 16)
            .narrow(4, 0, 16)
            .contiguous();
        vec![
            g.shallow_clone(),
            g.flip([2]),
            l.shallow_clone(),
            l.flip([3]),
        ]
    }

    fn manifest(trainer: &SslTrainer, step: usize) -> Manifest {
        Manifest {
            version: 1,
            step,
            epoch: step / trainer.iters_per_epoch(),
            iters_per_epoch: trainer.iters_per_epoch(),
            total_steps: trainer.total_steps(),
            world_size: 1,
            corpus: CorpusFingerprint::of(&["a.mp4".to_string()]),
            model: small(),
            files: BTreeMap::new(),
            created_unix: 0,
            extra: serde_json::Map::new(),
        }
    }

    #[test]
    fn resumed_training_equals_uninterrupted() {
        let _rng = crate::test_support::rng_lock();
        for two_threads in [false, true] {
            resume_case(two_threads);
        }
    }

    fn resume_case(two_threads: bool) {
        let cfg = PretrainConfig {
            epochs: 2,
            batch_per_rank: 1,
            warmup_epochs: 1,
            lr: 0.1,
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            &StorageUri::parse(dir.path().to_str().unwrap()).unwrap(),
            true,
        )
        .unwrap();

        let mut straight = SslTrainer::new(&small(), &cfg, Device::Cpu, 3, 1).unwrap();
        straight.set_two_threads(two_threads).unwrap();
        for step in 0..6 {
            straight.step(&views(step), step, &mut Solo).unwrap();
        }

        let mut first = SslTrainer::new(&small(), &cfg, Device::Cpu, 3, 1).unwrap();
        first.set_two_threads(two_threads).unwrap();
        let mut writer = Writer::new(store.clone(), 2);
        for step in 0..4 {
            first.step(&views(step), step, &mut Solo).unwrap();
            writer.save(&first, manifest(&first, step + 1)).unwrap();
        }
        writer.finish().unwrap();
        drop(first);
        assert_eq!(
            committed(&store).unwrap(),
            vec![3, 4],
            "keeps the newest two"
        );

        let m = latest(&store).unwrap().unwrap();
        assert_eq!(m.step, 4);
        assert_eq!(m.field::<PretrainConfig>("train").unwrap(), cfg);
        let mut resumed = SslTrainer::new(&small(), &cfg, Device::Cpu, 3, 1).unwrap();
        resumed.set_two_threads(two_threads).unwrap();
        restore(&store, &m, &mut resumed).unwrap();
        for step in m.step..6 {
            resumed.step(&views(step), step, &mut Solo).unwrap();
        }
        assert!(
            resumed
                .student_flat()
                .buffer()
                .equal(straight.student_flat().buffer()),
            "student differs"
        );
        assert!(
            resumed
                .teacher_flat()
                .buffer()
                .equal(straight.teacher_flat().buffer()),
            "teacher differs"
        );
        assert!(
            resumed
                .objective()
                .center()
                .equal(straight.objective().center())
        );
    }

    /// Issue 11 item 7: a resume refusal names every changed training setting, and only those.
    #[test]
    fn changed_settings_are_named() {
        let ours = PretrainConfig::default();
        let same_but_intervals = PretrainConfig {
            checkpoint_every: 7,
            log_every: 3,
            keep_checkpoints: 9,
            ..ours.clone()
        };
        assert!(changed_trained_fields(&same_but_intervals, &ours).is_empty());
        let theirs = PretrainConfig {
            lr: 1e-3,
            seed: 4,
            ..ours.clone()
        };
        let changed = changed_trained_fields(&theirs, &ours);
        assert_eq!(changed, ["lr 0.001 (here 0.0005)", "seed 4 (here 0)"]);
    }
}
