//! Polyp segmentation (CVC-12k) as the published TransUNet `trainer.py` fine-tunes it: the
//! hybrid network ([`crate::model::Segmenter`]) on the frames of one sequence at a time, the
//! loss of [`loss`], AdamW with polynomial decay.

pub mod loss;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use tch::{Device, Kind, Tensor};

use endofm_shared::{FinetuneConfig, SegmenterConfig, TaskKind};

use super::adamw::{AdamW, poly_lr};
use super::classify::resolve_precision;
use super::{BEST, EvaluateJob, FinetuneJob, ModelInfo, Outcome, locate_model};
use crate::collective::Collective;
use crate::data::CorpusFingerprint;
use crate::datasets::Split;
use crate::datasets::cvc::Cvc;
use crate::datasets::segment::{SegLoader, eval_samples, iters_per_epoch};
use crate::eval::metrics::MaskOverlap;
use crate::eval::plots::{OverlaySample, mask_grid};
use crate::eval::report::{EpochRecord, Report, Selection, SplitMetrics};
use crate::model::{LoadMode, Segmenter};
use crate::precision::{Precision, with_precision};
use crate::run::checkpoint::{Checkpointable, Committed, Manifest, Snapshot, host_vars};
use crate::run::{self, MetricsLine, StepOutcome, Task};
use crate::store::Store;
use crate::train::step::step_seed;
use crate::{Error, Result};
use loss::{predict_classes, seg_loss};

/// The validation metric models are chosen by (the paper's volume Dice).
pub const SELECT_BY: &str = "dice";
/// The file of the overlay grid below `plots/`.
pub const OVERLAY_PLOT: &str = "samples_test.png";
/// Samples drawn in the overlay grid.
const OVERLAY_SAMPLES: usize = 8;

/// The per-epoch record kept across checkpoints.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct State {
    epoch_loss: (f64, u64),
    history: Vec<EpochRecord>,
    best: Option<(usize, f64)>,
    adam_steps: u64,
}

struct SegmentTask<'a> {
    job: &'a FinetuneJob,
    model: Segmenter,
    opt: AdamW,
    dataset: Arc<Cvc>,
    loader: Option<SegLoader>,
    out: Store,
    rank: usize,
    world: usize,
    ipe: usize,
    precision: Precision,
    state: State,
    init: String,
}

impl Checkpointable for SegmentTask<'_> {
    fn snapshot(&self) -> Snapshot {
        let mut state = self.state.clone();
        state.adam_steps = self.opt.steps;
        let mut network = serde_json::Map::new();
        network.insert(
            "segmenter".into(),
            serde_json::to_value(&self.job.segmenter).unwrap_or_default(),
        );
        let extra = self.job.checkpoint_extra(
            network,
            serde_json::to_value(&state).unwrap_or_default(),
            &self.init,
        );
        Snapshot {
            files: vec![
                (
                    "model.safetensors".into(),
                    host_vars(self.model.var_store()),
                ),
                ("optimizer.safetensors".into(), self.opt.state()),
            ],
            extra,
        }
    }

    fn restore(&mut self, c: &Committed<'_>) -> Result<()> {
        let state: State = c.manifest().field("state")?;
        crate::finetune::restore_model(self.model.var_store(), c)?;
        self.opt.load_state(
            &c.read("optimizer.safetensors")?,
            &c.origin("optimizer.safetensors"),
            state.adam_steps,
        )?;
        self.init = c.manifest().field("init").unwrap_or_default();
        self.state = state;
        Ok(())
    }
}

/// Sums of one split's scoring on one rank, per sequence: the row layout of the all-reduce.
const ROW: usize = 12;

/// A split's segmentation metrics: the paper's volume Dice and the honest per-frame ones.
#[derive(Debug, Clone, Default)]
pub struct SegScores {
    /// Per sequence: name, frames, volume overlap, published Dice.
    pub sequences: Vec<(String, usize, MaskOverlap, f64)>,
    /// Sum of per-frame Dice (empty on empty = 1) and IoU.
    pub frame_dice_sum: f64,
    /// Sum of per-frame IoU.
    pub frame_iou_sum: f64,
    /// Frames scored.
    pub frames: u64,
    /// Frames whose true mask has a polyp, and of those, frames where the prediction touches it.
    pub polyp_frames: (u64, u64),
    /// Frames predicted to show a polyp where the mask has none.
    pub false_alarm_frames: u64,
    /// Mean loss over sequences.
    pub loss: f64,
}

