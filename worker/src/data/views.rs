//! The views of one clip, planned before any pixel is touched: which frames each view takes
//! (Endo-FM's temporal sampling) and every random draw of its augmentation, from a seeded
//! counter-based generator so that a plan is a pure function of (seed, epoch, clip).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::Result;
use endofm_shared::Error as ConfigError;

/// Weights of the grayscale conversion (used by grayscale, saturation and contrast).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrayWeights {
    /// The reference's: `0.299·c2 + 0.587·c1 + 0.114·c0` on RGB frames, i.e. the BT.601 weights
    /// applied as if the frames were BGR. What the published weights were trained with.
    #[default]
    ReferenceBgr,
    /// Standard BT.601 luma on RGB: `0.299·R + 0.587·G + 0.114·B`.
    Luma,
}

/// Sizes, frame counts and augmentation strengths of the pre-training views. The defaults are
/// the reference's (Endo-FM / SVT); blur and solarisation are off because the released code
/// makes them no-ops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ViewConfig {
    /// Side of the two global views in pixels.
    pub global_size: usize,
    /// Side of the local views in pixels.
    pub local_size: usize,
    /// Frame counts of global view 1 and global view 2.
    pub global_frames: [usize; 2],
    /// Global view 1 spans frames `[0, N - margin]`, view 2 `[margin, N]` (clamped to N - 1).
    pub global_margin: usize,
    /// Frame count of each local view; their number is the number of local views.
    pub local_frames: Vec<usize>,
    /// A local view spans `N / local_span_divisor` frames from a random start.
    pub local_span_divisor: usize,
    /// Area fraction range of the global crops.
    pub global_scale: [f64; 2],
    /// Area fraction range of the local crops.
    pub local_scale: [f64; 2],
    /// Aspect ratio (w / h) range of all crops.
    pub ratio: [f64; 2],
    /// Tries of the random resized crop before falling back to a centre crop.
    pub crop_tries: u32,
    /// Probability of a horizontal flip.
    pub flip_p: f64,
    /// Probability of applying colour jitter.
    pub jitter_p: f64,
    /// Brightness strength v: factor ~ U(1 - v, 1 + v); 0 disables the operation.
    pub brightness: f64,
    /// Contrast strength (as brightness).
    pub contrast: f64,
    /// Saturation strength (as brightness).
    pub saturation: f64,
    /// Probability of converting a view to grayscale.
    pub grayscale_p: f64,
    /// Grayscale weights (the reference's BGR quirk by default).
    pub gray_weights: GrayWeights,
    /// Gaussian blur on (the released code has it disabled).
    pub blur: bool,
    /// Blur probabilities for global 1, global 2 and the local views (DINO's).
    pub blur_p: [f64; 3],
    /// Standard deviation of the 3×3 Gaussian kernel (the reference's disabled kernel: 1.5).
    pub blur_sigma: f64,
    /// Solarisation on (the released code has it disabled).
    pub solarize: bool,
    /// Solarisation probabilities for global 1, global 2 and the local views (DINO's).
    pub solarize_p: [f64; 3],
    /// Normalisation mean per channel (ImageNet).
    pub mean: [f32; 3],
    /// Normalisation standard deviation per channel (ImageNet).
    pub std: [f32; 3],
}

