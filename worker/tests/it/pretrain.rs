//! Pre-training through the command line on generated corpora: resume equals uninterrupted,
//! the loss goes down, bad input is refused before any work with the field named.

use std::path::{Path, PathBuf};

use endofm_worker::model::weights;

use crate::support::{self, corpus};

/// Small views so that CPU steps take a fraction of a second.
fn run_config(dir: &Path, train: &str) -> PathBuf {
    let path = dir.join("run.json");
    std::fs::write(
        &path,
        format!(r#"{{"train": {train}, "views": {{"global_size": 48, "local_size": 32}}}}"#),
    )
    .unwrap();
    path
}

fn pretrain(data: &Path, out: &Path, config: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "pretrain",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--preset",
        "tiny",
        "--config",
        config.to_str().unwrap(),
        "--threads",
        "1",
        "--data-threads",
        "2",
        "--progress",
        "never",
    ];
    args.extend_from_slice(extra);
    let stdout = support::worker_ok(&args);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("summary is not JSON ({e}): {stdout}"))
}

fn final_student(out: &Path, step: usize) -> std::collections::BTreeMap<String, tch::Tensor> {
    weights::read(&out.join(format!("checkpoints/step-{step:09}/student.safetensors"))).unwrap()
}

#[test]
fn interrupted_and_resumed_equals_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 6, 16, 64, 3);
    let config = run_config(
        dir.path(),
        r#"{"epochs": 2, "batch_per_rank": 2, "lr": 0.05, "warmup_epochs": 1, "checkpoint_every": 2, "seed": 5}"#,
    );

    let straight = dir.path().join("straight");
    let s = pretrain(&data, &straight, &config, &[]);
    assert_eq!(s["steps"], 6);

    let resumed = dir.path().join("resumed");
    let first = pretrain(&data, &resumed, &config, &["--max-steps", "3"]);
    assert_eq!(
        (first["started_at"].as_u64(), first["steps"].as_u64()),
        (Some(0), Some(3))
    );
    let second = pretrain(&data, &resumed, &config, &[]);
    assert_eq!(
        (second["started_at"].as_u64(), second["steps"].as_u64()),
        (Some(3), Some(6))
    );

    let (a, b) = (final_student(&straight, 6), final_student(&resumed, 6));
    assert_eq!(a.len(), b.len());
    let differing: Vec<&String> = a.keys().filter(|k| !a[*k].equal(&b[*k])).collect();
    assert!(
        differing.is_empty(),
        "parameters differ after resume: {differing:?}"
    );
    let t_a =
        weights::read(&straight.join("checkpoints/step-000000006/teacher.safetensors")).unwrap();
    let t_b =
        weights::read(&resumed.join("checkpoints/step-000000006/teacher.safetensors")).unwrap();
    assert!(
        t_a.keys().all(|k| t_a[k].equal(&t_b[k])),
        "teachers differ after resume"
    );

    // Metrics cover every step exactly once, and the resolved config sits next to them.
    let metrics = std::fs::read_to_string(resumed.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![0, 1, 2, 3, 4, 5]);
    let resolved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(resumed.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(resolved["train"]["seed"], 5);
    assert_eq!(resolved["model"]["embed_dim"], 192);

    // A finished run rerun does nothing and says so.
    let again = pretrain(&data, &resumed, &config, &[]);
    assert_eq!(again["started_at"], 6);
}

/// With the centre held at zero (centre momentum 1) the teacher's targets move only by the EMA,
/// so the loss measures how well the student learns to predict them across views; early in a
/// run the moving centre otherwise raises the teacher's entropy and masks that.
#[test]
fn loss_goes_down_on_a_generated_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 8, 16, 64, 11);
    let config = run_config(
        dir.path(),
        r#"{"epochs": 4, "batch_per_rank": 4, "lr": 0.02, "warmup_epochs": 0, "min_lr": 0.001, "freeze_last_layer": 0, "checkpoint_every": 0, "center_momentum": 1.0}"#,
    );
    let out = dir.path().join("run");
    pretrain(&data, &out, &config, &[]);
    let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 8);
    let head: f64 = losses[..2].iter().sum::<f64>() / 2.0;
    let tail: f64 = losses[losses.len() - 2..].iter().sum::<f64>() / 2.0;
    assert!(tail < head - 0.1, "loss did not go down: {losses:?}");
}

