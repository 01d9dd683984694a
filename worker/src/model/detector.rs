//! The published KUMC polyp detector, STFT on FCOS over the Endo-FM ViT
//! (`STFT/stft_core/modeling/detector/generalized_rcnn_stft.py`, `GeneralizedRCNNSTFT` with the
//! `R-50-FPN-RETINANET` backbone that the Endo-FM code replaces by its ViT): the TimeSformer
//! (`backbone.body.*`) turned into a simple pyramid and FPN P3–P7 ([`pyramid`]), the FCOS head
//! with the STFT branch ([`head`], deformable convolution in [`deform`]), the training targets
//! and losses ([`loss`]) and the post-processing into boxes ([`postprocess`]).
//!
//! Parameters live in one variable store under the published state-dict keys
//! (`backbone.body.*`, `backbone.fpn.*`, `rpn.head.*`), so published detector checkpoints load
//! by name; BatchNorm's `num_batches_tracked` counters of the unused `fpn1` branch are written
//! on save (as 0) and ignored on load.
//!
//! Two backbone paths, as published: training runs the ViT on each sample's whole clip of
//! `T` frames (current frame first, then its references) at once
//! ([`Detector::features_clip`]); testing runs it frame by frame (`T = 1`) and concatenates
//! ([`Detector::features_per_frame`]).

pub mod deform;
pub mod head;
pub mod loss;
pub mod postprocess;
pub mod pyramid;

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Device, Kind, Tensor, nn};

use endofm_shared::{DetectorConfig, ModelConfig};

use crate::model::TimeSformer;
use crate::model::weights::{self, LoadMode, LoadReport};
use crate::{Error, Result};
pub use head::HeadOutput;
pub use loss::{GroundTruth, Losses, Normalisers, Targets};
pub use postprocess::Detections;

/// Suffix of BatchNorm step counters (int64 buffers with no effect on the outputs).
const BATCHES_TRACKED: &str = ".num_batches_tracked";

/// The detector.
#[derive(Debug)]
pub struct Detector {
    vs: nn::VarStore,
    body: TimeSformer,
    pyramid: pyramid::SimplePyramid,
    fpn: pyramid::Fpn,
    head: head::FcosStftHead,
    cfg: ModelConfig,
    det: DetectorConfig,
}

impl Detector {
    /// A randomly initialised detector (libtorch's generator; seed it with `tch::manual_seed`)
    /// with the published initialisation of each part. `model` gives the ViT (its drop-path
    /// rate included), `det` the rest.
    ///
    /// Errors: an invalid configuration.
    pub fn new(model: &ModelConfig, det: &DetectorConfig, device: Device) -> Result<Self> {
        model.validate()?;
        det.validate()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let body_path = &root / "backbone" / "body";
        let body = TimeSformer::new(&root / "backbone" / "body", model);
        let d = model.embed_dim as i64;
        let pyramid = pyramid::SimplePyramid::new(&body_path, d);
        let fpn = pyramid::Fpn::new(&(&root / "backbone" / "fpn"), d, det.fpn_channels as i64);
        let head = head::FcosStftHead::new(&(&root / "rpn" / "head"), det);
        Ok(Self {
            vs,
            body,
            pyramid,
            fpn,
            head,
            cfg: model.clone(),
            det: det.clone(),
        })
    }

    /// The ViT's configuration.
    pub fn model_config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The head's configuration.
    pub fn config(&self) -> &DetectorConfig {
        &self.det
    }

    /// The variable store (parameters under the published keys).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Mutable access to the variable store.
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// Device of the parameters.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The ViT.
    pub fn body(&self) -> &TimeSformer {
        &self.body
    }

    /// Checks that `x` is a float (B, 3, T, H, W) clip batch with H and W multiples of 32 (every
    /// pyramid level integral, as the published resize guarantees).
    pub fn check_input(&self, name: &str, x: &Tensor) -> Result<()> {
        self.body.check_input(name, x)?;
        let size = x.size();
        let unit = 2 * self.cfg.patch_size as i64;
        if size[3] % unit != 0 || size[4] % unit != 0 {
            return Err(Error::Input {
                name: name.to_string(),
                reason: format!(
                    "frames of {}x{} pixels: height and width must be multiples of {unit} (twice the patch size)",
                    size[3], size[4]
                ),
            });
        }
        Ok(())
    }

