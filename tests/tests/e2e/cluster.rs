//! A real cluster on loopback for the end-to-end tests: the `endofm coordinator` process, any
//! number of `endofm-worker agent` processes, a generated corpus, and the `endofm` CLI as the
//! client. Every process is killed when the [`Cluster`] is dropped (also when a test panics).
//! Cluster tests take a process-wide lock: on a 2-core machine they must not overlap.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use endofm_tests::bin;
use serde_json::Value;

/// Heartbeat interval and lease of the test coordinators (short, so failures show fast).
pub const HEARTBEAT_MS: u64 = 200;
pub const LEASE_MS: u64 = 3000;
/// Backoff before the first restart of a failed attempt (the default, 5 s, would slow tests).
pub const RESTART_BACKOFF_MS: u64 = 300;

static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the cluster lock (poison-tolerant: one failed test must not fail the others).
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shared generated corpus: 8 clips of 16 frames, short side 64.
pub fn corpus() -> PathBuf {
    static CORPUS: OnceLock<PathBuf> = OnceLock::new();
    CORPUS
        .get_or_init(|| {
            let dir =
                std::env::temp_dir().join(format!("endofm-e2e-corpus-{}", std::process::id()));
            let out = Command::new(bin("endofm-worker").unwrap())
                .args(["synth", "--kind", "pretrain", "--out"])
                .arg(&dir)
                .args([
                    "--clips", "8", "--frames", "16", "--size", "64", "--seed", "3",
                ])
                .env("RUST_LOG", "warn")
                .output()
                .expect("running synth");
            assert!(
                out.status.success(),
                "synth failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            dir
        })
        .clone()
}

/// A job spec for the tiny preset on small views, fast on one CPU thread per rank.
pub fn tiny_spec(
    name: &str,
    out: &Path,
    data: &str,
    world: u32,
    extra_top: &str,
    train: &str,
) -> String {
    format!(
        r#"name = "{name}"
kind = "pretrain"
output = "{out}"
max_restarts = 3
collective_timeout_s = 4
{extra_top}
[data]
uri = "{data}"
threads = 1
[model]
preset = "tiny"
[views]
global_size = 48
local_size = 32
[resources]
world_size = {world}
device = "cpu"
threads_per_rank = 1
[train]
epochs = 4
batch_per_rank = 1
checkpoint_every = 2
log_every = 1
drop_path_rate = 0.0
{train}
"#,
        out = out.display()
    )
}

/// A free loopback port (free when asked).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A running cluster.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub metrics: String,
    port: u16,
    coordinator_args: Vec<String>,
    coordinator: Option<Child>,
    workers: Vec<Option<Child>>,
    worker_env: Vec<(String, String)>,
    pub worker_metrics: Vec<String>,
}

impl Cluster {
    /// A coordinator on a free port with a fresh state directory.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// [`Cluster::start`] with extra coordinator flags.
    pub fn start_with(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = Self {
            dir,
            url: String::new(),
            metrics: String::new(),
            port: 0,
            coordinator_args: args.iter().map(|a| a.to_string()).collect(),
            coordinator: None,
            workers: Vec::new(),
            worker_env: Vec::new(),
            worker_metrics: Vec::new(),
        };
        c.start_coordinator();
        c
    }

    /// Environment every worker started from now on gets (e.g. S3 settings).
    pub fn set_worker_env(&mut self, env: Vec<(String, String)>) {
        self.worker_env = env;
    }

