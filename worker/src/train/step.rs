//! One rank's self-supervised trainer: student and EMA teacher over flat buffers, the objective
//! and its centre, AdamW, the schedules, and [`SslTrainer::step`], the complete iteration the
//! reference runs (forward, loss, backward, gradient all-reduce, per-tensor clipping, last layer
//! frozen in the first epoch(s), AdamW, EMA, centre update). The trainer loop and the service
//! call `step` on every rank with that rank's views.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use endofm_shared::{ModelConfig, PretrainConfig, TrainPrecision};

use crate::collective::Collective;
use crate::model::{EndoFm, LoadMode, LoadReport};
use crate::precision::{Precision, with_precision};
use crate::train::diagnostics::{self, Diagnostics};
use crate::train::loss::{SslLoss, SslLossConfig};
use crate::train::optim::{AdamW, AdamWConfig, FlatParams};
use crate::train::schedule::{self, Schedule};
use crate::train::ssl;
use crate::{Error, Result};

/// Number of leading global views (seen by the teacher).
pub const GLOBAL_VIEWS: usize = 2;

/// CPU steps run the views on two threads (one libtorch thread each) for networks narrower
/// than this; wider ones use libtorch's intra-op threads, whose large matrix products split
/// well. Measured on 2 cores: the two-thread step is 5–12 % faster for `tiny` (width 192),
/// the intra-op step ~7 % faster and 25 % smaller in memory for `vit_b` (width 768).
pub const TWO_THREAD_MAX_WIDTH: usize = 384;

/// What one step did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepStats {
    /// Global iteration index (0-based).
    pub step: usize,
    /// Epoch of the iteration.
    pub epoch: usize,
    /// Loss (this rank's batch).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Weight decay used.
    pub wd: f64,
    /// Teacher EMA momentum used.
    pub momentum: f64,
    /// Teacher temperature used.
    pub teacher_temp: f64,
    /// Whether the update was skipped (fp16 overflow).
    pub skipped: bool,
    /// Collapse diagnostics over the global batch (teacher entropy, batch-mean entropy, KL).
    pub diagnostics: Diagnostics,
}

/// Dynamic loss scaling for fp16 (PyTorch's GradScaler rule).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    /// Current scale.
    pub scale: f64,
    /// Consecutive finite steps since the last change.
    pub good_steps: u64,
}

impl LossScaler {
    const GROWTH_INTERVAL: u64 = 2000;

    fn new() -> Self {
        Self {
            scale: 65536.0,
            good_steps: 0,
        }
    }

    fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale *= 0.5;
            self.good_steps = 0;
        }
    }
}

/// Resolves the configured precision for a device.
pub fn resolve_precision(p: TrainPrecision, device: Device) -> Result<Precision> {
    Ok(match p {
        TrainPrecision::Auto if device.is_cuda() => Precision::Bf16,
        TrainPrecision::Auto | TrainPrecision::Fp32 => Precision::Fp32,
        TrainPrecision::Bf16 => Precision::Bf16,
        TrainPrecision::Fp16 if device.is_cuda() => Precision::Fp16,
        TrainPrecision::Fp16 => {
            return Err(endofm_shared::Error::invalid(
                "precision",
                "fp16 needs a CUDA device; use bf16 or fp32 on the CPU",
            )
            .into());
        }
    })
}

