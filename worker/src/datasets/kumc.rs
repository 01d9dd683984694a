//! KUMC polyp detection: colonoscopy frames with one PASCAL-VOC XML annotation each, in the
//! layout the published STFT code reads (`STFT/stft_core/config/paths_catalog.py` entries
//! `CVCVideo_{train,val}_videos`, written by `STFT/kumc.py` and `STFT/gentxt.py`, read by
//! `STFT/stft_core/data/datasets/cvcvid_image.py`):
//!
//! ```text
//! <root>/<split>2019/Image/<video>/<k>.jpg         frame k of a video, k = 1 … N
//! <root>/<split>2019/Annotation/<video>/<k>.xml    its annotation
//! <root>/ImageSets/<split>.txt                     one line per frame: `<video> 0 <k> <N>`
//! ```
//!
//! with `<split>` = `train`, `val` (both required) and `test` (optional). Frames may also be
//! `.png`/`.tif`. An annotation is
//! `<annotation><size><width>W</width><height>H</height></size><object><name>adenomatous|hyperplastic</name><bndbox><xmin/><ymin/><xmax/><ymax/></bndbox></object>…</annotation>`;
//! a frame without a polyp has no `object`. Box coordinates are pixel edges as written in the
//! file (the published loader keeps them as they are and clips them to `W − 1`, `H − 1`): a
//! box must satisfy `0 ≤ xmin < xmax ≤ W` and `0 ≤ ymin < ymax ≤ H`.
//!
//! Opening reads every list and every annotation (in parallel: the published loader caches
//! them the same way before training) and refuses a malformed list line, a missing frame or
//! annotation, malformed XML, an unknown class, and a degenerate box or one outside the image,
//! naming the file (and line). Reading a frame checks its size against its annotation's.

use std::collections::{BTreeMap, BTreeSet};

use endofm_shared::StorageUri;

use super::media::read_image;
use super::{IMAGE_EXTENSIONS, Split, invalid, list_keys, read_text, storable};
use crate::store::Store;
use crate::video::Frames;
use crate::{Error, Result};

/// Threads reading annotations when a dataset is opened.
const READ_THREADS: usize = 8;

/// A polyp class of KUMC (class ids 1 and 2 of the published detector; 0 is background).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolypClass {
    /// Adenomatous polyp (class id 1).
    Adenomatous,
    /// Hyperplastic polyp (class id 2).
    Hyperplastic,
}

impl PolypClass {
    /// Both classes, in class-id order.
    pub const ALL: [PolypClass; 2] = [PolypClass::Adenomatous, PolypClass::Hyperplastic];

    /// The name in annotation files.
    pub fn name(self) -> &'static str {
        match self {
            PolypClass::Adenomatous => "adenomatous",
            PolypClass::Hyperplastic => "hyperplastic",
        }
    }

    /// The published class id (1 or 2).
    pub fn id(self) -> i64 {
        match self {
            PolypClass::Adenomatous => 1,
            PolypClass::Hyperplastic => 2,
        }
    }

    /// Parses a class name.
    pub fn parse(name: &str) -> Option<Self> {
        PolypClass::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// One annotated polyp: class and box in pixel-edge coordinates.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PolypBox {
    /// Class.
    pub class: PolypClass,
    /// Left edge.
    pub xmin: f64,
    /// Top edge.
    pub ymin: f64,
    /// Right edge.
    pub xmax: f64,
    /// Bottom edge.
    pub ymax: f64,
}

/// The contents of one annotation file.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VocAnnotation {
    /// Image width the annotation declares.
    pub width: usize,
    /// Image height the annotation declares.
    pub height: usize,
    /// The polyps (none on a frame without one).
    pub boxes: Vec<PolypBox>,
}

/// The first child element of `node` named `name`.
fn child<'a, 'input>(
    node: roxmltree::Node<'a, 'input>,
    name: &str,
) -> Option<roxmltree::Node<'a, 'input>> {
    node.children().find(|c| c.has_tag_name(name))
}

