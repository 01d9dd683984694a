//! The DINO projection head: an MLP (Linear + exact GELU between layers) to a bottleneck, L2
//! normalisation, then a weight-normalised linear layer without bias whose rows are
//! `weight_g · weight_v / ‖weight_v‖` (`weight_g` frozen at 1 by default, as in the reference).
//! Parameter paths: `mlp.0`, `mlp.2`, ... (the GELUs take the odd indices), `last_layer.weight_g`,
//! `last_layer.weight_v`.

use tch::{Tensor, nn};

use endofm_shared::ModelConfig;

/// The projection head.
#[derive(Debug)]
pub struct DinoHead {
    mlp: Vec<nn::Linear>,
    weight_g: Tensor,
    weight_v: Tensor,
}

impl DinoHead {
    /// Creates the head's parameters under `p` (the reference prefix is `head`).
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Self {
        let widths = cfg.head_mlp_widths();
        let mlp = widths
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                nn::linear(
                    &p / "mlp" / (2 * i),
                    w[0] as i64,
                    w[1] as i64,
                    nn::LinearConfig {
                        ws_init: nn::Init::Randn {
                            mean: 0.0,
                            stdev: 0.02,
                        },
                        bs_init: Some(nn::Init::Const(0.0)),
                        bias: true,
                    },
                )
            })
            .collect();
        let out = cfg.head.out_dim as i64;
        let bottleneck = cfg.head.bottleneck_dim as i64;
        let last = &p / "last_layer";
        // nn.Linear's default initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        let bound = 1.0 / (bottleneck as f64).sqrt();
        let weight_v = last.var(
            "weight_v",
            &[out, bottleneck],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let weight_g = if cfg.head.norm_last_layer {
            last.ones_no_train("weight_g", &[out, 1])
        } else {
            last.var("weight_g", &[out, 1], nn::Init::Const(1.0))
        };
        Self {
            mlp,
            weight_g,
            weight_v,
        }
    }

    /// (N, D) features → (N, out_dim) logits.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let last = self.mlp.len() - 1;
        let mut x = x.shallow_clone();
        for (i, layer) in self.mlp.iter().enumerate() {
            x = x.apply(layer);
            if i < last {
                x = x.gelu("none");
            }
        }
        let norm = x
            .norm_scalaropt_dim(2, [-1], true)
            .clamp_min(1e-12)
            .expand_as(&x);
        let x = x / norm;
        let v_norm = self.weight_v.norm_scalaropt_dim(2, [1], true);
        let weight = &self.weight_v * (&self.weight_g / v_norm);
        x.matmul(&weight.transpose(0, 1))
    }
}

impl nn::Module for DinoHead {
    fn forward(&self, xs: &Tensor) -> Tensor {
        DinoHead::forward(self, xs)
    }
}
