//! Procedural endoscopy-like clips with exact labels: a lumen seen from inside with folds,
//! textured mucosa, a moving light source and sometimes polyps ([`render_clip`]), and the
//! pre-training corpus written in the published layout ([`write_pretrain_corpus`]).
//!
//! The renderer is the one place that draws synthetic endoscopy: the downstream datasets
//! (classification, segmentation, detection; [`datasets`]) reuse [`render_clip`] and its
//! [`Labels`].

pub mod datasets;
mod render;
mod texture;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::video::{EncodeOptions, Frames, encode_mp4};
use crate::{Error, Result};

/// What to render.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthParams {
    /// Frame width in pixels (even, at least 16).
    pub width: usize,
    /// Frame height in pixels (even, at least 16).
    pub height: usize,
    /// Number of frames.
    pub frames: usize,
    /// Chance that a clip shows polyps (one, sometimes two); 0 to 1.
    pub polyp_probability: f64,
    /// Factor on the polyps' footprint radius and height (1: the default mix of small and
    /// mid-sized polyps; larger values give the prominent polyps of close-up clips); 0.25 to 4.
    pub polyp_scale: f64,
    /// How far a polyp's colour is moved from the surrounding wall's, the way `polyp_tone`
    /// says (1: the renderer's natural reddish mounds, close to the wall's colour; 2: clearly
    /// visible pale polyps, the default of the generated classification set); 1 to 4. At 1 the
    /// draws and pixels are those of earlier versions.
    pub polyp_contrast: f64,
    /// Most polyps a clip shows (1 or 2; a clip with polyps shows two a quarter of the time
    /// when 2 is allowed). At 2 the draws and pixels are those of earlier versions.
    pub max_polyps: usize,
    /// Which way `polyp_contrast` moves a polyp's colour from the wall's: paler (the default;
    /// the draws and pixels of earlier versions) or darker and browner.
    pub polyp_tone: PolypTone,
}

/// The colour a polyp differs from the wall by, after the NICE classification's colour
/// criterion for colonoscopy: hyperplastic polyps (NICE type 1) look the same as or lighter
/// than the surrounding mucosa, adenomas (type 2) browner relative to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolypTone {
    /// Paler than the wall: green and blue lifted most (`1 + 0.7 (contrast − 1)`), red a
    /// little (`1 + 0.2 (contrast − 1)`).
    #[default]
    Pale,
    /// Darker and browner than the wall: red divided by `1 + 0.35 (contrast − 1)`, green by
    /// `1 + 0.4 (contrast − 1)`, blue by `1 + 0.8 (contrast − 1)`.
    Brown,
}

impl PolypTone {
    /// The tint `tint` (RGB multipliers as drawn) moved by `contrast` (1 to 4; 1 leaves it).
    pub fn apply(self, tint: [f32; 3], contrast: f32) -> [f32; 3] {
        let c = contrast - 1.0;
        let factors = match self {
            PolypTone::Pale => [1.0 + 0.2 * c, 1.0 + 0.7 * c, 1.0 + 0.7 * c],
            PolypTone::Brown => [
                1.0 / (1.0 + 0.35 * c),
                1.0 / (1.0 + 0.4 * c),
                1.0 / (1.0 + 0.8 * c),
            ],
        };
        std::array::from_fn(|i| tint[i] * factors[i])
    }
}

impl SynthParams {
    /// The pre-training corpus's clips: short side `short_side`, 5:4 landscape, `frames` frames.
    pub fn pretrain(short_side: usize, frames: usize) -> Self {
        let width = (short_side * 5 / 4 + 1) & !1;
        Self {
            width,
            height: short_side,
            frames,
            polyp_probability: 0.3,
            polyp_scale: 1.0,
            polyp_contrast: 1.0,
            max_polyps: 2,
            polyp_tone: PolypTone::Pale,
        }
    }

