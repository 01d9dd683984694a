//! The STFT-FCOS head (`rpn.head`, `stft_core/modeling/rpn/fcos_stft/fcos_stft.py`,
//! `STFTFCOSHead`): per pyramid level, a classification and a regression tower
//! (`num_convs` × conv 3×3 + GroupNorm + ReLU), FCOS outputs for the current frame
//! (class logits, `relu(scale·x)·stride` ltrb distances, centerness on the regression tower),
//! and the spatial-temporal feature transformation: each frame's predicted boxes (detached)
//! become ltrb offsets on the level's grid, the reference frames' taken relative to the
//! current frame's, a 1×1 convolution (run without gradient, as published) turns them into
//! deformable-convolution offsets, the deformably aligned tower features of the reference frames
//! are attended per channel by the current frame's, and two 3×3 convolutions predict the STFT
//! class logits and box refinements.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use endofm_shared::DetectorConfig;

use super::deform::deform_conv2d;
use crate::Result;

/// Conv 3×3 (padding 1) with weights N(0, std) and a constant bias.
fn conv3(p: nn::Path, inp: i64, out: i64, std: f64, bias: f64) -> nn::Conv2D {
    nn::conv2d(
        p,
        inp,
        out,
        3,
        nn::ConvConfig {
            padding: 1,
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: std,
            },
            bs_init: nn::Init::Const(bias),
            ..Default::default()
        },
    )
}

/// Level locations: `(x·s + s/2, y·s + s/2)` for the `h × w` grid of stride `s`, row-major
/// `(y, x)`: (h·w, 2) float.
pub fn locations(h: i64, w: i64, stride: i64, device: tch::Device) -> Tensor {
    let opts = (Kind::Float, device);
    let xs = Tensor::arange(w, opts) * stride as f64;
    let ys = Tensor::arange(h, opts) * stride as f64;
    let grid = Tensor::meshgrid_indexing(&[&ys, &xs], "ij");
    Tensor::stack(&[grid[1].reshape([-1]), grid[0].reshape([-1])], 1) + (stride / 2) as f64
}

/// One STFT branch (`dcn_cls_subnet` / `dcn_bbox_subnet`, the published `SFTBranch`).
#[derive(Debug)]
pub struct StftBranch {
    conv_offset: Tensor,
    conv_adaption: Tensor,
    groups: i64,
}

impl StftBranch {
    fn new(p: nn::Path, channels: i64, groups: i64, offset_std: f64) -> Self {
        Self {
            conv_offset: (&p / "conv_offset").var(
                "weight",
                &[groups * 18, 4, 1, 1],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: offset_std,
                },
            ),
            conv_adaption: (&p / "conv_adaption").var(
                "weight",
                &[channels, channels, 3, 3],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.01,
                },
            ),
            groups,
        }
    }

    /// `relu(deform_conv(feature, conv_offset(shape)))`: `feature` (N, C, h, w), `shape` the
    /// ltrb offsets on the level grid (N, h·w, 4). The offsets are computed without gradient.
    fn forward(&self, feature: &Tensor, shape: &Tensor) -> Result<Tensor> {
        let (n, _, h, w) = feature.size4().map_err(|e| crate::Error::Input {
            name: "stft feature".into(),
            reason: e.to_string(),
        })?;
        let offset = tch::no_grad(|| {
            shape.permute([0, 2, 1]).reshape([n, 4, h, w]).conv2d(
                &self.conv_offset,
                None::<Tensor>,
                [1, 1],
                [0, 0],
                [1, 1],
                1,
            )
        });
        Ok(deform_conv2d(feature, &offset, &self.conv_adaption, 1, self.groups)?.relu())
    }
}

/// What the head produces for a batch of `B` samples of `T` frames, per level.
#[derive(Debug)]
pub struct HeadOutput {
    /// Class logits of the current frames: (B, K, h, w).
    pub cls_logits: Vec<Tensor>,
    /// ltrb distances in pixels of the current frames: (B, 4, h, w).
    pub bbox_reg: Vec<Tensor>,
    /// Centerness logits of the current frames: (B, 1, h, w).
    pub centerness: Vec<Tensor>,
    /// STFT class logits: (B, K, h, w).
    pub stft_cls_logits: Vec<Tensor>,
    /// STFT box refinements (in units of `bbox_std · box size`): (B, 4, h, w).
    pub stft_bbox_reg: Vec<Tensor>,
    /// The current frames' boxes from the detached regression, x1 y1 x2 y2: (B, h·w, 4).
    pub pre_bbox: Vec<Tensor>,
    /// Locations of each level: (h·w, 2).
    pub locations: Vec<Tensor>,
}

