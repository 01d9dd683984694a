//! The fine-tuning classifier of the published code (`eval_finetune.py`): the TimeSformer backbone
//! without its DINO head (`get_vit_base_patch16_224(cfg, no_head=True)`) and a `LinearClassifier`
//! on the CLS feature after the final LayerNorm (`n_last_blocks = 1`, no patch-token pooling).
//! Parameters live in one variable store under the keys `backbone.<ViT key>` and
//! `linear.weight` / `linear.bias`, the names of `shared/reference/endofm-tiny-classify`.

use std::path::Path;

use tch::{Device, Tensor, nn};

use endofm_shared::ModelConfig;

use crate::model::TimeSformer;
use crate::model::weights::{self, LoadMode, LoadReport};
use crate::{Error, Result};

/// Standard deviation of the classifier's initial weights (`weight.data.normal_(0, 0.01)`; the
/// bias starts at zero).
const LINEAR_INIT_STD: f64 = 0.01;

/// Backbone + linear classifier.
#[derive(Debug)]
pub struct Classifier {
    vs: nn::VarStore,
    backbone: TimeSformer,
    linear: nn::Linear,
    cfg: ModelConfig,
    num_labels: usize,
}

impl Classifier {
    /// Builds a randomly initialised classifier with `num_labels` outputs (libtorch's generator:
    /// seed it with `tch::manual_seed` for reproducible weights). Only the backbone fields of
    /// `cfg` are used (its head section is ignored). The drop-path rate is `cfg.drop_path_rate`.
    ///
    /// Errors: an invalid configuration or fewer than two labels.
    pub fn new(cfg: &ModelConfig, num_labels: usize, device: Device) -> Result<Self> {
        cfg.validate()?;
        if num_labels < 2 {
            return Err(Error::Input {
                name: "num_labels".into(),
                reason: format!("{num_labels}: a classifier needs at least 2 labels"),
            });
        }
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let backbone = TimeSformer::new(&root / "backbone", cfg);
        let linear = nn::linear(
            &root / "linear",
            cfg.embed_dim as i64,
            num_labels as i64,
            nn::LinearConfig {
                ws_init: nn::Init::Randn {
                    mean: 0.0,
                    stdev: LINEAR_INIT_STD,
                },
                bs_init: Some(nn::Init::Const(0.0)),
                bias: true,
            },
        );
        Ok(Self {
            vs,
            backbone,
            linear,
            cfg: cfg.clone(),
            num_labels,
        })
    }

    /// The backbone's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Number of classes.
    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// The variable store (parameters under their published keys).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Mutable access to the variable store.
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// The backbone alone.
    pub fn backbone(&self) -> &TimeSformer {
        &self.backbone
    }

    /// Device of the parameters.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// CLS features and logits of a (B, 3, T, H, W) batch: ((B, D), (B, num_labels)).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> (Tensor, Tensor) {
        let features = self.backbone.forward_t(x, train);
        let logits = features.apply(&self.linear);
        (features, logits)
    }

    /// Loads parameters from a safetensors file (keys `backbone.*`, `linear.*`).
    pub fn load(&mut self, path: &Path, mode: LoadMode) -> Result<LoadReport> {
        weights::load(&self.vs, path, mode)
    }

    /// Saves every parameter under the published keys.
    pub fn save(&self, path: &Path) -> Result<()> {
        weights::save(&self.vs, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_published_ones_and_init_follows_the_reference() {
        let _rng = crate::test_support::rng_lock();
        tch::manual_seed(3);
        let cfg = endofm_shared::Preset::Tiny.config();
        let model = Classifier::new(&cfg, 2, Device::Cpu).unwrap();
        let vars = model.var_store().variables();
        assert!(vars.contains_key("backbone.blocks.0.temporal_attn.qkv.weight"));
        assert!(!vars.keys().any(|k| k.starts_with("head.")));
        let w = &vars["linear.weight"];
        assert_eq!(w.size(), vec![2, cfg.embed_dim as i64]);
        let std = w.std(true).double_value(&[]);
        assert!((0.005..0.02).contains(&std), "linear std {std}");
        assert_eq!(
            vars["linear.bias"]
                .abs()
                .sum(tch::Kind::Float)
                .double_value(&[]),
            0.0
        );
        let x = Tensor::zeros([2, 3, 2, 32, 32], (tch::Kind::Float, Device::Cpu));
        let (f, l) = model.forward_t(&x, false);
        assert_eq!(
            (f.size(), l.size()),
            (vec![2, cfg.embed_dim as i64], vec![2, 2])
        );
        assert!(Classifier::new(&cfg, 1, Device::Cpu).is_err());
    }
}
