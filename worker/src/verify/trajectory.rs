//! Multi-step pre-training trajectories of the published training loop (`main_train_ssl` of
//! med-air/Endo-FM, DINO's `train_one_epoch`): a reference directory whose `config.json` holds a
//! `trajectory` section with every hyper-parameter in the reference's own terms, whose
//! `weights.safetensors` is the initial student (= teacher), and whose `trajectory.safetensors`
//! holds the views of each iteration (`step{s}.view{v}`, float16), the loss, learning rate,
//! weight decay, teacher momentum and teacher temperature each iteration used, and the final
//! student, teacher and centre (`final.student.<key>`, `final.teacher.<key>`, `final.center`).
//!
//! [`replay`] runs those iterations through [`SslTrainer::step`], the step `pretrain` runs (the
//! schedules, AdamW groups, per-tensor clipping, frozen last layer, EMA teacher and centre all
//! come from there), with the hyper-parameters mapped by [`Trajectory::open`]; anything the
//! step cannot honour (drop-path draws, another optimiser, several ranks, reduced precision,
//! an unknown key) is refused with the key named. [`check`] compares a replay with the file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use endofm_shared::{ModelConfig, PretrainConfig, TrainPrecision};

use crate::collective::Solo;
use crate::model::weights;
use crate::train::diagnostics::{CollapseMonitor, CollapseWarning, Diagnostics};
use crate::train::step::{GLOBAL_VIEWS, SslTrainer};
use crate::verify::{ReferenceDir, rel_err};
use crate::{Error, Result};

/// Name of the trajectory file inside a reference directory.
pub const TRAJECTORY_FILE: &str = "trajectory.safetensors";

/// Tolerances of the trajectory check (the issue's; the published code against itself with
/// another thread count differs by at most 2e-3 in the update measure).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TrajectoryTolerances {
    /// Loss of every iteration, relative.
    pub loss_rel: f64,
    /// Every parameter's update (final − initial): `max |Δours − Δref| / max |Δref|`.
    pub update_rel: f64,
    /// The final centre, relative.
    pub center_rel: f64,
    /// The per-iteration schedule values (lr, wd, momentum, teacher temperature), relative
    /// (absolute where the reference value is 0).
    pub schedule_rel: f64,
}

impl Default for TrajectoryTolerances {
    fn default() -> Self {
        Self {
            loss_rel: 1e-4,
            update_rel: 1e-2,
            center_rel: 1e-3,
            schedule_rel: 1e-6,
        }
    }
}

/// The `trajectory` section of `config.json`, in the reference's own terms (argument names of
/// `main_train_ssl.py`). Unknown keys are refused, so a hyper-parameter this replay does not
/// map can never be silently ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Section {
    lr: f64,
    min_lr: f64,
    epochs: usize,
    niter_per_ep: usize,
    warmup_epochs: usize,
    weight_decay: f64,
    weight_decay_end: f64,
    momentum_teacher: f64,
    warmup_teacher_temp: f64,
    teacher_temp: f64,
    warmup_teacher_temp_epochs: usize,
    student_temp: f64,
    center_momentum: f64,
    clip_grad: f64,
    freeze_last_layer: usize,
    /// Iterations stored in the trajectory file.
    steps: usize,
    /// Free text.
    #[serde(default)]
    note: Option<String>,
    // Keys the reference has and the replay honours only at the values below.
    #[serde(default)]
    batch_size_per_gpu: Option<usize>,
    #[serde(default)]
    world_size: Option<usize>,
    #[serde(default)]
    optimizer: Option<String>,
    #[serde(default)]
    use_fp16: Option<bool>,
    #[serde(default)]
    drop_path_rate: Option<f64>,
    #[serde(default)]
    global_crops: Option<usize>,
    #[serde(default)]
    local_crops_number: Option<usize>,
    #[serde(default)]
    betas: Option<Vec<f64>>,
    #[serde(default)]
    eps: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
}