#[test]
fn bad_input_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 2, 8, 48, 1);
    let out = dir.path().join("out");
    let run = |config: &Path, data: &str, out: &str, extra: &[&str]| {
        let mut args = vec![
            "pretrain",
            "--data",
            data,
            "--out",
            out,
            "--config",
            config.to_str().unwrap(),
            "--progress",
            "never",
        ];
        args.extend_from_slice(extra);
        support::worker_err(&args)
    };
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let good = run_config(dir.path(), r#"{"epochs": 1, "batch_per_rank": 1}"#);

    let bad_lr = dir.path().join("bad_lr.json");
    std::fs::write(&bad_lr, r#"{"train": {"lr": -0.1}}"#).unwrap();
    let e = run(&bad_lr, d, o, &["--preset", "tiny"]);
    assert!(e.contains("`lr`"), "{e}");
    let typo = dir.path().join("typo.json");
    std::fs::write(&typo, r#"{"train": {"epohcs": 3}}"#).unwrap();
    let e = run(&typo, d, o, &["--preset", "tiny"]);
    assert!(e.contains("epohcs"), "{e}");
    let view = dir.path().join("view.json");
    std::fs::write(&view, r#"{"views": {"flip_p": 2.0}}"#).unwrap();
    let e = run(&view, d, o, &["--preset", "tiny"]);
    assert!(e.contains("flip_p"), "{e}");
    let e = run(&good, d, o, &["--preset", "vit_huge"]);
    assert!(e.contains("vit_huge"), "{e}");
    let e = run(&good, d, o, &[]);
    assert!(e.contains("--preset"), "{e}");

    // An initialisation folder without a student names the user's folder and what it holds.
    let teacher_only = dir.path().join("teacher-only");
    std::fs::create_dir_all(&teacher_only).unwrap();
    std::fs::copy(
        support::tiny().join("weights.safetensors"),
        teacher_only.join("teacher.safetensors"),
    )
    .unwrap();
    let e = run(
        &good,
        d,
        o,
        &["--preset", "tiny", "--init", teacher_only.to_str().unwrap()],
    );
    assert!(
        e.contains(teacher_only.to_str().unwrap()) && e.contains("student.safetensors"),
        "{e}"
    );
    assert!(e.contains("teacher.safetensors"), "what it holds: {e}");

    // An output holding another run's report and no checkpoints is not taken over.
    let results = dir.path().join("evaluation");
    std::fs::create_dir_all(&results).unwrap();
    std::fs::write(results.join("report.json"), "{}").unwrap();
    let e = run(&good, d, results.to_str().unwrap(), &["--preset", "tiny"]);
    assert!(e.contains("report.json but no checkpoints"), "{e}");
    assert_eq!(
        std::fs::read_to_string(results.join("report.json")).unwrap(),
        "{}"
    );

    // Missing corpus, empty corpus, a corpus smaller than one batch, a bad URI.
    let e = run(&good, "/no/such/corpus", o, &["--preset", "tiny"]);
    assert!(e.contains("/no/such/corpus"), "{e}");
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("train.csv"), "\n").unwrap();
    let e = run(&good, empty.to_str().unwrap(), o, &["--preset", "tiny"]);
    assert!(e.contains("lists no clips"), "{e}");
    let e = run(&good, d, o, &["--preset", "tiny", "--batch", "3"]);
    assert!(e.contains("fewer than one global batch"), "{e}");
    let e = run(&good, "ftp://host/x", o, &["--preset", "tiny"]);
    assert!(e.contains("ftp"), "{e}");

    // An output location that cannot be written.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let e = run(
        &good,
        d,
        blocker.join("out").to_str().unwrap(),
        &["--preset", "tiny"],
    );
    assert!(e.contains("file/out") || e.contains("file"), "{e}");

    // Nothing was started: no checkpoint anywhere.
    assert!(!out.join("checkpoints").exists());
}

/// SIGTERM (a Kubernetes eviction) stops a run at the next step with a checkpoint; rerunning the
/// same command resumes from it.
#[test]
fn sigterm_checkpoints_and_the_run_resumes() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 4, 16, 64, 9);
    let config = run_config(
        dir.path(),
        r#"{"epochs": 500, "batch_per_rank": 2, "checkpoint_every": 0}"#,
    );
    let out = dir.path().join("run");
    let args = [
        "pretrain",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--preset",
        "tiny",
        "--config",
        config.to_str().unwrap(),
        "--threads",
        "1",
        "--data-threads",
        "1",
        "--progress",
        "never",
        "--log-format",
        "json",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_endofm-worker"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        let is_step = line.contains("\"message\":\"step\"");
        seen.push(line);
        if is_step
            && seen
                .iter()
                .filter(|l| l.contains("\"message\":\"step\""))
                .count()
                >= 2
        {
            break;
        }
    }
    let sent = std::time::Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    assert!(
        sent.elapsed().as_secs() < 60,
        "took {:?} to stop",
        sent.elapsed()
    );
    assert!(
        output.status.success(),
        "exit {:?}; log:\n{}",
        output.status,
        seen.join("\n")
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["interrupted"], true, "{summary}");
    let stopped_at = summary["steps"].as_u64().unwrap() as usize;
    assert!((2..1000).contains(&stopped_at), "{summary}");
    assert!(
        out.join(format!("checkpoints/step-{stopped_at:09}/manifest.json"))
            .is_file()
    );

    let resumed = pretrain(
        &data,
        &out,
        &config,
        &["--max-steps", &(stopped_at + 1).to_string()],
    );
    assert_eq!(
        resumed["started_at"].as_u64(),
        Some(stopped_at as u64),
        "{resumed}"
    );
    assert_eq!(resumed["steps"].as_u64(), Some(stopped_at as u64 + 1));
}

