//! The renderer behind [`super::render_clip`]: a tube of radius 1 seen from a camera near its
//! axis. Each pixel's ray is precomputed once per clip size (angle around the axis and depth at
//! which it meets the wall); per frame the camera moves along the tube, rolls, drifts off axis
//! and turns (the vanishing point moves), and each pixel is shaded with a light at the tip:
//! Lambert falloff with distance, haustral folds as rings, a textured mucosa, specular spots.
//! Polyps are domes on the wall, intersected by marching only the rays that can reach them.

use std::f32::consts::TAU;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::texture::{LEVELS, Level, Palette, TEX_PERIOD, TEX_Z, Texture, splitmix};
use super::{BBox, Labels, Masks, SynthParams};
use crate::video::Frames;

/// Angular resolution of the fold and wall-distance tables.
const SECTORS: usize = 256;
/// Distinct folds before their amplitudes repeat.
const RINGS: usize = 16;
/// Samples of the fold profile over one period.
const FOLD_BINS: usize = 256;
/// Sensor noise table (a power of two).
const NOISE_LEN: usize = 1 << 16;
/// Steps of the coarse ray march through a polyp's depth range (then bisection).
const MARCH_STEPS: usize = 14;

/// A pixel's ray relative to the vanishing point: angle around the tube axis (full circle =
/// 2^16) and the depth at which it meets a wall at distance 1 (`focal / radius`).
#[derive(Clone, Copy)]
struct Ray {
    angle: u16,
    depth: f32,
}

struct Polyp {
    /// Angle on the wall (radians).
    theta: f32,
    /// Depth of its centre along the tube (world units: tube radii).
    z: f32,
    /// Footprint radius.
    radius: f32,
    /// Height of the dome.
    height: f32,
    /// Colour multiplier.
    tint: [f32; 3],
}

/// One polyp as seen in the current frame.
struct ActivePolyp {
    id: usize,
    /// Camera-frame angle of its centre, 2^16 per turn.
    centre: u16,
    /// Angular half-width, 2^16 per turn.
    half_width: u16,
    /// Depth of its centre relative to the camera.
    z: f32,
    radius: f32,
    height: f32,
    tint: [f32; 3],
}

/// Per-pixel intermediate values of one row, structure-of-arrays so that the arithmetic passes
/// vectorise; allocated once per clip.
struct RowBuffers {
    depth: Vec<f32>,
    wall: Vec<f32>,
    angle: Vec<u16>,
    z: Vec<f32>,
    shade: Vec<f32>,
    lambert: Vec<f32>,
    irradiance: Vec<f32>,
    r: Vec<f32>,
    g: Vec<f32>,
    b: Vec<f32>,
    gain: Vec<f32>,
}

impl RowBuffers {
    fn new(w: usize) -> Self {
        let v = || vec![0.0; w];
        Self {
            depth: v(),
            wall: v(),
            angle: vec![0; w],
            z: v(),
            shade: v(),
            lambert: v(),
            irradiance: v(),
            r: v(),
            g: v(),
            b: v(),
            gain: v(),
        }
    }
}

/// Per-clip scene description, all drawn from the seed.
struct Scene {
    width: usize,
    height: usize,
    focal: f32,
    texture: Texture,
    fold_period: f32,
    fold_depth: f32,
    fold_light: f32,
    fold_profile: [f32; FOLD_BINS],
    /// Depth offset of the folds per angle sector, in fold bins.
    fold_wobble: [f32; SECTORS],
    fold_slope: [f32; FOLD_BINS],
    ring_amp: Vec<[f32; SECTORS]>,
    spec: [f32; 256],
    spec_strength: f32,
    vignette: Vec<f32>,
    noise: Vec<i8>,
    polyps: Vec<Polyp>,
    camera: Vec<Camera>,
}