/// A trajectory reference: the network, the mapped hyper-parameters and the view layout.
#[derive(Debug, Clone)]
pub struct Trajectory {
    /// The reference directory.
    pub dir: ReferenceDir,
    /// The network (drop-path 0).
    pub model: ModelConfig,
    /// The hyper-parameters mapped onto ours (`batch_per_rank` = the reference's batch per
    /// GPU, one rank).
    pub train: PretrainConfig,
    /// Iterations per epoch of the reference's data loader.
    pub iters_per_epoch: usize,
    /// Iterations to replay.
    pub steps: usize,
    /// Frame counts of the global views (`global_frames`), when the config gives them.
    pub global_frames: Option<Vec<i64>>,
    /// Frame counts of the local views (`local_frames`), when the config gives them.
    pub local_frames: Option<Vec<i64>>,
    /// Side of the global views in pixels (`global_px`).
    pub global_px: Option<i64>,
    /// Side of the local views in pixels (`local_px`).
    pub local_px: Option<i64>,
}

fn refuse(key: &str, reason: impl Into<String>) -> Error {
    Error::Input {
        name: format!("config.json: {key}"),
        reason: reason.into(),
    }
}

fn int_list(v: &serde_json::Value, key: &str) -> Result<Option<Vec<i64>>> {
    match v.get(key) {
        None => Ok(None),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|x| {
                x.as_i64()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| refuse(key, format!("{x} is not a positive frame count")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(other) => Err(refuse(
            key,
            format!("{other} is not a list of frame counts"),
        )),
    }
}

impl Trajectory {
    /// Whether `dir` holds a trajectory (its `trajectory.safetensors` exists).
    pub fn present(dir: &ReferenceDir) -> bool {
        dir.file(TRAJECTORY_FILE).is_file()
    }

    /// Reads `config.json` of `dir` and maps the `trajectory` section onto our
    /// hyper-parameters. Errors name the key: a missing or unknown key, a value of the wrong
    /// type, and settings the step cannot reproduce (drop-path > 0, several ranks, fp16,
    /// another optimiser or AdamW betas/ε, global views other than 2, fewer schedule
    /// iterations than stored steps).
    pub fn open(dir: &ReferenceDir) -> Result<Self> {
        let path = dir.file("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            action: "reading",
            path: path.clone(),
            source,
        })?;
        let mut doc: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| refuse("(document)", e.to_string()))?;
        let obj = doc
            .as_object_mut()
            .ok_or_else(|| refuse("(document)", "expected a JSON object"))?;
        let section = obj
            .remove("trajectory")
            .ok_or_else(|| refuse("trajectory", "missing: no hyper-parameters to replay with"))?;
        let hp: Section =
            serde_json::from_value(section).map_err(|e| refuse("trajectory", format!("{e}")))?;
        let model = ModelConfig::from_json_str(&doc.to_string(), &path.display().to_string())?;
        let top = &doc;

        if model.drop_path_rate != 0.0 || hp.drop_path_rate.is_some_and(|r| r != 0.0) {
            return Err(refuse(
                "drop_path_rate",
                "is not 0: the reference's drop-path masks are random draws the replay cannot reproduce",
            ));
        }
        let batch = match (
            top.get("batch").and_then(serde_json::Value::as_u64),
            hp.batch_size_per_gpu,
        ) {
            (Some(a), Some(b)) if a as usize != b => {
                return Err(refuse(
                    "trajectory.batch_size_per_gpu",
                    format!("{b} differs from batch = {a}"),
                ));
            }
            (Some(a), _) => a as usize,
            (None, Some(b)) => b,
            (None, None) => {
                return Err(refuse(
                    "batch",
                    "missing: the learning rate is scaled by the batch per GPU",
                ));
            }
        };
        if let Some(w) = hp.world_size.filter(|w| *w != 1) {
            return Err(refuse(
                "trajectory.world_size",
                format!("{w}: the replay runs one rank (the views of one rank are stored)"),
            ));
        }
        if let Some(o) = hp.optimizer.as_deref().filter(|o| *o != "adamw") {
            return Err(refuse(
                "trajectory.optimizer",
                format!("`{o}`: pre-training here uses AdamW only"),
            ));
        }
        if hp.use_fp16 == Some(true) {
            return Err(refuse(
                "trajectory.use_fp16",
                "true: fp16 loss scaling is not replayed (the checks are fp32)",
            ));
        }
        if let Some(g) = hp.global_crops.filter(|g| *g != GLOBAL_VIEWS) {
            return Err(refuse(
                "trajectory.global_crops",
                format!("{g}: the step has {GLOBAL_VIEWS} global views"),
            ));
        }
        if let Some(b) = &hp.betas
            && b.as_slice() != [0.9, 0.999]
        {
            return Err(refuse(
                "trajectory.betas",
                format!("{b:?}: AdamW runs with PyTorch's defaults (0.9, 0.999)"),
            ));
        }
        if let Some(e) = hp.eps.filter(|e| *e != 1e-8) {
            return Err(refuse(
                "trajectory.eps",
                format!("{e}: AdamW runs with PyTorch's default 1e-8"),
            ));
        }
        if hp.niter_per_ep == 0 {
            return Err(refuse("trajectory.niter_per_ep", "must be at least 1"));
        }
        if hp.steps == 0 {
            return Err(refuse("trajectory.steps", "must be at least 1"));
        }
        if hp.steps > hp.epochs * hp.niter_per_ep {
            return Err(refuse(
                "trajectory.steps",
                format!(
                    "{} iterations, but the schedules span epochs × niter_per_ep = {}",
                    hp.steps,
                    hp.epochs * hp.niter_per_ep
                ),
            ));
        }
        let train = PretrainConfig {
            epochs: hp.epochs,
            batch_per_rank: batch,
            lr: hp.lr,
            min_lr: hp.min_lr,
            warmup_epochs: hp.warmup_epochs,
            weight_decay: hp.weight_decay,
            weight_decay_end: hp.weight_decay_end,
            momentum_teacher: hp.momentum_teacher,
            clip_grad: hp.clip_grad,
            freeze_last_layer: hp.freeze_last_layer,
            teacher_temp: hp.teacher_temp,
            warmup_teacher_temp: hp.warmup_teacher_temp,
            warmup_teacher_temp_epochs: hp.warmup_teacher_temp_epochs,
            student_temp: hp.student_temp,
            center_momentum: hp.center_momentum,
            drop_path_rate: Some(0.0),
            seed: hp.seed.unwrap_or(0),
            precision: TrainPrecision::Fp32,
            ..PretrainConfig::default()
        };
        train.validate()?;
        let local_frames = int_list(top, "local_frames")?;
        if let (Some(n), Some(l)) = (hp.local_crops_number, &local_frames)
            && n != l.len()
        {
            return Err(refuse(
                "trajectory.local_crops_number",
                format!("{n}, but local_frames lists {} views", l.len()),
            ));
        }
        let _ = hp.note;
        let px = |k: &str| top.get(k).and_then(serde_json::Value::as_i64);
        Ok(Self {
            dir: dir.clone(),
            model,
            train,
            iters_per_epoch: hp.niter_per_ep,
            steps: hp.steps,
            global_frames: int_list(top, "global_frames")?,
            local_frames,
            global_px: px("global_px"),
            local_px: px("local_px"),
        })
    }

    /// Path of the trajectory file.
    pub fn file(&self) -> PathBuf {
        self.dir.file(TRAJECTORY_FILE)
    }

    /// The views of iteration `step` as float32 on `device`, checked against the configured
    /// batch, frame counts and sizes (errors name the tensor).
    fn views(
        &self,
        file: &BTreeMap<String, Tensor>,
        step: usize,
        device: Device,
    ) -> Result<Vec<Tensor>> {
        let mut views = Vec::new();
        while let Some(v) = file.get(&format!("step{step}.view{}", views.len())) {
            views.push(v);
        }
        let name = |i: usize| format!("{}: step{step}.view{i}", self.file().display());
        let expected = match (&self.global_frames, &self.local_frames) {
            (Some(g), Some(l)) => Some(g.iter().chain(l).copied().collect::<Vec<_>>()),
            _ => None,
        };
        let count_ok = match &expected {
            Some(e) => views.len() == e.len(),
            None => views.len() > GLOBAL_VIEWS,
        };
        if !count_ok {
            return Err(Error::Input {
                name: name(views.len()),
                reason: format!(
                    "iteration {step} holds {} views; the config implies {}",
                    views.len(),
                    expected.map_or(format!("more than {GLOBAL_VIEWS}"), |e| e.len().to_string())
                ),
            });
        }
        views
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let s = v.size();
                let px = if i < GLOBAL_VIEWS {
                    self.global_px
                } else {
                    self.local_px
                };
                let frames = expected.as_ref().map(|e| e[i]);
                let bad = s.len() != 5
                    || s[0] != self.train.batch_per_rank as i64
                    || s[1] != 3
                    || frames.is_some_and(|t| s[2] != t)
                    || px.is_some_and(|p| s[3] != p || s[4] != p);
                if bad {
                    return Err(Error::Input {
                        name: name(i),
                        reason: format!(
                            "has shape {s:?}; the config implies ({}, 3, {}, {}, {})",
                            self.train.batch_per_rank,
                            frames.map_or("T".into(), |t| t.to_string()),
                            px.map_or("S".into(), |p| p.to_string()),
                            px.map_or("S".into(), |p| p.to_string()),
                        ),
                    });
                }
                Ok(v.to_kind(Kind::Float).to_device(device))
            })
            .collect()
    }
}