/// A fresh run starts from given weights: a safetensors file (teacher = copy) or a published-style
/// PyTorch checkpoint (student and teacher dicts, converted on the fly).
#[test]
fn runs_start_from_given_weights() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 2, 16, 64, 5);
    let config = run_config(
        dir.path(),
        r#"{"epochs": 1, "batch_per_rank": 2, "checkpoint_every": 0}"#,
    );
    let reference = support::tiny().join("weights.safetensors");
    let init = weights::read(&reference).unwrap();
    let close_to_init = |path: PathBuf, what: &str| {
        let got = weights::read(&path).unwrap();
        assert_eq!(got.len(), init.len());
        for (k, v) in &init {
            let diff = (&got[k] - v).abs().max().double_value(&[]);
            let scale = v.abs().max().double_value(&[]).max(1e-3);
            assert!(
                diff <= 0.05 * scale,
                "{what}: {k} moved by {diff} (scale {scale}): not started from the given weights"
            );
        }
    };

    let out = dir.path().join("from_safetensors");
    let s = pretrain(
        &data,
        &out,
        &config,
        &["--init", reference.to_str().unwrap()],
    );
    assert_eq!(s["steps"], 1);
    // One step with momentum 0.996 keeps the teacher within a hair of its start.
    close_to_init(
        out.join("checkpoints/step-000000001/teacher.safetensors"),
        "teacher",
    );

    let pth = dir.path().join("published.pth");
    support::run_python(
        "import sys, torch\nfrom safetensors.torch import load_file\nsd = load_file(sys.argv[1])\ntorch.save({'student': {'module.' + k: v for k, v in sd.items()}, 'teacher': sd, 'epoch': 3}, sys.argv[2])",
        &[reference.to_str().unwrap(), pth.to_str().unwrap()],
    );
    let out = dir.path().join("from_pth");
    pretrain(&data, &out, &config, &["--init", pth.to_str().unwrap()]);
    close_to_init(
        out.join("checkpoints/step-000000001/teacher.safetensors"),
        "teacher from .pth",
    );

    let e = support::worker_err(&[
        "pretrain",
        "--data",
        data.to_str().unwrap(),
        "--out",
        dir.path().join("x").to_str().unwrap(),
        "--preset",
        "vit_b",
        "--config",
        config.to_str().unwrap(),
        "--init",
        reference.to_str().unwrap(),
        "--progress",
        "never",
    ]);
    assert!(e.contains("shape"), "{e}");
}