impl Default for ViewConfig {
    fn default() -> Self {
        Self {
            global_size: 224,
            local_size: 96,
            global_frames: [8, 16],
            global_margin: 5,
            local_frames: vec![2, 2, 4, 4, 8, 8, 16, 16],
            local_span_divisor: 8,
            global_scale: [0.4, 1.0],
            local_scale: [0.05, 0.4],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            crop_tries: 10,
            flip_p: 0.5,
            jitter_p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            grayscale_p: 0.2,
            gray_weights: GrayWeights::ReferenceBgr,
            blur: false,
            blur_p: [1.0, 0.1, 0.5],
            blur_sigma: 1.5,
            solarize: false,
            solarize_p: [0.0, 0.2, 0.0],
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
}

impl ViewConfig {
    /// The reference's views (same as `default()`).
    pub fn reference() -> Self {
        Self::default()
    }

    /// The views for the `tiny` model preset: 112-px global and 48-px local views.
    pub fn tiny() -> Self {
        Self {
            global_size: 112,
            local_size: 48,
            ..Self::default()
        }
    }

    /// Number of views (2 global + the local ones).
    pub fn num_views(&self) -> usize {
        2 + self.local_frames.len()
    }

    /// Checks every field; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field: &str, reason: String| Err(ConfigError::invalid(field, reason).into());
        for (field, value) in [
            ("global_size", self.global_size),
            ("local_size", self.local_size),
            ("global_frames[0]", self.global_frames[0]),
            ("global_frames[1]", self.global_frames[1]),
            ("local_span_divisor", self.local_span_divisor),
        ] {
            if value == 0 {
                return invalid(field, "must be at least 1".into());
            }
        }
        if let Some(k) = self.local_frames.iter().position(|&f| f == 0) {
            return invalid(&format!("local_frames[{k}]"), "must be at least 1".into());
        }
        for (field, [lo, hi]) in [
            ("global_scale", self.global_scale),
            ("local_scale", self.local_scale),
        ] {
            if !(lo.is_finite() && hi.is_finite() && 0.0 < lo && lo <= hi) {
                return invalid(field, format!("[{lo}, {hi}] must satisfy 0 < low <= high"));
            }
        }
        let [lo, hi] = self.ratio;
        if !(lo.is_finite() && hi.is_finite() && 0.0 < lo && lo <= hi) {
            return invalid(
                "ratio",
                format!("[{lo}, {hi}] must satisfy 0 < low <= high"),
            );
        }
        let mut probabilities = vec![
            ("flip_p".to_string(), self.flip_p),
            ("jitter_p".to_string(), self.jitter_p),
            ("grayscale_p".to_string(), self.grayscale_p),
        ];
        for (i, &p) in self.blur_p.iter().enumerate() {
            probabilities.push((format!("blur_p[{i}]"), p));
        }
        for (i, &p) in self.solarize_p.iter().enumerate() {
            probabilities.push((format!("solarize_p[{i}]"), p));
        }
        for (field, p) in probabilities {
            if !(0.0..=1.0).contains(&p) {
                return invalid(&field, format!("{p} is not a probability in [0, 1]"));
            }
        }
        for (field, v) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return invalid(field, format!("{v} is outside [0, 1]"));
            }
        }
        if !(self.blur_sigma.is_finite() && self.blur_sigma > 0.0) {
            return invalid(
                "blur_sigma",
                format!("{} must be positive", self.blur_sigma),
            );
        }
        for (c, s) in self.std.iter().enumerate() {
            if !(s.is_finite() && *s > 0.0) {
                return invalid(&format!("std[{c}]"), format!("{s} must be positive"));
            }
        }
        for (c, m) in self.mean.iter().enumerate() {
            if !m.is_finite() {
                return invalid(&format!("mean[{c}]"), format!("{m} must be finite"));
            }
        }
        Ok(())
    }
}

/// Which of the views a draw belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewKind {
    /// Global view 1 (`linspace(0, N - margin, ·)`).
    Global1,
    /// Global view 2 (`linspace(margin, N, ·)`).
    Global2,
    /// Local view k (0-based).
    Local(usize),
}

impl ViewKind {
    /// Index into the three-entry probability tables (`blur_p`, `solarize_p`).
    fn table_index(self) -> usize {
        match self {
            ViewKind::Global1 => 0,
            ViewKind::Global2 => 1,
            ViewKind::Local(_) => 2,
        }
    }
}

