//! Video classification (PolypDiag) as the published `eval_finetune.py` fine-tunes it: the
//! backbone with drop-path and a linear layer on the CLS feature ([`Classifier`]),
//! cross-entropy on the batch mean, SGD momentum 0.9 without weight decay over every parameter
//! at `lr · global batch / 256`, cosine-annealed per epoch, gradients averaged over the ranks.
//! Validation at epoch ends picks the model (binary F1 on the validation split; the published
//! code picks on its test split); the chosen model is then scored once on every split.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use tch::{Device, Kind, Tensor};

use endofm_shared::{FinetuneConfig, TaskKind, TrainPrecision};

use super::sgd::{Sgd, cosine_lr};
use super::{BEST, EvaluateJob, FinetuneJob, ModelInfo, Outcome, load_backbone, locate_model};
use crate::collective::Collective;
use crate::data::CorpusFingerprint;
use crate::datasets::classify::{ClassifyEval, ClassifyLoader, iters_per_epoch};
use crate::datasets::{PolypDiag, Split};
use crate::eval::metrics::{BinaryMetrics, BinaryPrediction};
use crate::eval::plots::write_report_plots;
use crate::eval::report::{EpochRecord, REPORT_FILE, Report, Selection, SplitMetrics};
use crate::model::{Classifier, LoadMode};
use crate::precision::{Precision, with_precision};
use crate::run::checkpoint::{Checkpointable, Committed, Manifest, Snapshot, host_vars};
use crate::run::{self, MetricsLine, StepOutcome, Task};
use crate::store::Store;
use crate::train::step::step_seed;
use crate::{Error, Result};

/// Class names of PolypDiag's labels 0 and 1.
pub const CLASS_NAMES: [&str; 2] = ["normal", "abnormal"];
/// Classes of the published classifier.
pub const NUM_LABELS: usize = 2;
/// The validation metric models are chosen by.
pub const SELECT_BY: &str = "f1";

/// The precision a fine-tuning setting resolves to on `device` (fp16 refused: no loss scaler).
pub fn resolve_precision(p: TrainPrecision, device: Device) -> Result<Precision> {
    match crate::train::step::resolve_precision(p, device)? {
        Precision::Fp16 => Err(endofm_shared::Error::invalid(
            "precision",
            "fp16 fine-tuning is not supported (no loss scaler); use bf16 or fp32",
        )
        .into()),
        other => Ok(other),
    }
}

/// The per-epoch record kept across checkpoints.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct State {
    /// Loss sum and count of the epoch in progress (this rank).
    epoch_loss: (f64, u64),
    /// One record per finished epoch.
    history: Vec<EpochRecord>,
    /// The chosen epoch and its validation F1.
    best: Option<(usize, f64)>,
    /// SGD updates done.
    sgd_steps: u64,
}

struct ClassifyTask<'a> {
    job: &'a FinetuneJob,
    model: Classifier,
    sgd: Sgd,
    dataset: Arc<PolypDiag>,
    loader: Option<ClassifyLoader>,
    out: Store,
    rank: usize,
    world: usize,
    ipe: usize,
    precision: Precision,
    state: State,
    init: String,
}

impl Checkpointable for ClassifyTask<'_> {
    fn snapshot(&self) -> Snapshot {
        let mut state = self.state.clone();
        state.sgd_steps = self.sgd.steps;
        let extra = self.job.checkpoint_extra(
            serde_json::Map::new(),
            serde_json::to_value(&state).unwrap_or_default(),
            &self.init,
        );
        Snapshot {
            files: vec![
                (
                    "model.safetensors".into(),
                    host_vars(self.model.var_store()),
                ),
                ("optimizer.safetensors".into(), self.sgd.state()),
            ],
            extra,
        }
    }

    fn restore(&mut self, c: &Committed<'_>) -> Result<()> {
        let state: State = c.manifest().field("state")?;
        crate::finetune::restore_model(self.model.var_store(), c)?;
        self.sgd.load_state(
            &c.read("optimizer.safetensors")?,
            &c.origin("optimizer.safetensors"),
            state.sgd_steps,
        )?;
        self.init = c.manifest().field("init").unwrap_or_default();
        self.state = state;
        Ok(())
    }
}

