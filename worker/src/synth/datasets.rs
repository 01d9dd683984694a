//! Synthetic downstream datasets in the published layouts ([`crate::datasets`]), rendered by
//! [`super::render_clip`] with exact labels:
//!
//! - **PolypDiag** (`videos/NNNN.mp4`, `splits/{train,val,test}.txt`): label 1 = the video
//!   shows a polyp in at least half of its frames (rendered with polyp probability 1 and
//!   prominent polyps, `polyp_scale`, seeds tried in a fixed order until one qualifies),
//!   label 0 = no polyp anywhere (probability 0). Classes are balanced in every split.
//! - **CVC-12k** (`sequences/NNN/{frames,masks}/<k>.png`, `splits/*.txt`): every sequence
//!   shows a polyp in at least half of its frames; masks are the renderer's, written 0/255,
//!   frames are lossless PNG.
//! - **KUMC** (`<split>2019/{Image,Annotation}/NNN/<k>.{jpg,xml}`, `ImageSets/<split>.txt`):
//!   one VOC file per frame with the renderer's tight boxes as pixel edges (`xmin = x0`,
//!   `xmax = x1`, half-open); each video's polyps get one class, alternating adenomatous /
//!   hyperplastic within a split, and the class shows in the colour the NICE classification
//!   reads it by: hyperplastic polyps paler than the wall, adenomatous ones darker and browner
//!   ([`PolypTone`]), both by `polyp_contrast` (at 1 the two classes look alike), so a
//!   detector can tell them apart.
//!
//! Each video is rendered from its own seed, so train, val and test share no source video.
//! Frame counts are drawn per video from `frames` (inclusive range). `labels.json` at the root
//! records every video's split, label, seed and polyp frames. The output is a function of the
//! spec alone (not of the thread count).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::{Labels, PolypTone, SynthParams, clip_seed, render_clip};
use crate::datasets::Split;
use crate::datasets::kumc::{Kumc, PolypBox, PolypClass, write_voc};
use crate::video::{EncodeOptions, Frames, encode_mp4};
use crate::{Error, Result};

/// Candidate seeds tried for a video that must show a polyp.
const MAX_ATTEMPTS: usize = 64;

/// Which dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DownstreamKind {
    /// Video classification.
    PolypDiag,
    /// Segmentation sequences.
    Cvc,
    /// Detection frames.
    Kumc,
}

impl DownstreamKind {
    /// `polypdiag`, `cvc` or `kumc`.
    pub fn name(self) -> &'static str {
        match self {
            DownstreamKind::PolypDiag => "polypdiag",
            DownstreamKind::Cvc => "cvc",
            DownstreamKind::Kumc => "kumc",
        }
    }
}

/// How to write a synthetic downstream dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct DownstreamSpec {
    /// Which dataset.
    pub kind: DownstreamKind,
    /// Videos (PolypDiag, KUMC) or sequences (CVC) in all splits.
    pub videos: usize,
    /// Frames per video, drawn uniformly from this inclusive range.
    pub frames: [usize; 2],
    /// Short side in pixels; frames are 5:4 landscape.
    pub short_side: usize,
    /// Dataset seed.
    pub seed: u64,
    /// Worker threads (0: all cores).
    pub threads: usize,
    /// Factor on the polyps' size (see [`SynthParams::polyp_scale`]).
    pub polyp_scale: f64,
    /// How far the polyps' colour is from the wall's (see [`SynthParams::polyp_contrast`]).
    pub polyp_contrast: f64,
    /// Most polyps per video (see [`SynthParams::max_polyps`]).
    pub max_polyps: usize,
    /// Label-1 videos qualify when at least this share of their frames shows a polyp covering
    /// at least [`DownstreamSpec::min_polyp_area`] of the frame (0.5: half the frames).
    pub min_polyp_share: f64,
    /// The polyp area a frame needs to count as showing one, as a fraction of the frame's
    /// central square (side = the short side, what centre crops keep); 0: any visible pixel.
    pub min_polyp_area: f64,
    /// Share of the videos (per class for PolypDiag) in the validation split.
    pub val_fraction: f64,
    /// Share in the test split.
    pub test_fraction: f64,
}

