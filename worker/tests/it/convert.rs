//! Checkpoint conversion with the venv's torch: a pickle shaped like the published checkpoints is
//! imported; our weights are exported into that format and read back by torch.

use endofm_worker::infer::Precision;
use endofm_worker::model::{EndoFm, LoadMode, weights};
use endofm_worker::verify::{self, ReferenceDir, Tolerances};
use tch::Device;

use crate::support;

/// Writes a checkpoint like the reference training's `checkpoint.pth`: DDP-prefixed student,
/// plain teacher, an argparse namespace, optimiser state and the loss centre.
const MAKE_PUBLISHED: &str = r#"
import argparse, sys, torch
from safetensors.torch import load_file
sd = load_file(sys.argv[1])
teacher = {k: v.clone() * 0.5 for k, v in sd.items()}
torch.save({
    "student": {"module." + k: v for k, v in sd.items()},
    "teacher": teacher,
    "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
    "epoch": 12,
    "args": argparse.Namespace(arch="vit_base", out_dim=4096, lr=0.0005),
    "dino_loss": {"center": torch.zeros(1, 4096)},
}, sys.argv[2])
"#;

#[test]
fn imports_a_published_style_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let reference = ReferenceDir::open(&support::tiny()).unwrap();
    let pth = dir.path().join("checkpoint.pth");
    support::run_python(
        MAKE_PUBLISHED,
        &[
            reference.file("weights.safetensors").to_str().unwrap(),
            pth.to_str().unwrap(),
        ],
    );
    let out = dir.path().join("imported");
    let config = reference.file("config.json");
    let report = support::worker_ok(&[
        "model",
        "import",
        "--checkpoint",
        pth.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(report["epoch"], 12);
    assert_eq!(report["written"]["student"]["tensors"], 95);

    // The imported student computes the reference outputs.
    let cfg = reference.model_config().unwrap();
    let mut student = EndoFm::new(&cfg, Device::Cpu).unwrap();
    student
        .load(&out.join("student.safetensors"), LoadMode::Strict)
        .unwrap();
    let cases = verify::check_forward(
        &student,
        &reference.file("forward.safetensors"),
        Precision::Fp32,
        &Tolerances::FP32,
    )
    .unwrap();
    assert!(cases.iter().all(|c| c.pass), "{cases:?}");
    // The teacher is its own network (here: half the student).
    let teacher = weights::read(&out.join("teacher.safetensors")).unwrap();
    let original = weights::read(&reference.file("weights.safetensors")).unwrap();
    let key = "backbone.blocks.1.attn.qkv.weight";
    assert!(teacher[key].allclose(&(&original[key] * 0.5), 0.0, 0.0, false));
}

#[test]
fn refuses_unsafe_pickles_unless_trusted_and_names_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let pth = dir.path().join("odd.pth");
    support::run_python(
        "import sys, torch, collections\nclass Thing: pass\ntorch.save({'student': {'a': torch.zeros(1)}, 'thing': Thing()}, sys.argv[1])",
        &[pth.to_str().unwrap()],
    );
    let out = dir.path().join("o");
    let err = support::worker_err(&[
        "model",
        "import",
        "--checkpoint",
        pth.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("--trust"), "{err}");
    let missing = support::worker_err(&[
        "model",
        "import",
        "--checkpoint",
        "/nonexistent/c.pth",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(missing.contains("/nonexistent/c.pth"), "{missing}");
    // A checkpoint that does not fit the configuration it is checked against.
    let fits_not = dir.path().join("small.pth");
    support::run_python(
        "import sys, torch\ntorch.save({'student': {'backbone.cls_token': torch.zeros(1, 1, 8)}, 'teacher': {'backbone.cls_token': torch.zeros(1, 1, 8)}}, sys.argv[1])",
        &[fits_not.to_str().unwrap()],
    );
    let err = support::worker_err(&[
        "model",
        "import",
        "--checkpoint",
        fits_not.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--preset",
        "tiny",
    ]);
    assert!(
        err.contains("does not fit") && err.contains("backbone."),
        "{err}"
    );
    // A failed import leaves nothing in --out.
    let written: Vec<_> = std::fs::read_dir(&out)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(written.is_empty(), "a failed import left {written:?}");

    // A bare state dict (an image ViT's keys) is checked too, naming the file and the key.
    let bare = dir.path().join("vit.pth");
    support::run_python(
        "import sys, torch\ntorch.save({'patch_embed.proj.weight': torch.zeros(192, 3, 16, 16), 'cls_token': torch.zeros(1, 1, 192)}, sys.argv[1])",
        &[bare.to_str().unwrap()],
    );
    let err = support::worker_err(&[
        "model",
        "import",
        "--checkpoint",
        bare.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--preset",
        "tiny",
    ]);
    assert!(
        err.contains("vit.pth") && err.contains("state_dict") && err.contains("`"),
        "{err}"
    );
    let written: Vec<_> = std::fs::read_dir(&out)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(written.is_empty(), "a failed import left {written:?}");
}

/// Reads the exported pickle with `weights_only=True` and compares it, key by key and value by
/// value, with the safetensors it came from: equal key sets and shapes are what the reference's
/// `load_state_dict(strict=True)` requires.
const CHECK_EXPORT: &str = r#"
import sys, torch
from safetensors.torch import load_file
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
ours = load_file(sys.argv[2])
assert set(ckpt) >= {"student", "teacher"}, sorted(ckpt)
student = {k[len("module."):]: v for k, v in ckpt["student"].items()}
assert all(k.startswith("module.") for k in ckpt["student"]), "student keys carry module."
for name, sd in (("student", student), ("teacher", ckpt["teacher"])):
    assert set(sd) == set(ours), (name, sorted(set(sd) ^ set(ours))[:5])
    for k, v in ours.items():
        assert sd[k].shape == v.shape and torch.equal(sd[k], v), (name, k)
print(len(ours), ckpt.get("epoch"))
"#;

#[test]
fn exports_a_checkpoint_torch_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let reference = ReferenceDir::open(&support::tiny()).unwrap();
    let pth = dir.path().join("ours.pth");
    let weights = reference.file("weights.safetensors");
    support::worker_ok(&[
        "model",
        "export",
        "--student",
        weights.to_str().unwrap(),
        "--out",
        pth.to_str().unwrap(),
        "--epoch",
        "4",
    ]);
    let printed = support::run_python(
        CHECK_EXPORT,
        &[pth.to_str().unwrap(), weights.to_str().unwrap()],
    );
    assert_eq!(printed.trim(), "95 4");
    // And it imports back to the same tensors.
    let back = dir.path().join("back");
    support::worker_ok(&[
        "model",
        "import",
        "--checkpoint",
        pth.to_str().unwrap(),
        "--out",
        back.to_str().unwrap(),
        "--config",
        reference.file("config.json").to_str().unwrap(),
    ]);
    let a = endofm_worker::model::weights::read(&weights).unwrap();
    let b = endofm_worker::model::weights::read(&back.join("student.safetensors")).unwrap();
    assert_eq!(a.len(), b.len());
    for (k, v) in &a {
        assert!(v.equal(&b[k]), "{k} changed in the round trip");
    }
}