/// A 64-bit mix of the run seed, iteration and rank, for per-step generator seeds (so a
/// resumed run draws the same drop-path masks without saving libtorch's generator state).
pub fn step_seed(seed: u64, step: usize, rank: usize) -> i64 {
    let mut z = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((rank as u64) << 48);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// Divides the student's views between the two threads of a CPU step: thread A (which also
/// runs the teacher on global view 1) gets view 1, thread B (teacher on view 0) view 0, and the
/// other views go, one run of consecutive equal shapes ([`crate::model::equal_shape_runs`]) at
/// a time (kept together so they stay one batched forward), largest first, to the thread with less work so far. Work is counted in
/// per-frame token rows, `batch · frames · (1 + patches)`, once for a teacher forward and three
/// times for a student forward and backward. Returns each thread's view indices in ascending
/// order. A pure function of the shapes, so a seed still fixes every result.
pub fn split_views(views: &[Tensor], patch_size: usize) -> (Vec<usize>, Vec<usize>) {
    let rows = |v: &Tensor| -> u64 {
        let s = v.size();
        if s.len() != 5 {
            // Not a video batch: the forward pass reports it; count it as no work here.
            return 0;
        }
        let (b, t) = (s[0].max(0) as u64, s[2].max(0) as u64);
        let p = patch_size.max(1) as i64;
        let patches = ((s[3] / p) * (s[4] / p)).max(0) as u64;
        b * t * (1 + patches)
    };
    let mut a = vec![1];
    let mut b = vec![0];
    let (mut work_a, mut work_b) = (4 * rows(&views[1]), 4 * rows(&views[0]));
    let mut groups: Vec<(u64, std::ops::Range<usize>)> =
        crate::model::equal_shape_runs(&views[GLOBAL_VIEWS..])
            .into_iter()
            .map(|run| {
                let run = run.start + GLOBAL_VIEWS..run.end + GLOBAL_VIEWS;
                (run.clone().map(|i| 3 * rows(&views[i])).sum(), run)
            })
            .collect();
    groups.sort_by(|x, y| y.0.cmp(&x.0).then(x.1.start.cmp(&y.1.start)));
    for (work, range) in groups {
        if work_a < work_b {
            work_a += work;
            a.extend(range);
        } else {
            work_b += work;
            b.extend(range);
        }
    }
    a.sort_unstable();
    b.sort_unstable();
    (a, b)
}

/// What both threads of a two-thread step share.
#[derive(Debug, Clone, Copy)]
struct HalfShared {
    teacher_temp: f64,
    student_temp: f64,
    /// Number of terms of the whole objective (the loss is their mean).
    terms: f64,
    /// Loss scale (fp16).
    scale: f64,
    precision: Precision,
    device: Device,
}

/// One thread's part of a two-thread step: the teacher on global view `own`, the student on
/// `views` (indices `ids`), the other thread's teacher probabilities through `rx`.
struct HalfStep<'a> {
    teacher: &'a mut EndoFm,
    student: &'a mut EndoFm,
    global: Tensor,
    own: usize,
    views: Vec<Tensor>,
    ids: Vec<usize>,
    center: Tensor,
    names: Vec<String>,
    tx: std::sync::mpsc::Sender<Tensor>,
    rx: std::sync::mpsc::Receiver<Tensor>,
    seed: u64,
}

impl HalfStep<'_> {
    /// This thread's loss terms, its teacher output and the flat gradient of its terms, on one
    /// libtorch thread with its own drop-path generator.
    fn run(self, p: HalfShared) -> Result<(f64, Tensor, Tensor)> {
        use crate::model::timesformer::with_drop_path_seed;
        use crate::train::loss::{cross_terms, teacher_probs};

        tch::set_num_threads(1);
        with_drop_path_seed(self.seed, || {
            with_precision(p.precision, p.device, || {
                let t_out = tch::no_grad(|| {
                    self.teacher
                        .forward_views(std::slice::from_ref(&self.global), true)
                });
                let mine = teacher_probs(&t_out, &self.center, p.teacher_temp, 1);
                let _ = self.tx.send(mine.shallow_clone());
                let s_out = self.student.forward_views(&self.views, true);
                let other = self.rx.recv().map_err(|_| Error::Input {
                    name: "trainer".into(),
                    reason: "the other training thread stopped".into(),
                })?;
                let probs = if self.own == 0 {
                    Tensor::cat(&[mine, other], 0)
                } else {
                    Tensor::cat(&[other, mine], 0)
                };
                let loss = cross_terms(&probs, &s_out, &self.ids, p.student_temp) / p.terms;
                let value = loss.to_kind(Kind::Double).double_value(&[]);
                let vars = self.student.var_store().variables();
                let inputs: Vec<Tensor> =
                    self.names.iter().map(|n| vars[n].shallow_clone()).collect();
                let grads = Tensor::run_backward(&[loss * p.scale], &inputs, false, false);
                let flat = Tensor::cat(
                    &grads.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(),
                    0,
                );
                Ok((value, t_out, flat))
            })?
        })
    }
}

