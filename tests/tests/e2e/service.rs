//! The distributed service end to end: a real coordinator, real worker agents and their rank
//! processes on loopback, driven through the `endofm` CLI. Failures are real: `kill -9`,
//! SIGSTOP, a coordinator killed and restarted on its state directory.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{self, Cluster, alive, children_of, corpus, serial, signal, tiny_spec};

const LONG: Duration = Duration::from_secs(240);

fn state(job: &Value) -> &str {
    job["state"].as_str().unwrap_or("")
}

fn step(job: &Value) -> u64 {
    job["progress"]["step"].as_u64().unwrap_or(0)
}

fn python() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")
}

/// How two safetensors files differ.
struct Comparison {
    /// Largest |a-b| / max|b| over the tensors.
    worst: f64,
    /// Tensors compared.
    tensors: usize,
    /// The worst tensor, described.
    at: String,
    /// Tensors where |a - b| > 1e-4 · max|b| + 1e-6 ("; "-separated, empty when none).
    outside: String,
}

fn compare(a: &Path, b: &Path) -> Comparison {
    let code = r#"
import sys
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys()))
worst, key, bad = 0.0, "", []
for k in a:
    x, y = a[k].double(), b[k].double()
    d, scale = (x - y).abs().max().item(), y.abs().max().item()
    if d / max(scale, 1e-12) > worst:
        worst, key = d / max(scale, 1e-12), "%s (max abs diff %.3e, scale %.3e)" % (k, d, scale)
    if d > 1e-4 * scale + 1e-6:
        bad.append("%s: %.3e" % (k, d))
print(worst, len(a))
print(key)
print("; ".join(bad))
"#;
    let out = Command::new(python())
        .args(["-c", code])
        .arg(a)
        .arg(b)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    let mut first = lines.next().unwrap_or("").split_whitespace();
    Comparison {
        worst: first.next().and_then(|v| v.parse().ok()).expect("diff"),
        tensors: first.next().and_then(|v| v.parse().ok()).expect("count"),
        at: lines.next().unwrap_or("").to_string(),
        outside: lines.next().unwrap_or("").trim().to_string(),
    }
}

/// A cluster with one `cpu:2` agent running a two-rank tiny job: (cluster, agent, job, output).
fn two_rank_job(name: &str, top: &str) -> (Cluster, usize, String, std::path::PathBuf) {
    let mut c = Cluster::start();
    let w = c.add_worker("cpu:2");
    let out = c.dir.path().join("out");
    let id = c.submit(&tiny_spec(
        name,
        &out,
        corpus().to_str().unwrap(),
        2,
        top,
        "",
    ));
    (c, w, id, out)
}

fn final_checkpoint(out: &Path) -> std::path::PathBuf {
    let mut steps: Vec<_> = std::fs::read_dir(out.join("checkpoints"))
        .expect("checkpoints")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    steps.sort();
    steps.pop().expect("a committed checkpoint")
}

#[test]
fn two_ranks_stay_identical_and_match_one_rank_on_the_same_global_batch() {
    let _serial = serial();
    let mut c = Cluster::start();
    let digests = c.dir.path().join("digests");
    std::fs::create_dir_all(&digests).unwrap();
    c.set_worker_env(vec![(
        "ENDOFM_PARAM_DIGESTS".into(),
        digests.display().to_string(),
    )]);
    c.add_worker("cpu:2");
    let data = corpus();
    let two = c.dir.path().join("two");
    let one = c.dir.path().join("one");
    let id2 = c.submit(&tiny_spec(
        "two",
        &two,
        data.to_str().unwrap(),
        2,
        "max_steps = 6",
        "",
    ));
    let (code, job) = c.wait(&id2, LONG);
    assert_eq!(code, 0, "{job}");
    assert_eq!(state(&job), "succeeded");
    assert_eq!(job["generation"], 1);
    // Bit-identical parameters on both ranks after every step.
    let read =
        |r: u32| std::fs::read_to_string(digests.join(format!("rank-{r}.txt"))).unwrap_or_default();
    let (d0, d1) = (read(0), read(1));
    assert_eq!(d0.lines().count(), 6, "one digest per step:\n{d0}");
    assert_eq!(d0, d1, "rank parameters diverged");
    // One rank with the whole global batch ends at the same parameters (within fp tolerance).
    let spec = tiny_spec("one", &one, data.to_str().unwrap(), 1, "max_steps = 6", "")
        .replace("batch_per_rank = 1", "batch_per_rank = 2");
    let id1 = c.submit(&spec);
    let (code, job) = c.wait(&id1, LONG);
    assert_eq!(code, 0, "{job}");
    let (a, b) = (final_checkpoint(&two), final_checkpoint(&one));
    assert_eq!(a.file_name(), b.file_name());
    // Tolerance per tensor: |a - b| <= 1e-4 * max|b| + 1e-6. The absolute part covers
    // zero-initialised tensors (biases), where summation-order noise of ~1e-9 is all there is.
    let cmp = compare(
        &a.join("student.safetensors"),
        &b.join("student.safetensors"),
    );
    println!(
        "two ranks vs one rank: worst relative difference {:.3e} over {} tensors at {}",
        cmp.worst, cmp.tensors, cmp.at
    );
    assert!(
        cmp.outside.is_empty(),
        "outside |a-b| <= 1e-4 max|b| + 1e-6: {}",
        cmp.outside
    );
}