impl DownstreamSpec {
    /// The defaults of `kind`: short side 128; PolypDiag 12 videos of 64–96 frames with
    /// prominent polyps (scale 2); CVC 6 sequences of 12–24 frames (the published sequences
    /// have 6–25); KUMC 6 videos of 24–40 frames; 60/20/20 % train/val/test.
    pub fn new(kind: DownstreamKind) -> Self {
        let (videos, frames, polyp_scale) = match kind {
            DownstreamKind::PolypDiag => (12, [64, 96], 2.0),
            DownstreamKind::Cvc => (6, [12, 24], 1.5),
            DownstreamKind::Kumc => (6, [24, 40], 1.5),
        };
        Self {
            kind,
            videos,
            frames,
            short_side: 128,
            seed: 0,
            threads: 0,
            polyp_scale,
            polyp_contrast: match kind {
                DownstreamKind::PolypDiag => 2.0,
                DownstreamKind::Cvc => 1.0,
                DownstreamKind::Kumc => 1.5,
            },
            max_polyps: 2,
            min_polyp_share: 0.5,
            min_polyp_area: 0.0,
            val_fraction: 0.2,
            test_fraction: 0.2,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |name: &str, reason: String| {
            Err(Error::Input {
                name: name.into(),
                reason,
            })
        };
        let [lo, hi] = self.frames;
        if lo == 0 || hi < lo {
            return bad(
                "frames",
                format!("range {lo}..={hi} is empty or starts at 0"),
            );
        }
        if !(0.0..=1.0).contains(&self.min_polyp_share)
            || !(0.0..0.5).contains(&self.min_polyp_area)
        {
            return bad(
                "polyp visibility",
                format!(
                    "share of frames {} must be in [0, 1] and area {} in [0, 0.5)",
                    self.min_polyp_share, self.min_polyp_area
                ),
            );
        }
        let fractions = [self.val_fraction, self.test_fraction];
        if fractions.iter().any(|f| !(0.0..1.0).contains(f)) || fractions.iter().sum::<f64>() >= 1.0
        {
            return bad(
                "fractions",
                format!(
                    "val {} and test {} must be in [0, 1) and leave videos for training",
                    self.val_fraction, self.test_fraction
                ),
            );
        }
        let min = match self.kind {
            DownstreamKind::PolypDiag => 6,
            _ => 3,
        };
        if self.videos < min {
            return bad(
                "videos",
                format!(
                    "{} has three splits{}: at least {min} videos, got {}",
                    self.kind.name(),
                    if min == 6 { " of two classes" } else { "" },
                    self.videos
                ),
            );
        }
        SynthParams {
            polyp_scale: self.polyp_scale,
            polyp_contrast: self.polyp_contrast,
            max_polyps: self.max_polyps,
            ..SynthParams::pretrain(self.short_side, hi)
        }
        .validate()
    }
}

/// One written video, as listed in `labels.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VideoRecord {
    /// Name in the layout (`0007.mp4`, sequence or video folder `007`).
    pub name: String,
    /// Split.
    pub split: Split,
    /// PolypDiag class (0 normal, 1 abnormal); 1 for CVC and KUMC.
    pub label: i64,
    /// KUMC class of the video's polyps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<PolypClass>,
    /// The seed the video was rendered from ([`render_clip`] with [`video_params`]).
    pub seed: u64,
    /// Frames.
    pub frames: usize,
    /// Frames showing a polyp.
    pub polyp_frames: usize,
}

/// Counts of one split.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SplitCounts {
    /// Videos (sequences).
    pub videos: usize,
    /// Frames.
    pub frames: usize,
    /// Videos per class (`0`/`1` for PolypDiag, class names for KUMC, `1` for CVC).
    pub classes: BTreeMap<String, usize>,
    /// Frames with at least one polyp.
    pub polyp_frames: usize,
}

/// What [`write_downstream`] wrote.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DownstreamSummary {
    /// Which dataset.
    pub kind: DownstreamKind,
    /// Its root folder.
    pub out: PathBuf,
    /// Videos in all.
    pub videos: usize,
    /// Frame width.
    pub width: usize,
    /// Frame height.
    pub height: usize,
    /// Per split.
    pub splits: BTreeMap<Split, SplitCounts>,
    /// The layout's lists and folders, by role.
    pub paths: BTreeMap<String, PathBuf>,
    /// Wall time.
    pub seconds: f64,
    /// Threads used.
    pub threads: usize,
}

