//! CVC-12k polyp segmentation sequences (CVC-ClinicVideoDB), one folder per sequence.
//!
//! The published code (`TransUNet/dataset.py`, `SegCTDataset`) reads frames
//! `<root>/CVC-ClinicDB/Original/<i>.tif` and masks `<root>/CVC-ClinicDB/Ground Truth/<i>.tif`
//! numbered across the whole collection, and defines each sequence in the code as a range
//! `indexed <first> <count> -1` (frames `first .. first + count`), 20 for training and 9 for
//! testing. Here each such range is a folder, and the split lists name the folders:
//!
//! ```text
//! <root>/sequences/<seq>/frames/<n>.<png|jpg|tif>   frame n (any numbering; numeric order)
//! <root>/sequences/<seq>/masks/<n>.<png|tif>        its mask: same stem, 0/1 or 0/255
//! <root>/splits/train.txt                            one sequence name per line
//! <root>/splits/test.txt
//! <root>/splits/val.txt                              optional
//! ```
//!
//! (the published ranges map one to one: `indexed 104 23 -1` → `sequences/104/frames/104.tif …
//! 126.tif` and the same names under `masks/`). Opening checks the lists (a sequence listed
//! twice, in one split or in two, is refused: the published lists share seven sequences between
//! training and testing, which leaks test data), that every listed sequence exists, and that
//! frames and masks pair up one to one by stem. Reading a sequence checks that each mask has
//! its frame's size and is binary (values 0/1 or 0/255; the published code maps 255 to polyp
//! and anything else to background). Errors name the file (and list line).

use std::collections::{BTreeMap, BTreeSet};

use endofm_shared::StorageUri;

use super::media::read_image;
use super::{
    Split, frame_order, invalid, is_image, list_keys, plain_relative, read_text, stem,
    unreadable_name,
};
use crate::store::Store;
use crate::video::Frames;
use crate::{Error, Result};

/// Folder of the sequences below the dataset root.
pub const SEQUENCES: &str = "sequences";

/// The files of one sequence, in frame order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    /// Folder name.
    pub name: String,
    /// Frame files (keys below the dataset root).
    pub frames: Vec<String>,
    /// Mask files, `masks[i]` belonging to `frames[i]`.
    pub masks: Vec<String>,
}

/// A sequence read and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegSequence {
    /// Sequence name.
    pub name: String,
    /// RGB frames, `t × h × w × 3`.
    pub frames: Frames,
    /// Masks, `t × h × w` bytes, 1 = polyp, 0 = background.
    pub masks: Vec<u8>,
}

/// An opened, validated CVC-12k dataset.
#[derive(Debug)]
pub struct Cvc {
    store: Store,
    splits: BTreeMap<Split, Vec<String>>,
    sequences: BTreeMap<String, Sequence>,
}

impl Cvc {
    /// The key of a split's list.
    pub fn list_key(split: Split) -> String {
        format!("splits/{split}.txt")
    }

    /// Opens and validates the dataset at `uri`: `train` and `test` lists are required, `val`
    /// is read when present.
    pub fn open(uri: &StorageUri) -> Result<Self> {
        Self::open_store(Store::open(uri, false)?)
    }

