//! Fine-tuning through the command line: parity with the published classifier's vectors,
//! learning on a generated PolypDiag-layout dataset to a high test F1 with its report and
//! plots, exact resume, initialisation from pre-training weights (and the refusals), evaluate
//! and predict.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::{reference_root, worker, worker_err, worker_ok};

fn classify_dir() -> PathBuf {
    reference_root().join("endofm-tiny-classify")
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn classify_reference_parity_and_a_perturbed_copy_fails() {
    let dir = classify_dir();
    let out = worker_ok(&["model", "verify", "--reference", dir.to_str().unwrap()]);
    let checks = json_lines(&out);
    assert!(checks.len() >= 7, "{out}");
    for c in &checks {
        assert_eq!(c["result"]["pass"], true, "{c}");
    }
    assert!(
        checks.iter().any(|c| c["result"]["check"]
            .as_str()
            .unwrap()
            .starts_with("train.grads")),
        "{out}"
    );

    // `model forward --reference` writes the eval cases under the vectors' names.
    let tmp = tempfile::tempdir().unwrap();
    let fwd = tmp.path().join("fwd.safetensors");
    worker_ok(&[
        "model",
        "forward",
        "--reference",
        dir.to_str().unwrap(),
        "--output",
        fwd.to_str().unwrap(),
    ]);
    let ours = endofm_worker::model::weights::read(&fwd).unwrap();
    let reference = endofm_worker::model::weights::read(&dir.join("vectors.safetensors")).unwrap();
    for key in [
        "fwd0.features",
        "fwd0.logits",
        "fwd1.features",
        "fwd1.logits",
    ] {
        let e = endofm_worker::verify::rel_err(&ours[key], &reference[key]);
        assert!(e < 1e-4, "{key}: {e}");
    }

    // A copy with one classifier weight nudged must fail the check (the check can fail).
    let copy = tmp.path().join("perturbed");
    std::fs::create_dir(&copy).unwrap();
    for f in ["config.json", "vectors.safetensors"] {
        std::fs::copy(dir.join(f), copy.join(f)).unwrap();
    }
    let mut w = endofm_worker::model::weights::read(&dir.join("weights.safetensors")).unwrap();
    let bias = w["linear.bias"].shallow_clone() + 0.05;
    w.insert("linear.bias".into(), bias);
    endofm_worker::model::weights::write(&copy.join("weights.safetensors"), &w).unwrap();
    let err = worker_err(&["model", "verify", "--reference", copy.to_str().unwrap()]);
    assert!(err.contains("reference check failed"), "{err}");
}

/// A generated PolypDiag-layout dataset (the generator's defaults at short side 80).
fn dataset(dir: &Path, videos: usize, seed: u64) -> PathBuf {
    dataset_with(dir, videos, seed, &["--size", "80"])
}

fn dataset_with(dir: &Path, videos: usize, seed: u64, extra: &[&str]) -> PathBuf {
    let out = dir.join(format!("polypdiag-{videos}-{seed}"));
    let mut args = vec![
        "synth".to_string(),
        "--kind".into(),
        "polypdiag".into(),
        "--out".into(),
        out.to_str().unwrap().into(),
        "--videos".into(),
        videos.to_string(),
        "--seed".into(),
        seed.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    worker_ok(&args);
    out
}

/// Small sizes for CPU tests: 4 frames over a 32-frame window at 64 px.
fn config(dir: &Path, epochs: usize, lr: f64, extra: &str) -> PathBuf {
    write_config(
        dir,
        &format!(
            r#"{{"finetune": {{"epochs": {epochs}, "batch_per_rank": 4, "lr": {lr}, "frames": 4, "window": 32,
                "crop": 64, "train_short_min": 72, "train_short_max": 90, "test_short": 72{extra}}}}}"#
        ),
    )
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("ft-{n}.json"));
    std::fs::write(&path, text).unwrap();
    path
}

fn finetune(data: &Path, out: &Path, cfg: &Path, more: &[&str]) -> Value {
    let mut args = vec![
        "finetune",
        "--task",
        "classify",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--preset",
        "tiny",
        "--config",
        cfg.to_str().unwrap(),
        "--threads",
        "1",
        "--data-threads",
        "1",
        "--progress",
        "never",
    ];
    args.extend_from_slice(more);
    let text = worker_ok(&args);
    json_lines(&text).pop().unwrap()
}