    /// The ViT's pyramid of a clip batch (B, 3, T, H, W) run as whole clips:
    /// `[stride 8, 16, 32]` maps (B·T, D, ·, ·), sample-major (`train.body.*` of the vectors).
    pub fn body_clip(&self, x: &Tensor, train: bool) -> [Tensor; 3] {
        let (b, _, t, h, w) = x.size5().expect("checked by check_input");
        let ps = self.cfg.patch_size as i64;
        let (gh, gw) = (h / ps, w / ps);
        let d = self.cfg.embed_dim as i64;
        let tokens = self.body.forward_tokens(x, train);
        // Patch tokens are ordered (h, w, t): → (B, T, D, h, w) → (B·T, D, h, w).
        let map = tokens
            .narrow(1, 1, gh * gw * t)
            .reshape([b, gh, gw, t, d])
            .permute([0, 3, 4, 1, 2])
            .reshape([b * t, d, gh, gw]);
        self.pyramid.forward(&map)
    }

    /// P3–P7 of a clip batch (B, 3, T, H, W) with the ViT run on each whole clip (the training
    /// path): five (B·T, C, ·, ·) maps, sample-major.
    pub fn features_clip(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        self.fpn.forward(&self.body_clip(x, train))
    }

    /// P3–P7 with the ViT run on every frame alone (`T = 1`, the published test path), the
    /// frames of each sample kept together: five (B·T, C, ·, ·) maps, sample-major.
    pub fn features_per_frame(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        let (b, c, t, h, w) = x.size5().expect("checked by check_input");
        // Every frame a clip of one: (B·T, C, 1, H, W), in (sample, frame) order.
        let frames = x.permute([0, 2, 1, 3, 4]).reshape([b * t, c, 1, h, w]);
        self.fpn.forward(&self.body_clip(&frames, train))
    }

    /// The head on pyramid features of samples of `frames` frames.
    pub fn head(&self, features: &[Tensor], frames: i64) -> Result<HeadOutput> {
        self.head.forward(features, frames)
    }

    /// Training forward: the ViT on whole clips, the head, the targets and the five losses
    /// (normalised by this batch's own counts: a single rank; see [`loss::Normalisers`] for
    /// several). `x`: (B, 3, T, H, W), `targets`: one per sample.
    pub fn train_losses(
        &self,
        x: &Tensor,
        targets: &[Targets],
        train: bool,
    ) -> Result<(HeadOutput, GroundTruth, Losses)> {
        self.check_input("clip", x)?;
        let t = x.size()[2];
        let out = self.head(&self.features_clip(x, train), t)?;
        let gt = loss::ground_truth(
            &self.det,
            &out.locations,
            targets,
            &Tensor::cat(&out.pre_bbox, 1),
        )?;
        let norm = Normalisers::from_reduced(loss::local_counts(&self.det, &gt), 1);
        let losses = loss::losses(&self.det, &out, &gt, norm);
        Ok((out, gt, losses))
    }

    /// Test forward: the ViT frame by frame, the head, and the detections of every sample.
    /// `x`: (B, 3, T, H, W) (frame 0 of each sample the current frame).
    pub fn detect(&self, x: &Tensor) -> Result<(HeadOutput, Vec<Detections>)> {
        self.check_input("clip", x)?;
        let (b, _, t, h, w) = x.size5().expect("checked");
        let out = tch::no_grad(|| self.head(&self.features_per_frame(x, false), t))?;
        let dets = (0..b)
            .map(|i| postprocess::detect(&self.det, &out, i, h, w))
            .collect();
        Ok((out, dets))
    }

