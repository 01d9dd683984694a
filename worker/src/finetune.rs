//! Fine-tuning, evaluation and prediction on the downstream tasks, as tasks of the run machinery
//! ([`crate::run`]). A fine-tuning run: validate the configuration and the dataset (every split
//! it will read, before any work), initialise the backbone (from a pre-training checkpoint's
//! teacher or student, an imported published checkpoint, or randomly), [`crate::run::drive`] the
//! task with validation and model selection at epoch ends, then score the model chosen on the
//! validation split on every split once and write `report.json` with its plots.
//!
//! Output location layout: `config.json` (resolved), `metrics.jsonl` (steps and epoch ends),
//! `checkpoints/step-N/` (`model.safetensors`, `optimizer.safetensors`, `manifest.json`),
//! `best/` (`model.safetensors` and `info.json`: the model chosen on validation),
//! `report.json` and `plots/*.png`.

pub mod adamw;
pub mod classify;
pub mod detect;
pub mod segment;
pub mod sgd;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use endofm_shared::{
    DetectorConfig, FinetuneConfig, InitFrom, ModelConfig, SegmenterConfig, StorageUri, TaskKind,
};

use crate::init::InitSource;
use crate::model::timesformer::{resize_pos_table, resize_time_table};
use crate::model::{LoadMode, weights};
use crate::run::{RunObserver, Summary};
use crate::store::Store;
use crate::{Error, Result};

/// Folder of the model chosen on validation, below a fine-tuning output location.
pub const BEST: &str = "best";

/// The configuration file of a fine-tuning run (`--config`): every section optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneRunConfig {
    /// The backbone (default: the preset's).
    #[serde(default)]
    pub model: Option<ModelConfig>,
    /// Fine-tuning hyper-parameters over the defaults (sized for the model's input when the
    /// section does not give `crop`).
    #[serde(default)]
    pub finetune: Option<serde_json::Value>,
    /// Segmentation: the stem/decoder sizes over the preset's network (the published one
    /// unless the preset is `tiny`); see [`SegmenterConfig::resolve`].
    #[serde(default)]
    pub segmenter: Option<serde_json::Value>,
    /// Detection: the network beyond the backbone over the preset's (the published one unless
    /// the preset is `tiny`); see [`DetectorConfig::resolve`].
    #[serde(default)]
    pub detector: Option<serde_json::Value>,
}

/// The stem/decoder of a segmentation run: `given`, else the preset's (`tiny`), else the
/// published R50 hybrid.
pub fn segmenter_for(preset: Option<&str>, given: Option<SegmenterConfig>) -> SegmenterConfig {
    given
        .or_else(|| preset.and_then(SegmenterConfig::for_preset))
        .unwrap_or_else(SegmenterConfig::published)
}

/// The detection network of a run: `given`, else the preset's (`tiny`), else the published
/// STFT-FCOS.
pub fn detector_for(preset: Option<&str>, given: Option<DetectorConfig>) -> DetectorConfig {
    given
        .or_else(|| preset.and_then(DetectorConfig::for_preset))
        .unwrap_or_else(DetectorConfig::published)
}

/// The fine-tuning settings of `task` for `model`: the task's defaults sized for the model's
/// input, with the fields of `overrides` (a JSON object of [`FinetuneConfig`] fields) laid over
/// them, validated for the task ([`FinetuneConfig::resolve`]).
pub fn finetune_config(
    task: TaskKind,
    model: &ModelConfig,
    overrides: Option<&serde_json::Value>,
) -> Result<FinetuneConfig> {
    Ok(FinetuneConfig::resolve(task, model.img_size, overrides)?)
}