#[test]
fn killed_worker_restarts_the_job_from_its_last_checkpoint() {
    let _serial = serial();
    let mut c = Cluster::start();
    let w0 = c.add_worker("cpu");
    let w1 = c.add_worker("cpu");
    let out = c.dir.path().join("out");
    let id = c.submit(&tiny_spec(
        "kill9",
        &out,
        corpus().to_str().unwrap(),
        2,
        "max_steps = 14",
        "",
    ));
    let job = c.wait_until(&id, LONG, "past a checkpoint", |j| {
        j["last_checkpoint"]["step"].as_u64().unwrap_or(0) >= 2 && step(j) >= 3
    });
    // Kill one of the two workers (each holds one rank); a spare takes its place, as a
    // Kubernetes StatefulSet would bring the pod back.
    let _ = (job, w1);
    let victim = w0;
    let orphans = children_of(c.worker_pid(victim));
    assert_eq!(orphans.len(), 1, "one rank process under the victim agent");
    let step_at_kill = step(&c.status(&id));
    c.add_worker("cpu");
    c.kill_worker(victim);
    let (code, done) = c.wait(&id, LONG);
    let events = c.events(&id).join("\n");
    assert_eq!(code, 0, "{done}\n{events}");
    assert!(done["generation"].as_u64().unwrap() >= 2, "{done}");
    assert!(
        events.contains("worker_lost") || events.contains("rank_failed"),
        "{events}"
    );
    // The restart resumed from a checkpoint no older than one interval before the kill.
    let resumed: u64 = events
        .lines()
        .find_map(|l| l.split("from checkpoint step ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no resume step in the events:\n{events}"));
    assert!(
        step_at_kill <= resumed + 2 + 1,
        "killed at step {step_at_kill}, resumed from {resumed}"
    );
    // The killed agent's rank process did not outlive it (it exits when its stdin closes).
    for pid in orphans {
        assert!(!alive(pid), "rank {pid} outlived its agent");
    }
}

#[test]
fn stopped_rank_fails_the_attempt_within_the_deadline_and_the_job_recovers() {
    let _serial = serial();
    let (c, w, id, _) = two_rank_job("sigstop", "max_steps = 8");
    c.wait_until(&id, LONG, "training", |j| step(j) >= 2);
    let ranks = children_of(c.worker_pid(w));
    assert_eq!(ranks.len(), 2, "two rank processes");
    let stopped = *ranks.iter().max().unwrap();
    signal(stopped, "STOP");
    let stopped_at = Instant::now();
    let failed = c.wait_until(&id, Duration::from_secs(60), "restarted", |j| {
        j["generation"].as_u64() >= Some(2) || j["restarts"].as_u64() >= Some(1)
    });
    let took = stopped_at.elapsed();
    // Collective deadline 4 s, plus heartbeats and process start: well under 30 s.
    assert!(
        took < Duration::from_secs(30),
        "attempt failure took {took:?}: {failed}"
    );
    let (code, done) = c.wait(&id, LONG);
    if alive(stopped) {
        signal(stopped, "CONT");
    }
    assert_eq!(code, 0, "{done}\n{}", c.events(&id).join("\n"));
    assert!(done["generation"].as_u64().unwrap() >= 2);
}