impl SegScores {
    /// The report's scalars: `dice` (the paper's number: the published per-volume Dice, 1 for
    /// a prediction on an empty mask, 0 for an empty prediction, averaged over sequences),
    /// `volume_dice` (the same with the usual Dice: 1 for empty on empty, 0 for a prediction on
    /// an empty mask), `frame_dice` and `frame_iou` (per frame, averaged over frames),
    /// `polyp_found` (share of frames with a polyp where the prediction overlaps it),
    /// `false_alarm_frames`, `sequences`, `frames`, `loss`.
    pub fn scalars(&self) -> BTreeMap<String, f64> {
        let n = self.sequences.len().max(1) as f64;
        let frames = self.frames.max(1) as f64;
        let mut m = BTreeMap::new();
        m.insert(
            "dice".into(),
            self.sequences.iter().map(|s| s.3).sum::<f64>() / n,
        );
        m.insert(
            "volume_dice".into(),
            self.sequences.iter().map(|s| s.2.dice()).sum::<f64>() / n,
        );
        m.insert("frame_dice".into(), self.frame_dice_sum / frames);
        m.insert("frame_iou".into(), self.frame_iou_sum / frames);
        if self.polyp_frames.0 > 0 {
            m.insert(
                "polyp_found".into(),
                self.polyp_frames.1 as f64 / self.polyp_frames.0 as f64,
            );
        }
        m.insert("false_alarm_frames".into(), self.false_alarm_frames as f64);
        m.insert("sequences".into(), self.sequences.len() as f64);
        m.insert("frames".into(), self.frames as f64);
        m.insert("loss".into(), self.loss);
        m
    }
}

/// Predicted classes (T, S, S) uint8 and the loss of one prepared sequence in eval mode.
fn predict_sequence(
    model: &Segmenter,
    frames: &Tensor,
    labels: &Tensor,
    precision: Precision,
) -> Result<(Tensor, f64)> {
    let device = model.device();
    let x = frames.to_device(device);
    let logits = with_precision(precision, device, || {
        tch::no_grad(|| model.forward_t(&x, false))
    })?
    .to_kind(Kind::Float)
    .to_device(Device::Cpu);
    let loss = tch::no_grad(|| seg_loss(&logits, labels).loss.double_value(&[]));
    Ok((predict_classes(&logits), loss))
}