/// Everything a fine-tuning run needs.
#[derive(Debug, Clone)]
pub struct FinetuneJob {
    /// The downstream task.
    pub task: TaskKind,
    /// Dataset root (published layout of the task).
    pub data: StorageUri,
    /// Output location.
    pub out: StorageUri,
    /// Name of the preset the backbone came from, for the record.
    pub preset: Option<String>,
    /// The backbone (its drop-path rate is replaced by the fine-tuning one).
    pub model: ModelConfig,
    /// Hyper-parameters.
    pub cfg: FinetuneConfig,
    /// Segmentation: the stem/decoder around the backbone's blocks.
    pub segmenter: SegmenterConfig,
    /// Detection: the pyramid, head and post-processing on the backbone.
    pub detector: DetectorConfig,
    /// Initial weights; `None` = random backbone.
    pub init: Option<InitSource>,
    /// Stop after this many steps in total (the schedule still spans every epoch).
    pub max_steps: Option<usize>,
    /// Device.
    pub device: Device,
    /// Decode/augment threads.
    pub data_threads: usize,
    /// Draw a progress bar.
    pub progress: bool,
    /// Set (by a signal handler) to stop at the next step with a checkpoint.
    pub stop: Arc<AtomicBool>,
    /// Told about every step and checkpoint.
    pub observer: Option<Arc<dyn RunObserver>>,
}

/// Loads a fine-tuning checkpoint's `model.safetensors` into `vs` (strictly: every key with its
/// shape), the half of `Checkpointable::restore` every task shares.
pub(crate) fn restore_model(
    vs: &tch::nn::VarStore,
    c: &crate::run::checkpoint::Committed<'_>,
) -> Result<()> {
    weights::load_tensors(
        vs,
        c.read("model.safetensors")?,
        &c.origin("model.safetensors"),
        LoadMode::Strict,
    )?;
    Ok(())
}

impl FinetuneJob {
    /// What every fine-tuning checkpoint's manifest records beside its files: the task, the
    /// settings, the task's `network` sections (e.g. `segmenter`), the loop `state`, and where
    /// the backbone came from (`init` as described at initialisation, and the source given).
    pub(crate) fn checkpoint_extra(
        &self,
        network: serde_json::Map<String, serde_json::Value>,
        state: serde_json::Value,
        init: &str,
    ) -> serde_json::Map<String, serde_json::Value> {
        let mut extra = serde_json::Map::new();
        extra.insert("task".into(), serde_json::json!(self.task));
        extra.insert(
            "finetune".into(),
            serde_json::to_value(&self.cfg).unwrap_or_default(),
        );
        extra.extend(network);
        extra.insert("state".into(), state);
        extra.insert("init".into(), serde_json::json!(init));
        extra.insert(
            "init_source".into(),
            serde_json::json!(self.init.as_ref().map(InitSource::describe)),
        );
        extra
    }

    /// The run machinery's settings of this job on `world` ranks: the backbone as trained
    /// (`model`), the corpus fingerprint, and the resolved configuration written to
    /// `config.json` (kind, task, preset, data, world size, model, fine-tuning settings,
    /// initialisation, plus the task's `network` sections such as `segmenter`).
    pub(crate) fn run_settings(
        &self,
        model: &ModelConfig,
        world: usize,
        corpus: crate::data::CorpusFingerprint,
        network: serde_json::Map<String, serde_json::Value>,
    ) -> crate::run::RunSettings {
        let mut resolved = serde_json::json!({
            "kind": "finetune",
            "task": self.task,
            "preset": self.preset,
            "data": self.data.to_string(),
            "world_size": world,
            "model": model,
            "finetune": self.cfg,
            "init": self.init.as_ref().map(InitSource::describe),
        });
        if let serde_json::Value::Object(map) = &mut resolved {
            map.extend(network);
        }
        crate::run::RunSettings {
            out: self.out.clone(),
            model: model.clone(),
            corpus,
            resolved_config: resolved,
            max_steps: self.max_steps,
            checkpoint_every: self.cfg.checkpoint_every,
            keep_checkpoints: self.cfg.keep_checkpoints,
            log_every: self.cfg.log_every,
            progress: self.progress,
            device: self.device,
            stop: Arc::clone(&self.stop),
            observer: self.observer.clone(),
        }
    }
}

/// What a fine-tuning or evaluation run produced.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The training loop's summary (fine-tuning only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<Summary>,
    /// Where `report.json` is (empty when no report was written: interrupted, or stopped before
    /// any validation).
    pub report: String,
    /// The headline metric (e.g. `test_f1`) and its value.
    pub headline: Option<(String, f64)>,
    /// Every scalar metric of the report, `split_metric`.
    pub metrics: std::collections::BTreeMap<String, f64>,
}