/// A video before rendering.
#[derive(Debug, Clone)]
struct Planned {
    name: String,
    split: Split,
    label: i64,
    class: Option<PolypClass>,
    frames: usize,
    base_seed: u64,
}

/// The renderer parameters of a video of `frames` frames, label `label` and (KUMC) polyp
/// class `class`: hyperplastic polyps paler than the wall, adenomatous ones browner
/// ([`PolypTone`]), both by `polyp_contrast` and at `polyp_scale`.
pub fn video_params(
    spec: &DownstreamSpec,
    frames: usize,
    label: i64,
    class: Option<PolypClass>,
) -> SynthParams {
    SynthParams {
        polyp_probability: if label == 1 { 1.0 } else { 0.0 },
        polyp_scale: spec.polyp_scale,
        polyp_contrast: spec.polyp_contrast,
        max_polyps: spec.max_polyps,
        polyp_tone: match class {
            Some(PolypClass::Adenomatous) => PolypTone::Brown,
            Some(PolypClass::Hyperplastic) | None => PolypTone::Pale,
        },
        ..SynthParams::pretrain(spec.short_side, frames)
    }
}

/// `[train, val, test]` counts of `n` videos: val and test rounded from their fractions, at
/// least one each when `n ≥ 3`.
fn split_counts(n: usize, spec: &DownstreamSpec) -> [usize; 3] {
    let part = |f: f64| ((n as f64 * f).round() as usize).max(usize::from(n >= 3 && f > 0.0));
    let (val, test) = (part(spec.val_fraction), part(spec.test_fraction));
    let train = n.saturating_sub(val + test).max(1);
    [train, n - train - test.min(n - train), test.min(n - train)]
}

/// Names, splits, labels and frame counts of every video: a pure function of the spec.
fn plan(spec: &DownstreamSpec) -> Vec<Planned> {
    let mut rng = ChaCha8Rng::seed_from_u64(clip_seed(spec.seed, usize::MAX));
    let groups: Vec<(i64, usize)> = match spec.kind {
        DownstreamKind::PolypDiag => {
            let positive = spec.videos / 2;
            vec![(0, spec.videos - positive), (1, positive)]
        }
        _ => vec![(1, spec.videos)],
    };
    let mut slots: Vec<(Split, i64)> = Vec::with_capacity(spec.videos);
    for (label, n) in groups {
        for (split, count) in Split::ALL.into_iter().zip(split_counts(n, spec)) {
            slots.extend(std::iter::repeat_n((split, label), count));
        }
    }
    slots.shuffle(&mut rng);
    let mut per_split = BTreeMap::<Split, usize>::new();
    slots
        .into_iter()
        .enumerate()
        .map(|(i, (split, label))| {
            let nth = per_split.entry(split).or_default();
            let class = (spec.kind == DownstreamKind::Kumc).then(|| PolypClass::ALL[*nth % 2]);
            *nth += 1;
            let name = match spec.kind {
                DownstreamKind::PolypDiag => format!("{i:04}.mp4"),
                _ => format!("{i:03}"),
            };
            Planned {
                name,
                split,
                label,
                class,
                frames: rng.random_range(spec.frames[0]..=spec.frames[1]),
                base_seed: clip_seed(spec.seed, i),
            }
        })
        .collect()
}

