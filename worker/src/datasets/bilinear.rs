//! Bilinear resampling with the arithmetic of PyTorch's `upsample_bilinear2d` on the CPU
//! (`align_corners = false`, no antialiasing: what `F.interpolate(mode="bilinear")` does in the
//! published `datasets/transform.py`), evaluated only at the output pixels a crop keeps.

/// The two source indices and weights of each kept output coordinate along one axis.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Axis {
    /// Source indices (`i0`, `i1`).
    pub index: Vec<[usize; 2]>,
    /// Weights (`λ0`, `λ1`).
    pub weight: Vec<[f32; 2]>,
}

impl Axis {
    /// Taps of output coordinates `first..first + count` when resizing `input` samples to
    /// `output` samples. PyTorch: `scale = input / output` (float), `src = scale·(dst + ½) − ½`
    /// clamped at 0, `i0 = ⌊src⌋`, `i1 = i0 + 1` unless `i0` is the last sample,
    /// `λ1 = src − i0`, `λ0 = 1 − λ1`.
    pub fn new(input: usize, output: usize, first: usize, count: usize) -> Self {
        let scale = input as f32 / output as f32;
        let last = input.saturating_sub(1);
        let mut axis = Self {
            index: Vec::with_capacity(count),
            weight: Vec::with_capacity(count),
        };
        for dst in first..first + count {
            let src = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(last);
            let i1 = if i0 < last { i0 + 1 } else { i0 };
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            axis.index.push([i0, i1]);
            axis.weight.push([1.0 - l1, l1]);
        }
        axis
    }
}

/// One output value from its four source values, in PyTorch's order of operations:
/// `(a·w0 + b·w1)·h0 + (c·w0 + d·w1)·h1` (rows outer, columns inner).
#[inline]
pub(crate) fn blend(top: [f32; 2], bottom: [f32; 2], w: [f32; 2], h: [f32; 2]) -> f32 {
    (top[0] * w[0] + top[1] * w[1]) * h[0] + (bottom[0] * w[0] + bottom[1] * w[1]) * h[1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    /// Resizes one plane with [`Axis`]/[`blend`] and compares with libtorch.
    #[test]
    fn matches_libtorch_for_up_and_down_scaling() {
        for (h, w, oh, ow) in [
            (48, 64, 40, 53),
            (17, 23, 112, 150),
            (96, 96, 96, 96),
            (5, 200, 7, 280),
            (1, 1, 4, 4),
        ] {
            let input: Vec<f32> = (0..h * w)
                .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 3.0)
                .collect();
            let rows = Axis::new(h, oh, 0, oh);
            let cols = Axis::new(w, ow, 0, ow);
            let mut out = Vec::with_capacity(oh * ow);
            for y in 0..oh {
                let [r0, r1] = rows.index[y];
                for x in 0..ow {
                    let [c0, c1] = cols.index[x];
                    out.push(blend(
                        [input[r0 * w + c0], input[r0 * w + c1]],
                        [input[r1 * w + c0], input[r1 * w + c1]],
                        cols.weight[x],
                        rows.weight[y],
                    ));
                }
            }
            let want = Tensor::from_slice(&input)
                .view([1, 1, h as i64, w as i64])
                .upsample_bilinear2d([oh as i64, ow as i64], false, None, None)
                .reshape([-1]);
            let want: Vec<f32> = Vec::try_from(want).expect("floats");
            let worst = out
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "{h}x{w} -> {oh}x{ow}: worst {worst:e}");
        }
    }

    #[test]
    fn a_window_of_the_output_equals_the_same_part_of_the_whole() {
        let whole = Axis::new(37, 80, 0, 80);
        let part = Axis::new(37, 80, 13, 40);
        assert_eq!(part.index[..], whole.index[13..53]);
        assert_eq!(part.weight[..], whole.weight[13..53]);
    }
}