impl HeadOutput {
    /// The outputs as float32 (after a reduced-precision forward).
    pub fn to_float(&self) -> HeadOutput {
        let f = |v: &[Tensor]| v.iter().map(|t| t.to_kind(Kind::Float)).collect();
        HeadOutput {
            cls_logits: f(&self.cls_logits),
            bbox_reg: f(&self.bbox_reg),
            centerness: f(&self.centerness),
            stft_cls_logits: f(&self.stft_cls_logits),
            stft_bbox_reg: f(&self.stft_bbox_reg),
            pre_bbox: f(&self.pre_bbox),
            locations: self.locations.iter().map(Tensor::shallow_clone).collect(),
        }
    }

    /// Number of samples.
    pub fn batch(&self) -> i64 {
        self.pre_bbox.first().map_or(0, |t| t.size()[0])
    }
}

/// The head's parameters (`rpn.head.*`).
#[derive(Debug)]
pub struct FcosStftHead {
    cls_tower: Vec<(nn::Conv2D, nn::GroupNorm)>,
    bbox_tower: Vec<(nn::Conv2D, nn::GroupNorm)>,
    cls_logits: nn::Conv2D,
    bbox_pred: nn::Conv2D,
    centerness: nn::Conv2D,
    dcn_cls_subnet: StftBranch,
    dcn_bbox_subnet: StftBranch,
    dcn_cls_score: nn::Conv2D,
    dcn_bbox_pred: nn::Conv2D,
    scales: Vec<Tensor>,
    cfg: DetectorConfig,
}

impl FcosStftHead {
    /// Parameters under `p` (`rpn.head`), initialised as published (N(0, 0.01) convolutions,
    /// prior-probability class biases, unit scales, N(0, offset_weight_std) offset weights).
    pub fn new(p: &nn::Path, cfg: &DetectorConfig) -> Self {
        let c = cfg.fpn_channels as i64;
        let k = cfg.num_classes as i64;
        let tower = |name: &str| {
            (0..cfg.num_convs)
                .map(|i| {
                    let conv = conv3(p / name / (3 * i), c, c, 0.01, 0.0);
                    let gn = nn::group_norm(
                        p / name / (3 * i + 1),
                        cfg.group_norm_groups as i64,
                        c,
                        Default::default(),
                    );
                    (conv, gn)
                })
                .collect::<Vec<_>>()
        };
        let prior = -((1.0 - cfg.prior_prob) / cfg.prior_prob).ln();
        let groups = cfg.deformable_groups as i64;
        let scales = (0..cfg.fpn_strides.len())
            .map(|l| (p / "scales" / l).var("scale", &[1], nn::Init::Const(1.0)))
            .collect();
        Self {
            cls_tower: tower("cls_tower"),
            bbox_tower: tower("bbox_tower"),
            cls_logits: conv3(p / "cls_logits", c, k, 0.01, prior),
            bbox_pred: conv3(p / "bbox_pred", c, 4, 0.01, 0.0),
            centerness: conv3(p / "centerness", c, 1, 0.01, 0.0),
            dcn_cls_subnet: StftBranch::new(p / "dcn_cls_subnet", c, groups, cfg.offset_weight_std),
            dcn_bbox_subnet: StftBranch::new(
                p / "dcn_bbox_subnet",
                c,
                groups,
                cfg.offset_weight_std,
            ),
            dcn_cls_score: conv3(p / "dcn_cls_score", c, k, 0.01, prior),
            dcn_bbox_pred: conv3(p / "dcn_bbox_pred", c, 4, 0.01, 0.0),
            scales,
            cfg: cfg.clone(),
        }
    }

    fn run_tower(tower: &[(nn::Conv2D, nn::GroupNorm)], x: &Tensor) -> Tensor {
        tower.iter().fold(x.shallow_clone(), |x, (conv, gn)| {
            gn.forward(&x.apply(conv)).relu()
        })
    }

    /// Channel-aware attention of the STFT branch: the current frame's aligned features attend,
    /// per channel, over the reference frames' at the same channel (scaled dot product over the
    /// h·w positions, softmax over the references), and the result is added to them.
    /// `feats`: (B·T, C, h, w) sample-major, frame 0 current → (B, C, h, w).
    fn channel_attention(feats: &Tensor, frames: i64) -> Tensor {
        let (bt, c, h, w) = feats.size4().expect("4-d STFT features");
        let b = bt / frames;
        let f = feats.reshape([b, frames, c, h * w]);
        let target = f.select(1, 0).unsqueeze(2); // (B, C, 1, hw)
        if frames == 1 {
            return target.reshape([b, c, h, w]);
        }
        let support = f.narrow(1, 1, frames - 1).permute([0, 2, 1, 3]); // (B, C, T−1, hw)
        let sim = (target.matmul(&support.transpose(2, 3)) * (1.0 / ((h * w) as f64).sqrt()))
            .softmax(-1, None::<Kind>); // (B, C, 1, T−1)
        (target + sim.matmul(&support)).reshape([b, c, h, w])
    }