/// Renders a planned video: the first candidate seed whose clip qualifies (for label 1, a
/// polyp of at least `min_polyp_area` in at least `min_polyp_share` of the frames; any clip
/// for label 0, which cannot show one).
fn render_planned(spec: &DownstreamSpec, p: &Planned) -> Result<(u64, Frames, Labels)> {
    let params = video_params(spec, p.frames, p.label, p.class);
    for attempt in 0..MAX_ATTEMPTS {
        let seed = clip_seed(p.base_seed, attempt);
        let (frames, labels) = render_clip(&params, seed)?;
        // Area counted in the frame's central square (side = the short side): the part every
        // centre crop of an evaluation transform keeps.
        let (h, w) = (labels.masks.h, labels.masks.w);
        let side = h.min(w);
        let (x0, y0) = ((w - side) / 2, (h - side) / 2);
        let need = (spec.min_polyp_area * (side * side) as f64).max(1.0);
        let showing = (0..labels.masks.t)
            .filter(|&i| {
                let m = labels.masks.frame(i);
                let inside: usize = (y0..y0 + side)
                    .map(|y| {
                        m[y * w + x0..y * w + x0 + side]
                            .iter()
                            .filter(|&&v| v != 0)
                            .count()
                    })
                    .sum();
                inside as f64 >= need
            })
            .count();
        let enough = showing as f64 >= spec.min_polyp_share * p.frames as f64;
        if (p.label == 0 && !labels.polyp) || (p.label == 1 && enough) {
            return Ok((seed, frames, labels));
        }
    }
    Err(Error::Input {
        name: "synthetic dataset".into(),
        reason: format!(
            "no seed of {MAX_ATTEMPTS} showed a polyp of {} % of the frame in {} % of the {} frames of {}; try a larger --polyp-scale, or lower --min-polyp-share / --min-polyp-area",
            spec.min_polyp_area * 100.0,
            spec.min_polyp_share * 100.0,
            p.frames,
            p.name
        ),
    })
}