/// What identifies one draw of a clip's views: a plan is a pure function of these three.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrawKey {
    /// Run seed.
    pub seed: u64,
    /// Epoch.
    pub epoch: u64,
    /// Index of the clip in the clip list.
    pub clip: u64,
}

/// Size of a decoded clip: frame count and frame height / width in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClipShape {
    /// Number of frames N.
    pub frames: usize,
    /// Frame height.
    pub height: usize,
    /// Frame width.
    pub width: usize,
}

/// A crop rectangle in frame pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// One colour-jitter operation; each is `factor·x + (1 - factor)·other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JitterOp {
    /// Blend with black.
    Brightness,
    /// Blend with the per-frame mean of the grayscale image.
    Contrast,
    /// Blend with the grayscale image.
    Saturation,
}

/// Everything one view needs: its frames and its augmentation draws (shared by all its frames).
#[derive(Debug, Clone, PartialEq)]
pub struct ViewDraw {
    /// Which view.
    pub kind: ViewKind,
    /// Output side in pixels.
    pub size: usize,
    /// Clip frame indices, in view order (may repeat).
    pub frames: Vec<usize>,
    /// The crop, resized to `size × size` with bicubic interpolation.
    pub crop: CropBox,
    /// Horizontal flip.
    pub flip: bool,
    /// Colour-jitter operations and their factors, in application order; empty when the
    /// jitter was not drawn.
    pub jitter: Vec<(JitterOp, f64)>,
    /// Grayscale conversion.
    pub grayscale: bool,
    /// Gaussian blur.
    pub blur: bool,
    /// Solarisation.
    pub solarize: bool,
}

/// All views of one clip and the frames to decode for them.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewPlan {
    /// The clip's shape the plan was drawn for.
    pub clip: ClipShape,
    /// Global 1, global 2, then the local views.
    pub views: Vec<ViewDraw>,
    /// The distinct frame indices any view uses, ascending: what the decoder must produce.
    pub decode: Vec<usize>,
}

/// A source of uniform numbers in [0, 1): the seeded generator, or handcrafted values in tests.
pub trait Uniform {
    /// The next draw in [0, 1).
    fn uniform(&mut self) -> f64;

    /// An integer uniform in `[0, n)` (`n >= 1`).
    fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n.saturating_sub(1))
    }

    /// A value uniform in `[lo, hi)`.
    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }
}

/// The per-view generator: ChaCha8 keyed by (seed, epoch, clip), one stream per view, so views
/// draw independently and a resumed run draws exactly the same.
#[derive(Debug, Clone)]
pub struct ViewRng(ChaCha8Rng);

impl ViewRng {
    /// The generator of view `view` of the clip identified by `key`.
    pub fn new(key: DrawKey, view: usize) -> Self {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&key.seed.to_le_bytes());
        seed[8..16].copy_from_slice(&key.epoch.to_le_bytes());
        seed[16..24].copy_from_slice(&key.clip.to_le_bytes());
        seed[24..].copy_from_slice(b"endofmvw");
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(view as u64);
        Self(rng)
    }
}

impl Uniform for ViewRng {
    fn uniform(&mut self) -> f64 {
        self.0.random::<f64>()
    }
}

/// `linspace(start, end, count)` clamped to `[0, n - 1]` and truncated, as the reference's
/// `temporal_sampling` does in float32. Computed exactly in integers: torch's float32 linspace
/// lands on the same integers (checked for every view of every N < 2000 on the default, AVX2
/// and AVX-512 kernels), whereas f64 arithmetic can fall just below an exact integer.
pub fn linspace_indices(start: i64, end: i64, count: usize, n: usize) -> Vec<usize> {
    let last = n.saturating_sub(1) as i64;
    let clamp = |v: i64| v.clamp(0, last) as usize;
    if count == 1 {
        return vec![clamp(start)];
    }
    let steps = count as i64 - 1;
    (0..count as i64)
        .map(|i| {
            let num = start * steps + i * (end - start);
            // Negative values clamp to 0 whatever the rounding; floor == truncation otherwise.
            clamp(num.div_euclid(steps))
        })
        .collect()
}

