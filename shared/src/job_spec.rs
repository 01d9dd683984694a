//! A job as users submit it (TOML or JSON), typed and validated without touching the network,
//! so that the coordinator refuses a bad spec at submission with the field named. The worker
//! reads the same type back from the validated JSON the coordinator hands out.
//!
//! Jobs may depend on others: `after` lists job ids to wait for, and `init = "job:<id>"` starts
//! from another job's last checkpoint (and implies waiting for it). Whether those jobs exist is
//! the coordinator's check; this module checks only that the ids are well formed.

use serde::{Deserialize, Serialize};

use crate::text::{clip, echo};
use crate::{
    Error, FinetuneConfig, ModelConfig, Preset, PretrainConfig, Result, StorageUri, TaskKind,
    TrainPrecision,
};

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// Self-supervised pre-training (DINO/SVT teacher-student).
    Pretrain,
    /// Supervised fine-tuning on a downstream task (`task`), from `init`'s weights.
    Finetune,
    /// Scoring `init`'s weights on a split of a downstream dataset (`task`, `split`).
    Evaluate,
}

impl JobKind {
    /// The name used in specs and the API.
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Pretrain => "pretrain",
            JobKind::Finetune => "finetune",
            JobKind::Evaluate => "evaluate",
        }
    }

    /// Whether the kind works on a downstream task (needs `task`, takes `finetune`).
    pub fn is_downstream(self) -> bool {
        matches!(self, JobKind::Finetune | JobKind::Evaluate)
    }
}

/// The prefix of an `init` that names another job: `job:<job-id>`.
pub const INIT_JOB_PREFIX: &str = "job:";

/// The most job ids `after` may list.
pub const MAX_AFTER: usize = 64;

/// The dataset splits an evaluation may score.
pub const EVAL_SPLITS: [&str; 3] = ["train", "val", "test"];

/// The split an evaluation scores when `split` is left out.
pub const DEFAULT_EVAL_SPLIT: &str = "test";

/// Whether `id` is a job id as the coordinator hands them out: `job-<N>`, N a positive decimal
/// number without leading zeros.
pub fn is_job_id(id: &str) -> bool {
    id.strip_prefix("job-").is_some_and(|n| {
        !n.is_empty()
            && n.len() <= 19
            && n.bytes().all(|b| b.is_ascii_digit())
            && !n.starts_with('0')
    })
}

/// The kind of device every rank of a job runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// A CPU slot (libtorch on host threads; gradients over the TCP ring).
    Cpu,
    /// One CUDA GPU (gradients over NCCL).
    Cuda,
}

impl DeviceKind {
    /// The name used in specs, the API and `--devices`.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }

    /// Parses "cpu" or "cuda".
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "cpu" => Some(DeviceKind::Cpu),
            "cuda" => Some(DeviceKind::Cuda),
            _ => None,
        }
    }
}

/// Where the corpus is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Corpus location (local path, `file://`, `s3://`, `gs://`, `az://`).
    pub uri: String,
    /// Clip list inside the corpus.
    #[serde(default = "default_list")]
    pub list: String,
    /// Decode/augment threads per rank.
    #[serde(default = "default_data_threads")]
    pub threads: usize,
}

fn default_list() -> String {
    "train.csv".into()
}

fn default_data_threads() -> usize {
    2
}

/// The network: a preset, optionally replaced by a full configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Preset name (`vit_b`, `tiny`).
    #[serde(default = "default_preset")]
    pub preset: String,
    /// A full configuration instead of the preset's (validated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ModelConfig>,
}

fn default_preset() -> String {
    "vit_b".into()
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self {
            preset: default_preset(),
            config: None,
        }
    }
}

impl ModelSpec {
    /// The network this spec names.
    pub fn resolve(&self) -> Result<ModelConfig> {
        match &self.config {
            Some(cfg) => Ok(cfg.clone()),
            None => Ok(self.preset.parse::<Preset>()?.config()),
        }
    }
}

/// What the job needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Ranks, all placed together (gang scheduling).
    #[serde(default = "one")]
    pub world_size: u32,
    /// Device kind of every rank.
    #[serde(default = "default_device")]
    pub device: DeviceKind,
    /// libtorch threads per rank (CPU ranks); default: the worker decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads_per_rank: Option<usize>,
}

fn one() -> u32 {
    1
}

fn default_device() -> DeviceKind {
    DeviceKind::Cuda
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            world_size: 1,
            device: default_device(),
            threads_per_rank: None,
        }
    }
}

/// View sizes overriding the defaults derived from the model (global views at the model's
/// image size, local views at 96/224 of it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewSizes {
    /// Side of the two global views (pixels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_size: Option<usize>,
    /// Side of the eight local views (pixels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_size: Option<usize>,
}

/// Seconds a collective may take before the attempt is failed (a dead or hung peer).
fn default_collective_timeout_s() -> f64 {
    120.0
}

fn default_max_restarts() -> u32 {
    3
}