/// One rank's pre-training state.
#[derive(Debug)]
pub struct SslTrainer {
    cfg: PretrainConfig,
    student: EndoFm,
    teacher: EndoFm,
    /// A second student sharing the parameters' storage, for running view groups on two
    /// threads (CPU with ≥ 2 intra-op threads); each thread then uses one libtorch thread.
    replica: Option<EndoFm>,
    /// The teacher's twin for the second thread (parameters shared with the teacher, so EMA
    /// updates reach it).
    teacher_replica: Option<EndoFm>,
    student_flat: FlatParams,
    teacher_flat: FlatParams,
    optimizer: AdamW,
    /// Flat gradient buffer, reused every step.
    grads: Tensor,
    objective: SslLoss,
    lr: Schedule,
    wd: Schedule,
    momentum: Schedule,
    iters_per_epoch: usize,
    precision: Precision,
    scaler: Option<LossScaler>,
}

impl SslTrainer {
    /// A randomly initialised student (seeded by `cfg.seed`) and its teacher copy, for a run of
    /// `cfg.epochs × iters_per_epoch` steps on `world_size` ranks.
    pub fn new(
        model_cfg: &ModelConfig,
        cfg: &PretrainConfig,
        device: Device,
        iters_per_epoch: usize,
        world_size: usize,
    ) -> Result<Self> {
        cfg.validate()?;
        if iters_per_epoch == 0 {
            return Err(Error::Input {
                name: "corpus".into(),
                reason: "an epoch has no step: fewer clips than one global batch".into(),
            });
        }
        let mut model_cfg = model_cfg.clone();
        if let Some(rate) = cfg.drop_path_rate {
            model_cfg.drop_path_rate = rate;
        }
        let precision = resolve_precision(cfg.precision, device)?;
        tch::manual_seed(cfg.seed as i64);
        let student = EndoFm::new(&model_cfg, device)?;
        let teacher = student.try_clone()?;
        let student_flat = FlatParams::new(&student)?;
        let teacher_flat = FlatParams::new(&teacher)?;
        let replica = if device == Device::Cpu
            && tch::get_num_threads() >= 2
            && model_cfg.embed_dim < TWO_THREAD_MAX_WIDTH
            && std::env::var_os("ENDOFM_ONE_THREAD_STEP").is_none()
        {
            Some(Self::replica_of(&student)?)
        } else {
            None
        };
        let teacher_replica = match replica {
            Some(_) => Some(Self::replica_of(&teacher)?),
            None => None,
        };
        let optimizer = AdamW::new(&student_flat, AdamWConfig::default());
        let grads = Tensor::zeros([student_flat.trainable_len()], (Kind::Float, device));
        let objective = SslLoss::new(
            model_cfg.head.out_dim as i64,
            SslLossConfig {
                student_temp: cfg.student_temp,
                center_momentum: cfg.center_momentum,
                global_views: GLOBAL_VIEWS,
            },
            device,
        );
        let total = cfg.epochs * iters_per_epoch;
        let lr = Schedule::cosine(
            cfg.scaled_lr(world_size),
            cfg.min_lr,
            total,
            cfg.warmup_epochs * iters_per_epoch,
            0.0,
        );
        let wd = Schedule::cosine(cfg.weight_decay, cfg.weight_decay_end, total, 0, 0.0);
        let momentum = Schedule::cosine(cfg.momentum_teacher, 1.0, total, 0, 0.0);
        Ok(Self {
            cfg: cfg.clone(),
            student,
            teacher,
            replica,
            teacher_replica,
            student_flat,
            teacher_flat,
            optimizer,
            grads,
            objective,
            lr,
            wd,
            momentum,
            iters_per_epoch,
            precision,
            scaler: (precision == Precision::Fp16).then(LossScaler::new),
        })
    }

    /// Loads initial weights: the student from `student`, the teacher from `teacher` or, when
    /// absent, a copy of the student. Strict: both must fit the configuration.
    pub fn load_weights(&mut self, student: &Path, teacher: Option<&Path>) -> Result<LoadReport> {
        let report = self.student.load(student, LoadMode::Strict)?;
        match teacher {
            Some(t) => {
                self.teacher.load(t, LoadMode::Strict)?;
            }
            None => self.teacher_flat.copy_from(&self.student_flat)?,
        }
        Ok(report)
    }

    /// Total steps of the run.
    pub fn total_steps(&self) -> usize {
        self.cfg.epochs * self.iters_per_epoch
    }

