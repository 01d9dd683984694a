//! The `endofm-worker` command line: `model info | init | forward | verify | import | export`,
//! `synth` (procedural endoscopy clips), `pretrain` and `bench ssl-step | data`.
//! Results go to stdout as JSON; logs go to stderr.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tch::Device;

use endofm_shared::{ModelConfig, Preset, TaskKind};

pub mod finetune;

use crate::convert;
use crate::infer::{self, Precision};
use crate::model::{EndoFm, LoadMode, weights};
use crate::synth;
use crate::verify::{self, ReferenceDir, Tolerances, downstream, trajectory};

/// Command line of `endofm-worker`.
#[derive(Debug, Parser)]
#[command(
    name = "endofm-worker",
    version,
    about = "endofm worker: the Endo-FM network on libtorch"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "auto", global = true)]
    pub log_format: LogFormatArg,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormatArg {
    /// Text on a terminal, JSON otherwise.
    Auto,
    /// Text.
    Text,
    /// JSON lines.
    Json,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The network: sizes, weights, inference, reference checks, checkpoint conversion.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Write a synthetic dataset of procedural endoscopy clips; prints a JSON summary.
    Synth(SynthArgs),
    /// Self-supervised pre-training from a corpus (a folder or bucket with train.csv and clips);
    /// rerunning the same command resumes from the newest checkpoint in --out.
    Pretrain(PretrainArgs),
    /// Fine-tune on a downstream task (classify: PolypDiag layout) from a pre-training
    /// checkpoint; selects on validation, scores every split once, writes report.json and plots.
    /// Rerunning the same command resumes from the newest checkpoint in --out.
    Finetune(finetune::FinetuneArgs),
    /// Score a fine-tuned model on one split of a dataset; writes report.json and plots.
    Evaluate(finetune::EvaluateArgs),
    /// Run a fine-tuned model on one video or frame folder: classify prints the class
    /// probability (per time window with --window), segment writes masks and an overlay video,
    /// detect prints each frame's boxes and writes an annotated video.
    Predict(finetune::PredictArgs),
    /// Benchmarks printing one JSON object per case.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The worker agent: registers with the coordinator and runs one rank process per assigned
    /// device until SIGTERM.
    Agent(AgentArgs),
    /// One rank of a job (started by the agent; stdout carries JSON progress lines).
    #[command(hide = true)]
    Rank(RankArgs),
}

/// `agent` arguments.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The coordinator's URL (http://host:port).
    #[arg(long)]
    pub coordinator: String,
    /// Device slots: cpu, cpu:N, cuda (every GPU) or cuda:0,1.
    #[arg(long)]
    pub devices: String,
    /// Serve /metrics and /healthz on this address (e.g. 0.0.0.0:9091).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Host other ranks reach this worker's ranks at (CPU ring).
    #[arg(long, default_value = "127.0.0.1")]
    pub advertise_host: String,
    /// File keeping the worker id across agent restarts.
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// Seconds between SIGTERM and SIGKILL when stopping a rank.
    #[arg(long, default_value_t = 10.0)]
    pub stop_grace_s: f64,
    /// libtorch threads per rank when the job spec does not say (default: cores / slots).
    #[arg(long)]
    pub threads_per_rank: Option<usize>,
}

/// `rank` arguments (internal: the agent passes them).
#[derive(Debug, Args)]
pub struct RankArgs {
    /// The coordinator's URL.
    #[arg(long)]
    pub coordinator: String,
    /// The assignment file the agent wrote.
    #[arg(long)]
    pub assignment: PathBuf,
    /// libtorch intra-op threads.
    #[arg(long)]
    pub threads: usize,
    /// Host the ring listener binds to and advertises.
    #[arg(long, default_value = "127.0.0.1")]
    pub advertise_host: String,
}

/// The agent's configuration from its flags.
pub fn agent_config(args: &AgentArgs) -> anyhow::Result<crate::agent::AgentConfig> {
    let devices = crate::agent::devices::parse_devices(&args.devices, || {
        usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
    })?;
    if !(args.stop_grace_s.is_finite() && (0.0..=3600.0).contains(&args.stop_grace_s)) {
        bail!("--stop-grace-s {} is outside [0, 3600]", args.stop_grace_s);
    }
    if args.threads_per_rank == Some(0) {
        bail!("--threads-per-rank must be at least 1");
    }
    Ok(crate::agent::AgentConfig {
        coordinator: args.coordinator.clone(),
        devices,
        metrics_listen: args.metrics_listen,
        advertise_host: args.advertise_host.clone(),
        state_file: args.state_file.clone(),
        stop_grace: std::time::Duration::from_secs_f64(args.stop_grace_s),
        threads_per_rank: args.threads_per_rank,
        exe: std::env::current_exe().context("locating the worker binary")?,
    })
}

/// `pretrain` arguments (flags override the --config file, which overrides the defaults).
#[derive(Debug, Args)]
pub struct PretrainArgs {
    /// Corpus location: a path, file://, s3://, gs:// or az:// URI holding the clip list.
    #[arg(long)]
    pub data: String,
    /// Output location for checkpoints, metrics.jsonl and config.json.
    #[arg(long)]
    pub out: String,
    /// Model preset (vit_b, tiny); or give the model in --config.
    #[arg(long)]
    pub preset: Option<String>,
    /// JSON run configuration: {"model": {...}, "train": {...}, "views": {...}}, all optional.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Clip list inside the corpus.
    #[arg(long, default_value = "train.csv")]
    pub list: String,
    /// Epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Stop after this many steps in total (schedules still span all epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Clips per step on this rank.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Base learning rate (at global batch 256).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Initial weights for a fresh run: a checkpoint folder, a .safetensors file or a .pth.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// A labelled PolypDiag-layout dataset (videos/, splits/train.txt, splits/val.txt) for a
    /// k-NN probe of the teacher's features: accuracy on val from train, before training and
    /// every --probe-every steps, in metrics.jsonl and the report.
    #[arg(long)]
    pub probe_data: Option<String>,
    /// Steps between probes (default: one epoch).
    #[arg(long, requires = "probe_data")]
    pub probe_every: Option<usize>,
    /// Neighbours of the probe (DINO's 20; fewer when the train split is smaller).
    #[arg(long, default_value_t = crate::pretrain::probe::DEFAULT_K)]
    pub probe_k: usize,
    /// Where and how the run executes.
    #[command(flatten)]
    pub exec: RunExec,
}

