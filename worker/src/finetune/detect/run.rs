//! Detection (KUMC) as a task of the run machinery ([`crate::run::drive`]): fine-tuning the
//! STFT-FCOS detector with the published optimiser and schedule, validation and model
//! selection at epoch ends, then scoring the chosen model on every split once; evaluation of a
//! fine-tuned detector on one split. Every rank scores its share of a split's frames; the
//! boxes are gathered (two all-reduces: counts, then rows) so that every rank computes the
//! same scores, and rank 0 writes `report.json` and the plots: training curves, loss terms per
//! epoch, a precision–recall curve and a grid of test frames with predicted and true boxes.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use tch::{Device, Kind, Tensor};

use endofm_shared::{DetectorConfig, FinetuneConfig, TaskKind};

use super::data::{TrainLoader, frame_index, iters_per_epoch, predict_frame, truth_of};
use super::metrics::{DetectionScores, FrameBoxes, ScoredBox, score};
use super::{DetectOptimizer, train_step};
use crate::collective::Collective;
use crate::data::CorpusFingerprint;
use crate::datasets::Split;
use crate::datasets::kumc::{Kumc, PolypClass};
use crate::eval::plots::{BoxSample, Corner, DrawBox, Panel, PrCurve, Series};
use crate::eval::report::{EpochRecord, Report, Selection, SplitMetrics};
use crate::finetune::classify::resolve_precision;
use crate::finetune::{BEST, EvaluateJob, FinetuneJob, ModelInfo, Outcome, locate_model};
use crate::model::{Detector, LoadMode};
use crate::precision::Precision;
use crate::run::checkpoint::{Checkpointable, Committed, Manifest, Snapshot, host_vars};
use crate::run::{self, MetricsLine, StepOutcome, Task};
use crate::store::Store;
use crate::train::step::step_seed;
use crate::{Error, Result};

/// The validation metric models are chosen by (box-level AP at IoU 0.5, over classes).
pub const SELECT_BY: &str = "ap50";
/// Names of the five loss terms, in [`super::StepLosses::terms`] order.
pub const LOSS_TERMS: [&str; 5] = [
    "loss_cls",
    "loss_reg",
    "loss_centerness",
    "loss_stft_cls",
    "loss_stft_reg",
];
/// The loss-terms plot below `plots/`.
pub const LOSS_PLOT: &str = "loss_terms.png";
/// Frames drawn in the boxes grid.
const GRID_SAMPLES: usize = 8;
/// Floats per gathered predicted box: frame, label, score, x1, y1, x2, y2.
const BOX_ROW: usize = 7;

/// The per-epoch record kept across checkpoints.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct State {
    /// This rank's loss sum and steps of the current epoch.
    epoch_loss: (f64, u64),
    /// This rank's sums of the five terms in the current epoch.
    epoch_terms: [f64; 5],
    history: Vec<EpochRecord>,
    /// Mean of each loss term per epoch (all ranks).
    term_history: Vec<[f64; 5]>,
    best: Option<(usize, f64)>,
    sgd_steps: u64,
}

struct DetectTask<'a> {
    job: &'a FinetuneJob,
    net: Detector,
    opt: DetectOptimizer,
    dataset: Arc<Kumc>,
    loader: Option<TrainLoader>,
    out: Store,
    rank: usize,
    world: usize,
    ipe: usize,
    precision: Precision,
    state: State,
    init: String,
}

impl Checkpointable for DetectTask<'_> {
    fn snapshot(&self) -> Snapshot {
        let mut state = self.state.clone();
        state.sgd_steps = self.opt.steps();
        let mut network = serde_json::Map::new();
        network.insert(
            "detector".into(),
            serde_json::to_value(&self.job.detector).unwrap_or_default(),
        );
        let extra = self.job.checkpoint_extra(
            network,
            serde_json::to_value(&state).unwrap_or_default(),
            &self.init,
        );
        Snapshot {
            files: vec![
                ("model.safetensors".into(), host_vars(self.net.var_store())),
                ("optimizer.safetensors".into(), self.opt.state()),
            ],
            extra,
        }
    }

    fn restore(&mut self, c: &Committed<'_>) -> Result<()> {
        let state: State = c.manifest().field("state")?;
        crate::finetune::restore_model(self.net.var_store(), c)?;
        self.opt.load_state(
            &c.read("optimizer.safetensors")?,
            &c.origin("optimizer.safetensors"),
            state.sgd_steps,
        )?;
        self.init = c.manifest().field("init").unwrap_or_default();
        self.state = state;
        Ok(())
    }
}