/// What a replay computed.
#[derive(Debug)]
pub struct Replay {
    /// Loss of every iteration.
    pub loss: Vec<f64>,
    /// Learning rate of every iteration.
    pub lr: Vec<f64>,
    /// Weight decay of every iteration.
    pub wd: Vec<f64>,
    /// Teacher momentum of every iteration.
    pub momentum: Vec<f64>,
    /// Teacher temperature of every iteration.
    pub teacher_temp: Vec<f64>,
    /// Final student parameters (published keys, on the CPU).
    pub student: BTreeMap<String, Tensor>,
    /// Final teacher parameters.
    pub teacher: BTreeMap<String, Tensor>,
    /// Final centre, (1, out_dim).
    pub center: Tensor,
    /// Whether the two-thread CPU step ran (otherwise one forward/backward on libtorch's
    /// intra-op threads).
    pub two_threads: bool,
    /// Collapse diagnostics of every iteration.
    pub diagnostics: Vec<Diagnostics>,
    /// Collapse warnings a pre-training run would have logged (window
    /// [`CollapseMonitor::default_window`] of the replayed steps).
    pub collapse: Vec<CollapseWarning>,
}

impl Replay {
    /// The tensors of a replay output file: `loss`, `lr`, `wd`, `momentum`, `teacher_temp`
    /// (float64, one value per iteration), `final.student.<key>`, `final.teacher.<key>`,
    /// `final.center`.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (k, v) in [
            ("loss", &self.loss),
            ("lr", &self.lr),
            ("wd", &self.wd),
            ("momentum", &self.momentum),
            ("teacher_temp", &self.teacher_temp),
        ] {
            out.insert(k.to_string(), Tensor::from_slice(v));
        }
        for (prefix, map) in [("student", &self.student), ("teacher", &self.teacher)] {
            for (k, t) in map {
                out.insert(format!("final.{prefix}.{k}"), t.shallow_clone());
            }
        }
        out.insert("final.center".into(), self.center.shallow_clone());
        out
    }
}