    /// [`Cvc::open`] on an already opened store (for stores with explicit settings).
    pub fn open_store(store: Store) -> Result<Self> {
        let uri = store.uri().clone();
        let mut splits = BTreeMap::new();
        let mut seen: BTreeMap<String, (String, u64)> = BTreeMap::new();
        for split in Split::ALL {
            let key = Self::list_key(split);
            if split == Split::Val && !store.exists(&key)? {
                continue;
            }
            let text = read_text(&store, &key, "split list")?;
            let mut names = Vec::new();
            for (i, line) in text.lines().enumerate() {
                let line_no = i as u64 + 1;
                let name = line.trim();
                if name.is_empty() {
                    continue;
                }
                let bad = |reason: String| invalid(&store, &key, Some(line_no), reason);
                plain_relative(name).map_err(bad)?;
                if name.contains('/') {
                    return Err(bad(format!("`{name}` is not a sequence folder name")));
                }
                if let Some((k, l)) = seen.get(name) {
                    return Err(bad(format!(
                        "sequence `{name}` is listed twice (first in {} line {l})",
                        store.describe(k)
                    )));
                }
                seen.insert(name.to_string(), (key.clone(), line_no));
                names.push((name.to_string(), line_no));
            }
            if names.is_empty() {
                return Err(invalid(
                    &store,
                    &key,
                    None,
                    "the split lists no sequences".into(),
                ));
            }
            splits.insert(split, names);
        }
        let listed = list_keys(&store, SEQUENCES)?;
        let mut files: BTreeMap<&str, (Vec<&str>, Vec<&str>)> = BTreeMap::new();
        for key in &listed {
            let Some(rest) = key.strip_prefix(&format!("{SEQUENCES}/")) else {
                continue;
            };
            let mut parts = rest.splitn(3, '/');
            let (Some(seq), Some(kind), Some(file)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if file.contains('/') || !is_image(file) {
                continue;
            }
            if let Some(e) = unreadable_name(&store, key) {
                return Err(e);
            }
            let slot = files.entry(seq).or_default();
            match kind {
                "frames" => slot.0.push(key),
                "masks" => slot.1.push(key),
                _ => {}
            }
        }
        let mut sequences = BTreeMap::new();
        for (split, names) in &splits {
            for (name, line) in names {
                let key = Self::list_key(*split);
                let Some((frames, masks)) = files.get(name.as_str()) else {
                    return Err(invalid(
                        &store,
                        &key,
                        Some(*line),
                        format!(
                            "sequence `{name}` is missing: no frames under {}",
                            store.describe(&format!("{SEQUENCES}/{name}/frames"))
                        ),
                    ));
                };
                let seq = pair_up(&store, name, frames, masks)?;
                sequences.insert(name.clone(), seq);
            }
        }
        tracing::info!(uri = %uri, sequences = sequences.len(), "CVC-12k opened");
        Ok(Self {
            store,
            splits: splits
                .into_iter()
                .map(|(s, names)| (s, names.into_iter().map(|(n, _)| n).collect()))
                .collect(),
            sequences,
        })
    }

    /// The sequence names of `split`, in list order.
    pub fn split(&self, split: Split) -> Result<&[String]> {
        self.splits
            .get(&split)
            .map(Vec::as_slice)
            .ok_or_else(|| Error::Dataset {
                location: self.store.describe(&Self::list_key(split)),
                reason: format!("the dataset has no {split} split"),
            })
    }

    /// The splits present.
    pub fn splits(&self) -> impl Iterator<Item = Split> + '_ {
        self.splits.keys().copied()
    }

    /// A listed sequence's files.
    pub fn sequence(&self, name: &str) -> Option<&Sequence> {
        self.sequences.get(name)
    }

    /// Reads a sequence: every frame as RGB and every mask as 0/1, checking sizes (all frames
    /// of a sequence share one size; each mask has its frame's) and that masks are binary.
    pub fn read(&self, name: &str) -> Result<SegSequence> {
        let seq = self.sequences.get(name).ok_or_else(|| Error::Dataset {
            location: self.store.describe(&format!("{SEQUENCES}/{name}")),
            reason: "not a listed sequence".into(),
        })?;
        let mut frames = Frames::default();
        let mut masks = Vec::new();
        for (i, (frame_key, mask_key)) in seq.frames.iter().zip(&seq.masks).enumerate() {
            let rgb = read_image(&self.store, frame_key)?.to_rgb8();
            let (w, h) = (rgb.width() as usize, rgb.height() as usize);
            if i == 0 {
                frames.reshape(seq.frames.len(), h, w);
                masks = vec![0; seq.frames.len() * h * w];
            } else if (h, w) != (frames.h, frames.w) {
                return Err(invalid(
                    &self.store,
                    frame_key,
                    None,
                    format!(
                        "frame is {w}×{h}, the sequence's first frame {}×{}",
                        frames.w, frames.h
                    ),
                ));
            }
            frames.frame_mut(i).copy_from_slice(rgb.as_raw());
            let mask = read_image(&self.store, mask_key)?.to_luma8();
            if (mask.width() as usize, mask.height() as usize) != (w, h) {
                return Err(invalid(
                    &self.store,
                    mask_key,
                    None,
                    format!(
                        "mask is {}×{}, its frame {} is {w}×{h}",
                        mask.width(),
                        mask.height(),
                        self.store.describe(frame_key)
                    ),
                ));
            }
            binarise(mask.as_raw(), &mut masks[i * h * w..(i + 1) * h * w])
                .map_err(|reason| invalid(&self.store, mask_key, None, reason))?;
        }
        Ok(SegSequence {
            name: name.to_string(),
            frames,
            masks,
        })
    }
}

