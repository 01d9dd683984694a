//! The TransUNet hybrid's ResNetV2 stem (`TransUNet/networks/vit_seg_modeling_resnet_skip.py`):
//! weight-standardised convolutions, GroupNorm, pre-activation bottleneck units, and the skip
//! features the decoder reads (with the published zero padding of block 1's output).

use tch::Tensor;
use tch::nn::{self, Module};

use endofm_shared::SegmenterConfig;

/// `nn.Conv2d` parameters with PyTorch's default initialisation (`kaiming_uniform(a=√5)`:
/// weight and bias uniform in ±1/√fan_in).
pub(crate) fn torch_conv_config(
    fan_in: i64,
    stride: i64,
    padding: i64,
    bias: bool,
) -> nn::ConvConfig {
    let bound = 1.0 / (fan_in as f64).sqrt();
    nn::ConvConfig {
        stride,
        padding,
        bias,
        ws_init: nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
        bs_init: nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
        ..Default::default()
    }
}

/// A convolution whose weight is standardised per output channel before use
/// (`(w − mean) / √(var + 1e-5)`, biased variance over (in, kh, kw)): the published `StdConv2d`.
#[derive(Debug)]
pub struct StdConv2d {
    weight: Tensor,
    stride: i64,
    padding: i64,
}

impl StdConv2d {
    /// Weight `(cout, cin, k, k)` under `p/weight`, no bias (the stem's convolutions have none).
    pub fn new(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> Self {
        let cfg = torch_conv_config(cin * k * k, stride, padding, false);
        let weight = p.var("weight", &[cout, cin, k, k], cfg.ws_init);
        Self {
            weight,
            stride,
            padding,
        }
    }
}

impl Module for StdConv2d {
    fn forward(&self, x: &Tensor) -> Tensor {
        let (var, mean) = self
            .weight
            .var_mean_correction(Some([1i64, 2, 3].as_slice()), 0, true);
        let w = (&self.weight - mean) / (var + 1e-5).sqrt();
        x.conv2d(
            &w,
            None::<&Tensor>,
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )
    }
}

fn group_norm(p: nn::Path, groups: i64, channels: i64, eps: f64) -> nn::GroupNorm {
    nn::group_norm(
        p,
        groups,
        channels,
        nn::GroupNormConfig {
            eps,
            ..Default::default()
        },
    )
}

/// A pre-activation bottleneck unit (published `PreActBottleneck`): 1×1 → 3×3 (stride) → 1×1
/// with GroupNorm(32, eps 1e-6) and ReLU, plus a projection (1×1 conv + GroupNorm(cout, cout))
/// when the stride or the width changes.
#[derive(Debug)]
struct Bottleneck {
    conv1: StdConv2d,
    gn1: nn::GroupNorm,
    conv2: StdConv2d,
    gn2: nn::GroupNorm,
    conv3: StdConv2d,
    gn3: nn::GroupNorm,
    projection: Option<(StdConv2d, nn::GroupNorm)>,
}

impl Bottleneck {
    fn new(p: nn::Path, cin: i64, cout: i64, cmid: i64, stride: i64) -> Self {
        let projection = (stride != 1 || cin != cout).then(|| {
            (
                StdConv2d::new(&p / "downsample", cin, cout, 1, stride, 0),
                group_norm(&p / "gn_proj", cout, cout, 1e-5),
            )
        });
        Self {
            gn1: group_norm(&p / "gn1", 32, cmid, 1e-6),
            conv1: StdConv2d::new(&p / "conv1", cin, cmid, 1, 1, 0),
            gn2: group_norm(&p / "gn2", 32, cmid, 1e-6),
            conv2: StdConv2d::new(&p / "conv2", cmid, cmid, 3, stride, 1),
            gn3: group_norm(&p / "gn3", 32, cout, 1e-6),
            conv3: StdConv2d::new(&p / "conv3", cmid, cout, 1, 1, 0),
            projection,
        }
    }
}

impl Module for Bottleneck {
    fn forward(&self, x: &Tensor) -> Tensor {
        let residual = match &self.projection {
            Some((conv, gn)) => x.apply(conv).apply(gn),
            None => x.shallow_clone(),
        };
        let y = x.apply(&self.conv1).apply(&self.gn1).relu();
        let y = y.apply(&self.conv2).apply(&self.gn2).relu();
        let y = y.apply(&self.conv3).apply(&self.gn3);
        (residual + y).relu()
    }
}

/// The stem: root (7×7/2 std-conv, GroupNorm, ReLU), 3×3/2 max-pool (no padding), three blocks
/// of bottleneck units (widths 4w, 8w, 16w; blocks 2 and 3 stride 2). Parameters under
/// `transformer.embeddings.hybrid_model`.
#[derive(Debug)]
pub struct ResNetV2 {
    root_conv: StdConv2d,
    root_gn: nn::GroupNorm,
    blocks: Vec<Vec<Bottleneck>>,
}

impl ResNetV2 {
    /// Builds the stem of `cfg` under `p`.
    pub fn new(p: nn::Path, cfg: &SegmenterConfig) -> Self {
        let w = cfg.resnet_width as i64;
        let root = &p / "root";
        let body = &p / "body";
        let shapes = [
            (w, 4 * w, w, 1),
            (4 * w, 8 * w, 2 * w, 2),
            (8 * w, 16 * w, 4 * w, 2),
        ];
        let blocks = shapes
            .iter()
            .zip(&cfg.resnet_units)
            .enumerate()
            .map(|(b, (&(cin, cout, cmid, stride), &units))| {
                let bp = &body / format!("block{}", b + 1);
                (1..=units)
                    .map(|u| {
                        let (cin, stride) = if u == 1 { (cin, stride) } else { (cout, 1) };
                        Bottleneck::new(&bp / format!("unit{u}"), cin, cout, cmid, stride)
                    })
                    .collect()
            })
            .collect();
        Self {
            root_conv: StdConv2d::new(&root / "conv", 3, w, 7, 2, 3),
            root_gn: group_norm(&root / "gn", 32, w, 1e-6),
            blocks,
        }
    }