/// Scores `split` with `model` on every rank's share and gathers the predictions (in split
/// order) and the mean loss on every rank.
#[allow(clippy::too_many_arguments)]
fn score_split(
    model: &Classifier,
    dataset: &Arc<PolypDiag>,
    split: Split,
    cfg: &FinetuneConfig,
    rank: usize,
    world: usize,
    threads: usize,
    precision: Precision,
    collective: &mut dyn Collective,
) -> Result<(Vec<BinaryPrediction>, f64)> {
    let n = dataset.split(split)?.len();
    let device = model.device();
    // Rows: [present, label, logit0, logit1, loss]; summed over ranks, each row set by one.
    let mut rows = vec![0f32; n * 5];
    for batch in ClassifyEval::start(Arc::clone(dataset), split, cfg, rank, world, threads)? {
        let batch = batch?;
        let x = batch.videos.to_device(device);
        let logits = with_precision(precision, device, || {
            tch::no_grad(|| model.forward_t(&x, false).1)
        })?
        .to_kind(Kind::Float)
        .to_device(Device::Cpu);
        let losses = logits.cross_entropy_loss::<Tensor>(
            &batch.labels,
            None,
            tch::Reduction::None,
            -100,
            0.0,
        );
        let logits: Vec<f32> = Vec::try_from(logits.flatten(0, -1))?;
        let losses: Vec<f32> = Vec::try_from(losses)?;
        let labels: Vec<i64> = Vec::try_from(&batch.labels)?;
        for (j, &index) in batch.indices.iter().enumerate() {
            let r = &mut rows[index * 5..index * 5 + 5];
            r[0] = 1.0;
            r[1] = labels[j] as f32;
            r[2] = logits[2 * j];
            r[3] = logits[2 * j + 1];
            r[4] = losses[j];
        }
    }
    if world > 1 {
        let mut t = Tensor::from_slice(&rows).to_device(device);
        collective.all_reduce_sum(&mut t)?;
        rows = Vec::try_from(t.to_device(Device::Cpu))?;
    }
    let mut preds = Vec::with_capacity(n);
    let mut loss = 0.0;
    for (i, r) in rows.chunks_exact(5).enumerate() {
        if r[0] != 1.0 {
            return Err(Error::Input {
                name: format!("{split} split"),
                reason: format!("video {i} was scored {} times across the ranks", r[0]),
            });
        }
        preds.push(BinaryPrediction::from_logits(r[1] as i64, [r[2], r[3]])?);
        loss += f64::from(r[4]);
    }
    Ok((preds, loss / n.max(1) as f64))
}

impl ClassifyTask<'_> {
    fn epochs(&self) -> usize {
        self.job.cfg.epochs
    }

    fn lr(&self, epoch: usize) -> f64 {
        cosine_lr(
            self.job.cfg.scaled_lr(self.world),
            self.job.cfg.min_lr,
            epoch,
            self.epochs(),
        )
    }

    fn write_best(&self, epoch: usize, value: f64) -> Result<()> {
        self.out.put(
            &format!("{BEST}/model.safetensors"),
            crate::run::checkpoint::encode(&host_vars(self.model.var_store()))?,
        )?;
        let info = ModelInfo {
            task: TaskKind::Classify,
            model: self.model.config().clone(),
            num_labels: NUM_LABELS,
            finetune: self.job.cfg.clone(),
            epoch: Some(epoch),
            selected_by: Some((format!("val_{SELECT_BY}"), value)),
            segmenter: None,
            detector: None,
        };
        self.out.put(
            &format!("{BEST}/info.json"),
            Bytes::from(serde_json::to_vec_pretty(&info).unwrap_or_default()),
        )
    }
}