    /// Initialises the ViT (`backbone.body.*`) from a pre-training checkpoint (ours or the
    /// published one: a folder with `teacher`/`student` networks, a fine-tuned folder, one
    /// safetensors file, or a `.pth`), through the fine-tuning loader
    /// ([`crate::finetune::load_backbone`]: every backbone key required, position/time tables of
    /// another size resized the reference's way). The pyramid and head keep their
    /// initialisation. Returns the description of what was loaded.
    pub fn init_backbone(
        &mut self,
        init: &crate::init::InitSource,
        from: endofm_shared::InitFrom,
    ) -> Result<String> {
        // The checkpoint's `backbone.<key>` names, on a ViT of the same configuration.
        let staging = nn::VarStore::new(Device::Cpu);
        let _vit = TimeSformer::new(staging.root() / "backbone", &self.cfg);
        let described = crate::finetune::load_backbone(&staging, init, from)?;
        let ours = self.vs.variables();
        tch::no_grad(|| -> Result<()> {
            for (key, t) in staging.variables() {
                let name = key.replacen("backbone.", "backbone.body.", 1);
                let mut var = ours
                    .get(&name)
                    .ok_or_else(|| Error::Input {
                        name: name.clone(),
                        reason: "internal: the detector has no such ViT parameter".into(),
                    })?
                    .shallow_clone();
                var.copy_(&t.to_device(var.device()).to_kind(var.kind()));
            }
            Ok(())
        })?;
        Ok(described)
    }

    /// Loads parameters under the published keys (`module.` prefixes stripped; BatchNorm
    /// `num_batches_tracked` counters ignored).
    pub fn load(&mut self, path: &Path, mode: LoadMode) -> Result<LoadReport> {
        let tensors = weights::read(path)?;
        self.load_tensors(tensors, path, mode)
    }

    /// [`Detector::load`] from tensors already read (`origin` names them in errors).
    pub fn load_tensors(
        &mut self,
        tensors: BTreeMap<String, Tensor>,
        origin: &Path,
        mode: LoadMode,
    ) -> Result<LoadReport> {
        let tensors = tensors
            .into_iter()
            .filter(|(k, _)| !k.ends_with(BATCHES_TRACKED))
            .collect();
        weights::load_tensors(&self.vs, tensors, origin, mode)
    }