/// Parses and validates one VOC annotation; `uri` names it in errors.
pub fn parse_voc(text: &str, uri: &str) -> Result<VocAnnotation> {
    let bad = |reason: String| Error::Dataset {
        location: uri.to_string(),
        reason,
    };
    let doc = roxmltree::Document::parse(text).map_err(|e| bad(format!("malformed XML: {e}")))?;
    let root = doc.root_element();
    if !root.has_tag_name("annotation") {
        return Err(bad(format!(
            "the root element is <{}>, expected <annotation>",
            root.tag_name().name()
        )));
    }
    let text_of = |node: roxmltree::Node<'_, '_>, name: &str, within: &str| -> Result<String> {
        child(node, name)
            .and_then(|c| c.text())
            .map(|t| t.trim().to_string())
            .ok_or_else(|| bad(format!("<{within}> has no <{name}>")))
    };
    let size = child(root, "size").ok_or_else(|| bad("no <size> element".into()))?;
    let dim = |name: &str| -> Result<usize> {
        let t = text_of(size, name, "size")?;
        t.parse::<usize>()
            .ok()
            .filter(|&v| v > 0)
            .ok_or_else(|| bad(format!("<size><{name}> `{t}` is not a positive integer")))
    };
    let (width, height) = (dim("width")?, dim("height")?);
    let mut boxes = Vec::new();
    for (i, obj) in root
        .children()
        .filter(|c| c.has_tag_name("object"))
        .enumerate()
    {
        let which = format!("object {}", i + 1);
        let name = text_of(obj, "name", "object")?;
        let class = PolypClass::parse(&name).ok_or_else(|| {
            bad(format!(
                "{which}: unknown class `{name}` (known: adenomatous, hyperplastic)"
            ))
        })?;
        let bndbox = child(obj, "bndbox").ok_or_else(|| bad(format!("{which} has no <bndbox>")))?;
        let coord = |name: &str| -> Result<f64> {
            let t = text_of(bndbox, name, "bndbox")?;
            t.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| bad(format!("{which}: <{name}> `{t}` is not a number")))
        };
        let b = PolypBox {
            class,
            xmin: coord("xmin")?,
            ymin: coord("ymin")?,
            xmax: coord("xmax")?,
            ymax: coord("ymax")?,
        };
        if b.xmax <= b.xmin || b.ymax <= b.ymin {
            return Err(bad(format!(
                "{which}: degenerate box ({}, {}) – ({}, {})",
                b.xmin, b.ymin, b.xmax, b.ymax
            )));
        }
        if b.xmin < 0.0 || b.ymin < 0.0 || b.xmax > width as f64 || b.ymax > height as f64 {
            return Err(bad(format!(
                "{which}: box ({}, {}) – ({}, {}) lies outside the {width}×{height} image",
                b.xmin, b.ymin, b.xmax, b.ymax
            )));
        }
        boxes.push(b);
    }
    Ok(VocAnnotation {
        width,
        height,
        boxes,
    })
}

/// One listed frame.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KumcFrame {
    /// Video folder name.
    pub video: String,
    /// Frame number `k` (1-based).
    pub number: usize,
    /// Frames in the video (`N` of the list line).
    pub video_frames: usize,
    /// The image file (key below the dataset root).
    pub image: String,
    /// The annotation file.
    pub annotation_key: String,
    /// The annotation, validated.
    pub annotation: VocAnnotation,
}

/// An opened, validated KUMC dataset.
#[derive(Debug)]
pub struct Kumc {
    store: Store,
    splits: BTreeMap<Split, Vec<KumcFrame>>,
}

impl Kumc {
    /// The key of a split's frame list.
    pub fn list_key(split: Split) -> String {
        format!("ImageSets/{split}.txt")
    }

    /// The folder of a split (`train2019`).
    pub fn split_dir(split: Split) -> String {
        format!("{split}2019")
    }

    /// Opens and validates the dataset at `uri` (see the module documentation).
    pub fn open(uri: &StorageUri) -> Result<Self> {
        Self::open_store(Store::open(uri, false)?)
    }

    /// [`Kumc::open`] on an already opened store (for stores with explicit settings).
    pub fn open_store(store: Store) -> Result<Self> {
        let uri = store.uri().clone();
        let mut splits = BTreeMap::new();
        for split in Split::ALL {
            let key = Self::list_key(split);
            if split == Split::Test && !store.exists(&key)? {
                continue;
            }
            let frames = read_split(&store, split)?;
            splits.insert(split, frames);
        }
        tracing::info!(
            uri = %uri,
            frames = splits.values().map(Vec::len).sum::<usize>(),
            "KUMC opened"
        );
        Ok(Self { store, splits })
    }