/// The class name of a published label (1-based), or `class N`.
pub fn class_name(label: i64) -> String {
    PolypClass::ALL
        .into_iter()
        .find(|c| c.id() == label)
        .map_or_else(|| format!("class {label}"), |c| c.name().to_string())
}

/// The report's scalars of a split: `f1`, `precision`, `recall` (the paper's image-level
/// numbers at the score threshold), `box_f1`, `box_precision`, `box_recall` (IoU ≥ 0.5),
/// `ap50`, `ap50_95` (mean over classes with true boxes), the same per class
/// (`<class>_box_f1`, `<class>_ap50`, …), `located_box_*` (IoU ≥ 0.5 with the class ignored), and the counts `frames`, `true_boxes`,
/// `predicted_boxes` (at the threshold).
pub fn scalars(
    s: &DetectionScores,
    frames: &[FrameBoxes],
    threshold: f64,
) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    m.insert("f1".into(), s.image.f1);
    m.insert("precision".into(), s.image.precision);
    m.insert("recall".into(), s.image.recall);
    let mut boxes = |prefix: String, b: &super::metrics::BoxScores| {
        m.insert(format!("{prefix}box_f1"), b.at_threshold.f1);
        m.insert(format!("{prefix}box_precision"), b.at_threshold.precision);
        m.insert(format!("{prefix}box_recall"), b.at_threshold.recall);
        m.insert(format!("{prefix}ap50"), b.ap50);
        m.insert(format!("{prefix}ap50_95"), b.ap50_95);
    };
    boxes(String::new(), &s.overall);
    for (label, b) in &s.per_class {
        boxes(format!("{}_", class_name(*label)), b);
    }
    m.insert("located_box_f1".into(), s.located.f1);
    m.insert("located_box_precision".into(), s.located.precision);
    m.insert("located_box_recall".into(), s.located.recall);
    m.insert("frames".into(), frames.len() as f64);
    m.insert(
        "true_boxes".into(),
        frames.iter().map(|f| f.truth.len()).sum::<usize>() as f64,
    );
    m.insert(
        "predicted_boxes".into(),
        frames
            .iter()
            .map(|f| f.predicted.iter().filter(|p| p.score >= threshold).count())
            .sum::<usize>() as f64,
    );
    m
}