/// Writes a synthetic downstream dataset under `out` (see the module documentation).
pub fn write_downstream(out: &Path, spec: &DownstreamSpec) -> Result<DownstreamSummary> {
    let started = Instant::now();
    spec.validate()?;
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        action: "creating the dataset folder",
        path: out.to_path_buf(),
        source,
    })?;
    let planned = plan(spec);
    let threads = match spec.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .min(planned.len());
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let records: Mutex<Vec<Option<VideoRecord>>> = Mutex::new(vec![None; planned.len()]);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(p) = planned.get(i) else { break };
                    match write_video(out, spec, p) {
                        Ok(r) => {
                            if let Ok(mut all) = records.lock() {
                                all[i] = Some(r);
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
    let records: Vec<VideoRecord> = records
        .into_inner()
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    if records.len() != planned.len() {
        return Err(Error::Input {
            name: "synthetic dataset".into(),
            reason: format!(
                "internal: {} of {} videos written",
                records.len(),
                planned.len()
            ),
        });
    }
    let paths = write_lists(out, spec, &records)?;
    let params = SynthParams::pretrain(spec.short_side, 1);
    let mut splits: BTreeMap<Split, SplitCounts> = BTreeMap::new();
    for r in &records {
        let c = splits.entry(r.split).or_default();
        c.videos += 1;
        c.frames += r.frames;
        c.polyp_frames += r.polyp_frames;
        let class = match r.class {
            Some(class) => class.name().to_string(),
            None => r.label.to_string(),
        };
        *c.classes.entry(class).or_default() += 1;
    }
    let labels = serde_json::json!({
        "kind": spec.kind,
        "seed": spec.seed,
        "width": params.width,
        "height": params.height,
        "polyp_scale": spec.polyp_scale,
        "polyp_contrast": spec.polyp_contrast,
        "max_polyps": spec.max_polyps,
        "min_polyp_share": spec.min_polyp_share,
        "min_polyp_area": spec.min_polyp_area,
        "videos": records,
    });
    let mut json = serde_json::to_vec_pretty(&labels).map_err(|e| Error::Input {
        name: "labels.json".into(),
        reason: e.to_string(),
    })?;
    json.push(b'\n');
    write_file(&out.join("labels.json"), &json)?;
    let summary = DownstreamSummary {
        kind: spec.kind,
        out: out.to_path_buf(),
        videos: records.len(),
        width: params.width,
        height: params.height,
        splits,
        paths,
        seconds: started.elapsed().as_secs_f64(),
        threads,
    };
    tracing::info!(
        kind = spec.kind.name(),
        out = %out.display(),
        videos = summary.videos,
        seconds = summary.seconds,
        "synthetic downstream dataset written"
    );
    Ok(summary)
}

/// Renders one video and writes its files.
fn write_video(out: &Path, spec: &DownstreamSpec, p: &Planned) -> Result<VideoRecord> {
    let (seed, frames, labels) = render_planned(spec, p)?;
    match spec.kind {
        DownstreamKind::PolypDiag => {
            let dir = out.join("videos");
            create_dir(&dir)?;
            let partial = dir.join(format!(".{}.partial.mp4", p.name));
            encode_mp4(&partial, &frames, &EncodeOptions::default())?;
            let path = dir.join(&p.name);
            std::fs::rename(&partial, &path).map_err(|source| Error::Io {
                action: "renaming into place",
                path,
                source,
            })?;
        }
        DownstreamKind::Cvc => {
            let dir = out.join("sequences").join(&p.name);
            let (frame_dir, mask_dir) = (dir.join("frames"), dir.join("masks"));
            create_dir(&frame_dir)?;
            create_dir(&mask_dir)?;
            for i in 0..frames.t {
                let name = format!("{}.png", i + 1);
                let rgb = image_rgb(&frames, i)?;
                save(&frame_dir.join(&name), |w| {
                    rgb.write_to(w, image::ImageFormat::Png)
                })?;
                let mask: Vec<u8> = labels.masks.frame(i).iter().map(|&m| m * 255).collect();
                let mask = image::GrayImage::from_raw(frames.w as u32, frames.h as u32, mask)
                    .ok_or_else(|| internal("mask size"))?;
                save(&mask_dir.join(&name), |w| {
                    mask.write_to(w, image::ImageFormat::Png)
                })?;
            }
        }
        DownstreamKind::Kumc => {
            let split_dir = out.join(Kumc::split_dir(p.split));
            let image_dir = split_dir.join("Image").join(&p.name);
            let anno_dir = split_dir.join("Annotation").join(&p.name);
            create_dir(&image_dir)?;
            create_dir(&anno_dir)?;
            let class = p.class.unwrap_or(PolypClass::Adenomatous);
            for i in 0..frames.t {
                let k = i + 1;
                let rgb = image_rgb(&frames, i)?;
                save(&image_dir.join(format!("{k}.jpg")), |w| {
                    image::codecs::jpeg::JpegEncoder::new_with_quality(w, 95).encode_image(&rgb)
                })?;
                let boxes: Vec<PolypBox> = labels.boxes[i]
                    .iter()
                    .map(|b| PolypBox {
                        class,
                        xmin: f64::from(b.x0),
                        ymin: f64::from(b.y0),
                        xmax: f64::from(b.x1),
                        ymax: f64::from(b.y1),
                    })
                    .collect();
                let xml = write_voc(&p.name, &format!("{k}.jpg"), frames.w, frames.h, &boxes);
                write_file(&anno_dir.join(format!("{k}.xml")), xml.as_bytes())?;
            }
        }
    }
    tracing::debug!(name = %p.name, split = %p.split, seed, polyp_frames = labels.polyp_frames(), "video written");
    Ok(VideoRecord {
        name: p.name.clone(),
        split: p.split,
        label: p.label,
        class: p.class,
        seed,
        frames: frames.t,
        polyp_frames: labels.polyp_frames(),
    })
}

/// Writes the split lists; returns the layout's paths by role.
fn write_lists(
    out: &Path,
    spec: &DownstreamSpec,
    records: &[VideoRecord],
) -> Result<BTreeMap<String, PathBuf>> {
    let mut paths = BTreeMap::new();
    let mut sorted: Vec<&VideoRecord> = records.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for split in Split::ALL {
        let mut text = String::new();
        for r in sorted.iter().filter(|r| r.split == split) {
            match spec.kind {
                DownstreamKind::PolypDiag => text.push_str(&format!("{},{}\n", r.name, r.label)),
                DownstreamKind::Cvc => text.push_str(&format!("{}\n", r.name)),
                DownstreamKind::Kumc => {
                    for k in 1..=r.frames {
                        text.push_str(&format!("{} 0 {k} {}\n", r.name, r.frames));
                    }
                }
            }
        }
        let rel = match spec.kind {
            DownstreamKind::Kumc => Kumc::list_key(split),
            _ => format!("splits/{split}.txt"),
        };
        let path = out.join(&rel);
        if let Some(parent) = path.parent() {
            create_dir(parent)?;
        }
        write_file(&path, text.as_bytes())?;
        paths.insert(format!("{split}_list"), path);
        if spec.kind == DownstreamKind::Kumc {
            paths.insert(format!("{split}_frames"), out.join(Kumc::split_dir(split)));
        }
    }
    match spec.kind {
        DownstreamKind::PolypDiag => paths.insert("videos".into(), out.join("videos")),
        DownstreamKind::Cvc => paths.insert("sequences".into(), out.join("sequences")),
        DownstreamKind::Kumc => None,
    };
    paths.insert("labels".into(), out.join("labels.json"));
    Ok(paths)
}

fn internal(what: &str) -> Error {
    Error::Input {
        name: "synthetic dataset".into(),
        reason: format!("internal: {what}"),
    }
}

fn image_rgb(frames: &Frames, i: usize) -> Result<image::RgbImage> {
    image::RgbImage::from_raw(frames.w as u32, frames.h as u32, frames.frame(i).to_vec())
        .ok_or_else(|| internal("frame size"))
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        action: "creating",
        path: dir.to_path_buf(),
        source,
    })
}