    /// The frames of `split`, in list order.
    pub fn split(&self, split: Split) -> Result<&[KumcFrame]> {
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

    /// The video names of `split`, in order of first appearance.
    pub fn videos(&self, split: Split) -> Result<Vec<&str>> {
        let mut seen = BTreeSet::new();
        Ok(self
            .split(split)?
            .iter()
            .filter(|f| seen.insert(f.video.as_str()))
            .map(|f| f.video.as_str())
            .collect())
    }

    /// Reads a frame as RGB (one frame of `Frames`), checking its size against its annotation.
    pub fn read_frame(&self, frame: &KumcFrame) -> Result<Frames> {
        let rgb = read_image(&self.store, &frame.image)?.to_rgb8();
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let a = &frame.annotation;
        if (w, h) != (a.width, a.height) {
            return Err(invalid(
                &self.store,
                &frame.image,
                None,
                format!(
                    "image is {w}×{h}, its annotation {} says {}×{}",
                    self.store.describe(&frame.annotation_key),
                    a.width,
                    a.height
                ),
            ));
        }
        Frames::from_vec(1, h, w, rgb.into_raw())
    }
}

/// A parsed list line before its annotation is read.
struct Line {
    line: u64,
    video: String,
    number: usize,
    total: usize,
}

/// Reads one split's list, checks its frames and annotations exist, and parses the annotations.
fn read_split(store: &Store, split: Split) -> Result<Vec<KumcFrame>> {
    let key = Kumc::list_key(split);
    let text = read_text(store, &key, "frame list")?;
    let dir = Kumc::split_dir(split);
    let mut lines = Vec::new();
    let mut totals: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    let mut seen: BTreeMap<(String, usize), u64> = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i as u64 + 1;
        let fields: Vec<&str> = raw.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let bad = |reason: String| invalid(store, &key, Some(line), reason);
        let [video, _, k, n] = fields[..] else {
            return Err(bad(format!(
                "expected `<video> 0 <frame> <frames>`, found {} field(s): `{}`",
                fields.len(),
                raw.trim()
            )));
        };
        if video.contains('/') || video == ".." || video == "." {
            return Err(bad(format!("`{video}` is not a video folder name")));
        }
        storable(video).map_err(&bad)?;
        let number = |t: &str, what: &str| {
            t.parse::<usize>()
                .ok()
                .filter(|&v| v >= 1)
                .ok_or_else(|| bad(format!("{what} `{t}` is not a positive integer")))
        };
        let (k, n) = (number(k, "frame number")?, number(n, "frame count")?);
        if k > n {
            return Err(bad(format!("frame {k} of a video of {n} frames")));
        }
        match totals.get(video) {
            Some(&(m, first)) if m != n => {
                return Err(bad(format!(
                    "video `{video}` has {n} frames here but {m} on line {first}"
                )));
            }
            Some(_) => {}
            None => {
                totals.insert(video.to_string(), (n, line));
            }
        }
        if let Some(first) = seen.insert((video.to_string(), k), line) {
            return Err(bad(format!(
                "frame {k} of `{video}` is listed twice (line {first})"
            )));
        }
        lines.push(Line {
            line,
            video: video.to_string(),
            number: k,
            total: n,
        });
    }
    if lines.is_empty() {
        return Err(invalid(
            store,
            &key,
            None,
            "the list names no frames".into(),
        ));
    }
    let keys: BTreeSet<String> = list_keys(store, &dir)?.into_iter().collect();
    let mut located = Vec::with_capacity(lines.len());
    for l in lines {
        let bad = |reason: String| invalid(store, &key, Some(l.line), reason);
        let stem = format!("{dir}/Image/{}/{}", l.video, l.number);
        let image = IMAGE_EXTENSIONS
            .iter()
            .map(|ext| format!("{stem}.{ext}"))
            .find(|k| keys.contains(k))
            .ok_or_else(|| {
                bad(format!(
                    "frame {} of `{}` is missing: no {}.jpg (or .png, .tif)",
                    l.number,
                    l.video,
                    store.describe(&stem)
                ))
            })?;
        let annotation = format!("{dir}/Annotation/{}/{}.xml", l.video, l.number);
        if !keys.contains(&annotation) {
            return Err(bad(format!(
                "the annotation of frame {} of `{}` is missing: no {}",
                l.number,
                l.video,
                store.describe(&annotation)
            )));
        }
        located.push((l, image, annotation));
    }
    let parsed = read_annotations(store, located.iter().map(|(_, _, a)| a.as_str()).collect())?;
    Ok(located
        .into_iter()
        .zip(parsed)
        .map(|((l, image, annotation_key), annotation)| KumcFrame {
            video: l.video,
            number: l.number,
            video_frames: l.total,
            image,
            annotation_key,
            annotation,
        })
        .collect())
}