/// Runs `net` on this rank's share of `split` (frames `rank, rank + world, …`), gathers every
/// rank's boxes and scores the whole split (the same on every rank). Returns the scores and
/// the per-frame boxes in list order.
///
/// Errors: an empty split; an unreadable frame (named); a collective failure.
pub fn score_split(
    net: &Detector,
    ds: &Kumc,
    split: Split,
    cfg: &FinetuneConfig,
    rank: usize,
    world: usize,
    collective: &mut dyn Collective,
) -> Result<(DetectionScores, Vec<FrameBoxes>)> {
    let frames = ds.split(split)?;
    if frames.is_empty() {
        return Err(Error::Input {
            name: format!("{split} split"),
            reason: "has no frames to score".into(),
        });
    }
    let index = frame_index(frames);
    let mut mine: Vec<(usize, Vec<ScoredBox>)> = Vec::new();
    for i in (rank..frames.len()).step_by(world.max(1)) {
        mine.push((i, predict_frame(net, ds, frames, &index, i, cfg, cfg.seed)?));
    }
    let mut predicted: Vec<Vec<ScoredBox>> = vec![Vec::new(); frames.len()];
    if world > 1 {
        // Counts per frame, then rows at offsets every rank computes alike; each entry is set
        // by exactly one rank, so the sums are the values.
        let mut counts = vec![0f32; frames.len()];
        for (i, boxes) in &mine {
            counts[*i] = boxes.len() as f32;
        }
        let mut t = Tensor::from_slice(&counts).to_device(net.device());
        collective.all_reduce_sum(&mut t)?;
        let counts: Vec<f32> = Vec::try_from(t.to_device(Device::Cpu))?;
        let mut offsets = Vec::with_capacity(counts.len());
        let mut total = 0usize;
        for c in &counts {
            offsets.push(total);
            total += *c as usize;
        }
        let mut rows = vec![0f32; total * BOX_ROW];
        for (i, boxes) in &mine {
            for (j, b) in boxes.iter().enumerate() {
                let r = &mut rows[(offsets[*i] + j) * BOX_ROW..(offsets[*i] + j + 1) * BOX_ROW];
                r[0] = 1.0;
                r[1] = b.label as f32;
                r[2] = b.score as f32;
                for k in 0..4 {
                    r[3 + k] = b.xyxy[k] as f32;
                }
            }
        }
        if total > 0 {
            let mut t = Tensor::from_slice(&rows).to_device(net.device());
            collective.all_reduce_sum(&mut t)?;
            rows = Vec::try_from(t.to_device(Device::Cpu))?;
        }
        for (i, p) in predicted.iter_mut().enumerate() {
            for j in 0..counts[i] as usize {
                let r = &rows[(offsets[i] + j) * BOX_ROW..(offsets[i] + j + 1) * BOX_ROW];
                if r[0] != 1.0 {
                    return Err(Error::Input {
                        name: format!("{split} split"),
                        reason: format!("frame {i} was scored {} times across the ranks", r[0]),
                    });
                }
                p.push(ScoredBox {
                    label: r[1].round() as i64,
                    score: f64::from(r[2]),
                    xyxy: [r[3], r[4], r[5], r[6]].map(f64::from),
                });
            }
        }
    } else {
        for (i, boxes) in mine {
            predicted[i] = boxes;
        }
    }
    let all: Vec<FrameBoxes> = frames
        .iter()
        .zip(predicted)
        .map(|(f, predicted)| FrameBoxes {
            truth: truth_of(f),
            predicted,
        })
        .collect();
    Ok((
        score(&all, net.config().num_classes, cfg.score_threshold),
        all,
    ))
}

impl DetectTask<'_> {
    fn epochs(&self) -> usize {
        self.job.cfg.epochs
    }

    fn write_best(&self, epoch: usize, value: f64) -> Result<()> {
        write_model(
            &self.out,
            &self.net,
            &self.job.cfg,
            Some(epoch),
            Some((format!("val_{SELECT_BY}"), value)),
        )
    }
}

/// Writes `best/model.safetensors` and `best/info.json`.
fn write_model(
    out: &Store,
    net: &Detector,
    cfg: &FinetuneConfig,
    epoch: Option<usize>,
    selected_by: Option<(String, f64)>,
) -> Result<()> {
    out.put(
        &format!("{BEST}/model.safetensors"),
        crate::run::checkpoint::encode(&host_vars(net.var_store()))?,
    )?;
    let info = ModelInfo {
        task: TaskKind::Detect,
        model: net.model_config().clone(),
        num_labels: net.config().num_classes,
        finetune: cfg.clone(),
        epoch,
        selected_by,
        segmenter: None,
        detector: Some(net.config().clone()),
    };
    out.put(
        &format!("{BEST}/info.json"),
        Bytes::from(serde_json::to_vec_pretty(&info).unwrap_or_default()),
    )
}

