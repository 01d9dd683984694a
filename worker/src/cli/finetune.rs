//! `endofm-worker finetune | evaluate | predict`: the downstream commands.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;

use endofm_shared::{InitFrom, ModelConfig, Preset, StorageUri, TaskKind};

use super::{RunExec, cores, parse_device, print_json, set_threads};
use crate::datasets::Split;
use crate::finetune::{self, EvaluateJob, Fallback, FinetuneJob, FinetuneRunConfig};
use crate::init::InitSource;

/// `finetune` arguments.
#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// The downstream task: classify (PolypDiag layout) or segment (CVC-12k layout).
    #[arg(long, default_value = "classify")]
    pub task: String,
    /// Dataset root in the task's published layout (a path or URI), e.g. a PolypDiag folder
    /// with videos/ and splits/{train,val,test}.txt.
    #[arg(long)]
    pub data: String,
    /// Output location (checkpoints, best/, metrics.jsonl, report.json, plots/); rerunning the
    /// same command resumes from its newest checkpoint.
    #[arg(long)]
    pub out: String,
    /// Initial weights: a pre-training output's checkpoint folder, an imported or published
    /// checkpoint (.pth), a safetensors file, locally or in object storage; default random.
    #[arg(long)]
    pub init: Option<String>,
    /// Which network of a pre-training checkpoint initialises the backbone.
    #[arg(long, value_parser = ["teacher", "student"])]
    pub init_from: Option<String>,
    /// Backbone preset (vit_b, tiny) when --config has no model section.
    #[arg(long)]
    pub preset: Option<String>,
    /// Run configuration (JSON): {"model": {...}, "finetune": {...}} over the defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Epochs (overrides the configuration).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Videos per rank per step (overrides the configuration; segmentation: 1 sequence).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Learning rate (overrides the configuration): classification's base rate at batch 256,
    /// segmentation's AdamW rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed (overrides the configuration).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop after this many steps in total (the schedule still spans every epoch).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Where and how the run executes.
    #[command(flatten)]
    pub exec: RunExec,
}

/// Which fine-tuned model, and where it runs (shared by `evaluate` and `predict`).
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// The downstream task.
    #[arg(long, default_value = "classify")]
    pub task: String,
    /// The fine-tuned model: a fine-tuning output location (its best/), a folder with
    /// model.safetensors (+ info.json, or a checkpoint's manifest.json), or a .safetensors file
    /// (then --preset/--config).
    #[arg(long)]
    pub weights: String,
    /// Backbone preset when the weights do not say.
    #[arg(long)]
    pub preset: Option<String>,
    /// Model configuration file when the weights do not say.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Device.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// libtorch intra-op threads.
    #[arg(long)]
    pub threads: Option<i32>,
}

impl ModelArgs {
    /// The task (implemented ones only), the device (threads applied) and the fallback network.
    fn resolve(&self) -> anyhow::Result<(TaskKind, tch::Device, Fallback)> {
        let task = task_of(&self.task)?;
        let device = parse_device(&self.device)?;
        set_threads(self.threads)?;
        Ok((
            task,
            device,
            fallback_of(self.preset.as_deref(), self.config.as_ref())?,
        ))
    }
}

/// `--preset` (its network, and for segmentation and detection the layers around it) or
/// `--config`: a model configuration, or a run's configuration (`config.json` of a fine-tuning
/// output: its `model`, `segmenter`, `detector` and `finetune` sections, the last the settings
/// the model was trained with).
fn fallback_of(preset: Option<&str>, config: Option<&PathBuf>) -> anyhow::Result<Fallback> {
    if let (None, Some(path)) = (preset, config) {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading model configuration {}", path.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("model configuration {} is not JSON", path.display()))?;
        if let Some(model) = value.get("model") {
            let origin = format!("{} (model)", path.display());
            return Ok(Fallback {
                model: Some(ModelConfig::from_json_str(&model.to_string(), &origin)?),
                segmenter: value
                    .get("segmenter")
                    .map(|s| endofm_shared::SegmenterConfig::resolve(None, Some(s)))
                    .transpose()
                    .with_context(|| format!("{} (segmenter)", path.display()))?,
                detector: value
                    .get("detector")
                    .map(|s| endofm_shared::DetectorConfig::resolve(None, Some(s)))
                    .transpose()
                    .with_context(|| format!("{} (detector)", path.display()))?,
                finetune: value
                    .get("finetune")
                    .map(|f| {
                        endofm_shared::FinetuneConfig::from_json_str(&f.to_string(), "finetune")
                    })
                    .transpose()
                    .with_context(|| format!("{} (finetune)", path.display()))?,
            });
        }
    }
    Ok(Fallback::of_preset(model_of(preset, config)?, preset))
}