    /// Checks sizes and the probability.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::Input {
                name: "synthetic clip parameters".into(),
                reason,
            })
        };
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if !(16..=4096).contains(&v) || v % 2 == 1 {
                return bad(format!("{name} must be even and in 16..=4096, got {v}"));
            }
        }
        if self.frames == 0 || self.frames > 100_000 {
            return bad(format!("frames must be in 1..=100000, got {}", self.frames));
        }
        if !(0.0..=1.0).contains(&self.polyp_probability) {
            return bad(format!(
                "polyp probability must be in [0, 1], got {}",
                self.polyp_probability
            ));
        }
        if !(1.0..=4.0).contains(&self.polyp_contrast) {
            return bad(format!(
                "polyp contrast must be in [1, 4], got {}",
                self.polyp_contrast
            ));
        }
        if !(0.25..=4.0).contains(&self.polyp_scale) {
            return bad(format!(
                "polyp scale must be in [0.25, 4], got {}",
                self.polyp_scale
            ));
        }
        if !(1..=2).contains(&self.max_polyps) {
            return bad(format!(
                "the most polyps per clip must be 1 or 2, got {}",
                self.max_polyps
            ));
        }
        Ok(())
    }
}

impl Default for SynthParams {
    fn default() -> Self {
        Self::pretrain(256, 150)
    }
}

/// A box in pixels, half-open: columns `x0..x1`, rows `y0..y1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BBox {
    /// First column.
    pub x0: u32,
    /// First row.
    pub y0: u32,
    /// One past the last column.
    pub x1: u32,
    /// One past the last row.
    pub y1: u32,
}

/// Per-frame binary masks, `t × h × w` bytes, 1 where a polyp is visible, 0 elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masks {
    /// Number of frames.
    pub t: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// The masks, frame after frame, row-major.
    pub data: Vec<u8>,
}

impl Masks {
    fn new(t: usize, h: usize, w: usize) -> Self {
        Self {
            t,
            h,
            w,
            data: vec![0; t * h * w],
        }
    }

    /// Mask of frame `i` (`h·w` bytes). Panics when `i >= t`.
    pub fn frame(&self, i: usize) -> &[u8] {
        &self.data[i * self.h * self.w..(i + 1) * self.h * self.w]
    }

    fn frame_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.data[i * self.h * self.w..(i + 1) * self.h * self.w]
    }
}

/// What a rendered clip shows, exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels {
    /// Whether a polyp is visible in at least one frame.
    pub polyp: bool,
    /// Where polyps are visible, per frame.
    pub masks: Masks,
    /// Per frame, one tight box per visible polyp (from that polyp's own pixels).
    pub boxes: Vec<Vec<BBox>>,
}

impl Labels {
    /// Number of frames showing a polyp.
    pub fn polyp_frames(&self) -> usize {
        self.boxes.iter().filter(|b| !b.is_empty()).count()
    }
}

/// Renders one clip; the same `params` and `seed` always give the same frames and labels.
/// Takes about 0.4 s per 150 frames of 320×256 on one core (release build), encoding 0.1 s more.
pub fn render_clip(params: &SynthParams, seed: u64) -> Result<(Frames, Labels)> {
    params.validate()?;
    Ok(render::render(params, seed))
}

/// The seed of clip `index` of a corpus with seed `seed` (independent of thread scheduling).
pub fn clip_seed(seed: u64, index: usize) -> u64 {
    texture::splitmix(texture::splitmix(seed) ^ index as u64)
}

/// How to write a pre-training corpus.
#[derive(Debug, Clone, PartialEq)]
pub struct CorpusSpec {
    /// Number of clips (at least 1).
    pub clips: usize,
    /// Frames per clip (150: 5 s at 30 fps, like the published clips).
    pub frames: usize,
    /// Short side in pixels (256 like the published clips); frames are 5:4 landscape.
    pub short_side: usize,
    /// Corpus seed; clip `i` uses [`clip_seed`]`(seed, i)`.
    pub seed: u64,
    /// Folder under the output folder, i.e. the source name in `train.csv`.
    pub source: String,
    /// Worker threads (0: all cores).
    pub threads: usize,
    /// Chance that a clip shows polyps.
    pub polyp_probability: f64,
    /// Factor on the polyps' size (see [`SynthParams::polyp_scale`]).
    pub polyp_scale: f64,
    /// Encoder settings (fps 30 by default).
    pub encode: EncodeOptions,
}

