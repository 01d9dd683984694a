//! Turns a [`ViewPlan`] and the decoded frames it asked for into normalised view tensors:
//! crop + u8→f32 of only the needed region, one separable bicubic resize per view ([`super::bicubic`]), then one
//! fused pass for flip, colour jitter, grayscale and normalisation.
//!
//! Numerics follow the reference's float32 element-wise operations in the same order; only the
//! contrast mean is summed differently (in f64), so views agree with a whole-tensor rendering to
//! about 1e-6 (test `render_matches_whole_tensor_reference`). The calling threads must set
//! libtorch to one intra-op thread (`tch::set_num_threads(1)`): data workers run one clip per
//! core.

use tch::Tensor;

use super::Frames;
use super::views::{GrayWeights, JitterOp, ViewConfig, ViewDraw, ViewPlan};
use crate::{Error, Result};

/// `i / 255` for every u8, exactly as the reference's `x.float() / 255.0`.
static UNIT: [f32; 256] = unit_table();

const fn unit_table() -> [f32; 256] {
    let mut table = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = i as f32 / 255.0;
        i += 1;
    }
    table
}

/// The views of one clip, in plan order (global 1, global 2, locals), each (3, T, S, S) f32.
#[derive(Debug)]
pub struct Views {
    /// One tensor per view.
    pub tensors: Vec<Tensor>,
}

/// Renders every view of `plan` from `frames`, which holds either exactly the frames listed in
/// `plan.decode` (in that order) or the whole clip.
pub fn render(cfg: &ViewConfig, plan: &ViewPlan, frames: &Frames) -> Result<Views> {
    let clip = plan.clip;
    if frames.h != clip.height || frames.w != clip.width {
        return Err(Error::Input {
            name: "frames".into(),
            reason: format!(
                "frames are {}×{} but the plan was drawn for {}×{}",
                frames.h, frames.w, clip.height, clip.width
            ),
        });
    }
    let whole_clip = frames.t == clip.frames;
    if !whole_clip && frames.t != plan.decode.len() {
        return Err(Error::Input {
            name: "frames".into(),
            reason: format!(
                "{} frames given; the plan needs its {} decode frames or the whole clip of {}",
                frames.t,
                plan.decode.len(),
                clip.frames
            ),
        });
    }
    // With the whole clip, or a decode list covering it, clip index == position.
    let position = |index: usize| -> usize {
        if whole_clip {
            index
        } else {
            plan.decode.partition_point(|&d| d < index)
        }
    };
    SCRATCH.with_borrow_mut(|scratch| render_all(cfg, plan, frames, &position, scratch))
}