/// Scores `split` on every rank's share and gathers the sums on every rank; with `samples`,
/// also returns up to [`OVERLAY_SAMPLES`] frames (rank 0's share) for the overlay grid.
#[allow(clippy::too_many_arguments)]
fn score_split(
    model: &Segmenter,
    dataset: &Arc<Cvc>,
    split: Split,
    cfg: &FinetuneConfig,
    rank: usize,
    world: usize,
    threads: usize,
    precision: Precision,
    collective: &mut dyn Collective,
    samples: bool,
) -> Result<(SegScores, Vec<OverlaySample>)> {
    let names = dataset.split(split)?.to_vec();
    let n = names.len();
    // Rows: [present, frames, ∩, |P|, |T|, published dice, Σ frame dice, Σ frame IoU,
    // polyp frames, polyp frames found, loss, false-alarm frames]; each row set by one rank,
    // summed over ranks.
    let mut rows = vec![0f64; n * ROW];
    let mut frame_samples = Vec::new();
    for sample in eval_samples(Arc::clone(dataset), split, cfg, rank, world, threads)? {
        let sample = sample?;
        let (pred, loss) = predict_sequence(model, &sample.frames, &sample.labels, precision)?;
        let t = pred.size()[0] as usize;
        let p: Vec<u8> = Vec::try_from(pred.flatten(0, -1))?;
        let l: Vec<u8> = Vec::try_from(sample.labels.to_kind(Kind::Uint8).flatten(0, -1))?;
        let volume = MaskOverlap::of(&p, &l)?;
        let px = p.len() / t.max(1);
        let r = &mut rows[sample.index * ROW..(sample.index + 1) * ROW];
        r[0] = 1.0;
        r[1] = t as f64;
        r[2] = volume.intersection as f64;
        r[3] = volume.predicted as f64;
        r[4] = volume.truth as f64;
        r[5] = volume.published_dice();
        for f in 0..t {
            let o = MaskOverlap::of(&p[f * px..(f + 1) * px], &l[f * px..(f + 1) * px])?;
            r[6] += o.dice();
            r[7] += o.iou();
            if o.truth > 0 {
                r[8] += 1.0;
                r[9] += f64::from(u8::from(o.intersection > 0));
            } else if o.predicted > 0 {
                r[11] += 1.0;
            }
            // Two frames per sequence (first and middle) until the grid is full.
            if samples
                && frame_samples.len() < OVERLAY_SAMPLES
                && f.is_multiple_of(t.div_ceil(2).max(1))
            {
                frame_samples.push(overlay_sample(
                    cfg,
                    &sample.frames.get(f as i64),
                    &p[f * px..(f + 1) * px],
                    &l[f * px..(f + 1) * px],
                    format!("{} #{f}: Dice {:.2}", sample.name, o.dice()),
                )?);
            }
        }
        r[10] = loss;
    }
    if world > 1 {
        // Float32 buffers carry every count exactly (pixel counts < 2^24 per sequence).
        let mut t = Tensor::from_slice(&rows)
            .to_kind(Kind::Float)
            .to_device(model.device());
        collective.all_reduce_sum(&mut t)?;
        rows = Vec::try_from(t.to_device(Device::Cpu).to_kind(Kind::Double))?;
    }
    let mut scores = SegScores::default();
    let mut loss = 0.0;
    for (i, r) in rows.chunks_exact(ROW).enumerate() {
        if r[0] != 1.0 {
            return Err(Error::Input {
                name: format!("{split} split"),
                reason: format!(
                    "sequence {} was scored {} times across the ranks",
                    names[i], r[0]
                ),
            });
        }
        let overlap = MaskOverlap {
            intersection: r[2] as u64,
            predicted: r[3] as u64,
            truth: r[4] as u64,
        };
        scores
            .sequences
            .push((names[i].clone(), r[1] as usize, overlap, r[5]));
        scores.frames += r[1] as u64;
        scores.frame_dice_sum += r[6];
        scores.frame_iou_sum += r[7];
        scores.polyp_frames.0 += r[8] as u64;
        scores.polyp_frames.1 += r[9] as u64;
        loss += r[10];
        scores.false_alarm_frames += r[11] as u64;
    }
    scores.loss = loss / n.max(1) as f64;
    Ok((scores, frame_samples))
}

/// An overlay sample from a normalised frame (3, S, S) and its masks.
fn overlay_sample(
    cfg: &FinetuneConfig,
    frame: &Tensor,
    predicted: &[u8],
    truth: &[u8],
    caption: String,
) -> Result<OverlaySample> {
    let side = frame.size()[1] as usize;
    let rgb = (frame * cfg.std + cfg.mean)
        .clamp(0.0, 1.0)
        .multiply_scalar(255.0)
        .round()
        .to_kind(Kind::Uint8)
        .permute([1, 2, 0])
        .contiguous()
        .flatten(0, -1);
    Ok(OverlaySample {
        caption,
        rgb: Vec::try_from(rgb)?,
        predicted: predicted.to_vec(),
        truth: truth.to_vec(),
        side,
    })
}

impl SegmentTask<'_> {
    fn epochs(&self) -> usize {
        self.job.cfg.epochs
    }

    fn lr(&self, step: usize) -> f64 {
        poly_lr(
            self.job.cfg.lr,
            step,
            self.total_steps(),
            self.job.cfg.poly_power,
        )
    }

    fn write_best(&self, epoch: usize, value: f64) -> Result<()> {
        write_model(
            &self.out,
            &self.model,
            &self.job.cfg,
            Some(epoch),
            Some((format!("val_{SELECT_BY}"), value)),
        )
    }
}

