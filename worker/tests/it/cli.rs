//! The `endofm-worker model …` commands as a user scripts them, errors included.

use std::collections::BTreeMap;

use endofm_worker::model::weights;
use endofm_worker::verify::rel_err;
use tch::{Device, Kind, Tensor};

use crate::support;

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn info_reports_the_published_parameter_counts() {
    let v = json(&support::worker_ok(&["model", "info", "--preset", "vit_b"]));
    assert_eq!(v["params"], 144_397_312u64);
    assert_eq!(v["backbone_params"], 121_258_752u64);
    assert_eq!(v["trainable_params"], 144_397_312u64 - 65_536);
    let config = support::tiny().join("config.json");
    let v = json(&support::worker_ok(&[
        "model",
        "info",
        "--config",
        config.to_str().unwrap(),
    ]));
    assert_eq!(v["config"]["embed_dim"], 192);
    let w = weights::read(&support::tiny().join("weights.safetensors")).unwrap();
    let n: i64 = w.values().map(|t| t.numel() as i64).sum();
    assert_eq!(v["params"], n);
}

#[test]
fn forward_writes_features_and_head_matching_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = support::tiny();
    let out = dir.path().join("out.safetensors");
    support::worker_ok(&[
        "model",
        "forward",
        "--config",
        tiny.join("config.json").to_str().unwrap(),
        "--weights",
        tiny.join("weights.safetensors").to_str().unwrap(),
        "--inputs",
        tiny.join("forward.safetensors").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--threads",
        "2",
    ]);
    let ours = weights::read(&out).unwrap();
    let reference = weights::read(&tiny.join("forward.safetensors")).unwrap();
    assert_eq!(ours.len(), 10, "{:?}", ours.keys().collect::<Vec<_>>());
    let mut worst = (String::new(), 0.0);
    for (k, v) in &ours {
        let e = rel_err(v, &reference[k]);
        if e > worst.1 {
            worst = (k.clone(), e);
        }
    }
    assert!(
        worst.1 <= 1e-4,
        "worst: {} rel err {:.3e}",
        worst.0,
        worst.1
    );
}

#[test]
fn verify_command_passes_on_the_reference_vectors() {
    let out = support::worker_ok(&[
        "model",
        "verify",
        "--reference",
        support::tiny().to_str().unwrap(),
    ]);
    let lines: Vec<serde_json::Value> = out.lines().map(json).collect();
    assert_eq!(lines.len(), 6);
    assert!(
        lines
            .iter()
            .all(|l| l["case"]["pass"] == true || l["result"]["pass"] == true),
        "{out}"
    );
}

fn write_inputs(dir: &std::path::Path, name: &str, t: Tensor) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.safetensors"));
    let mut m = BTreeMap::new();
    m.insert(format!("{name}.input"), t);
    weights::write(&path, &m).unwrap();
    path
}