    /// Runs the head on pyramid features `(B·T, C, h, w)` per level (samples of `frames` frames
    /// each, sample-major, frame 0 of each sample the current frame).
    ///
    /// Errors: a level count other than the configured strides', or a batch not divisible by
    /// `frames`.
    pub fn forward(&self, features: &[Tensor], frames: i64) -> Result<HeadOutput> {
        let strides = &self.cfg.fpn_strides;
        if features.len() != strides.len() || frames < 1 {
            return Err(crate::Error::Input {
                name: "detector head".into(),
                reason: format!(
                    "{} pyramid levels for {} strides ({frames} frames per sample)",
                    features.len(),
                    strides.len()
                ),
            });
        }
        let mut out = HeadOutput {
            cls_logits: Vec::new(),
            bbox_reg: Vec::new(),
            centerness: Vec::new(),
            stft_cls_logits: Vec::new(),
            stft_bbox_reg: Vec::new(),
            pre_bbox: Vec::new(),
            locations: Vec::new(),
        };
        for (l, feature) in features.iter().enumerate() {
            let (bt, _, h, w) = feature.size4().map_err(|e| crate::Error::Input {
                name: format!("pyramid level {l}"),
                reason: e.to_string(),
            })?;
            if bt % frames != 0 {
                return Err(crate::Error::Input {
                    name: format!("pyramid level {l}"),
                    reason: format!("{bt} maps are not samples of {frames} frames"),
                });
            }
            let b = bt / frames;
            let stride = strides[l] as i64;
            let current = Tensor::arange_start_step(0, bt, frames, (Kind::Int64, feature.device()));
            let cls_tower = Self::run_tower(&self.cls_tower, feature);
            let box_tower = Self::run_tower(&self.bbox_tower, feature);
            let cls_cur = cls_tower.index_select(0, &current);
            let box_cur = box_tower.index_select(0, &current);
            out.cls_logits.push(cls_cur.apply(&self.cls_logits));
            let ctr_src = if self.cfg.centerness_on_reg {
                &box_cur
            } else {
                &cls_cur
            };
            out.centerness.push(ctr_src.apply(&self.centerness));
            let raw = box_tower.apply(&self.bbox_pred) * &self.scales[l];
            let bbox = if self.cfg.norm_reg_targets {
                raw.relu() * stride as f64
            } else {
                raw.exp() * stride as f64
            };
            out.bbox_reg.push(bbox.index_select(0, &current));

            // STFT: boxes of every frame from the detached regression.
            let loc = locations(h, w, stride, feature.device());
            let (pre_boxes, shape) =
                tch::no_grad(|| {
                    let off = bbox.detach().permute([0, 2, 3, 1]).reshape([bt, h * w, 4]);
                    let (lx, ly) = (loc.select(1, 0), loc.select(1, 1));
                    let pre = Tensor::stack(
                        &[
                            &lx - off.select(2, 0),
                            &ly - off.select(2, 1),
                            &lx + off.select(2, 2),
                            &ly + off.select(2, 3),
                        ],
                        2,
                    ); // (BT, hw, 4)
                    // On the level grid, clamped to it.
                    let s = stride as f64;
                    let (wm, hm) = ((w - 1) as f64, (h - 1) as f64);
                    let bx1 = (pre.select(2, 0) / s).clamp(0.0, wm);
                    let by1 = (pre.select(2, 1) / s).clamp(0.0, hm);
                    let bx2 = (pre.select(2, 2) / s).clamp(0.0, wm);
                    let by2 = (pre.select(2, 3) / s).clamp(0.0, hm);
                    let ax = (&lx / s).clamp(0.0, wm);
                    let ay = (&ly / s).clamp(0.0, hm);
                    let ltrb = Tensor::stack(&[bx1 - &ax, by1 - &ay, bx2 - &ax, by2 - &ay], 2)
                        .view([b, frames, h * w, 4]);
                    // Reference frames: the current frame's offsets minus theirs.
                    let cur = ltrb.narrow(1, 0, 1);
                    let shape = if frames > 1 {
                        Tensor::cat(
                            &[cur.shallow_clone(), &cur - ltrb.narrow(1, 1, frames - 1)],
                            1,
                        )
                    } else {
                        cur.shallow_clone()
                    };
                    (pre, shape.view([bt, h * w, 4]))
                });
            out.pre_bbox.push(pre_boxes.index_select(0, &current));
            let cls_feats = self.dcn_cls_subnet.forward(&cls_tower, &shape)?;
            out.stft_cls_logits
                .push(Self::channel_attention(&cls_feats, frames).apply(&self.dcn_cls_score));
            let reg_feats = self.dcn_bbox_subnet.forward(&box_tower, &shape)?;
            out.stft_bbox_reg
                .push(Self::channel_attention(&reg_feats, frames).apply(&self.dcn_bbox_pred));
            out.locations.push(loc);
        }
        Ok(out)
    }
}