fn host_params(model: &crate::model::EndoFm) -> BTreeMap<String, Tensor> {
    model
        .var_store()
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach().to_device(Device::Cpu).copy()))
        .collect()
}

/// Runs the trajectory's iterations from its initial weights through [`SslTrainer::step`] on
/// `device` in fp32. `two_threads`: `None` keeps the trainer's choice (two threads on a CPU
/// with ≥ 2 libtorch threads and a narrow network, unless `ENDOFM_ONE_THREAD_STEP` is set).
pub fn replay(traj: &Trajectory, device: Device, two_threads: Option<bool>) -> Result<Replay> {
    let file = weights::read(&traj.file())?;
    let mut trainer = SslTrainer::new(&traj.model, &traj.train, device, traj.iters_per_epoch, 1)?;
    if let Some(on) = two_threads {
        trainer.set_two_threads(on)?;
    }
    trainer.load_weights(&traj.dir.file("weights.safetensors"), None)?;
    let mut r = Replay {
        loss: Vec::with_capacity(traj.steps),
        lr: Vec::new(),
        wd: Vec::new(),
        momentum: Vec::new(),
        teacher_temp: Vec::new(),
        student: BTreeMap::new(),
        teacher: BTreeMap::new(),
        center: Tensor::zeros([1], (Kind::Float, Device::Cpu)),
        two_threads: trainer.two_threads(),
        diagnostics: Vec::new(),
        collapse: Vec::new(),
    };
    let mut monitor = CollapseMonitor::new(
        traj.model.head.out_dim,
        traj.train.batch_per_rank,
        CollapseMonitor::default_window(traj.steps),
    );
    for step in 0..traj.steps {
        let views = traj.views(&file, step, device)?;
        let stats = trainer.step(&views, step, &mut Solo)?;
        tracing::debug!(step, loss = stats.loss, lr = stats.lr, "replayed");
        r.loss.push(stats.loss);
        r.lr.push(stats.lr);
        r.wd.push(stats.wd);
        r.momentum.push(stats.momentum);
        r.teacher_temp.push(stats.teacher_temp);
        r.diagnostics.push(stats.diagnostics);
        r.collapse.extend(monitor.observe(&stats.diagnostics));
    }
    r.student = host_params(trainer.student());
    r.teacher = host_params(trainer.teacher());
    r.center = trainer.objective().center().to_device(Device::Cpu).copy();
    Ok(r)
}