    /// `x` (N, 3, S, S) → the stem's output (N, 16w, S/16, S/16) and the skip features, deepest
    /// first: block 2's output (S/8), block 1's zero-padded at the bottom/right to S/4 (the
    /// max-pool without padding leaves it one or two pixels short), the root's (S/2).
    pub fn forward(&self, x: &Tensor) -> (Tensor, Vec<Tensor>) {
        let in_size = x.size()[2];
        let root = x.apply(&self.root_conv).apply(&self.root_gn).relu();
        let mut features = vec![root.shallow_clone()];
        let mut y = root.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false);
        let last = self.blocks.len() - 1;
        for (i, block) in self.blocks.iter().enumerate() {
            for unit in block {
                y = y.apply(unit);
            }
            if i == last {
                break;
            }
            // The published `right_size = int(in_size / 4 / (i + 1))`.
            let right = (in_size as f64 / 4.0 / (i + 1) as f64) as i64;
            let have = y.size()[2];
            let feat = if have < right {
                y.constant_pad_nd([0, right - y.size()[3], 0, right - have])
            } else {
                y.shallow_clone()
            };
            features.push(feat);
        }
        features.reverse();
        (y, features)
    }
}

/// Checks the published stem's size rule for an input of `size` pixels: the skip features are
/// padded by at most two pixels (the published code asserts `0 < pad < 3`).
pub fn check_input_size(size: i64) -> Result<(), String> {
    if size < 32 || size % 16 != 0 {
        return Err(format!(
            "{size} px: the hybrid needs a square input of at least 32 px, a multiple of 16"
        ));
    }
    let root = (size + 2 * 3 - 7) / 2 + 1;
    let pooled = (root - 3) / 2 + 1;
    let pad = size / 4 - pooled;
    if !(0..3).contains(&pad) {
        return Err(format!(
            "{size} px: block 1's output ({pooled} px) is {pad} px short of {} px",
            size / 4
        ));
    }
    Ok(())
}