/// Runs `finetune` (tiny preset, `cfg`) expecting a refusal; returns its stderr.
fn finetune_refused(data: &Path, out: &Path, cfg: &Path, more: &[&str]) -> String {
    let mut args = vec![
        "finetune",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--preset",
        "tiny",
        "--config",
        cfg.to_str().unwrap(),
        "--progress",
        "never",
    ];
    args.extend_from_slice(more);
    let o = worker(&args);
    assert!(
        !o.status.success(),
        "finetune {more:?} should have been refused"
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn finetuning_learns_clear_polyps_and_reports_it() {
    let tmp = tempfile::tempdir().unwrap();
    // Positives show a pale polyp of at least 4 % of the frame in every frame; 120 / 40 / 40
    // videos. From random weights (no pre-training) the tiny network needs ~30 epochs.
    let data = dataset_with(
        tmp.path(),
        200,
        31,
        &[
            "--size",
            "96",
            "--frames",
            "40",
            "--max-frames",
            "56",
            "--polyp-scale",
            "4",
            "--polyp-contrast",
            "3",
            "--min-polyp-share",
            "1",
            "--min-polyp-area",
            "0.04",
        ],
    );
    let out = tmp.path().join("run");
    let cfg = write_config(
        tmp.path(),
        r#"{"finetune": {"epochs": 30, "batch_per_rank": 8, "lr": 0.2, "drop_path_rate": 0.0,
            "frames": 4, "window": 64, "crop": 80, "train_short_min": 88, "train_short_max": 104,
            "test_short": 88, "val_every": 5}}"#,
    );
    let result = finetune(&data, &out, &cfg, &[]);
    let (name, f1) = (
        result["headline"][0].as_str().unwrap(),
        result["headline"][1].as_f64().unwrap(),
    );
    assert_eq!(name, "test_f1");
    assert!(f1 >= 0.9, "test F1 {f1}: {result}");

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        report["splits"]["test"]["metrics"]["f1"].as_f64().unwrap(),
        f1
    );
    assert_eq!(report["selection"]["split"], "val");
    assert_eq!(report["history"].as_array().unwrap().len(), 30);
    for plot in report["plots"].as_array().unwrap() {
        let path = out.join(plot.as_str().unwrap());
        let img = image::open(&path).unwrap();
        assert!(
            img.width() > 200 && img.height() > 200,
            "{}",
            path.display()
        );
    }
    for f in [
        "plots/training.png",
        "plots/confusion_test.png",
        "plots/roc_test.png",
        "best/info.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }

    // evaluate on the test split reproduces the report's test numbers.
    let eval_out = tmp.path().join("eval");
    let text = worker_ok(&[
        "evaluate",
        "--task",
        "classify",
        "--weights",
        out.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--split",
        "test",
        "--out",
        eval_out.to_str().unwrap(),
    ]);
    let eval = json_lines(&text).pop().unwrap();
    assert_eq!(eval["metrics"]["test_f1"].as_f64().unwrap(), f1, "{eval}");
    assert!(eval_out.join("report.json").is_file());

    // predict: a probability per video, and per window.
    let video = std::fs::read_dir(data.join("videos"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let one = json_lines(&worker_ok(&[
        "predict",
        "--weights",
        out.to_str().unwrap(),
        "--video",
        video.to_str().unwrap(),
    ]));
    assert_eq!(one.len(), 1);
    let p = one[0]["probability"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p));
    // A longer clip (150 frames) has three windows of 64 frames.
    let long = tmp.path().join("long");
    worker_ok(&[
        "synth",
        "--kind",
        "pretrain",
        "--out",
        long.to_str().unwrap(),
        "--clips",
        "1",
        "--frames",
        "150",
        "--size",
        "96",
    ]);
    let clip = long.join("synth/00000.mp4");
    let windows = json_lines(&worker_ok(&[
        "predict",
        "--weights",
        out.to_str().unwrap(),
        "--video",
        clip.to_str().unwrap(),
        "--window",
    ]));
    let starts: Vec<u64> = windows
        .iter()
        .map(|w| w["start_frame"].as_u64().unwrap())
        .collect();
    assert_eq!(starts, vec![0, 64, 128], "{windows:?}");
    assert_eq!(windows[0]["start_frame"], 0);
}

#[test]
fn resumed_finetuning_equals_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 16, 3);
    let cfg = config(tmp.path(), 2, 0.5, r#", "drop_path_rate": 0.1"#);
    let straight = tmp.path().join("straight");
    finetune(&data, &straight, &cfg, &[]);
    let split = tmp.path().join("split");
    let first = finetune(&data, &split, &cfg, &["--max-steps", "3"]);
    assert_eq!(first["run"]["steps"], 3);
    assert_eq!(first["report"], "", "no report before the end");
    let second = finetune(&data, &split, &cfg, &[]);
    assert_eq!(second["run"]["started_at"], 3);
    let last = |dir: &Path| {
        let mut steps: Vec<PathBuf> = std::fs::read_dir(dir.join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        steps.sort();
        std::fs::read(steps.last().unwrap().join("model.safetensors")).unwrap()
    };
    assert!(last(&straight) == last(&split), "resumed parameters differ");
    assert_eq!(
        std::fs::read(straight.join("best/model.safetensors")).unwrap(),
        std::fs::read(split.join("best/model.safetensors")).unwrap()
    );
    // Another setting in the same output location is refused, naming it.
    let other = config(tmp.path(), 3, 0.5, "");
    let err = finetune_refused(&data, &split, &other, &[]);
    assert!(err.contains("other settings: epochs 2 (here 3)"), "{err}");
    // The refused run changed nothing there.
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(split.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["finetune"]["epochs"], 2);
}

#[test]
fn backbone_comes_from_a_pretraining_checkpoint_and_mismatches_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 12, 5);
    // A pre-training checkpoint folder: student + teacher of the tiny preset.
    let ckpt = tmp.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    for (name, seed) in [("student", "1"), ("teacher", "2")] {
        worker_ok(&[
            "model",
            "init",
            "--preset",
            "tiny",
            "--seed",
            seed,
            "--out",
            ckpt.join(format!("{name}.safetensors")).to_str().unwrap(),
        ]);
    }
    let cfg = config(tmp.path(), 1, 0.1, "");
    let out = tmp.path().join("from-teacher");
    finetune(
        &data,
        &out,
        &cfg,
        &["--init", ckpt.to_str().unwrap(), "--max-steps", "1"],
    );
    // The first checkpoint's backbone differs from the teacher only by one SGD step: check a
    // table the step barely moves is the teacher's, not the student's.
    let teacher = endofm_worker::model::weights::read(&ckpt.join("teacher.safetensors")).unwrap();
    let student = endofm_worker::model::weights::read(&ckpt.join("student.safetensors")).unwrap();
    let tuned = endofm_worker::model::weights::read(
        &out.join("checkpoints/step-000000001/model.safetensors"),
    )
    .unwrap();
    let key = "backbone.patch_embed.proj.weight";
    let d_teacher = (&tuned[key] - &teacher[key]).abs().max().double_value(&[]);
    let d_student = (&tuned[key] - &student[key]).abs().max().double_value(&[]);
    assert!(
        d_teacher < 1e-2 && d_student > 1e-2,
        "{d_teacher} {d_student}"
    );
    // Resuming that output without its --init is refused, naming both.
    let err = finetune_refused(&data, &out, &cfg, &[]);
    assert!(
        err.contains("another initialisation") && err.contains("random"),
        "{err}"
    );

    // A checkpoint of another width: the error names the key and both shapes.
    let wide = tmp.path().join("wide");
    std::fs::create_dir(&wide).unwrap();
    let vit = tmp.path().join("vit.json");
    let mut other = endofm_shared::Preset::Tiny.config();
    other.embed_dim = 96;
    std::fs::write(&vit, serde_json::to_string(&other).unwrap()).unwrap();
    worker_ok(&[
        "model",
        "init",
        "--config",
        vit.to_str().unwrap(),
        "--out",
        wide.join("teacher.safetensors").to_str().unwrap(),
    ]);
    let out2 = tmp.path().join("bad");
    let err = finetune_refused(&data, &out2, &cfg, &["--init", wide.to_str().unwrap()]);
    assert!(
        err.contains("backbone.") && err.contains("192") && err.contains("96"),
        "{err}"
    );
}