/// Runs (or resumes) fine-tuning on this rank.
pub fn run(
    job: &FinetuneJob,
    collective: &mut dyn crate::collective::Collective,
) -> Result<Outcome> {
    match job.task {
        TaskKind::Classify => classify::finetune(job, collective),
        TaskKind::Segment => segment::finetune(job, collective),
        TaskKind::Detect => detect::run::finetune(job, collective),
    }
}

/// The fields of `ours` whose value differs in `theirs` (both serialised to JSON objects), as
/// `<prefix><field> <theirs> (here <ours>)`.
pub(crate) fn changed_fields<T: Serialize>(theirs: &T, ours: &T, prefix: &str) -> Vec<String> {
    let (theirs, ours) = (
        serde_json::to_value(theirs).unwrap_or_default(),
        serde_json::to_value(ours).unwrap_or_default(),
    );
    ours.as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| theirs.get(k.as_str()) != Some(*v))
        .map(|(k, v)| {
            format!(
                "{prefix}{k} {} (here {v})",
                theirs.get(k.as_str()).cloned().unwrap_or_default()
            )
        })
        .collect()
}

/// Settings that change what is trained (everything but bookkeeping).
fn trained_fields(c: &FinetuneConfig) -> FinetuneConfig {
    FinetuneConfig {
        checkpoint_every: 0,
        keep_checkpoints: 1,
        log_every: 1,
        ..c.clone()
    }
}

/// The resume check every fine-tuning task shares: the checkpoints in `m` must be of `task`,
/// trained with the same settings and the same initialisation as `job`; `network` checks
/// what the task adds (its network's sizes) and builds its refusal with the function given.
/// Errors name the output location and every setting that differs.
pub(crate) fn check_resume(
    m: &crate::run::Manifest,
    task: TaskKind,
    job: &FinetuneJob,
    network: impl FnOnce(&dyn Fn(String) -> Error) -> Result<()>,
) -> Result<()> {
    let theirs_task: TaskKind = m.field("task").map_err(|_| Error::Input {
        name: "--out".into(),
        reason: format!(
            "{} holds checkpoints of another kind of run (pre-training?); use a new output location",
            job.out
        ),
    })?;
    let refuse = |what: String| Error::Input {
        name: "--out".into(),
        reason: format!(
            "{} holds checkpoints of a {theirs_task} run with {what}; use a new output location or the same settings",
            job.out
        ),
    };
    if theirs_task != task {
        return Err(refuse("another task".into()));
    }
    let cfg: FinetuneConfig = m.field("finetune")?;
    let changed = changed_fields(&trained_fields(&cfg), &trained_fields(&job.cfg), "");
    if !changed.is_empty() {
        return Err(refuse(format!("other settings: {}", changed.join(", "))));
    }
    network(&refuse)?;
    let init: Option<String> = m.field("init_source").unwrap_or(None);
    let here = job.init.as_ref().map(InitSource::describe);
    if init != here {
        return Err(refuse(format!(
            "another initialisation: {} (here {})",
            init.as_deref().unwrap_or("random"),
            here.as_deref().unwrap_or("random")
        )));
    }
    Ok(())
}

/// The mean of per-rank sums (`sum` over `count` items on this rank) over every rank, on
/// every rank (float32, like every collective buffer).
pub(crate) fn mean_over_ranks(
    sum: f64,
    count: u64,
    device: Device,
    collective: &mut dyn crate::collective::Collective,
) -> Result<f64> {
    let mut totals = Tensor::from_slice(&[sum as f32, count as f32]).to_device(device);
    if collective.world_size() > 1 {
        collective.all_reduce_sum(&mut totals)?;
    }
    let totals: Vec<f64> = Vec::try_from(totals.to_device(Device::Cpu).to_kind(tch::Kind::Double))?;
    Ok(totals[0] / totals[1].max(1.0))
}