/// Where and how a training run executes (`pretrain`, `finetune`).
#[derive(Debug, Args)]
pub struct RunExec {
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// libtorch intra-op threads for the training step.
    #[arg(long)]
    pub threads: Option<i32>,
    /// Decode/augment threads (default: the machine's cores).
    #[arg(long)]
    pub data_threads: Option<usize>,
    /// Progress bar: auto (on a terminal), always, never.
    #[arg(long, default_value = "auto")]
    pub progress: String,
}

impl RunExec {
    /// Parses the device, applies the thread count; returns (device, data threads, progress).
    pub fn apply(&self) -> anyhow::Result<(Device, usize, bool)> {
        let device = parse_device(&self.device)?;
        set_threads(self.threads)?;
        let progress = match self.progress.as_str() {
            "auto" => crate::run::progress_default(),
            "always" => true,
            "never" => false,
            other => bail!("unknown --progress `{other}` (auto, always, never)"),
        };
        Ok((
            device,
            self.data_threads.unwrap_or_else(cores).max(1),
            progress,
        ))
    }
}

/// Builds the run from flags, config file and defaults.
pub fn pretrain_job(args: &PretrainArgs) -> anyhow::Result<crate::pretrain::PretrainJob> {
    use crate::pretrain::{InitSource, PretrainJob, RunConfig, views_for};
    use endofm_shared::StorageUri;
    let mut run: RunConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading run configuration {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("invalid run configuration {}", path.display()))?
        }
        None => RunConfig::default(),
    };
    let model = match (&args.preset, run.model.take()) {
        (Some(_), Some(_)) => bail!("give the model either with --preset or in --config, not both"),
        (Some(name), None) => name.parse::<Preset>()?.config(),
        (None, Some(m)) => m,
        (None, None) => bail!("give --preset (vit_b, tiny) or a \"model\" section in --config"),
    };
    let mut train = run.train;
    if let Some(v) = args.epochs {
        train.epochs = v;
    }
    if let Some(v) = args.batch {
        train.batch_per_rank = v;
    }
    if let Some(v) = args.lr {
        train.lr = v;
    }
    if let Some(v) = args.seed {
        train.seed = v;
    }
    if let Some(v) = args.checkpoint_every {
        train.checkpoint_every = v;
    }
    model.validate()?;
    train.validate()?;
    let views = run.views.unwrap_or_else(|| views_for(&model));
    views.validate()?;
    let (device, data_threads, progress) = args.exec.apply()?;
    Ok(PretrainJob {
        data: StorageUri::parse(&args.data).context("--data")?,
        list: args.list.clone(),
        out: StorageUri::parse(&args.out).context("--out")?,
        preset: args.preset.clone(),
        model,
        train,
        views,
        max_steps: args.max_steps,
        init: args.init.as_deref().map(InitSource::parse).transpose()?,
        device,
        data_threads,
        progress,
        stop: crate::pretrain::stop_on_signals()?,
        observer: None,
        probe: args
            .probe_data
            .as_deref()
            .map(|uri| -> anyhow::Result<_> {
                Ok(crate::pretrain::probe::ProbeSpec {
                    data: StorageUri::parse(uri).context("--probe-data")?,
                    every: args.probe_every,
                    k: args.probe_k,
                })
            })
            .transpose()?,
    })
}

/// `bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// One complete self-supervised training step on in-memory views (2 global + 8 local).
    SslStep {
        /// Which network.
        #[command(flatten)]
        source: ModelSource,
        /// Clips per step.
        #[arg(long, default_value_t = 2)]
        batch: i64,
        /// Device: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// libtorch intra-op threads (CPU).
        #[arg(long)]
        threads: Option<i32>,
        /// Precision: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16.
        #[arg(long, default_value = "auto")]
        precision: String,
        /// Timed steps (after one warm-up step).
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
    /// One complete fine-tuning iteration of the task (classify: forward, cross-entropy,
    /// backward, SGD momentum; segment: the TransUNet hybrid, CE + Dice, AdamW) on in-memory
    /// inputs of the task's sizes.
    FinetuneStep {
        /// The task (classify, segment, detect).
        #[arg(long, default_value = "classify")]
        task: String,
        /// Backbone preset: tiny (8 frames, 112 px) or vit_b (8 frames, 224 px).
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Videos per step (classify), frames of the one sequence per step (segment).
        #[arg(long, default_value_t = 4)]
        batch: i64,
        /// Device: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// libtorch intra-op threads (CPU).
        #[arg(long)]
        threads: Option<i32>,
        /// Precision: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16.
        #[arg(long, default_value = "auto")]
        precision: String,
        /// Timed steps (after one warm-up step).
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
    /// Clips per second from MP4 files to the ten normalised view tensors (decode + augment)
    /// through the pre-training loader.
    Data {
        /// Corpus location with the clip list (a path or URI); default: a synthetic corpus of
        /// 16 published-like clips (150 frames, 256 px short side) in a temporary folder.
        #[arg(long)]
        data: Option<String>,
        /// Clip list inside the corpus.
        #[arg(long, default_value = "train.csv")]
        list: String,
        /// Decode/augment threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Clips timed (after one warm-up clip per thread).
        #[arg(long, default_value_t = 64)]
        clips: usize,
        /// Preset whose views are rendered: vit_b (224/96 px) or tiny (112/48 px).
        #[arg(long, default_value = "vit_b")]
        preset: String,
    },
    /// All-reduce bandwidth: the TCP ring over W processes of this program on loopback, or NCCL
    /// in a world of one on GPU 0.
    #[command(name = "allreduce")]
    AllReduce {
        /// Which collective to time.
        #[arg(long, value_enum, default_value_t = AllReduceBackend::TcpRing)]
        backend: AllReduceBackend,
        /// Ranks (this process and W-1 children); default 2 for the ring, 1 for NCCL.
        #[arg(long)]
        world: Option<usize>,
        /// Buffer sizes in MiB, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [4, 64])]
        mb: Vec<usize>,
        /// Timed all-reduces per size (after one warm-up).
        #[arg(long, default_value_t = 8)]
        iters: usize,
        /// Seconds any connection or transfer may take before it is an error.
        #[arg(long, default_value_t = 60)]
        deadline_s: u64,
    },
    /// One rank of `bench allreduce` (started by it).
    #[command(name = "allreduce-rank", hide = true)]
    AllReduceRank {
        /// This rank.
        #[arg(long)]
        rank: usize,
        /// Every rank's listen address, in rank order.
        #[arg(long, value_delimiter = ',', required = true)]
        peers: Vec<std::net::SocketAddr>,
        /// Buffer sizes in MiB.
        #[arg(long, value_delimiter = ',', required = true)]
        mb: Vec<usize>,
        /// Timed all-reduces per size.
        #[arg(long)]
        iters: usize,
        /// The attempt shared by all ranks.
        #[arg(long)]
        session: u64,
        /// Seconds any connection or transfer may take.
        #[arg(long)]
        deadline_s: u64,
    },
}

/// `synth` arguments.
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Which dataset.
    #[arg(long, value_enum)]
    pub kind: SynthKind,
    /// Output folder (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of clips (pretrain; required there) or videos / sequences in all splits
    /// (polypdiag: 12, cvc: 6, kumc: 6).
    #[arg(long, visible_alias = "videos")]
    pub clips: Option<usize>,
    /// Seed: the same seed writes the same clips.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Frames per clip (pretrain: 150), or the fewest frames per video (polypdiag: 64,
    /// cvc: 12, kumc: 24).
    #[arg(long)]
    pub frames: Option<usize>,
    /// Downstream kinds: the most frames per video, drawn uniformly per video (polypdiag: 96,
    /// cvc: 24, kumc: 40; at least --frames).
    #[arg(long)]
    pub max_frames: Option<usize>,
    /// Short side of the frames in pixels, frames 5:4 landscape (pretrain: 256, others: 128).
    #[arg(long)]
    pub size: Option<usize>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Pretrain only: probability that a clip shows polyps (0.3).
    #[arg(long)]
    pub polyp_probability: Option<f64>,
    /// Factor on the polyps' size, 0.25 to 4 (larger: the prominent polyps of close-up clips;
    /// pretrain: 1, polypdiag: 2, cvc and kumc: 1.5).
    #[arg(long)]
    pub polyp_scale: Option<f64>,
    /// Downstream kinds: how far the polyps' colour is from the wall's, 1 to 4 (1: the
    /// renderer's natural reddish mounds, cvc's default; polypdiag: 2, clearly paler; kumc: 1.5,
    /// hyperplastic paler and adenomatous browner than the wall, so the classes differ).
    #[arg(long)]
    pub polyp_contrast: Option<f64>,
    /// Downstream kinds: the most polyps a video shows, 1 or 2 (2: a quarter of the videos
    /// with polyps show two).
    #[arg(long)]
    pub max_polyps: Option<usize>,
    /// polypdiag: share of a positive video's frames that must show its polyp (0.5).
    #[arg(long)]
    pub min_polyp_share: Option<f64>,
    /// polypdiag: the polyp area a frame needs to count as showing it, as a fraction of the
    /// frame's central square (what centre crops keep); 0: any pixel, 0.04: plainly visible.
    #[arg(long)]
    pub min_polyp_area: Option<f64>,
}