impl Task for ClassifyTask<'_> {
    type Batch = (Tensor, Tensor);

    fn iters_per_epoch(&self) -> usize {
        self.ipe
    }
    fn total_steps(&self) -> usize {
        self.ipe * self.epochs()
    }
    fn samples_per_step(&self) -> usize {
        self.job.cfg.batch_per_rank * self.world
    }
    fn check_resume(&self, m: &Manifest) -> Result<()> {
        super::check_resume(m, TaskKind::Classify, self.job, |_| Ok(()))
    }
    fn initialise(&mut self) -> Result<()> {
        if let Some(init) = &self.job.init {
            self.init = load_backbone(self.model.var_store(), init, self.job.cfg.init_from)?;
            tracing::info!(init = %self.init, "backbone initialised");
        } else {
            tracing::warn!("no --init: the backbone starts from random weights");
        }
        Ok(())
    }
    fn start_data(&mut self, step: usize) -> Result<()> {
        self.loader = Some(ClassifyLoader::start(
            Arc::clone(&self.dataset),
            Split::Train,
            &self.job.cfg,
            self.rank,
            self.world,
            self.job.data_threads,
            step,
        )?);
        Ok(())
    }
    fn next_batch(&mut self) -> Result<((Tensor, Tensor), f64)> {
        let loader = self.loader.as_mut().ok_or_else(|| Error::Input {
            name: "loader".into(),
            reason: "not started".into(),
        })?;
        let b = loader.next_batch()?;
        Ok((
            (
                b.videos.to_device(self.job.device),
                b.labels.to_device(self.job.device),
            ),
            b.wait_s,
        ))
    }
    fn step(
        &mut self,
        (videos, labels): (Tensor, Tensor),
        step: usize,
        collective: &mut dyn Collective,
    ) -> Result<StepOutcome> {
        let epoch = step / self.ipe;
        let lr = self.lr(epoch);
        let seed = step_seed(self.job.cfg.seed, step, self.rank) as u64;
        let value = train_step(
            &self.model,
            &mut self.sgd,
            self.precision,
            (&videos, &labels),
            seed,
            lr,
            collective,
        )?;
        if !value.is_finite() {
            // Another attempt would repeat it: the failure class is `non_finite_loss`.
            return Err(Error::Input {
                name: "loss".into(),
                reason: format!(
                    "non-finite loss {value} at step {step} (lr {lr:e}); lower the learning rate"
                ),
            });
        }
        self.state.epoch_loss.0 += value;
        self.state.epoch_loss.1 += 1;
        Ok(StepOutcome {
            epoch,
            loss: value,
            lr,
            extra: serde_json::Map::new(),
        })
    }
    fn end_epoch(
        &mut self,
        epoch: usize,
        collective: &mut dyn Collective,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
        let (sum, count) = std::mem::take(&mut self.state.epoch_loss);
        let train_loss = super::mean_over_ranks(sum, count, self.job.device, collective)?;
        let mut record = EpochRecord {
            epoch,
            train_loss_mean: Some(train_loss),
            val: BTreeMap::new(),
        };
        let last = epoch + 1 == self.epochs();
        let has_val = self.dataset.split(Split::Val).is_ok();
        if has_val && ((epoch + 1).is_multiple_of(self.job.cfg.val_every) || last) {
            let (preds, loss) = score_split(
                &self.model,
                &self.dataset,
                Split::Val,
                &self.job.cfg,
                self.rank,
                self.world,
                self.job.data_threads,
                self.precision,
                collective,
            )?;
            let metrics = BinaryMetrics::from_predictions(&preds)?;
            record.val = metrics.scalars();
            record.val.insert("loss".into(), loss);
            let f1 = metrics.f1;
            // Strictly better only (the published rule), the first validation always counts.
            if self.state.best.is_none_or(|(_, b)| f1 > b) {
                self.state.best = Some((epoch, f1));
                if self.rank == 0 {
                    self.write_best(epoch, f1)?;
                }
            }
        } else if !has_val && last {
            // No validation split: the last epoch is the model.
            self.state.best = Some((epoch, f64::NAN));
            if self.rank == 0 {
                self.write_best(epoch, f64::NAN)?;
            }
        }
        let mut line = serde_json::Map::new();
        line.insert("train_loss_mean".into(), serde_json::json!(train_loss));
        for (k, v) in &record.val {
            line.insert(format!("val_{k}"), serde_json::json!(v));
        }
        line.insert("lr".into(), serde_json::json!(self.lr(epoch)));
        self.state.history.push(record);
        Ok(Some(line))
    }
    fn checkpoint_epochs(&self) -> bool {
        true
    }
    fn progress_message(&self, line: &MetricsLine) -> String {
        let best = self
            .state
            .best
            .filter(|(_, v)| v.is_finite())
            .map_or(String::new(), |(e, v)| {
                format!(" best val F1 {v:.3} (epoch {e})")
            });
        format!(
            "loss {:.4} {:.2} videos/s{best}",
            line.loss, line.samples_per_s
        )
    }
}

/// One complete fine-tuning iteration on this rank, as the published `train()` does it: forward
/// in train mode (drop-path masks from `seed`), cross-entropy on the batch mean (float32),
/// backward, gradients averaged over the ranks, SGD update at `lr`. `videos` is
/// (B, 3, T, H, W) float32, `labels` (B,) int64, both on the model's device. Returns the loss.
pub fn train_step(
    model: &Classifier,
    sgd: &mut Sgd,
    precision: Precision,
    (videos, labels): (&Tensor, &Tensor),
    seed: u64,
    lr: f64,
    collective: &mut dyn Collective,
) -> Result<f64> {
    let device = model.device();
    let loss = crate::model::timesformer::with_drop_path_seed(seed, || {
        with_precision(precision, device, || {
            let (_, logits) = model.forward_t(videos, true);
            logits.to_kind(Kind::Float).cross_entropy_for_logits(labels)
        })
    })?;
    loss.backward();
    sgd.all_reduce_grads(collective)?;
    sgd.step(lr);
    Ok(loss.double_value(&[]))
}