/// Writes `best/model.safetensors` and `best/info.json`.
fn write_model(
    out: &Store,
    model: &Segmenter,
    cfg: &FinetuneConfig,
    epoch: Option<usize>,
    selected_by: Option<(String, f64)>,
) -> Result<()> {
    out.put(
        &format!("{BEST}/model.safetensors"),
        crate::run::checkpoint::encode(&host_vars(model.var_store()))?,
    )?;
    let info = ModelInfo {
        task: TaskKind::Segment,
        model: model.config().clone(),
        num_labels: model.segmenter_config().n_classes,
        finetune: cfg.clone(),
        epoch,
        selected_by,
        segmenter: Some(model.segmenter_config().clone()),
        detector: None,
    };
    out.put(
        &format!("{BEST}/info.json"),
        Bytes::from(serde_json::to_vec_pretty(&info).unwrap_or_default()),
    )
}

impl Task for SegmentTask<'_> {
    type Batch = (Tensor, Tensor);

    fn iters_per_epoch(&self) -> usize {
        self.ipe
    }
    fn total_steps(&self) -> usize {
        self.ipe * self.epochs()
    }
    fn samples_per_step(&self) -> usize {
        self.world
    }
    fn check_resume(&self, m: &Manifest) -> Result<()> {
        super::check_resume(m, TaskKind::Segment, self.job, |refuse| {
            let seg: SegmenterConfig = m.field("segmenter")?;
            let changed = super::changed_fields(&seg, &self.job.segmenter, "segmenter.");
            if changed.is_empty() {
                Ok(())
            } else {
                Err(refuse(format!(
                    "another segmentation network: {}",
                    changed.join(", ")
                )))
            }
        })
    }
    fn initialise(&mut self) -> Result<()> {
        if let Some(init) = &self.job.init {
            let (tensors, origin, described) =
                super::backbone_tensors(init, self.job.cfg.init_from)?;
            let n = self.model.load_backbone_tensors(tensors, &origin)?;
            self.init = described;
            tracing::info!(init = %self.init, tensors = n, "Endo-FM blocks initialised");
        } else {
            tracing::warn!("no --init: the Endo-FM blocks start from random weights");
        }
        Ok(())
    }
    fn start_data(&mut self, step: usize) -> Result<()> {
        self.loader = Some(SegLoader::start(
            Arc::clone(&self.dataset),
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
        let s = loader.next_sample()?;
        Ok((
            (
                s.frames.to_device(self.job.device),
                s.labels.to_device(self.job.device),
            ),
            s.wait_s,
        ))
    }
    fn step(
        &mut self,
        (frames, labels): (Tensor, Tensor),
        step: usize,
        collective: &mut dyn Collective,
    ) -> Result<StepOutcome> {
        let epoch = step / self.ipe;
        let lr = self.lr(step);
        let seed = step_seed(self.job.cfg.seed, step, self.rank) as u64;
        let (loss, ce, dice) = train_step(
            &self.model,
            &mut self.opt,
            self.precision,
            (&frames, &labels),
            seed,
            lr,
            collective,
        )?;
        if self.world > 1 {
            broadcast_buffers(&self.model, self.rank, collective)?;
        }
        if !loss.is_finite() {
            return Err(Error::Input {
                name: "loss".into(),
                reason: format!(
                    "non-finite loss {loss} at step {step} (lr {lr:e}); lower the learning rate"
                ),
            });
        }
        self.state.epoch_loss.0 += loss;
        self.state.epoch_loss.1 += 1;
        let mut extra = serde_json::Map::new();
        extra.insert("loss_ce".into(), serde_json::json!(ce));
        extra.insert("loss_dice".into(), serde_json::json!(dice));
        Ok(StepOutcome {
            epoch,
            loss,
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
        let train_loss = super::mean_over_ranks(sum, count, self.job.device, collective)?;
        let mut record = EpochRecord {
            epoch,
            train_loss_mean: Some(train_loss),
            val: BTreeMap::new(),
        };
        let last = epoch + 1 == self.epochs();
        let has_val = self.dataset.split(Split::Val).is_ok();
        if has_val && ((epoch + 1).is_multiple_of(self.job.cfg.val_every) || last) {
            let (scores, _) = score_split(
                &self.model,
                &self.dataset,
                Split::Val,
                &self.job.cfg,
                self.rank,
                self.world,
                self.job.data_threads,
                self.precision,
                collective,
                false,
            )?;
            record.val = scores.scalars();
            let value = record.val.get(SELECT_BY).copied().unwrap_or(0.0);
            if self.state.best.is_none_or(|(_, b)| value > b) {
                self.state.best = Some((epoch, value));
                if self.rank == 0 {
                    self.write_best(epoch, value)?;
                }
            }
        } else if !has_val && last {
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
                format!(" best val Dice {v:.3} (epoch {e})")
            });
        format!(
            "loss {:.4} {:.2} sequences/s{best}",
            line.loss, line.samples_per_s
        )
    }
}

/// One complete iteration on this rank, as the published `trainer_synapse` does it: forward in
/// train mode over the T frames of one sequence (drop-path and dropout draws from `seed`), the
/// loss of [`seg_loss`], backward, gradients averaged over the ranks, an AdamW update at `lr`.
/// `frames` (T, 3, S, S) float32 and `labels` (T, S, S) int64 on the model's device. Returns
/// the loss and its cross-entropy and Dice terms.
pub fn train_step(
    model: &Segmenter,
    opt: &mut AdamW,
    precision: Precision,
    (frames, labels): (&Tensor, &Tensor),
    seed: u64,
    lr: f64,
    collective: &mut dyn Collective,
) -> Result<(f64, f64, f64)> {
    let device = model.device();
    let l = crate::model::timesformer::with_drop_path_seed(seed, || {
        with_precision(precision, device, || {
            let logits = model.forward_t(frames, true);
            seg_loss(&logits, labels)
        })
    })?;
    l.loss.backward();
    opt.all_reduce_grads(collective)?;
    opt.step(lr);
    Ok((
        l.loss.double_value(&[]),
        l.ce.double_value(&[]),
        l.dice.double_value(&[]),
    ))
}

/// Gives every rank rank 0's BatchNorm running statistics (what DistributedDataParallel's
/// `broadcast_buffers` does before each forward), so that all ranks validate, score and
/// checkpoint one model. Done after each step as a sum over ranks of rank 0's values.
fn broadcast_buffers(
    model: &Segmenter,
    rank: usize,
    collective: &mut dyn Collective,
) -> Result<()> {
    let mut buffers: Vec<(String, Tensor)> = model
        .var_store()
        .variables()
        .into_iter()
        .filter(|(k, _)| k.ends_with("running_mean") || k.ends_with("running_var"))
        .collect();
    buffers.sort_by(|a, b| a.0.cmp(&b.0));
    if buffers.is_empty() {
        return Ok(());
    }
    let flat: Vec<Tensor> = buffers.iter().map(|(_, t)| t.reshape([-1])).collect();
    let mut all = Tensor::cat(&flat, 0);
    if rank != 0 {
        let _ = all.zero_();
    }
    collective.all_reduce_sum(&mut all)?;
    let mut offset = 0;
    tch::no_grad(|| {
        for (_, t) in &buffers {
            let n = t.numel() as i64;
            let mut t = t.shallow_clone();
            t.copy_(&all.narrow(0, offset, n).view_as(&t));
            offset += n;
        }
    });
    Ok(())
}

/// Opens the dataset and reads every sequence of every split once, so a bad frame or mask
/// anywhere is refused (naming the file) before any training.
fn open_dataset(data: &endofm_shared::StorageUri) -> Result<Arc<Cvc>> {
    let ds = Cvc::open(data)?;
    ds.split(Split::Train)?;
    for split in ds.splits().collect::<Vec<_>>() {
        for name in ds.split(split)? {
            let seq = ds.read(name)?;
            if seq.frames.t == 0 {
                return Err(Error::Input {
                    name: format!("sequence {name}"),
                    reason: format!("has no frames ({split} split)"),
                });
            }
        }
    }
    Ok(Arc::new(ds))
}

/// The notes every segmentation report carries.
fn method_notes(report: &mut Report) {
    report.notes.push(
        "dice is the paper's number: the published per-video-volume Dice (medpy dc), where a prediction on a sequence without polyp scores 1 and an empty prediction scores 0; volume_dice is the same with the usual convention (empty on empty = 1, a prediction on an empty mask = 0); frame_dice and frame_iou average per frame; polyp_found is the share of frames with a polyp where the prediction overlaps it.".into(),
    );
    report.notes.push(
        "Scores are computed at the network's input resolution, as published. Frames are fed in RGB order (the published reader loads .tif frames with OpenCV, i.e. BGR).".into(),
    );
}

/// Fine-tunes the segmentation network, then scores the model chosen on validation on every
/// split once (rank 0 writes the report and the overlay grid).
pub fn finetune(job: &FinetuneJob, collective: &mut dyn Collective) -> Result<Outcome> {
    job.cfg.validate_for(TaskKind::Segment)?;
    let mut model_cfg = job.model.clone();
    model_cfg.drop_path_rate = job.cfg.drop_path_rate;
    model_cfg.img_size = job.cfg.crop;
    model_cfg.validate()?;
    let precision = resolve_precision(job.cfg.precision, job.device)?;
    let rank = collective.rank();
    let world = collective.world_size();
    let dataset = open_dataset(&job.data)?;
    let train = dataset.split(Split::Train)?;
    let ipe = iters_per_epoch(train.len(), world);
    if ipe == 0 {
        return Err(Error::Input {
            name: "--data".into(),
            reason: format!(
                "{}: the train split lists {} sequences, fewer than one per rank ({world} ranks)",
                job.data,
                train.len()
            ),
        });
    }
    let keys: Vec<String> = dataset
        .splits()
        .flat_map(|s| {
            dataset
                .split(s)
                .map(|e| e.iter().map(|n| format!("{s}/{n}")).collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .collect();
    let out = Store::open(&job.out, true)?;
    let model = {
        tch::manual_seed(job.cfg.seed as i64);
        Segmenter::new(&model_cfg, &job.segmenter, job.device)?
    };
    let opt = AdamW::for_store(model.var_store(), job.cfg.weight_decay);
    let mut network = serde_json::Map::new();
    network.insert("segmenter".into(), serde_json::json!(job.segmenter));
    let settings = job.run_settings(&model_cfg, world, CorpusFingerprint::of(&keys), network);
    let mut task = SegmentTask {
        job,
        model,
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
        TaskKind::Segment,
        task.init.clone(),
        settings.resolved_config.clone(),
    );
    report.history = task.state.history.clone();
    if dataset.split(Split::Val).is_ok() {
        report.selection = Some(Selection {
            epoch: best_epoch,
            split: "val".into(),
            metric: SELECT_BY.into(),
            value: best_value,
        });
        report.notes.push(
            "Model selection used the validation split only; the test split was scored once, by the chosen model. (The published trainer keeps the best Dice on its test split, and its lists share seven sequences between training and testing; the dataset reader refuses a sequence listed in two splits.)".into(),
        );
    } else {
        report.notes.push(
            "The dataset has no validation split: the last epoch's model is reported, without selection.".into(),
        );
    }
    method_notes(&mut report);
    let mut overlays = Vec::new();
    for split in [Split::Train, Split::Val, Split::Test] {
        if dataset.split(split).is_err() {
            continue;
        }
        let (scores, samples) = score_split(
            &task.model,
            &dataset,
            split,
            &job.cfg,
            rank,
            world,
            job.data_threads,
            precision,
            collective,
            split == Split::Test,
        )?;
        if split == Split::Test {
            overlays = samples;
        }
        report.splits.insert(
            split.name().to_string(),
            SplitMetrics::from_scalars(scores.scalars()),
        );
    }
    if let Some(observer) = &job.observer
        && rank == 0
    {
        observer.on_checkpoint(summary.steps, &out.describe(BEST));
    }
    let outcome = publish(&mut report, &out, rank, &overlays, "test")?;
    Ok(Outcome {
        run: Some(summary),
        ..outcome
    })
}

/// Rank 0 writes the report's plots, the overlay grid and `report.json`.
fn publish(
    report: &mut Report,
    out: &Store,
    rank: usize,
    overlays: &[OverlaySample],
    split: &str,
) -> Result<Outcome> {
    if rank == 0 && !overlays.is_empty() {
        let tmp = crate::init::temp_dir()?;
        let file = format!("samples_{split}.png");
        let path = tmp.path().join(&file);
        mask_grid(
            overlays,
            &format!("Predicted (green) and true (yellow) masks: {split} split"),
            &path,
        )?;
        let bytes = std::fs::read(&path).map_err(|source| Error::Io {
            action: "reading",
            path: path.clone(),
            source,
        })?;
        out.put(&format!("plots/{file}"), Bytes::from(bytes))?;
        report.plots.push(format!("plots/{file}"));
    }
    super::classify::publish(report, out, rank)
}

/// Builds the segmentation network a located model describes (or `fallback`), with weights.
fn load_segmenter(
    weights_text: &str,
    fallback: &super::Fallback,
    overrides: Option<&serde_json::Value>,
    device: Device,
) -> Result<(Segmenter, FinetuneConfig)> {
    let located = locate_model(weights_text)?;
    let (model, seg, cfg) = match (&located.info, fallback.model.as_ref()) {
        (Some(info), _) => {
            if info.task != TaskKind::Segment {
                return Err(Error::Input {
                    name: "--weights".into(),
                    reason: format!(
                        "{weights_text} is a {} model, not a segmentation network",
                        info.task
                    ),
                });
            }
            (
                info.model.clone(),
                info.segmenter
                    .clone()
                    .unwrap_or_else(SegmenterConfig::published),
                super::settings_with(&info.finetune, overrides)?,
            )
        }
        (None, Some(model)) => (
            model.clone(),
            fallback
                .segmenter
                .clone()
                .unwrap_or_else(SegmenterConfig::published),
            fallback.settings(TaskKind::Segment, model, overrides)?,
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
    let mut net = Segmenter::new(&model, &seg, device)?;
    net.load(&located.weights, LoadMode::Strict)?;
    Ok((net, cfg))
}

/// Scores a fine-tuned segmentation network on one split: `report.json` with the metrics and
/// the overlay grid.
pub fn evaluate(job: &EvaluateJob, collective: &mut dyn Collective) -> Result<Outcome> {
    let (model, cfg) = load_segmenter(
        &job.weights,
        &job.fallback,
        job.overrides.as_ref(),
        job.device,
    )?;
    let dataset = Arc::new(Cvc::open(&job.data)?);
    dataset.split(job.split)?;
    let out = job.output()?;
    let precision = resolve_precision(cfg.precision, job.device)?;
    let (scores, overlays) = score_split(
        &model,
        &dataset,
        job.split,
        &cfg,
        collective.rank(),
        collective.world_size(),
        job.data_threads,
        precision,
        collective,
        true,
    )?;
    let config = serde_json::json!({
        "kind": "evaluate",
        "task": TaskKind::Segment,
        "weights": job.weights,
        "data": job.data.to_string(),
        "split": job.split.name(),
        "model": model.config(),
        "segmenter": model.segmenter_config(),
        "finetune": cfg,
    });
    let mut report = Report::new(TaskKind::Segment, job.weights.clone(), config);
    report.splits.insert(
        job.split.name().to_string(),
        SplitMetrics::from_scalars(scores.scalars()),
    );
    report.notes.push(format!(
        "Evaluation only: the {} split scored once with the given model.",
        job.split
    ));
    method_notes(&mut report);
    publish(
        &mut report,
        &out,
        collective.rank(),
        &overlays,
        job.split.name(),
    )
}

/// One predicted frame.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FramePrediction {
    /// Frame index in the video.
    pub frame: usize,
    /// Share of the frame's pixels predicted as polyp.
    pub polyp_share: f64,
    /// The mask PNG written (at the video's size).
    pub mask: String,
}

/// Segments every frame of a video (or frame folder): runs of `window` consecutive frames
/// through the network, masks resized back to the video's size (nearest) and written as
/// `out/masks/NNNNNN.png` (0/255), plus `out/overlay.mp4` with the predicted polyp tinted
/// green.
pub fn predict(
    weights_text: &str,
    fallback: &super::Fallback,
    video: &str,
    out: &Path,
    window: usize,
    device: Device,
) -> Result<Vec<FramePrediction>> {
    let (model, cfg) = load_segmenter(weights_text, fallback, None, device)?;
    let precision = resolve_precision(cfg.precision, device)?;
    let mut media = crate::datasets::media::Media::open_uri(video)?;
    let info = media.info();
    if info.frames == 0 {
        return Err(Error::Input {
            name: video.to_string(),
            reason: "has no frames".into(),
        });
    }
    let masks_dir = out.join("masks");
    if std::fs::read_dir(&masks_dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(Error::Input {
            name: "--out".into(),
            reason: format!(
                "{} already holds masks (of another prediction?); give an empty or new folder",
                out.display()
            ),
        });
    }
    std::fs::create_dir_all(&masks_dir).map_err(|source| Error::Io {
        action: "creating",
        path: masks_dir.clone(),
        source,
    })?;
    let (h, w) = (info.height, info.width);
    let (even_w, even_h) = (w - w % 2, h - h % 2);
    let overlay_path = out.join("overlay.mp4");
    let mut writer = crate::video::encode::Mp4Writer::create(
        &overlay_path,
        even_w.max(2),
        even_h.max(2),
        &crate::video::encode::EncodeOptions {
            fps: info.fps.unwrap_or(25.0).round().max(1.0) as u32,
            ..Default::default()
        },
    )?;
    let window = window.max(1);
    let mut preds = Vec::with_capacity(info.frames);
    let mut frames = crate::video::Frames::default();
    let mut start = 0;
    while start < info.frames {
        let count = window.min(info.frames - start);
        let indices: Vec<usize> = (start..start + count).collect();
        media.decode_into(&indices, &mut frames)?;
        let x = crate::datasets::segment::prediction_frames(&cfg, &frames).to_device(device);
        let logits = with_precision(precision, device, || {
            tch::no_grad(|| model.forward_t(&x, false))
        })?
        .to_kind(Kind::Float)
        .to_device(Device::Cpu);
        let classes = predict_classes(&logits)
            .unsqueeze(1)
            .internal_upsample_nearest_exact2d([h as i64, w as i64], None, None)
            .squeeze_dim(1);
        for k in 0..count {
            let mask: Vec<u8> = Vec::try_from(
                classes
                    .get(k as i64)
                    .flatten(0, -1)
                    .gt(0)
                    .to_kind(Kind::Uint8),
            )?;
            let share = mask.iter().map(|&v| f64::from(v)).sum::<f64>() / mask.len() as f64;
            let png: Vec<u8> = mask.iter().map(|&v| v * 255).collect();
            let name = format!("{:06}.png", start + k);
            let path = masks_dir.join(&name);
            image::GrayImage::from_raw(w as u32, h as u32, png)
                .ok_or_else(|| Error::Input {
                    name: path.display().to_string(),
                    reason: "mask buffer has the wrong size".into(),
                })?
                .save(&path)
                .map_err(|e| Error::Input {
                    name: path.display().to_string(),
                    reason: format!("writing the mask: {e}"),
                })?;
            let rgb = frames.frame(k);
            let mut tinted = Vec::with_capacity(even_w * even_h * 3);
            for y in 0..even_h {
                for xx in 0..even_w {
                    let i = y * w + xx;
                    for c in 0..3 {
                        let v = f64::from(rgb[3 * i + c]);
                        let g = [0.0, 200.0, 80.0][c];
                        tinted.push(if mask[i] != 0 {
                            (0.55 * v + 0.45 * g).round() as u8
                        } else {
                            v as u8
                        });
                    }
                }
            }
            writer.push(&tinted)?;
            preds.push(FramePrediction {
                frame: start + k,
                polyp_share: share,
                mask: path.display().to_string(),
            });
        }
        start += count;
    }
    writer.finish()?;
    Ok(preds)
}