/// `bench allreduce --backend` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AllReduceBackend {
    /// The CPU ring (`collective::ring`), one process per rank on loopback.
    TcpRing,
    /// NCCL on CUDA device 0, world of one (this workplace's GPU machines have one GPU).
    Nccl,
}

/// `synth --kind` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SynthKind {
    /// Unlabelled pre-training clips: `<out>/synth/NNNNN.mp4`, `train.csv`, `labels.json`.
    Pretrain,
    /// PolypDiag classification: `videos/NNNN.mp4`, `splits/{train,val,test}.txt` (`name,label`).
    Polypdiag,
    /// CVC-12k segmentation: `sequences/NNN/{frames,masks}/K.png`, `splits/*.txt`.
    Cvc,
    /// KUMC detection: `<split>2019/{Image,Annotation}/NNN/K.{jpg,xml}`, `ImageSets/*.txt`.
    Kumc,
}

/// Which network configuration to use.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ModelSource {
    /// A named preset (vit_b, tiny).
    #[arg(long)]
    pub preset: Option<String>,
    /// A configuration file: the reference `config.json` format or endofm's own.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl ModelSource {
    /// Resolves to a validated configuration.
    pub fn resolve(&self) -> anyhow::Result<ModelConfig> {
        match (&self.preset, &self.config) {
            (Some(name), _) => Ok(name.parse::<Preset>()?.config()),
            (None, Some(path)) => read_config(path),
            (None, None) => bail!("give --preset or --config"),
        }
    }
}

fn read_config(path: &Path) -> anyhow::Result<ModelConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading model configuration {}", path.display()))?;
    Ok(ModelConfig::from_json_str(
        &text,
        &path.display().to_string(),
    )?)
}

/// Execution options shared by the compute commands.
#[derive(Debug, Args)]
pub struct Exec {
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Precision: fp32, or bf16 autocast (CUDA).
    #[arg(long, value_enum, default_value = "fp32")]
    pub precision: Precision,
    /// Intra-op CPU threads (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<i32>,
}

impl Exec {
    /// Applies the thread count and parses the device.
    pub fn setup(&self) -> anyhow::Result<Device> {
        set_threads(self.threads)?;
        parse_device(&self.device)
    }
}

/// Applies `--threads` (libtorch intra-op threads) when given; refuses 0 or less.
pub(crate) fn set_threads(n: Option<i32>) -> anyhow::Result<()> {
    if let Some(n) = n {
        if n < 1 {
            bail!("--threads must be at least 1, got {n}");
        }
        tch::set_num_threads(n);
    }
    Ok(())
}

/// The machine's cores (the default number of data threads).
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Parses `cpu`, `cuda`, `cuda:N`; refuses CUDA when no GPU is visible.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    let device = match s {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => Device::Cuda(0),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::Cuda(i),
            _ => bail!("unknown device `{s}`: use cpu, cuda or cuda:N"),
        },
    };
    let available = tch::Cuda::device_count() as usize;
    match device {
        Device::Cuda(i) if i >= available => {
            bail!("device `{s}` requested, but this machine has {available} CUDA device(s)")
        }
        d => Ok(d),
    }
}