/// Pairs frames and masks by stem, both in frame order.
fn pair_up(store: &Store, name: &str, frames: &[&str], masks: &[&str]) -> Result<Sequence> {
    let folder = |kind: &str| store.describe(&format!("{SEQUENCES}/{name}/{kind}"));
    let mut frames: Vec<&str> = frames.to_vec();
    frames.sort_by_cached_key(|k| frame_order(k.rsplit('/').next().unwrap_or(k)));
    let mut by_stem: BTreeMap<&str, &str> = BTreeMap::new();
    for m in masks {
        if let Some(other) = by_stem.insert(stem(m), m) {
            return Err(invalid(
                store,
                m,
                None,
                format!(
                    "two masks for frame `{}` (also {})",
                    stem(m),
                    store.describe(other)
                ),
            ));
        }
    }
    let mut stems = BTreeSet::new();
    let mut paired = Vec::with_capacity(frames.len());
    for f in &frames {
        if !stems.insert(stem(f)) {
            return Err(invalid(
                store,
                f,
                None,
                format!("two frames named `{}`", stem(f)),
            ));
        }
        let Some(m) = by_stem.remove(stem(f)) else {
            return Err(invalid(
                store,
                f,
                None,
                format!("frame has no mask `{}.*` in {}", stem(f), folder("masks")),
            ));
        };
        paired.push(m.to_string());
    }
    if let Some(m) = by_stem.values().next() {
        return Err(invalid(
            store,
            m,
            None,
            format!(
                "mask has no frame `{}.*` in {} ({} frames, {} masks)",
                stem(m),
                folder("frames"),
                frames.len(),
                masks.len()
            ),
        ));
    }
    if frames.is_empty() {
        return Err(Error::Dataset {
            location: folder("frames"),
            reason: "the sequence has no .png, .jpg or .tif frames".into(),
        });
    }
    Ok(Sequence {
        name: name.to_string(),
        frames: frames.into_iter().map(String::from).collect(),
        masks: paired,
    })
}

