//! PolypDiag, video-level classification (normal / abnormal), in the published layout that the
//! authors' `scripts/eval_finetune_polypdiag.sh` passes to the UCF101-style dataset class
//! (`datasets/ucf101.py`: `DATA.PATH_PREFIX = <root>/videos`, `DATA.PATH_TO_DATA_DIR =
//! <root>/splits`, `DATA.PATH_LABEL_SEPARATOR = ","`):
//!
//! ```text
//! <root>/videos/<name>          a video file (mp4 or any container FFmpeg opens), or a folder
//!                               of frames (.png/.jpg/.tif, frame-number order)
//! <root>/splits/train.txt       lines `name,label`: `name` relative to videos/,
//! <root>/splits/val.txt         label 0 = normal, 1 = abnormal
//! <root>/splits/test.txt        optional
//! ```
//!
//! The lists are CSV without a header (quoting, CRLF line ends and a UTF-8 byte-order mark are
//! accepted; blank lines are skipped). Opening checks everything that can be checked without
//! decoding: a line that is not two fields, a label that is not 0 or 1, a name that leaves the
//! dataset folder, a video that does not exist, a name listed twice (in one split or in two:
//! that would leak training videos into evaluation), an empty split. Each error names the list
//! and its line.

use std::collections::{BTreeMap, BTreeSet};

use endofm_shared::StorageUri;

use super::media::{Media, MediaKind};
use super::{Split, invalid, key_kind, list_keys, plain_relative, read_text};
use crate::store::Store;
use crate::{Error, Result};

/// Folder of the videos, below the dataset root.
pub const VIDEOS: &str = "videos";
/// Folder of the split lists, below the dataset root.
pub const SPLITS: &str = "splits";

/// One listed video.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VideoEntry {
    /// Name relative to `videos/`, as listed.
    pub name: String,
    /// Class: 0 normal, 1 abnormal.
    pub label: i64,
    /// Line of the split list (1-based).
    pub line: u64,
    /// A video file or a folder of frames.
    pub kind: MediaKind,
}

/// An opened, validated PolypDiag dataset.
#[derive(Debug)]
pub struct PolypDiag {
    store: Store,
    splits: BTreeMap<Split, Vec<VideoEntry>>,
}

impl PolypDiag {
    /// Number of classes (normal, abnormal).
    pub const NUM_CLASSES: usize = 2;

    /// The key of a split's list (`splits/train.txt`).
    pub fn list_key(split: Split) -> String {
        format!("{SPLITS}/{split}.txt")
    }

    /// Opens and validates the dataset at `uri` (see the module documentation): `train` and
    /// `val` lists are required, `test` is read when present.
    pub fn open(uri: &StorageUri) -> Result<Self> {
        Self::open_store(Store::open(uri, false)?)
    }

    /// [`PolypDiag::open`] on an already opened store (for stores with explicit settings).
    pub fn open_store(store: Store) -> Result<Self> {
        let uri = store.uri().clone();
        let keys: BTreeSet<String> = list_keys(&store, VIDEOS)?.into_iter().collect();
        let mut splits = BTreeMap::new();
        // name → (list key, line) of its first listing, across splits.
        let mut seen: BTreeMap<String, (String, u64)> = BTreeMap::new();
        for split in Split::ALL {
            let key = Self::list_key(split);
            if split == Split::Test && !store.exists(&key)? {
                continue;
            }
            let entries = parse_list(&store, &key, &keys, &mut seen)?;
            splits.insert(split, entries);
        }
        let counts: Vec<String> = splits
            .iter()
            .map(|(s, e)| format!("{s}={}", e.len()))
            .collect();
        tracing::info!(uri = %uri, splits = %counts.join(" "), "PolypDiag opened");
        Ok(Self { store, splits })
    }

    /// The videos of `split`, in list order; an error names the missing list.
    pub fn split(&self, split: Split) -> Result<&[VideoEntry]> {
        self.splits
            .get(&split)
            .map(Vec::as_slice)
            .ok_or_else(|| Error::Dataset {
                location: self.store.describe(&Self::list_key(split)),
                reason: format!("the dataset has no {split} split"),
            })
    }