#[test]
fn coordinator_killed_and_restarted_keeps_every_job_and_finishes_the_running_one() {
    let _serial = serial();
    let mut c = Cluster::start();
    c.add_worker("cpu:2");
    let out = c.dir.path().join("out");
    let data = corpus();
    let id = c.submit(&tiny_spec(
        "survivor",
        &out,
        data.to_str().unwrap(),
        2,
        "max_steps = 10",
        "",
    ));
    let queued = c.submit(&tiny_spec(
        "waiting",
        &c.dir.path().join("out2"),
        data.to_str().unwrap(),
        2,
        "max_steps = 6",
        "",
    ));
    c.wait_until(&id, LONG, "training", |j| step(j) >= 2);
    let events_before = c.events(&id);
    c.kill_coordinator();
    std::thread::sleep(Duration::from_millis(500));
    c.start_coordinator();
    let events_after = c.events(&id);
    assert!(events_after.len() >= events_before.len());
    assert_eq!(
        events_after[..events_before.len()],
        events_before[..],
        "history changed"
    );
    assert_eq!(state(&c.status(&queued)), "queued");
    let (code, done) = c.wait(&id, LONG);
    assert_eq!(code, 0, "{done}\n{}", c.events(&id).join("\n"));
    // The running attempt went on (workers reconnected) rather than restarting.
    assert_eq!(done["generation"], 1, "{}", c.events(&id).join("\n"));
    let (code, _) = c.wait(&queued, LONG);
    assert_eq!(code, 0);
}

#[test]
fn gang_scheduling_and_priorities() {
    let _serial = serial();
    let mut c = Cluster::start();
    c.add_worker("cpu");
    c.add_worker("cpu");
    let data = corpus();
    let d = data.to_str().unwrap();
    let big = c.submit(&tiny_spec("three", &c.dir.path().join("a"), d, 3, "", ""));
    std::thread::sleep(Duration::from_secs(2));
    let job = c.status(&big);
    assert_eq!(state(&job), "queued", "{job}");
    assert_eq!(
        job["placement"].as_array().map(Vec::len),
        Some(0),
        "no partial placement"
    );
    c.add_worker("cpu");
    c.wait_until(&big, Duration::from_secs(30), "running", |j| {
        state(j) == "running"
    });
    // While it runs: a low-priority and then a high-priority job of the same size queue up.
    let low = c.submit(&tiny_spec(
        "low",
        &c.dir.path().join("b"),
        d,
        3,
        "priority = 0\nmax_steps = 2",
        "",
    ));
    let high = c.submit(&tiny_spec(
        "high",
        &c.dir.path().join("c"),
        d,
        3,
        "priority = 10\nmax_steps = 2",
        "",
    ));
    let out = c.cli(&["cancel", &big]);
    assert!(out.status.success());
    c.wait_until(&high, Duration::from_secs(60), "running", |j| {
        state(j) != "queued"
    });
    let low_now = c.status(&low);
    assert_eq!(
        state(&low_now),
        "queued",
        "the high-priority job goes first: {low_now}"
    );
    let (code, _) = c.wait(&high, LONG);
    assert_eq!(code, 0);
    let (code, _) = c.wait(&low, LONG);
    assert_eq!(code, 0);
}

#[test]
fn cancel_stops_every_rank_and_keeps_the_last_checkpoint() {
    let _serial = serial();
    let (c, w, id, out) = two_rank_job("cancel", "");
    c.wait_until(&id, LONG, "checkpointed", |j| {
        j["last_checkpoint"]["step"].as_u64().unwrap_or(0) >= 2
    });
    assert_eq!(children_of(c.worker_pid(w)).len(), 2);
    let started = Instant::now();
    let out_cancel = c.cli(&["cancel", &id, "--reason", "test"]);
    assert!(out_cancel.status.success());
    let (code, job) = c.wait(&id, Duration::from_secs(30));
    assert_eq!(code, 3, "wait exits 3 for a cancelled job");
    assert_eq!(state(&job), "cancelled");
    while !children_of(c.worker_pid(w)).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "ranks still running 10 s after cancel"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("ranks stopped {:?} after cancel", started.elapsed());
    let last = final_checkpoint(&out);
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(last.join("manifest.json")).unwrap())
            .unwrap();
    assert!(manifest.is_object());
    let student = last.join("student.safetensors");
    let cmp = compare(&student, &student);
    assert!(cmp.worst == 0.0 && cmp.tensors > 10, "checkpoint readable");
}