/// Encodes into memory, then writes the file.
fn save(
    path: &Path,
    encode: impl FnOnce(&mut std::io::Cursor<Vec<u8>>) -> image::ImageResult<()>,
) -> Result<()> {
    let mut buf = std::io::Cursor::new(Vec::new());
    encode(&mut buf).map_err(|e| Error::ClipEncode {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    write_file(path, buf.get_ref())
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

    fn tiny(kind: DownstreamKind, videos: usize) -> DownstreamSpec {
        DownstreamSpec {
            videos,
            frames: [6, 10],
            short_side: 32,
            seed: 5,
            threads: 2,
            ..DownstreamSpec::new(kind)
        }
    }

    #[test]
    fn plans_are_balanced_disjoint_and_fixed_by_the_seed() {
        let spec = tiny(DownstreamKind::PolypDiag, 10);
        let p = plan(&spec);
        assert_eq!(p.len(), 10);
        let names: std::collections::BTreeSet<&str> = p.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names.len(), 10);
        for split in Split::ALL {
            for label in [0, 1] {
                let n = p
                    .iter()
                    .filter(|v| v.split == split && v.label == label)
                    .count();
                assert_eq!(
                    n,
                    if split == Split::Train { 3 } else { 1 },
                    "{split} {label}"
                );
            }
        }
        assert!(p.iter().all(|v| (6..=10).contains(&v.frames)));
        let again = plan(&spec);
        assert!(p.iter().zip(&again).all(|(a, b)| a.name == b.name
            && a.split == b.split
            && a.label == b.label
            && a.frames == b.frames
            && a.base_seed == b.base_seed));
        let other = plan(&DownstreamSpec {
            seed: 6,
            ..spec.clone()
        });
        assert!(
            p.iter()
                .zip(&other)
                .any(|(a, b)| a.split != b.split || a.frames != b.frames)
        );
        assert_eq!(split_counts(3, &spec), [1, 1, 1]);
        assert_eq!(split_counts(126, &spec), [76, 25, 25]);
    }

    #[test]
    fn bad_specs_are_refused() {
        for (spec, words) in [
            (tiny(DownstreamKind::PolypDiag, 5), "at least 6"),
            (tiny(DownstreamKind::Cvc, 2), "at least 3"),
            (
                DownstreamSpec {
                    frames: [0, 3],
                    ..tiny(DownstreamKind::Kumc, 3)
                },
                "range",
            ),
            (
                DownstreamSpec {
                    val_fraction: 0.6,
                    test_fraction: 0.4,
                    ..tiny(DownstreamKind::Kumc, 3)
                },
                "training",
            ),
            (
                DownstreamSpec {
                    short_side: 8,
                    ..tiny(DownstreamKind::Kumc, 3)
                },
                "must be even",
            ),
        ] {
            let err = write_downstream(Path::new("/nonexistent/never"), &spec).expect_err(words);
            assert!(err.to_string().contains(words), "{words}: {err}");
        }
    }
}
