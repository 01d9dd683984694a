//! Detection runs through the command line: learning on generated KUMC-layout frames with
//! prominent polyps (the honest box-level F1), the report and its plots, evaluation equal to
//! the final scoring, prediction on a video, resume equal to an uninterrupted run, and bad
//! inputs refused naming the file or field.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::{worker_err, worker_ok};

/// A generated KUMC-layout dataset at 64 px (short side) with prominent polyps, one per video.
fn kumc(dir: &Path, videos: usize, frames: [usize; 2], seed: u64) -> PathBuf {
    let out = dir.join(format!("kumc-{videos}-{seed}"));
    worker_ok(&[
        "synth",
        "--kind",
        "kumc",
        "--out",
        out.to_str().unwrap(),
        "--videos",
        &videos.to_string(),
        "--frames",
        &frames[0].to_string(),
        "--max-frames",
        &frames[1].to_string(),
        "--size",
        "64",
        "--polyp-scale",
        "2.5",
        "--polyp-contrast",
        "2",
        "--max-polyps",
        "1",
        "--seed",
        &seed.to_string(),
        "--threads",
        "2",
    ]);
    out
}

/// The slim head of most tests.
const SLIM: &str = r#""fpn_channels": 32, "num_convs": 1"#;

/// CPU-sized settings: 64 px frames, two test references; `detector` the network's fields.
fn det_config(dir: &Path, name: &str, finetune: &str, detector: &str) -> PathBuf {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(
        &path,
        format!(
            r#"{{"finetune": {{"max_size": 64, "min_size": 64, "test_refs": 2, "drop_path_rate": 0.0, {finetune}}},
                "detector": {{{detector}}}}}"#
        ),
    )
    .unwrap();
    path
}