/// `evaluate` arguments.
#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Dataset root.
    #[arg(long)]
    pub data: String,
    /// Split to score: train, val or test.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Where report.json and plots go (default: ./evaluation-<split>); not a training output.
    #[arg(long)]
    pub out: Option<String>,
    /// Decode threads.
    #[arg(long)]
    pub data_threads: Option<usize>,
}

/// `predict` arguments.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// A video file or frame folder, local or a URI.
    #[arg(long)]
    pub video: String,
    /// Classification: one probability per consecutive time window, as JSON lines.
    #[arg(long)]
    pub window: bool,
    /// Segmentation: where the masks (masks/NNNNNN.png) and overlay.mp4 go; detection: where
    /// detections.jsonl and annotated.mp4 go (default ./prediction-<video name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Segmentation: frames the network sees at once (a run of consecutive frames; default 8).
    #[arg(long)]
    pub frames: Option<usize>,
}

fn task_of(text: &str) -> anyhow::Result<TaskKind> {
    Ok(TaskKind::parse(text)?)
}

fn model_of(preset: Option<&str>, config: Option<&PathBuf>) -> anyhow::Result<Option<ModelConfig>> {
    Ok(match (preset, config) {
        (Some(_), Some(_)) => bail!("give --preset or --config, not both"),
        (Some(p), None) => Some(p.parse::<Preset>()?.config()),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading model configuration {}", path.display()))?;
            Some(ModelConfig::from_json_str(
                &text,
                &path.display().to_string(),
            )?)
        }
        (None, None) => None,
    })
}

/// Builds the fine-tuning run from flags, configuration file and defaults.
pub fn finetune_job(args: &FinetuneArgs) -> anyhow::Result<FinetuneJob> {
    let task = task_of(&args.task)?;
    let mut run: FinetuneRunConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading run configuration {}", path.display()))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("invalid run configuration {}", path.display()))?;
            if !value.is_object() {
                bail!(
                    "run configuration {}: expected a JSON object {{\"model\": {{...}}, \"finetune\": {{...}}}}",
                    path.display()
                );
            }
            serde_json::from_value(value)
                .with_context(|| format!("invalid run configuration {}", path.display()))?
        }
        None => FinetuneRunConfig::default(),
    };
    if let Some(lr) = args.lr
        && !(lr.is_finite() && lr > 0.0)
    {
        bail!("--lr {lr}: must be a finite positive number");
    }
    let model = match (&args.preset, run.model.take()) {
        (Some(_), Some(_)) => bail!("give the model either with --preset or in --config, not both"),
        (Some(name), None) => name.parse::<Preset>()?.config(),
        (None, Some(m)) => m,
        (None, None) => bail!("give --preset (vit_b, tiny) or a \"model\" section in --config"),
    };
    model.validate()?;
    if run.segmenter.is_some() && task != TaskKind::Segment {
        bail!(
            "the \"segmenter\" section of --config is for --task segment (this is --task {task})"
        );
    }
    if run.detector.is_some() && task != TaskKind::Detect {
        bail!("the \"detector\" section of --config is for --task detect (this is --task {task})");
    }
    let mut over = match run.finetune.take() {
        Some(serde_json::Value::Object(m)) => m,
        Some(_) => bail!("the \"finetune\" section of --config must be an object"),
        None => serde_json::Map::new(),
    };
    for (key, value) in [
        ("epochs", args.epochs.map(|v| json!(v))),
        ("batch_per_rank", args.batch.map(|v| json!(v))),
        ("lr", args.lr.map(|v| json!(v))),
        ("seed", args.seed.map(|v| json!(v))),
        ("init_from", args.init_from.as_ref().map(|v| json!(v))),
    ] {
        if let Some(v) = value {
            over.insert(key.into(), v);
        }
    }
    let cfg = finetune::finetune_config(task, &model, Some(&serde_json::Value::Object(over)))?;
    debug_assert!(matches!(
        cfg.init_from,
        InitFrom::Teacher | InitFrom::Student
    ));
    let (device, data_threads, progress) = args.exec.apply()?;
    Ok(FinetuneJob {
        task,
        data: StorageUri::parse(&args.data).context("--data")?,
        out: StorageUri::parse(&args.out).context("--out")?,
        preset: args.preset.clone(),
        segmenter: endofm_shared::SegmenterConfig::resolve(
            args.preset.as_deref(),
            run.segmenter.as_ref(),
        )?,
        detector: endofm_shared::DetectorConfig::resolve(
            args.preset.as_deref(),
            run.detector.as_ref(),
        )
        .context("the \"detector\" section of --config")?,
        model,
        cfg,
        init: args
            .init
            .as_deref()
            .map(InitSource::parse_uri)
            .transpose()?,
        max_steps: args.max_steps,
        device,
        data_threads,
        progress,
        stop: crate::run::stop_on_signals()?,
        observer: None,
    })
}