impl Task for DetectTask<'_> {
    type Batch = (Tensor, Vec<super::Targets>);

    fn iters_per_epoch(&self) -> usize {
        self.ipe
    }
    fn total_steps(&self) -> usize {
        self.ipe * self.epochs()
    }
    fn samples_per_step(&self) -> usize {
        self.world * self.job.cfg.batch_per_rank
    }
    fn check_resume(&self, m: &Manifest) -> Result<()> {
        crate::finetune::check_resume(m, TaskKind::Detect, self.job, |refuse| {
            let det: DetectorConfig = m.field("detector")?;
            let changed = crate::finetune::changed_fields(&det, &self.job.detector, "detector.");
            if changed.is_empty() {
                Ok(())
            } else {
                Err(refuse(format!(
                    "another detection network: {}",
                    changed.join(", ")
                )))
            }
        })
    }
    fn initialise(&mut self) -> Result<()> {
        if let Some(init) = &self.job.init {
            self.init = self.net.init_backbone(init, self.job.cfg.init_from)?;
            tracing::info!(init = %self.init, "detector backbone initialised");
        } else {
            tracing::warn!("no --init: the detector's backbone starts from random weights");
        }
        Ok(())
    }
    fn start_data(&mut self, step: usize) -> Result<()> {
        self.loader = Some(TrainLoader::start(
            Arc::clone(&self.dataset),
            &self.job.cfg,
            self.rank,
            self.world,
            self.job.data_threads,
            step,
        )?);
        Ok(())
    }
    fn next_batch(&mut self) -> Result<(Self::Batch, f64)> {
        let loader = self.loader.as_mut().ok_or_else(|| Error::Input {
            name: "loader".into(),
            reason: "not started".into(),
        })?;
        let b = loader.next_batch()?;
        let device = self.job.device;
        let targets = b
            .targets
            .into_iter()
            .map(|t| super::Targets {
                boxes: t.boxes.to_device(device),
                labels: t.labels.to_device(device),
            })
            .collect();
        Ok(((b.clips.to_device(device), targets), b.wait_s))
    }
    fn step(
        &mut self,
        (clips, targets): Self::Batch,
        step: usize,
        collective: &mut dyn Collective,
    ) -> Result<StepOutcome> {
        let epoch = step / self.ipe;
        let lr = self.job.cfg.warmup_step_lr(step);
        let seed = step_seed(self.job.cfg.seed, step, self.rank) as u64;
        let losses = train_step(
            &self.net,
            &mut self.opt,
            self.precision,
            (&clips, &targets),
            seed,
            lr,
            collective,
        )?;
        if !losses.total.is_finite() {
            return Err(Error::Input {
                name: "loss".into(),
                reason: format!(
                    "non-finite loss {} at step {step} (lr {lr:e}); lower the learning rate",
                    losses.total
                ),
            });
        }
        self.state.epoch_loss.0 += losses.total;
        self.state.epoch_loss.1 += 1;
        let mut extra = serde_json::Map::new();
        for (k, (name, v)) in LOSS_TERMS.iter().zip(losses.terms).enumerate() {
            self.state.epoch_terms[k] += v;
            extra.insert((*name).into(), serde_json::json!(v));
        }
        Ok(StepOutcome {
            epoch,
            loss: losses.total,
            lr,
            extra,
        })
    }
    fn end_epoch(
        &mut self,
        epoch: usize,
        collective: &mut dyn Collective,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
        let (sum, count) = std::mem::take(&mut self.state.epoch_loss);
        let terms = std::mem::take(&mut self.state.epoch_terms);
        // [loss, 5 terms, steps] summed over ranks.
        let mut sums = vec![sum as f32];
        sums.extend(terms.iter().map(|v| *v as f32));
        sums.push(count as f32);
        let mut t = Tensor::from_slice(&sums).to_device(self.job.device);
        if self.world > 1 {
            collective.all_reduce_sum(&mut t)?;
        }
        let sums: Vec<f64> = Vec::try_from(t.to_device(Device::Cpu).to_kind(Kind::Double))?;
        let steps = sums[6].max(1.0);
        let train_loss = sums[0] / steps;
        let term_means = [1, 2, 3, 4, 5].map(|k| sums[k] / steps);
        self.state.term_history.push(term_means);
        let mut record = EpochRecord {
            epoch,
            train_loss_mean: Some(train_loss),
            val: BTreeMap::new(),
        };
        let last = epoch + 1 == self.epochs();
        if (epoch + 1).is_multiple_of(self.job.cfg.val_every) || last {
            let (scores, frames) = score_split(
                &self.net,
                &self.dataset,
                Split::Val,
                &self.job.cfg,
                self.rank,
                self.world,
                collective,
            )?;
            record.val = scalars(&scores, &frames, self.job.cfg.score_threshold);
            let value = record.val.get(SELECT_BY).copied().unwrap_or(0.0);
            if self.state.best.is_none_or(|(_, b)| value > b) {
                self.state.best = Some((epoch, value));
                if self.rank == 0 {
                    self.write_best(epoch, value)?;
                }
            }
        }
        let mut line = serde_json::Map::new();
        line.insert("train_loss_mean".into(), serde_json::json!(train_loss));
        for (name, v) in LOSS_TERMS.iter().zip(term_means) {
            line.insert(format!("train_{name}_mean"), serde_json::json!(v));
        }
        for (k, v) in &record.val {
            line.insert(format!("val_{k}"), serde_json::json!(v));
        }
        self.state.history.push(record);
        Ok(Some(line))
    }
    fn checkpoint_epochs(&self) -> bool {
        true
    }
    fn progress_message(&self, line: &MetricsLine) -> String {
        let best = self.state.best.map_or(String::new(), |(e, v)| {
            format!(" best val AP50 {v:.3} (epoch {e})")
        });
        format!(
            "loss {:.4} {:.2} frames/s{best}",
            line.loss, line.samples_per_s
        )
    }
}