/// The settings a fine-tuned model was trained with, with `overrides` (a JSON object of
/// [`FinetuneConfig`] fields) laid over them for evaluation or prediction.
pub(crate) fn settings_with(
    trained: &FinetuneConfig,
    overrides: Option<&serde_json::Value>,
) -> Result<FinetuneConfig> {
    let mut ft = serde_json::to_value(trained).unwrap_or_default();
    if let (Some(serde_json::Value::Object(over)), serde_json::Value::Object(map)) =
        (overrides, &mut ft)
    {
        for (k, v) in over {
            map.insert(k.clone(), v.clone());
        }
    }
    Ok(FinetuneConfig::from_json_str(
        &ft.to_string(),
        "finetune settings",
    )?)
}

/// After [`crate::run::drive`]: when the run finished its `total` steps, loads the model chosen
/// on validation (`best/model.safetensors` in `out`) into `vs` and returns the chosen epoch
/// and value (`best`); otherwise (stopped, or `--max-steps` before the end) `None`, logged when
/// not a stop: there is no final scoring or report.
pub(crate) fn load_chosen(
    vs: &tch::nn::VarStore,
    out: &Store,
    summary: &Summary,
    total: usize,
    best: Option<(usize, f64)>,
) -> Result<Option<(usize, f64)>> {
    let complete = summary.steps >= total && !summary.interrupted;
    let Some(chosen) = best.filter(|_| complete) else {
        if !summary.interrupted {
            tracing::warn!(
                steps = summary.steps,
                "the run ended before its last epoch: no final scoring or report"
            );
        }
        return Ok(None);
    };
    let key = format!("{BEST}/model.safetensors");
    let tensors = crate::run::checkpoint::read_file(out, &key)?;
    weights::load_tensors(
        vs,
        tensors,
        Path::new(&out.describe(&key)),
        LoadMode::Strict,
    )?;
    Ok(Some(chosen))
}

impl Outcome {
    /// The outcome of a run that ended before its last step: its summary, no report.
    pub(crate) fn unfinished(summary: Summary) -> Self {
        Self {
            run: Some(summary),
            report: String::new(),
            headline: None,
            metrics: std::collections::BTreeMap::new(),
        }
    }
}

/// The backbone's parameters out of a pre-training checkpoint network (`backbone.*` keys of the
/// student or teacher), for the fine-tuning model's variable store. Every backbone key must be
/// present with its shape, except position/time tables of another size, which are resized the
/// reference's way (nearest) and logged; anything else is an error naming the key and both
/// shapes. Non-backbone keys (the DINO head) are ignored.
pub fn backbone_from(
    vs: &tch::nn::VarStore,
    tensors: std::collections::BTreeMap<String, Tensor>,
    origin: &Path,
) -> Result<()> {
    let mut picked = std::collections::BTreeMap::new();
    let vars = vs.variables();
    for (key, t) in tensors {
        let key = key.strip_prefix("module.").unwrap_or(&key).to_string();
        if !key.starts_with("backbone.") {
            continue;
        }
        let Some(var) = vars.get(&key) else {
            return Err(Error::UnexpectedKey {
                path: origin.to_path_buf(),
                key,
                found: t.size(),
            });
        };
        let t = adapt_table(&key, t, &var.size(), origin)?;
        picked.insert(key, t);
    }
    let backbone_keys = vars.keys().filter(|k| k.starts_with("backbone.")).count();
    if picked.is_empty() {
        return Err(Error::Input {
            name: "--init".into(),
            reason: format!(
                "{} holds no `backbone.*` parameter (is it an Endo-FM checkpoint?)",
                origin.display()
            ),
        });
    }
    if picked.len() != backbone_keys {
        let missing: Vec<&String> = vars
            .keys()
            .filter(|k| k.starts_with("backbone.") && !picked.contains_key(*k))
            .collect();
        return Err(Error::MissingKey {
            path: origin.to_path_buf(),
            key: missing.first().map(|k| (*k).clone()).unwrap_or_default(),
            expected: missing
                .first()
                .and_then(|k| vars.get(*k))
                .map(Tensor::size)
                .unwrap_or_default(),
        });
    }
    weights::load_tensors(vs, picked, origin, LoadMode::Partial)?;
    Ok(())
}

