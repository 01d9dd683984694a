//! The rank process (`endofm-worker rank`, started by the agent, one per assigned rank): reads
//! its assignment, builds the run exactly like `pretrain` does from the job spec, meets the other
//! ranks of its attempt through the coordinator's rendezvous (a stale generation is refused there
//! and ends the rank with a failure, never a join), runs the job's kind ([`pretrain::run`],
//! [`finetune::run`], [`finetune::evaluate`]), and prints a JSON line on stdout after every step
//! and every committed checkpoint, and (rank 0) a result line with the headline metric. It exits at once when its
//! stdin reaches EOF (the agent died), and checkpoints and exits 0 on SIGTERM.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use endofm_proto::v1;
use endofm_shared::{DeviceKind, JobKind, JobSpec, StorageUri};
use tch::{Device, Tensor};

use super::client::{self, Client};
use super::protocol::{AssignmentFile, ProgressLine, RankLine};
use crate::collective::ring::{RingCollective, RingConfig};
use crate::collective::{Collective, Solo};
use crate::datasets::Split;
use crate::finetune::{self, EvaluateJob, FinetuneJob, Outcome};
use crate::pretrain::{self, InitSource, MetricsLine, PretrainJob, RunObserver};
use crate::{Error, Result};

/// Exit status when the agent went away (stdin closed).
pub const EXIT_ORPHANED: i32 = 3;

/// What the agent tells a rank process.
#[derive(Debug, Clone)]
pub struct RankConfig {
    /// The coordinator's URL.
    pub coordinator: String,
    /// The assignment file the agent wrote.
    pub assignment: PathBuf,
    /// libtorch intra-op threads.
    pub threads: usize,
    /// Host this rank's ring listener binds to and advertises.
    pub advertise_host: String,
}

/// Reads and parses an assignment file and its spec.
pub fn read_assignment(path: &Path) -> Result<(AssignmentFile, JobSpec)> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        action: "reading the assignment",
        path: path.to_path_buf(),
        source,
    })?;
    let a: AssignmentFile = serde_json::from_str(&text).map_err(|e| Error::Service {
        what: format!("assignment {}", path.display()),
        reason: e.to_string(),
    })?;
    let spec = JobSpec::from_json(&a.spec_json)?;
    Ok((a, spec))
}

/// The device an assignment names.
fn device_of(a: &AssignmentFile) -> Result<Device> {
    match DeviceKind::parse(&a.device_kind) {
        Some(DeviceKind::Cpu) => Ok(Device::Cpu),
        Some(DeviceKind::Cuda) => Ok(Device::Cuda(a.device_index as usize)),
        None => Err(Error::Service {
            what: "assignment".into(),
            reason: format!("unknown device kind `{}`", a.device_kind),
        }),
    }
}

/// The fine-tuning run of one rank, built from a `finetune` job spec (`init` already resolved
/// by the coordinator to a checkpoint location).
pub fn finetune_job_for(
    a: &AssignmentFile,
    spec: &JobSpec,
    stop: Arc<AtomicBool>,
    observer: Option<Arc<dyn RunObserver>>,
) -> Result<FinetuneJob> {
    let device = device_of(a)?;
    let task = spec.task.ok_or_else(|| Error::Service {
        what: "job spec".into(),
        reason: "a finetune job without a task".into(),
    })?;
    Ok(FinetuneJob {
        task,
        data: StorageUri::parse(&spec.data.uri)?,
        out: StorageUri::parse(&spec.output)?,
        preset: spec
            .model
            .config
            .is_none()
            .then(|| spec.model.preset.clone()),
        segmenter: crate::finetune::segmenter_for(
            spec.model
                .config
                .is_none()
                .then_some(spec.model.preset.as_str()),
            spec.segmenter.clone(),
        ),
        detector: crate::finetune::detector_for(
            spec.model
                .config
                .is_none()
                .then_some(spec.model.preset.as_str()),
            spec.detector.clone(),
        ),
        model: spec.model.resolve()?,
        cfg: spec.finetune.clone(),
        init: spec
            .init
            .as_deref()
            .map(InitSource::parse_uri)
            .transpose()?,
        max_steps: spec.max_steps,
        device,
        data_threads: spec.data.threads,
        progress: false,
        stop,
        observer,
    })
}

