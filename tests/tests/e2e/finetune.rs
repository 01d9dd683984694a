//! Fine-tuning and evaluation jobs on the service: a pipeline of dependent jobs
//! (pre-train → fine-tune from `job:` → evaluate from `job:`), a two-rank fine-tuning job equal
//! to one rank on the same global batch, and a dependency that fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use endofm_tests::bin;
use serde_json::Value;

use crate::cluster::{Cluster, corpus, serial, tiny_spec};

const LONG: Duration = Duration::from_secs(300);

/// `endofm-worker synth --kind <kind> --out <temp>/endofm-e2e-<kind>-<pid> <args>`; returns
/// the dataset's folder.
fn synth(kind: &str, args: &[&str]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("endofm-e2e-{kind}-{}", std::process::id()));
    let out = Command::new(bin("endofm-worker").unwrap())
        .args(["synth", "--kind", kind, "--out"])
        .arg(&dir)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running synth");
    assert!(
        out.status.success(),
        "synth failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// A small generated PolypDiag-layout dataset, once per test process.
fn polypdiag() -> PathBuf {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    DATA.get_or_init(|| {
        synth(
            "polypdiag",
            &[
                "--videos",
                "12",
                "--size",
                "80",
                "--frames",
                "24",
                "--max-frames",
                "32",
                "--seed",
                "4",
            ],
        )
    })
    .clone()
}

/// A fine-tuning spec at small sizes (2 frames, 32 px), drop-path 0 (deterministic).
fn finetune_spec(name: &str, out: &Path, world: u32, batch: usize, top: &str) -> String {
    format!(
        r#"name = "{name}"
kind = "finetune"
task = "classify"
output = "{out}"
max_restarts = 1
collective_timeout_s = 20
{top}
[data]
uri = "{data}"
threads = 1
[model]
preset = "tiny"
[resources]
world_size = {world}
device = "cpu"
threads_per_rank = 1
[finetune]
epochs = 2
batch_per_rank = {batch}
lr = 0.5
drop_path_rate = 0.0
frames = 2
window = 16
crop = 32
train_short_min = 36
train_short_max = 40
test_short = 36
"#,
        out = out.display(),
        data = polypdiag().display()
    )
}

fn state(job: &Value) -> &str {
    job["state"].as_str().unwrap_or("")
}

fn last_model(out: &Path) -> Vec<u8> {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(out.join("checkpoints"))
        .expect("checkpoints")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    steps.sort();
    std::fs::read(steps.pop().expect("a checkpoint").join("model.safetensors")).unwrap()
}

/// Largest |a − b| over every tensor of two safetensors files, relative to max |b|.
fn worst_rel(a: &[u8], b: &[u8]) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    std::fs::write(&pa, a).unwrap();
    std::fs::write(&pb, b).unwrap();
    let code = r#"
import sys
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert a.keys() == b.keys()
print(max(((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp(min=1e-12)).item() for k in a))
"#;
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let out = Command::new(python)
        .args(["-c", code])
        .arg(&pa)
        .arg(&pb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn pipeline_of_dependent_jobs_and_two_ranks_equal_one() {
    let _serial = serial();
    let mut c = Cluster::start();
    c.add_worker("cpu:2");
    let dir = c.dir.path().to_path_buf();

    // References to jobs that do not exist are refused at submit.
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        finetune_spec("bad", &dir.join("bad"), 1, 4, r#"init = "job:job-999""#),
    )
    .unwrap();
    let out = c.cli(&["submit", path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("job-999"));

    // Pre-train (2 steps), fine-tune from it, evaluate the result: submitted at once.
    let pre = c.submit(&tiny_spec(
        "pre",
        &dir.join("pre"),
        corpus().to_str().unwrap(),
        1,
        "max_steps = 2",
        "",
    ));
    let two = dir.join("ft-two");
    let ft = c.submit(&finetune_spec(
        "ft",
        &two,
        2,
        2,
        &format!(r#"init = "job:{pre}""#),
    ));
    let eval_spec = format!(
        r#"name = "eval"
kind = "evaluate"
task = "classify"
output = "{out}"
init = "job:{ft}"
split = "test"
[data]
uri = "{data}"
threads = 1
[model]
preset = "tiny"
[resources]
world_size = 1
device = "cpu"
threads_per_rank = 1
"#,
        out = dir.join("eval").display(),
        data = polypdiag().display()
    );
    let ev = c.submit(&eval_spec);
    let (code, job) = c.wait(&ev, LONG);
    assert_eq!(code, 0, "{job}\n{}", c.logs());
    assert_eq!(state(&job), "succeeded");
    let result = &job["result"];
    assert_eq!(result["headline"], "test_f1", "{job}");
    assert!(dir.join("eval/report.json").is_file());
    let ft_job = c.status(&ft);
    assert_eq!(state(&ft_job), "succeeded", "{ft_job}");
    assert!(
        ft_job["init_resolved"]
            .as_str()
            .unwrap_or("")
            .contains("pre"),
        "{ft_job}"
    );
    assert!(two.join("report.json").is_file() && two.join("best/model.safetensors").is_file());
    // The evaluation read the fine-tuned model chosen on validation.
    assert!(
        c.status(&ev)["init_resolved"]
            .as_str()
            .unwrap_or("")
            .contains("best")
    );

    // One rank with the whole global batch ends at the same parameters.
    let one = dir.join("ft-one");
    let ft1 = c.submit(&finetune_spec(
        "ft1",
        &one,
        1,
        4,
        &format!(r#"init = "job:{pre}""#),
    ));
    let (code, job) = c.wait(&ft1, LONG);
    assert_eq!(code, 0, "{job}");
    let worst = worst_rel(&last_model(&two), &last_model(&one));
    assert!(
        worst < 1e-4,
        "two ranks vs one: worst relative difference {worst}"
    );

    // A job that fails takes its dependants with it, which never run.
    let broken = c.submit(
        &tiny_spec(
            "broken",
            &dir.join("broken"),
            "/nonexistent/corpus",
            1,
            "",
            "",
        )
        .replace("max_restarts = 3", "max_restarts = 0"),
    );
    let dep = c.submit(&finetune_spec(
        "dep",
        &dir.join("dep"),
        1,
        4,
        &format!(r#"init = "job:{broken}""#),
    ));
    let (_, job) = c.wait(&dep, LONG);
    assert_eq!(state(&job), "failed", "{job}");
    assert!(
        !dir.join("dep").exists(),
        "the dependent job must never run"
    );
    let events = c.events(&dep).join("\n");
    assert!(events.contains(&broken), "{events}");
}

/// A small generated CVC-layout dataset (12 sequences of 4 frames at 64 px: at least two per
/// evaluated split, so that both ranks score), once per process.
fn cvc() -> PathBuf {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    DATA.get_or_init(|| {
        synth(
            "cvc",
            &[
                "--videos",
                "12",
                "--size",
                "64",
                "--frames",
                "4",
                "--max-frames",
                "4",
                "--polyp-scale",
                "4",
                "--seed",
                "6",
            ],
        )
    })
    .clone()
}

#[test]
fn segmentation_job_on_two_ranks_from_a_pretraining_job() {
    let _serial = serial();
    let mut c = Cluster::start();
    c.add_worker("cpu:2");
    let dir = c.dir.path().to_path_buf();
    let pre = c.submit(&tiny_spec(
        "pre",
        &dir.join("pre"),
        corpus().to_str().unwrap(),
        1,
        "max_steps = 1",
        "",
    ));
    let out = dir.join("seg");
    let spec = format!(
        r#"name = "seg"
kind = "finetune"
task = "segment"
output = "{out}"
init = "job:{pre}"
max_restarts = 0
collective_timeout_s = 30
[data]
uri = "{data}"
threads = 1
[model]
preset = "tiny"
[resources]
world_size = 2
device = "cpu"
threads_per_rank = 1
[finetune]
epochs = 2
crop = 64
lr = 0.0005
[segmenter]
resnet_units = [1, 1, 1]
resnet_width = 32
head_channels = 32
decoder_channels = [16, 16, 8, 8]
"#,
        out = out.display(),
        data = cvc().display()
    );
    let seg = c.submit(&spec);
    let (code, job) = c.wait(&seg, LONG);
    assert_eq!(code, 0, "{job}\n{}", c.logs());
    assert_eq!(state(&job), "succeeded", "{job}");
    assert_eq!(job["result"]["headline"], "test_dice", "{job}");
    assert!(out.join("report.json").is_file() && out.join("best/model.safetensors").is_file());
    assert!(out.join("plots/samples_test.png").is_file());
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["world_size"], 2);
    assert_eq!(config["segmenter"]["head_channels"], 32);
    assert_eq!(config["finetune"]["batch_per_rank"], 1);
    let val_list = std::fs::read_to_string(cvc().join("splits/val.txt")).unwrap();
    assert!(
        val_list.lines().count() >= 2,
        "both ranks validate: {val_list}"
    );
    // Both ranks validated with one model (rank 0's BatchNorm statistics, given to every rank
    // after each step): a one-process evaluation of the chosen model on the validation split
    // gives the numbers recorded for the chosen epoch.
    let eval = Command::new(bin("endofm-worker").unwrap())
        .args(["evaluate", "--task", "segment", "--weights"])
        .arg(&out)
        .arg("--data")
        .arg(cvc())
        .args(["--split", "val", "--threads", "1", "--out"])
        .arg(dir.join("seg-eval"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("running evaluate");
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let line: Value = String::from_utf8_lossy(&eval.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("evaluate prints its outcome");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let chosen = report["selection"]["epoch"].as_u64().unwrap() as usize;
    let recorded = &report["history"][chosen]["val"];
    for key in ["dice", "frame_iou", "loss"] {
        let (a, b) = (
            line["metrics"][format!("val_{key}")].as_f64().unwrap(),
            recorded[key].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() < 1e-6,
            "{key}: evaluate {a}, recorded at epoch {chosen} {b}"
        );
    }
}

/// A small generated KUMC-layout dataset, once per test process.
fn kumc() -> PathBuf {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    DATA.get_or_init(|| {
        synth(
            "kumc",
            &[
                "--videos",
                "8",
                "--size",
                "64",
                "--frames",
                "5",
                "--max-frames",
                "6",
                "--polyp-scale",
                "3",
                "--seed",
                "8",
            ],
        )
    })
    .clone()
}

#[test]
fn detection_job_on_two_ranks_from_a_pretraining_job() {
    let _serial = serial();
    let mut c = Cluster::start();
    c.add_worker("cpu:2");
    let dir = c.dir.path().to_path_buf();
    let pre = c.submit(&tiny_spec(
        "pre",
        &dir.join("pre"),
        corpus().to_str().unwrap(),
        1,
        "max_steps = 1",
        "",
    ));
    let out = dir.join("det");
    let spec = format!(
        r#"name = "det"
kind = "finetune"
task = "detect"
output = "{out}"
init = "job:{pre}"
max_restarts = 0
collective_timeout_s = 30
[data]
uri = "{data}"
threads = 1
[model]
preset = "tiny"
[resources]
world_size = 2
device = "cpu"
threads_per_rank = 1
[finetune]
epochs = 2
max_size = 64
min_size = 64
warmup_iters = 4
lr = 0.005
test_refs = 2
[detector]
fpn_channels = 32
num_convs = 1
"#,
        out = out.display(),
        data = kumc().display()
    );
    let det = c.submit(&spec);
    let (code, job) = c.wait(&det, LONG);
    assert_eq!(code, 0, "{job}\n{}", c.logs());
    assert_eq!(state(&job), "succeeded", "{job}");
    assert_eq!(job["result"]["headline"], "test_f1", "{job}");
    assert!(out.join("report.json").is_file() && out.join("best/model.safetensors").is_file());
    for plot in [
        "samples_test.png",
        "pr_test.png",
        "loss_terms.png",
        "training.png",
    ] {
        assert!(out.join("plots").join(plot).is_file(), "{plot}");
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["world_size"], 2);
    assert_eq!(config["detector"]["fpn_channels"], 32);
    assert_eq!(config["finetune"]["batch_per_rank"], 1);
    // Both ranks scored their share of the validation frames and gathered the boxes: a
    // one-process evaluation of the chosen model gives the numbers recorded for its epoch.
    let eval = Command::new(bin("endofm-worker").unwrap())
        .args(["evaluate", "--task", "detect", "--weights"])
        .arg(&out)
        .arg("--data")
        .arg(kumc())
        .args(["--split", "val", "--threads", "1", "--out"])
        .arg(dir.join("det-eval"))
        .env("RUST_LOG", "warn")
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("running evaluate");
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let line: Value = String::from_utf8_lossy(&eval.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("evaluate prints its outcome");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let chosen = report["selection"]["epoch"].as_u64().unwrap() as usize;
    let recorded = &report["history"][chosen]["val"];
    for key in ["f1", "box_f1", "ap50", "ap50_95", "predicted_boxes"] {
        let (a, b) = (
            line["metrics"][format!("val_{key}")].as_f64().unwrap(),
            recorded[key].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() < 1e-6,
            "{key}: evaluate {a}, recorded at epoch {chosen} {b}"
        );
    }
}