fn finetune_args<'a>(data: &'a str, out: &'a str, cfg: &'a str) -> Vec<&'a str> {
    vec![
        "finetune",
        "--task",
        "detect",
        "--data",
        data,
        "--out",
        out,
        "--preset",
        "tiny",
        "--config",
        cfg,
        "--threads",
        "1",
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

fn report(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

#[test]
fn detection_learns_prominent_polyps_and_reports_it() {
    let tmp = tempfile::tempdir().unwrap();
    // 1,600 three-frame videos (960 to train on, 320 held out for each of val and test):
    // many short videos, because a ViT trained from random weights generalises with the
    // number of distinct scenes it sees, not with the frames of each.
    let data = kumc(tmp.path(), 1600, [3, 3], 9);
    let cfg = det_config(
        tmp.path(),
        "learn",
        r#""epochs": 7, "batch_per_rank": 8, "lr": 0.02, "warmup_iters": 20, "val_every": 7,
           "decay_steps": [2000, 2300], "decay_gamma": 0.2"#,
        r#""num_convs": 2, "fpn_channels": 64"#,
    );
    let out = tmp.path().join("out");
    let (d, o, c) = (
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        cfg.to_str().unwrap(),
    );
    let result = last_json(&worker_ok(&finetune_args(d, o, c)));
    let metric = |k: &str| result["metrics"][k].as_f64().unwrap();
    // From random weights in 2,520 steps: boxes on held-out videos in the right place
    // (IoU ≥ 0.5) with the right class (measured: test box F1 0.86, AP50 0.85; train 0.94).
    for (key, floor) in [
        ("test_box_f1", 0.8),
        ("test_located_box_f1", 0.8),
        ("test_ap50", 0.75),
        ("train_box_f1", 0.85),
    ] {
        assert!(
            metric(key) >= floor,
            "{key} {} < {floor}: {result}",
            metric(key)
        );
    }
    assert_eq!(result["headline"][0], "test_f1");
    for key in [
        "test_precision",
        "test_recall",
        "test_box_precision",
        "test_box_recall",
        "test_ap50",
        "test_ap50_95",
        "test_adenomatous_box_f1",
        "test_hyperplastic_ap50",
        "test_true_boxes",
    ] {
        assert!(result["metrics"][key].is_number(), "{key}: {result}");
    }
    let r = report(&out);
    assert_eq!(r["selection"]["split"], "val");
    assert_eq!(r["selection"]["metric"], "ap50");
    let notes = r["notes"].to_string();
    assert!(notes.contains("wherever the box is"), "{notes}");
    let plots: Vec<&str> = r["plots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for p in [
        "plots/training.png",
        "plots/loss_terms.png",
        "plots/pr_test.png",
        "plots/samples_test.png",
    ] {
        assert!(plots.contains(&p), "{plots:?}");
        assert!(out.join(p).metadata().unwrap().len() > 10_000, "{p}");
    }
    // Every epoch's loss terms are in the metrics.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let epochs = metrics
        .lines()
        .filter(|l| l.contains("train_loss_stft_reg_mean"))
        .count();
    assert_eq!(epochs, 7);
    // The chosen model evaluates to the same test numbers.
    let eval_out = tmp.path().join("eval");
    let ev = last_json(&worker_ok(&[
        "evaluate",
        "--task",
        "detect",
        "--weights",
        o,
        "--data",
        d,
        "--split",
        "test",
        "--out",
        eval_out.to_str().unwrap(),
        "--threads",
        "1",
    ]));
    for key in ["test_f1", "test_box_f1", "test_ap50", "test_ap50_95"] {
        assert_eq!(ev["metrics"][key], result["metrics"][key], "{key}");
    }
    assert!(eval_out.join("plots/samples_test.png").is_file());
    // An evaluation never writes into the model folder it scores.
    let err = worker_err(&[
        "evaluate",
        "--task",
        "detect",
        "--weights",
        o,
        "--data",
        d,
        "--out",
        out.join("best").to_str().unwrap(),
    ]);
    assert!(err.contains("training output"), "{err}");
    // Prediction on a frame folder: one JSON line per frame and an annotated video.
    let video = data.join("test2019/Image").join(
        std::fs::read_dir(data.join("test2019/Image"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name(),
    );
    let frames = std::fs::read_dir(&video).unwrap().count();
    let pred = tmp.path().join("pred");
    let text = worker_ok(&[
        "predict",
        "--task",
        "detect",
        "--weights",
        o,
        "--video",
        video.to_str().unwrap(),
        "--out",
        pred.to_str().unwrap(),
    ]);
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("boxes").is_some())
        .collect();
    assert_eq!(lines.len(), frames);
    let with_boxes = lines
        .iter()
        .filter(|l| !l["boxes"].as_array().unwrap().is_empty())
        .count();
    assert!(with_boxes * 2 >= frames, "{text}");
    let file = std::fs::read_to_string(pred.join("detections.jsonl")).unwrap();
    assert_eq!(file.lines().count(), frames);
    assert!(pred.join("annotated.mp4").metadata().unwrap().len() > 1000);
    assert_eq!(last_json(&text)["frames"], frames);
    // A second prediction into the same folder is refused.
    let err = worker_err(&[
        "predict",
        "--task",
        "detect",
        "--weights",
        o,
        "--video",
        video.to_str().unwrap(),
        "--out",
        pred.to_str().unwrap(),
    ]);
    assert!(err.contains("already exists"), "{err}");
    // The bare weights file with the run's config.json (its model and detector sections).
    let bare = last_json(&worker_ok(&[
        "evaluate",
        "--task",
        "detect",
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
        "1",
    ]));
    assert_eq!(bare["metrics"]["val_ap50"], result["metrics"]["val_ap50"]);
    // A segmentation model is not a detector.
    let err = worker_err(&[
        "evaluate",
        "--task",
        "segment",
        "--weights",
        o,
        "--data",
        d,
        "--out",
        tmp.path().join("eval-seg").to_str().unwrap(),
    ]);
    assert!(err.contains("detect"), "{err}");
}

#[test]
fn resumed_detection_equals_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = kumc(tmp.path(), 6, [4, 5], 7);
    let cfg = det_config(
        tmp.path(),
        "resume",
        r#""epochs": 2, "lr": 0.005, "warmup_iters": 3"#,
        SLIM,
    );
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
                let v: Value = serde_json::from_slice(bytes).unwrap();
                (v["splits"].clone(), v["history"].clone())
            };
            assert_eq!(strip(&a), strip(&b), "{f}");
        } else {
            assert!(a == b, "{f} differs after resuming");
        }
    }
    // Another network in the same output is refused, naming what differs.
    let other = det_config(
        tmp.path(),
        "other",
        r#""epochs": 2, "lr": 0.005, "warmup_iters": 3"#,
        &format!("{SLIM}, \"nms_th\": 0.5"),
    );
    let err = worker_err(&finetune_args(d, s, other.to_str().unwrap()));
    assert!(
        err.contains("detection network") && err.contains("nms_th"),
        "{err}"
    );
}