    /// The splits present (train and val always; test when listed).
    pub fn splits(&self) -> impl Iterator<Item = Split> + '_ {
        self.splits.keys().copied()
    }

    /// The storage location of a video.
    pub fn describe(&self, entry: &VideoEntry) -> String {
        self.store.describe(&video_key(&entry.name))
    }

    /// Opens a video for decoding.
    pub fn open_media(&self, entry: &VideoEntry) -> Result<Media> {
        Media::open(&self.store, &video_key(&entry.name), entry.kind)
    }
}

fn video_key(name: &str) -> String {
    format!("{VIDEOS}/{name}")
}

/// Parses one split list.
fn parse_list(
    store: &Store,
    key: &str,
    keys: &BTreeSet<String>,
    seen: &mut BTreeMap<String, (String, u64)>,
) -> Result<Vec<VideoEntry>> {
    let text = read_text(store, key, "split list")?;
    let mut entries = Vec::new();
    // One CSV record per line (names never span lines), so that errors carry exact line
    // numbers: the csv crate's own positions skip blank lines.
    for (i, raw) in text.lines().enumerate() {
        let line = i as u64 + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let record = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(raw.as_bytes())
            .records()
            .next()
            .transpose()
            .map_err(|e| invalid(store, key, Some(line), format!("not CSV: {e}")))?
            .unwrap_or_default();
        let bad = |reason: String| invalid(store, key, Some(line), reason);
        let (Some(name), Some(label), None) = (record.get(0), record.get(1), record.get(2)) else {
            return Err(bad(format!(
                "expected `name,label`, found {} field(s): `{}`",
                record.len(),
                record.iter().collect::<Vec<_>>().join(",")
            )));
        };
        plain_relative(name).map_err(&bad)?;
        let label: i64 = label
            .parse()
            .map_err(|_| bad(format!("label `{label}` is not an integer")))?;
        if !(0..PolypDiag::NUM_CLASSES as i64).contains(&label) {
            return Err(bad(format!(
                "label {label} is out of range (0 normal, 1 abnormal)"
            )));
        }
        if let Some((first_key, first_line)) = seen.get(name) {
            return Err(bad(format!(
                "`{name}` is listed twice (first in {} line {first_line})",
                store.describe(first_key)
            )));
        }
        let Some(kind) = key_kind(keys, &video_key(name)) else {
            return Err(bad(format!(
                "video `{name}` is missing: no file or frame folder {}",
                store.describe(&video_key(name))
            )));
        };
        seen.insert(name.to_string(), (key.to_string(), line));
        entries.push(VideoEntry {
            name: name.to_string(),
            label,
            line,
            kind,
        });
    }
    if entries.is_empty() {
        return Err(invalid(
            store,
            key,
            None,
            "the split lists no videos".into(),
        ));
    }
    Ok(entries)
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

    /// A dataset of empty "videos" a.mp4 … e.mp4 and a frame folder f/ (never decoded here).
    fn layout(dir: &Path, train: &str, val: &str, test: Option<&str>) {
        std::fs::create_dir_all(dir.join("videos/f")).expect("mkdir");
        std::fs::create_dir_all(dir.join("splits")).expect("mkdir");
        for name in [
            "a.mp4", "b.mp4", "c.mp4", "d.mp4", "e.mp4", "f/1.png", "g#1.mp4",
        ] {
            std::fs::write(dir.join("videos").join(name), b"x").expect("write");
        }
        std::fs::write(dir.join("splits/train.txt"), train).expect("write");
        std::fs::write(dir.join("splits/val.txt"), val).expect("write");
        let _ = std::fs::remove_file(dir.join("splits/test.txt"));
        if let Some(test) = test {
            std::fs::write(dir.join("splits/test.txt"), test).expect("write");
        }
    }

    #[test]
    fn lists_parse_with_bom_crlf_quotes_and_blank_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        layout(
            dir.path(),
            "\u{feff}a.mp4,0\r\n\r\n\"b.mp4\", 1\r\nf,1\r\n",
            "c.mp4,1\n",
            None,
        );
        let ds = PolypDiag::open(&local(dir.path())).expect("valid dataset");
        let train = ds.split(Split::Train).expect("train");
        let got: Vec<(&str, i64, u64, MediaKind)> = train
            .iter()
            .map(|e| (e.name.as_str(), e.label, e.line, e.kind))
            .collect();
        assert_eq!(
            got,
            [
                ("a.mp4", 0, 1, MediaKind::Video),
                ("b.mp4", 1, 3, MediaKind::Video),
                ("f", 1, 4, MediaKind::Frames)
            ]
        );
        assert_eq!(ds.splits().collect::<Vec<_>>(), [Split::Train, Split::Val]);
        let err = ds.split(Split::Test).expect_err("no test split");
        assert!(err.to_string().contains("splits/test.txt"), "{err}");
        assert!(ds.describe(&train[0]).ends_with("videos/a.mp4"));

        layout(
            dir.path(),
            "a.mp4,0\n",
            "c.mp4,1\n",
            Some("d.mp4,0\ne.mp4,1\n"),
        );
        let ds = PolypDiag::open(&local(dir.path())).expect("with a test split");
        assert_eq!(ds.split(Split::Test).expect("test").len(), 2);
    }

    #[test]
    fn every_refusal_names_the_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (train, val, test, file, line, words) in [
            (
                "a.mp4,0\nb.mp4\n",
                "c.mp4,1\n",
                None,
                "train.txt",
                Some(2),
                "expected `name,label`",
            ),
            (
                "a.mp4,0,3\n",
                "c.mp4,1\n",
                None,
                "train.txt",
                Some(1),
                "3 field",
            ),
            (
                "a.mp4,zero\n",
                "c.mp4,1\n",
                None,
                "train.txt",
                Some(1),
                "not an integer",
            ),
            (
                "a.mp4,0\n",
                "c.mp4,2\n",
                None,
                "val.txt",
                Some(1),
                "out of range",
            ),
            (
                "a.mp4,-1\n",
                "c.mp4,1\n",
                None,
                "train.txt",
                Some(1),
                "out of range",
            ),
            (
                "a.mp4,0\nz.mp4,1\n",
                "c.mp4,1\n",
                None,
                "train.txt",
                Some(2),
                "`z.mp4` is missing",
            ),
            (
                "a.mp4,0\n\na.mp4,1\n",
                "c.mp4,1\n",
                None,
                "train.txt",
                Some(3),
                "listed twice",
            ),
            (
                "a.mp4,0\n",
                "c.mp4,1\n",
                Some("d.mp4,0\na.mp4,0\n"),
                "test.txt",
                Some(2),
                "train.txt line 1",
            ),
            (
                "../a.mp4,0\n",
                "c.mp4,1\n",
                None,
                "train.txt",
                Some(1),
                "relative path",
            ),
            (
                "a.mp4,0\ng#1,1\n",
                "c.mp4,1\n",
                None,
                "train.txt",
                Some(2),
                "rename it",
            ),
            (
                "\n\n",
                "c.mp4,1\n",
                None,
                "train.txt",
                None,
                "lists no videos",
            ),
            ("a.mp4,0\n", "", None, "val.txt", None, "lists no videos"),
            (
                "a.mp4,0\n",
                "",
                Some(""),
                "val.txt",
                None,
                "lists no videos",
            ),
            (
                "\"a.mp4,0\n",
                "c.mp4,1\n",
                None,
                "train.txt",
                None,
                "expected",
            ),
        ] {
            layout(dir.path(), train, val, test);
            let err = PolypDiag::open(&local(dir.path()))
                .expect_err(train)
                .to_string();
            let place = match line {
                Some(l) => format!("splits/{file} line {l}"),
                None => format!("splits/{file}"),
            };
            assert!(
                err.contains(&place) && err.contains(words),
                "{train:?} / {val:?}: {err}"
            );
        }
        layout(dir.path(), "a.mp4,0\n", "c.mp4,1\n", None);
        std::fs::remove_file(dir.path().join("splits/val.txt")).expect("rm");
        let err = PolypDiag::open(&local(dir.path())).expect_err("no val list");
        assert!(err.to_string().contains("splits/val.txt"), "{err}");
    }
}