impl Default for CorpusSpec {
    fn default() -> Self {
        Self {
            clips: 1,
            frames: 150,
            short_side: 256,
            seed: 0,
            source: "synth".into(),
            threads: 0,
            polyp_probability: 0.3,
            polyp_scale: 1.0,
            encode: EncodeOptions::default(),
        }
    }
}

/// One written clip, as listed in `labels.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClipRecord {
    /// Path relative to the corpus folder (`synth/00000.mp4`).
    pub path: String,
    /// The clip's seed (see [`clip_seed`]).
    pub seed: u64,
    /// Whether a polyp is visible in some frame.
    pub polyp: bool,
    /// Frames showing a polyp.
    pub polyp_frames: usize,
    /// File size in bytes.
    pub bytes: u64,
}

/// What [`write_pretrain_corpus`] wrote.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CorpusSummary {
    /// The corpus folder.
    pub out: PathBuf,
    /// Clips written.
    pub clips: usize,
    /// Frames written in all.
    pub frames: usize,
    /// Bytes of video written.
    pub bytes: u64,
    /// Clips that show a polyp.
    pub polyp_clips: usize,
    /// Frame size.
    pub width: usize,
    /// Frame size.
    pub height: usize,
    /// Wall time.
    pub seconds: f64,
    /// Threads used.
    pub threads: usize,
}