    /// (Re)starts the coordinator on the same state directory and, after the first start,
    /// the same port.
    pub fn start_coordinator(&mut self) {
        let listen = format!("127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("coordinator.log"))
            .expect("log");
        let mut child = Command::new(bin("endofm").unwrap())
            .args([
                "coordinator",
                "--listen",
                &listen,
                "--metrics-listen",
                "127.0.0.1:0",
                "--state",
            ])
            .arg(self.dir.path().join("state"))
            .args([
                "--heartbeat-ms",
                &HEARTBEAT_MS.to_string(),
                "--lease-ms",
                &LEASE_MS.to_string(),
                "--restart-backoff-ms",
                &RESTART_BACKOFF_MS.to_string(),
            ])
            .args(&self.coordinator_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("starting the coordinator");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("reading the coordinator's address");
        let addr: Value = serde_json::from_str(line.trim()).unwrap_or_else(|e| {
            panic!(
                "coordinator did not start ({e}): {}",
                self.log("coordinator")
            )
        });
        let grpc = addr["grpc"].as_str().expect("grpc").to_string();
        self.port = grpc
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        self.url = format!("http://{grpc}");
        self.metrics = format!("http://{}", addr["metrics"].as_str().expect("metrics"));
        self.coordinator = Some(child);
    }

    /// Process id of the coordinator.
    pub fn coordinator_pid(&self) -> u32 {
        self.coordinator.as_ref().expect("coordinator running").id()
    }

    /// Waits up to `limit` for the coordinator to exit by itself: its exit status, or `None`
    /// when it is still running (it is left running).
    pub fn wait_coordinator(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < limit {
            let child = self.coordinator.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.coordinator = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// `kill -9` of the coordinator.
    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts an agent offering `devices` (`cpu`, `cpu:2`); returns its index.
    pub fn add_worker(&mut self, devices: &str) -> usize {
        let i = self.workers.len();
        let log =
            std::fs::File::create(self.dir.path().join(format!("worker-{i}.log"))).expect("log");
        let metrics = format!("127.0.0.1:{}", free_port());
        let child = Command::new(bin("endofm-worker").unwrap())
            .args([
                "agent",
                "--coordinator",
                &self.url,
                "--devices",
                devices,
                "--metrics-listen",
                &metrics,
            ])
            .args(["--stop-grace-s", "2"])
            .envs(
                self.worker_env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting an agent");
        self.workers.push(Some(child));
        self.worker_metrics.push(format!("http://{metrics}"));
        i
    }

    /// Process id of agent `i`.
    pub fn worker_pid(&self, i: usize) -> u32 {
        self.workers[i].as_ref().expect("worker alive").id()
    }

    /// `kill -9` of agent `i`.
    pub fn kill_worker(&mut self, i: usize) {
        if let Some(mut c) = self.workers[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A log file's text (`coordinator`, `worker-0`, ...).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Every log, for failure messages.
    pub fn logs(&self) -> String {
        let mut text = format!(
            "--- coordinator ---\n{}",
            tail(&self.log("coordinator"), 60)
        );
        for i in 0..self.workers.len() {
            text += &format!(
                "\n--- worker-{i} ---\n{}",
                tail(&self.log(&format!("worker-{i}")), 60)
            );
        }
        text
    }

    /// Runs the `endofm` CLI against this coordinator.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("endofm").unwrap())
            .arg("--coordinator")
            .arg(&self.url)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("running endofm")
    }

    /// Submits a spec (TOML text); returns the job id.
    pub fn submit(&self, spec: &str) -> String {
        let path = self.dir.path().join(format!("spec-{}.toml", endofm_now()));
        std::fs::write(&path, spec).expect("spec");
        let out = self.cli(&["submit", path.to_str().expect("utf-8")]);
        assert!(
            out.status.success(),
            "submit failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `endofm status ID --json`.
    pub fn status(&self, id: &str) -> Value {
        let out = self.cli(&["status", id, "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// The job's events (`endofm logs ID`), as lines.
    pub fn events(&self, id: &str) -> Vec<String> {
        let out = self.cli(&["logs", id]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Polls the job until `pred` holds, panicking with the logs after `limit`.
    pub fn wait_until(
        &self,
        id: &str,
        limit: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let started = Instant::now();
        loop {
            let out = self.cli(&["status", id, "--json"]);
            if out.status.success() {
                let job: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
                if pred(&job) {
                    return job;
                }
                if started.elapsed() > limit {
                    panic!(
                        "{id}: not {what} within {limit:?}; last status {job}\nevents:\n{}\n{}",
                        self.events(id).join("\n"),
                        self.logs()
                    );
                }
            } else if started.elapsed() > limit {
                panic!(
                    "{id}: status failed: {}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    /// `endofm wait ID`: (exit code, final status).
    pub fn wait(&self, id: &str, limit: Duration) -> (i32, Value) {
        let out = self.cli(&["wait", id, "--timeout-s", &limit.as_secs_f64().to_string()]);
        let code = out.status.code().unwrap_or(-1);
        if code == 2 {
            panic!(
                "{id}: wait failed: {}\nevents:\n{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.events(id).join("\n"),
                self.logs()
            );
        }
        (code, self.status(id))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for w in self.workers.iter_mut().flatten() {
            let _ = w.kill();
            let _ = w.wait();
        }
        self.kill_coordinator();
    }
}

fn endofm_now() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The last `n` lines of a text.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Child processes of `pid` (from /proc).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state, ppid, ...
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                .map(|st| st != "Z")
        })
        .unwrap_or(false)
}

/// Sends a signal with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

/// An HTTP GET body.
pub fn http_get(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "10", url])
        .output()
        .expect("curl");
    assert!(out.status.success(), "GET {url} failed");
    String::from_utf8_lossy(&out.stdout).to_string()
}