/// Resizes a position (`backbone.pos_embed`, (1, 1 + g², D)) or time (`backbone.time_embed`,
/// (1, T, D)) table of another size to `want` with nearest interpolation (the reference's
/// resizing at load and at run time), CLS entry untouched; any other key must match exactly.
fn adapt_table(key: &str, t: Tensor, want: &[i64], origin: &Path) -> Result<Tensor> {
    let have = t.size();
    if have == want {
        return Ok(t);
    }
    let mismatch = || Error::ShapeMismatch {
        path: origin.to_path_buf(),
        key: key.to_string(),
        expected: want.to_vec(),
        found: have.clone(),
    };
    if have.len() != 3 || want.len() != 3 || have[0] != 1 || have[2] != want[2] {
        return Err(mismatch());
    }
    let resized = match key {
        "backbone.time_embed" => resize_time_table(&t, want[1]),
        "backbone.pos_embed" => {
            let side_have = ((have[1] - 1) as f64).sqrt().round() as i64;
            let side_want = ((want[1] - 1) as f64).sqrt().round() as i64;
            if side_have * side_have != have[1] - 1 || side_want * side_want != want[1] - 1 {
                return Err(mismatch());
            }
            resize_pos_table(&t, side_want, side_want)
        }
        _ => return Err(mismatch()),
    };
    tracing::info!(key, from = ?have, to = ?want, "table resized (nearest) to the network's size");
    Ok(resized)
}

/// Loads the backbone of a fine-tuning model from an initialisation source: a pre-training
/// checkpoint folder (ours or imported: the `teacher` or `student` network per `from`), a
/// fine-tuned folder (`model.safetensors`: its backbone), one safetensors file, or a PyTorch
/// checkpoint (converted first). Returns a description for the report.
pub fn load_backbone(vs: &tch::nn::VarStore, init: &InitSource, from: InitFrom) -> Result<String> {
    let (tensors, path, described) = backbone_tensors(init, from)?;
    backbone_from(vs, tensors, &path)?;
    Ok(described)
}

/// The tensors of the network an initialisation source names, for a fine-tuning model to take
/// its backbone from: a pre-training checkpoint folder's `teacher`/`student` (per `from`), a
/// fine-tuned folder's `model.safetensors`, a safetensors file, or a PyTorch checkpoint
/// (converted first). Returns the tensors, the file they came from and a description.
pub fn backbone_tensors(
    init: &InitSource,
    from: InitFrom,
) -> Result<(std::collections::BTreeMap<String, Tensor>, PathBuf, String)> {
    let local = init.localise()?;
    match &local.source {
        InitSource::Folder(dir) => {
            let wanted = dir.join(format!("{}.safetensors", from.name()));
            let (path, what) = if wanted.is_file() {
                (wanted, format!("{} network", from.name()))
            } else if dir.join("model.safetensors").is_file() {
                (
                    dir.join("model.safetensors"),
                    "a fine-tuned model's backbone".to_string(),
                )
            } else {
                return Err(Error::Input {
                    name: "--init".into(),
                    reason: format!(
                        "{} has no {}.safetensors (--init-from {}) and no model.safetensors",
                        local.origin(),
                        from.name(),
                        from.name()
                    ),
                });
            };
            // Named as the user gave it (a downloaded folder's temporary copy is gone later).
            let shown = PathBuf::from(local.name_of(&path));
            let described = format!("{} ({what})", shown.display());
            let tensors = weights::read(&path).map_err(|e| Error::Input {
                name: "--init".into(),
                reason: e
                    .to_string()
                    .replace(&path.display().to_string(), &shown.display().to_string()),
            })?;
            Ok((tensors, shown, described))
        }
        InitSource::Weights(path) => {
            let shown = PathBuf::from(local.name_of(path));
            let tensors = weights::read(path).map_err(|e| Error::Input {
                name: "--init".into(),
                reason: e
                    .to_string()
                    .replace(&path.display().to_string(), &shown.display().to_string()),
            })?;
            let described = shown.display().to_string();
            Ok((tensors, shown, described))
        }
        InitSource::Pickle(path) => {
            let tmp = crate::init::temp_dir()?;
            crate::convert::import(&crate::convert::python(None), path, tmp.path(), false)?;
            let (tensors, _, _) =
                backbone_tensors(&InitSource::Folder(tmp.path().to_path_buf()), from)?;
            Ok((
                tensors,
                path.clone(),
                format!("{} ({} network)", path.display(), from.name()),
            ))
        }
        InitSource::Remote(_) => Err(Error::Input {
            name: "--init".into(),
            reason: "internal: remote source not localised".into(),
        }),
    }
}