#[test]
fn bad_datasets_are_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 12, 9);
    let cfg = config(tmp.path(), 1, 0.1, "");
    let list = data.join("splits/train.txt");
    let text = std::fs::read_to_string(&list).unwrap();
    std::fs::write(&list, format!("{text}0000.mp4,7\n")).unwrap();
    let err = finetune_refused(&data, &tmp.path().join("o"), &cfg, &[]);
    assert!(err.contains("train.txt"), "{err}");
    assert!(
        !tmp.path().join("o/checkpoints").exists(),
        "nothing trained"
    );
    // A broken test-split video is found before training, not after it.
    std::fs::write(&list, &text).unwrap();
    let test_list = std::fs::read_to_string(data.join("splits/test.txt")).unwrap();
    let name = test_list.lines().next().unwrap().split(',').next().unwrap();
    std::fs::write(data.join("videos").join(name), b"not a video").unwrap();
    let err = finetune_refused(&data, &tmp.path().join("o2"), &cfg, &[]);
    assert!(err.contains(name), "{err}");
    assert!(
        !tmp.path().join("o2/checkpoints").exists(),
        "nothing trained"
    );
    // An unknown task is refused by name.
    let o = worker(&[
        "finetune",
        "--task",
        "detection",
        "--data",
        "x",
        "--out",
        "y",
        "--preset",
        "tiny",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("detection"));
}