#[test]
fn bad_detection_inputs_are_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = det_config(tmp.path(), "bad", r#""epochs": 1"#, SLIM);
    let c = cfg.to_str().unwrap();
    let run = |data: &Path, name: &str| {
        let out = tmp.path().join(name);
        let err = worker_err(&finetune_args(
            data.to_str().unwrap(),
            out.to_str().unwrap(),
            c,
        ));
        assert!(!out.join("checkpoints").exists(), "nothing trained: {err}");
        err
    };
    let first_video = |data: &Path, split: &str| -> String {
        let mut names: Vec<String> = std::fs::read_dir(data.join(format!("{split}2019/Image")))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names[0].clone()
    };
    // An annotation whose frame is missing.
    let data = kumc(tmp.path(), 4, [4, 4], 11);
    let v = first_video(&data, "train");
    std::fs::remove_file(data.join(format!("train2019/Image/{v}/2.jpg"))).unwrap();
    let err = run(&data, "o1");
    assert!(err.contains(&format!("{v}/2")), "{err}");
    // A box outside the image.
    let data = kumc(tmp.path(), 4, [4, 4], 12);
    let v = first_video(&data, "val");
    let xml = data.join(format!("val2019/Annotation/{v}/3.xml"));
    let text = std::fs::read_to_string(&xml).unwrap();
    let start = text.find("<xmax>").unwrap() + "<xmax>".len();
    let end = text[start..].find('<').unwrap() + start;
    std::fs::write(&xml, format!("{}500{}", &text[..start], &text[end..])).unwrap();
    let err = run(&data, "o2");
    assert!(err.contains(&format!("{v}/3.xml")), "{err}");
    // An unknown class.
    let data = kumc(tmp.path(), 4, [4, 4], 13);
    let v = first_video(&data, "train");
    let xml = data.join(format!("train2019/Annotation/{v}/1.xml"));
    let text = std::fs::read_to_string(&xml)
        .unwrap()
        .replace("adenomatous", "sessile")
        .replace("hyperplastic", "sessile");
    std::fs::write(&xml, text).unwrap();
    let err = run(&data, "o3");
    assert!(
        err.contains(&format!("{v}/1.xml")) && err.contains("sessile"),
        "{err}"
    );
    // A test frame that is not an image: refused before any training, naming the file.
    let data = kumc(tmp.path(), 4, [4, 4], 15);
    let v = first_video(&data, "test");
    std::fs::write(
        data.join(format!("test2019/Image/{v}/1.jpg")),
        b"not an image",
    )
    .unwrap();
    let err = run(&data, "o5");
    assert!(err.contains(&format!("{v}/1.jpg")), "{err}");
    // Settings of another task, a bad value and a network the head cannot build are refused
    // by name, before anything is written.
    let data = kumc(tmp.path(), 4, [4, 4], 14);
    for (name, finetune, detector, field) in [
        ("crop", r#""crop": 96"#, SLIM, "crop"),
        ("rot", r#""rotation_degrees": 3"#, SLIM, "rotation_degrees"),
        ("refs", r#""test_refs": 3"#, SLIM, "test_refs"),
        ("size", r#""max_size": 48"#, SLIM, "max_size"),
        (
            "gn",
            r#""epochs": 1"#,
            r#""fpn_channels": 48"#,
            "group_norm_groups",
        ),
        ("nms", r#""epochs": 1"#, r#""nms_th": "high""#, "nms_th"),
        (
            "classes",
            r#""epochs": 1"#,
            r#""num_classes": 1, "fpn_channels": 32"#,
            "num_classes",
        ),
    ] {
        let bad = det_config(tmp.path(), name, finetune, detector);
        let out = tmp.path().join(format!("o-{name}"));
        let err = worker_err(&finetune_args(
            data.to_str().unwrap(),
            out.to_str().unwrap(),
            bad.to_str().unwrap(),
        ));
        assert!(err.contains(field), "{name}: {err}");
        assert!(!out.exists(), "{name}: nothing written");
    }
}