fn metrics_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("loss").is_some())
        .collect()
}

/// A teacher temperature far too high flattens the teacher's distribution: the run must say it
/// is collapsing (uniform), in `metrics.jsonl` and as a warning naming the kind and the remedy;
/// the k-NN probe runs before training and at every epoch end, and the report (JSON + plots)
/// records both.
#[test]
fn a_forced_uniform_collapse_is_diagnosed_and_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 6, 16, 64, 3);
    let probe = dir.path().join("probe");
    support::worker_ok(&[
        "synth",
        "--kind",
        "polypdiag",
        "--out",
        probe.to_str().unwrap(),
        "--clips",
        "12",
        "--frames",
        "16",
        "--max-frames",
        "16",
        "--size",
        "64",
    ]);
    let config = run_config(
        dir.path(),
        r#"{"epochs": 3, "batch_per_rank": 2, "lr": 0.05, "warmup_epochs": 1, "checkpoint_every": 0, "teacher_temp": 50.0, "warmup_teacher_temp": 50.0}"#,
    );
    let out = dir.path().join("run");
    let args = [
        "pretrain",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--preset",
        "tiny",
        "--config",
        config.to_str().unwrap(),
        "--threads",
        "1",
        "--data-threads",
        "2",
        "--progress",
        "never",
        "--probe-data",
        probe.to_str().unwrap(),
        "--probe-k",
        "3",
    ];
    let run = support::worker(&args);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let resolved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let ln_k = (resolved["model"]["head"]["out_dim"].as_f64().unwrap()).ln();
    let lines = metrics_lines(&out);
    assert_eq!(lines.len(), 9);
    for l in &lines {
        let h = l["teacher_entropy"].as_f64().unwrap();
        // float32 sums: within 1e-5 relative of ln K.
        assert!(h > 0.98 * ln_k && h <= ln_k * (1.0 + 1e-5), "{l}");
        assert!(l["batch_entropy"].as_f64().unwrap() >= h - 1e-6, "{l}");
        assert!(l["kl"].as_f64().unwrap().is_finite(), "{l}");
    }
    // The window of a 9-step run is 3 steps: collapsed from the third step on.
    let flagged: Vec<bool> = lines.iter().map(|l| l["collapse"] == "uniform").collect();
    assert_eq!(
        flagged,
        [false, false, true, true, true, true, true, true, true]
    );
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("uniform collapse"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("teacher_temp"), "{}", warnings[0]);

    // Probe: before training, then after every epoch (3 steps each).
    let acc = |key: &str| -> Vec<u64> {
        lines
            .iter()
            .filter(|l| l[key].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)))
            .map(|l| l["step"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(acc("probe_acc_before"), [0]);
    assert_eq!(acc("probe_acc"), [2, 5, 8]);

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["kind"], "pretrain");
    assert_eq!(report["steps"], 9);
    assert_eq!(
        report["collapse"],
        serde_json::json!([{"kind": "uniform", "from_step": 2, "to_step": 8}])
    );
    let history = report["probe"]["history"].as_array().unwrap();
    assert_eq!(history.len(), 3, "{report}");
    assert_eq!(history[2][0], 9);
    let plots: Vec<&str> = report["plots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(
        plots,
        [
            "plots/loss.png",
            "plots/diagnostics.png",
            "plots/probe.png",
            "plots/schedules.png"
        ]
    );
    for p in plots {
        let bytes = std::fs::read(out.join(p)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{p} is not a PNG");
    }
}

#[test]
fn a_broken_clip_is_counted_once_and_listed_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 4, 8, 48, 2);
    std::fs::write(data.join("synth/00001.mp4"), b"not a video at all").unwrap();
    let config = run_config(dir.path(), r#"{"epochs": 3, "batch_per_rank": 2}"#);
    let out = dir.path().join("out");
    let summary = pretrain(&data, &out, &config, &[]);
    assert_eq!(summary["clips_failed"], 1, "{summary}");
    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bad_inputs/rank-0.json")).unwrap())
            .unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(
        list[0]["uri"].as_str().unwrap().ends_with("00001.mp4"),
        "{list:?}"
    );
    assert!(!list[0]["reason"].as_str().unwrap().is_empty());
}