/// Opens the dataset (every list and annotation validated, naming the file) and checks the
/// splits a run reads.
fn open_dataset(data: &endofm_shared::StorageUri) -> Result<Arc<Kumc>> {
    let ds = Kumc::open(data)?;
    for split in [Split::Train, Split::Val] {
        if ds.split(split)?.is_empty() {
            return Err(Error::Input {
                name: data.to_string(),
                reason: format!("the {split} split lists no frames"),
            });
        }
    }
    // Every frame of every split read once (decoded, its size checked against its
    // annotation), so a bad image anywhere is refused, naming the file, before any training.
    for split in ds.splits().collect::<Vec<_>>() {
        for frame in ds.split(split)? {
            ds.read_frame(frame)?;
        }
    }
    Ok(Arc::new(ds))
}

/// The network must predict exactly KUMC's classes (the published ids 1 and 2).
fn check_classes(det: &DetectorConfig) -> Result<()> {
    let classes = PolypClass::ALL.len();
    if det.num_classes != classes {
        return Err(Error::Input {
            name: "detector.num_classes".into(),
            reason: format!(
                "{}: KUMC has {classes} polyp classes ({}); the detector must predict exactly those",
                det.num_classes,
                PolypClass::ALL.map(PolypClass::name).join(", ")
            ),
        });
    }
    Ok(())
}

/// The notes every detection report carries.
fn method_notes(report: &mut Report, threshold: f64) {
    report.notes.push(format!(
        "f1, precision and recall are the paper's image-level numbers (the published KUMC evaluation): a frame with a polyp counts as found when any box scores at least {threshold}, wherever the box is, and a frame without a polyp with such a box is a false alarm. They do not test where the box is. box_f1, box_precision and box_recall are the honest ones: each predicted box (score at least {threshold}) must overlap an unmatched true box of its class with IoU at least 0.5, matched highest score first; ap50 and ap50_95 rank every predicted box by score (all-point interpolated AP at IoU 0.5, and averaged over IoU 0.50 to 0.95), averaged over the classes that have true boxes. A detector that fires on every polyp frame but in the wrong place scores a high f1 and a low box_f1."
    ));
    report.notes.push(
        "Test-time inference runs the backbone frame by frame on the current frame and its reference frames (half drawn from the frames before, half after, as published); training runs it on the whole clip of the current frame and two references. Frames are resized as published (square max_size x max_size unless square_resize is off); boxes are scored in the original frame's pixels.".into(),
    );
}