/// The evaluation of one rank, built from an `evaluate` job spec (`init`: the model, resolved).
pub fn evaluate_job_for(a: &AssignmentFile, spec: &JobSpec) -> Result<EvaluateJob> {
    let missing = |what: &str| Error::Service {
        what: "job spec".into(),
        reason: format!("an evaluate job without {what}"),
    };
    Ok(EvaluateJob {
        task: spec.task.ok_or_else(|| missing("a task"))?,
        weights: spec
            .init
            .clone()
            .ok_or_else(|| missing("init (the model)"))?,
        fallback: crate::finetune::Fallback::of_preset(
            Some(spec.model.resolve()?),
            spec.model
                .config
                .is_none()
                .then_some(spec.model.preset.as_str()),
        ),
        overrides: None,
        data: StorageUri::parse(&spec.data.uri)?,
        split: Split::parse(spec.split.as_deref().unwrap_or("test"))?,
        out: StorageUri::parse(&spec.output)?,
        device: device_of(a)?,
        data_threads: spec.data.threads,
    })
}

/// Prints the result line rank 0 reports at the end of a fine-tuning or evaluation job.
fn report_result(rank: u32, outcome: &Outcome) {
    if rank != 0 {
        return;
    }
    let Some((headline, value)) = outcome.headline.clone() else {
        return;
    };
    let line = RankLine::Result {
        headline,
        value,
        metrics: outcome.metrics.clone(),
        report: outcome.report.clone(),
    };
    println!("{}", line.to_json());
}

/// The run of one rank, built from the job spec the way `pretrain` builds it from flags.
pub fn job_for(
    a: &AssignmentFile,
    spec: &JobSpec,
    stop: Arc<AtomicBool>,
    observer: Option<Arc<dyn RunObserver>>,
) -> Result<PretrainJob> {
    if a.world_size == 0 || a.rank >= a.world_size {
        return Err(Error::Service {
            what: "assignment".into(),
            reason: format!("rank {} of world {}", a.rank, a.world_size),
        });
    }
    let device = device_of(a)?;
    let model = spec.model.resolve()?;
    let mut views = pretrain::views_for(&model);
    if let Some(sizes) = &spec.views {
        if let Some(g) = sizes.global_size {
            views.global_size = g;
        }
        if let Some(l) = sizes.local_size {
            views.local_size = l;
        }
    }
    Ok(PretrainJob {
        data: StorageUri::parse(&spec.data.uri)?,
        list: spec.data.list.clone(),
        out: StorageUri::parse(&spec.output)?,
        preset: spec
            .model
            .config
            .is_none()
            .then(|| spec.model.preset.clone()),
        model,
        train: spec.train.clone(),
        views,
        max_steps: spec.max_steps,
        init: spec
            .init
            .as_deref()
            .map(InitSource::parse_uri)
            .transpose()?,
        device,
        data_threads: spec.data.threads,
        progress: false,
        stop,
        observer,
        // Job specs carry no probe set (yet): the command line's --probe-data only.
        probe: None,
    })
}

/// All-reduce time and volume, shared between the collective wrapper and the observer.
#[derive(Debug, Default)]
pub struct AllReduceStats {
    nanos: AtomicU64,
    bytes: AtomicU64,
}

impl AllReduceStats {
    /// Seconds and bytes so far.
    pub fn totals(&self) -> (f64, u64) {
        (
            self.nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// A collective that times every all-reduce.
pub struct Timed {
    inner: Box<dyn Collective>,
    stats: Arc<AllReduceStats>,
}

impl Timed {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn Collective>, stats: Arc<AllReduceStats>) -> Self {
        Self { inner, stats }
    }
}

impl Collective for Timed {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&mut self, buffer: &mut Tensor) -> Result<()> {
        let started = Instant::now();
        let result = self.inner.all_reduce_sum(buffer);
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.stats.nanos.fetch_add(nanos, Ordering::Relaxed);
        let bytes = buffer.numel() as u64 * buffer.kind().elt_size_in_bytes() as u64;
        self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
        result
    }
}

/// A number among a metrics line's task values, NaN when absent.
fn extra_f64(line: &MetricsLine, key: &str) -> f64 {
    line.extra
        .get(key)
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(f64::NAN)
}

/// Prints progress and checkpoint lines on stdout.
#[derive(Debug)]
struct StdoutObserver {
    stats: Arc<AllReduceStats>,
    /// All-reduce totals at the previous step, and the smoothed step time.
    last: Mutex<(f64, u64, Option<f64>)>,
}

impl RunObserver for StdoutObserver {
    fn on_step(&self, line: &MetricsLine, end_step: usize) {
        let (secs, bytes) = self.stats.totals();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let (prev_s, prev_b, ema) = *last;
        let smooth = ema.map_or(line.step_s, |e| 0.8 * e + 0.2 * line.step_s);
        *last = (secs, bytes, Some(smooth));
        drop(last);
        let done = line.step + 1;
        let p = ProgressLine {
            step: done as u64,
            total_steps: end_step as u64,
            epoch: u32::try_from(line.epoch).unwrap_or(u32::MAX),
            loss: line.loss,
            lr: line.lr,
            samples_per_s: line.samples_per_s,
            data_wait_s: line.data_wait_s,
            step_s: line.step_s,
            eta_s: end_step.saturating_sub(done) as f64 * smooth,
            allreduce_s: secs - prev_s,
            allreduce_bytes: bytes - prev_b,
            clips_failed: line.clips_failed,
            teacher_entropy: extra_f64(line, "teacher_entropy"),
            batch_entropy: extra_f64(line, "batch_entropy"),
            kl: extra_f64(line, "kl"),
            collapse: line
                .extra
                .get("collapse")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_string(),
        };
        println!("{}", RankLine::Progress(p).to_json());
    }