    /// Steps per epoch.
    pub fn iters_per_epoch(&self) -> usize {
        self.iters_per_epoch
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &PretrainConfig {
        &self.cfg
    }

    /// The precision steps run in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The student network.
    pub fn student(&self) -> &EndoFm {
        &self.student
    }

    /// The teacher network.
    pub fn teacher(&self) -> &EndoFm {
        &self.teacher
    }

    /// The student's flat parameters.
    pub fn student_flat(&self) -> &FlatParams {
        &self.student_flat
    }

    /// The teacher's flat parameters.
    pub fn teacher_flat(&self) -> &FlatParams {
        &self.teacher_flat
    }

    /// The optimiser.
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// Mutable optimiser (restoring a checkpoint).
    pub fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.optimizer
    }

    /// The objective (its centre is part of a checkpoint).
    pub fn objective(&self) -> &SslLoss {
        &self.objective
    }

    /// Mutable objective (restoring the centre).
    pub fn objective_mut(&mut self) -> &mut SslLoss {
        &mut self.objective
    }

    /// The loss scaler (fp16 only).
    pub fn scaler(&self) -> Option<&LossScaler> {
        self.scaler.as_ref()
    }

    /// Restores the loss scaler (fp16 only).
    pub fn set_scaler(&mut self, scaler: Option<LossScaler>) {
        if self.scaler.is_some() {
            self.scaler = scaler;
        }
    }

    /// Mutable student and teacher (restoring a checkpoint).
    pub fn networks_mut(&mut self) -> (&mut EndoFm, &mut EndoFm) {
        (&mut self.student, &mut self.teacher)
    }

    fn replica_of(student: &EndoFm) -> Result<EndoFm> {
        let mut replica = EndoFm::new(student.config(), student.device())?;
        let primary = student.var_store().variables();
        for (name, mut var) in replica.var_store_mut().variables() {
            if let Some(p) = primary.get(&name) {
                var.set_data(&p.detach());
            }
        }
        Ok(replica)
    }

    /// Chooses how steps run on the CPU: view groups on two threads with one libtorch thread
    /// each (`true`; the default when libtorch has ≥ 2 threads), or one forward/backward using
    /// libtorch's intra-op threads (`false`). Either is deterministic for a seed; they differ
    /// in the order floating-point sums are taken.
    pub fn set_two_threads(&mut self, on: bool) -> Result<()> {
        (self.replica, self.teacher_replica) = if on && self.student.device() == Device::Cpu {
            (
                Some(Self::replica_of(&self.student)?),
                Some(Self::replica_of(&self.teacher)?),
            )
        } else {
            (None, None)
        };
        Ok(())
    }

    /// Whether steps run on two threads.
    pub fn two_threads(&self) -> bool {
        self.replica.is_some()
    }