/// An SGD optimiser over every parameter of `model`, in key order (the all-reduce layout).
pub fn optimizer_for(model: &Classifier, cfg: &FinetuneConfig) -> Sgd {
    let mut params: Vec<(String, Tensor)> = model.var_store().variables().into_iter().collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    Sgd::new(params, cfg.momentum, cfg.weight_decay)
}

/// Opens the dataset and checks every split a run reads (train, and val/test when listed).
/// Opens the dataset and checks every video of every split opens and has frames, so a bad
/// validation or test video is found before training, not after it.
fn open_dataset(data: &endofm_shared::StorageUri) -> Result<Arc<PolypDiag>> {
    let ds = PolypDiag::open(data)?;
    ds.split(Split::Train)?;
    for split in ds.splits().collect::<Vec<_>>() {
        for entry in ds.split(split)? {
            let info = ds.open_media(entry)?.info();
            if info.frames == 0 {
                return Err(Error::Input {
                    name: ds.describe(entry),
                    reason: format!("has no frames ({split} split)"),
                });
            }
        }
    }
    Ok(Arc::new(ds))
}

/// Fine-tunes, then scores the model chosen on validation on every split (rank 0 writes the
/// report).
pub fn finetune(job: &FinetuneJob, collective: &mut dyn Collective) -> Result<Outcome> {
    job.cfg.validate()?;
    let mut model_cfg = job.model.clone();
    model_cfg.drop_path_rate = job.cfg.drop_path_rate;
    model_cfg.validate()?;
    let precision = resolve_precision(job.cfg.precision, job.device)?;
    let rank = collective.rank();
    let world = collective.world_size();
    let dataset = open_dataset(&job.data)?;
    let train = dataset.split(Split::Train)?;
    let ipe = iters_per_epoch(train.len(), job.cfg.batch_per_rank, world);
    if ipe == 0 {
        return Err(Error::Input {
            name: "--data".into(),
            reason: format!(
                "{}: the train split lists {} videos, fewer than one global batch ({} per rank × {world} ranks)",
                job.data,
                train.len(),
                job.cfg.batch_per_rank
            ),
        });
    }
    let keys: Vec<String> = dataset
        .splits()
        .flat_map(|s| {
            dataset
                .split(s)
                .map(|e| {
                    e.iter()
                        .map(|v| format!("{s}/{},{}", v.name, v.label))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .collect();
    let out = Store::open(&job.out, true)?;
    // Initialisation is seeded so every rank starts from the same classifier.
    let model = {
        // The training loop never reads libtorch's global generator (drop-path uses per-step
        // streams), so seeding it here only fixes the initialisation.
        tch::manual_seed(job.cfg.seed as i64);
        Classifier::new(&model_cfg, NUM_LABELS, job.device)?
    };
    let sgd = optimizer_for(&model, &job.cfg);
    let settings = job.run_settings(
        &model_cfg,
        world,
        CorpusFingerprint::of(&keys),
        serde_json::Map::new(),
    );
    let mut task = ClassifyTask {
        job,
        model,
        sgd,
        dataset: Arc::clone(&dataset),
        loader: None,
        out: out.clone(),
        rank,
        world,
        ipe,
        precision,
        state: State::default(),
        init: "random".into(),
    };
    let summary = run::drive(&mut task, &settings, &out, collective)?;
    task.loader = None;
    let Some((best_epoch, best_value)) = super::load_chosen(
        task.model.var_store(),
        &out,
        &summary,
        task.total_steps(),
        task.state.best,
    )?
    else {
        return Ok(Outcome::unfinished(summary));
    };
    let mut report = Report::new(
        TaskKind::Classify,
        task.init.clone(),
        settings.resolved_config.clone(),
    );
    report.history = task.state.history.clone();
    let has_val = dataset.split(Split::Val).is_ok();
    if has_val {
        report.selection = Some(Selection {
            epoch: best_epoch,
            split: "val".into(),
            metric: SELECT_BY.into(),
            value: best_value,
        });
        report.notes.push(
            "Model selection used the validation split only; the test split was scored once, by the chosen model. (The published eval_finetune.py selects its best epoch on the split it reports.)".into(),
        );
    } else {
        report.notes.push(
            "The dataset has no validation split: the last epoch's model is reported, without selection.".into(),
        );
    }
    for split in [Split::Train, Split::Val, Split::Test] {
        if dataset.split(split).is_err() {
            continue;
        }
        let (preds, loss) = score_split(
            &task.model,
            &dataset,
            split,
            &job.cfg,
            rank,
            world,
            job.data_threads,
            precision,
            collective,
        )?;
        let metrics = BinaryMetrics::from_predictions(&preds)?;
        let mut m = SplitMetrics::from_binary(&metrics, CLASS_NAMES);
        m.metrics.insert("loss".into(), loss);
        report.splits.insert(split.name().to_string(), m);
    }
    if dataset.split(Split::Test).is_err() {
        report.notes.push(
            "The dataset has no test split: no held-out score (the validation numbers chose the model).".into(),
        );
    }
    // The chosen model is what `job:` references and `evaluate` read.
    if let Some(observer) = &job.observer
        && rank == 0
    {
        observer.on_checkpoint(summary.steps, &out.describe(BEST));
    }
    let outcome = publish(&mut report, &out, rank)?;
    Ok(Outcome {
        run: Some(summary),
        ..outcome
    })
}

/// Rank 0 writes `report.json` and its plots to `out`; every rank returns the headline.
pub(super) fn publish(report: &mut Report, out: &Store, rank: usize) -> Result<Outcome> {
    let headline = report.headline();
    let mut metrics = BTreeMap::new();
    for (split, m) in &report.splits {
        for (k, v) in &m.metrics {
            metrics.insert(format!("{split}_{k}"), *v);
        }
    }
    if rank == 0 {
        let tmp = tempfile::tempdir().map_err(|source| Error::Io {
            action: "creating a temporary directory",
            path: std::env::temp_dir(),
            source,
        })?;
        let files = write_report_plots(report, tmp.path())?;
        for f in &files {
            let path = tmp.path().join(f);
            let bytes = std::fs::read(&path).map_err(|source| Error::Io {
                action: "reading",
                path: path.clone(),
                source,
            })?;
            out.put(&format!("plots/{f}"), Bytes::from(bytes))?;
        }
        // `write_report_plots` lists the bare names; the report lists them where they are.
        report.plots.retain(|p| !files.contains(p));
        for f in &files {
            let listed = format!("plots/{f}");
            if !report.plots.contains(&listed) {
                report.plots.push(listed);
            }
        }
        let local = tmp.path().join(REPORT_FILE);
        report.write(&local)?;
        let bytes = std::fs::read(&local).map_err(|source| Error::Io {
            action: "reading",
            path: local.clone(),
            source,
        })?;
        out.put(REPORT_FILE, Bytes::from(bytes))?;
        let headline_text = headline
            .as_ref()
            .map_or_else(|| "none".to_string(), |(k, v)| format!("{k} {v:.4}"));
        tracing::info!(
            task = %report.task,
            report = %out.describe(REPORT_FILE),
            headline = %headline_text,
            "report written"
        );
    }
    Ok(Outcome {
        run: None,
        report: out.describe(REPORT_FILE),
        headline,
        metrics,
    })
}

/// Builds the classifier a located model describes (or `fallback`), with its weights.
fn load_classifier(
    weights_text: &str,
    fallback: &super::Fallback,
    overrides: Option<&serde_json::Value>,
    device: Device,
) -> Result<(Classifier, FinetuneConfig, String)> {
    let located = locate_model(weights_text)?;
    let (cfg, ft) = match (&located.info, fallback.model.as_ref()) {
        (Some(info), _) => {
            if info.task != TaskKind::Classify {
                return Err(Error::Input {
                    name: "--weights".into(),
                    reason: format!("{weights_text} is a {} model, not a classifier", info.task),
                });
            }
            (
                info.model.clone(),
                super::settings_with(&info.finetune, overrides)?,
            )
        }
        (None, Some(model)) => {
            tracing::warn!(
                weights = weights_text,
                "the weights do not record their fine-tuning settings (no info.json): frames, window and crop are the defaults for this network; give the fine-tuning output or its best/ folder to use the settings it was trained with"
            );
            (
                model.clone(),
                fallback.settings(TaskKind::Classify, model, overrides)?,
            )
        }
        (None, None) => {
            return Err(Error::Input {
                name: "--weights".into(),
                reason: format!(
                    "{weights_text} does not say which network it is (no info.json): give --preset or --config"
                ),
            });
        }
    };
    let mut model = Classifier::new(&cfg, NUM_LABELS, device)?;
    model.load(&located.weights, LoadMode::Strict)?;
    Ok((model, ft, weights_text.to_string()))
}

/// Scores a fine-tuned classifier on one split and writes `report.json` (+ confusion matrix and
/// ROC plots) to the job's output location.
pub fn evaluate(job: &EvaluateJob, collective: &mut dyn Collective) -> Result<Outcome> {
    let (model, cfg, described) = load_classifier(
        &job.weights,
        &job.fallback,
        job.overrides.as_ref(),
        job.device,
    )?;
    let dataset = PolypDiag::open(&job.data)?;
    dataset.split(job.split)?;
    let dataset = Arc::new(dataset);
    let out = job.output()?;
    let precision = resolve_precision(cfg.precision, job.device)?;
    let (preds, loss) = score_split(
        &model,
        &dataset,
        job.split,
        &cfg,
        collective.rank(),
        collective.world_size(),
        job.data_threads,
        precision,
        collective,
    )?;
    let metrics = BinaryMetrics::from_predictions(&preds)?;
    let mut m = SplitMetrics::from_binary(&metrics, CLASS_NAMES);
    m.metrics.insert("loss".into(), loss);
    let config = serde_json::json!({
        "kind": "evaluate",
        "task": TaskKind::Classify,
        "weights": job.weights,
        "data": job.data.to_string(),
        "split": job.split.name(),
        "model": model.config(),
        "finetune": cfg,
    });
    let mut report = Report::new(TaskKind::Classify, described, config);
    report.splits.insert(job.split.name().to_string(), m);
    report.notes.push(format!(
        "Evaluation only: the {} split scored once with the given model.",
        job.split
    ));
    publish(&mut report, &out, collective.rank())
}

/// One video's class probabilities: the whole-video clip (`window = None`) or one per window.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Prediction {
    /// The video.
    pub video: String,
    /// First frame of the window (the whole-video clip starts at 0).
    pub start_frame: usize,
    /// Frames the window spans.
    pub frames: usize,
    /// Probability of class 1 (`abnormal`).
    pub probability: f64,
    /// The predicted class name.
    pub label: String,
}

/// Class-1 probabilities of a video with a fine-tuned classifier: one for the test-time clip
/// (start 0), or with `windows` one per consecutive window of the sampling span.
pub fn predict(
    weights_text: &str,
    fallback: &super::Fallback,
    video: &str,
    windows: bool,
    device: Device,
) -> Result<Vec<Prediction>> {
    let (model, cfg, _) = load_classifier(weights_text, fallback, None, device)?;
    let clips = crate::datasets::classify::predict_windows(video, &cfg)?;
    let precision = resolve_precision(cfg.precision, device)?;
    let count = if windows {
        clips.starts.len()
    } else {
        1.min(clips.starts.len())
    };
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let x = clips.clips.narrow(0, i as i64, 1).to_device(device);
        let logits = with_precision(precision, device, || {
            tch::no_grad(|| model.forward_t(&x, false).1)
        })?
        .to_kind(Kind::Float)
        .to_device(Device::Cpu);
        let p = logits.softmax(-1, Kind::Float).double_value(&[0, 1]);
        out.push(Prediction {
            video: video.to_string(),
            start_frame: clips.starts[i],
            frames: clips.span.min(clips.frames.saturating_sub(clips.starts[i])),
            probability: p,
            label: CLASS_NAMES[usize::from(p > 0.5)].to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Solo;

    #[test]
    fn steps_on_one_batch_fit_it() {
        let _rng = crate::test_support::rng_lock();
        tch::manual_seed(0);
        let cfg = crate::test_support::small_model(2);
        let model = Classifier::new(&cfg, NUM_LABELS, Device::Cpu).unwrap();
        let ft = FinetuneConfig::default();
        let mut sgd = optimizer_for(&model, &ft);
        let x = Tensor::randn([4, 3, 2, 32, 32], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1, 0, 1]);
        let mut losses = Vec::new();
        for step in 0..40 {
            losses.push(
                train_step(
                    &model,
                    &mut sgd,
                    Precision::Fp32,
                    (&x, &y),
                    step,
                    0.05,
                    &mut Solo,
                )
                .unwrap(),
            );
        }
        let last = *losses.last().unwrap();
        assert!(last < 0.1 * losses[0], "{losses:?}");
    }
}