    fn on_checkpoint(&self, step: usize, uri: &str) {
        let line = RankLine::Checkpoint {
            step: step as u64,
            uri: uri.to_string(),
        };
        println!("{}", line.to_json());
    }
}

/// Exits the process when stdin reaches EOF: the agent that started this rank is gone.
fn exit_with_agent() {
    let spawned = std::thread::Builder::new()
        .name("agent-watch".into())
        .spawn(|| {
            use std::io::Read;
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        eprintln!("error: the agent went away (stdin closed); exiting");
                        std::process::exit(EXIT_ORPHANED);
                    }
                    Ok(_) => {}
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot watch stdin; this rank may outlive its agent");
    }
}

/// The rendezvous of one attempt through the coordinator.
struct Rendezvous<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: Client,
    rank: v1::RankRef,
    deadline: Instant,
    stop: Arc<AtomicBool>,
}

impl Rendezvous<'_> {
    fn put(&mut self, key: &str, value: Vec<u8>) -> Result<()> {
        loop {
            let req = v1::RendezvousPutRequest {
                rank: Some(self.rank.clone()),
                key: key.to_string(),
                value: value.clone(),
            };
            match self.rt.block_on(self.client.rendezvous_put(req)) {
                Ok(_) => return Ok(()),
                Err(s) => self.retry_or_fail(&format!("rendezvous put {key}"), &s)?,
            }
        }
    }

    /// Waits for `key` until the deadline.
    fn get(&mut self, key: &str) -> Result<Vec<u8>> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Rpc {
                    call: format!("rendezvous get {key}"),
                    reason: "not published before the collective deadline".into(),
                });
            }
            if self.stop.load(Ordering::SeqCst) {
                return Err(stopped());
            }
            let wait = left.min(Duration::from_secs(5));
            let req = v1::RendezvousGetRequest {
                rank: Some(self.rank.clone()),
                key: key.to_string(),
                wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
            };
            match self.rt.block_on(self.client.rendezvous_get(req)) {
                Ok(r) if r.get_ref().found => return Ok(r.into_inner().value),
                Ok(_) => {}
                Err(s) => self.retry_or_fail(&format!("rendezvous get {key}"), &s)?,
            }
        }
    }

    /// A stale generation (or a refused token) ends the rank; anything else is retried until
    /// the deadline.
    fn retry_or_fail(&self, call: &str, s: &tonic::Status) -> Result<()> {
        use tonic::Code;
        if matches!(
            s.code(),
            Code::FailedPrecondition
                | Code::Unauthenticated
                | Code::PermissionDenied
                | Code::InvalidArgument
        ) || Instant::now() >= self.deadline
        {
            return Err(client::rpc_error(call, s));
        }
        if self.stop.load(Ordering::SeqCst) {
            return Err(stopped());
        }
        tracing::warn!(call, status = %s.message(), code = ?s.code(), "rendezvous call failed, retrying");
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }
}

fn stopped() -> Error {
    Error::Service {
        what: "rendezvous".into(),
        reason: "stopped before training started".into(),
    }
}