thread_local! {
    /// Per-thread buffers: a data worker renders clip after clip without reallocating.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

fn render_all(
    cfg: &ViewConfig,
    plan: &ViewPlan,
    frames: &Frames,
    position: &dyn Fn(usize) -> usize,
    scratch: &mut Scratch,
) -> Result<Views> {
    let tensors = plan
        .views
        .iter()
        .map(|draw| render_view(cfg, draw, frames, position, scratch))
        .collect::<Result<Vec<_>>>()?;
    Ok(Views { tensors })
}

/// Buffers reused across the views of a clip.
#[derive(Default)]
struct Scratch {
    crop: Vec<f32>,
    rows: Vec<f32>,
    resized: Vec<f32>,
    out: Vec<f32>,
}

fn render_view(
    cfg: &ViewConfig,
    draw: &ViewDraw,
    frames: &Frames,
    position: &dyn Fn(usize) -> usize,
    scratch: &mut Scratch,
) -> Result<Tensor> {
    let t = draw.frames.len();
    let s = draw.size;
    crop_to_unit(frames, draw, position, &mut scratch.crop);
    super::bicubic::resize(
        &scratch.crop,
        [t * 3, draw.crop.height, draw.crop.width],
        s,
        &mut scratch.rows,
        &mut scratch.resized,
    );
    // Every element is written by `finish`; the buffer is reused across views and clips.
    let out = &mut scratch.out;
    out.resize(3 * t * s * s, 0.0);
    let normalise = !draw.blur;
    finish(
        cfg,
        draw,
        &scratch.resized,
        &mut out[..3 * t * s * s],
        normalise,
    );
    let view =
        Tensor::f_from_slice(&out[..3 * t * s * s])?.f_view([3, t as i64, s as i64, s as i64])?;
    if draw.blur {
        blur_solarize_normalise(cfg, draw, view)
    } else {
        Ok(view)
    }
}

/// Copies the crop of every frame of the view into `out` as (T, 3, h, w) floats in [0, 1].
fn crop_to_unit(
    frames: &Frames,
    draw: &ViewDraw,
    position: &dyn Fn(usize) -> usize,
    out: &mut Vec<f32>,
) {
    let crop = draw.crop;
    let (h, w) = (crop.height, crop.width);
    // Every element is overwritten below: resizing without clearing skips a memset per view.
    out.resize(draw.frames.len() * 3 * h * w, 0.0);
    let plane = h * w;
    for (k, &index) in draw.frames.iter().enumerate() {
        let frame = frames.frame(position(index));
        let planes = &mut out[k * 3 * plane..(k + 1) * 3 * plane];
        let (r, rest) = planes.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for y in 0..h {
            let start = ((crop.top + y) * frames.w + crop.left) * 3;
            let src = &frame[start..start + 3 * w];
            let row = y * w..(y + 1) * w;
            for (((px, r), g), b) in src
                .chunks_exact(3)
                .zip(&mut r[row.clone()])
                .zip(&mut g[row.clone()])
                .zip(&mut b[row])
            {
                *r = UNIT[px[0] as usize];
                *g = UNIT[px[1] as usize];
                *b = UNIT[px[2] as usize];
            }
        }
    }
}

/// One colour operation with its factor as float32 scalars, as the reference multiplies.
#[derive(Clone, Copy)]
struct Blend {
    op: JitterOp,
    alpha: f32,
    one_minus_alpha: f32,
}

/// Gray value of one pixel, summed in the reference's order.
#[inline(always)]
fn gray(weights: GrayWeights, r: f32, g: f32, b: f32) -> f32 {
    match weights {
        GrayWeights::ReferenceBgr => 0.299f32 * b + 0.587f32 * g + 0.114f32 * r,
        GrayWeights::Luma => 0.299f32 * r + 0.587f32 * g + 0.114f32 * b,
    }
}

/// Applies `ops` in order to one row held as three channel slices; `contrast_term` is
/// `mean · (1 - alpha)` of the frame.
fn apply_ops(ops: &[Blend], contrast_term: f32, weights: GrayWeights, [r, g, b]: [&mut [f32]; 3]) {
    for blend in ops {
        let (a, oma) = (blend.alpha, blend.one_minus_alpha);
        match blend.op {
            JitterOp::Brightness => {
                for channel in [&mut *r, &mut *g, &mut *b] {
                    for x in channel.iter_mut() {
                        *x = *x * a + 0.0;
                    }
                }
            }
            JitterOp::Contrast => {
                for channel in [&mut *r, &mut *g, &mut *b] {
                    for x in channel.iter_mut() {
                        *x = *x * a + contrast_term;
                    }
                }
            }
            JitterOp::Saturation => {
                let n = r.len().min(g.len()).min(b.len());
                let (r, g, b) = (&mut r[..n], &mut g[..n], &mut b[..n]);
                for i in 0..n {
                    let other = gray(weights, r[i], g[i], b[i]) * oma;
                    r[i] = r[i] * a + other;
                    g[i] = g[i] * a + other;
                    b[i] = b[i] * a + other;
                }
            }
        }
    }
}

/// Flip, jitter, grayscale, (solarise) and, when `normalise`, normalisation: reads the resized
/// (T, 3, S, S) frames and writes the (3, T, S, S) view.
fn finish(cfg: &ViewConfig, draw: &ViewDraw, resized: &[f32], out: &mut [f32], normalise: bool) {
    let t_len = draw.frames.len();
    let s = draw.size;
    let plane = s * s;
    let weights = cfg.gray_weights;
    let ops: Vec<Blend> = draw
        .jitter
        .iter()
        .map(|&(op, alpha)| Blend {
            op,
            alpha: alpha as f32,
            one_minus_alpha: (1.0 - alpha) as f32,
        })
        .collect();
    let contrast_at = ops.iter().position(|b| b.op == JitterOp::Contrast);
    let solarize_inline = draw.solarize && normalise;
    let mut rows = vec![0.0f32; 3 * s];
    for t in 0..t_len {
        let frame = &resized[t * 3 * plane..(t + 1) * 3 * plane];
        let load = |y: usize, rows: &mut [f32]| {
            for c in 0..3 {
                let src = &frame[c * plane + y * s..c * plane + (y + 1) * s];
                let dst = &mut rows[c * s..(c + 1) * s];
                if draw.flip {
                    for (d, v) in dst.iter_mut().zip(src.iter().rev()) {
                        *d = *v;
                    }
                } else {
                    dst.copy_from_slice(src);
                }
            }
        };
        // Contrast blends with the mean gray of the frame as it is when contrast runs.
        let contrast_term = match contrast_at {
            Some(p) => {
                let mut sum = 0.0f64;
                for y in 0..s {
                    load(y, &mut rows);
                    let [r, g, b] = split_rgb(&mut rows, s);
                    apply_ops(&ops[..p], 0.0, weights, [&mut *r, &mut *g, &mut *b]);
                    let row_sum: f32 = r
                        .iter()
                        .zip(g.iter())
                        .zip(b.iter())
                        .map(|((r, g), b)| gray(weights, *r, *g, *b))
                        .sum();
                    sum += row_sum as f64;
                }
                let mean = (sum / plane as f64) as f32;
                mean * ops[p].one_minus_alpha
            }
            None => 0.0,
        };
        for y in 0..s {
            load(y, &mut rows);
            let [r, g, b] = split_rgb(&mut rows, s);
            apply_ops(&ops, contrast_term, weights, [&mut *r, &mut *g, &mut *b]);
            if draw.grayscale {
                for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
                    let v = gray(weights, *r, *g, *b);
                    (*r, *g, *b) = (v, v, v);
                }
            }
            for (c, src) in [&*r, &*g, &*b].into_iter().enumerate() {
                let start = (c * t_len + t) * plane + y * s;
                let dst = &mut out[start..start + s];
                let (m, sd) = (cfg.mean[c], cfg.std[c]);
                match (solarize_inline, normalise) {
                    (true, _) => {
                        for (d, v) in dst.iter_mut().zip(src) {
                            *d = (solarize(*v) - m) / sd;
                        }
                    }
                    (false, true) => {
                        for (d, v) in dst.iter_mut().zip(src) {
                            *d = (*v - m) / sd;
                        }
                    }
                    (false, false) => dst.copy_from_slice(src),
                }
            }
        }
    }
}

