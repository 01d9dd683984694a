//! Deformable convolution (v1, no mask) written from libtorch operations, the op the published
//! STFT branch takes from its compiled CUDA extension (`stft_core._C.deform_conv_forward`,
//! `deformable_im2col_gpu_kernel` + a grouped matrix product).
//!
//! For output location `(y, x)`, kernel tap `(i, j)` and deformable group `g`, the input
//! channels of group `g` (contiguous blocks of `C / groups`) are sampled at
//! `(y − pad + i + Δy, x − pad + j + Δx)` with `Δy = offset[g·2k² + 2(k·i + j)]` and
//! `Δx = offset[… + 1]`: bilinear, corners outside the map count as 0 (so a position with
//! `y ≤ −1`, `y ≥ H`, `x ≤ −1` or `x ≥ W` samples 0). The sampled columns
//! `(N, C·k², H_out·W_out)` are then multiplied by the weight `(O, C·k²)`.
//!
//! The bilinear sampling is `grid_sampler` (bilinear, zero padding, `align_corners = true`) on
//! the input padded by one zero pixel per side: with the pad, every corner the published kernel
//! may read lies inside the sampled map or is a pad zero, and a 1-pixel-high map still has a
//! non-degenerate normalised grid. Gradients flow to the input and the weight through libtorch's
//! own backward passes (the offsets of the STFT branch carry none).

use std::cell::RefCell;

use tch::Tensor;

use crate::{Error, Result};

/// The shapes of one call: input (N, C, H, W), weight (O, C, k, k), padding, groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallShape {
    /// Input shape.
    pub input: Vec<i64>,
    /// Weight shape.
    pub weight: Vec<i64>,
    /// Padding.
    pub padding: i64,
    /// Deformable groups.
    pub groups: i64,
}

thread_local! {
    /// Calls recorded on this thread while [`record_calls`] runs.
    static RECORDED: RefCell<Option<Vec<CallShape>>> = const { RefCell::new(None) };
}

/// Runs `f` and returns, with its result, the shapes of every [`deform_conv2d`] call it made on
/// this thread (the benchmark replays them to time the operation's share of a step).
pub fn record_calls<T>(f: impl FnOnce() -> T) -> (T, Vec<CallShape>) {
    RECORDED.with(|r| *r.borrow_mut() = Some(Vec::new()));
    let out = f();
    let calls = RECORDED.with(|r| r.borrow_mut().take()).unwrap_or_default();
    (out, calls)
}

