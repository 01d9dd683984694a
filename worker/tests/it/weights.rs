//! Parameter names and shapes against the published state dict; safetensors save/load.

use std::collections::BTreeMap;

use endofm_shared::Preset;
use endofm_worker::Error;
use endofm_worker::model::{EndoFm, LoadMode, weights};
use tch::{Device, Kind, Tensor};

use crate::support;

#[test]
fn vit_b_has_every_published_key_with_its_shape() {
    let tsv = std::fs::read_to_string(support::reference_root().join("endofm-vitb-state-dict.tsv"))
        .unwrap();
    let mut published = BTreeMap::new();
    for line in tsv.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let cols: Vec<&str> = line.split('\t').collect();
        let shape: Vec<i64> = cols[1].split('x').map(|d| d.parse().unwrap()).collect();
        published.insert(cols[0].to_string(), (shape, cols[2] == "yes"));
    }
    let model = EndoFm::new(&Preset::VitB.config(), Device::Cpu).unwrap();
    let ours: BTreeMap<String, (Vec<i64>, bool)> = model
        .var_store()
        .variables()
        .into_iter()
        .map(|(k, t)| {
            let trainable = t.requires_grad();
            (k, (t.size(), trainable))
        })
        .collect();
    let missing: Vec<_> = published
        .keys()
        .filter(|k| !ours.contains_key(*k))
        .collect();
    let extra: Vec<_> = ours
        .keys()
        .filter(|k| !published.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    for (k, v) in &published {
        assert_eq!(&ours[k], v, "key {k}: (shape, trainable)");
    }
    let counts = model.param_counts();
    assert_eq!(counts.total, 144_397_312);
    assert_eq!(counts.backbone, 121_258_752);
    assert_eq!(counts, Preset::VitB.config().param_counts());
}

fn random_video(b: i64, t: i64, px: i64) -> Tensor {
    Tensor::randn([b, 3, t, px, px], (Kind::Float, Device::Cpu))
}

#[test]
fn save_then_load_gives_identical_outputs() {
    tch::manual_seed(7);
    let cfg = Preset::Tiny.config();
    let a = EndoFm::new(&cfg, Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    a.save(&path).unwrap();
    tch::manual_seed(8);
    let mut b = EndoFm::new(&cfg, Device::Cpu).unwrap();
    let x = random_video(2, 4, 64);
    let (_, before) = tch::no_grad(|| b.forward_t(&x, false));
    let report = b.load(&path, LoadMode::Strict).unwrap();
    assert_eq!(report.loaded, a.var_store().variables().len());
    let (fa, ha) = tch::no_grad(|| a.forward_t(&x, false));
    let (fb, hb) = tch::no_grad(|| b.forward_t(&x, false));
    assert!(
        fa.equal(&fb) && ha.equal(&hb),
        "outputs differ after a round trip"
    );
    assert!(!before.equal(&hb), "the load changed nothing");
}

fn tiny_file(
    dir: &std::path::Path,
    name: &str,
    edit: impl FnOnce(&mut BTreeMap<String, Tensor>),
) -> std::path::PathBuf {
    let mut t = weights::read(&support::tiny().join("weights.safetensors")).unwrap();
    edit(&mut t);
    let path = dir.join(format!("{name}.safetensors"));
    weights::write(&path, &t).unwrap();
    path
}

#[test]
fn strict_load_names_the_offending_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = endofm_worker::verify::ReferenceDir::open(&support::tiny())
        .unwrap()
        .model_config()
        .unwrap();
    let mut model = EndoFm::new(&cfg, Device::Cpu).unwrap();
    let pristine = model.var_store().variables()["backbone.cls_token"].copy();

    let missing = tiny_file(dir.path(), "missing", |t| {
        t.remove("backbone.blocks.2.mlp.fc1.bias");
    });
    let err = model.load(&missing, LoadMode::Strict).unwrap_err();
    assert!(
        matches!(err, Error::MissingKey { ref key, .. } if key == "backbone.blocks.2.mlp.fc1.bias"),
        "{err}"
    );

    let extra = tiny_file(dir.path(), "extra", |t| {
        t.insert(
            "backbone.head.weight".into(),
            Tensor::zeros([2, 192], (Kind::Float, Device::Cpu)),
        );
    });
    let err = model.load(&extra, LoadMode::Strict).unwrap_err();
    assert!(err.to_string().contains("backbone.head.weight"), "{err}");

    let shape = tiny_file(dir.path(), "shape", |t| {
        t.insert(
            "backbone.pos_embed".into(),
            Tensor::zeros([1, 37, 192], (Kind::Float, Device::Cpu)),
        );
    });
    let err = model.load(&shape, LoadMode::Strict).unwrap_err();
    assert!(
        matches!(err, Error::ShapeMismatch { ref key, .. } if key == "backbone.pos_embed"),
        "{err}"
    );
    assert!(err.to_string().contains("[1, 37, 192]"), "{err}");

    let ints = tiny_file(dir.path(), "ints", |t| {
        t.insert(
            "backbone.norm.bias".into(),
            Tensor::zeros([192], (Kind::Int64, Device::Cpu)),
        );
    });
    let err = model.load(&ints, LoadMode::Strict).unwrap_err();
    assert!(err.to_string().contains("backbone.norm.bias"), "{err}");

    // No failed load changed anything.
    assert!(model.var_store().variables()["backbone.cls_token"].equal(&pristine));

    // Partial mode reports instead of failing.
    let report = model.load(&missing, LoadMode::Partial).unwrap();
    assert_eq!(
        report.missing,
        vec!["backbone.blocks.2.mlp.fc1.bias".to_string()]
    );
}

#[test]
fn module_prefixed_keys_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_file(dir.path(), "prefixed", |t| {
        let moved: BTreeMap<String, Tensor> = std::mem::take(t)
            .into_iter()
            .map(|(k, v)| (format!("module.{k}"), v))
            .collect();
        *t = moved;
    });
    let cfg = endofm_worker::verify::ReferenceDir::open(&support::tiny())
        .unwrap()
        .model_config()
        .unwrap();
    let mut model = EndoFm::new(&cfg, Device::Cpu).unwrap();
    model.load(&path, LoadMode::Strict).unwrap();
}

#[test]
fn unreadable_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = weights::read(&dir.path().join("nope.safetensors")).unwrap_err();
    assert!(err.to_string().contains("nope.safetensors"), "{err}");
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"definitely not safetensors").unwrap();
    let err = weights::read(&junk).unwrap_err();
    assert!(err.to_string().contains("junk.safetensors"), "{err}");
}