/// A job spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// A name for people (defaults to the kind).
    #[serde(default)]
    pub name: String,
    /// What the job does.
    pub kind: JobKind,
    /// The corpus.
    pub data: DataSpec,
    /// Output location: checkpoints, metrics, resolved config.
    pub output: String,
    /// The network.
    #[serde(default)]
    pub model: ModelSpec,
    /// View sizes (default: derived from the model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub views: Option<ViewSizes>,
    /// Initial weights for a fresh run (a checkpoint folder, `.safetensors` or `.pth`, on the
    /// workers' file system); a previous job's output folder works too. `job:<job-id>` takes
    /// that job's last checkpoint once it has succeeded (and waits for it). Required for
    /// `evaluate` (the weights to score).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
    /// Job ids this job waits for: it is placed only once all of them succeeded, and fails
    /// without running if one of them fails or is cancelled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// The downstream task (`finetune` and `evaluate` only; this version does `classify` and
    /// `segment`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskKind>,
    /// The split an `evaluate` job scores: `train`, `val` or `test` (default `test`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// Ranks and devices.
    #[serde(default)]
    pub resources: Resources,
    /// Higher runs first; FIFO within a priority.
    #[serde(default)]
    pub priority: i32,
    /// Attempts restarted after failures before the job fails.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// Stop after this many steps in total (the schedules still span all epochs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    /// Deadline of one collective (seconds).
    #[serde(default = "default_collective_timeout_s")]
    pub collective_timeout_s: f64,
    /// Pre-training hyper-parameters (defaults = the reference's); `checkpoint_every` is the
    /// checkpoint interval in steps. `pretrain` only.
    #[serde(default)]
    pub train: PretrainConfig,
    /// Fine-tuning hyper-parameters (defaults = the published PolypDiag script's); `evaluate`
    /// reads its test-time fields (frames, window, crop, test_short, mean, std, batch).
    /// `finetune` and `evaluate` only.
    #[serde(default)]
    pub finetune: FinetuneConfig,
    /// `[segmenter]`: the segmentation network's stem and decoder sizes (default: the tiny one
    /// for the `tiny` preset, else the published R50 hybrid). `finetune` jobs with
    /// `task = "segment"` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmenter: Option<crate::SegmenterConfig>,
    /// `[detector]`: the detection network beyond the backbone (pyramid width, head,
    /// post-processing; default: the tiny one for the `tiny` preset, else the published
    /// STFT-FCOS). `finetune` jobs with `task = "detect"` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detector: Option<crate::DetectorConfig>,
}

/// Keys of a table as the document wrote them.
type Keys = std::collections::BTreeSet<String>;

/// What a document set in its hyper-parameter tables (defaults cannot tell "left out" from
/// "set to the default").
#[derive(Debug, Default)]
struct Given {
    train: Keys,
    finetune: Keys,
    segmenter: Keys,
    detector: Keys,
}

/// `e` with its field named below `prefix` (`finetune.lr`).
fn prefixed(prefix: &str, e: Error) -> Error {
    match e {
        Error::InvalidConfig { field, reason } => Error::InvalidConfig {
            field: format!("{prefix}.{field}"),
            reason,
        },
        other => other,
    }
}

/// The fields of `section` (parsed over the published defaults) that the document wrote, as a
/// JSON object.
fn given_fields<T: Serialize>(section: &T, given: &Keys, name: &str) -> Result<serde_json::Value> {
    let parsed = serde_json::to_value(section).map_err(|e| Error::invalid(name, e.to_string()))?;
    Ok(serde_json::Value::Object(
        given
            .iter()
            .filter_map(|k| parsed.get(k).map(|v| (k.clone(), v.clone())))
            .collect(),
    ))
}

/// The largest world size a spec may ask for.
pub const MAX_WORLD_SIZE: u32 = 4096;

/// Longest `name` (bytes).
pub const MAX_NAME_BYTES: usize = 200;

/// Longest location (`data.uri`, `output`, `init`) and `data.list` (bytes).
pub const MAX_URI_BYTES: usize = 1024;

/// Longest parse error message passed on (the parsers quote the offending source line).
const PARSE_MESSAGE_CHARS: usize = 400;

impl JobSpec {
    /// Parses a TOML document (refusing unknown fields), fills defaults and validates.
    pub fn from_toml(text: &str) -> Result<Self> {
        let spec: Self = toml::from_str(text).map_err(|e| Error::SpecParse {
            format: "TOML",
            message: clip(
                &e.to_string().trim().replace('\n', " "),
                PARSE_MESSAGE_CHARS,
            ),
        })?;
        let doc = toml::from_str::<toml::Table>(text).ok();
        let keys = |table: &str| match doc.as_ref().and_then(|d| d.get(table)) {
            Some(toml::Value::Table(t)) => t.keys().cloned().collect(),
            _ => Keys::new(),
        };
        spec.validated(&Given {
            train: keys("train"),
            finetune: keys("finetune"),
            segmenter: keys("segmenter"),
            detector: keys("detector"),
        })
    }

    /// Parses a JSON document (refusing unknown fields), fills defaults and validates.
    pub fn from_json(text: &str) -> Result<Self> {
        let spec: Self = serde_json::from_str(text).map_err(|e| Error::SpecParse {
            format: "JSON",
            message: clip(&e.to_string(), PARSE_MESSAGE_CHARS),
        })?;
        let doc = serde_json::from_str::<serde_json::Value>(text).ok();
        let keys = |table: &str| {
            doc.as_ref()
                .and_then(|d| d.get(table))
                .and_then(|t| t.as_object())
                .map(|t| t.keys().cloned().collect())
                .unwrap_or_default()
        };
        spec.validated(&Given {
            train: keys("train"),
            finetune: keys("finetune"),
            segmenter: keys("segmenter"),
            detector: keys("detector"),
        })
    }

    /// Parses TOML, or JSON when the text is a JSON object.
    pub fn parse_auto(text: &str) -> Result<Self> {
        if text.trim_start().starts_with('{') {
            Self::from_json(text)
        } else {
            Self::from_toml(text)
        }
    }

    /// Fills the defaults that depend on other fields, then validates. `given` are the keys the
    /// document set in its hyper-parameter tables: setting the other kind's is refused even
    /// when the values equal the defaults.
    fn validated(mut self, given: &Given) -> Result<Self> {
        if self.name.trim().is_empty() {
            self.name = self.kind.name().to_string();
        }
        let foreign = match self.kind {
            JobKind::Pretrain => given.finetune.iter().next().map(|k| ("finetune", k)),
            JobKind::Finetune | JobKind::Evaluate => {
                given.train.iter().next().map(|k| ("train", k))
            }
        };
        if let Some((table, key)) = foreign {
            let (owner, other) = if table == "train" {
                ("pretrain", "[finetune]")
            } else {
                ("finetune and evaluate", "[train]")
            };
            return Err(Error::invalid(
                format!("{table}.{key}"),
                format!(
                    "[{table}] is for {owner} jobs; a {} job takes its hyper-parameters from {other}",
                    self.kind.name()
                ),
            ));
        }
        if self.kind.is_downstream()
            && let Ok(model) = self.model.resolve()
        {
            match self.task {
                Some(task) => {
                    self.resolve_finetune_for(task, model.img_size, &given.finetune)?;
                }
                _ => self.size_finetune_for(model.img_size, &given.finetune),
            }
        }
        // Network sections: fields left out come from the preset's network, not the published
        // one.
        let preset = self
            .model
            .config
            .is_none()
            .then_some(self.model.preset.as_str());
        if let Some(seg) = &self.segmenter {
            let over = given_fields(seg, &given.segmenter, "segmenter")?;
            self.segmenter = Some(
                crate::SegmenterConfig::resolve(preset, Some(&over))
                    .map_err(|e| prefixed("segmenter", e))?,
            );
        }
        if let Some(det) = &self.detector {
            let over = given_fields(det, &given.detector, "detector")?;
            self.detector = Some(
                crate::DetectorConfig::resolve(preset, Some(&over))
                    .map_err(|e| prefixed("detector", e))?,
            );
        }
        if self.kind == JobKind::Evaluate && self.split.is_none() {
            self.split = Some(DEFAULT_EVAL_SPLIT.to_string());
        }
        self.validate()?;
        Ok(self)
    }