    /// Saves every parameter under the published keys, with the BatchNorm counters a PyTorch
    /// `load_state_dict(strict=True)` expects.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: BTreeMap<String, Tensor> = self.vs.variables().into_iter().collect();
        let counters: Vec<String> = tensors
            .keys()
            .filter_map(|k| k.strip_suffix(".running_mean"))
            .map(|p| format!("{p}{BATCHES_TRACKED}"))
            .collect();
        for k in counters {
            tensors.insert(k, Tensor::zeros([], (Kind::Int64, Device::Cpu)));
        }
        weights::write(path, &tensors)
    }

    /// Parameters that never receive a gradient: the unused `fpn1` branch and the offset
    /// convolutions (run without gradient, as published).
    pub fn is_gradient_free(name: &str) -> bool {
        name.starts_with("backbone.body.fpn1.") || name.ends_with(".conv_offset.weight")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (ModelConfig, DetectorConfig) {
        let model = crate::test_support::small_model(1);
        let det = DetectorConfig {
            fpn_channels: 32,
            ..DetectorConfig::default()
        };
        (model, det)
    }

    #[test]
    fn keys_are_the_published_ones_and_save_load_round_trips() {
        let _rng = crate::test_support::rng_lock();
        tch::manual_seed(1);
        let (model, det) = tiny();
        let net = Detector::new(&model, &det, Device::Cpu).unwrap();
        let vars = net.var_store().variables();
        for key in [
            "backbone.body.blocks.0.attn.qkv.weight",
            "backbone.body.fpn1.1.running_var",
            "backbone.body.fpn2.0.weight",
            "backbone.fpn.fpn_inner2.weight",
            "backbone.fpn.top_blocks.p7.bias",
            "rpn.head.cls_tower.10.weight",
            "rpn.head.dcn_bbox_subnet.conv_offset.weight",
            "rpn.head.scales.4.scale",
        ] {
            assert!(vars.contains_key(key), "{key} missing");
        }
        assert!(!vars.contains_key("rpn.head.cls_tower.12.weight"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("det.safetensors");
        net.save(&path).unwrap();
        let saved = weights::read(&path).unwrap();
        assert_eq!(
            saved["backbone.body.fpn1.1.num_batches_tracked"].kind(),
            Kind::Int64
        );
        tch::manual_seed(2);
        let mut other = Detector::new(&model, &det, Device::Cpu).unwrap();
        other.load(&path, LoadMode::Strict).unwrap();
        let a = &net.var_store().variables()["rpn.head.cls_logits.weight"];
        let b = &other.var_store().variables()["rpn.head.cls_logits.weight"];
        assert!(a.equal(b));
    }

    #[test]
    fn the_backbone_loads_from_a_pretraining_checkpoint() {
        let _rng = crate::test_support::rng_lock();
        tch::manual_seed(4);
        let (model, det) = tiny();
        let pretrained = crate::model::EndoFm::new(&model, Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        pretrained
            .save(&dir.path().join("teacher.safetensors"))
            .unwrap();
        let mut net = Detector::new(&model, &det, Device::Cpu).unwrap();
        let head_before = net.var_store().variables()["rpn.head.cls_logits.weight"].copy();
        net.init_backbone(
            &crate::init::InitSource::Folder(dir.path().to_path_buf()),
            endofm_shared::InitFrom::Teacher,
        )
        .unwrap();
        let ours = net.var_store().variables();
        let theirs = pretrained.var_store().variables();
        for key in ["blocks.0.attn.qkv.weight", "pos_embed", "norm.bias"] {
            assert!(
                ours[&format!("backbone.body.{key}")].equal(&theirs[&format!("backbone.{key}")]),
                "{key}"
            );
        }
        assert!(ours["rpn.head.cls_logits.weight"].equal(&head_before));
        // A file without the backbone is refused, naming it.
        let empty = dir.path().join("empty.safetensors");
        weights::write(&empty, &BTreeMap::new()).unwrap();
        let err = net
            .init_backbone(
                &crate::init::InitSource::Weights(empty.clone()),
                endofm_shared::InitFrom::Teacher,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty.safetensors"), "{err}");
    }

    #[test]
    fn one_training_step_and_detection_run_at_any_size() {
        let _rng = crate::test_support::rng_lock();
        tch::manual_seed(3);
        let (model, det) = tiny();
        let net = Detector::new(&model, &det, Device::Cpu).unwrap();
        let x = Tensor::randn([2, 3, 3, 64, 96], (Kind::Float, Device::Cpu));
        let targets = vec![
            Targets {
                boxes: Tensor::from_slice(&[10.0f32, 12.0, 40.0, 50.0]).view([1, 4]),
                labels: Tensor::from_slice(&[1i64]),
            },
            Targets {
                boxes: Tensor::zeros([0, 4], (Kind::Float, Device::Cpu)),
                labels: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
            },
        ];
        let (out, gt, losses) = net.train_losses(&x, &targets, true).unwrap();
        assert_eq!(out.batch(), 2);
        assert_eq!(gt.classes.size(), [2, 8 * 12 + 4 * 6 + 2 * 3 + 2 + 1]);
        let total = losses.total();
        assert!(total.double_value(&[]).is_finite());
        total.backward();
        for (name, var) in net.var_store().variables() {
            let has = var.grad().defined();
            // Scales of levels without positives may get zero gradients, but still get one.
            assert_eq!(
                has,
                !Detector::is_gradient_free(&name),
                "{name}: gradient defined = {has}"
            );
        }
        let (_, dets) = net.detect(&x).unwrap();
        assert_eq!(dets.len(), 2);
        let bad = Tensor::randn([1, 3, 3, 48, 64], (Kind::Float, Device::Cpu));
        assert!(net.detect(&bad).is_err());
    }
}