/// `model` subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Print the configuration and parameter counts as JSON.
    Info {
        /// Which network.
        #[command(flatten)]
        source: ModelSource,
    },
    /// Write randomly initialised weights (reference initialisation) to a safetensors file.
    Init {
        /// Which network.
        #[command(flatten)]
        source: ModelSource,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// Seed of libtorch's generator.
        #[arg(long, default_value_t = 0)]
        seed: i64,
    },
    /// Run every NAME.input of a safetensors file through the network (eval mode) and write
    /// NAME.features and NAME.head; or, with --reference, the eval-mode cases of a reference
    /// directory (its config.json, weights and vectors), written under the vectors' own names
    /// (classify: fwd*.features, fwd*.logits).
    Forward {
        /// Which network (required without --reference).
        #[command(flatten)]
        source: OptionalModelSource,
        /// A reference directory (config.json, weights.safetensors, vectors.safetensors or
        /// forward.safetensors) instead of --preset/--config, --weights and --inputs.
        #[arg(long, conflicts_with_all = ["weights", "inputs", "preset", "config"])]
        reference: Option<PathBuf>,
        /// Weights (safetensors, published key names; loaded strictly).
        #[arg(long, required_unless_present = "reference")]
        weights: Option<PathBuf>,
        /// Inputs: safetensors with NAME.input tensors of shape (B, 3, T, H, W), float32.
        #[arg(long, required_unless_present = "reference")]
        inputs: Option<PathBuf>,
        /// Output safetensors file.
        #[arg(long)]
        output: PathBuf,
        /// Execution options.
        #[command(flatten)]
        exec: Exec,
    },
    /// Check forward and training-step parity against reference vectors; JSON per check; exit
    /// status 1 when a check is out of tolerance.
    Verify {
        /// Directory with config.json, weights.safetensors, forward.safetensors and
        /// (optionally) train_step.safetensors.
        #[arg(long)]
        reference: PathBuf,
        /// Execution options.
        #[command(flatten)]
        exec: Exec,
    },
    /// Replay a pre-training trajectory (a reference directory with `trajectory` in its
    /// config.json and trajectory.safetensors) from its weights.safetensors through the step
    /// `pretrain` runs, with the config's hyper-parameters; writes `loss`, `lr`, `wd`,
    /// `momentum`, `teacher_temp` (one value per iteration), `final.student.<key>`,
    /// `final.teacher.<key>` and `final.center`. fp32 only. On a CPU with ≥ 2 threads a narrow
    /// network runs the two-thread step (ENDOFM_ONE_THREAD_STEP=1: intra-op threads).
    Replay {
        /// The trajectory's reference directory.
        #[arg(long)]
        reference: PathBuf,
        /// Output safetensors file.
        #[arg(long)]
        output: PathBuf,
        /// Execution options.
        #[command(flatten)]
        exec: Exec,
    },
    /// Convert a PyTorch checkpoint (reference format: `student` / `teacher` dicts, keys maybe
    /// prefixed `module.`) into safetensors files in a directory.
    Import {
        /// The .pth checkpoint.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Output directory (student.safetensors, teacher.safetensors, import.json).
        #[arg(long)]
        out: PathBuf,
        /// Allow arbitrary pickled objects (only for files you trust).
        #[arg(long)]
        trust: bool,
        /// Check the imported networks against this configuration (strict load).
        #[command(flatten)]
        check: OptionalModelSource,
        /// Python with torch (default: the venv the worker was built with).
        #[arg(long)]
        python: Option<PathBuf>,
    },
    /// CLS features of every clip of a corpus (eval mode, uniform frames, centre crop), written
    /// as `features` (clips × D) to a safetensors file; with --labels, a k-NN probe of the
    /// `polyp` flags of a generated corpus's labels.json.
    Embed {
        /// Which network.
        #[command(flatten)]
        source: ModelSource,
        /// Weights (safetensors; a pre-training checkpoint's student.safetensors works).
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Corpus location with its clip list.
        #[arg(long)]
        data: String,
        /// Clip list inside the corpus.
        #[arg(long, default_value = "train.csv")]
        list: String,
        /// Frames per clip.
        #[arg(long, default_value_t = 8)]
        frames: usize,
        /// Input side in pixels (default: the model's image size).
        #[arg(long)]
        size: Option<usize>,
        /// Clips per forward pass.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// labels.json of a generated corpus: report leave-one-out k-NN accuracy of `polyp`.
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Neighbours of the probe.
        #[arg(long, default_value_t = 3)]
        k: usize,
        /// Execution options.
        #[command(flatten)]
        exec: Exec,
    },
    /// Write our safetensors weights as a reference-format PyTorch checkpoint.
    Export {
        /// Student weights.
        #[arg(long)]
        student: PathBuf,
        /// Teacher weights (default: a copy of the student).
        #[arg(long)]
        teacher: Option<PathBuf>,
        /// Output .pth file.
        #[arg(long)]
        out: PathBuf,
        /// Epoch recorded in the checkpoint.
        #[arg(long)]
        epoch: Option<u64>,
        /// Python with torch (default: the venv the worker was built with).
        #[arg(long)]
        python: Option<PathBuf>,
    },
}

/// An optional `--preset` / `--config`.
#[derive(Debug, Args)]
#[group(required = false, multiple = false)]
pub struct OptionalModelSource {
    /// A named preset to check against.
    #[arg(long)]
    pub preset: Option<String>,
    /// A configuration file to check against.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Prints one JSON value on stdout (results are JSON on stdout, logs on stderr).
pub(crate) fn print_json(v: &serde_json::Value) {
    println!("{v}");
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Model(cmd) => run_model(cmd),
        Command::Synth(args) => run_synth(args),
        Command::Bench(cmd) => run_bench(cmd),
        Command::Pretrain(args) => {
            let job = pretrain_job(&args)?;
            let summary = crate::pretrain::run(&job, &mut crate::collective::Solo)?;
            print_json(&serde_json::to_value(&summary)?);
            Ok(())
        }
        Command::Finetune(args) => finetune::run_finetune(&args),
        Command::Evaluate(args) => finetune::run_evaluate(&args),
        Command::Predict(args) => finetune::run_predict(&args),
        Command::Agent(args) => Ok(crate::agent::run(agent_config(&args)?)?),
        Command::Rank(args) => Ok(crate::agent::rank::run(crate::agent::rank::RankConfig {
            coordinator: args.coordinator,
            assignment: args.assignment,
            threads: args.threads,
            advertise_host: args.advertise_host,
        })?),
    }
}

