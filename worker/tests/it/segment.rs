//! Segmentation: parity with the published TransUNet hybrid (`endofm-tiny-segment`), the
//! published Dice, and sizes built from `config.json` alone.

use std::path::PathBuf;

use serde_json::Value;

use crate::support::{reference_root, worker_err, worker_ok};

fn segment_dir() -> PathBuf {
    reference_root().join("endofm-tiny-segment")
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("result").is_some())
        .collect()
}

#[test]
fn segment_reference_parity_and_perturbed_copies_fail() {
    let dir = segment_dir();
    let out = worker_ok(&["model", "verify", "--reference", dir.to_str().unwrap()]);
    let checks = json_lines(&out);
    for c in &checks {
        assert_eq!(c["result"]["pass"], true, "{c}");
    }
    let names: Vec<&str> = checks
        .iter()
        .map(|c| c["result"]["check"].as_str().unwrap())
        .collect();
    for wanted in [
        "eval.logits",
        "train.logits",
        "train.loss_ce",
        "train.loss_dice",
        "train.loss",
        "train.grads",
        "train.after",
        "metric.case0.dice",
        "metric.case4.dice",
        "metric.mean_dice",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(wanted)),
            "{wanted} not checked: {out}"
        );
    }

    // `model forward --reference` writes eval.logits.
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
    let e = endofm_worker::verify::rel_err(&ours["eval.logits"], &reference["eval.logits"]);
    assert!(e < 1e-4, "eval.logits: {e}");

    // A nudged decoder BatchNorm statistic changes the eval logits: the check fails.
    let copy = tmp.path().join("perturbed");
    std::fs::create_dir(&copy).unwrap();
    for f in ["config.json", "vectors.safetensors"] {
        std::fs::copy(dir.join(f), copy.join(f)).unwrap();
    }
    let mut w = endofm_worker::model::weights::read(&dir.join("weights.safetensors")).unwrap();
    let key = "decoder.blocks.3.conv2.1.running_mean";
    let nudged = w[key].shallow_clone() + 0.05;
    w.insert(key.into(), nudged);
    endofm_worker::model::weights::write(&copy.join("weights.safetensors"), &w).unwrap();
    let err = worker_err(&["model", "verify", "--reference", copy.to_str().unwrap()]);
    assert!(err.contains("reference check failed"), "{err}");

    // A config.json whose sizes disagree with the weights is refused naming the key.
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["vit_seg_config"]["decoder_channels"] = serde_json::json!([16, 16, 16, 16]);
    let other = tmp.path().join("resized");
    std::fs::create_dir(&other).unwrap();
    for f in ["weights.safetensors", "vectors.safetensors"] {
        std::fs::copy(dir.join(f), other.join(f)).unwrap();
    }
    std::fs::write(other.join("config.json"), cfg.to_string()).unwrap();
    let err = worker_err(&["model", "verify", "--reference", other.to_str().unwrap()]);
    assert!(err.contains("decoder.blocks.3"), "{err}");
}

/// A generated CVC-layout dataset with prominent polyps at 64 px (short side).
fn cvc(dir: &std::path::Path, sequences: usize, seed: u64) -> PathBuf {
    let out = dir.join(format!("cvc-{sequences}-{seed}"));
    worker_ok(&[
        "synth",
        "--kind",
        "cvc",
        "--out",
        out.to_str().unwrap(),
        "--videos",
        &sequences.to_string(),
        "--frames",
        "6",
        "--max-frames",
        "8",
        "--size",
        "64",
        "--polyp-scale",
        "4",
        "--polyp-contrast",
        "3",
        "--seed",
        &seed.to_string(),
    ]);
    out
}

/// Tiny network and CPU-sized settings: 64 px frames, a slim head.
fn seg_config(dir: &std::path::Path, name: &str, finetune: &str) -> PathBuf {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(
        &path,
        format!(
            r#"{{"finetune": {{"crop": 64, {finetune}}},
                "segmenter": {{"resnet_units": [2, 1, 1], "resnet_width": 32, "head_channels": 64,
                               "decoder_channels": [16, 16, 16, 8], "n_skip": 3, "n_classes": 2}}}}"#
        ),
    )
    .unwrap();
    path
}