/// Fine-tunes the detector, then scores the model chosen on validation (AP50) on every split
/// once (rank 0 writes the report and plots).
pub fn finetune(job: &FinetuneJob, collective: &mut dyn Collective) -> Result<Outcome> {
    job.cfg.validate_for(TaskKind::Detect)?;
    job.detector.validate()?;
    let mut model_cfg = job.model.clone();
    model_cfg.drop_path_rate = job.cfg.drop_path_rate;
    model_cfg.validate()?;
    let precision = resolve_precision(job.cfg.precision, job.device)?;
    let rank = collective.rank();
    let world = collective.world_size();
    check_classes(&job.detector)?;
    let dataset = open_dataset(&job.data)?;
    let train = dataset.split(Split::Train)?;
    let ipe = iters_per_epoch(train.len(), job.cfg.batch_per_rank, world);
    if ipe == 0 {
        return Err(Error::Input {
            name: "--data".into(),
            reason: format!(
                "{}: the train split lists {} frames, fewer than one batch of {} per rank ({world} ranks)",
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
                .map(|f| {
                    f.iter()
                        .map(|f| format!("{s}/{}", f.image))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .collect();
    let out = Store::open(&job.out, true)?;
    let net = {
        tch::manual_seed(job.cfg.seed as i64);
        Detector::new(&model_cfg, &job.detector, job.device)?
    };
    let opt = DetectOptimizer::new(&net, &job.cfg);
    let mut network = serde_json::Map::new();
    network.insert("detector".into(), serde_json::json!(job.detector));
    let settings = job.run_settings(&model_cfg, world, CorpusFingerprint::of(&keys), network);
    let mut task = DetectTask {
        job,
        net,
        opt,
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
    let Some((best_epoch, best_value)) = crate::finetune::load_chosen(
        task.net.var_store(),
        &out,
        &summary,
        task.total_steps(),
        task.state.best,
    )?
    else {
        return Ok(Outcome::unfinished(summary));
    };
    let mut report = Report::new(
        TaskKind::Detect,
        task.init.clone(),
        settings.resolved_config.clone(),
    );
    report.history = task.state.history.clone();
    report.selection = Some(Selection {
        epoch: best_epoch,
        split: "val".into(),
        metric: SELECT_BY.into(),
        value: best_value,
    });
    report.notes.push(
        "Model selection used the validation split's box-level AP50 only; the test split was scored once, by the chosen model.".into(),
    );
    method_notes(&mut report, job.cfg.score_threshold);
    let mut shown = None;
    for split in [Split::Train, Split::Val, Split::Test] {
        if dataset.split(split).is_err() {
            continue;
        }
        let (scores, frames) = score_split(
            &task.net, &dataset, split, &job.cfg, rank, world, collective,
        )?;
        report.splits.insert(
            split.name().to_string(),
            SplitMetrics::from_scalars(scalars(&scores, &frames, job.cfg.score_threshold)),
        );
        // The grid and PR curve show the test split (validation when there is none).
        if split == Split::Test || (split == Split::Val && dataset.split(Split::Test).is_err()) {
            shown = Some((split, scores, frames));
        }
    }
    if let Some(observer) = &job.observer
        && rank == 0
    {
        observer.on_checkpoint(summary.steps, &out.describe(BEST));
    }
    let outcome = publish(
        &mut report,
        &out,
        rank,
        &dataset,
        shown.as_ref().map(|(s, sc, f)| (*s, sc, f.as_slice())),
        &task.state.term_history,
        job.cfg.score_threshold,
    )?;
    Ok(Outcome {
        run: Some(summary),
        ..outcome
    })
}

/// Rank 0 writes the loss-terms plot, the precision–recall curve and the boxes grid of
/// `shown`, then `report.json` with the common plots.
fn publish(
    report: &mut Report,
    out: &Store,
    rank: usize,
    dataset: &Kumc,
    shown: Option<(Split, &DetectionScores, &[FrameBoxes])>,
    term_history: &[[f64; 5]],
    threshold: f64,
) -> Result<Outcome> {
    if rank == 0 {
        let tmp = crate::init::temp_dir()?;
        let mut files = Vec::new();
        if !term_history.is_empty() {
            let path = tmp.path().join(LOSS_PLOT);
            loss_terms_plot(term_history, &path)?;
            files.push((LOSS_PLOT.to_string(), path));
        }
        if let Some((split, scores, frames)) = shown {
            let file = format!("pr_{split}.png");
            let path = tmp.path().join(&file);
            pr_plot(split, scores, threshold, &path)?;
            files.push((file, path));
            let file = format!("samples_{split}.png");
            let path = tmp.path().join(&file);
            let samples = grid_samples(dataset, split, frames, threshold)?;
            crate::eval::plots::box_grid(
                &samples,
                &format!(
                    "Predicted (green, score ≥ {threshold}) and true (yellow) boxes: {split} split"
                ),
                &path,
            )?;
            files.push((file, path));
        }
        for (file, path) in files {
            let bytes = std::fs::read(&path).map_err(|source| Error::Io {
                action: "reading",
                path: path.clone(),
                source,
            })?;
            out.put(&format!("plots/{file}"), Bytes::from(bytes))?;
            report.plots.push(format!("plots/{file}"));
        }
    }
    crate::finetune::classify::publish(report, out, rank)
}

/// The five loss terms' epoch means in three panels (total, FCOS, STFT).
fn loss_terms_plot(history: &[[f64; 5]], path: &std::path::Path) -> Result<()> {
    let series = |k: usize| Series {
        name: LOSS_TERMS[k].trim_start_matches("loss_").to_string(),
        points: history
            .iter()
            .enumerate()
            .map(|(e, t)| (e as f64, t[k]))
            .collect(),
        markers: history.len() < 30,
    };
    // From 0 to 1.6 × the panel's largest value: the legend in the upper right sits above
    // the curves (losses fall from their first epochs, centerness stays near its top).
    let panel = |y: &str, series: Vec<Series>| {
        let top = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .filter(|v| v.is_finite())
            .fold(0.0_f64, f64::max);
        Panel {
            y_desc: y.into(),
            series,
            references: Vec::new(),
            legend: Corner::UpperRight,
            y_range: (top > 0.0).then_some((0.0, top * 1.6)),
        }
    };
    let total = Series {
        name: "sum of the five".into(),
        points: history
            .iter()
            .enumerate()
            .map(|(e, t)| (e as f64, t.iter().sum()))
            .collect(),
        markers: history.len() < 30,
    };
    crate::eval::plots::step_panels(
        "Training loss terms (epoch means)",
        "epoch",
        &[
            panel("total", vec![total]),
            panel("FCOS", vec![series(0), series(1), series(2)]),
            panel("STFT", vec![series(3), series(4)]),
        ],
        path,
    )
}

/// The overall precision–recall curve at IoU 0.5 with its operating point at `threshold`.
fn pr_plot(
    split: Split,
    scores: &DetectionScores,
    threshold: f64,
    path: &std::path::Path,
) -> Result<()> {
    let op = &scores.overall.at_threshold;
    let curve = PrCurve {
        name: format!(
            "classes pooled (mean AP50 over classes {:.3})",
            scores.overall.ap50
        ),
        points: scores.pr_curve.clone(),
        operating_point: (op.tp + op.fp > 0).then_some((op.recall, op.precision)),
    };
    crate::eval::plots::pr_curve(
        &[curve],
        &format!(
            "Box-level precision-recall at IoU 0.5 ({split} split; dot: score >= {threshold})"
        ),
        path,
    )
}

/// Up to [`GRID_SAMPLES`] frames of `split` evenly spread over the list, preferring frames
/// with a polyp, with their true and predicted boxes (score ≥ `threshold`).
fn grid_samples(
    dataset: &Kumc,
    split: Split,
    boxes: &[FrameBoxes],
    threshold: f64,
) -> Result<Vec<BoxSample>> {
    let frames = dataset.split(split)?;
    let with_polyp: Vec<usize> = (0..frames.len())
        .filter(|&i| !boxes[i].truth.is_empty())
        .collect();
    let pool: Vec<usize> = if with_polyp.len() >= GRID_SAMPLES / 2 {
        with_polyp
    } else {
        (0..frames.len()).collect()
    };
    let take = GRID_SAMPLES.min(pool.len());
    let mut samples = Vec::with_capacity(take);
    for k in 0..take {
        let i = pool[k * pool.len() / take];
        let f = &frames[i];
        let pixels = dataset.read_frame(f)?;
        let draw = |b: &ScoredBox, score: bool| DrawBox {
            xyxy: b.xyxy,
            label: class_name(b.label),
            score: score.then_some(b.score),
        };
        let predicted: Vec<DrawBox> = boxes[i]
            .predicted
            .iter()
            .filter(|b| b.score >= threshold)
            .map(|b| draw(b, true))
            .collect();
        samples.push(BoxSample {
            caption: format!("{} #{}: {} predicted", f.video, f.number, predicted.len()),
            rgb: pixels.data,
            width: pixels.w,
            height: pixels.h,
            truth: boxes[i].truth.iter().map(|b| draw(b, false)).collect(),
            predicted,
        });
    }
    Ok(samples)
}

/// Builds the detector a located model describes (or `fallback` says), with its weights, and
/// the settings it was trained with (`overrides` laid over them).
pub fn load_detector(
    weights_text: &str,
    fallback: &crate::finetune::Fallback,
    overrides: Option<&serde_json::Value>,
    device: Device,
) -> Result<(Detector, FinetuneConfig)> {
    let located = locate_model(weights_text)?;
    let (model, det, cfg) = match (&located.info, fallback.model.as_ref()) {
        (Some(info), _) => {
            if info.task != TaskKind::Detect {
                return Err(Error::Input {
                    name: "--weights".into(),
                    reason: format!("{weights_text} is a {} model, not a detector", info.task),
                });
            }
            (
                info.model.clone(),
                info.detector
                    .clone()
                    .unwrap_or_else(DetectorConfig::published),
                crate::finetune::settings_with(&info.finetune, overrides)?,
            )
        }
        (None, Some(model)) => (
            model.clone(),
            fallback
                .detector
                .clone()
                .unwrap_or_else(DetectorConfig::published),
            fallback.settings(TaskKind::Detect, model, overrides)?,
        ),
        (None, None) => {
            return Err(Error::Input {
                name: "--weights".into(),
                reason: format!(
                    "{weights_text} does not say which network it is (no info.json): give --preset or --config"
                ),
            });
        }
    };
    cfg.validate_for(TaskKind::Detect)?;
    let mut net = Detector::new(&model, &det, device)?;
    net.load(&located.weights, LoadMode::Strict)?;
    Ok((net, cfg))
}

/// Scores a fine-tuned detector on one split: `report.json` with the metrics, the
/// precision–recall curve and the boxes grid.
pub fn evaluate(job: &EvaluateJob, collective: &mut dyn Collective) -> Result<Outcome> {
    let (net, cfg) = load_detector(
        &job.weights,
        &job.fallback,
        job.overrides.as_ref(),
        job.device,
    )?;
    check_classes(net.config())?;
    let dataset = Kumc::open(&job.data)?;
    dataset.split(job.split)?;
    let out = job.output()?;
    let (scores, frames) = score_split(
        &net,
        &dataset,
        job.split,
        &cfg,
        collective.rank(),
        collective.world_size(),
        collective,
    )?;
    let config = serde_json::json!({
        "kind": "evaluate",
        "task": TaskKind::Detect,
        "weights": job.weights,
        "data": job.data.to_string(),
        "split": job.split.name(),
        "model": net.model_config(),
        "detector": net.config(),
        "finetune": cfg,
    });
    let mut report = Report::new(TaskKind::Detect, job.weights.clone(), config);
    report.splits.insert(
        job.split.name().to_string(),
        SplitMetrics::from_scalars(scalars(&scores, &frames, cfg.score_threshold)),
    );
    report.notes.push(format!(
        "Evaluation only: the {} split scored once with the given model.",
        job.split
    ));
    method_notes(&mut report, cfg.score_threshold);
    publish(
        &mut report,
        &out,
        collective.rank(),
        &dataset,
        Some((job.split, &scores, &frames)),
        &[],
        cfg.score_threshold,
    )
}