/// Camera state of one frame.
#[derive(Clone, Copy)]
struct Camera {
    z: f32,
    roll: f32,
    /// Vanishing point in pixels.
    cx: i32,
    cy: i32,
    /// Off-axis offset (fraction of the radius) and its direction in the camera frame.
    offset: f32,
    offset_dir: f32,
    exposure: f32,
    /// Share of the previous frame kept (motion blur).
    blur: f32,
}

fn uniform(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> f32 {
    rng.random_range(lo..hi)
}

impl Scene {
    fn new(params: &SynthParams, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (w, h, t) = (params.width, params.height, params.frames);
        let focal = uniform(&mut rng, 0.30, 0.42) * w.max(h) as f32;

        let red = uniform(&mut rng, 0.78, 0.98);
        let green = uniform(&mut rng, 0.30, 0.46);
        let palette = Palette {
            base: [red, green, green * uniform(&mut rng, 0.85, 1.08)],
            vessel: [
                uniform(&mut rng, 0.45, 0.62),
                uniform(&mut rng, 0.08, 0.16),
                uniform(&mut rng, 0.10, 0.20),
            ],
            vessel_strength: uniform(&mut rng, 0.1, 0.55),
            mottling: uniform(&mut rng, 0.08, 0.25),
            wetness: uniform(&mut rng, 0.2, 0.8),
        };
        let texture = Texture::new(&palette, rng.random());

        // Haustral folds: sharp rings, each spanning part of the circumference.
        let sharpness = uniform(&mut rng, 2.0, 6.0);
        let mut fold_profile = [0.0; FOLD_BINS];
        for (i, f) in fold_profile.iter_mut().enumerate() {
            let c = 0.5 + 0.5 * (TAU * i as f32 / FOLD_BINS as f32).cos();
            *f = c.powf(sharpness);
        }
        let fold_period = uniform(&mut rng, 0.8, 1.6);
        let mut fold_slope = [0.0; FOLD_BINS];
        for i in 0..FOLD_BINS {
            let next = fold_profile[(i + 1) % FOLD_BINS];
            let prev = fold_profile[(i + FOLD_BINS - 1) % FOLD_BINS];
            fold_slope[i] = (next - prev) / (2.0 * fold_period / FOLD_BINS as f32);
        }
        let fold_strength = uniform(&mut rng, 0.4, 1.0);
        // Folds are not planar rings: their depth wanders around the circumference.
        let harmonics: [(f32, f32, f32); 3] = std::array::from_fn(|k| {
            (
                k as f32 + 1.0,
                uniform(&mut rng, 0.0, 0.35) / (k as f32 + 1.0),
                uniform(&mut rng, 0.0, TAU),
            )
        });
        let fold_wobble = std::array::from_fn(|s| {
            let theta = TAU * s as f32 / SECTORS as f32;
            let w: f32 = harmonics
                .iter()
                .map(|&(n, a, p)| a * (n * theta + p).sin())
                .sum();
            w * FOLD_BINS as f32
        });
        let ring_amp = (0..RINGS)
            .map(|_| {
                let lobes: [(f32, f32); 3] = std::array::from_fn(|_| {
                    (uniform(&mut rng, 0.0, TAU), uniform(&mut rng, 0.0, 1.0))
                });
                let base = uniform(&mut rng, 0.3, 1.0);
                let mut amp = [0.0; SECTORS];
                for (s, a) in amp.iter_mut().enumerate() {
                    let theta = TAU * s as f32 / SECTORS as f32;
                    let lobe: f32 = lobes
                        .iter()
                        .map(|&(p, k)| k * (theta * 1.0 + p).cos())
                        .sum();
                    // Crescents: each fold fades out over part of the circumference.
                    *a = (base + 0.6 * lobe).clamp(0.0, 1.0) * fold_strength;
                }
                amp
            })
            .collect();

        let shininess = uniform(&mut rng, 12.0, 40.0);
        let spec = std::array::from_fn(|i| (i as f32 / 255.0).powf(shininess));

        // Dark corners of the endoscope's round field of view.
        let field = uniform(&mut rng, 0.50, 0.72) * w.max(h) as f32;
        let mut vignette = Vec::with_capacity(w * h);
        for y in 0..h {
            for x in 0..w {
                let dx = x as f32 + 0.5 - w as f32 / 2.0;
                let dy = y as f32 + 0.5 - h as f32 / 2.0;
                let r = (dx * dx + dy * dy).sqrt();
                let edge = ((field - r) / 3.0).clamp(0.0, 1.0);
                vignette.push(edge * (1.0 - 0.35 * (r / field).powi(2)).max(0.0));
            }
        }
        let noise_amp = uniform(&mut rng, 1.0, 4.0);
        let noise_seed: u64 = rng.random();
        let noise = (0..NOISE_LEN)
            .map(|i| {
                let u = (splitmix(noise_seed ^ i as u64) >> 40) as f32 / (1u64 << 24) as f32;
                ((u - 0.5) * 2.0 * noise_amp).round() as i8
            })
            .collect();

        let camera = camera_path(&mut rng, w, h, t);
        let polyps = if rng.random_bool(params.polyp_probability) {
            let count = if rng.random_bool(0.25) { 2 } else { 1 };
            let count = count.min(params.max_polyps);
            (0..count)
                .map(|_| {
                    // Place it a little ahead of where the camera is at some frame of the clip.
                    let at = rng.random_range(t as f32 * 0.15..=t as f32 * 0.85) as usize;
                    let cam = camera[at.min(t - 1)];
                    let radius = uniform(&mut rng, 0.15, 0.4) * params.polyp_scale as f32;
                    Polyp {
                        theta: uniform(&mut rng, 0.0, TAU),
                        z: cam.z + uniform(&mut rng, 0.8, 2.2),
                        radius,
                        height: radius * uniform(&mut rng, 0.5, 1.1),
                        tint: {
                            let tint = [
                                uniform(&mut rng, 0.95, 1.1),
                                uniform(&mut rng, 0.7, 1.0),
                                uniform(&mut rng, 0.75, 1.0),
                            ];
                            // Contrast > 1 moves the mound's colour away from the reddish
                            // wall (paler, or browner); 1 leaves the tint as drawn.
                            params.polyp_tone.apply(tint, params.polyp_contrast as f32)
                        },
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        Self {
            width: w,
            height: h,
            focal,
            texture,
            fold_period,
            fold_depth: uniform(&mut rng, 0.08, 0.22),
            fold_light: uniform(&mut rng, 0.10, 0.30),
            fold_profile,
            fold_wobble,
            fold_slope,
            ring_amp,
            spec,
            spec_strength: uniform(&mut rng, 0.4, 1.2),
            vignette,
            noise,
            polyps,
            camera,
        }
    }
}

/// A smooth random camera path: forward/backward motion, roll, turning and drifting off axis.
fn camera_path(rng: &mut ChaCha8Rng, w: usize, h: usize, frames: usize) -> Vec<Camera> {
    let wave = |rng: &mut ChaCha8Rng, period_lo: f32, period_hi: f32| {
        let omega = TAU / uniform(rng, period_lo, period_hi);
        let phase = uniform(rng, 0.0, TAU);
        move |t: f32| (omega * t + phase).sin()
    };
    let speed0 = uniform(rng, -0.02, 0.05);
    let (speed1, speed2) = (uniform(rng, 0.0, 0.03), uniform(rng, 0.0, 0.015));
    let (sw1, sw2) = (wave(rng, 60.0, 200.0), wave(rng, 15.0, 50.0));
    let roll0 = uniform(rng, 0.0, TAU);
    let roll_rate = uniform(rng, -0.01, 0.01);
    let roll_amp = uniform(rng, 0.0, 0.5);
    let rw = wave(rng, 80.0, 300.0);
    let (ax, ay) = (uniform(rng, 0.0, 0.25), uniform(rng, 0.0, 0.25));
    let (wx, wy) = (wave(rng, 60.0, 250.0), wave(rng, 60.0, 250.0));
    let (bx, by) = (uniform(rng, -0.15, 0.15), uniform(rng, -0.15, 0.15));
    let off0 = uniform(rng, 0.0, 0.4);
    let off1 = uniform(rng, 0.0, 0.15);
    let ow = wave(rng, 80.0, 250.0);
    let dir0 = uniform(rng, 0.0, TAU);
    let dw = wave(rng, 100.0, 400.0);
    let exposure = uniform(rng, 1.3, 2.2);
    let ew = wave(rng, 20.0, 90.0);
    let mut z = uniform(rng, 0.0, 100.0);
    let mut out = Vec::with_capacity(frames);
    let mut prev_roll = None;
    for i in 0..frames {
        let t = i as f32;
        let speed = speed0 + speed1 * sw1(t) + speed2 * sw2(t);
        z += speed;
        let roll = roll0 + roll_rate * t + roll_amp * rw(t);
        let roll_speed = prev_roll.map_or(0.0, |p: f32| (roll - p).abs());
        prev_roll = Some(roll);
        let cx = w as f32 * (0.5 + bx + ax * wx(t));
        let cy = h as f32 * (0.5 + by + ay * wy(t));
        out.push(Camera {
            z,
            roll,
            cx: cx.round() as i32,
            cy: cy.round() as i32,
            offset: (off0 + off1 * ow(t)).clamp(0.0, 0.5),
            offset_dir: dir0 + 1.5 * dw(t),
            exposure: exposure * (1.0 + 0.06 * ew(t)),
            blur: (speed.abs() * 8.0 + roll_speed * 20.0).min(0.55),
        });
    }
    out
}

/// Per-pixel rays on a `2w × 2h` grid centred on its middle, so that any vanishing point within
/// the frame selects a `w × h` window of it.
fn ray_grid(w: usize, h: usize, focal: f32) -> Vec<Ray> {
    let (gw, gh) = (2 * w, 2 * h);
    let mut rays = Vec::with_capacity(gw * gh);
    for gy in 0..gh {
        for gx in 0..gw {
            let dx = gx as f32 + 0.5 - w as f32;
            let dy = gy as f32 + 0.5 - h as f32;
            let r = (dx * dx + dy * dy).sqrt().max(0.5);
            let a = dy.atan2(dx).rem_euclid(TAU) / TAU;
            rays.push(Ray {
                angle: ((a * 65536.0) as u32 & 0xFFFF) as u16,
                depth: focal / r,
            });
        }
    }
    rays
}

/// Renders the clip described by `params` and `seed`.
pub(super) fn render(params: &SynthParams, seed: u64) -> (Frames, Labels) {
    let scene = Scene::new(params, seed);
    let (w, h, t) = (scene.width, scene.height, params.frames);
    let rays = ray_grid(w, h, scene.focal);
    let mut frames = Frames::new(t, h, w);
    let mut masks = Masks::new(t, h, w);
    let mut boxes = Vec::with_capacity(t);
    for i in 0..t {
        let (done, rest) = frames.data.split_at_mut(i * w * h * 3);
        let prev = if i == 0 {
            None
        } else {
            Some(&done[(i - 1) * w * h * 3..])
        };
        let frame = &mut rest[..w * h * 3];
        let mask = masks.frame_mut(i);
        boxes.push(render_frame(&scene, &rays, i, frame, prev, mask));
    }
    let polyp = boxes.iter().any(|b: &Vec<BBox>| !b.is_empty());
    (
        frames,
        Labels {
            polyp,
            masks,
            boxes,
        },
    )
}

/// Shades one frame into `out` (RGB) and `mask` (1 where a polyp is visible); returns one box
/// per visible polyp.
// The passes index several row buffers in step; index loops read best.
#[allow(clippy::needless_range_loop)]
fn render_frame(
    scene: &Scene,
    rays: &[Ray],
    index: usize,
    out: &mut [u8],
    prev: Option<&[u8]>,
    mask: &mut [u8],
) -> Vec<BBox> {
    let (w, h) = (scene.width, scene.height);
    let cam = scene.camera[index];
    let gw = 2 * w;
    // Keep the vanishing point inside the frame so every window lies within the ray grid.
    let cx = cam.cx.clamp(0, w as i32) as usize;
    let cy = cam.cy.clamp(0, h as i32) as usize;
    let roll16 = ((cam.roll / TAU).rem_euclid(1.0) * 65536.0) as u32 as u16;

    // Distance to the wall per camera-frame angle when the camera is off axis.
    let wall: [f32; SECTORS] = std::array::from_fn(|s| {
        let theta = TAU * s as f32 / SECTORS as f32;
        1.0 - cam.offset * (theta - cam.offset_dir).cos()
    });
    let active: Vec<ActivePolyp> = scene
        .polyps
        .iter()
        .enumerate()
        .filter_map(|(id, p)| {
            let z = p.z - cam.z;
            if !(0.05 - p.radius..20.0).contains(&z) {
                return None;
            }
            let cam_theta = (p.theta - cam.roll).rem_euclid(TAU);
            let half = (p.radius * 2.2).min(3.0) / TAU;
            Some(ActivePolyp {
                id,
                centre: ((cam_theta / TAU) * 65536.0) as u32 as u16,
                half_width: (half * 65536.0).min(32767.0) as u16,
                z,
                radius: p.radius,
                height: p.height,
                tint: p.tint,
            })
        })
        .collect();
    let mut boxes: Vec<Option<BBox>> = vec![None; scene.polyps.len()];

    let fold_scale = FOLD_BINS as f32 / scene.fold_period;
    let tex_scale = TEX_Z as f32 / TEX_PERIOD;
    let noise_offset = (splitmix(index as u64) as usize) & (NOISE_LEN - 1);
    let blur = if prev.is_some() { cam.blur } else { 0.0 };
    let keep = (blur * 256.0) as u32;
    let levels = &scene.texture.levels;
    debug_assert_eq!(levels.len(), LEVELS);

    let rows = &mut RowBuffers::new(w);
    for y in 0..h {
        let grid_row = (y + h - cy) * gw + (w - cx);
        let row_rays = &rays[grid_row..grid_row + w];
        let row_out = &mut out[y * w * 3..(y + 1) * w * 3];
        let row_mask = &mut mask[y * w..(y + 1) * w];
        let row_vig = &scene.vignette[y * w..(y + 1) * w];

        // Pass 1, table look-ups: where each ray meets the wall, and the folds there.
        for (x, ray) in row_rays.iter().enumerate() {
            let wall_dist = wall[(ray.angle >> 8) as usize];
            let depth = ray.depth * wall_dist;
            let world_angle = ray.angle.wrapping_add(roll16);
            let world_sector = (world_angle >> 8) as usize;
            let fold_pos = ((cam.z + depth) * fold_scale + scene.fold_wobble[world_sector]) as i32;
            let fold_bin = (fold_pos as usize) & (FOLD_BINS - 1);
            let ring = ((fold_pos >> 8) as usize) & (RINGS - 1);
            // Far folds fade: they would only alias into moiré rings around the lumen.
            let amp = scene.ring_amp[ring][world_sector] / (1.0 + depth * depth * 0.04);
            rows.depth[x] = depth;
            rows.wall[x] = wall_dist;
            rows.angle[x] = world_angle;
            // Folds bulge inwards (the wall comes closer) and face the light on their near side.
            rows.z[x] = depth * (1.0 - scene.fold_depth * scene.fold_profile[fold_bin] * amp);
            rows.shade[x] = 1.0 + scene.fold_light * scene.fold_slope[fold_bin] * amp;
        }
        // Pass 2, arithmetic only (vectorised): Lambert term and falloff of the tip's light.
        for x in 0..w {
            let (z, wall_dist) = (rows.z[x], rows.wall[x]);
            let inv2 = 1.0 / (z * z + wall_dist * wall_dist);
            rows.lambert[x] = (wall_dist * inv2.sqrt() * rows.shade[x]).clamp(0.0, 1.0);
            rows.irradiance[x] = cam.exposure * inv2;
        }
        // Pass 3, texture and specular look-ups.
        for x in 0..w {
            let z = rows.z[x];
            let level = if z < 1.5 {
                0
            } else if z < 5.0 {
                1
            } else {
                2
            };
            let texel = levels[level].at(
                (rows.angle[x] >> 6) as usize,
                ((cam.z + z) * tex_scale) as i32,
            );
            let (lambert, irradiance) = (rows.lambert[x], rows.irradiance[x]);
            let wet = f32::from(texel[3]) * (1.0 / 255.0);
            let spec = scene.spec[(lambert * 255.0) as u8 as usize]
                * scene.spec_strength
                * irradiance
                * (0.15 + wet);
            let diffuse = lambert * irradiance * (1.0 / 255.0);
            rows.r[x] = f32::from(texel[0]) * diffuse + spec;
            rows.g[x] = f32::from(texel[1]) * diffuse + spec;
            rows.b[x] = f32::from(texel[2]) * diffuse + spec;
        }
        // Pass 4, polyps: only the rays inside a polyp's angular range are marched.
        row_mask.fill(0);
        if !active.is_empty() {
            for (x, ray) in row_rays.iter().enumerate() {
                let mut hit_id = None;
                let mut nearest = f32::INFINITY;
                for p in &active {
                    let d = ray.angle.wrapping_sub(p.centre) as i16;
                    if d.unsigned_abs() >= p.half_width {
                        continue;
                    }
                    let wall_dist = rows.wall[x];
                    let du = f32::from(d) / 65536.0 * TAU * wall_dist;
                    let hit = shade_polyp(
                        scene,
                        p,
                        du,
                        rows.depth[x],
                        wall_dist,
                        rows.angle[x],
                        cam,
                        levels,
                    );
                    if let Some((s, [r, g, b])) = hit.filter(|&(s, _)| s < nearest) {
                        nearest = s;
                        (rows.r[x], rows.g[x], rows.b[x]) = (r, g, b);
                        hit_id = Some(p.id);
                    }
                }
                if let Some(id) = hit_id.filter(|_| row_vig[x] > 0.0) {
                    row_mask[x] = 1;
                    let (x, y) = (x as u32, y as u32);
                    let b = boxes[id].get_or_insert(BBox {
                        x0: x,
                        y0: y,
                        x1: x + 1,
                        y1: y + 1,
                    });
                    b.x0 = b.x0.min(x);
                    b.x1 = b.x1.max(x + 1);
                    b.y1 = b.y1.max(y + 1);
                }
            }
        }
        // Pass 5: a Reinhard-style tone curve on the brightest channel (vectorised), then
        // vignette, sensor noise and 8-bit output (`as u8` saturates).
        for x in 0..w {
            let peak = rows.r[x].max(rows.g[x]).max(rows.b[x]);
            rows.gain[x] = 275.0 / (peak + 0.25) * row_vig[x];
        }
        let noise_row = (noise_offset + y * w) & (NOISE_LEN - 1);
        for (x, px) in row_out.chunks_exact_mut(3).enumerate() {
            let gain = rows.gain[x];
            let noise = f32::from(scene.noise[(noise_row + x) & (NOISE_LEN - 1)]) * row_vig[x];
            px[0] = (rows.r[x] * gain + noise) as u8;
            px[1] = (rows.g[x] * gain + noise) as u8;
            px[2] = (rows.b[x] * gain + noise) as u8;
        }
        if let (Some(prev), true) = (prev, keep > 0) {
            let prev_row = &prev[y * w * 3..(y + 1) * w * 3];
            for (o, &p) in row_out.iter_mut().zip(prev_row) {
                *o = ((u32::from(*o) * (256 - keep) + u32::from(p) * keep + 128) >> 8) as u8;
            }
        }
    }
    boxes.into_iter().flatten().collect()
}

/// Intersects a pixel's ray with a polyp dome and shades the hit: returns the depth of the hit
/// and its linear colour, or `None` when the ray passes by.
///
/// `du` is the arc distance from the polyp's centre line, `wall_depth` the depth at which the
/// ray meets the bare wall at distance `wall_dist` from the camera axis. Along the ray, the
/// height above the wall at depth `s` is `wall_dist·(1 − s/wall_depth)`; the dome's height is
/// `height·(1 − q²)` with `q` the squared normalised distance from its centre (a rounded mound
/// with a visible rim).
#[allow(clippy::too_many_arguments)]
#[inline]
fn shade_polyp(
    scene: &Scene,
    p: &ActivePolyp,
    du: f32,
    wall_depth: f32,
    wall_dist: f32,
    world_angle: u16,
    cam: Camera,
    levels: &[Level],
) -> Option<(f32, [f32; 3])> {
    let inv_r2 = 1.0 / (p.radius * p.radius);
    let qu = du * du * inv_r2;
    if qu >= 1.0 {
        return None;
    }
    let s0 = (p.z - p.radius).max(0.02);
    let s1 = (p.z + p.radius).min(wall_depth);
    if s0 >= s1 {
        return None;
    }
    // Signed gap between the ray and the dome surface at depth s (negative: inside the dome).
    let gap = |s: f32| {
        let v = s - p.z;
        let q = qu + v * v * inv_r2;
        let dome = if q < 1.0 {
            p.height * (1.0 - q * q)
        } else {
            0.0
        };
        wall_dist * (1.0 - s / wall_depth) - dome
    };
    let step = (s1 - s0) / MARCH_STEPS as f32;
    let mut lo = s0;
    let mut hit = None;
    for k in 1..=MARCH_STEPS {
        let s = s0 + step * k as f32;
        if gap(s) <= 0.0 {
            hit = Some(s);
            break;
        }
        lo = s;
    }
    let mut hi = hit?;
    for _ in 0..5 {
        let mid = 0.5 * (lo + hi);
        if gap(mid) <= 0.0 {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let s = hi;
    let v = s - p.z;
    let q = (qu + v * v * inv_r2).min(1.0);
    let dome = p.height * (1.0 - q * q);
    // Surface normal (tangential, axial, inward) of the dome, and the direction to the tip.
    let dh_du = -4.0 * p.height * q * du * inv_r2;
    let dh_dv = -4.0 * p.height * q * v * inv_r2;
    let inward = (wall_dist - dome).max(0.0);
    let normal_len = (dh_du * dh_du + dh_dv * dh_dv + 1.0).sqrt();
    let to_tip = (s * s + inward * inward).sqrt();
    let lambert = ((dh_dv * s + inward) / (normal_len * to_tip)).clamp(0.0, 1.0);
    let irradiance = cam.exposure / (s * s + inward * inward);
    // Its own, finer pattern: the wall texture at three times the frequency.
    let level = if s < 1.5 { 0 } else { 1 };
    let texel = levels[level].at(
        (world_angle.wrapping_mul(3) >> 6) as usize,
        ((cam.z + s) * 3.0 * TEX_Z as f32 / TEX_PERIOD) as i32,
    );
    let spec =
        scene.spec[(lambert * 255.0) as u8 as usize] * scene.spec_strength * irradiance * 0.5;
    let diffuse = lambert * irradiance * (1.0 / 255.0);
    let rgb = std::array::from_fn(|c| f32::from(texel[c]) * p.tint[c] * diffuse + spec);
    Some((s, rgb))
}