/// Round half to even, as Python's `round` on the reference's float64 values.
fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// torchvision's `RandomResizedCrop.get_params` rule as the reference implements it: `tries`
/// draws of (area fraction ~ U(scale), log aspect ~ U(log ratio)); a try is valid when the
/// rounded box fits; the **last** valid try wins (with its own uniform position); no valid try
/// gives the centre crop clamped to the ratio range.
pub fn random_resized_crop(
    height: usize,
    width: usize,
    scale: [f64; 2],
    ratio: [f64; 2],
    tries: u32,
    draws: &mut impl Uniform,
) -> CropBox {
    let area = (height * width) as f64;
    let (log_lo, log_hi) = (ratio[0].ln(), ratio[1].ln());
    let mut chosen = None;
    for _ in 0..tries {
        let target_area = area * draws.between(scale[0], scale[1]);
        let aspect = draws.between(log_lo, log_hi).exp();
        let w = round_half_even((target_area * aspect).sqrt());
        let h = round_half_even((target_area / aspect).sqrt());
        if w > 0.0 && w <= width as f64 && h > 0.0 && h <= height as f64 {
            let (w, h) = (w as usize, h as usize);
            let top = draws.below(height - h + 1);
            let left = draws.below(width - w + 1);
            chosen = Some(CropBox {
                top,
                left,
                height: h,
                width: w,
            });
        }
    }
    chosen.unwrap_or_else(|| centre_crop(height, width, ratio))
}