/// Writes a synthetic pre-training corpus in the published layout:
/// `out_dir/<source>/NNNNN.mp4` (MPEG-4 Part 2, 30 fps), `out_dir/train.csv` with one
/// `<source>/NNNNN.mp4,-1` line per clip, and `out_dir/labels.json` with each clip's polyp flag
/// for later probes. Clips are rendered and encoded in parallel across `spec.threads` threads;
/// the output does not depend on the thread count.
pub fn write_pretrain_corpus(out_dir: &Path, spec: &CorpusSpec) -> Result<CorpusSummary> {
    let started = Instant::now();
    if spec.clips == 0 {
        return Err(Error::Input {
            name: "clips".into(),
            reason: "a corpus needs at least one clip".into(),
        });
    }
    if spec.source.is_empty()
        || spec.source.contains(['/', '\\', ','])
        || spec.source.starts_with('.')
    {
        return Err(Error::Input {
            name: "source".into(),
            reason: format!("`{}` is not a plain folder name", spec.source),
        });
    }
    let mut params = SynthParams::pretrain(spec.short_side, spec.frames);
    params.polyp_probability = spec.polyp_probability;
    params.polyp_scale = spec.polyp_scale;
    params.validate()?;
    let clip_dir = out_dir.join(&spec.source);
    std::fs::create_dir_all(&clip_dir).map_err(|source| Error::Io {
        action: "creating the corpus folder",
        path: clip_dir.clone(),
        source,
    })?;
    let threads = match spec.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .min(spec.clips);

    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let records: Mutex<Vec<Option<ClipRecord>>> = Mutex::new(vec![None; spec.clips]);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= spec.clips {
                        break;
                    }
                    match write_clip(&clip_dir, &spec.source, &params, spec, i) {
                        Ok(record) => {
                            if let Ok(mut r) = records.lock() {
                                r[i] = Some(record);
                            }
                        }
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            if let Ok(mut slot) = first_error.lock() {
                                slot.get_or_insert(e);
                            }
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    let records: Vec<ClipRecord> = records
        .into_inner()
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    if records.len() != spec.clips {
        return Err(Error::Input {
            name: "corpus".into(),
            reason: format!(
                "internal: {} of {} clips written",
                records.len(),
                spec.clips
            ),
        });
    }

    let mut csv = String::with_capacity(records.len() * 24);
    for r in &records {
        csv.push_str(&r.path);
        csv.push_str(",-1\n");
    }
    write_file(&out_dir.join("train.csv"), csv.as_bytes())?;
    let labels = serde_json::json!({
        "source": spec.source,
        "seed": spec.seed,
        "width": params.width,
        "height": params.height,
        "frames": params.frames,
        "fps": spec.encode.fps,
        "clips": records,
    });
    let mut json = serde_json::to_vec_pretty(&labels).map_err(|e| Error::Input {
        name: "labels.json".into(),
        reason: e.to_string(),
    })?;
    json.push(b'\n');
    write_file(&out_dir.join("labels.json"), &json)?;

    let summary = CorpusSummary {
        out: out_dir.to_path_buf(),
        clips: records.len(),
        frames: records.len() * params.frames,
        bytes: records.iter().map(|r| r.bytes).sum(),
        polyp_clips: records.iter().filter(|r| r.polyp).count(),
        width: params.width,
        height: params.height,
        seconds: started.elapsed().as_secs_f64(),
        threads,
    };
    tracing::info!(
        out = %out_dir.display(),
        clips = summary.clips,
        bytes = summary.bytes,
        seconds = summary.seconds,
        "synthetic corpus written"
    );
    Ok(summary)
}

/// Renders and encodes clip `index`; the file appears under its final name only when complete.
fn write_clip(
    clip_dir: &Path,
    source: &str,
    params: &SynthParams,
    spec: &CorpusSpec,
    index: usize,
) -> Result<ClipRecord> {
    let seed = clip_seed(spec.seed, index);
    let (frames, labels) = render_clip(params, seed)?;
    let name = format!("{index:05}.mp4");
    let partial = clip_dir.join(format!(".{index:05}.partial.mp4"));
    let path = clip_dir.join(&name);
    let bytes = encode_mp4(&partial, &frames, &spec.encode)?;
    std::fs::rename(&partial, &path).map_err(|source| Error::Io {
        action: "renaming into place",
        path: path.clone(),
        source,
    })?;
    tracing::debug!(clip = index, bytes, polyp = labels.polyp, "clip written");
    Ok(ClipRecord {
        path: format!("{source}/{name}"),
        seed,
        polyp: labels.polyp,
        polyp_frames: labels.polyp_frames(),
        bytes,
    })
}

fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    let io = |source| Error::Io {
        action: "writing",
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::create(path).map_err(io)?;
    f.write_all(data).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::video::{Clip, Quality};

    fn small(frames: usize, polyp_probability: f64) -> SynthParams {
        SynthParams {
            width: 80,
            height: 64,
            frames,
            polyp_probability,
            polyp_scale: 1.0,
            polyp_contrast: 1.0,
            max_polyps: 2,
            polyp_tone: PolypTone::Pale,
        }
    }

    /// Mean R, G, B over the polyp pixels of a clip.
    fn polyp_colour(frames: &Frames, labels: &Labels) -> [f64; 3] {
        let mut sum = [0.0; 3];
        let mut n = 0.0;
        for (i, &m) in labels.masks.data.iter().enumerate() {
            if m == 1 {
                for (c, s) in sum.iter_mut().enumerate() {
                    *s += f64::from(frames.data[i * 3 + c]);
                }
                n += 1.0;
            }
        }
        sum.map(|s| s / n)
    }

    #[test]
    fn tones_move_the_polyp_colour_paler_or_browner() {
        let with = |tone, contrast| SynthParams {
            polyp_scale: 2.0,
            polyp_contrast: contrast,
            polyp_tone: tone,
            ..small(3, 1.0)
        };
        let seed = (0..32)
            .find(|&s| render_clip(&with(PolypTone::Pale, 1.0), s).is_ok_and(|(_, l)| l.polyp))
            .expect("a clip with a polyp");
        // At contrast 1 the tone changes nothing.
        let (natural, labels) = render_clip(&with(PolypTone::Pale, 1.0), seed).expect("render");
        let (brown1, _) = render_clip(&with(PolypTone::Brown, 1.0), seed).expect("render");
        assert!(natural == brown1, "tone changed the pixels at contrast 1");
        let (pale, pale_labels) = render_clip(&with(PolypTone::Pale, 2.5), seed).expect("render");
        let (brown, brown_labels) =
            render_clip(&with(PolypTone::Brown, 2.5), seed).expect("render");
        // Only the polyp's colour moves: same masks, same wall.
        assert!(labels == pale_labels && labels == brown_labels);
        let [n, p, b] = [
            polyp_colour(&natural, &labels),
            polyp_colour(&pale, &labels),
            polyp_colour(&brown, &labels),
        ];
        assert!(p.iter().zip(&n).all(|(p, n)| p > n), "pale {p:?} vs {n:?}");
        assert!(b.iter().zip(&n).all(|(b, n)| b < n), "brown {b:?} vs {n:?}");
        // Browner: blue falls most, so the red-to-blue ratio rises.
        assert!(b[0] / b[2] > n[0] / n[2] * 1.3, "brown {b:?} vs {n:?}");
        let wall = |f: &Frames| {
            f.data
                .chunks(3)
                .zip(&labels.masks.data)
                .filter(|(_, m)| **m == 0)
                .map(|(px, _)| px.to_vec())
                .collect::<Vec<_>>()
        };
        let (a, b) = (wall(&natural), wall(&brown));
        let changed = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        // Only wall pixels the previous frame's polyp is motion-blurred into may change.
        assert!(
            changed * 100 <= a.len(),
            "{changed} of {} wall pixels changed",
            a.len()
        );
    }

    #[test]
    fn rendering_is_deterministic_per_seed() {
        let p = small(6, 0.5);
        let (a, la) = render_clip(&p, 7).expect("render");
        let (b, lb) = render_clip(&p, 7).expect("render");
        assert!(a == b && la == lb, "same seed, different clip");
        let (c, _) = render_clip(&p, 8).expect("render");
        assert_eq!((c.t, c.h, c.w), (6, 64, 80));
        let differing = a.data.iter().zip(&c.data).filter(|(x, y)| x != y).count();
        assert!(
            differing > a.data.len() / 2,
            "seeds 7 and 8 share {} of {} bytes",
            a.data.len() - differing,
            a.data.len()
        );
    }

    #[test]
    fn frames_show_a_dark_lumen_and_lit_walls() {
        let (f, _) = render_clip(&small(3, 0.0), 3).expect("render");
        for i in 0..f.t {
            // Mean brightness of 8×8 blocks.
            let blocks: Vec<f64> = (0..f.h / 8)
                .flat_map(|by| (0..f.w / 8).map(move |bx| (by, bx)))
                .map(|(by, bx)| {
                    let mut sum = 0u32;
                    for y in by * 8..by * 8 + 8 {
                        for x in bx * 8..bx * 8 + 8 {
                            sum += f.frame(i)[(y * f.w + x) * 3..][..3]
                                .iter()
                                .map(|&c| u32::from(c))
                                .sum::<u32>();
                        }
                    }
                    f64::from(sum) / (64.0 * 3.0)
                })
                .collect();
            let lit = blocks.iter().cloned().fold(0.0, f64::max);
            // The darkest block away from the black corners: the lumen.
            let centre_darkest = blocks
                .iter()
                .enumerate()
                .filter(|(k, _)| {
                    let (by, bx) = (k / (f.w / 8), k % (f.w / 8));
                    (1..f.h / 8 - 1).contains(&by) && (1..f.w / 8 - 1).contains(&bx)
                })
                .map(|(_, &v)| v)
                .fold(f64::MAX, f64::min);
            assert!(
                lit > 100.0 && centre_darkest < 40.0,
                "frame {i}: brightest block {lit:.0}, darkest inner block {centre_darkest:.0}"
            );
        }
    }

    #[test]
    fn polyp_masks_agree_with_boxes() {
        let p = small(12, 1.0);
        let mut shown = 0;
        for seed in 0..12 {
            let (_, labels) = render_clip(&p, seed).expect("render");
            let masks = &labels.masks;
            assert_eq!(
                labels.polyp,
                masks.data.contains(&1),
                "seed {seed}: clip flag disagrees with the masks"
            );
            assert!(
                masks.data.iter().all(|&m| m <= 1),
                "seed {seed}: masks must be 0/1"
            );
            for (i, boxes) in labels.boxes.iter().enumerate() {
                let mask = masks.frame(i);
                let inside = |x: usize, y: usize| {
                    boxes.iter().any(|b| {
                        (b.x0 as usize..b.x1 as usize).contains(&x)
                            && (b.y0 as usize..b.y1 as usize).contains(&y)
                    })
                };
                for y in 0..masks.h {
                    for x in 0..masks.w {
                        if mask[y * masks.w + x] == 1 {
                            assert!(
                                inside(x, y),
                                "seed {seed} frame {i}: mask pixel ({x}, {y}) outside every box {boxes:?}"
                            );
                        }
                    }
                }
                for b in boxes {
                    assert!(
                        b.x0 < b.x1
                            && b.y0 < b.y1
                            && b.x1 as usize <= masks.w
                            && b.y1 as usize <= masks.h,
                        "{b:?}"
                    );
                    // Tight: each edge row/column holds a mask pixel.
                    let row_has =
                        |y: u32| (b.x0..b.x1).any(|x| mask[y as usize * masks.w + x as usize] == 1);
                    let col_has =
                        |x: u32| (b.y0..b.y1).any(|y| mask[y as usize * masks.w + x as usize] == 1);
                    assert!(
                        row_has(b.y0) && row_has(b.y1 - 1) && col_has(b.x0) && col_has(b.x1 - 1),
                        "seed {seed} frame {i}: box {b:?} is not tight"
                    );
                }
            }
            shown += usize::from(labels.polyp);
        }
        assert!(
            shown >= 6,
            "only {shown} of 12 clips with polyp probability 1 show a polyp"
        );
    }

    #[test]
    fn no_polyps_at_probability_zero() {
        for seed in 0..4 {
            let (_, labels) = render_clip(&small(4, 0.0), seed).expect("render");
            assert!(!labels.polyp && labels.polyp_frames() == 0 && !labels.masks.data.contains(&1));
        }
    }

    #[test]
    fn bad_parameters_are_errors() {
        for p in [
            SynthParams {
                width: 81,
                ..small(4, 0.1)
            },
            SynthParams {
                height: 8,
                ..small(4, 0.1)
            },
            small(0, 0.1),
            small(4, 1.5),
            SynthParams {
                polyp_scale: 5.0,
                ..small(4, 0.1)
            },
            SynthParams {
                polyp_contrast: 0.5,
                ..small(4, 0.1)
            },
            SynthParams {
                max_polyps: 3,
                ..small(4, 0.1)
            },
        ] {
            assert!(
                matches!(render_clip(&p, 0), Err(Error::Input { .. })),
                "{p:?}"
            );
        }
    }

    fn tiny_corpus(clips: usize, threads: usize) -> CorpusSpec {
        CorpusSpec {
            clips,
            frames: 8,
            short_side: 32,
            seed: 11,
            threads,
            polyp_probability: 0.5,
            encode: EncodeOptions {
                quality: Quality::QScale(5),
                ..EncodeOptions::default()
            },
            ..CorpusSpec::default()
        }
    }

    #[test]
    fn corpus_has_the_published_layout_and_is_reproducible() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a");
        let summary = write_pretrain_corpus(&a, &tiny_corpus(3, 2)).expect("writing the corpus");
        assert_eq!(
            (summary.clips, summary.frames, summary.width, summary.height),
            (3, 24, 40, 32)
        );
        let csv = std::fs::read_to_string(a.join("train.csv")).expect("train.csv");
        assert_eq!(
            csv,
            "synth/00000.mp4,-1\nsynth/00001.mp4,-1\nsynth/00002.mp4,-1\n"
        );
        let labels: serde_json::Value =
            serde_json::from_slice(&std::fs::read(a.join("labels.json")).expect("labels.json"))
                .expect("json");
        let clips = labels["clips"].as_array().expect("clips");
        assert_eq!(clips.len(), 3);
        assert_eq!(clips[1]["path"], "synth/00001.mp4");
        assert!(clips.iter().all(|c| c["polyp"].is_boolean()));
        let total: u64 = clips.iter().filter_map(|c| c["bytes"].as_u64()).sum();
        assert_eq!(total, summary.bytes);

        let mut clip = Clip::open(&a.join("synth/00002.mp4")).expect("opening a clip");
        let info = clip.info();
        assert_eq!((info.frames, info.width, info.height), (8, 40, 32));
        assert!((info.fps - 30.0).abs() < 1e-9);
        clip.decode_all().expect("decoding a clip");
        let leftovers: Vec<_> = std::fs::read_dir(a.join("synth"))
            .expect("listing")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");

        // One thread instead of two: the same bytes.
        let b = dir.path().join("b");
        write_pretrain_corpus(&b, &tiny_corpus(3, 1)).expect("writing again");
        for name in [
            "synth/00000.mp4",
            "synth/00002.mp4",
            "train.csv",
            "labels.json",
        ] {
            let (x, y) = (std::fs::read(a.join(name)), std::fs::read(b.join(name)));
            assert!(x.is_ok() && x.ok() == y.ok(), "{name} differs between runs");
        }
    }

    #[test]
    fn corpus_input_errors_name_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = write_pretrain_corpus(dir.path(), &tiny_corpus(0, 1)).expect_err("zero clips");
        assert!(err.to_string().contains("clips"), "{err}");
        let file = dir.path().join("a-file");
        std::fs::write(&file, "x").expect("writing");
        let err = write_pretrain_corpus(&file.join("corpus"), &tiny_corpus(1, 1))
            .expect_err("unwritable");
        assert!(err.to_string().contains("a-file"), "{err}");
    }

    /// Speed of the pre-training clip pipeline on one core. Run with
    /// `cargo test --release -p endofm-worker --lib synth_speed -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing: run in release with --ignored --nocapture"]
    fn synth_speed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let params = SynthParams::pretrain(256, 150);
        let opts = EncodeOptions::default();
        let (mut render_s, mut encode_s, mut bytes) = (0.0, 0.0, 0);
        let clips = 4;
        for seed in 0..clips {
            let t0 = Instant::now();
            let (frames, _) = render_clip(&params, seed).expect("render");
            let t1 = Instant::now();
            bytes += encode_mp4(&dir.path().join("c.mp4"), &frames, &opts).expect("encode");
            render_s += (t1 - t0).as_secs_f64();
            encode_s += t1.elapsed().as_secs_f64();
        }
        let n = clips as f64;
        eprintln!(
            "{}×{}×150: render {:.3} s/clip, encode {:.3} s/clip, {} kB/clip",
            params.width,
            params.height,
            render_s / n,
            encode_s / n,
            bytes / clips / 1000
        );
        let data: std::sync::Arc<[u8]> = std::fs::read(dir.path().join("c.mp4"))
            .expect("read")
            .into();
        let all = crate::video::bench_decode("c.mp4", &data, None, 20).expect("bench");
        let eight: Vec<usize> = (0..8).map(|k| k * 145 / 7).collect();
        let some = crate::video::bench_decode("c.mp4", &data, Some(&eight), 50).expect("bench");
        eprintln!(
            "decode all 150 frames: {:.1} clips/s ({:.0} frames/s); 8 frames {eight:?}: {:.1} clips/s",
            all.clips_per_s, all.frames_per_s, some.clips_per_s
        );
    }
}