    /// Input sizes the document left out follow the network's input size in the published
    /// proportions ([`FinetuneConfig::sized_for`]): crop 112 and short sides 128/160 for
    /// `tiny`, the published 224/256/320 for `vit_b`.
    fn size_finetune_for(&mut self, img_size: usize, given: &Keys) {
        let sized = FinetuneConfig::default().sized_for(img_size);
        let f = &mut self.finetune;
        for (field, value, default) in [
            ("crop", &mut f.crop, sized.crop),
            (
                "train_short_min",
                &mut f.train_short_min,
                sized.train_short_min,
            ),
            (
                "train_short_max",
                &mut f.train_short_max,
                sized.train_short_max,
            ),
            ("test_short", &mut f.test_short, sized.test_short),
        ] {
            if !given.contains(field) {
                *value = default;
            }
        }
    }

    /// The `[finetune]` table over the defaults of `task` sized for the network
    /// ([`FinetuneConfig::resolve`]): only the keys the document wrote are taken from it, and a
    /// key of another task's settings is refused by name.
    fn resolve_finetune_for(
        &mut self,
        task: TaskKind,
        img_size: usize,
        given: &Keys,
    ) -> Result<()> {
        let parsed = serde_json::to_value(&self.finetune)
            .map_err(|e| Error::invalid("finetune", e.to_string()))?;
        // A field of another task at its default value (a serialised spec writes them all)
        // changes nothing and is left out; at another value it is refused by `resolve`.
        let defaults = serde_json::to_value(FinetuneConfig::for_task(task).sized_for(img_size))
            .map_err(|e| Error::invalid("finetune", e.to_string()))?;
        let own = FinetuneConfig::fields_of(task);
        let over: serde_json::Map<String, serde_json::Value> = given
            .iter()
            .filter_map(|k| parsed.get(k).map(|v| (k.clone(), v.clone())))
            .filter(|(k, v)| own.contains(&k.as_str()) || defaults.get(k) != Some(v))
            .collect();
        self.finetune =
            FinetuneConfig::resolve(task, img_size, Some(&serde_json::Value::Object(over)))
                .map_err(|e| prefixed("finetune", e))?;
        Ok(())
    }

    /// The job whose last checkpoint `init` names (`init = "job:<id>"`), if any.
    pub fn init_job(&self) -> Option<&str> {
        self.init
            .as_deref()
            .and_then(|i| i.trim().strip_prefix(INIT_JOB_PREFIX))
    }

    /// Every job this one waits for: `after`, plus the job `init` names, without repeats, in
    /// the order written.
    pub fn dependencies(&self) -> Vec<String> {
        let mut deps: Vec<String> = Vec::with_capacity(self.after.len() + 1);
        for id in self.after.iter().map(String::as_str).chain(self.init_job()) {
            if !deps.iter().any(|d| d == id) {
                deps.push(id.to_string());
            }
        }
        deps
    }

    /// The split an `evaluate` job scores (`test` when not given).
    pub fn eval_split(&self) -> &str {
        self.split.as_deref().unwrap_or(DEFAULT_EVAL_SPLIT)
    }

    /// Checks every field; the error names the first bad one (dotted path).
    pub fn validate(&self) -> Result<()> {
        self.validate_bounds()?;
        StorageUri::parse(&self.data.uri).map_err(|e| prefixed("data", e))?;
        if self.data.list.trim().is_empty() || self.data.list.contains("..") {
            return Err(Error::invalid(
                "data.list",
                format!(
                    "`{}` is not a file name inside the corpus",
                    echo(&self.data.list)
                ),
            ));
        }
        if !(1..=64).contains(&self.data.threads) {
            return Err(Error::invalid(
                "data.threads",
                format!("{} is outside 1..=64", self.data.threads),
            ));
        }
        StorageUri::parse(&self.output).map_err(|e| match e {
            Error::InvalidConfig { reason, .. } => Error::invalid("output", reason),
            other => other,
        })?;
        if self.model.config.is_none() {
            self.model.preset.parse::<Preset>().map_err(|e| match e {
                Error::UnknownPreset { name, known } => Error::invalid(
                    "model.preset",
                    format!("unknown preset `{}` (known: {known})", echo(&name)),
                ),
                other => other,
            })?;
        }
        if let Some(cfg) = &self.model.config {
            cfg.validate().map_err(|e| prefixed("model.config", e))?;
        }
        if let Some(views) = &self.views {
            let patch = self.model.resolve().map(|m| m.patch_size).unwrap_or(1);
            for (field, size) in [
                ("views.global_size", views.global_size),
                ("views.local_size", views.local_size),
            ] {
                if let Some(size) = size
                    && !(patch..=4096).contains(&size)
                {
                    return Err(Error::invalid(
                        field,
                        format!("{size} is outside {patch}..=4096 (at least one patch)"),
                    ));
                }
            }
        }
        if let Some(init) = &self.init
            && init.trim().is_empty()
        {
            return Err(Error::invalid(
                "init",
                "is empty (leave it out for random init)",
            ));
        }
        if let Some(id) = self.init_job()
            && !is_job_id(id)
        {
            return Err(Error::invalid(
                "init",
                format!(
                    "`{INIT_JOB_PREFIX}{}` does not name a job id (expected `{INIT_JOB_PREFIX}job-<N>`)",
                    echo(id)
                ),
            ));
        }
        self.validate_dependencies()?;
        self.validate_kind()?;
        if self.resources.world_size == 0 || self.resources.world_size > MAX_WORLD_SIZE {
            return Err(Error::invalid(
                "resources.world_size",
                format!(
                    "{} is outside 1..={MAX_WORLD_SIZE}",
                    self.resources.world_size
                ),
            ));
        }
        if let Some(t) = self.resources.threads_per_rank
            && !(1..=256).contains(&t)
        {
            return Err(Error::invalid(
                "resources.threads_per_rank",
                format!("{t} is outside 1..=256"),
            ));
        }
        if self.max_restarts > 1000 {
            return Err(Error::invalid(
                "max_restarts",
                format!("{} is more than 1000", self.max_restarts),
            ));
        }
        if self.max_steps == Some(0) {
            return Err(Error::invalid("max_steps", "must be at least 1"));
        }
        if !(self.collective_timeout_s.is_finite()
            && (0.5..=86_400.0).contains(&self.collective_timeout_s))
        {
            return Err(Error::invalid(
                "collective_timeout_s",
                format!("{} is outside [0.5, 86400]", self.collective_timeout_s),
            ));
        }
        if self.kind == JobKind::Pretrain {
            self.train.validate().map_err(|e| prefixed("train", e))?;
        } else {
            match self.task {
                Some(task) => self.finetune.validate_for(task),
                None => self.finetune.validate(),
            }
            .map_err(|e| prefixed("finetune", e))?;
            if let Some(seg) = &self.segmenter {
                seg.validate().map_err(|e| prefixed("segmenter", e))?;
            }
            if let Some(det) = &self.detector {
                det.validate().map_err(|e| prefixed("detector", e))?;
            }
        }
        self.validate_across_fields()
    }

