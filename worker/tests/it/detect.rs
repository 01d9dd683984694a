//! Detection: parity of the STFT-FCOS detector with the published code's vectors
//! (`endofm-tiny-detect`) through the library and through `model verify` / `model forward`,
//! and perturbed copies that must fail.

use std::collections::BTreeMap;
use std::path::PathBuf;

use endofm_worker::model::weights;
use endofm_worker::verify::ReferenceDir;
use endofm_worker::verify::detect::{check_detect, check_detect_with, detector};
use tch::{Device, Tensor};

use crate::support::{reference_root, worker_err, worker_ok};

fn detect_dir() -> PathBuf {
    reference_root().join("endofm-tiny-detect")
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn detector_matches_the_published_vectors_and_perturbed_weights_fail() {
    let dir = ReferenceDir::open(&detect_dir()).unwrap();
    let checks = check_detect(&dir, Device::Cpu).unwrap();
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.pass)
        .map(|c| format!("{} {:.3e} > {:.0e}", c.check, c.worst_err, c.tolerance))
        .collect();
    assert!(failed.is_empty(), "failed checks: {failed:#?}");
    // Everything the issue names is compared.
    let names: Vec<&str> = checks.iter().map(|c| c.check.as_str()).collect();
    for want in [
        "test.fpn.4",
        "test.head.4.stft_bbox_reg",
        "test.detections.boxes",
        "train.body.2",
        "train.head.pre_bbox",
        "train.loss_stft_reg",
        "train.loss_total",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(want)),
            "{want} not checked"
        );
    }
    assert!(names.iter().any(|n| n.starts_with("train.grads")));

    // The offset convolution steers the deformable sampling only: nudging it must move the
    // STFT outputs beyond tolerance (a wrong offset layout would too).
    let net = detector(&dir, Device::Cpu).unwrap();
    tch::no_grad(|| {
        let mut w = net.var_store().variables()["rpn.head.dcn_cls_subnet.conv_offset.weight"]
            .shallow_clone();
        let _ = w.g_mul_scalar_(1.2);
    });
    let checks = check_detect_with(&dir, &net, Device::Cpu).unwrap();
    let failing: Vec<&str> = checks
        .iter()
        .filter(|c| !c.pass)
        .map(|c| c.check.as_str())
        .collect();
    assert!(
        failing.iter().any(|c| c.contains("stft_cls_logits")),
        "{failing:?}"
    );
    assert!(
        !failing
            .iter()
            .any(|c| c.contains("bbox_reg") && !c.contains("stft")),
        "the FCOS branch does not read the offsets: {failing:?}"
    );
}

#[test]
fn model_verify_and_forward_serve_detection_directories() {
    let dir = detect_dir();
    let out = worker_ok(&["model", "verify", "--reference", dir.to_str().unwrap()]);
    let checks = json_lines(&out);
    assert!(checks.len() > 60, "{out}");
    for c in &checks {
        assert_eq!(c["task"], "detect", "{c}");
        assert_eq!(c["result"]["pass"], true, "{c}");
    }

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
    let ours = weights::read(&fwd).unwrap();
    let reference: BTreeMap<String, Tensor> = weights::read(&dir.join("vectors.safetensors"))
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.starts_with("test."))
        .collect();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        reference.keys().collect::<Vec<_>>()
    );
    for key in [
        "test.fpn.0",
        "test.head.0.stft_cls_logits",
        "test.detections.scores",
    ] {
        let e = endofm_worker::verify::rel_err(&ours[key], &reference[key]);
        assert!(e < 1e-4, "{key}: {e}");
    }

    // A copy with one head weight nudged fails `model verify`.
    let copy = tmp.path().join("perturbed");
    std::fs::create_dir(&copy).unwrap();
    for f in ["config.json", "vectors.safetensors"] {
        std::fs::copy(dir.join(f), copy.join(f)).unwrap();
    }
    let mut w = weights::read(&dir.join("weights.safetensors")).unwrap();
    let bias = w["rpn.head.centerness.bias"].shallow_clone() + 0.05;
    w.insert("rpn.head.centerness.bias".into(), bias);
    weights::write(&copy.join("weights.safetensors"), &w).unwrap();
    let err = worker_err(&["model", "verify", "--reference", copy.to_str().unwrap()]);
    assert!(err.contains("reference check failed"), "{err}");
}
