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