/// Deformable convolution, stride 1, dilation 1, no bias.
///
/// - `input`: (N, C, H, W) float.
/// - `offset`: (N, groups·2·k², H_out, W_out), y then x per tap, taps row-major, groups in
///   contiguous channel blocks; `H_out = H + 2·padding − k + 1`.
/// - `weight`: (O, C, k, k).
///
/// Returns (N, O, H_out, W_out).
///
/// Errors: shapes that do not fit together (named in the message).
pub fn deform_conv2d(
    input: &Tensor,
    offset: &Tensor,
    weight: &Tensor,
    padding: i64,
    groups: i64,
) -> Result<Tensor> {
    let bad = |reason: String| Error::Input {
        name: "deform_conv2d".into(),
        reason,
    };
    let (n, c, h, w) = input
        .size4()
        .map_err(|_| bad(format!("input {:?} is not (N, C, H, W)", input.size())))?;
    let (_, wc, kh, kw) = weight
        .size4()
        .map_err(|_| bad(format!("weight {:?} is not (O, C, k, k)", weight.size())))?;
    if wc != c || kh != kw {
        return Err(bad(format!(
            "weight {:?} does not take {c} channels with a square kernel",
            weight.size()
        )));
    }
    if groups < 1 || c % groups != 0 {
        return Err(bad(format!("{groups} deformable groups for {c} channels")));
    }
    let k = kh;
    let kk = k * k;
    let (ho, wo) = (h + 2 * padding - k + 1, w + 2 * padding - k + 1);
    if ho < 1 || wo < 1 {
        return Err(bad(format!(
            "a {k}x{k} kernel with padding {padding} has no output on a {h}x{w} map"
        )));
    }
    if offset.size() != [n, groups * 2 * kk, ho, wo] {
        return Err(bad(format!(
            "offset {:?} is not ({n}, {}, {ho}, {wo})",
            offset.size(),
            groups * 2 * kk
        )));
    }
    RECORDED.with(|r| {
        if let Some(calls) = r.borrow_mut().as_mut() {
            calls.push(CallShape {
                input: input.size(),
                weight: weight.size(),
                padding,
                groups,
            });
        }
    });
    let opts = (input.kind(), input.device());
    let off = offset
        .to_kind(input.kind())
        .reshape([n, groups, k, k, 2, ho, wo]);
    // Tap (i, j) of output (y, x) reads (y − pad + i, x − pad + j); +1 for the zero pad below.
    let tap_i = Tensor::arange(k, opts).view([1, 1, k, 1, 1, 1]);
    let tap_j = Tensor::arange(k, opts).view([1, 1, 1, k, 1, 1]);
    let ys = Tensor::arange(ho, opts).view([1, 1, 1, 1, ho, 1]);
    let xs = Tensor::arange(wo, opts).view([1, 1, 1, 1, 1, wo]);
    let shift = (1 - padding) as f64;
    let py = off.select(4, 0) + ys + tap_i + shift; // (N, G, k, k, Ho, Wo), padded pixels
    let px = off.select(4, 1) + xs + tap_j + shift;
    // align_corners = true: −1 ↦ pixel 0, +1 ↦ pixel S − 1 of the padded map (S = H + 2).
    let gy = py * (2.0 / (h + 1) as f64) - 1.0;
    let gx = px * (2.0 / (w + 1) as f64) - 1.0;
    // Sample positions laid out as a k-times larger map: tap (i, j) of output (y, x) at
    // (k·y + i, k·x + j), so that a k×k convolution of stride k is the matrix product.
    let grid = Tensor::stack(&[gx, gy], -1)
        .permute([0, 1, 4, 2, 5, 3, 6])
        .reshape([n * groups, k * ho, k * wo, 2]);
    let padded =
        input
            .constant_pad_nd([1, 1, 1, 1])
            .reshape([n * groups, c / groups, h + 2, w + 2]);
    let sampled = padded
        .grid_sampler(&grid, 0, 0, true)
        .reshape([n, c, k * ho, k * wo]);
    Ok(sampled.conv2d(weight, None::<Tensor>, [k, k], [0, 0], [1, 1], 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The published kernel written out per sample (`deformable_im2col_bilinear`), float64.
    fn naive(input: &Tensor, offset: &Tensor, weight: &Tensor, pad: i64, groups: i64) -> Tensor {
        let (n, c, h, w) = input.size4().unwrap();
        let (o, _, k, _) = weight.size4().unwrap();
        let (ho, wo) = (h + 2 * pad - k + 1, w + 2 * pad - k + 1);
        let inp: Vec<f64> = Vec::try_from(input.to_kind(Kind::Double).flatten(0, -1)).unwrap();
        let off: Vec<f64> = Vec::try_from(offset.to_kind(Kind::Double).flatten(0, -1)).unwrap();
        let wt: Vec<f64> = Vec::try_from(weight.to_kind(Kind::Double).flatten(0, -1)).unwrap();
        let at = |b: i64, ch: i64, y: i64, x: i64| -> f64 {
            if y < 0 || y >= h || x < 0 || x >= w {
                0.0
            } else {
                inp[(((b * c + ch) * h + y) * w + x) as usize]
            }
        };
        let mut out = vec![0.0f64; (n * o * ho * wo) as usize];
        let cpg = c / groups;
        for b in 0..n {
            for oy in 0..ho {
                for ox in 0..wo {
                    for ch in 0..c {
                        let g = ch / cpg;
                        for i in 0..k {
                            for j in 0..k {
                                let base =
                                    ((b * groups * 2 * k * k + g * 2 * k * k + 2 * (k * i + j))
                                        * ho
                                        + oy)
                                        * wo
                                        + ox;
                                let dy = off[base as usize];
                                let dx = off[(base + ho * wo) as usize];
                                let y = (oy - pad + i) as f64 + dy;
                                let x = (ox - pad + j) as f64 + dx;
                                let v = if y > -1.0 && y < h as f64 && x > -1.0 && x < w as f64 {
                                    let (y0, x0) = (y.floor() as i64, x.floor() as i64);
                                    let (ly, lx) = (y - y0 as f64, x - x0 as f64);
                                    (1.0 - ly) * (1.0 - lx) * at(b, ch, y0, x0)
                                        + (1.0 - ly) * lx * at(b, ch, y0, x0 + 1)
                                        + ly * (1.0 - lx) * at(b, ch, y0 + 1, x0)
                                        + ly * lx * at(b, ch, y0 + 1, x0 + 1)
                                } else {
                                    0.0
                                };
                                for oc in 0..o {
                                    let wv = wt[(((oc * c + ch) * k + i) * k + j) as usize];
                                    out[(((b * o + oc) * ho + oy) * wo + ox) as usize] += wv * v;
                                }
                            }
                        }
                    }
                }
            }
        }
        Tensor::from_slice(&out).view([n, o, ho, wo])
    }

    #[test]
    fn matches_the_published_kernel_including_borders_and_one_pixel_maps() {
        let _rng = crate::test_support::rng_lock();
        tch::manual_seed(7);
        for (n, c, o, h, w, groups) in [(2, 8, 6, 7, 9, 4), (1, 4, 3, 1, 2, 1), (3, 8, 5, 2, 3, 2)]
        {
            let x = Tensor::randn([n, c, h, w], (Kind::Double, Device::Cpu));
            // Offsets up to ±3 px: many taps fall partly or wholly outside.
            let off = Tensor::randn([n, groups * 18, h, w], (Kind::Double, Device::Cpu)) * 1.5;
            let wt = Tensor::randn([o, c, 3, 3], (Kind::Double, Device::Cpu));
            let ours = deform_conv2d(&x, &off, &wt, 1, groups).unwrap();
            let reference = naive(&x, &off, &wt, 1, groups);
            let err = (&ours - &reference).abs().max().double_value(&[]);
            assert!(err < 1e-9, "({n},{c},{h},{w}) groups {groups}: {err:e}");
        }
    }

    #[test]
    fn gradients_reach_input_and_weight() {
        let _rng = crate::test_support::rng_lock();
        tch::manual_seed(8);
        let x = Tensor::randn([1, 4, 5, 6], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let wt = Tensor::randn([2, 4, 3, 3], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let off = Tensor::randn([1, 36, 5, 6], (Kind::Double, Device::Cpu));
        let y = deform_conv2d(&x, &off, &wt, 1, 2).unwrap();
        let r = Tensor::randn(y.size(), (Kind::Double, Device::Cpu));
        let (gx, gw) = {
            let g = Tensor::run_backward(&[(&y * &r).sum(Kind::Double)], &[&x, &wt], false, false);
            (g[0].shallow_clone(), g[1].shallow_clone())
        };
        // Finite differences on a few entries of each.
        let f = |x: &Tensor, wt: &Tensor| {
            (deform_conv2d(x, &off, wt, 1, 2).unwrap() * &r)
                .sum(Kind::Double)
                .double_value(&[])
        };
        let eps = 1e-6;
        for idx in [0i64, 17, 63, 100] {
            let dx = Tensor::zeros_like(&x).flatten(0, -1);
            let _ = dx.get(idx).fill_(eps);
            let dx = dx.view_as(&x);
            let fd = (f(&(&x.detach() + &dx), &wt.detach())
                - f(&(&x.detach() - &dx), &wt.detach()))
                / (2.0 * eps);
            let an = gx.flatten(0, -1).double_value(&[idx]);
            assert!(
                (fd - an).abs() < 1e-5 * (1.0 + an.abs()),
                "input {idx}: {fd} vs {an}"
            );
        }
        for idx in [0i64, 5, 40] {
            let dw = Tensor::zeros_like(&wt).flatten(0, -1);
            let _ = dw.get(idx).fill_(eps);
            let dw = dw.view_as(&wt);
            let fd = (f(&x.detach(), &(&wt.detach() + &dw))
                - f(&x.detach(), &(&wt.detach() - &dw)))
                / (2.0 * eps);
            let an = gw.flatten(0, -1).double_value(&[idx]);
            assert!(
                (fd - an).abs() < 1e-5 * (1.0 + an.abs()),
                "weight {idx}: {fd} vs {an}"
            );
        }
    }
}