/// The fallback of [`random_resized_crop`]: the whole frame, or its centre clamped to the ratio
/// range.
pub fn centre_crop(height: usize, width: usize, ratio: [f64; 2]) -> CropBox {
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio[0] {
        (width, round_half_even(width as f64 / ratio[0]) as usize)
    } else if in_ratio > ratio[1] {
        (round_half_even(height as f64 * ratio[1]) as usize, height)
    } else {
        (width, height)
    };
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

impl ViewPlan {
    /// Draws the views of one clip. Pure function of (`cfg`, `clip`, `key`).
    pub fn draw(cfg: &ViewConfig, clip: ClipShape, key: DrawKey) -> Result<Self> {
        cfg.validate()?;
        if clip.frames == 0 || clip.height == 0 || clip.width == 0 {
            return Err(crate::Error::Input {
                name: "clip".into(),
                reason: format!(
                    "{} frames of {}×{} pixels: a clip needs at least one non-empty frame",
                    clip.frames, clip.height, clip.width
                ),
            });
        }
        let n = clip.frames;
        let mut views = Vec::with_capacity(cfg.num_views());
        let margin = cfg.global_margin as i64;
        let kinds = [ViewKind::Global1, ViewKind::Global2]
            .into_iter()
            .chain((0..cfg.local_frames.len()).map(ViewKind::Local));
        for (v, kind) in kinds.enumerate() {
            let mut rng = ViewRng::new(key, v);
            let (frames, size, scale) = match kind {
                ViewKind::Global1 => (
                    linspace_indices(0, n as i64 - margin, cfg.global_frames[0], n),
                    cfg.global_size,
                    cfg.global_scale,
                ),
                ViewKind::Global2 => (
                    linspace_indices(margin, n as i64, cfg.global_frames[1], n),
                    cfg.global_size,
                    cfg.global_scale,
                ),
                ViewKind::Local(k) => {
                    let span = n / cfg.local_span_divisor;
                    // Python's randint(0, N - span - 1), both ends included; N - span >= 1.
                    let start = rng.below(n - span) as i64;
                    (
                        linspace_indices(start, start + span as i64, cfg.local_frames[k], n),
                        cfg.local_size,
                        cfg.local_scale,
                    )
                }
            };
            views.push(draw_augmentation(
                cfg, kind, frames, size, scale, clip, &mut rng,
            ));
        }
        let mut decode: Vec<usize> = views.iter().flat_map(|v| v.frames.clone()).collect();
        decode.sort_unstable();
        decode.dedup();
        Ok(Self {
            clip,
            views,
            decode,
        })
    }
}

/// The spatial and colour draws of one view, in the reference's order.
fn draw_augmentation(
    cfg: &ViewConfig,
    kind: ViewKind,
    frames: Vec<usize>,
    size: usize,
    scale: [f64; 2],
    clip: ClipShape,
    rng: &mut impl Uniform,
) -> ViewDraw {
    let crop = random_resized_crop(
        clip.height,
        clip.width,
        scale,
        cfg.ratio,
        cfg.crop_tries,
        rng,
    );
    let flip = rng.uniform() < cfg.flip_p;
    let mut jitter = Vec::new();
    if rng.uniform() < cfg.jitter_p {
        let mut ops: Vec<(JitterOp, f64)> = [
            (JitterOp::Brightness, cfg.brightness),
            (JitterOp::Contrast, cfg.contrast),
            (JitterOp::Saturation, cfg.saturation),
        ]
        .into_iter()
        .filter(|(_, v)| *v != 0.0)
        .collect();
        // Fisher–Yates: a uniform random order of the enabled operations.
        for i in (1..ops.len()).rev() {
            let j = rng.below(i + 1);
            ops.swap(i, j);
        }
        for (_, strength) in &mut ops {
            *strength = 1.0 + rng.between(-*strength, *strength);
        }
        jitter = ops;
    }
    let grayscale = rng.uniform() < cfg.grayscale_p;
    let table = kind.table_index();
    let blur = cfg.blur && rng.uniform() < cfg.blur_p[table];
    let solarize = cfg.solarize && rng.uniform() < cfg.solarize_p[table];
    ViewDraw {
        kind,
        size,
        frames,
        crop,
        flip,
        jitter,
        grayscale,
        blur,
        solarize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(frames: usize) -> ClipShape {
        ClipShape {
            frames,
            height: 256,
            width: 256,
        }
    }

    fn key(clip: u64) -> DrawKey {
        DrawKey {
            seed: 7,
            epoch: 3,
            clip,
        }
    }

    /// Handcrafted uniform draws, consumed in order.
    struct Scripted<'a>(std::iter::Copied<std::slice::Iter<'a, f64>>);

    impl Uniform for Scripted<'_> {
        fn uniform(&mut self) -> f64 {
            self.0.next().expect("test supplied too few draws")
        }
    }

    fn scripted(draws: &[f64]) -> Scripted<'_> {
        Scripted(draws.iter().copied())
    }

    #[test]
    fn global_indices_for_150_frames() {
        let plan = ViewPlan::draw(&ViewConfig::default(), shape(150), key(0)).expect("plan");
        assert_eq!(plan.views[0].frames, [0, 20, 41, 62, 82, 103, 124, 145]);
        assert_eq!(
            plan.views[1].frames,
            [
                5, 14, 24, 34, 43, 53, 63, 72, 82, 92, 101, 111, 121, 130, 140, 149
            ]
        );
        assert_eq!(plan.views[0].kind, ViewKind::Global1);
        assert_eq!(plan.views[1].kind, ViewKind::Global2);
    }

    #[test]
    fn linspace_edge_cases() {
        assert_eq!(linspace_indices(3, 10, 1, 5), [3]);
        assert_eq!(linspace_indices(0, -4, 4, 1), [0, 0, 0, 0]);
        assert_eq!(linspace_indices(5, 5, 3, 5), [4, 4, 4]);
        assert_eq!(linspace_indices(0, 3, 4, 10), [0, 1, 2, 3]);
        // 0, 2.5, 5 truncate to 0, 2, 5.
        assert_eq!(linspace_indices(0, 5, 3, 10), [0, 2, 5]);
    }

    #[test]
    fn local_views_have_their_counts_and_stay_in_range() {
        let cfg = ViewConfig::default();
        for clip in 0..200 {
            let plan = ViewPlan::draw(&cfg, shape(150), key(clip)).expect("plan");
            assert_eq!(plan.views.len(), 10);
            for (k, view) in plan.views[2..].iter().enumerate() {
                assert_eq!(view.kind, ViewKind::Local(k));
                assert_eq!(view.frames.len(), cfg.local_frames[k]);
                assert_eq!(view.size, 96);
                let (first, last) = (view.frames[0], *view.frames.last().expect("frames"));
                assert!(first < 150 - 150 / 8, "start {first}");
                assert_eq!(last - first, 150 / 8, "a local view spans N / 8 frames");
                assert!(view.frames.windows(2).all(|w| w[0] <= w[1]));
            }
            let mut all: Vec<usize> = plan.views.iter().flat_map(|v| v.frames.clone()).collect();
            all.sort_unstable();
            all.dedup();
            assert_eq!(plan.decode, all);
        }
    }

    #[test]
    fn short_clips_plan() {
        let cfg = ViewConfig::default();
        for n in [1, 2, 5, 8, 15, 16] {
            let plan = ViewPlan::draw(&cfg, shape(n), key(n as u64)).expect("plan");
            for view in &plan.views {
                assert!(view.frames.iter().all(|&f| f < n), "n={n}: {view:?}");
            }
            assert_eq!(plan.views[0].frames.len(), 8);
            assert_eq!(plan.views[1].frames.len(), 16);
            assert!(plan.decode.len() <= n);
        }
        let one = ViewPlan::draw(&cfg, shape(1), key(0)).expect("plan");
        assert_eq!(one.decode, [0]);
        let five = ViewPlan::draw(&cfg, shape(5), key(0)).expect("plan");
        assert_eq!(five.views[0].frames, [0; 8]);
        assert_eq!(five.views[1].frames, linspace_indices(5, 5, 16, 5));
        let err = ViewPlan::draw(&cfg, shape(0), key(0)).expect_err("empty clip");
        assert!(err.to_string().contains("0 frames"), "{err}");
    }

    #[test]
    fn plans_are_a_function_of_the_key() {
        let cfg = ViewConfig::default();
        let a = ViewPlan::draw(&cfg, shape(150), key(11)).expect("plan");
        let b = ViewPlan::draw(&cfg, shape(150), key(11)).expect("plan");
        assert_eq!(a, b);
        let other_epoch = DrawKey {
            epoch: 4,
            ..key(11)
        };
        let c = ViewPlan::draw(&cfg, shape(150), other_epoch).expect("plan");
        assert_ne!(a, c);
        let d = ViewPlan::draw(&cfg, shape(150), key(12)).expect("plan");
        assert_ne!(a, d);
        // A view's draws do not depend on the other views (one stream per view).
        let mut fewer = cfg.clone();
        fewer.local_frames.truncate(3);
        let e = ViewPlan::draw(&fewer, shape(150), key(11)).expect("plan");
        assert_eq!(e.views[..], a.views[..5]);
    }

    #[test]
    fn crops_stay_inside_the_frame() {
        let cfg = ViewConfig::default();
        for (h, w) in [(256, 256), (256, 341), (480, 256), (7, 300), (1, 1), (3, 2)] {
            for v in 0..300 {
                let mut rng = ViewRng::new(key(v), 0);
                for scale in [cfg.global_scale, cfg.local_scale] {
                    let c = random_resized_crop(h, w, scale, cfg.ratio, 10, &mut rng);
                    assert!(c.height >= 1 && c.width >= 1, "{c:?}");
                    assert!(
                        c.top + c.height <= h && c.left + c.width <= w,
                        "{h}x{w}: {c:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn crop_keeps_the_last_valid_try() {
        let (lo, hi) = ((0.75f64).ln(), (4.0f64 / 3.0).ln());
        let aspect_one = -lo / (hi - lo); // log-aspect draw that gives aspect 1
        // Try 1 valid (area 0.25 → 128×128, top 0.5 → 64, left 0 → 0); try 2 too wide
        // (area 1, aspect 4/3 → 296 > 256); try 3 valid (area 0.5 → 181×181, 0.99 → 75, 0.1 → 7).
        let mut draws = vec![
            0.25,
            aspect_one,
            0.5,
            0.0,
            1.0,
            1.0 - 1e-12,
            0.5,
            aspect_one,
        ];
        draws.extend([0.99, 0.1]);
        // Seven more invalid tries.
        for _ in 0..7 {
            draws.extend([1.0, 1.0 - 1e-12]);
        }
        let crop = random_resized_crop(
            256,
            256,
            [0.0, 1.0],
            [0.75, 4.0 / 3.0],
            10,
            &mut scripted(&draws),
        );
        // sqrt(0.5 · 65536) = 181.02 → 181; positions below(76) and below(76).
        assert_eq!(
            crop,
            CropBox {
                top: 75,
                left: 7,
                height: 181,
                width: 181
            }
        );
    }

    #[test]
    fn crop_rounds_half_to_even_and_falls_back_to_the_centre() {
        // Python's round: 2.5 → 2. Area 6.25 with aspect 1 → w = h = round(2.5) = 2.
        let mut draws = vec![6.25 / 100.0, 0.5, 0.0, 0.0];
        let crop = random_resized_crop(10, 10, [0.0, 1.0], [1.0, 1.0], 1, &mut scripted(&draws));
        assert_eq!((crop.height, crop.width), (2, 2));
        // No valid try on a tall frame: centre crop of width × round(width / (3/4)).
        draws = [1.0 - 1e-12, 1.0 - 1e-12].repeat(10);
        let crop = random_resized_crop(
            300,
            100,
            [2.0, 3.0],
            [0.75, 4.0 / 3.0],
            10,
            &mut scripted(&draws),
        );
        assert_eq!(
            crop,
            CropBox {
                top: (300 - 133) / 2,
                left: 0,
                height: 133,
                width: 100
            }
        );
        // Wide frame: height × round(height · 4/3); within the ratio range: the whole frame.
        assert_eq!(
            centre_crop(100, 300, [0.75, 4.0 / 3.0]),
            CropBox {
                top: 0,
                left: (300 - 133) / 2,
                height: 100,
                width: 133
            }
        );
        assert_eq!(
            centre_crop(256, 256, [0.75, 4.0 / 3.0]),
            CropBox {
                top: 0,
                left: 0,
                height: 256,
                width: 256
            }
        );
        // Zero tries: always the centre crop.
        let crop = random_resized_crop(
            256,
            256,
            [0.4, 1.0],
            [0.75, 4.0 / 3.0],
            0,
            &mut scripted(&[]),
        );
        assert_eq!(crop, centre_crop(256, 256, [0.75, 4.0 / 3.0]));
    }

    #[test]
    fn augmentation_rates_match_the_probabilities() {
        let cfg = ViewConfig::default();
        let (mut views, mut flips, mut jitters, mut grays) = (0usize, 0usize, 0usize, 0usize);
        let mut orders = std::collections::HashSet::new();
        for clip in 0..400 {
            let plan = ViewPlan::draw(&cfg, shape(150), key(clip)).expect("plan");
            for view in &plan.views {
                views += 1;
                flips += view.flip as usize;
                grays += view.grayscale as usize;
                assert!(!view.blur && !view.solarize, "off by default");
                if !view.jitter.is_empty() {
                    jitters += 1;
                    assert_eq!(view.jitter.len(), 3);
                    orders.insert(
                        view.jitter
                            .iter()
                            .map(|(op, _)| *op as u8)
                            .collect::<Vec<_>>(),
                    );
                    for &(op, f) in &view.jitter {
                        let v = match op {
                            JitterOp::Brightness => cfg.brightness,
                            JitterOp::Contrast => cfg.contrast,
                            JitterOp::Saturation => cfg.saturation,
                        };
                        assert!((1.0 - v..1.0 + v).contains(&f), "{op:?} factor {f}");
                    }
                }
            }
        }
        let rate = |n: usize| n as f64 / views as f64;
        // 4000 draws: 4 standard deviations are below 0.032.
        assert!(
            (rate(flips) - 0.5).abs() < 0.032,
            "flip rate {}",
            rate(flips)
        );
        assert!(
            (rate(jitters) - 0.8).abs() < 0.026,
            "jitter rate {}",
            rate(jitters)
        );
        assert!(
            (rate(grays) - 0.2).abs() < 0.026,
            "grayscale rate {}",
            rate(grays)
        );
        assert_eq!(
            orders.len(),
            6,
            "every order of the three operations occurs"
        );

        let mut on = cfg.clone();
        on.blur = true;
        on.solarize = true;
        let (mut blur_g1, mut blur_g2, mut sol_g2, mut sol_other) = (0, 0, 0, 0);
        for clip in 0..400 {
            let plan = ViewPlan::draw(&on, shape(150), key(clip)).expect("plan");
            blur_g1 += plan.views[0].blur as usize;
            blur_g2 += plan.views[1].blur as usize;
            sol_g2 += plan.views[1].solarize as usize;
            sol_other += plan
                .views
                .iter()
                .filter(|v| v.kind != ViewKind::Global2 && v.solarize)
                .count();
        }
        assert_eq!(blur_g1, 400);
        assert!(
            (20..=65).contains(&blur_g2),
            "global-2 blur {blur_g2} / 400"
        );
        assert!(
            (55..=105).contains(&sol_g2),
            "global-2 solarise {sol_g2} / 400"
        );
        assert_eq!(sol_other, 0);
    }

    #[test]
    fn validate_names_the_bad_field() {
        type Spoil = Box<dyn Fn(&mut ViewConfig)>;
        let cases: Vec<(&str, Spoil)> = vec![
            ("global_size", Box::new(|c| c.global_size = 0)),
            ("local_frames[3]", Box::new(|c| c.local_frames[3] = 0)),
            ("local_scale", Box::new(|c| c.local_scale = [0.5, 0.1])),
            ("ratio", Box::new(|c| c.ratio = [0.0, 1.0])),
            ("flip_p", Box::new(|c| c.flip_p = 1.5)),
            ("blur_p[2]", Box::new(|c| c.blur_p[2] = -0.1)),
            ("contrast", Box::new(|c| c.contrast = 2.0)),
            ("std[1]", Box::new(|c| c.std[1] = 0.0)),
            ("blur_sigma", Box::new(|c| c.blur_sigma = f64::NAN)),
        ];
        for (field, spoil) in cases {
            let mut cfg = ViewConfig::default();
            spoil(&mut cfg);
            let err = cfg.validate().expect_err(field).to_string();
            assert!(err.contains(&format!("`{field}`")), "{field}: {err}");
        }
        ViewConfig::default().validate().expect("defaults");
        ViewConfig::tiny().validate().expect("tiny");
        assert_eq!(ViewConfig::tiny().global_size, 112);
        assert_eq!(ViewConfig::tiny().local_size, 48);
    }

    #[test]
    fn config_reads_partial_json_and_rejects_typos() {
        let cfg: ViewConfig =
            serde_json::from_str(r#"{"global_size": 112, "gray_weights": "luma"}"#).expect("json");
        assert_eq!(cfg.global_size, 112);
        assert_eq!(cfg.gray_weights, GrayWeights::Luma);
        assert_eq!(cfg.local_size, 96);
        assert!(serde_json::from_str::<ViewConfig>(r#"{"global_sise": 1}"#).is_err());
    }
}