/// The three channel rows of a row buffer.
fn split_rgb(rows: &mut [f32], s: usize) -> [&mut [f32]; 3] {
    let (r, rest) = rows.split_at_mut(s);
    let (g, b) = rest.split_at_mut(s);
    [r, g, b]
}

/// kornia's `solarize` with threshold 0.5: values at or above it are inverted.
#[inline(always)]
fn solarize(x: f32) -> f32 {
    if x < 0.5 { x } else { 1.0 - x }
}

/// The 3×3 Gaussian kernel of the reference's (disabled) `GaussianBlur((3, 3), (σ, σ))`.
pub fn gaussian_kernel3(sigma: f64) -> [[f32; 3]; 3] {
    let g: [f32; 3] =
        [0.0f64, 1.0, 2.0].map(|x| (-(x - 1.0) * (x - 1.0) / (2.0 * sigma * sigma)).exp() as f32);
    let total: f32 = g.iter().sum();
    let g = g.map(|v| v / total);
    [0, 1, 2].map(|i| [0, 1, 2].map(|j| g[i] * g[j]))
}

/// The rare blurred views: blur (zero padding, per channel and frame), optional solarisation,
/// then normalisation, with tensor operations on the un-normalised (3, T, S, S) view.
fn blur_solarize_normalise(cfg: &ViewConfig, draw: &ViewDraw, view: Tensor) -> Result<Tensor> {
    let size = view.size();
    let s = draw.size as i64;
    let kernel: Vec<f32> = gaussian_kernel3(cfg.blur_sigma).concat();
    let kernel = Tensor::f_from_slice(&kernel)?.f_view([1, 1, 3, 3])?;
    let mut x = view
        .f_view([-1, 1, s, s])?
        .f_conv2d(&kernel, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1)?
        .f_view(size.as_slice())?;
    if draw.solarize {
        let inverted = x.f_neg()?.f_add_scalar(1.0)?;
        x = x.f_where_self(&x.f_lt(0.5)?, &inverted)?;
    }
    let mean = Tensor::f_from_slice(&cfg.mean)?.f_view([3, 1, 1, 1])?;
    let std = Tensor::f_from_slice(&cfg.std)?.f_view([3, 1, 1, 1])?;
    Ok(x.f_sub(&mean)?.f_div(&std)?)
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Tensor};

    use super::*;
    use crate::data::views::{ClipShape, CropBox, DrawKey, ViewKind};
    use crate::data::{Frames, synthetic_clip};

    const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
    const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

    /// A plan with one view that keeps a `h × w` frame as it is (whole-frame crop, same size:
    /// the bicubic weights are exactly (0, 1, 0, 0)).
    fn identity_plan(frames: usize, side: usize, draw: impl FnOnce(&mut ViewDraw)) -> ViewPlan {
        let mut view = ViewDraw {
            kind: ViewKind::Global1,
            size: side,
            frames: (0..frames).collect(),
            crop: CropBox {
                top: 0,
                left: 0,
                height: side,
                width: side,
            },
            flip: false,
            jitter: vec![],
            grayscale: false,
            blur: false,
            solarize: false,
        };
        draw(&mut view);
        ViewPlan {
            clip: ClipShape {
                frames,
                height: side,
                width: side,
            },
            decode: (0..frames).collect(),
            views: vec![view],
        }
    }

    /// 2 frames of 2×2 pixels with distinct values.
    fn tiny_frames() -> Frames {
        let data: Vec<u8> = (0..24).map(|i| (i * 37 % 251) as u8).collect();
        Frames::from_vec(2, 2, 2, data).expect("frames")
    }

    /// Output value (c, t, y, x) of a (3, T, S, S) view.
    fn values(view: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(view.flatten(0, -1)).expect("f32 view")
    }

    fn assert_close(got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        let worst = got
            .iter()
            .zip(want)
            .map(|(g, w)| (*g as f64 - w).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= tol,
            "worst error {worst:e} > {tol:e}\n got {got:?}\nwant {want:?}"
        );
    }

    /// Frames as f64 [t][c][y·w + x] in [0, 1].
    fn unit_planes(frames: &Frames) -> Vec<[Vec<f64>; 3]> {
        let n = frames.h * frames.w;
        (0..frames.t)
            .map(|t| {
                let f = frames.frame(t);
                [0, 1, 2].map(|c| (0..n).map(|p| f[3 * p + c] as f64 / 255.0).collect())
            })
            .collect()
    }

    fn gray_bgr(p: &[Vec<f64>; 3], i: usize) -> f64 {
        0.299 * p[2][i] + 0.587 * p[1][i] + 0.114 * p[0][i]
    }

    /// Normalised (3, T, H·W) layout, flattened, of f64 planes.
    fn normalised(planes: &[[Vec<f64>; 3]]) -> Vec<f64> {
        let mut out = Vec::new();
        for c in 0..3 {
            for p in planes {
                out.extend(
                    p[c].iter()
                        .map(|v| (v - IMAGENET_MEAN[c]) / IMAGENET_STD[c]),
                );
            }
        }
        out
    }

    #[test]
    fn normalisation_and_layout() {
        let frames = tiny_frames();
        let cfg = ViewConfig::default();
        let views = render(&cfg, &identity_plan(2, 2, |_| {}), &frames).expect("render");
        assert_eq!(views.tensors[0].size(), [3, 2, 2, 2]);
        assert_close(
            &values(&views.tensors[0]),
            &normalised(&unit_planes(&frames)),
            1e-6,
        );
    }

    #[test]
    fn jitter_formulas_match_hand_computation() {
        let frames = tiny_frames();
        let cfg = ViewConfig::default();
        let (b, c, s) = (1.3, 0.7, 1.15);
        let jitter = vec![
            (JitterOp::Saturation, s),
            (JitterOp::Brightness, b),
            (JitterOp::Contrast, c),
        ];
        let plan = identity_plan(2, 2, |v| v.jitter = jitter);
        let views = render(&cfg, &plan, &frames).expect("render");
        let mut planes = unit_planes(&frames);
        for p in &mut planes {
            // saturation: blend with the pixel's gray
            let gray: Vec<f64> = (0..4).map(|i| gray_bgr(p, i)).collect();
            for ch in p.iter_mut() {
                for (x, g) in ch.iter_mut().zip(&gray) {
                    *x = s * *x + (1.0 - s) * g;
                }
            }
            // brightness: blend with black
            for ch in p.iter_mut() {
                for x in ch.iter_mut() {
                    *x *= b;
                }
            }
            // contrast: blend with this frame's mean gray
            let mean = (0..4).map(|i| gray_bgr(p, i)).sum::<f64>() / 4.0;
            for ch in p.iter_mut() {
                for x in ch.iter_mut() {
                    *x = c * *x + (1.0 - c) * mean;
                }
            }
        }
        assert_close(&values(&views.tensors[0]), &normalised(&planes), 2e-6);
        // No clamping: brightness 1.3 on a bright pixel exceeds 1 before normalisation.
        let bright = Frames::from_vec(1, 2, 2, vec![250; 12]).expect("frames");
        let plan = identity_plan(1, 2, |v| v.jitter = vec![(JitterOp::Brightness, 1.3)]);
        let out = values(&render(&cfg, &plan, &bright).expect("render").tensors[0]);
        let want = (250.0 / 255.0 * 1.3 - IMAGENET_MEAN[0]) / IMAGENET_STD[0];
        assert!((out[0] as f64 - want).abs() < 1e-5, "{} vs {want}", out[0]);
    }

    #[test]
    fn grayscale_uses_the_bgr_quirk_by_default() {
        let red = Frames::from_vec(1, 1, 1, vec![255, 0, 0]).expect("frames");
        let plan = identity_plan(1, 1, |v| v.grayscale = true);
        let mut cfg = ViewConfig::default();
        let quirk = values(&render(&cfg, &plan, &red).expect("render").tensors[0]);
        cfg.gray_weights = GrayWeights::Luma;
        let luma = values(&render(&cfg, &plan, &red).expect("render").tensors[0]);
        for c in 0..3 {
            let unnorm = |v: f32| v as f64 * IMAGENET_STD[c] + IMAGENET_MEAN[c];
            assert!(
                (unnorm(quirk[c]) - 0.114).abs() < 1e-6,
                "red weighs 0.114 as if BGR"
            );
            assert!(
                (unnorm(luma[c]) - 0.299).abs() < 1e-6,
                "luma weighs red 0.299"
            );
        }
    }

    #[test]
    fn flip_mirrors_columns() {
        let frames = tiny_frames();
        let cfg = ViewConfig::default();
        let plain = render(&cfg, &identity_plan(2, 2, |_| {}), &frames).expect("render");
        let flipped = render(&cfg, &identity_plan(2, 2, |v| v.flip = true), &frames).expect("r");
        let mirrored = plain.tensors[0].flip([-1]);
        let diff = (&flipped.tensors[0] - &mirrored)
            .abs()
            .max()
            .double_value(&[]);
        assert_eq!(diff, 0.0);
    }

    /// The reference's steps with whole-tensor libtorch operations, for comparison.
    fn reference_view(cfg: &ViewConfig, draw: &ViewDraw, frames: &Frames) -> Tensor {
        let all = Tensor::from_slice(&frames.data)
            .view([frames.t as i64, frames.h as i64, frames.w as i64, 3])
            .permute([0, 3, 1, 2])
            .to_kind(Kind::Float)
            / 255.0;
        let index: Vec<i64> = draw.frames.iter().map(|&f| f as i64).collect();
        let c = draw.crop;
        let mut x = all
            .index_select(0, &Tensor::from_slice(&index))
            .narrow(2, c.top as i64, c.height as i64)
            .narrow(3, c.left as i64, c.width as i64)
            .upsample_bicubic2d([draw.size as i64, draw.size as i64], false, None, None);
        if draw.flip {
            x = x.flip([-1]);
        }
        let gray =
            |x: &Tensor| x.select(1, 2) * 0.299 + x.select(1, 1) * 0.587 + x.select(1, 0) * 0.114;
        for &(op, a) in &draw.jitter {
            let other = match op {
                JitterOp::Brightness => x.zeros_like(),
                JitterOp::Contrast => gray(&x)
                    .mean_dim([1, 2].as_slice(), true, None)
                    .unsqueeze(1)
                    .expand_as(&x),
                JitterOp::Saturation => gray(&x).unsqueeze(1).expand_as(&x),
            };
            x = &x * a + other * (1.0 - a);
        }
        if draw.grayscale {
            x = gray(&x).unsqueeze(1).expand_as(&x).contiguous();
        }
        let mean = Tensor::from_slice(&cfg.mean).view([1, 3, 1, 1]);
        let std = Tensor::from_slice(&cfg.std).view([1, 3, 1, 1]);
        ((x - mean) / std).permute([1, 0, 2, 3])
    }

    #[test]
    fn render_matches_whole_tensor_reference() {
        let mut cfg = ViewConfig::tiny();
        cfg.global_size = 40;
        cfg.local_size = 24;
        let shape = ClipShape {
            frames: 30,
            height: 48,
            width: 64,
        };
        let frames = synthetic_clip(shape).expect("clip");
        let mut worst = 0.0f64;
        for clip in 0..6 {
            let key = DrawKey {
                seed: 1,
                epoch: 0,
                clip,
            };
            let plan = ViewPlan::draw(&cfg, shape, key).expect("plan");
            let views = render(&cfg, &plan, &frames).expect("render");
            for (draw, got) in plan.views.iter().zip(&views.tensors) {
                let want = reference_view(&cfg, draw, &frames);
                assert_eq!(got.size(), want.size());
                worst = worst.max((got - want).abs().max().double_value(&[]));
            }
        }
        println!("worst difference from the whole-tensor reference: {worst:e}");
        assert!(worst < 2e-5, "worst difference {worst:e}");
    }

    #[test]
    fn decode_list_or_whole_clip_give_the_same_views_for_short_clips() {
        let cfg = ViewConfig {
            global_size: 16,
            local_size: 8,
            ..ViewConfig::default()
        };
        for n in [1, 5, 16] {
            let shape = ClipShape {
                frames: n,
                height: 20,
                width: 24,
            };
            let clip = synthetic_clip(shape).expect("clip");
            let key = DrawKey {
                seed: 3,
                epoch: 1,
                clip: n as u64,
            };
            let plan = ViewPlan::draw(&cfg, shape, key).expect("plan");
            let mut needed = Vec::new();
            for &f in &plan.decode {
                needed.extend_from_slice(clip.frame(f));
            }
            let needed = Frames::from_vec(plan.decode.len(), 20, 24, needed).expect("frames");
            let a = render(&cfg, &plan, &clip).expect("whole clip");
            let b = render(&cfg, &plan, &needed).expect("decode list");
            assert_eq!(a.tensors.len(), 10);
            for ((x, y), draw) in a.tensors.iter().zip(&b.tensors).zip(&plan.views) {
                let s = draw.size as i64;
                assert_eq!(x.size(), [3, draw.frames.len() as i64, s, s]);
                assert_eq!(x.kind(), Kind::Float);
                assert!(x.equal(y), "n={n}");
            }
        }
    }

    #[test]
    fn full_size_views_have_reference_shapes() {
        let cfg = ViewConfig::default();
        let shape = ClipShape {
            frames: 16,
            height: 256,
            width: 256,
        };
        let clip = synthetic_clip(shape).expect("clip");
        let key = DrawKey {
            seed: 0,
            epoch: 0,
            clip: 0,
        };
        let plan = ViewPlan::draw(&cfg, shape, key).expect("plan");
        let views = render(&cfg, &plan, &clip).expect("render");
        let shapes: Vec<Vec<i64>> = views.tensors.iter().map(Tensor::size).collect();
        let mut want = vec![vec![3, 8, 224, 224], vec![3, 16, 224, 224]];
        for t in [2, 2, 4, 4, 8, 8, 16, 16] {
            want.push(vec![3, t, 96, 96]);
        }
        assert_eq!(shapes, want);
    }

    #[test]
    fn blur_and_solarise_when_enabled() {
        let kernel = gaussian_kernel3(1.5);
        let total: f32 = kernel.iter().flatten().sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(kernel[1][1] > kernel[0][1] && kernel[0][1] > kernel[0][0]);
        let cfg = ViewConfig::default();
        // A constant 0.8 frame: the blur keeps the interior (kernel sums to 1), zero padding
        // darkens the border; solarisation maps 0.8 to 0.2.
        let frames = Frames::from_vec(1, 5, 5, vec![204; 75]).expect("frames");
        let plan = identity_plan(1, 5, |v| {
            v.blur = true;
            v.solarize = true;
        });
        let out = values(&render(&cfg, &plan, &frames).expect("render").tensors[0]);
        let unnorm = |i: usize| out[i] as f64 * IMAGENET_STD[0] + IMAGENET_MEAN[0];
        assert!((unnorm(2 * 5 + 2) - 0.2).abs() < 1e-5, "{}", unnorm(12));
        // Corner: 0.8 · (sum of the 2×2 kernel corner) < 0.5 stays un-inverted.
        let corner = 0.8 * (kernel[1][1] + kernel[1][2] + kernel[2][1] + kernel[2][2]) as f64;
        assert!(
            (unnorm(0) - corner).abs() < 1e-5,
            "{} vs {corner}",
            unnorm(0)
        );
    }

    #[test]
    fn mismatched_frames_are_an_error() {
        let cfg = ViewConfig::default();
        let plan = identity_plan(2, 2, |_| {});
        let one = Frames::from_vec(1, 2, 2, vec![0; 12]).expect("frames");
        // Plan decode list is [0, 1] and the clip has 2 frames: 1 frame fits neither.
        let err = render(&cfg, &plan, &one)
            .expect_err("too few frames")
            .to_string();
        assert!(err.contains("1 frames given"), "{err}");
        assert!(Frames::from_vec(2, 2, 2, vec![0; 5]).is_err());
    }
}