/// The worst error of one kind.
#[derive(Debug, Clone, Serialize)]
pub struct Worst {
    /// Where: an iteration (`step3`), a parameter key, or `center`.
    pub at: String,
    /// The error.
    pub err: f64,
    /// Its tolerance.
    pub tolerance: f64,
}

impl Worst {
    fn new(tolerance: f64) -> Self {
        Self {
            at: String::new(),
            err: 0.0,
            tolerance,
        }
    }
    fn see(&mut self, at: impl Into<String>, err: f64) {
        let err = if err.is_nan() { f64::INFINITY } else { err };
        if self.at.is_empty() || err > self.err {
            self.at = at.into();
            self.err = err;
        }
    }
    fn ok(&self) -> bool {
        self.err <= self.tolerance
    }
}

/// The trajectory comparison, worst errors first.
#[derive(Debug, Clone, Serialize)]
pub struct TrajectoryReport {
    /// Iterations replayed.
    pub steps: usize,
    /// `two-thread` or `intra-op`.
    pub step_path: &'static str,
    /// Worst relative loss error over the iterations.
    pub loss: Worst,
    /// Worst relative error of the per-iteration lr / wd / momentum / teacher temperature.
    pub schedules: Worst,
    /// Worst update error over the student's parameters.
    pub student_update: Worst,
    /// Worst update error over the teacher's parameters.
    pub teacher_update: Worst,
    /// Relative error of the final centre.
    pub center: Worst,
    /// Parameters compared (student + teacher).
    pub params_checked: usize,
    /// Keys in one side and not the other.
    pub key_mismatches: Vec<String>,
    /// Our loss per iteration.
    pub losses: Vec<f64>,
    /// The reference's loss per iteration.
    pub reference_losses: Vec<f64>,
    /// Whether everything is within tolerance.
    pub pass: bool,
}

fn values(file: &BTreeMap<String, Tensor>, key: &str, path: &std::path::Path) -> Result<Vec<f64>> {
    let t = file.get(key).ok_or_else(|| Error::Input {
        name: format!("{}: {key}", path.display()),
        reason: "missing".into(),
    })?;
    Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).map_err(|e| Error::Input {
        name: format!("{}: {key}", path.display()),
        reason: e.to_string(),
    })
}