/// What `best/info.json` (and a fine-tuned model folder in general) records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The task.
    pub task: TaskKind,
    /// The backbone configuration.
    pub model: ModelConfig,
    /// Number of classes (classification).
    pub num_labels: usize,
    /// The fine-tuning settings (sampling sizes are reused by evaluation and prediction).
    pub finetune: FinetuneConfig,
    /// The epoch chosen (0-based), when chosen by validation.
    pub epoch: Option<usize>,
    /// The validation metric it was chosen by, and its value.
    pub selected_by: Option<(String, f64)>,
    /// Segmentation: the stem/decoder sizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmenter: Option<SegmenterConfig>,
    /// Detection: the network beyond the backbone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detector: Option<DetectorConfig>,
}

/// A fine-tuned model on local disk: its weights and what it is.
#[derive(Debug)]
pub struct LocalModel {
    /// `model.safetensors`.
    pub weights: PathBuf,
    /// From `info.json`, or `None` (then the caller must say which network it is).
    pub info: Option<ModelInfo>,
    _tmp: Option<tempfile::TempDir>,
}

/// Finds a fine-tuned model: a fine-tuning output location (its `best/`), a folder with
/// `model.safetensors` (+ `info.json`), or a `.safetensors` file; locally or in object storage.
pub fn locate_model(text: &str) -> Result<LocalModel> {
    let refuse = |reason: String| Error::Input {
        name: "--weights".into(),
        reason,
    };
    let uri = StorageUri::parse(text)?;
    if text.ends_with(".safetensors")
        && let StorageUri::Local { path } = &uri
    {
        if !path.is_file() {
            return Err(refuse(format!("{} does not exist", path.display())));
        }
        return Ok(LocalModel {
            weights: path.clone(),
            info: None,
            _tmp: None,
        });
    }
    let tmp = crate::init::temp_dir()?;
    let weights_path = tmp.path().join("model.safetensors");
    if text.ends_with(".safetensors") {
        let (parent, name) = text.rsplit_once('/').unwrap_or((".", text));
        let store = Store::open(&StorageUri::parse(parent)?, false)?;
        crate::init::download(&store, name, &weights_path)?;
        return Ok(LocalModel {
            weights: weights_path,
            info: None,
            _tmp: Some(tmp),
        });
    }
    let store = Store::open(&uri, false)?;
    let prefix = if store.exists(&format!("{BEST}/model.safetensors"))? {
        format!("{BEST}/")
    } else if store.exists("model.safetensors")? {
        String::new()
    } else {
        return Err(refuse(format!(
            "{text} holds neither model.safetensors nor {BEST}/model.safetensors (a fine-tuning output location)"
        )));
    };
    crate::init::download(&store, &format!("{prefix}model.safetensors"), &weights_path)?;
    let info_key = format!("{prefix}info.json");
    let manifest_key = format!("{prefix}manifest.json");
    let info = if store.exists(&info_key)? {
        let bytes = store.get(&info_key)?;
        Some(serde_json::from_slice(&bytes).map_err(|e| Error::Input {
            name: store.describe(&info_key),
            reason: format!("not a valid model description: {e}"),
        })?)
    } else if store.exists(&manifest_key)? {
        // A fine-tuning checkpoint folder: its manifest records the network and settings.
        let bytes = store.get(&manifest_key)?;
        let m: crate::run::Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::Input {
            name: store.describe(&manifest_key),
            reason: format!("not a valid checkpoint manifest: {e}"),
        })?;
        let task: TaskKind = m.field("task").map_err(|_| Error::Input {
            name: "--weights".into(),
            reason: format!("{text} is not a fine-tuning checkpoint (its manifest names no task)"),
        })?;
        Some(ModelInfo {
            task,
            model: m.model.clone(),
            num_labels: 2,
            finetune: m.field("finetune")?,
            epoch: None,
            selected_by: None,
            segmenter: m.field("segmenter").ok(),
            detector: m.field("detector").ok(),
        })
    } else {
        None
    };
    Ok(LocalModel {
        weights: weights_path,
        info,
        _tmp: Some(tmp),
    })
}

