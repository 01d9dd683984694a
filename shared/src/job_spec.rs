//! A job as users submit it (TOML or JSON), typed and validated without touching the network,
//! so that the coordinator refuses a bad spec at submission with the field named. The worker
//! reads the same type back from the validated JSON the coordinator hands out.

use serde::{Deserialize, Serialize};

use crate::{Error, ModelConfig, Preset, PretrainConfig, Result, StorageUri};

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// Self-supervised pre-training (DINO/SVT teacher-student).
    Pretrain,
}

impl JobKind {
    /// The name used in specs and the API.
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Pretrain => "pretrain",
        }
    }
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
    /// workers' file system); a previous job's output folder works too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
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
    /// Hyper-parameters (defaults = the reference's); `checkpoint_every` is the checkpoint
    /// interval in steps.
    #[serde(default)]
    pub train: PretrainConfig,
}

/// The largest world size a spec may ask for.
pub const MAX_WORLD_SIZE: u32 = 4096;

impl JobSpec {
    /// Parses a TOML document (refusing unknown fields), fills defaults and validates.
    pub fn from_toml(text: &str) -> Result<Self> {
        let spec: Self = toml::from_str(text).map_err(|e| Error::SpecParse {
            format: "TOML",
            message: e.to_string().trim().replace('\n', " "),
        })?;
        spec.validated()
    }

    /// Parses a JSON document (refusing unknown fields), fills defaults and validates.
    pub fn from_json(text: &str) -> Result<Self> {
        let spec: Self = serde_json::from_str(text).map_err(|e| Error::SpecParse {
            format: "JSON",
            message: e.to_string(),
        })?;
        spec.validated()
    }

    /// Parses TOML, or JSON when the text is a JSON object.
    pub fn parse_auto(text: &str) -> Result<Self> {
        if text.trim_start().starts_with('{') {
            Self::from_json(text)
        } else {
            Self::from_toml(text)
        }
    }

    fn validated(mut self) -> Result<Self> {
        if self.name.trim().is_empty() {
            self.name = self.kind.name().to_string();
        }
        self.validate()?;
        Ok(self)
    }

    /// Checks every field; the error names the first bad one (dotted path).
    pub fn validate(&self) -> Result<()> {
        let prefixed = |prefix: &str, e: Error| match e {
            Error::InvalidConfig { field, reason } => Error::InvalidConfig {
                field: format!("{prefix}.{field}"),
                reason,
            },
            other => other,
        };
        if self.name.len() > 200 {
            return Err(Error::invalid("name", "longer than 200 characters"));
        }
        StorageUri::parse(&self.data.uri).map_err(|e| prefixed("data", e))?;
        if self.data.list.trim().is_empty() || self.data.list.contains("..") {
            return Err(Error::invalid(
                "data.list",
                format!("`{}` is not a file name inside the corpus", self.data.list),
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
                    format!("unknown preset `{name}` (known: {known})"),
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
        self.train.validate().map_err(|e| prefixed("train", e))?;
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
        if let Some(init) = &self.init {
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
                        "local path `{uri}` is outside the allowed roots ({}); use an absolute path below one of them or an object-store URI",
                        list.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The spec as JSON with every default filled in.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
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
            ("relative/corpus", "/runs/a", "data.uri"),
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
}