#[test]
fn invalid_specs_are_refused_with_the_field_named_and_nothing_is_queued() {
    let _serial = serial();
    let c = Cluster::start();
    let out = c.dir.path().join("out");
    let good = tiny_spec("bad", &out, "/data", 1, "", "");
    let cases = [
        (
            good.replace("preset = \"tiny\"", "preset = \"giant\""),
            "model.preset",
        ),
        (
            good.replace("world_size = 1", "world_size = 0"),
            "resources.world_size",
        ),
        (
            good.replace("uri = \"/data\"", "uri = \"ftp://host/data\""),
            "data.uri",
        ),
        (
            good.replace("drop_path_rate = 0.0", "drop_path_rate = 0.0\nlr = -0.5"),
            "train.lr",
        ),
        (
            good.replace("max_restarts = 3", "max_restarts = 3\ncolour = \"red\""),
            "colour",
        ),
    ];
    for (spec, field) in cases {
        let path = c.dir.path().join("bad.toml");
        std::fs::write(&path, &spec).unwrap();
        let out = c.cli(&["submit", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{field}: accepted");
        assert!(err.contains(field), "{field}: {err}");
    }
    let out = c.cli(&["jobs", "--json"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "something was queued"
    );
}

/// A moto S3 server on loopback (from `.cache/moto-venv`, made by scripts/setup.sh).
struct Moto {
    child: std::process::Child,
    endpoint: String,
}

impl Moto {
    fn start(dir: &Path) -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/moto-venv/bin");
        let exe = root.join("moto_server");
        assert!(
            exe.is_file(),
            "moto missing at {}: run scripts/setup.sh",
            exe.display()
        );
        let port = cluster::free_port();
        let log = std::fs::File::create(dir.join("moto.log")).unwrap();
        let child = Command::new(exe)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("moto");
        let endpoint = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while Command::new("curl")
            .args(["-sf", "-o", "/dev/null", &endpoint])
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "moto did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { child, endpoint }
    }

    fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", "endofm-test"),
            ("AWS_SECRET_ACCESS_KEY", "endofm-test"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Runs boto3 (moto's dependency) with `code`; stdout.
    fn boto(&self, code: &str, args: &[&str]) -> String {
        let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/moto-venv/bin/python");
        let prelude = format!(
            "import boto3, sys, os\ns3 = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', aws_access_key_id='x', aws_secret_access_key='x')\n",
            self.endpoint
        );
        let out = Command::new(py)
            .arg("-c")
            .arg(prelude + code)
            .args(args)
            .output()
            .expect("python");
        assert!(
            out.status.success(),
            "boto3: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn corpus_and_checkpoints_on_a_real_s3_server() {
    let _serial = serial();
    let mut c = Cluster::start();
    let s3 = Moto::start(c.dir.path());
    s3.boto(
        "s3.create_bucket(Bucket='corpus')\ns3.create_bucket(Bucket='runs')\nroot = sys.argv[1]\nfor d, _, files in os.walk(root):\n    for f in files:\n        p = os.path.join(d, f)\n        s3.upload_file(p, 'corpus', 'endo/' + os.path.relpath(p, root))\n",
        &[corpus().to_str().unwrap()],
    );
    c.set_worker_env(s3.env());
    c.add_worker("cpu:2");
    let id = c.submit(&tiny_spec(
        "s3",
        Path::new("s3://runs/job"),
        "s3://corpus/endo",
        2,
        "max_steps = 4",
        "",
    ));
    let (code, job) = c.wait(&id, LONG);
    assert_eq!(code, 0, "{job}\n{}", c.events(&id).join("\n"));
    assert_eq!(
        job["last_checkpoint"]["uri"]
            .as_str()
            .map(|u| u.starts_with("s3://runs/job/checkpoints/")),
        Some(true),
        "{job}"
    );
    let keys = s3.boto(
        "print('\\n'.join(o['Key'] for o in s3.list_objects_v2(Bucket='runs')['Contents']))",
        &[],
    );
    assert!(
        keys.contains("job/checkpoints/step-000000004/manifest.json"),
        "{keys}"
    );
    assert!(
        keys.contains("job/metrics.jsonl") && keys.contains("job/config.json"),
        "{keys}"
    );
}

fn promtool_check(text: &str, what: &str) {
    let promtool = which("promtool")
        .expect("promtool (Debian package prometheus; scripts/setup.sh installs it)");
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics on the {what}:\n{report}\n{text}"
    );
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

#[test]
fn metrics_are_valid_prometheus_and_scraped_by_prometheus() {
    let _serial = serial();
    let mut c = Cluster::start();
    c.add_worker("cpu:2");
    let id = c.submit(&tiny_spec(
        "metrics",
        &c.dir.path().join("out"),
        corpus().to_str().unwrap(),
        2,
        "max_steps = 8",
        "",
    ));
    // The ranks' series while they run.
    let started = Instant::now();
    let worker = loop {
        // (The agent's endpoint may not be up yet: a failed GET is just not there yet.)
        let got = Command::new("curl")
            .args(["-sf", "--max-time", "5"])
            .arg(format!("{}/metrics", c.worker_metrics[0]))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&got.stdout).to_string();
        if text.contains("endofm_step_seconds_bucket{") && text.contains("endofm_loss{") {
            break text;
        }
        assert!(
            started.elapsed() < LONG,
            "no per-rank series while the job ran:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let (code, _) = c.wait(&id, LONG);
    assert_eq!(code, 0);
    // Issue 11 item 10: once the ranks exited, none of the job's series remain.
    let after = cluster::http_get(&format!("{}/metrics", c.worker_metrics[0]));
    let left: Vec<&str> = after
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(&format!("job=\"{id}\"")))
        .collect();
    assert!(left.is_empty(), "series of an ended job remain: {left:#?}");
    assert!(after.contains("endofm_worker_ranks_running 0"), "{after}");
    let coordinator = cluster::http_get(&format!("{}/metrics", c.metrics));
    for name in [
        "endofm_jobs{state=\"succeeded\"} 1",
        "endofm_queue_depth",
        "endofm_workers_alive 1",
        "endofm_placements_total 1",
        "endofm_rpc_duration_seconds_bucket",
        "endofm_scheduling_latency_seconds_count 1",
    ] {
        assert!(coordinator.contains(name), "{name} missing:\n{coordinator}");
    }
    promtool_check(&coordinator, "coordinator");
    for name in [
        "endofm_steps_total",
        "endofm_step_seconds_bucket",
        "endofm_loss",
        "endofm_allreduce_bytes_total",
        "endofm_samples_per_second",
    ] {
        assert!(worker.contains(name), "{name} missing:\n{worker}");
    }
    promtool_check(&worker, "worker");
    // A real Prometheus scrapes both.
    let Some(prometheus) = which("prometheus") else {
        panic!(
            "prometheus server missing (Debian package prometheus; scripts/setup.sh installs it)"
        );
    };
    let port = cluster::free_port();
    let config = c.dir.path().join("prometheus.yml");
    let strip = |u: &str| u.trim_start_matches("http://").to_string();
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: coordinator\n    static_configs:\n      - targets: ['{}']\n  - job_name: worker\n    static_configs:\n      - targets: ['{}']\n",
            strip(&c.metrics),
            strip(&c.worker_metrics[0])
        ),
    )
    .unwrap();
    let mut server = Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            c.dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(c.dir.path().join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus");
    let started = Instant::now();
    let query = format!("http://127.0.0.1:{port}/api/v1/query?query=up");
    let result = loop {
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "5", &query])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let ups = text.matches("\"1\"]").count();
        if ups >= 2 {
            break text;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = server.kill();
            panic!(
                "prometheus did not scrape both targets: {text}\n{}",
                std::fs::read_to_string(c.dir.path().join("prometheus.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let series = Command::new("curl")
        .args([
            "-sf",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{port}/api/v1/query?query=endofm_workers_alive"),
        ])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        String::from_utf8_lossy(&series.stdout).contains("endofm_workers_alive"),
        "{result}"
    );
}

#[test]
fn a_higher_priority_job_preempts_a_lower_one_which_resumes_from_its_checkpoint() {
    let _serial = serial();
    let mut c = Cluster::start_with(&["--preempt"]);
    c.add_worker("cpu:2");
    let d = corpus();
    let d = d.to_str().unwrap();
    let low = c.submit(&tiny_spec(
        "low",
        &c.dir.path().join("low"),
        d,
        2,
        "max_steps = 12",
        "",
    ));
    c.wait_until(&low, LONG, "checkpointed", |j| {
        j["last_checkpoint"]["step"].as_u64().unwrap_or(0) >= 2 && step(j) >= 3
    });
    let high = c.submit(&tiny_spec(
        "high",
        &c.dir.path().join("high"),
        d,
        2,
        "priority = 5\nmax_steps = 2",
        "",
    ));
    let (code, done) = c.wait(&high, LONG);
    assert_eq!(code, 0, "{done}");
    let (code, low_done) = c.wait(&low, LONG);
    let events = c.events(&low).join("\n");
    assert_eq!(code, 0, "{low_done}\n{events}");
    assert!(events.contains("preempted by"), "{events}");
    assert!(low_done["generation"].as_u64().unwrap() >= 2, "{low_done}");
    assert_eq!(
        low_done["restarts"], 0,
        "preemption does not use a restart: {low_done}"
    );
    // The high-priority job started before the low one's second attempt.
    let high_job = c.status(&high);
    assert!(high_job["started_unix_ms"].as_i64() <= low_done["finished_unix_ms"].as_i64());
}