    /// Sizes of the free-form fields, checked before anything quotes them.
    fn validate_bounds(&self) -> Result<()> {
        if self.name.len() > MAX_NAME_BYTES {
            return Err(Error::invalid(
                "name",
                format!(
                    "is {} bytes; at most {MAX_NAME_BYTES} are allowed",
                    self.name.len()
                ),
            ));
        }
        if self.name.chars().any(char::is_control) {
            return Err(Error::invalid("name", "contains control characters"));
        }
        let mut places = vec![
            ("data.uri", self.data.uri.as_str()),
            ("data.list", self.data.list.as_str()),
            ("output", self.output.as_str()),
            ("model.preset", self.model.preset.as_str()),
        ];
        if let Some(init) = &self.init {
            places.push(("init", init));
        }
        if let Some(split) = &self.split {
            places.push(("split", split));
        }
        for (i, id) in self.after.iter().enumerate().take(MAX_AFTER + 1) {
            if id.len() > MAX_URI_BYTES {
                return Err(Error::invalid(
                    format!("after[{i}]"),
                    format!("is {} bytes; a job id is short (`job-<N>`)", id.len()),
                ));
            }
        }
        for (field, value) in places {
            if value.len() > MAX_URI_BYTES {
                return Err(Error::invalid(
                    field,
                    format!(
                        "is {} bytes; at most {MAX_URI_BYTES} are allowed",
                        value.len()
                    ),
                ));
            }
            if value.chars().any(char::is_control) {
                return Err(Error::invalid(field, "contains control characters"));
            }
        }
        Ok(())
    }

    /// What only shows across fields: locations the agents cannot resolve alike (relative
    /// paths), an output that is the corpus, and a precision the device cannot run.
    fn validate_across_fields(&self) -> Result<()> {
        let mut places = vec![("data.uri", &self.data.uri), ("output", &self.output)];
        if let Some(init) = &self.init
            && self.init_job().is_none()
        {
            places.push(("init", init));
        }
        for (field, uri) in places {
            if let Ok(StorageUri::Local { path }) = StorageUri::parse(uri)
                && !path.is_absolute()
            {
                return Err(Error::invalid(
                    field,
                    format!(
                        "`{}` is a relative path, which every agent would resolve against its own working directory; give an absolute path (or file:///..., s3://...)",
                        echo(uri)
                    ),
                ));
            }
        }
        if let (Ok(data), Ok(out)) = (
            StorageUri::parse(&self.data.uri),
            StorageUri::parse(&self.output),
        ) && same_location(&data, &out)
        {
            return Err(Error::invalid(
                "output",
                format!(
                    "`{}` is the corpus location (data.uri): checkpoints would be written among the clips; use a location of its own",
                    echo(&self.output)
                ),
            ));
        }
        let (table, precision) = match self.kind {
            JobKind::Pretrain => ("train", self.train.precision),
            JobKind::Finetune | JobKind::Evaluate => ("finetune", self.finetune.precision),
        };
        if precision == TrainPrecision::Fp16 && self.resources.device == DeviceKind::Cpu {
            return Err(Error::invalid(
                format!("{table}.precision"),
                "fp16 autocast needs CUDA, and resources.device is \"cpu\": use \"bf16\" or \"fp32\" on CPUs, or device = \"cuda\"",
            ));
        }
        Ok(())
    }

    /// `after`: a bounded list of distinct, well-formed job ids.
    fn validate_dependencies(&self) -> Result<()> {
        if self.after.len() > MAX_AFTER {
            return Err(Error::invalid(
                "after",
                format!(
                    "lists {} jobs; at most {MAX_AFTER} are allowed",
                    self.after.len()
                ),
            ));
        }
        for (i, id) in self.after.iter().enumerate() {
            if !is_job_id(id) {
                return Err(Error::invalid(
                    format!("after[{i}]"),
                    format!("`{}` is not a job id (expected `job-<N>`)", echo(id)),
                ));
            }
            if self.after[..i].contains(id) {
                return Err(Error::invalid(
                    format!("after[{i}]"),
                    format!("`{id}` is listed twice"),
                ));
            }
        }
        Ok(())
    }