#[test]
fn bad_inputs_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tiny = support::tiny();
    let config = tiny.join("config.json");
    let w = tiny.join("weights.safetensors");
    let good_inputs = tiny.join("forward.safetensors");
    let out = d.join("o.safetensors");
    let run = |config: &str, weights: &str, inputs: &str, extra: &[&str]| {
        let mut args = vec![
            "model",
            "forward",
            "--config",
            config,
            "--weights",
            weights,
            "--inputs",
            inputs,
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        support::worker_err(&args)
    };
    let (c, ws, gi) = (
        config.to_str().unwrap(),
        w.to_str().unwrap(),
        good_inputs.to_str().unwrap(),
    );

    let e = run(c, "/no/such/w.safetensors", gi, &[]);
    assert!(e.contains("/no/such/w.safetensors"), "{e}");
    let e = run(c, ws, "/no/such/in.safetensors", &[]);
    assert!(e.contains("/no/such/in.safetensors"), "{e}");
    let e = run("/no/such/config.json", ws, gi, &[]);
    assert!(e.contains("/no/such/config.json"), "{e}");

    // Configuration inconsistent with the weights: the key and both shapes are named.
    let vit = support::worker_err(&[
        "model",
        "forward",
        "--preset",
        "vit_b",
        "--weights",
        ws,
        "--inputs",
        gi,
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(vit.contains("shape") && vit.contains("backbone."), "{vit}");
    let deeper = d.join("deeper.json");
    std::fs::write(
        &deeper,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("\"depth\": 4", "\"depth\": 5"),
    )
    .unwrap();
    let e = run(deeper.to_str().unwrap(), ws, gi, &[]);
    assert!(e.contains("backbone.blocks.4"), "{e}");

    // Invalid configuration values name the field.
    let bad = d.join("bad.json");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("\"num_heads\": 3", "\"num_heads\": 5"),
    )
    .unwrap();
    let e = run(bad.to_str().unwrap(), ws, gi, &[]);
    assert!(e.contains("num_heads"), "{e}");
    let e = support::worker_err(&["model", "info", "--preset", "vit_huge"]);
    assert!(e.contains("vit_huge") && e.contains("vit_b"), "{e}");

    // Wrong dtype, wrong rank, wrong channels, too small, no inputs at all.
    let f64_in = write_inputs(
        d,
        "f64",
        Tensor::zeros([1, 3, 2, 48, 48], (Kind::Double, Device::Cpu)),
    );
    let e = run(c, ws, f64_in.to_str().unwrap(), &[]);
    assert!(e.contains("f64.input") && e.contains("float32"), "{e}");
    let rank4 = write_inputs(
        d,
        "r4",
        Tensor::zeros([3, 2, 48, 48], (Kind::Float, Device::Cpu)),
    );
    let e = run(c, ws, rank4.to_str().unwrap(), &[]);
    assert!(
        e.contains("r4.input") && e.contains("[3, 2, 48, 48]"),
        "{e}"
    );
    let chans = write_inputs(
        d,
        "c1",
        Tensor::zeros([1, 1, 2, 48, 48], (Kind::Float, Device::Cpu)),
    );
    let e = run(c, ws, chans.to_str().unwrap(), &[]);
    assert!(e.contains("c1.input") && e.contains("channels"), "{e}");
    let small = write_inputs(
        d,
        "s8",
        Tensor::zeros([1, 3, 2, 8, 8], (Kind::Float, Device::Cpu)),
    );
    let e = run(c, ws, small.to_str().unwrap(), &[]);
    assert!(e.contains("s8.input") && e.contains("patch"), "{e}");
    let mut m = BTreeMap::new();
    m.insert(
        "x".to_string(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    );
    let none = d.join("none.safetensors");
    weights::write(&none, &m).unwrap();
    let e = run(c, ws, none.to_str().unwrap(), &[]);
    assert!(e.contains(".input"), "{e}");

    // Precision and device requests this machine cannot honour.
    if !tch::Cuda::is_available() {
        let e = run(c, ws, gi, &["--device", "cuda"]);
        assert!(e.contains("cuda") && e.contains("0 CUDA device"), "{e}");
        let e = run(c, ws, gi, &["--precision", "fp16"]);
        assert!(e.contains("fp16") && e.contains("CUDA"), "{e}");
    }
    let e = run(c, ws, gi, &["--device", "tpu"]);
    assert!(e.contains("tpu"), "{e}");
    assert!(!out.exists(), "a failed run left an output file");
}

#[test]
fn init_writes_loadable_weights() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    support::worker_ok(&[
        "model",
        "init",
        "--preset",
        "tiny",
        "--out",
        a.to_str().unwrap(),
        "--seed",
        "3",
    ]);
    support::worker_ok(&[
        "model",
        "init",
        "--preset",
        "tiny",
        "--out",
        b.to_str().unwrap(),
        "--seed",
        "3",
    ]);
    let (wa, wb) = (weights::read(&a).unwrap(), weights::read(&b).unwrap());
    assert!(
        wa.iter().all(|(k, v)| v.equal(&wb[k])),
        "same seed, different weights"
    );
    // Reference initialisation: temporal_fc and time_embed zero, weight_g one.
    assert_eq!(
        wa["backbone.blocks.0.temporal_fc.weight"]
            .abs()
            .sum(Kind::Float)
            .double_value(&[]),
        0.0
    );
    assert_eq!(
        wa["head.last_layer.weight_g"]
            .mean(Kind::Float)
            .double_value(&[]),
        1.0
    );
    let std = wa["backbone.blocks.0.attn.qkv.weight"]
        .std(true)
        .double_value(&[]);
    assert!((std - 0.02).abs() < 0.002, "qkv std {std}");
}
