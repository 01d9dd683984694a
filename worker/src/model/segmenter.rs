//! The segmentation network of the paper: TransUNet's R50-ViT hybrid with the Endo-FM blocks as
//! its encoder, as `TransUNet/networks/vit_seg_modeling.py` (`VisionTransformer`) builds it for
//! Endo-FM. The frames of one sequence are the batch: a ResNetV2 stem ([`resnet`]) turns each
//! (3, S, S) frame into a (16w, S/16, S/16) map, a 1×1 convolution projects it to S²/256 tokens
//! of width D plus a learnt position table, the tokens of all T frames (ordered (h, w, t) after a
//! CLS token) run through the Endo-FM divided space-time blocks, the final LayerNorm, and the
//! cascaded upsampling decoder with skip connections from the stem ([`decoder`]) gives logits
//! (T, classes, S, S).
//!
//! Parameter names are the published state-dict keys (`transformer.embeddings.hybrid_model.…`,
//! `transformer.embeddings.patch_embeddings.…`, `transformer.embeddings.position_embeddings`,
//! `transformer.encoder.layer.<i>.…`, `transformer.encoder.encoder_norm.…`,
//! `transformer.encoder.cls_token`, `decoder.…`, `segmentation_head.0.…`), so the reference's
//! checkpoints load and ours load there. The Endo-FM blocks load from a pre-training checkpoint
//! ([`Segmenter::load_backbone_tensors`]); the published encoder never uses the ViT's own patch
//! embedding, position and time tables.

pub mod decoder;
pub mod resnet;

use std::collections::BTreeMap;
use std::path::Path;

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use endofm_shared::{ModelConfig, SegmenterConfig};

use crate::model::timesformer::{Block, dropout, layer_norm};
use crate::model::{LoadMode, weights};
use crate::{Error, Result};
use decoder::Decoder;
use resnet::ResNetV2;

/// The TransUNet hybrid on Endo-FM blocks, in its own variable store.
#[derive(Debug)]
pub struct Segmenter {
    vs: nn::VarStore,
    stem: ResNetV2,
    patch_embeddings: nn::Conv2D,
    position_embeddings: Tensor,
    cls_token: Tensor,
    blocks: Vec<Block>,
    encoder_norm: nn::LayerNorm,
    decoder: Decoder,
    model: ModelConfig,
    seg: SegmenterConfig,
}