fn finetune_args<'a>(data: &'a str, out: &'a str, cfg: &'a str) -> Vec<&'a str> {
    vec![
        "finetune",
        "--task",
        "segment",
        "--data",
        data,
        "--out",
        out,
        "--preset",
        "tiny",
        "--config",
        cfg,
        "--threads",
        "2",
        "--data-threads",
        "1",
        "--progress",
        "never",
    ]
}

fn last_json(text: &str) -> Value {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .rfind(|v| v.get("level").is_none())
        .unwrap_or_else(|| panic!("no result line in {text}"))
}

#[test]
fn segmentation_learns_clear_polyps_and_reports_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = cvc(tmp.path(), 16, 5);
    let cfg = seg_config(
        tmp.path(),
        "learn",
        r#""epochs": 12, "lr": 0.0005, "weight_decay": 0.01, "val_every": 3"#,
    );
    let out = tmp.path().join("out");
    let (d, o, c) = (
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        cfg.to_str().unwrap(),
    );
    let result = last_json(&worker_ok(&finetune_args(d, o, c)));
    let dice = result["metrics"]["test_dice"].as_f64().unwrap();
    assert!(dice >= 0.7, "test Dice {dice}: {result}");
    assert_eq!(result["headline"][0], "test_dice");
    for key in [
        "test_volume_dice",
        "test_frame_dice",
        "test_frame_iou",
        "test_polyp_found",
    ] {
        assert!(result["metrics"][key].is_number(), "{key}: {result}");
    }
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["selection"]["split"], "val");
    let plots: Vec<&str> = report["plots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for p in ["plots/training.png", "plots/samples_test.png"] {
        assert!(plots.contains(&p), "{plots:?}");
        assert!(out.join(p).metadata().unwrap().len() > 10_000, "{p}");
    }
    // The chosen model evaluates to the same test numbers.
    let eval_out = tmp.path().join("eval");
    let ev = last_json(&worker_ok(&[
        "evaluate",
        "--task",
        "segment",
        "--weights",
        o,
        "--data",
        d,
        "--split",
        "test",
        "--out",
        eval_out.to_str().unwrap(),
        "--threads",
        "2",
    ]));
    assert_eq!(ev["metrics"]["test_dice"], result["metrics"]["test_dice"]);
    // Prediction on a frame folder: one mask per frame and an overlay video.
    let video = data.join("sequences/000/frames");
    let pred = tmp.path().join("pred");
    let text = worker_ok(&[
        "predict",
        "--task",
        "segment",
        "--weights",
        o,
        "--video",
        video.to_str().unwrap(),
        "--out",
        pred.to_str().unwrap(),
        "--frames",
        "4",
    ]);
    let frames = std::fs::read_dir(&video).unwrap().count();
    assert_eq!(
        std::fs::read_dir(pred.join("masks")).unwrap().count(),
        frames
    );
    assert!(pred.join("overlay.mp4").metadata().unwrap().len() > 1000);
    assert_eq!(last_json(&text)["frames"], frames);
    // A second prediction into the same folder is refused (its masks would mix).
    let err = worker_err(&[
        "predict",
        "--task",
        "segment",
        "--weights",
        o,
        "--video",
        video.to_str().unwrap(),
        "--out",
        pred.to_str().unwrap(),
    ]);
    assert!(err.contains("already holds masks"), "{err}");
    // The bare weights file with the run's config.json (its model and segmenter sections).
    let bare = last_json(&worker_ok(&[
        "evaluate",
        "--task",
        "segment",
        "--weights",
        out.join("best/model.safetensors").to_str().unwrap(),
        "--config",
        out.join("config.json").to_str().unwrap(),
        "--data",
        d,
        "--split",
        "val",
        "--out",
        tmp.path().join("eval-bare").to_str().unwrap(),
        "--threads",
        "2",
    ]));
    assert_eq!(bare["metrics"]["val_dice"], result["metrics"]["val_dice"]);
    // A fine-tuning run pointed at the evaluation's output is refused; the report stays.
    let before = std::fs::read(eval_out.join("report.json")).unwrap();
    let err = worker_err(&finetune_args(d, eval_out.to_str().unwrap(), c));
    assert!(err.contains("no checkpoints"), "{err}");
    assert_eq!(std::fs::read(eval_out.join("report.json")).unwrap(), before);
}