/// Reads and parses annotation files on a few threads; results in input order, the first
/// error (in input order) wins.
fn read_annotations(store: &Store, keys: Vec<&str>) -> Result<Vec<VocAnnotation>> {
    let threads = READ_THREADS.min(keys.len()).max(1);
    let chunk = keys.len().div_ceil(threads).max(1);
    let parts: Vec<Result<Vec<VocAnnotation>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = keys
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|key| {
                            let text = read_text(store, key, "annotation")?;
                            parse_voc(&text, &store.describe(key))
                        })
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Input {
                        name: "annotations".into(),
                        reason: "a reading thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut out = Vec::with_capacity(keys.len());
    for part in parts {
        out.extend(part?);
    }
    Ok(out)
}

/// Writes a VOC annotation in the layout [`parse_voc`] reads (used by the synthetic generator).
pub fn write_voc(
    folder: &str,
    filename: &str,
    width: usize,
    height: usize,
    boxes: &[PolypBox],
) -> String {
    let mut xml = format!(
        "<annotation>\n  <folder>{folder}</folder>\n  <filename>{filename}</filename>\n  <size>\n    <width>{width}</width>\n    <height>{height}</height>\n    <depth>3</depth>\n  </size>\n"
    );
    for b in boxes {
        xml.push_str(&format!(
            "  <object>\n    <name>{}</name>\n    <difficult>0</difficult>\n    <bndbox>\n      <xmin>{}</xmin>\n      <ymin>{}</ymin>\n      <xmax>{}</xmax>\n      <ymax>{}</ymax>\n    </bndbox>\n  </object>\n",
            b.class.name(),
            b.xmin,
            b.ymin,
            b.xmax,
            b.ymax
        ));
    }
    xml.push_str("</annotation>\n");
    xml
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

    fn polyp(class: PolypClass, xmin: f64, ymin: f64, xmax: f64, ymax: f64) -> PolypBox {
        PolypBox {
            class,
            xmin,
            ymin,
            xmax,
            ymax,
        }
    }

    #[test]
    fn voc_round_trips_and_refusals_are_named() {
        let boxes = [
            polyp(PolypClass::Adenomatous, 0.0, 1.0, 6.0, 4.0),
            polyp(PolypClass::Hyperplastic, 2.5, 0.0, 3.0, 1.0),
        ];
        let xml = write_voc("v", "1.jpg", 6, 4, &boxes);
        let a = parse_voc(&xml, "a.xml").expect("round trip");
        assert_eq!((a.width, a.height, a.boxes.as_slice()), (6, 4, &boxes[..]));
        assert!(
            parse_voc(&write_voc("v", "1.jpg", 6, 4, &[]), "e.xml")
                .expect("no polyp")
                .boxes
                .is_empty()
        );

        let with = |b: PolypBox| write_voc("v", "1.jpg", 6, 4, &[b]);
        for (text, words) in [
            ("<annotation><size>".to_string(), "malformed XML"),
            ("<root/>".to_string(), "expected <annotation>"),
            ("<annotation/>".to_string(), "no <size>"),
            (
                "<annotation><size><width>6</width></size></annotation>".to_string(),
                "no <height>",
            ),
            (
                "<annotation><size><width>x</width><height>4</height></size></annotation>"
                    .to_string(),
                "not a positive integer",
            ),
            (
                xml.replace("hyperplastic", "serrated"),
                "unknown class `serrated`",
            ),
            (
                with(polyp(PolypClass::Adenomatous, 3.0, 1.0, 3.0, 2.0)),
                "degenerate",
            ),
            (
                with(polyp(PolypClass::Adenomatous, 3.0, 2.0, 4.0, 1.0)),
                "degenerate",
            ),
            (
                with(polyp(PolypClass::Adenomatous, -1.0, 1.0, 3.0, 2.0)),
                "outside",
            ),
            (
                with(polyp(PolypClass::Adenomatous, 1.0, 1.0, 6.5, 2.0)),
                "outside",
            ),
            (
                with(polyp(PolypClass::Adenomatous, 1.0, 1.0, 3.0, 5.0)),
                "outside",
            ),
            (
                xml.replace("<xmax>6</xmax>", "<xmax>six</xmax>"),
                "not a number",
            ),
            (
                xml.replace("<bndbox>", "<box>")
                    .replace("</bndbox>", "</box>"),
                "no <bndbox>",
            ),
        ] {
            let err = parse_voc(&text, "dir/7.xml").expect_err(words).to_string();
            assert!(
                err.contains("dir/7.xml") && err.contains(words),
                "{words}: {err}"
            );
        }
    }

    /// Video `v1` with frames 1, 2 (a polyp on 1) in train, `v2` with frame 1 in val.
    fn layout(dir: &Path) {
        for (split, video, k, boxes) in [
            (
                "train",
                "v1",
                1,
                vec![polyp(PolypClass::Hyperplastic, 1.0, 1.0, 4.0, 3.0)],
            ),
            ("train", "v1", 2, vec![]),
            ("val", "v2", 1, vec![]),
        ] {
            let img = dir.join(format!("{split}2019/Image/{video}/{k}.jpg"));
            let ann = dir.join(format!("{split}2019/Annotation/{video}/{k}.xml"));
            for p in [&img, &ann] {
                std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            }
            image::RgbImage::from_pixel(6, 4, image::Rgb([200, 40, 40]))
                .save(&img)
                .expect("jpg");
            std::fs::write(&ann, write_voc(video, &format!("{k}.jpg"), 6, 4, &boxes)).expect("xml");
        }
        std::fs::create_dir_all(dir.join("ImageSets")).expect("mkdir");
        std::fs::write(dir.join("ImageSets/train.txt"), "v1 0 1 2\nv1 0 2 2\n").expect("write");
        std::fs::write(dir.join("ImageSets/val.txt"), "v2 0 1 1\n").expect("write");
    }

    #[test]
    fn frames_list_and_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        layout(dir.path());
        let kumc = Kumc::open(&local(dir.path())).expect("open");
        let train = kumc.split(Split::Train).expect("train");
        assert_eq!(train.len(), 2);
        assert_eq!(
            (
                train[0].video.as_str(),
                train[0].number,
                train[0].video_frames
            ),
            ("v1", 1, 2)
        );
        assert_eq!(train[0].image, "train2019/Image/v1/1.jpg");
        assert_eq!(train[0].annotation.boxes[0].class, PolypClass::Hyperplastic);
        assert!(train[1].annotation.boxes.is_empty());
        assert_eq!(kumc.videos(Split::Train).expect("videos"), ["v1"]);
        assert!(kumc.split(Split::Test).is_err());
        let f = kumc.read_frame(&train[0]).expect("read");
        assert_eq!((f.t, f.h, f.w), (1, 4, 6));
    }

    #[test]
    fn every_refusal_names_the_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        layout(d);
        let check = |what: &str, file: &str, words: &str| {
            let err = Kumc::open(&local(d)).expect_err(what).to_string();
            assert!(err.contains(file) && err.contains(words), "{what}: {err}");
        };
        let list = d.join("ImageSets/train.txt");
        for (text, line, words) in [
            ("v1 0 1\n", 1, "found 3 field"),
            ("v1 0 1 2\nv1 0 x 2\n", 2, "not a positive integer"),
            ("v1 0 3 2\n", 1, "frame 3 of a video of 2"),
            (
                "v1 0 1 2\nv1 0 2 3\n",
                2,
                "has 3 frames here but 2 on line 1",
            ),
            ("v1 0 1 2\n\nv1 0 1 2\n", 3, "listed twice (line 1)"),
            ("v1 0 1 2\nv9 0 1 1\n", 2, "frame 1 of `v9` is missing"),
            ("../v1 0 1 2\n", 1, "not a video folder"),
            ("v#1 0 1 2\n", 1, "rename it"),
        ] {
            std::fs::write(&list, text).expect("write");
            check(text, &format!("ImageSets/train.txt line {line}"), words);
        }
        std::fs::write(&list, "\n").expect("write");
        check("empty", "ImageSets/train.txt", "names no frames");
        std::fs::write(&list, "v1 0 1 2\nv1 0 2 2\n").expect("write");
        std::fs::remove_file(d.join("train2019/Annotation/v1/2.xml")).expect("rm");
        check(
            "no xml",
            "ImageSets/train.txt line 2",
            "annotation of frame 2",
        );
        std::fs::write(d.join("train2019/Annotation/v1/2.xml"), "<annotation>").expect("write");
        check("bad xml", "train2019/Annotation/v1/2.xml", "malformed XML");
        std::fs::write(
            d.join("train2019/Annotation/v1/2.xml"),
            write_voc("v1", "2.jpg", 7, 4, &[]),
        )
        .expect("write");
        let kumc = Kumc::open(&local(d)).expect("sizes are checked on reading");
        let err = kumc
            .read_frame(&kumc.split(Split::Train).expect("train")[1])
            .expect_err("size")
            .to_string();
        assert!(
            err.contains("train2019/Image/v1/2.jpg") && err.contains("says 7×4"),
            "{err}"
        );
        std::fs::remove_file(d.join("ImageSets/val.txt")).expect("rm");
        check("no val", "ImageSets/val.txt", "cannot read");
    }
}