impl Segmenter {
    /// Builds the network for square frames of `model.img_size` pixels: the Endo-FM blocks of
    /// `model` (depth, width, heads, MLP ratio, drop-path rate), the stem/decoder of `seg`.
    /// Initialisation is the reference's: PyTorch's defaults for the stem, projection and
    /// decoder, zero position table, the TimeSformer's for the blocks and CLS token.
    ///
    /// # Errors
    /// An invalid configuration, or an image size the stem cannot take.
    pub fn new(model: &ModelConfig, seg: &SegmenterConfig, device: Device) -> Result<Self> {
        model.validate()?;
        seg.validate()?;
        resnet::check_input_size(model.img_size as i64).map_err(|reason| Error::Input {
            name: "img_size".into(),
            reason,
        })?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let t = &root / "transformer";
        let emb = &t / "embeddings";
        let enc = &t / "encoder";
        let d = model.embed_dim as i64;
        let stem_ch = seg.stem_channels() as i64;
        let grid = model.img_size as i64 / 16;
        let stem = ResNetV2::new(&emb / "hybrid_model", seg);
        let patch_embeddings = nn::conv2d(
            &emb / "patch_embeddings",
            stem_ch,
            d,
            1,
            resnet::torch_conv_config(stem_ch, 1, 0, true),
        );
        let position_embeddings = emb.var(
            "position_embeddings",
            &[1, grid * grid, d],
            nn::Init::Const(0.0),
        );
        let cls_token = enc.var(
            "cls_token",
            &[1, 1, d],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let blocks = model
            .drop_path_rates()
            .into_iter()
            .enumerate()
            .map(|(i, rate)| Block::new(&enc / "layer" / i, model, rate))
            .collect();
        let encoder_norm = layer_norm(&enc / "encoder_norm", d, model.layer_norm_eps);
        let decoder = Decoder::new(&root, seg, d);
        Ok(Self {
            vs,
            stem,
            patch_embeddings,
            position_embeddings,
            cls_token,
            blocks,
            encoder_norm,
            decoder,
            model: model.clone(),
            seg: seg.clone(),
        })
    }

    /// The variable store (published keys).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// The variable store, mutably (for loading).
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// The Endo-FM blocks' configuration (its `img_size` is the frame size).
    pub fn config(&self) -> &ModelConfig {
        &self.model
    }

    /// The stem/decoder configuration.
    pub fn segmenter_config(&self) -> &SegmenterConfig {
        &self.seg
    }

    /// The device of the parameters.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Checks that `x` is a float (T, 3, S, S) sequence of this network's frame size.
    pub fn check_input(&self, name: &str, x: &Tensor) -> Result<()> {
        let size = x.size();
        let s = self.model.img_size as i64;
        if size.len() != 4 || size[0] == 0 || size[1] != 3 || size[2] != s || size[3] != s {
            return Err(Error::Input {
                name: name.to_string(),
                reason: format!(
                    "expected a (frames, 3, {s}, {s}) sequence with at least one frame, got shape {size:?}"
                ),
            });
        }
        if !matches!(
            x.kind(),
            Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
        ) {
            return Err(Error::DType {
                name: name.to_string(),
                found: format!("{:?}", x.kind()),
                expected: "a floating-point type (float32)",
            });
        }
        Ok(())
    }

    /// Logits (T, classes, S, S) of the T frames `x` (T, 3, S, S) of one sequence. In training
    /// mode (`train`) the decoder's BatchNorm layers use (and update) the batch statistics over
    /// the T frames, and embedding dropout and drop-path are active (drawn like the rest of the
    /// run: see [`crate::model::timesformer::with_drop_path_seed`]).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let (features, skips) = self.stem.forward(x);
        let tokens = features.apply(&self.patch_embeddings); // (T, D, g, g)
        let (t, d, gh, gw) = tokens.size4().expect("(T, D, g, g)");
        let tokens = tokens.flatten(2, 3).transpose(1, 2) + &self.position_embeddings;
        let tokens = dropout(&tokens, self.seg.dropout_rate, train); // (T, g², D)
        // The published Encoder: tokens ordered (h, w, t) behind the CLS token, batch 1.
        let seq = tokens.transpose(0, 1).reshape([gh * gw * t, d]);
        let mut x = Tensor::cat(&[self.cls_token.reshape([1, d]), seq], 0).unsqueeze(0);
        for block in &self.blocks {
            x = block.forward_t(&x, t, gw, train);
        }
        let encoded = x
            .apply(&self.encoder_norm)
            .squeeze_dim(0)
            .narrow(0, 1, gh * gw * t)
            .reshape([gh * gw, t, d])
            .transpose(0, 1); // (T, g², D)
        self.decoder.forward_t(&encoded, &skips, train)
    }

    /// Loads the published segmentation network's (or our) weights, strictly by key.
    pub fn load(&mut self, path: &Path, mode: LoadMode) -> Result<()> {
        weights::load(&self.vs, path, mode)?;
        Ok(())
    }