#[test]
fn resumed_segmentation_equals_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = cvc(tmp.path(), 8, 7);
    let cfg = seg_config(tmp.path(), "resume", r#""epochs": 2, "lr": 0.0005"#);
    let (d, c) = (data.to_str().unwrap(), cfg.to_str().unwrap());
    let straight = tmp.path().join("straight");
    worker_ok(&finetune_args(d, straight.to_str().unwrap(), c));
    let split = tmp.path().join("split");
    let s = split.to_str().unwrap();
    let mut first = finetune_args(d, s, c);
    first.extend(["--max-steps", "3"]);
    assert_eq!(last_json(&worker_ok(&first))["run"]["steps"], 3);
    let second = last_json(&worker_ok(&finetune_args(d, s, c)));
    assert_eq!(second["run"]["started_at"], 3);
    for f in ["best/model.safetensors", "report.json"] {
        let a = std::fs::read(straight.join(f)).unwrap();
        let b = std::fs::read(split.join(f)).unwrap();
        if f.ends_with(".json") {
            let strip = |bytes: &[u8]| {
                let mut v: Value = serde_json::from_slice(bytes).unwrap();
                v["created_unix"] = Value::Null;
                v["created_utc"] = Value::Null;
                v["splits"].clone()
            };
            assert_eq!(strip(&a), strip(&b), "{f}");
        } else {
            assert!(a == b, "{f} differs after resuming");
        }
    }
    // Another network in the same output is refused, naming what differs.
    let other = tmp.path().join("other.json");
    std::fs::write(
        &other,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("\"head_channels\": 64", "\"head_channels\": 32"),
    )
    .unwrap();
    let err = worker_err(&finetune_args(d, s, other.to_str().unwrap()));
    assert!(err.contains("segmentation network"), "{err}");
}

#[test]
fn bad_segmentation_inputs_are_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = seg_config(tmp.path(), "bad", r#""epochs": 1"#);
    let c = cfg.to_str().unwrap();
    let run = |data: &std::path::Path, name: &str| {
        let out = tmp.path().join(name);
        let err = worker_err(&finetune_args(
            data.to_str().unwrap(),
            out.to_str().unwrap(),
            c,
        ));
        assert!(!out.join("checkpoints").exists(), "nothing trained: {err}");
        err
    };
    // A mask whose size differs from its frame.
    let data = cvc(tmp.path(), 8, 11);
    let mask = data.join("sequences/003/masks/2.png");
    image::GrayImage::new(10, 10).save(&mask).unwrap();
    let err = run(&data, "o1");
    assert!(err.contains("003/masks/2.png"), "{err}");
    // A frame without its mask.
    let data = cvc(tmp.path(), 8, 12);
    std::fs::remove_file(data.join("sequences/004/masks/3.png")).unwrap();
    let err = run(&data, "o2");
    assert!(err.contains("004/frames/3.png"), "{err}");
    // An empty sequence.
    let data = cvc(tmp.path(), 8, 13);
    for dir in ["frames", "masks"] {
        let d = data.join("sequences/005").join(dir);
        std::fs::remove_dir_all(&d).unwrap();
        std::fs::create_dir(&d).unwrap();
    }
    let err = run(&data, "o3");
    assert!(err.contains("005"), "{err}");
    // Settings of another task, a batch of sequences, a frame size the stem cannot take and
    // a value of the wrong type are refused by name.
    let data = cvc(tmp.path(), 8, 14);
    for (name, doc, field) in [
        ("momentum", r#""momentum": 0.5"#, "momentum"),
        ("batch", r#""batch_per_rank": 2"#, "batch_per_rank"),
        ("crop", r#""epochs": 1, "crop": 50"#, "`crop`"),
        ("std", r#""std": [0.5, 0.5]"#, "`std`"),
    ] {
        let bad = seg_config(tmp.path(), name, doc);
        let err = worker_err(&finetune_args(
            data.to_str().unwrap(),
            tmp.path().join("o4").to_str().unwrap(),
            bad.to_str().unwrap(),
        ));
        assert!(err.contains(field), "{err}");
    }
}
