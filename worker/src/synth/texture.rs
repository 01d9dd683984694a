//! The wall's surface: a texture periodic in angle and depth (mucosa colour with mottling,
//! vessels, wet spots), built from hashed value noise, with coarser copies for far-away wall.

/// Angle texels around the tube (a power of two: angle bins wrap by masking).
pub(super) const TEX_A: usize = 1024;
/// Depth texels per period (a power of two).
pub(super) const TEX_Z: usize = 512;
/// Depth period of the texture, in tube radii.
pub(super) const TEX_PERIOD: f32 = 4.0;
/// Number of levels; level `k` is `4^k` times coarser in each direction.
pub(super) const LEVELS: usize = 3;

/// One resolution of the texture: RGB albedo and wetness (specular strength), 0–255 each.
pub(super) struct Level {
    /// log2 of the width (angle texels).
    pub(super) shift_a: u32,
    /// log2 of the height (depth texels).
    pub(super) shift_z: u32,
    pub(super) texels: Vec<[u8; 4]>,
}

impl Level {
    /// The texel at angle bin `a` (0..TEX_A) and depth texel `z` (any integer: it wraps).
    #[inline(always)]
    pub(super) fn at(&self, a: usize, z: i32) -> [u8; 4] {
        let level_shift = 10 - self.shift_a; // TEX_A = 2^10
        let ai = a >> level_shift;
        let zi = ((z >> level_shift) as usize) & ((1 << self.shift_z) - 1);
        self.texels[(zi << self.shift_a) | ai]
    }
}

/// Colours a texture is made from.
pub(super) struct Palette {
    /// Mucosa base colour, linear 0–1.
    pub(super) base: [f32; 3],
    /// Colour of vessels.
    pub(super) vessel: [f32; 3],
    /// How strongly vessels show (0–1).
    pub(super) vessel_strength: f32,
    /// How much the colour varies (0–1).
    pub(super) mottling: f32,
    /// Share of the surface that is wet and shiny (0–1).
    pub(super) wetness: f32,
}

/// The full texture: levels 0 (finest) to `LEVELS - 1`.
pub(super) struct Texture {
    pub(super) levels: Vec<Level>,
}

impl Texture {
    pub(super) fn new(palette: &Palette, seed: u64) -> Self {
        let mottle = fbm(
            seed ^ 0x1111,
            &[(8, 4, 0.5), (16, 8, 0.25), (32, 16, 0.15), (64, 32, 0.1)],
        );
        let vessels = fbm(
            seed ^ 0x2222,
            &[(32, 16, 0.6), (64, 32, 0.3), (128, 64, 0.1)],
        );
        let vessels_fine = fbm(seed ^ 0x3333, &[(128, 64, 0.7), (256, 128, 0.3)]);
        let wet = fbm(seed ^ 0x4444, &[(128, 64, 0.6), (256, 128, 0.4)]);
        let wet_threshold = 1.0 - 0.45 * palette.wetness.clamp(0.0, 1.0);
        let mut texels = Vec::with_capacity(TEX_A * TEX_Z);
        for i in 0..TEX_A * TEX_Z {
            let m = (mottle[i] - 0.5) * 2.0 * palette.mottling;
            // Ridged noise: thin lines where the field crosses one half.
            let coarse = 1.0 - smoothstep(0.0, 0.03, (vessels[i] - 0.5).abs());
            let fine = 1.0 - smoothstep(0.0, 0.02, (vessels_fine[i] - 0.5).abs());
            let v = (coarse * 0.8 + fine * 0.3).min(1.0) * palette.vessel_strength;
            let mut rgb = [0u8; 4];
            for (c, out) in rgb.iter_mut().take(3).enumerate() {
                let shade = palette.base[c] * (1.0 + m * (0.6 + 0.2 * c as f32));
                let col = shade + (palette.vessel[c] - shade) * v;
                *out = (col.clamp(0.0, 1.0) * 255.0 + 0.5) as u8;
            }
            let w = ((wet[i] - wet_threshold) * 6.0).clamp(0.0, 1.0);
            rgb[3] = (w * 255.0 + 0.5) as u8;
            texels.push(rgb);
        }
        let mut levels = vec![Level {
            shift_a: TEX_A.trailing_zeros(),
            shift_z: TEX_Z.trailing_zeros(),
            texels,
        }];
        for _ in 1..LEVELS {
            let prev = &levels[levels.len() - 1];
            levels.push(downsample4(prev));
        }
        Self { levels }
    }
}

/// A 4× smaller copy (box filter).
fn downsample4(src: &Level) -> Level {
    let (wa, wz) = (1usize << src.shift_a, 1usize << src.shift_z);
    let (na, nz) = (wa / 4, wz / 4);
    let mut texels = Vec::with_capacity(na * nz);
    for z in 0..nz {
        for a in 0..na {
            let mut sum = [0u32; 4];
            for dz in 0..4 {
                let row = &src.texels[(z * 4 + dz) * wa + a * 4..][..4];
                for t in row {
                    for c in 0..4 {
                        sum[c] += u32::from(t[c]);
                    }
                }
            }
            texels.push(sum.map(|s| ((s + 8) / 16) as u8));
        }
    }
    Level {
        shift_a: src.shift_a - 2,
        shift_z: src.shift_z - 2,
        texels,
    }
}

#[inline]
fn smoothstep(lo: f32, hi: f32, x: f32) -> f32 {
    let t = ((x - lo) / (hi - lo)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// SplitMix64: a fast, well-mixed hash of a 64-bit value.
pub(super) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Fractal value noise on the `TEX_A × TEX_Z` torus, roughly in [0, 1]: a sum of octaves, each
/// `(cells around, cells along depth, amplitude)`, with smoothstep interpolation between lattice
/// values. Each octave is interpolated along depth once per row, then along angle per texel.
/// Cell counts must divide the texture's size.
fn fbm(seed: u64, octaves: &[(usize, usize, f32)]) -> Vec<f32> {
    let mut out = vec![0.0f32; TEX_A * TEX_Z];
    let total: f32 = octaves.iter().map(|o| o.2).sum();
    let mut row = Vec::new();
    let mut weights = Vec::new();
    for (k, &(ca, cz, amp)) in octaves.iter().enumerate() {
        let lattice: Vec<f32> = (0..ca * cz)
            .map(|i| {
                let h = splitmix(seed ^ ((k as u64) << 40) ^ i as u64);
                (h >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect();
        debug_assert!(
            TEX_A.is_multiple_of(ca) && TEX_Z.is_multiple_of(cz),
            "cells must divide the texture"
        );
        let (sa, sz) = (TEX_A / ca, TEX_Z / cz);
        weights.clear();
        weights.extend((0..sa).map(|x| smoothstep(0.0, 1.0, x as f32 / sa as f32)));
        let amp = amp / total;
        for z in 0..TEX_Z {
            let (iz, fz) = (z / sz, smoothstep(0.0, 1.0, (z % sz) as f32 / sz as f32));
            let (r0, r1) = (iz * ca, ((iz + 1) % cz) * ca);
            row.clear();
            row.extend((0..ca).map(|i| lattice[r0 + i] + (lattice[r1 + i] - lattice[r0 + i]) * fz));
            let line = &mut out[z * TEX_A..(z + 1) * TEX_A];
            for (x, v) in line.iter_mut().enumerate() {
                let ia = x / sa;
                let (a, b) = (row[ia], row[(ia + 1) % ca]);
                *v += (a + (b - a) * weights[x % sa]) * amp;
            }
        }
    }
    out
}