    /// Takes the Endo-FM blocks, final norm and CLS token out of a pre-training network's
    /// tensors (`backbone.blocks.<i>.…`, `backbone.norm.…`, `backbone.cls_token`; a `module.`
    /// prefix is dropped), as the published encoder does; the ViT's patch embedding and tables
    /// and the DINO head are not used. Every encoder parameter must be there with its shape.
    ///
    /// # Errors
    /// A missing encoder key, or a shape that differs (both name the key and `origin`).
    pub fn load_backbone_tensors(
        &self,
        tensors: BTreeMap<String, Tensor>,
        origin: &Path,
    ) -> Result<usize> {
        let mut picked = BTreeMap::new();
        for (key, t) in tensors {
            let key = key.strip_prefix("module.").unwrap_or(&key);
            let Some(rest) = key.strip_prefix("backbone.") else {
                continue;
            };
            let ours = if let Some(block) = rest.strip_prefix("blocks.") {
                format!("transformer.encoder.layer.{block}")
            } else if let Some(norm) = rest.strip_prefix("norm.") {
                format!("transformer.encoder.encoder_norm.{norm}")
            } else if rest == "cls_token" {
                "transformer.encoder.cls_token".to_string()
            } else {
                continue;
            };
            picked.insert(ours, t);
        }
        let vars = self.vs.variables();
        let wanted: Vec<&String> = vars
            .keys()
            .filter(|k| k.starts_with("transformer.encoder."))
            .collect();
        if picked.is_empty() {
            return Err(Error::Input {
                name: "--init".into(),
                reason: format!(
                    "{} holds no `backbone.blocks.*` parameter (is it an Endo-FM checkpoint?)",
                    origin.display()
                ),
            });
        }
        for key in &wanted {
            if !picked.contains_key(*key) {
                let published = key
                    .replace("transformer.encoder.layer.", "backbone.blocks.")
                    .replace("transformer.encoder.encoder_norm.", "backbone.norm.")
                    .replace("transformer.encoder.cls_token", "backbone.cls_token");
                return Err(Error::MissingKey {
                    path: origin.to_path_buf(),
                    key: published,
                    expected: vars.get(*key).map(Tensor::size).unwrap_or_default(),
                });
            }
        }
        if let Some(extra) = picked.keys().find(|k| !vars.contains_key(*k)) {
            return Err(Error::UnexpectedKey {
                path: origin.to_path_buf(),
                key: extra.replace("transformer.encoder.layer.", "backbone.blocks."),
                found: picked.get(extra).map(Tensor::size).unwrap_or_default(),
            });
        }
        let n = picked.len();
        weights::load_tensors(&self.vs, picked, origin, LoadMode::Partial)?;
        Ok(n)
    }
}

impl Module for Segmenter {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_t(x, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (ModelConfig, SegmenterConfig) {
        let mut m = crate::test_support::small_model(2);
        m.img_size = 64;
        (m, SegmenterConfig::tiny())
    }

    #[test]
    fn logits_have_the_frames_shape_and_keys_are_published() {
        let _rng = crate::test_support::rng_lock();
        let (m, s) = tiny();
        let net = Segmenter::new(&m, &s, Device::Cpu).unwrap();
        let x = Tensor::randn([3, 3, 64, 64], (Kind::Float, Device::Cpu));
        let y = net.forward_t(&x, false);
        assert_eq!(y.size(), [3, 2, 64, 64]);
        let vars = net.var_store().variables();
        for key in [
            "transformer.embeddings.hybrid_model.root.conv.weight",
            "transformer.embeddings.hybrid_model.body.block1.unit1.gn_proj.weight",
            "transformer.embeddings.patch_embeddings.bias",
            "transformer.embeddings.position_embeddings",
            "transformer.encoder.layer.1.temporal_fc.weight",
            "transformer.encoder.encoder_norm.weight",
            "transformer.encoder.cls_token",
            "decoder.conv_more.1.num_batches_tracked",
            "decoder.blocks.3.conv2.0.weight",
            "segmentation_head.0.bias",
        ] {
            assert!(vars.contains_key(key), "{key} missing");
        }
        assert!(!vars.contains_key("decoder.blocks.3.conv1.0.bias"));
    }

    #[test]
    fn input_sizes_the_stem_cannot_take_are_refused() {
        assert!(resnet::check_input_size(224).is_ok());
        assert!(resnet::check_input_size(128).is_ok());
        assert!(resnet::check_input_size(100).is_err());
        let (mut m, s) = tiny();
        m.img_size = 40;
        let err = Segmenter::new(&m, &s, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("img_size"), "{err}");
    }
}