/// What a fine-tuned model is when its weights do not say (no `info.json`): from `--preset`,
/// or from a fine-tuning run's `config.json` (its `model`, `segmenter`, `detector` and
/// `finetune` sections).
#[derive(Debug, Clone, Default)]
pub struct Fallback {
    /// The backbone.
    pub model: Option<ModelConfig>,
    /// Segmentation: the stem/decoder.
    pub segmenter: Option<SegmenterConfig>,
    /// Detection: the network beyond the backbone.
    pub detector: Option<DetectorConfig>,
    /// The settings the model was trained with (input sizes, thresholds, references).
    pub finetune: Option<FinetuneConfig>,
}

impl Fallback {
    /// A backbone `model` with, when a preset names the network (`preset`), that preset's
    /// segmentation and detection layers; no recorded training settings.
    pub fn of_preset(model: Option<ModelConfig>, preset: Option<&str>) -> Self {
        Self {
            model,
            segmenter: preset.and_then(SegmenterConfig::for_preset),
            detector: preset.and_then(DetectorConfig::for_preset),
            finetune: None,
        }
    }

    /// The settings of a model without `info.json` for `task` on `model`: the recorded
    /// training settings when known, else the task's defaults for the network; `overrides` laid
    /// over either.
    pub(crate) fn settings(
        &self,
        task: TaskKind,
        model: &ModelConfig,
        overrides: Option<&serde_json::Value>,
    ) -> Result<FinetuneConfig> {
        match &self.finetune {
            Some(trained) => settings_with(trained, overrides),
            None => finetune_config(task, model, overrides),
        }
    }
}

/// An evaluation of a fine-tuned model on one split.
#[derive(Debug, Clone)]
pub struct EvaluateJob {
    /// The task.
    pub task: TaskKind,
    /// The model (`locate_model` text: output location, folder or file).
    pub weights: String,
    /// What the network is when the model folder does not say (`info.json` missing).
    pub fallback: Fallback,
    /// Sampling settings overrides (JSON object of [`FinetuneConfig`] fields).
    pub overrides: Option<serde_json::Value>,
    /// Dataset root.
    pub data: StorageUri,
    /// Split to score.
    pub split: crate::datasets::Split,
    /// Where `report.json` and plots go.
    pub out: StorageUri,
    /// Device.
    pub device: Device,
    /// Decode threads.
    pub data_threads: usize,
}

impl EvaluateJob {
    /// The evaluation's output location, refused when it is a fine-tuning output or a model
    /// folder (`best/` of one: a report would be written among the model's files).
    pub(crate) fn output(&self) -> Result<Store> {
        let out = Store::open(&self.out, true)?;
        if out.exists(&format!("{BEST}/info.json"))?
            || out.exists("info.json")?
            || out.exists("model.safetensors")?
            || !out.list(crate::run::checkpoint::DIR)?.is_empty()
        {
            return Err(Error::Input {
                name: "--out".into(),
                reason: format!(
                    "{} is a training output (its report.json would be replaced); give the evaluation its own location",
                    self.out
                ),
            });
        }
        Ok(out)
    }
}

/// Evaluates a fine-tuned model on one split (every rank scores its share; rank 0 writes the
/// report).
pub fn evaluate(
    job: &EvaluateJob,
    collective: &mut dyn crate::collective::Collective,
) -> Result<Outcome> {
    match job.task {
        TaskKind::Classify => classify::evaluate(job, collective),
        TaskKind::Segment => segment::evaluate(job, collective),
        TaskKind::Detect => detect::run::evaluate(job, collective),
    }
}
