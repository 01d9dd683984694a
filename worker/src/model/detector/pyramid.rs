//! The feature pyramid of the published detector: the ViT's stride-16 token map turned into a
//! simple pyramid (`backbone.body.fpn2`: 2×2 transposed convolution → stride 8, identity → 16,
//! 2×2 max-pool → 32; `fpn1`, a stride-4 branch, exists in the state dict but is never run) and
//! the FPN on top (`backbone.fpn`: 1×1 lateral and 3×3 output convolutions `fpn_inner{2,3,4}` /
//! `fpn_layer{2,3,4}`, nearest top-down upsampling to the lateral's size, then P6 and P7 as
//! stride-2 3×3 convolutions on P5 and on `relu(P6)`), following `stft_core/modeling/backbone/
//! {vit/timesformer.py, fpn.py, backbone.py}`.

use tch::Tensor;
use tch::nn;

/// `conv_with_kaiming_uniform(use_gn=False, use_relu=False)`: bias, weights
/// `kaiming_uniform_(a=1)` (bound `sqrt(3 / fan_in)`), bias 0, padding `(k − 1) / 2`.
fn kaiming_conv(p: nn::Path, inp: i64, out: i64, k: i64, stride: i64) -> nn::Conv2D {
    let bound = (3.0 / (inp * k * k) as f64).sqrt();
    nn::conv2d(
        p,
        inp,
        out,
        k,
        nn::ConvConfig {
            stride,
            padding: (k - 1) / 2,
            ws_init: nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
            bs_init: nn::Init::Const(0.0),
            ..Default::default()
        },
    )
}

/// PyTorch's default `ConvTranspose2d(d, d, 2, stride=2)` initialisation (weight and bias
/// uniform in ±1/sqrt(fan_in), fan_in = out·k² for a transposed convolution).
fn up2(p: nn::Path, d: i64) -> nn::ConvTranspose2D {
    let bound = 1.0 / ((d * 4) as f64).sqrt();
    let init = nn::Init::Uniform {
        lo: -bound,
        up: bound,
    };
    nn::conv_transpose2d(
        p,
        d,
        d,
        2,
        nn::ConvTransposeConfig {
            stride: 2,
            ws_init: init,
            bs_init: init,
            ..Default::default()
        },
    )
}

/// The ViT's pyramid branches (`backbone.body.fpn1`, `backbone.body.fpn2`).
#[derive(Debug)]
pub struct SimplePyramid {
    fpn2: nn::ConvTranspose2D,
    /// `fpn1` (ConvTranspose, BatchNorm, GELU, ConvTranspose): allocated so published weights
    /// load by name, never run (the published forward uses fpn2–fpn4 only).
    _fpn1: (nn::ConvTranspose2D, nn::BatchNorm, nn::ConvTranspose2D),
}

impl SimplePyramid {
    /// Parameters under `p` (`backbone.body`) for embedding width `d`.
    pub fn new(p: &nn::Path, d: i64) -> Self {
        let fpn1 = p / "fpn1";
        Self {
            fpn2: up2(p / "fpn2" / "0", d),
            _fpn1: (
                up2(&fpn1 / "0", d),
                nn::batch_norm2d(&fpn1 / "1", d, Default::default()),
                up2(&fpn1 / "3", d),
            ),
        }
    }

    /// The stride-16 map `(N, D, h, w)` → `[stride 8 (N, D, 2h, 2w), stride 16, stride 32
    /// (N, D, ⌊h/2⌋, ⌊w/2⌋)]`.
    pub fn forward(&self, x: &Tensor) -> [Tensor; 3] {
        [
            x.apply(&self.fpn2),
            x.shallow_clone(),
            x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false),
        ]
    }
}

/// FPN with P6/P7 (`backbone.fpn`).
#[derive(Debug)]
pub struct Fpn {
    inner: Vec<nn::Conv2D>,
    layer: Vec<nn::Conv2D>,
    p6: nn::Conv2D,
    p7: nn::Conv2D,
}

impl Fpn {
    /// Parameters under `p` (`backbone.fpn`): three inputs of `inp` channels (the published
    /// `in_channels_list = [0, D, D, D]` names them 2–4), `out` channels everywhere, P6/P7 on P5
    /// (`use_P5`, as `RETINANET.USE_C5 = False` makes the input width equal the output's).
    pub fn new(p: &nn::Path, inp: i64, out: i64) -> Self {
        let inner = (2..=4)
            .map(|i| kaiming_conv(p / format!("fpn_inner{i}"), inp, out, 1, 1))
            .collect();
        let layer = (2..=4)
            .map(|i| kaiming_conv(p / format!("fpn_layer{i}"), out, out, 3, 1))
            .collect();
        let top = p / "top_blocks";
        Self {
            inner,
            layer,
            p6: kaiming_conv(&top / "p6", out, out, 3, 2),
            p7: kaiming_conv(&top / "p7", out, out, 3, 2),
        }
    }

    /// `[C3, C4, C5]` (N, inp, ·, ·) → `[P3, P4, P5, P6, P7]` (N, out, ·, ·).
    pub fn forward(&self, c: &[Tensor; 3]) -> Vec<Tensor> {
        let mut last_inner = c[2].apply(&self.inner[2]);
        let mut results = vec![last_inner.apply(&self.layer[2])];
        for i in (0..2).rev() {
            let lateral = c[i].apply(&self.inner[i]);
            let size = lateral.size();
            let top_down = last_inner.upsample_nearest2d([size[2], size[3]], None, None);
            last_inner = lateral + top_down;
            results.insert(0, last_inner.apply(&self.layer[i]));
        }
        let p6 = results[2].apply(&self.p6);
        let p7 = p6.relu().apply(&self.p7);
        results.push(p6);
        results.push(p7);
        results
    }
}