fn run_bench(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::FinetuneStep {
            task,
            preset,
            batch,
            device,
            threads,
            precision,
            steps,
        } => {
            let exec = Exec {
                device,
                precision: Precision::Fp32,
                threads,
            };
            let device = exec.setup()?;
            let model = preset.parse::<Preset>()?.config();
            let precision: endofm_shared::TrainPrecision = serde_json::from_value(json!(precision))
                .context("--precision (auto, fp32, bf16)")?;
            if TaskKind::parse(&task)? == TaskKind::Detect {
                let opts = crate::bench::detect::DetectStepOptions {
                    preset,
                    batch,
                    device,
                    precision,
                    steps,
                    cfg: endofm_shared::FinetuneConfig::for_task(TaskKind::Detect),
                    // The published head at every preset, to compare with the published step.
                    detector: endofm_shared::DetectorConfig::published(),
                };
                let result = crate::bench::detect::detect_step(&model, &opts)?;
                print_json(&serde_json::to_value(&result)?);
                return Ok(());
            }
            let segmenter = crate::finetune::segmenter_for(Some(&preset), None);
            let opts = crate::bench::finetune::FinetuneStepOptions {
                task: TaskKind::parse(&task)?,
                preset,
                batch,
                segmenter,
                device,
                precision,
                steps,
                cfg: crate::finetune::finetune_config(TaskKind::parse(&task)?, &model, None)?,
            };
            let result = crate::bench::finetune::finetune_step(&model, &opts)?;
            print_json(&serde_json::to_value(&result)?);
            Ok(())
        }
        BenchCommand::SslStep {
            source,
            batch,
            device,
            threads,
            precision,
            steps,
        } => {
            let exec = Exec {
                device,
                precision: Precision::Fp32,
                threads,
            };
            let device = exec.setup()?;
            let cfg = source.resolve()?;
            if batch < 1 || steps < 1 {
                bail!("--batch and --steps must be at least 1");
            }
            let precision: endofm_shared::TrainPrecision = serde_json::from_value(
                serde_json::Value::String(precision.clone()),
            )
            .map_err(|_| {
                anyhow::anyhow!("unknown --precision `{precision}` (auto, fp32, bf16, fp16)")
            })?;
            let result = crate::bench::ssl_step(
                &cfg,
                &crate::bench::SslStepOptions {
                    preset: source.preset.clone().unwrap_or_else(|| "custom".into()),
                    batch,
                    device,
                    precision,
                    steps,
                    views: crate::pretrain::views_for(&cfg),
                },
            )?;
            print_json(&serde_json::to_value(&result)?);
            Ok(())
        }
        BenchCommand::Data {
            data,
            list,
            threads,
            clips,
            preset,
        } => {
            if threads < 1 || clips < 1 {
                bail!("--threads and --clips must be at least 1");
            }
            let data = data
                .map(|d| endofm_shared::StorageUri::parse(&d))
                .transpose()
                .context("--data")?;
            let views = crate::pretrain::views_for(&preset.parse::<Preset>()?.config());
            let result = crate::bench::data(&crate::bench::DataOptions {
                data,
                list,
                threads,
                clips,
                preset,
                views,
            })
            .context("bench data")?;
            print_json(&serde_json::to_value(&result)?);
            Ok(())
        }
        BenchCommand::AllReduce {
            backend: AllReduceBackend::Nccl,
            world,
            mb,
            iters,
            deadline_s,
        } => bench_allreduce_nccl(world.unwrap_or(1), &mb, iters, deadline_s),
        BenchCommand::AllReduce {
            backend: AllReduceBackend::TcpRing,
            world,
            mb,
            iters,
            deadline_s,
        } => {
            let world = world.unwrap_or(2);
            if world < 2 || iters < 1 || mb.is_empty() {
                bail!("--world must be at least 2, --iters at least 1, --mb not empty");
            }
            bench_allreduce(world, &mb, iters, deadline_s)
        }
        BenchCommand::AllReduceRank {
            rank,
            peers,
            mb,
            iters,
            session,
            deadline_s,
        } => {
            let listener = std::net::TcpListener::bind(
                peers
                    .get(rank)
                    .with_context(|| format!("--rank {rank} has no address in --peers"))?,
            )
            .context("binding this rank's listen address")?;
            allreduce_rank(rank, &peers, listener, &mb, iters, session, deadline_s)?;
            Ok(())
        }
    }
}