/// Meets the other CPU ranks: publishes this rank's listen address, reads everyone else's.
fn ring_collective(
    rdv: &mut Rendezvous<'_>,
    a: &AssignmentFile,
    host: &str,
    timeout: Duration,
) -> Result<Box<dyn Collective>> {
    let listener = TcpListener::bind((host, 0)).map_err(|e| Error::Service {
        what: format!("binding the ring listener on {host}"),
        reason: e.to_string(),
    })?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::Service {
            what: "ring listener".into(),
            reason: e.to_string(),
        })?
        .port();
    let me = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    rdv.put(&format!("ring/{}", a.rank), me.clone().into_bytes())?;
    let mut peers = Vec::with_capacity(a.world_size as usize);
    for r in 0..a.world_size {
        let text = if r == a.rank {
            me.clone()
        } else {
            String::from_utf8_lossy(&rdv.get(&format!("ring/{r}"))?).into_owned()
        };
        let addr: SocketAddr = text
            .to_socket_addrs()
            .ok()
            .and_then(|mut it| it.next())
            .ok_or_else(|| Error::Service {
                what: format!("rendezvous ring/{r}"),
                reason: format!("`{text}` is not a reachable host:port"),
            })?;
        peers.push(addr);
    }
    tracing::info!(?peers, "ring rendezvous complete");
    let cfg = RingConfig::new(
        a.rank as usize,
        a.world_size as usize,
        a.generation,
        timeout,
    );
    Ok(Box::new(RingCollective::connect(cfg, &peers, listener)?))
}

/// The NCCL unique id of a new communicator (rank 0).
fn nccl_unique_id() -> Result<[u8; 128]> {
    crate::collective::nccl::unique_id()
}

/// Joins the NCCL communicator on libtorch's current stream of the rank's device.
fn nccl_collective(
    rank: usize,
    world: usize,
    id: &[u8; 128],
    device_index: usize,
    deadline: Duration,
) -> Result<Box<dyn Collective>> {
    Ok(Box::new(crate::collective::nccl::NcclCollective::connect(
        rank,
        world,
        id,
        device_index,
        deadline,
    )?))
}

/// Meets the other CUDA ranks: rank 0 publishes the NCCL id, the others read it.
fn cuda_collective(
    rdv: &mut Rendezvous<'_>,
    a: &AssignmentFile,
    timeout: Duration,
) -> Result<Box<dyn Collective>> {
    let id = if a.rank == 0 {
        let id = nccl_unique_id()?;
        rdv.put("nccl/id", id.to_vec())?;
        id
    } else {
        let bytes = rdv.get("nccl/id")?;
        <[u8; 128]>::try_from(bytes.as_slice()).map_err(|_| Error::Service {
            what: "rendezvous nccl/id".into(),
            reason: format!("{} bytes, expected 128", bytes.len()),
        })?
    };
    nccl_collective(
        a.rank as usize,
        a.world_size as usize,
        &id,
        a.device_index as usize,
        timeout,
    )
}

/// Runs the rank to its end. A failure is classified ([`super::failure::classify`]) and its
/// class printed on stdout before the error is returned (and printed on stderr by `main`).
pub fn run(cfg: RankConfig) -> Result<()> {
    let outcome = run_rank(cfg);
    if let Err(e) = &outcome {
        let line = RankLine::Failure {
            class: super::failure::classify(e),
            reason: endofm_shared::text::clip(&e.to_string(), endofm_shared::text::MESSAGE_CHARS),
        };
        println!("{}", line.to_json());
    }
    outcome
}