/// Runs `finetune`.
pub fn run_finetune(args: &FinetuneArgs) -> anyhow::Result<()> {
    let job = finetune_job(args)?;
    let outcome = finetune::run(&job, &mut crate::collective::Solo)?;
    if !outcome.report.is_empty() {
        eprintln!("report: {}", outcome.report);
    }
    print_json(&serde_json::to_value(&outcome)?);
    if let Some(run) = outcome.run.as_ref().filter(|r| r.interrupted) {
        bail!(
            "stopped on request after step {} of {} (checkpoint {}); rerun the same command to resume",
            run.steps,
            run.total_steps,
            run.checkpoint
        );
    }
    Ok(())
}

/// Runs `evaluate`.
pub fn run_evaluate(args: &EvaluateArgs) -> anyhow::Result<()> {
    let (task, device, fallback) = args.model.resolve()?;
    let split = Split::parse(&args.split)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| format!("evaluation-{}", split.name()));
    let job = EvaluateJob {
        task,
        weights: args.model.weights.clone(),
        fallback,
        overrides: None,
        data: StorageUri::parse(&args.data).context("--data")?,
        split,
        out: StorageUri::parse(&out).context("--out")?,
        device,
        data_threads: args.data_threads.unwrap_or_else(cores).max(1),
    };
    let outcome = finetune::evaluate(&job, &mut crate::collective::Solo)?;
    eprintln!("report: {}", outcome.report);
    print_json(&serde_json::to_value(&outcome)?);
    Ok(())
}

/// `./prediction-<video name without extension>`.
fn default_prediction_dir(video: &str) -> PathBuf {
    let stem = video
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("video")
        .split('.')
        .next()
        .unwrap_or("video");
    PathBuf::from(format!("prediction-{stem}"))
}

/// Runs `predict`: one JSON object, or with --window one JSON line per window.
pub fn run_predict(args: &PredictArgs) -> anyhow::Result<()> {
    let (task, device, fallback) = args.model.resolve()?;
    if task == TaskKind::Detect {
        if args.window || args.frames.is_some() {
            bail!(
                "--window and --frames are for classification and segmentation; detection predicts every frame with its reference frames"
            );
        }
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| default_prediction_dir(&args.video));
        let (frames, files) = finetune::detect::predict::predict(
            &args.model.weights,
            &fallback,
            &args.video,
            &out,
            device,
        )?;
        for f in &frames {
            print_json(&serde_json::to_value(f)?);
        }
        print_json(&serde_json::to_value(&files)?);
        return Ok(());
    }
    if task == TaskKind::Segment {
        if args.window {
            bail!("--window is for classification; segmentation predicts every frame");
        }
        let window = args.frames.unwrap_or(8);
        if window == 0 {
            bail!("--frames must be at least 1");
        }
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| default_prediction_dir(&args.video));
        let frames = finetune::segment::predict(
            &args.model.weights,
            &fallback,
            &args.video,
            &out,
            window,
            device,
        )?;
        for f in &frames {
            print_json(&serde_json::to_value(f)?);
        }
        print_json(&json!({
            "frames": frames.len(),
            "masks": out.join("masks").display().to_string(),
            "overlay": out.join("overlay.mp4").display().to_string(),
        }));
        return Ok(());
    }
    if args.out.is_some() || args.frames.is_some() {
        bail!(
            "--out and --frames are for segmentation and detection; classification prints its predictions and samples frames as the model was trained"
        );
    }
    let predictions = finetune::classify::predict(
        &args.model.weights,
        &fallback,
        &args.video,
        args.window,
        device,
    )?;
    for p in &predictions {
        print_json(&serde_json::to_value(p)?);
    }
    Ok(())
}