/// Rank 0 of `bench allreduce`: starts ranks 1.. as child processes on loopback, takes part as
/// rank 0 and prints one JSON line per size.
fn bench_allreduce(
    world: usize,
    mb: &[usize],
    iters: usize,
    deadline_s: u64,
) -> anyhow::Result<()> {
    // Children bind the ports found free here; nothing else connects to loopback in between.
    let mut listeners = (0..world)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("binding loopback ports")?;
    let peers = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<std::io::Result<Vec<_>>>()?;
    let own = listeners.remove(0);
    drop(listeners);
    let session = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id());
    let join = |v: &mut dyn Iterator<Item = String>| v.collect::<Vec<_>>().join(",");
    let peer_list = join(&mut peers.iter().map(ToString::to_string));
    let mb_list = join(&mut mb.iter().map(ToString::to_string));
    let exe = std::env::current_exe().context("finding this program")?;
    let mut children = Vec::new();
    for rank in 1..world {
        let child = std::process::Command::new(&exe)
            .args(["bench", "allreduce-rank", "--rank", &rank.to_string()])
            .args(["--peers", &peer_list, "--mb", &mb_list])
            .args([
                "--iters",
                &iters.to_string(),
                "--session",
                &session.to_string(),
            ])
            .args(["--deadline-s", &deadline_s.to_string()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        children.push(child);
    }
    let result = allreduce_rank(0, &peers, own, mb, iters, session, deadline_s);
    let mut failed = Vec::new();
    for (i, mut child) in children.into_iter().enumerate() {
        if result.is_err() {
            let _ = child.kill();
        }
        match child.wait() {
            Ok(status) if status.success() => {}
            Ok(status) => failed.push(format!("rank {} {status}", i + 1)),
            Err(e) => failed.push(format!("rank {}: {e}", i + 1)),
        }
    }
    for case in result? {
        print_json(&serde_json::to_value(&case)?);
    }
    if !failed.is_empty() {
        bail!("bench allreduce: {}", failed.join(", "));
    }
    Ok(())
}

fn allreduce_rank(
    rank: usize,
    peers: &[std::net::SocketAddr],
    listener: std::net::TcpListener,
    mb: &[usize],
    iters: usize,
    session: u64,
    deadline_s: u64,
) -> anyhow::Result<Vec<crate::bench::AllReduceBench>> {
    use crate::collective::ring::{RingCollective, RingConfig};
    let cfg = RingConfig::new(
        rank,
        peers.len(),
        session,
        std::time::Duration::from_secs(deadline_s),
    );
    let mut ring = RingCollective::connect(cfg, peers, listener)
        .with_context(|| format!("rank {rank} joining the ring"))?;
    crate::bench::allreduce(&mut ring, "tcp-ring", Device::Cpu, mb, iters)
        .with_context(|| format!("rank {rank} all-reduce"))
}

/// `bench allreduce --backend nccl`: one rank on CUDA device 0. Without a usable GPU it prints
/// one JSON line with a `skipped` reason and succeeds, as the GPU tests do.
fn bench_allreduce_nccl(
    world: usize,
    mb: &[usize],
    iters: usize,
    deadline_s: u64,
) -> anyhow::Result<()> {
    use crate::collective::nccl::{self, NcclCollective};
    if world != 1 || iters < 1 || mb.is_empty() {
        bail!(
            "--backend nccl runs a world of one (--world 1; multi-rank NCCL needs the coordinator's rendezvous), --iters at least 1, --mb not empty"
        );
    }
    if !nccl::available() {
        print_json(&json!({
            "bench": "allreduce",
            "backend": "nccl",
            "world": world,
            "skipped": "SKIPPED: no CUDA device visible to libtorch, or libnccl.so not loadable",
        }));
        return Ok(());
    }
    let id = nccl::unique_id().context("making the NCCL unique id")?;
    let deadline = std::time::Duration::from_secs(deadline_s);
    let mut group =
        NcclCollective::connect(0, 1, &id, 0, deadline).context("joining the NCCL communicator")?;
    let cases = crate::bench::allreduce(&mut group, "nccl", Device::Cuda(0), mb, iters)
        .context("NCCL all-reduce")?;
    for case in cases {
        print_json(&serde_json::to_value(&case)?);
    }
    Ok(())
}

fn run_synth(args: SynthArgs) -> anyhow::Result<()> {
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let kind = match args.kind {
        SynthKind::Pretrain => return run_synth_pretrain(&args),
        SynthKind::Polypdiag => synth::datasets::DownstreamKind::PolypDiag,
        SynthKind::Cvc => synth::datasets::DownstreamKind::Cvc,
        SynthKind::Kumc => synth::datasets::DownstreamKind::Kumc,
    };
    if args.polyp_probability.is_some() {
        bail!(
            "--polyp-probability is for --kind pretrain; {} videos show a polyp by their label",
            kind.name()
        );
    }
    let defaults = synth::datasets::DownstreamSpec::new(kind);
    let min_frames = args.frames.unwrap_or(defaults.frames[0]);
    let max_frames = args
        .max_frames
        .unwrap_or(defaults.frames[1].max(min_frames));
    if max_frames < min_frames {
        bail!("--max-frames {max_frames} is below --frames {min_frames}");
    }
    let spec = synth::datasets::DownstreamSpec {
        videos: args.clips.unwrap_or(defaults.videos),
        frames: [min_frames, max_frames],
        short_side: args.size.unwrap_or(defaults.short_side),
        seed: args.seed,
        threads: args.threads.unwrap_or(0),
        polyp_scale: args.polyp_scale.unwrap_or(defaults.polyp_scale),
        polyp_contrast: args.polyp_contrast.unwrap_or(defaults.polyp_contrast),
        max_polyps: args.max_polyps.unwrap_or(defaults.max_polyps),
        min_polyp_share: args.min_polyp_share.unwrap_or(defaults.min_polyp_share),
        min_polyp_area: args.min_polyp_area.unwrap_or(defaults.min_polyp_area),
        ..defaults
    };
    let summary = synth::datasets::write_downstream(&args.out, &spec).with_context(|| {
        format!(
            "writing the synthetic {} dataset to {}",
            kind.name(),
            args.out.display()
        )
    })?;
    print_json(&serde_json::to_value(&summary)?);
    Ok(())
}

fn run_synth_pretrain(args: &SynthArgs) -> anyhow::Result<()> {
    let clips = match args.clips {
        None | Some(0) => bail!("--clips must be at least 1"),
        Some(n) => n,
    };
    if args.polyp_contrast.is_some()
        || args.max_polyps.is_some()
        || args.min_polyp_share.is_some()
        || args.min_polyp_area.is_some()
    {
        bail!(
            "--polyp-contrast, --max-polyps, --min-polyp-share and --min-polyp-area are for the downstream kinds"
        );
    }
    if args.max_frames.is_some() {
        bail!("--max-frames is for the downstream kinds; pre-training clips have --frames frames");
    }
    let spec = synth::CorpusSpec {
        clips,
        frames: args.frames.unwrap_or(150),
        short_side: args.size.unwrap_or(256),
        seed: args.seed,
        threads: args.threads.unwrap_or(0),
        polyp_probability: args.polyp_probability.unwrap_or(0.3),
        polyp_scale: args.polyp_scale.unwrap_or(1.0),
        ..synth::CorpusSpec::default()
    };
    let summary = synth::write_pretrain_corpus(&args.out, &spec).with_context(|| {
        format!(
            "writing the synthetic pre-training corpus to {}",
            args.out.display()
        )
    })?;
    print_json(&json!({
        "kind": "pretrain",
        "out": summary.out,
        "clips": summary.clips,
        "frames": summary.frames,
        "bytes": summary.bytes,
        "polyp_clips": summary.polyp_clips,
        "width": summary.width,
        "height": summary.height,
        "threads": summary.threads,
        "seconds": summary.seconds,
    }));
    Ok(())
}

/// `model forward --reference DIR`: the eval-mode cases of a reference directory, under the
/// vectors' own names.
fn reference_forward(
    reference: &Path,
    device: Device,
    precision: Precision,
) -> anyhow::Result<std::collections::BTreeMap<String, tch::Tensor>> {
    let dir = ReferenceDir::open(reference)?;
    if dir.file("trajectory.safetensors").is_file() {
        bail!(
            "{}: a pre-training trajectory has no eval-mode cases to run (and trajectory replay is not implemented in this version)",
            reference.display()
        );
    }
    match downstream::task_of(&dir)? {
        Some(TaskKind::Classify) => Ok(downstream::classify_forward(&dir, device, precision)?),
        Some(TaskKind::Detect) => Ok(crate::verify::detect::detect_forward(
            &dir, device, precision,
        )?),
        Some(TaskKind::Segment) => {
            if precision != Precision::Fp32 {
                bail!("segmentation reference outputs are computed in fp32");
            }
            Ok(verify::segment::segment_forward(&dir, device)?)
        }
        None => {
            let model = dir.model(device)?;
            let inputs = weights::read(&dir.file("forward.safetensors"))?;
            Ok(infer::forward_named(&model, &inputs, precision)?)
        }
    }
}

/// `model verify` on a downstream reference directory: one JSON line per check.
fn verify_downstream(
    dir: &ReferenceDir,
    task: TaskKind,
    device: Device,
    exec: &Exec,
) -> anyhow::Result<()> {
    if exec.precision != Precision::Fp32 {
        bail!("downstream reference checks run in fp32 (their tolerances are fp32 ones)");
    }
    let checks = match task {
        TaskKind::Classify => downstream::check_classify(dir, device)?,
        TaskKind::Detect => crate::verify::detect::check_detect(dir, device)?,
        TaskKind::Segment => verify::segment::check_segment(dir, device)?,
    };
    let mut ok = true;
    for c in &checks {
        ok &= c.pass;
        print_json(&json!({"task": task.name(), "device": exec.device, "result": c}));
    }
    if !ok {
        bail!("reference check failed: see the JSON lines above");
    }
    Ok(())
}

fn run_model(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Info { source } => {
            let cfg = source.resolve()?;
            let analytic = cfg.param_counts();
            let model = EndoFm::new(&cfg, Device::Cpu)?;
            let counts = model.param_counts();
            if counts != analytic {
                bail!("internal: allocated {counts:?} but the configuration implies {analytic:?}");
            }
            let trainable: i64 = model
                .var_store()
                .trainable_variables()
                .iter()
                .map(tch::Tensor::numel)
                .sum::<usize>() as i64;
            print_json(&json!({
                "preset": source.preset,
                "params": counts.total,
                "backbone_params": counts.backbone,
                "head_params": counts.head,
                "trainable_params": trainable,
                "config": cfg,
            }));
            Ok(())
        }
        ModelCommand::Init { source, out, seed } => {
            let cfg = source.resolve()?;
            tch::manual_seed(seed);
            let model = EndoFm::new(&cfg, Device::Cpu)?;
            model.save(&out)?;
            print_json(&json!({"out": out, "params": model.param_counts().total, "seed": seed}));
            Ok(())
        }
        ModelCommand::Forward {
            reference: Some(reference),
            output,
            exec,
            ..
        } => {
            let device = exec.setup()?;
            let started = std::time::Instant::now();
            let outputs = reference_forward(&reference, device, exec.precision)?;
            weights::write(&output, &outputs)?;
            print_json(&json!({
                "output": output,
                "tensors": outputs.keys().collect::<Vec<_>>(),
                "seconds": started.elapsed().as_secs_f64(),
            }));
            Ok(())
        }
        ModelCommand::Forward {
            source,
            weights: Some(weights_path),
            inputs: Some(inputs),
            output,
            exec,
            ..
        } => {
            let device = exec.setup()?;
            let cfg = ModelSource {
                preset: source.preset,
                config: source.config,
            }
            .resolve()?;
            let inputs_map = weights::read(&inputs)?;
            let mut model = EndoFm::new(&cfg, device)?;
            model
                .load(&weights_path, LoadMode::Strict)
                .with_context(|| {
                    format!(
                        "loading {} into the configured network",
                        weights_path.display()
                    )
                })?;
            let started = std::time::Instant::now();
            let outputs = infer::forward_named(&model, &inputs_map, exec.precision)?;
            weights::write(&output, &outputs)?;
            tracing::info!(output = %output.display(), tensors = outputs.len(), secs = started.elapsed().as_secs_f64(), "forward written");
            print_json(&json!({
                "output": output,
                "tensors": outputs.keys().collect::<Vec<_>>(),
                "seconds": started.elapsed().as_secs_f64(),
            }));
            Ok(())
        }
        ModelCommand::Forward { .. } => bail!("give --reference, or --weights and --inputs"),
        ModelCommand::Verify { reference, exec } => {
            let device = exec.setup()?;
            let tol = Tolerances::for_precision(exec.precision);
            let dir = ReferenceDir::open(&reference)?;
            if let Some(task) = downstream::task_of(&dir)? {
                return verify_downstream(&dir, task, device, &exec);
            }
            let forward = dir.file("forward.safetensors");
            let trajectory = trajectory::Trajectory::present(&dir);
            if !forward.is_file() && !dir.file("train_step.safetensors").is_file() && !trajectory {
                bail!(
                    "{}: no check to run (expected forward.safetensors, train_step.safetensors, trajectory.safetensors, or vectors.safetensors with a task in config.json)",
                    reference.display()
                );
            }
            let mut ok = true;
            if trajectory {
                if exec.precision != Precision::Fp32 {
                    bail!("trajectory checks run in fp32 (their tolerances are fp32 ones)");
                }
                let started = std::time::Instant::now();
                let report = trajectory::check(&dir, device, None)?;
                ok &= report.pass;
                print_json(
                    &json!({"check": "trajectory", "device": exec.device, "precision": exec.precision, "seconds": started.elapsed().as_secs_f64(), "result": report}),
                );
                if !forward.is_file() && !dir.file("train_step.safetensors").is_file() {
                    if !ok {
                        bail!("reference check failed: see the JSON line above");
                    }
                    return Ok(());
                }
            }
            let model = dir.model(device)?;
            if forward.is_file() {
                for case in verify::check_forward(&model, &forward, exec.precision, &tol)? {
                    ok &= case.pass;
                    print_json(
                        &json!({"check": "forward", "device": exec.device, "precision": exec.precision, "tolerance": tol.forward_rel, "case": case}),
                    );
                }
            }
            if dir.file("train_step.safetensors").is_file() {
                let step = verify::check_train_step(&dir, device, exec.precision, &tol)?;
                ok &= step.pass;
                print_json(
                    &json!({"check": "train_step", "device": exec.device, "precision": exec.precision, "tolerances": tol, "result": step}),
                );
            }
            if !ok {
                bail!("reference check failed: see the JSON lines above");
            }
            Ok(())
        }
        ModelCommand::Replay {
            reference,
            output,
            exec,
        } => {
            let device = exec.setup()?;
            if exec.precision != Precision::Fp32 {
                bail!("model replay runs in fp32 (the trajectory's tolerances are fp32 ones)");
            }
            let dir = ReferenceDir::open(&reference)?;
            if !trajectory::Trajectory::present(&dir) {
                bail!(
                    "{}: no {} to replay",
                    reference.display(),
                    trajectory::TRAJECTORY_FILE
                );
            }
            let traj = trajectory::Trajectory::open(&dir)?;
            let started = std::time::Instant::now();
            let replay = trajectory::replay(&traj, device, None)?;
            weights::write(&output, &replay.tensors())?;
            print_json(&json!({
                "output": output,
                "steps": traj.steps,
                "step_path": if replay.two_threads { "two-thread" } else { "intra-op" },
                "loss": replay.loss,
                "diagnostics": replay.diagnostics,
                "collapse": replay.collapse,
                "seconds": started.elapsed().as_secs_f64(),
            }));
            Ok(())
        }
        ModelCommand::Import {
            checkpoint,
            out,
            trust,
            check,
            python,
        } => {
            let py = convert::python(python.as_deref());
            let source = ModelSource {
                preset: check.preset,
                config: check.config,
            };
            let cfg = if source.preset.is_some() || source.config.is_some() {
                Some(source.resolve()?)
            } else {
                None
            };
            // Every file the checkpoint holds is checked (student, teacher or a bare state
            // dict) before anything appears in --out.
            let report = convert::import_checked(&py, &checkpoint, &out, trust, |path, _| {
                if let Some(cfg) = &cfg {
                    EndoFm::new(cfg, Device::Cpu)?.load(path, LoadMode::Strict)?;
                }
                Ok(())
            })?;
            println!("{report}");
            Ok(())
        }
        ModelCommand::Embed {
            source,
            weights: weights_path,
            data,
            list,
            frames,
            size,
            batch,
            out,
            labels,
            k,
            exec,
        } => {
            let device = exec.setup()?;
            let cfg = source.resolve()?;
            let mut model = EndoFm::new(&cfg, device)?;
            if let Some(w) = &weights_path {
                model.load(w, LoadMode::Strict)?;
            }
            let corpus = crate::data::loader::Corpus::open(
                &endofm_shared::StorageUri::parse(&data).context("--data")?,
                &list,
            )?;
            let opts = crate::embed::EmbedOptions {
                frames,
                size: size.unwrap_or(cfg.img_size),
                batch,
                precision: exec.precision,
            };
            let features = crate::embed::embed_corpus(&model, &corpus, &opts)?;
            let mut tensors = std::collections::BTreeMap::new();
            tensors.insert("features".to_string(), features.shallow_clone());
            weights::write(&out, &tensors)?;
            let knn = match labels {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    let doc: serde_json::Value = serde_json::from_str(&text)
                        .with_context(|| format!("{} is not JSON", path.display()))?;
                    let by_path: std::collections::HashMap<&str, bool> = doc["clips"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|c| Some((c["path"].as_str()?, c["polyp"].as_bool()?)))
                                .collect()
                        })
                        .unwrap_or_default();
                    let labels = corpus
                        .clips()
                        .iter()
                        .map(|c| {
                            by_path.get(c.as_str()).copied().ok_or_else(|| {
                                anyhow::anyhow!("{} has no label for {c}", path.display())
                            })
                        })
                        .collect::<anyhow::Result<Vec<bool>>>()?;
                    Some(crate::embed::knn_accuracy(&features, &labels, k))
                }
                None => None,
            };
            print_json(&json!({
                "out": out,
                "clips": features.size()[0],
                "dim": features.size()[1],
                "knn_accuracy": knn,
            }));
            Ok(())
        }
        ModelCommand::Export {
            student,
            teacher,
            out,
            epoch,
            python,
        } => {
            let py = convert::python(python.as_deref());
            let report = convert::export(&py, &student, teacher.as_deref(), &out, epoch)?;
            println!("{report}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synth(out: &Path, clips: &str) -> anyhow::Result<()> {
        let out = out.to_string_lossy();
        let args = [
            "endofm-worker",
            "synth",
            "--kind",
            "pretrain",
            "--out",
            &out,
            "--clips",
            clips,
            "--frames",
            "4",
            "--size",
            "32",
            "--threads",
            "1",
        ];
        run(Cli::try_parse_from(args)?)
    }

    #[test]
    fn synth_writes_a_corpus_and_names_bad_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        synth(&dir.path().join("corpus"), "1").expect("a one-clip corpus");
        assert!(dir.path().join("corpus/synth/00000.mp4").is_file());
        let err = synth(&dir.path().join("zero"), "0").expect_err("zero clips");
        assert!(format!("{err:#}").contains("--clips"), "{err:#}");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").expect("writing");
        let err = synth(&file.join("corpus"), "1").expect_err("unwritable output");
        assert!(format!("{err:#}").contains("not-a-dir"), "{err:#}");
        assert!(Cli::try_parse_from(["endofm-worker", "synth", "--kind", "finetune"]).is_err());
    }

    #[test]
    fn bench_data_runs_on_a_given_corpus() {
        let dir = tempfile::tempdir().expect("tempdir");
        let corpus = dir.path().join("corpus");
        synth(&corpus, "2").expect("a two-clip corpus");
        let corpus = corpus.to_string_lossy();
        let args = [
            "endofm-worker",
            "bench",
            "data",
            "--data",
            &corpus,
            "--threads",
            "1",
            "--clips",
            "3",
            "--preset",
            "tiny",
        ];
        run(Cli::try_parse_from(args).expect("parsing")).expect("bench data");
        let Command::Bench(BenchCommand::Data { data, preset, .. }) =
            Cli::try_parse_from(&args[..3]).expect("defaults").command
        else {
            panic!("bench data parses as another command");
        };
        assert_eq!((data, preset.as_str()), (None, "vit_b"));
        let bad = run(
            Cli::try_parse_from([&args[..5], &["--preset", "huge"]].concat()).expect("parsing"),
        );
        assert!(format!("{:#}", bad.expect_err("unknown preset")).contains("huge"));
    }
}
