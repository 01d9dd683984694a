//! The TransUNet cascaded upsampling decoder and segmentation head
//! (`TransUNet/networks/vit_seg_modeling.py`: `Conv2dReLU`, `DecoderBlock`, `DecoderCup`,
//! `SegmentationHead`), with BatchNorm layers that keep running statistics.

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use endofm_shared::SegmenterConfig;

use super::resnet::torch_conv_config;

/// Momentum of the running statistics (`nn.BatchNorm2d`'s default).
pub const BN_MOMENTUM: f64 = 0.1;

/// `nn.BatchNorm2d` (eps 1e-5, momentum 0.1) with its buffers under the published names:
/// `weight`, `bias`, `running_mean`, `running_var`, `num_batches_tracked` (int64).
#[derive(Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
}

impl BatchNorm2d {
    /// Weight 1, bias 0, running mean 0 and variance 1, like PyTorch.
    pub fn new(p: nn::Path, channels: i64) -> Self {
        let tracked = Tensor::zeros([], (Kind::Int64, p.device()));
        Self {
            weight: p.var("weight", &[channels], nn::Init::Const(1.0)),
            bias: p.var("bias", &[channels], nn::Init::Const(0.0)),
            running_mean: p.zeros_no_train("running_mean", &[channels]),
            running_var: p.ones_no_train("running_var", &[channels]),
            num_batches_tracked: p.add("num_batches_tracked", tracked, false),
        }
    }

    /// Normalises `x` (N, C, H, W): batch statistics in training (updating the running ones
    /// in place and counting the batch), the running ones otherwise.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        if train {
            tch::no_grad(|| {
                let mut n = self.num_batches_tracked.shallow_clone();
                let _ = n.g_add_scalar_(1);
            });
        }
        Tensor::batch_norm(
            x,
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            BN_MOMENTUM,
            1e-5,
            x.device() != Device::Cpu,
        )
    }
}

/// 3×3 convolution (no bias) → BatchNorm → ReLU, parameters `<p>.0.*` and `<p>.1.*`.
#[derive(Debug)]
struct ConvBnRelu {
    conv: nn::Conv2D,
    bn: BatchNorm2d,
}

impl ConvBnRelu {
    fn new(p: nn::Path, cin: i64, cout: i64) -> Self {
        Self {
            conv: nn::conv2d(
                &p / 0,
                cin,
                cout,
                3,
                torch_conv_config(cin * 9, 1, 1, false),
            ),
            bn: BatchNorm2d::new(&p / 1, cout),
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(&x.apply(&self.conv), train).relu()
    }
}

/// Bilinear ×2 upsampling with aligned corners (`nn.UpsamplingBilinear2d(scale_factor=2)`).
fn upsample2(x: &Tensor) -> Tensor {
    let (h, w) = (x.size()[2], x.size()[3]);
    x.upsample_bilinear2d([2 * h, 2 * w], true, None, None)
}

/// `conv_more`, four decoder blocks (upsample ×2, concatenate the skip feature, two
/// conv-BN-ReLU) and the head (3×3 conv with bias to the classes).
#[derive(Debug)]
pub struct Decoder {
    conv_more: ConvBnRelu,
    blocks: Vec<(ConvBnRelu, ConvBnRelu)>,
    head: nn::Conv2D,
    n_skip: usize,
}

impl Decoder {
    /// The decoder under `decoder` and the head under `segmentation_head` of `root`, for tokens
    /// of width `hidden`.
    pub fn new(root: &nn::Path, cfg: &SegmenterConfig, hidden: i64) -> Self {
        let p = root / "decoder";
        let head_ch = cfg.head_channels as i64;
        let outs: Vec<i64> = cfg.decoder_channels.iter().map(|&c| c as i64).collect();
        let ins: Vec<i64> = std::iter::once(head_ch)
            .chain(outs.iter().copied().take(3))
            .collect();
        let skips = cfg.skip_channels();
        let blocks = (0..4)
            .map(|i| {
                let bp = &p / "blocks" / i;
                let cin = ins[i] + skips[i] as i64;
                (
                    ConvBnRelu::new(&bp / "conv1", cin, outs[i]),
                    ConvBnRelu::new(&bp / "conv2", outs[i], outs[i]),
                )
            })
            .collect();
        let last = outs[3];
        Self {
            conv_more: ConvBnRelu::new(&p / "conv_more", hidden, head_ch),
            blocks,
            head: nn::conv2d(
                root / "segmentation_head" / 0,
                last,
                cfg.n_classes as i64,
                3,
                torch_conv_config(last * 9, 1, 1, true),
            ),
            n_skip: cfg.n_skip,
        }
    }

    /// `tokens` (N, h·w, D) on a square grid and the stem's skip features (deepest first) →
    /// logits (N, classes, 16h, 16w).
    pub fn forward_t(&self, tokens: &Tensor, skips: &[Tensor], train: bool) -> Tensor {
        let (n, np, d) = tokens.size3().expect("tokens are (N, h·w, D)");
        let side = (np as f64).sqrt().round() as i64;
        let x = tokens.transpose(1, 2).contiguous().view([n, d, side, side]);
        let mut x = self.conv_more.forward_t(&x, train);
        for (i, (conv1, conv2)) in self.blocks.iter().enumerate() {
            x = upsample2(&x);
            if i < self.n_skip {
                x = Tensor::cat(&[&x, &skips[i]], 1);
            }
            x = conv2.forward_t(&conv1.forward_t(&x, train), train);
        }
        x.apply(&self.head)
    }
}

impl Module for BatchNorm2d {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_t(x, false)
    }
}