/// Maps a 0/1 or 0/255 mask to 0/1 into `out`; anything else is an error.
fn binarise(mask: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    let mut seen = [false; 256];
    for &v in mask {
        seen[v as usize] = true;
    }
    let values: Vec<usize> = (0..256).filter(|&v| seen[v]).collect();
    let on = match values.as_slice() {
        [] | [0] => 1,
        [0, 1] | [1] => 1,
        [0, 255] | [255] => 255,
        other => {
            return Err(format!(
                "not a binary mask: values {:?}{} (expected 0/1 or 0/255)",
                &other[..other.len().min(6)],
                if other.len() > 6 { " …" } else { "" }
            ));
        }
    };
    for (o, &v) in out.iter_mut().zip(mask) {
        *o = u8::from(usize::from(v) == on);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn local(dir: &Path) -> StorageUri {
        StorageUri::Local {
            path: dir.to_path_buf(),
        }
    }

    fn frame(path: &Path, w: u32, h: u32) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]))
            .save(path)
            .expect("frame");
    }

    fn mask(path: &Path, w: u32, h: u32, on: u8) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        image::GrayImage::from_fn(w, h, |x, _| image::Luma([if x < 2 { on } else { 0 }]))
            .save(path)
            .expect("mask");
    }

    /// Sequences `s1` (frames 9, 10) and `s2` (frame 3).
    fn layout(dir: &Path) {
        let seq = dir.join("sequences");
        for (s, n) in [("s1", 9), ("s1", 10), ("s2", 3)] {
            frame(&seq.join(format!("{s}/frames/{n}.png")), 6, 4);
            mask(&seq.join(format!("{s}/masks/{n}.png")), 6, 4, 255);
        }
        std::fs::create_dir_all(dir.join("splits")).expect("mkdir");
        std::fs::write(dir.join("splits/train.txt"), "s1\n").expect("write");
        std::fs::write(dir.join("splits/test.txt"), "\u{feff}s2\r\n").expect("write");
    }

    #[test]
    fn sequences_list_and_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        layout(dir.path());
        let cvc = Cvc::open(&local(dir.path())).expect("open");
        assert_eq!(cvc.split(Split::Train).expect("train"), ["s1"]);
        assert_eq!(cvc.split(Split::Test).expect("test"), ["s2"]);
        assert!(cvc.split(Split::Val).is_err());
        let s1 = cvc.sequence("s1").expect("s1");
        assert_eq!(
            s1.frames,
            ["sequences/s1/frames/9.png", "sequences/s1/frames/10.png"]
        );
        assert_eq!(
            s1.masks,
            ["sequences/s1/masks/9.png", "sequences/s1/masks/10.png"]
        );
        let read = cvc.read("s1").expect("read");
        assert_eq!((read.frames.t, read.frames.h, read.frames.w), (2, 4, 6));
        assert_eq!(&read.masks[..6], &[1, 1, 0, 0, 0, 0]);
        assert_eq!(&read.frames.frame(1)[3..6], &[1, 0, 7]);
    }

    #[test]
    fn every_refusal_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let check = |what: &str, file: &str, words: &str| {
            let err = Cvc::open(&local(d))
                .and_then(|c| c.read("s1").map(|_| ()))
                .expect_err(what)
                .to_string();
            assert!(err.contains(file) && err.contains(words), "{what}: {err}");
        };
        layout(d);
        std::fs::write(d.join("splits/train.txt"), "s1\ns2\n").expect("write");
        check("listed twice", "splits/test.txt line 1", "listed twice");
        std::fs::write(d.join("splits/train.txt"), "s1\n\ns9\n").expect("write");
        check("missing", "splits/train.txt line 3", "`s9` is missing");
        std::fs::write(d.join("splits/train.txt"), "\n").expect("write");
        check("empty", "splits/train.txt", "no sequences");
        std::fs::write(d.join("splits/train.txt"), "s1\n").expect("write");

        std::fs::remove_file(d.join("sequences/s1/masks/10.png")).expect("rm");
        check("no mask", "sequences/s1/frames/10.png", "no mask");
        mask(&d.join("sequences/s1/masks/11.png"), 6, 4, 255);
        mask(&d.join("sequences/s1/masks/10.png"), 6, 4, 255);
        check("extra mask", "sequences/s1/masks/11.png", "no frame");
        std::fs::remove_file(d.join("sequences/s1/masks/11.png")).expect("rm");

        mask(&d.join("sequences/s1/masks/10.png"), 5, 4, 255);
        check("mask size", "sequences/s1/masks/10.png", "mask is 5×4");
        mask(&d.join("sequences/s1/masks/10.png"), 6, 4, 128);
        check(
            "grey mask",
            "sequences/s1/masks/10.png",
            "not a binary mask",
        );
        mask(&d.join("sequences/s1/masks/10.png"), 6, 4, 1);
        Cvc::open(&local(d))
            .and_then(|c| c.read("s1"))
            .expect("0/1 masks are fine");
        frame(&d.join("sequences/s1/frames/10.png"), 8, 4);
        check(
            "frame size",
            "sequences/s1/frames/10.png",
            "first frame 6×4",
        );
        std::fs::write(d.join("sequences/s1/frames/10.png"), b"not a png").expect("write");
        check("unreadable", "sequences/s1/frames/10.png", "not a readable");
    }

    #[test]
    fn binarise_accepts_0_1_and_0_255() {
        let mut out = [9u8; 3];
        binarise(&[0, 255, 255], &mut out).expect("0/255");
        assert_eq!(out, [0, 1, 1]);
        binarise(&[1, 0, 1], &mut out).expect("0/1");
        assert_eq!(out, [1, 0, 1]);
        binarise(&[0, 0, 0], &mut out).expect("empty");
        assert_eq!(out, [0, 0, 0]);
        assert!(binarise(&[0, 1, 255], &mut out).is_err());
    }
}