/// Compares a replay with the trajectory file of `traj`.
pub fn compare(
    traj: &Trajectory,
    ours: &Replay,
    tol: &TrajectoryTolerances,
) -> Result<TrajectoryReport> {
    let path = traj.file();
    let file = weights::read(&path)?;
    let initial = weights::read(&traj.dir.file("weights.safetensors"))?;
    let reference_losses = values(&file, "loss", &path)?;
    if reference_losses.len() != traj.steps {
        return Err(Error::Input {
            name: format!("{}: loss", path.display()),
            reason: format!(
                "holds {} values; trajectory.steps is {}",
                reference_losses.len(),
                traj.steps
            ),
        });
    }
    let mut loss = Worst::new(tol.loss_rel);
    for (s, (a, b)) in ours.loss.iter().zip(&reference_losses).enumerate() {
        loss.see(
            format!("step{s}"),
            (a - b).abs() / b.abs().max(f64::MIN_POSITIVE),
        );
    }
    let mut schedules = Worst::new(tol.schedule_rel);
    for (key, mine) in [
        ("lr", &ours.lr),
        ("wd", &ours.wd),
        ("momentum", &ours.momentum),
        ("teacher_temp", &ours.teacher_temp),
    ] {
        // Older trajectories may lack a schedule; the loss and parameters still catch it.
        if !file.contains_key(key) {
            continue;
        }
        let theirs = values(&file, key, &path)?;
        for (s, (a, b)) in mine.iter().zip(&theirs).enumerate() {
            let scale = if *b == 0.0 { 1.0 } else { b.abs() };
            schedules.see(format!("{key}[step{s}]"), (a - b).abs() / scale);
        }
        if theirs.len() != mine.len() {
            schedules.see(format!("{key} (length {})", theirs.len()), f64::INFINITY);
        }
    }
    let mut key_mismatches = Vec::new();
    let mut params_checked = 0;
    let mut updates = |prefix: &str, mine: &BTreeMap<String, Tensor>, worst: &mut Worst| {
        for (k, init) in &initial {
            let key = format!("final.{prefix}.{k}");
            match (mine.get(k), file.get(&key)) {
                (Some(o), Some(r)) => {
                    let init = init.to_kind(Kind::Double);
                    let d_ours = o.to_kind(Kind::Double) - &init;
                    let d_ref = r.to_kind(Kind::Double) - &init;
                    worst.see(k.clone(), rel_err(&d_ours, &d_ref));
                    params_checked += 1;
                }
                (None, _) => key_mismatches.push(format!("{k}: not a parameter of this network")),
                (_, None) => key_mismatches.push(format!("{key}: missing from the trajectory")),
            }
        }
        for k in mine.keys() {
            if !initial.contains_key(k) {
                key_mismatches.push(format!("{k}: not in weights.safetensors"));
            }
        }
    };
    let mut student_update = Worst::new(tol.update_rel);
    let mut teacher_update = Worst::new(tol.update_rel);
    updates("student", &ours.student, &mut student_update);
    updates("teacher", &ours.teacher, &mut teacher_update);
    let mut center = Worst::new(tol.center_rel);
    match file.get("final.center") {
        Some(c) => center.see("center", rel_err(&ours.center, c)),
        None => key_mismatches.push("final.center: missing from the trajectory".into()),
    }
    let pass = loss.ok()
        && schedules.ok()
        && student_update.ok()
        && teacher_update.ok()
        && center.ok()
        && key_mismatches.is_empty()
        && params_checked > 0;
    Ok(TrajectoryReport {
        steps: traj.steps,
        step_path: if ours.two_threads {
            "two-thread"
        } else {
            "intra-op"
        },
        loss,
        schedules,
        student_update,
        teacher_update,
        center,
        params_checked,
        key_mismatches,
        losses: ours.loss.clone(),
        reference_losses,
        pass,
    })
}