fn run_rank(cfg: RankConfig) -> Result<()> {
    exit_with_agent();
    let stop = pretrain::stop_on_signals()?;
    let (a, spec) = read_assignment(&cfg.assignment)?;
    let span =
        tracing::info_span!("rank", job = %a.job_id, generation = a.generation, rank = a.rank);
    let _entered = span.enter();
    let threads = i32::try_from(cfg.threads.max(1)).unwrap_or(1);
    tch::set_num_threads(threads);
    let stats = Arc::new(AllReduceStats::default());
    let observer = Arc::new(StdoutObserver {
        stats: Arc::clone(&stats),
        last: Mutex::new((0.0, 0, None)),
    });
    let device = device_of(&a)?;
    let timeout = Duration::from_secs_f64(spec.collective_timeout_s);
    let inner: Box<dyn Collective> = if a.world_size == 1 {
        Box::new(Solo)
    } else {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Service {
                what: "starting the RPC runtime".into(),
                reason: e.to_string(),
            })?;
        let client = {
            let _guard = rt.enter();
            client::connect(&cfg.coordinator)?
        };
        let mut rdv = Rendezvous {
            rt: &rt,
            client,
            rank: a.rank_ref(),
            deadline: Instant::now() + timeout,
            stop: Arc::clone(&stop),
        };
        match device {
            Device::Cpu => ring_collective(&mut rdv, &a, &cfg.advertise_host, timeout)?,
            _ => cuda_collective(&mut rdv, &a, timeout)?,
        }
    };
    let mut collective = Timed::new(inner, stats);
    tracing::info!(threads, ?device, kind = spec.kind.name(), "training");
    let summary = match spec.kind {
        JobKind::Pretrain => {
            let job = job_for(&a, &spec, Arc::clone(&stop), Some(observer))?;
            pretrain::run(&job, &mut collective)?
        }
        JobKind::Finetune => {
            let job = finetune_job_for(&a, &spec, Arc::clone(&stop), Some(observer))?;
            let outcome = finetune::run(&job, &mut collective)?;
            report_result(a.rank, &outcome);
            outcome.run.ok_or_else(|| Error::Service {
                what: "fine-tuning".into(),
                reason: "ended without a run summary".into(),
            })?
        }
        JobKind::Evaluate => {
            let job = evaluate_job_for(&a, &spec)?;
            let outcome = finetune::evaluate(&job, &mut collective)?;
            report_result(a.rank, &outcome);
            tracing::info!(report = %outcome.report, "evaluation finished");
            return Ok(());
        }
    };
    tracing::info!(
        steps = summary.steps,
        interrupted = summary.interrupted,
        checkpoint = %summary.checkpoint,
        seconds = summary.seconds,
        "rank finished"
    );
    if summary.interrupted {
        // Stopped before the end (SIGTERM: a stop order, a pod eviction): the attempt did not
        // finish, so the exit must not count as success; the job resumes from this checkpoint.
        return Err(Error::Service {
            what: "training".into(),
            reason: format!(
                "stopped on request after step {} of {}; checkpoint {}",
                summary.steps, summary.total_steps, summary.checkpoint
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(spec: &str, kind: &str) -> AssignmentFile {
        AssignmentFile {
            job_id: "j1".into(),
            generation: 2,
            rank: 1,
            world_size: 2,
            device_kind: kind.into(),
            device_index: 1,
            spec_json: spec.into(),
        }
    }

    #[test]
    fn assignments_map_to_runs() {
        let spec = JobSpec::from_json(
            r#"{"kind":"pretrain","data":{"uri":"/data/c","list":"l.csv","threads":3},
                "output":"s3://runs/x","model":{"preset":"tiny"},"max_steps":7,
                "resources":{"world_size":2,"device":"cpu"},"train":{"epochs":3,"batch_per_rank":2}}"#,
        )
        .unwrap();
        let a = assignment(&spec.to_json(), "cpu");
        let stop = Arc::new(AtomicBool::new(false));
        let job = job_for(&a, &spec, Arc::clone(&stop), None).unwrap();
        assert_eq!(job.data, StorageUri::parse("/data/c").unwrap());
        assert_eq!(job.list, "l.csv");
        assert_eq!(job.out.to_string(), "s3://runs/x");
        assert_eq!(job.preset.as_deref(), Some("tiny"));
        assert_eq!(job.model, endofm_shared::Preset::Tiny.config());
        assert_eq!(job.views, pretrain::views_for(&job.model));
        assert_eq!((job.train.epochs, job.train.batch_per_rank), (3, 2));
        assert_eq!(job.max_steps, Some(7));
        assert_eq!(job.data_threads, 3);
        assert_eq!(job.device, Device::Cpu);
        assert!(!job.progress && job.init.is_none() && job.observer.is_none());
        assert!(Arc::ptr_eq(&job.stop, &stop));
        let cuda = job_for(&assignment("", "cuda"), &spec, stop.clone(), None).unwrap();
        assert_eq!(cuda.device, Device::Cuda(1));
        let err = job_for(&assignment("", "tpu"), &spec, stop.clone(), None).unwrap_err();
        assert!(err.to_string().contains("tpu"), "{err}");
        let mut bad = assignment("", "cpu");
        bad.rank = 2;
        assert!(job_for(&bad, &spec, stop, None).is_err());
    }

    #[test]
    fn assignment_files_are_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        let spec = r#"{"kind":"pretrain","data":{"uri":"/d"},"output":"/o"}"#;
        std::fs::write(
            &path,
            serde_json::to_string(&assignment(spec, "cpu")).unwrap(),
        )
        .unwrap();
        let (a, s) = read_assignment(&path).unwrap();
        assert_eq!((a.rank, a.generation, s.output.as_str()), (1, 2, "/o"));
        std::fs::write(&path, "{}").unwrap();
        assert!(read_assignment(&path).is_err());
    }
}