    /// The fields that depend on the kind: `task`, `split`, `init` for evaluation, and the
    /// other kind's hyper-parameters, which must be left out.
    fn validate_kind(&self) -> Result<()> {
        match self.kind {
            JobKind::Pretrain => {
                if let Some(task) = self.task {
                    return Err(Error::invalid(
                        "task",
                        format!(
                            "`{task}` is for finetune and evaluate jobs; pretrain takes no task"
                        ),
                    ));
                }
                if self.split.is_some() {
                    return Err(Error::invalid(
                        "split",
                        "is for evaluate jobs; pretrain takes no split",
                    ));
                }
                if self.finetune != FinetuneConfig::default() {
                    return Err(Error::invalid(
                        "finetune",
                        "is for finetune and evaluate jobs; a pretrain job takes its hyper-parameters from [train]",
                    ));
                }
            }
            JobKind::Finetune | JobKind::Evaluate => {
                let kind = self.kind.name();
                let Some(task) = self.task else {
                    return Err(Error::invalid(
                        "task",
                        format!("is required for {kind} jobs (classify, segment or detect)"),
                    ));
                };
                if self.train != PretrainConfig::default() {
                    return Err(Error::invalid(
                        "train",
                        format!(
                            "is for pretrain jobs; a {kind} job takes its hyper-parameters from [finetune]"
                        ),
                    ));
                }
                if self.views.is_some() {
                    return Err(Error::invalid(
                        "views",
                        format!(
                            "is for pretrain jobs; a {kind} job sizes its input with finetune.crop"
                        ),
                    ));
                }
                if self.segmenter.is_some()
                    && (task != TaskKind::Segment || self.kind != JobKind::Finetune)
                {
                    return Err(Error::invalid(
                        "segmenter",
                        format!(
                            "is for finetune jobs with task = \"segment\" (this is a {kind} job, task `{task}`); an evaluate job reads the network from the model"
                        ),
                    ));
                }
                if self.detector.is_some()
                    && (task != TaskKind::Detect || self.kind != JobKind::Finetune)
                {
                    return Err(Error::invalid(
                        "detector",
                        format!(
                            "is for finetune jobs with task = \"detect\" (this is a {kind} job, task `{task}`); an evaluate job reads the network from the model"
                        ),
                    ));
                }
                if self.kind == JobKind::Finetune && self.split.is_some() {
                    return Err(Error::invalid(
                        "split",
                        "is for evaluate jobs; finetune trains on `train` and validates on `val`",
                    ));
                }
                if self.kind == JobKind::Evaluate {
                    if self.init.is_none() {
                        return Err(Error::invalid(
                            "init",
                            "is required for evaluate jobs: the weights to score (a checkpoint, or `job:<id>` of a finetune job)",
                        ));
                    }
                    let split = self.eval_split();
                    if !EVAL_SPLITS.contains(&split) {
                        return Err(Error::invalid(
                            "split",
                            format!("`{}` is not a split (train, val or test)", echo(split)),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Refuses local paths (plain paths and `file://`) outside `roots`, the folders an
    /// operator lets jobs read and write on the workers' file systems. No roots: no limit.
    pub fn check_local_roots(&self, roots: &[std::path::PathBuf]) -> Result<()> {
        if roots.is_empty() {
            return Ok(());
        }
        let mut places = vec![
            ("data.uri", self.data.uri.clone()),
            ("output", self.output.clone()),
        ];
        if let Some(init) = &self.init
            && self.init_job().is_none()
        {
            places.push(("init", init.clone()));
        }
        for (field, uri) in places {
            let path = match StorageUri::parse(&uri) {
                Ok(StorageUri::Local { path }) => path,
                _ => continue,
            };
            let normal = normalise(&path);
            let inside = path.is_absolute()
                && normal.is_some_and(|p| roots.iter().any(|r| p.starts_with(r)));
            if !inside {
                let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
                return Err(Error::invalid(
                    field,
                    format!(
                        "local path `{}` is outside the allowed roots ({}); use an absolute path below one of them or an object-store URI",
                        echo(&uri),
                        list.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether this job's output and `other`'s are the same place or one lies inside the other
    /// (then two running jobs would write into one folder). Local paths are compared after
    /// resolving `.`/`..`; object-store locations by bucket and prefix.
    pub fn output_overlaps(&self, other: &JobSpec) -> bool {
        match (location_key(&self.output), location_key(&other.output)) {
            (Some(a), Some(b)) => {
                let inside = |x: &str, y: &str| {
                    x.strip_prefix(y)
                        .is_some_and(|rest| rest.starts_with('/') || y.ends_with('/'))
                };
                a == b || inside(&a, &b) || inside(&b, &a)
            }
            _ => false,
        }
    }

    /// The spec as JSON with every default filled in, without the other kind's
    /// hyper-parameter table (so that it parses back).
    pub fn to_json(&self) -> String {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        let foreign = if self.kind.is_downstream() {
            "train"
        } else {
            "finetune"
        };
        if let Some(map) = value.as_object_mut() {
            map.remove(foreign);
        }
        value.to_string()
    }
}

/// A location as one comparable string: `scheme://bucket/prefix`, or a local path with `.`
/// and `..` resolved and no trailing slash; `None` when it does not parse.
fn location_key(uri: &str) -> Option<String> {
    match StorageUri::parse(uri).ok()? {
        StorageUri::Local { path } => {
            let normal = normalise(&path)?;
            Some(normal.display().to_string())
        }
        other => Some(other.to_string()),
    }
}

/// Whether two locations are the same place (local paths compared after resolving `.`/`..`).
fn same_location(a: &StorageUri, b: &StorageUri) -> bool {
    location_key(&a.to_string()).is_some_and(|k| Some(k) == location_key(&b.to_string()))
}

/// Resolves `.` and `..` lexically; `None` when `..` climbs above the root.
fn normalise(path: &std::path::Path) -> Option<std::path::PathBuf> {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_must_stay_inside_the_roots() {
        let spec = |data: &str, out: &str| {
            JobSpec::from_toml(&format!(
                "kind = \"pretrain\"\noutput = \"{out}\"\n[data]\nuri = \"{data}\"\n"
            ))
            .expect("spec")
        };
        let roots = vec![
            std::path::PathBuf::from("/data"),
            std::path::PathBuf::from("/runs"),
        ];
        assert!(
            spec("/data/corpus", "file:///runs/a")
                .check_local_roots(&roots)
                .is_ok()
        );
        assert!(
            spec("s3://bucket/c", "/runs/a")
                .check_local_roots(&roots)
                .is_ok()
        );
        assert!(spec("/data/corpus", "/etc").check_local_roots(&[]).is_ok());
        for (data, out, field) in [
            ("/data/../etc", "/runs/a", "data.uri"),
            ("/data/c", "/tmp/x", "output"),
        ] {
            match spec(data, out).check_local_roots(&roots) {
                Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{data} {out}: {other:?}"),
            }
        }
    }

    const MINIMAL: &str = r#"
kind = "pretrain"
output = "s3://runs/tiny"
[data]
uri = "s3://corpus/endo"
[model]
preset = "tiny"
[resources]
world_size = 2
device = "cpu"
"#;

    fn field_of(err: Error) -> String {
        match err {
            Error::InvalidConfig { field, .. } => field,
            Error::SpecParse { message, .. } => message,
            other => other.to_string(),
        }
    }

    #[test]
    fn minimal_spec_gets_the_defaults() {
        let spec = JobSpec::from_toml(MINIMAL).expect("valid");
        assert_eq!(spec.name, "pretrain");
        assert_eq!(spec.data.list, "train.csv");
        assert_eq!(spec.max_restarts, 3);
        assert_eq!(spec.train, PretrainConfig::default());
        let again = JobSpec::from_json(&spec.to_json()).expect("round trip");
        assert_eq!(again, spec);
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (MINIMAL.replace("\"tiny\"", "\"huge\""), "model.preset"),
            (
                MINIMAL.replace("world_size = 2", "world_size = 0"),
                "resources.world_size",
            ),
            (MINIMAL.replace("s3://runs/tiny", "ftp://x/y"), "output"),
            (MINIMAL.replace("s3://corpus/endo", "s3://X/y"), "data.uri"),
            (format!("{MINIMAL}\n[train]\nlr = -1.0\n"), "train.lr"),
            (format!("{MINIMAL}\n[train]\nepochs = 0\n"), "train.epochs"),
        ];
        for (text, field) in cases {
            let err = JobSpec::from_toml(&text).expect_err(field);
            assert_eq!(field_of(err), field);
        }
        let unknown = format!("bogus = 1\n{MINIMAL}");
        let message = field_of(JobSpec::from_toml(&unknown).expect_err("unknown"));
        assert!(message.contains("bogus"), "{message}");
        let nested = MINIMAL.replace("device = \"cpu\"", "device = \"cpu\"\ngpus = 3");
        let message = field_of(JobSpec::from_toml(&nested).expect_err("unknown nested"));
        assert!(message.contains("gpus"), "{message}");
        let message = field_of(JobSpec::parse_auto("{\"kind\": \"pretrain\"}").expect_err("json"));
        assert!(message.contains("data"), "{message}");
        let message =
            field_of(JobSpec::from_toml(&MINIMAL.replace("cpu", "tpu")).expect_err("device"));
        assert!(message.contains("tpu"), "{message}");
    }

    const FINETUNE: &str = r#"
kind = "finetune"
task = "classify"
init = "job:job-1"
after = ["job-2"]
output = "s3://runs/ft"
[data]
uri = "s3://corpus/polypdiag"
[model]
preset = "tiny"
[resources]
device = "cpu"
[finetune]
epochs = 2
"#;

    const EVALUATE: &str = r#"
kind = "evaluate"
task = "classify"
init = "job:job-3"
output = "s3://runs/eval"
[data]
uri = "s3://corpus/polypdiag"
[model]
preset = "tiny"
[resources]
device = "cpu"
"#;

    #[test]
    fn finetune_and_evaluate_specs_parse_with_their_dependencies() {
        let ft = JobSpec::from_toml(FINETUNE).expect("finetune");
        assert_eq!((ft.kind, ft.name.as_str()), (JobKind::Finetune, "finetune"));
        assert_eq!(ft.task, Some(TaskKind::Classify));
        assert_eq!(ft.finetune.epochs, 2);
        assert_eq!(ft.init_job(), Some("job-1"));
        assert_eq!(ft.dependencies(), ["job-2", "job-1"]);
        assert_eq!(ft.split, None);
        let again = JobSpec::from_json(&ft.to_json()).expect("round trip");
        assert_eq!(again, ft);

        // Sizes left out follow the network (tiny: 112 px); sizes given are kept.
        let f = &ft.finetune;
        assert_eq!(
            (f.crop, f.train_short_min, f.train_short_max, f.test_short),
            (112, 128, 160, 128)
        );
        let cropped = JobSpec::from_toml(&format!("{FINETUNE}crop = 96\n")).expect("crop");
        assert_eq!(
            (cropped.finetune.crop, cropped.finetune.test_short),
            (96, 128)
        );
        let vitb = JobSpec::from_toml(&FINETUNE.replace("\"tiny\"", "\"vit_b\"")).expect("vit_b");
        assert_eq!(
            (vitb.finetune.crop, vitb.finetune.train_short_max),
            (224, 320)
        );
        let json = JobSpec::from_json(
            &serde_json::json!({
                "kind": "evaluate", "task": "classify", "init": "/w.safetensors",
                "output": "/o", "data": {"uri": "/d"}, "model": {"preset": "tiny"},
                "finetune": {"test_short": 150},
            })
            .to_string(),
        )
        .expect("json");
        assert_eq!((json.finetune.crop, json.finetune.test_short), (112, 150));

        let ev = JobSpec::from_toml(EVALUATE).expect("evaluate");
        assert_eq!(
            ev.split.as_deref(),
            Some("test"),
            "the default split is filled in"
        );
        assert_eq!(ev.eval_split(), "test");
        assert_eq!(ev.dependencies(), ["job-3"]);
        let val = JobSpec::from_toml(&format!("split = \"val\"\n{EVALUATE}")).expect("val");
        assert_eq!(val.eval_split(), "val");
        // `after` naming the init job too is one dependency.
        let both = JobSpec::from_toml(&format!("after = [\"job-3\"]\n{EVALUATE}")).expect("both");
        assert_eq!(both.dependencies(), ["job-3"]);

        let pre = JobSpec::from_toml(MINIMAL).expect("pretrain");
        assert!(pre.dependencies().is_empty() && pre.init_job().is_none());
        let chained = JobSpec::from_toml(&format!("init = \"job:job-7\"\n{MINIMAL}"))
            .expect("pretrain from a job");
        assert_eq!(chained.dependencies(), ["job-7"]);
    }

    #[test]
    fn job_ids_are_checked_for_form() {
        for good in ["job-1", "job-42", "job-1234567890"] {
            assert!(is_job_id(good), "{good}");
        }
        for bad in [
            "",
            "job-",
            "job-0",
            "job-01",
            "job-x",
            "job-1 ",
            "Job-1",
            "job--1",
            "job-12345678901234567890",
        ] {
            assert!(!is_job_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn downstream_refusals_name_the_field() {
        let many: Vec<String> = (1..=MAX_AFTER + 1)
            .map(|i| format!("\"job-{i}\""))
            .collect();
        let cases = [
            // Pre-training takes no task, split or [finetune].
            (format!("task = \"classify\"\n{MINIMAL}"), "task"),
            (format!("split = \"test\"\n{MINIMAL}"), "split"),
            (
                format!("{MINIMAL}\n[finetune]\nepochs = 3\n"),
                "finetune.epochs",
            ),
            (
                format!("{MINIMAL}\n[finetune]\nepochs = 20\n"),
                "finetune.epochs",
            ),
            // Fine-tuning needs a task and no pretrain-only fields.
            (FINETUNE.replace("task = \"classify\"\n", ""), "task"),
            (format!("{FINETUNE}\n[train]\nepochs = 3\n"), "train.epochs"),
            (
                format!("{FINETUNE}\n[train]\nepochs = 100\n"),
                "train.epochs",
            ),
            (format!("{FINETUNE}\n[views]\nglobal_size = 32\n"), "views"),
            (format!("split = \"test\"\n{FINETUNE}"), "split"),
            (format!("{FINETUNE}lr = 0.0\n"), "finetune.lr"),
            // Evaluation needs weights and a real split.
            (EVALUATE.replace("init = \"job:job-3\"\n", ""), "init"),
            (format!("split = \"holdout\"\n{EVALUATE}"), "split"),
            // Dependencies are well-formed, distinct and bounded.
            (FINETUNE.replace("job:job-1", "job:1"), "init"),
            (FINETUNE.replace("job:job-1", "job:"), "init"),
            (
                FINETUNE.replace("[\"job-2\"]", "[\"job-2\", \"nope\"]"),
                "after[1]",
            ),
            (
                FINETUNE.replace("[\"job-2\"]", "[\"job-2\", \"job-2\"]"),
                "after[1]",
            ),
            (
                FINETUNE.replace("[\"job-2\"]", &format!("[{}]", many.join(", "))),
                "after",
            ),
        ];
        for (text, field) in cases {
            let err = JobSpec::from_toml(&text).expect_err(field);
            let message = err.to_string();
            assert_eq!(field_of(err), field, "{text}");
            assert!(!message.is_empty());
        }
        // Detection: its own defaults, other tasks' settings refused by name, and a [detector]
        // table only with it, completed by the preset's network.
        let detect = FINETUNE.replace("\"classify\"", "\"detect\"");
        let det = JobSpec::from_toml(&detect).expect("detect");
        assert_eq!((det.finetune.batch_per_rank, det.finetune.lr), (1, 0.0025));
        assert_eq!(JobSpec::from_json(&det.to_json()).expect("round trip"), det);
        for (table, field) in [
            ("crop = 96", "finetune.crop"),
            ("decay_steps = [9, 3]", "finetune.decay_steps"),
            ("[detector]\nnms_th = 2.0", "detector.nms_th"),
        ] {
            let err = JobSpec::from_toml(&format!("{detect}{table}\n")).expect_err(table);
            assert_eq!(field_of(err), field, "{table}");
        }
        let err = JobSpec::from_toml(&format!("{detect}\n[detector]\nbogus = 2\n"))
            .expect_err("unknown detector field");
        assert!(err.to_string().contains("bogus"), "{err}");
        let ok = JobSpec::from_toml(&format!("{detect}\n[detector]\nnum_convs = 1\n"))
            .expect("detector");
        let d = ok.detector.expect("detector");
        assert_eq!((d.num_convs, d.fpn_channels), (1, 64));
        let err = JobSpec::from_toml(&format!("{FINETUNE}\n[detector]\nnum_convs = 1\n"))
            .expect_err("detector on classify");
        assert_eq!(field_of(err), "detector");
        // Segmentation: its own defaults, classification's settings refused by name, and a
        // [segmenter] table only with it.
        let seg =
            JobSpec::from_toml(&FINETUNE.replace("\"classify\"", "\"segment\"")).expect("segment");
        assert_eq!(
            (
                seg.finetune.batch_per_rank,
                seg.finetune.lr,
                seg.finetune.mean
            ),
            (1, 1e-4, 0.5)
        );
        assert_eq!(JobSpec::from_json(&seg.to_json()).expect("round trip"), seg);
        let err = JobSpec::from_toml(
            &FINETUNE
                .replace("\"classify\"", "\"segment\"")
                .replace("[finetune]", "[finetune]\nmomentum = 0.5"),
        )
        .expect_err("momentum");
        assert_eq!(field_of(err), "finetune.momentum");
        let err = JobSpec::from_toml(&format!("{FINETUNE}\n[segmenter]\nn_skip = 2\n"))
            .expect_err("segmenter on classify");
        assert_eq!(field_of(err), "segmenter");
        let ok = JobSpec::from_toml(&format!(
            "{}\n[segmenter]\nn_skip = 2\n",
            FINETUNE.replace("\"classify\"", "\"segment\"")
        ))
        .expect("segmenter");
        let seg = ok.segmenter.expect("segmenter");
        assert_eq!(seg.n_skip, 2);
        // The tiny preset's network completes the table.
        assert_eq!(seg.resnet_units, vec![2, 1, 1]);
        let message = field_of(
            JobSpec::from_toml(&FINETUNE.replace("finetune\"", "finetune-all\""))
                .expect_err("kind"),
        );
        assert!(message.contains("finetune-all"), "{message}");
    }

    #[test]
    fn an_init_naming_a_job_is_not_a_local_path() {
        let roots = vec![std::path::PathBuf::from("/data")];
        let spec = JobSpec::from_toml(
            &EVALUATE
                .replace("s3://runs/eval", "/data/eval")
                .replace("s3://corpus/polypdiag", "/data/polypdiag"),
        )
        .expect("spec");
        assert!(spec.check_local_roots(&roots).is_ok());
        let local = JobSpec {
            init: Some("/elsewhere/ckpt".into()),
            ..spec
        };
        match local.check_local_roots(&roots) {
            Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "init"),
            other => panic!("{other:?}"),
        }
    }

    /// Issue 11 item 6: specs that cannot run are refused at submission, across fields.
    #[test]
    fn specs_that_cannot_run_are_refused_across_fields() {
        let cases = [
            // fp16 needs CUDA, for either kind's precision.
            (
                format!("{MINIMAL}\n[train]\nprecision = \"fp16\"\n"),
                "train.precision",
            ),
            (
                format!("{FINETUNE}precision = \"fp16\"\n"),
                "finetune.precision",
            ),
            // Relative locations would be resolved against each agent's working directory.
            (
                MINIMAL.replace("s3://corpus/endo", "corpus/endo"),
                "data.uri",
            ),
            (MINIMAL.replace("s3://runs/tiny", "./runs/tiny"), "output"),
            (format!("init = \"weights.safetensors\"\n{MINIMAL}"), "init"),
            // The output is the corpus.
            (
                MINIMAL.replace("s3://runs/tiny", "s3://corpus/endo/"),
                "output",
            ),
            (
                MINIMAL
                    .replace("s3://corpus/endo", "/data/c")
                    .replace("s3://runs/tiny", "/data/x/../c"),
                "output",
            ),
        ];
        for (text, field) in cases {
            let err = JobSpec::from_toml(&text).expect_err(field);
            let message = err.to_string();
            assert_eq!(field_of(err), field, "{text}");
            assert!(message.len() < 400, "{message}");
        }
        // The same settings on CUDA, or bf16 on a CPU, are fine.
        let cuda = MINIMAL.replace("device = \"cpu\"", "device = \"cuda\"");
        assert!(JobSpec::from_toml(&format!("{cuda}\n[train]\nprecision = \"fp16\"\n")).is_ok());
        assert!(JobSpec::from_toml(&format!("{MINIMAL}\n[train]\nprecision = \"bf16\"\n")).is_ok());
        assert!(JobSpec::from_toml(&format!("init = \"job:job-1\"\n{MINIMAL}")).is_ok());
    }

    /// Issue 11 item 6: every free-form field is bounded, and no refusal echoes more than a
    /// bounded part of what the user sent.
    #[test]
    fn free_form_fields_are_bounded_and_never_echoed_whole() {
        let huge = "x".repeat(100_000);
        let cases = [
            (format!("name = \"{huge}\"\n{MINIMAL}"), "name"),
            (
                MINIMAL.replace("s3://corpus/endo", &format!("s3://corpus/{huge}")),
                "data.uri",
            ),
            (
                MINIMAL.replace("s3://runs/tiny", &format!("/runs/{huge}")),
                "output",
            ),
            (
                MINIMAL.replace("[data]\n", &format!("[data]\nlist = \"{huge}\"\n")),
                "data.list",
            ),
            (
                MINIMAL.replace("\"tiny\"", &format!("\"{huge}\"")),
                "model.preset",
            ),
            (format!("init = \"/w/{huge}\"\n{MINIMAL}"), "init"),
            (format!("after = [\"{huge}\"]\n{MINIMAL}"), "after[0]"),
            (format!("split = \"{huge}\"\n{EVALUATE}"), "split"),
            (format!("name = \"a\\u0000b\"\n{MINIMAL}"), "name"),
        ];
        for (text, field) in cases {
            let err = JobSpec::from_toml(&text).expect_err(field);
            let message = err.to_string();
            assert!(message.len() < 600, "{field}: {} bytes", message.len());
            assert_eq!(field_of(err), field);
        }
        // Parser errors quote the source: bounded too (an unknown key, a bad line).
        for text in [
            format!("{huge} = 1\n{MINIMAL}"),
            format!("{MINIMAL}\nbad line {huge}\n"),
        ] {
            let message = JobSpec::from_toml(&text).expect_err("parse").to_string();
            assert!(message.len() < 600, "{} bytes", message.len());
        }
        let message = JobSpec::from_json(&format!("{{\"{huge}\": 1}}"))
            .expect_err("json")
            .to_string();
        assert!(message.len() < 600, "{} bytes", message.len());
    }

    /// Issue 11 item 7: outputs that are the same place or nested overlap.
    #[test]
    fn overlapping_outputs_are_recognised() {
        let at =
            |out: &str| JobSpec::from_toml(&MINIMAL.replace("s3://runs/tiny", out)).expect(out);
        assert!(at("s3://runs/tiny").output_overlaps(&at("s3://runs/tiny/")));
        assert!(at("s3://runs/tiny").output_overlaps(&at("s3://runs/tiny/sub")));
        assert!(at("s3://runs").output_overlaps(&at("s3://runs/tiny")));
        assert!(!at("s3://runs/tiny").output_overlaps(&at("s3://runs/tiny2")));
        assert!(!at("s3://runs/tiny").output_overlaps(&at("gs://runs/tiny")));
        assert!(at("/out/a").output_overlaps(&at("file:///out/a")));
        assert!(at("/out/a").output_overlaps(&at("/out/b/../a/c")));
        assert!(!at("/out/a").output_overlaps(&at("/out/ab")));
    }
}