/// [`replay`] then [`compare`] with the default tolerances.
pub fn check(
    dir: &ReferenceDir,
    device: Device,
    two_threads: Option<bool>,
) -> Result<TrajectoryReport> {
    let traj = Trajectory::open(dir)?;
    let ours = replay(&traj, device, two_threads)?;
    compare(&traj, &ours, &TrajectoryTolerances::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(config: serde_json::Value) -> (tempfile::TempDir, ReferenceDir) {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
        std::fs::write(tmp.path().join("weights.safetensors"), b"").unwrap();
        let dir = ReferenceDir::open(tmp.path()).unwrap();
        (tmp, dir)
    }

    fn config() -> serde_json::Value {
        serde_json::json!({
            "embed_dim": 96, "depth": 2, "num_heads": 2, "global_px": 64, "local_px": 32,
            "num_frames": 8, "out_dim": 512, "hidden_dim": 128, "bottleneck_dim": 32,
            "batch": 2, "global_frames": [8, 16], "local_frames": [2, 2, 4, 4],
            "patch_size": 16, "mlp_ratio": 4, "qkv_bias": true, "layer_norm_eps": 1e-6,
            "drop_path_rate": 0.0,
            "trajectory": {
                "lr": 0.128, "min_lr": 1e-5, "epochs": 4, "niter_per_ep": 2, "warmup_epochs": 1,
                "weight_decay": 2.0, "weight_decay_end": 8.0, "momentum_teacher": 0.9,
                "warmup_teacher_temp": 0.04, "teacher_temp": 0.07,
                "warmup_teacher_temp_epochs": 2, "student_temp": 0.1, "center_momentum": 0.9,
                "clip_grad": 0.3, "freeze_last_layer": 1, "steps": 6, "note": "x"
            }
        })
    }

    #[test]
    fn every_hyper_parameter_is_mapped() {
        let (_t, dir) = dir_with(config());
        let t = Trajectory::open(&dir).unwrap();
        let c = &t.train;
        assert_eq!(
            (c.epochs, c.batch_per_rank, t.iters_per_epoch, t.steps),
            (4, 2, 2, 6)
        );
        assert!((c.scaled_lr(1) - 0.128 * 2.0 / 256.0).abs() < 1e-15);
        assert_eq!((c.min_lr, c.warmup_epochs), (1e-5, 1));
        assert_eq!((c.weight_decay, c.weight_decay_end), (2.0, 8.0));
        assert_eq!(c.momentum_teacher, 0.9);
        assert_eq!(
            (
                c.warmup_teacher_temp,
                c.teacher_temp,
                c.warmup_teacher_temp_epochs
            ),
            (0.04, 0.07, 2)
        );
        assert_eq!((c.student_temp, c.center_momentum), (0.1, 0.9));
        assert_eq!((c.clip_grad, c.freeze_last_layer), (0.3, 1));
        assert_eq!(c.drop_path_rate, Some(0.0));
        assert_eq!(t.model.head.out_dim, 512);
        assert_eq!(t.local_frames, Some(vec![2, 2, 4, 4]));
    }

    #[test]
    fn settings_the_step_cannot_honour_are_refused_by_name() {
        let cases: [(&str, serde_json::Value, &str); 8] = [
            (
                "/trajectory/momentum_shedule",
                serde_json::json!(1),
                "momentum_shedule",
            ),
            ("/drop_path_rate", serde_json::json!(0.1), "drop_path_rate"),
            ("/trajectory/world_size", serde_json::json!(2), "world_size"),
            (
                "/trajectory/optimizer",
                serde_json::json!("sgd"),
                "optimizer",
            ),
            ("/trajectory/use_fp16", serde_json::json!(true), "use_fp16"),
            ("/trajectory/steps", serde_json::json!(9), "steps"),
            ("/trajectory/betas", serde_json::json!([0.9, 0.99]), "betas"),
            (
                "/trajectory/local_crops_number",
                serde_json::json!(8),
                "local_crops_number",
            ),
        ];
        for (pointer, value, named) in cases {
            let mut c = config();
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            let target = if parent.is_empty() {
                &mut c
            } else {
                c.pointer_mut(parent).unwrap()
            };
            target[key] = value;
            let (_t, dir) = dir_with(c);
            let err = Trajectory::open(&dir).unwrap_err().to_string();
            assert!(err.contains(named), "{pointer}: {err}");
        }
        let mut c = config();
        c["trajectory"].as_object_mut().unwrap().remove("clip_grad");
        let (_t, dir) = dir_with(c);
        let err = Trajectory::open(&dir).unwrap_err().to_string();
        assert!(err.contains("clip_grad"), "{err}");
        let mut c = config();
        c.as_object_mut().unwrap().remove("batch");
        let (_t, dir) = dir_with(c);
        let err = Trajectory::open(&dir).unwrap_err().to_string();
        assert!(err.contains("batch"), "{err}");
    }
}