    /// Loss, teacher outputs and flat gradients of one step computed on two threads: thread A
    /// runs the teacher on the second global view and the student on its share of the views,
    /// thread B the teacher on the first global view and the student replica on the rest (the
    /// shares come from [`split_views`], a pure function of the views' shapes); they swap
    /// teacher probabilities, each differentiates its own terms of the objective, and the two
    /// gradients are added in a fixed order (deterministic for a seed).
    fn two_thread_grads(
        &mut self,
        views: &[Tensor],
        teacher_temp: f64,
        scale: f64,
        seed: u64,
    ) -> Result<(f64, Tensor, Tensor)> {
        let names: Vec<String> = self
            .student_flat
            .trainable()
            .map(|e| e.name.clone())
            .collect();
        let shared = HalfShared {
            teacher_temp,
            student_temp: self.objective.config().student_temp,
            terms: (GLOBAL_VIEWS * views.len() - GLOBAL_VIEWS) as f64,
            scale,
            precision: self.precision,
            device: self.student.device(),
        };
        let (ids_a, ids_b) = split_views(views, self.student.config().patch_size);
        let (Some(replica), Some(teacher_b)) =
            (self.replica.as_mut(), self.teacher_replica.as_mut())
        else {
            return Err(Error::Input {
                name: "trainer".into(),
                reason: "no replica for two-thread steps".into(),
            });
        };
        // Each thread runs the teacher on one global view and hands the other its
        // probabilities: both send before they receive, so neither can wait on the other.
        let (tx_a, rx_b) = std::sync::mpsc::channel::<Tensor>();
        let (tx_b, rx_a) = std::sync::mpsc::channel::<Tensor>();
        let half = |teacher, student, own: usize, ids: Vec<usize>, tx, rx, tag: u64| HalfStep {
            teacher,
            student,
            global: views[own].shallow_clone(),
            own,
            views: ids.iter().map(|&i| views[i].shallow_clone()).collect(),
            ids,
            center: self.objective.center().shallow_clone(),
            names: names.clone(),
            tx,
            rx,
            seed: seed ^ tag,
        };
        let a = half(
            &mut self.teacher,
            &mut self.student,
            1,
            ids_a,
            tx_a,
            rx_a,
            0xA,
        );
        let b = half(teacher_b, replica, 0, ids_b, tx_b, rx_b, 0xB);
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(move || a.run(shared));
            let b = s.spawn(move || b.run(shared));
            (a.join(), b.join())
        });
        let joined = |r: std::thread::Result<Result<(f64, Tensor, Tensor)>>| {
            r.map_err(|_| Error::Input {
                name: "trainer".into(),
                reason: "a training thread panicked".into(),
            })?
        };
        let (la, t1, ga) = joined(a)?;
        let (lb, t0, gb) = joined(b)?;
        let t_out = Tensor::cat(&[t0, t1], 0);
        let grads = self.grads.shallow_clone();
        tch::no_grad(|| {
            let _ = ga.add_out(&grads, &gb);
        });
        Ok((la + lb, t_out, grads))
    }

    /// One complete iteration `step` on this rank's `views` (global views first, each
    /// (B, 3, T, S, S)); gradients and the centre are summed over `collective`.
    pub fn step(
        &mut self,
        views: &[Tensor],
        step: usize,
        collective: &mut dyn Collective,
    ) -> Result<StepStats> {
        if views.len() <= GLOBAL_VIEWS {
            return Err(Error::Input {
                name: "views".into(),
                reason: format!("{} views, need more than {GLOBAL_VIEWS}", views.len()),
            });
        }
        let epoch = step / self.iters_per_epoch;
        let (lr, wd, momentum) = (self.lr.at(step), self.wd.at(step), self.momentum.at(step));
        let teacher_temp = schedule::teacher_temp(
            self.cfg.warmup_teacher_temp,
            self.cfg.teacher_temp,
            self.cfg.warmup_teacher_temp_epochs,
            epoch,
        );
        let world = collective.world_size();
        tch::manual_seed(step_seed(self.cfg.seed, step, collective.rank()));

        let scale = self.scaler.as_ref().map_or(1.0, |s| s.scale);
        let (loss_value, teacher_out, mut grads) = if self.replica.is_some() {
            let seed = step_seed(self.cfg.seed, step, collective.rank()) as u64;
            self.two_thread_grads(views, teacher_temp, scale, seed)?
        } else {
            let device = self.student.device();
            let (outs, loss) = with_precision(self.precision, device, || {
                let outs = ssl::forward(&self.student, &self.teacher, views, GLOBAL_VIEWS);
                let loss = self
                    .objective
                    .loss(&outs.student, &outs.teacher, teacher_temp);
                (outs, loss)
            })?;
            let loss_value = loss.to_kind(Kind::Double).double_value(&[]);
            if loss_value.is_finite() {
                if scale == 1.0 {
                    loss.backward();
                } else {
                    (&loss * scale).backward();
                }
            }
            let grads = self.student_flat.take_grads_into(Some(&self.grads));
            (loss_value, outs.teacher, grads)
        };
        if !loss_value.is_finite() {
            return Err(Error::Input {
                name: "loss".into(),
                reason: format!("is {loss_value} at step {step}: stopping (as the reference does)"),
            });
        }
        collective.all_reduce_sum(&mut grads)?;
        let _ = grads.g_mul_scalar_(1.0 / (world as f64 * scale));
        let finite = match self.scaler {
            Some(_) => bool::try_from(grads.isfinite().all()).unwrap_or(false),
            None => true,
        };
        if finite {
            if self.cfg.clip_grad > 0.0 {
                let _norms = self
                    .student_flat
                    .clip_per_tensor(&mut grads, self.cfg.clip_grad);
            }
            let freeze_last = epoch < self.cfg.freeze_last_layer;
            self.optimizer
                .step(&self.student_flat, &grads, lr, wd, freeze_last);
        }
        if let Some(s) = self.scaler.as_mut() {
            s.update(finite);
        }
        self.teacher_flat.ema_from(&self.student_flat, momentum);

        // The centre's batch sum and the diagnostics' sums travel in one all-reduce; the
        // diagnostics use the centre this step's loss used.
        let k = self.objective.center().size()[1];
        let sums = diagnostics::partial_sums(
            &teacher_out,
            self.objective.center(),
            teacher_temp,
            loss_value,
        );
        let mut summed = Tensor::cat(&[SslLoss::batch_sum(&teacher_out).reshape([-1]), sums], 0);
        collective.all_reduce_sum(&mut summed)?;
        let diagnostics = diagnostics::from_sums(&summed.narrow(0, k, summed.size()[0] - k), world);
        let rows = teacher_out.size()[0] * world as i64;
        self.objective
            .update_center(&summed.narrow(0, 0, k).reshape([1, k]), rows);

        Ok(StepStats {
            step,
            epoch,
            loss: loss_value,
            lr,
            wd,
            momentum,
            teacher_temp,
            skipped: !finite,
            diagnostics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Solo;

    fn small() -> ModelConfig {
        crate::test_support::small_model(2)
    }

    fn views(seed: i64) -> Vec<Tensor> {
        tch::manual_seed(seed);
        let mut v = vec![
            Tensor::randn([2, 3, 4, 32, 32], (Kind::Float, Device::Cpu)),
            Tensor::randn([2, 3, 8, 32, 32], (Kind::Float, Device::Cpu)),
        ];
        for t in [2, 2, 4, 4] {
            v.push(Tensor::randn([2, 3, t, 16, 16], (Kind::Float, Device::Cpu)));
        }
        v
    }

    fn cfg() -> PretrainConfig {
        PretrainConfig {
            epochs: 2,
            batch_per_rank: 2,
            warmup_epochs: 1,
            lr: 0.05,
            ..Default::default()
        }
    }

    #[test]
    fn steps_are_deterministic_and_change_the_networks() {
        let _rng = crate::test_support::rng_lock();
        let run = || {
            let mut t = SslTrainer::new(&small(), &cfg(), Device::Cpu, 3, 1).unwrap();
            let before = t.student_flat().buffer().copy();
            let mut stats = Vec::new();
            for step in 0..4 {
                stats.push(t.step(&views(step as i64), step, &mut Solo).unwrap());
            }
            assert!(!t.student_flat().buffer().equal(&before));
            (
                t.student_flat().buffer().copy(),
                t.objective().center().copy(),
                stats,
            )
        };
        let (a, ca, sa) = run();
        let (b, cb, _) = run();
        assert!(a.equal(&b), "two identical runs diverged");
        assert!(ca.equal(&cb));
        assert!(
            ca.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "centre never updated"
        );
        assert_eq!(sa[0].epoch, 0);
        assert_eq!(sa[3].epoch, 1);
        assert!(sa[0].lr < sa[2].lr, "warm-up");
    }

    #[test]
    fn views_are_split_by_work_and_groups_stay_together() {
        let shapes = |px: (i64, i64), b: i64| -> Vec<Tensor> {
            [8, 16]
                .iter()
                .map(|&t| Tensor::zeros([b, 3, t, px.0, px.0], (Kind::Float, Device::Cpu)))
                .chain(
                    [2, 2, 4, 4, 8, 8, 16, 16]
                        .iter()
                        .map(|&t| Tensor::zeros([b, 3, t, px.1, px.1], (Kind::Float, Device::Cpu))),
                )
                .collect()
        };
        // The tiny preset's views (112/48 px, batch 2): work 6640 against 6560 rows.
        let (a, b) = split_views(&shapes((112, 48), 2), 16);
        assert_eq!(a, vec![1, 2, 3]);
        assert_eq!(b, vec![0, 4, 5, 6, 7, 8, 9]);
        // Small views (48/32 px, batch 8): the 16- and 4-frame locals on B, 8 and 2 on A.
        let (a, b) = split_views(&shapes((48, 32), 8), 16);
        assert_eq!(a, vec![1, 2, 3, 6, 7]);
        assert_eq!(b, vec![0, 4, 5, 8, 9]);
        // Every view once.
        let mut all: Vec<usize> = a.iter().chain(&b).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        // A malformed view is left for the forward pass to report, not a panic here.
        let mut odd = shapes((48, 32), 1);
        odd[5] = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu));
        let (a, b) = split_views(&odd, 16);
        assert_eq!(a.len() + b.len(), 10);
    }

    #[test]
    fn two_thread_steps_are_deterministic_and_agree_with_one_thread() {
        let _rng = crate::test_support::rng_lock();
        let mut cfg = cfg();
        cfg.drop_path_rate = Some(0.0);
        let run = |two: bool| {
            let mut t = SslTrainer::new(&small(), &cfg, Device::Cpu, 3, 1).unwrap();
            t.set_two_threads(two).unwrap();
            assert_eq!(t.two_threads(), two);
            let mut losses = Vec::new();
            for step in 0..3 {
                losses.push(t.step(&views(step as i64), step, &mut Solo).unwrap().loss);
            }
            (
                t.student_flat().buffer().copy(),
                t.teacher_flat().buffer().copy(),
                losses,
            )
        };
        let (a, ta, la) = run(true);
        let (b, tb, _) = run(true);
        assert!(
            a.equal(&b) && ta.equal(&tb),
            "two-thread steps are not reproducible"
        );
        let (c, tc, lc) = run(false);
        for (x, y) in la.iter().zip(&lc) {
            assert!((x - y).abs() < 1e-4, "loss {x} vs {y}");
        }
        let worst = (&a - &c).abs().max().double_value(&[]);
        assert!(
            worst < 1e-3,
            "parameters differ by {worst} between the two modes"
        );
        assert!(tc.allclose(&ta, 1e-4, 1e-5, false));
    }

    #[test]
    fn two_thread_steps_draw_drop_path_reproducibly() {
        let _rng = crate::test_support::rng_lock();
        let run = || {
            let mut t = SslTrainer::new(&small(), &cfg(), Device::Cpu, 3, 1).unwrap();
            t.set_two_threads(true).unwrap();
            for step in 0..2 {
                t.step(&views(step as i64), step, &mut Solo).unwrap();
            }
            t.student_flat().buffer().copy()
        };
        assert!(run().equal(&run()));
    }

    #[test]
    fn last_layer_is_frozen_in_the_first_epoch_only() {
        let _rng = crate::test_support::rng_lock();
        let mut t = SslTrainer::new(&small(), &cfg(), Device::Cpu, 2, 1).unwrap();
        fn t_var(t: &SslTrainer, k: &str) -> Tensor {
            t.student().var_store().variables()[k].copy()
        }
        let v0 = t_var(&t, "head.last_layer.weight_v");
        let other0 = t_var(&t, "head.mlp.0.weight");
        t.step(&views(0), 0, &mut Solo).unwrap();
        t.step(&views(1), 1, &mut Solo).unwrap();
        assert!(
            t_var(&t, "head.last_layer.weight_v").equal(&v0),
            "changed in epoch 0"
        );
        assert!(!t_var(&t, "head.mlp.0.weight").equal(&other0));
        t.step(&views(2), 2, &mut Solo).unwrap();
        assert!(
            !t_var(&t, "head.last_layer.weight_v").equal(&v0),
            "still frozen in epoch 1"
        );
    }

    #[test]
    fn teacher_follows_the_student_by_ema() {
        let _rng = crate::test_support::rng_lock();
        let mut t = SslTrainer::new(&small(), &cfg(), Device::Cpu, 2, 1).unwrap();
        let teacher0 = t.teacher_flat().buffer().copy();
        t.step(&views(0), 0, &mut Solo).unwrap();
        let m = t.momentum.at(0);
        let want = teacher0 * m + t.student_flat().buffer() * (1.0 - m);
        let teacher = t.teacher_flat().buffer().copy();
        assert!(teacher.allclose(&want, 1e-5, 1e-7, false));
    }

    #[test]
    fn seeds_differ_by_step_and_rank() {
        let _rng = crate::test_support::rng_lock();
        assert_ne!(step_seed(0, 1, 0), step_seed(0, 2, 0));
        assert_ne!(step_seed(0, 1, 0), step_seed(0, 1, 1));
        assert!(step_seed(u64::MAX, usize::MAX, 7) >= 0);
    }
}
