//! The downstream datasets of the paper in their published layouts, read from a local folder or
//! any object-store location and validated before training starts, so that a bad list line, a
//! missing video or a malformed mask is an error naming its file (and line) instead of a failure
//! in the middle of a run.
//!
//! - [`polypdiag`]: video classification (`videos/` + `splits/{train,val[,test]}.txt`, lines
//!   `name,label`).
//! - [`cvc`]: CVC-12k segmentation sequences (frames + binary masks per sequence).
//! - [`kumc`]: KUMC detection frames with one PASCAL-VOC XML file per frame.
//! - [`classify`]: the fine-tuning clip pipeline of the published `eval_finetune.py` (frame
//!   sampling, scale jitter, crops, normalisation), its rank-sharded training loader, the
//!   evaluation iterator and the per-video window clips used for prediction.
//! - [`media`]: one entry of a dataset (a video file or a folder of frames) opened for decoding
//!   only the frames needed.
//!
//! `datasets` knows nothing about the network or the trainer; training code imports it.

mod bilinear;
pub mod classify;
pub mod cvc;
pub mod kumc;
pub mod media;
pub mod polypdiag;
pub(crate) mod prefetch;
pub mod segment;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::store::Store;
use crate::{Error, Result};

pub use classify::{
    ClassifyBatch, ClassifyEval, ClassifyLoader, ClipSampling, WindowClips, iters_per_epoch,
    predict_windows,
};
pub use cvc::{Cvc, SegSequence};
pub use kumc::{Kumc, KumcFrame, PolypBox, PolypClass, VocAnnotation};
pub use media::{Media, MediaInfo, MediaKind};
pub use polypdiag::{PolypDiag, VideoEntry};

/// A split of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training videos.
    Train,
    /// Validation videos (the published PolypDiag scores are on this split).
    Val,
    /// Held-out test videos (optional in every layout).
    Test,
}

impl Split {
    /// Train, val, test.
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    /// `train`, `val` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }

    /// Parses `train`, `val` or `test`.
    pub fn parse(text: &str) -> Result<Self> {
        Split::ALL
            .into_iter()
            .find(|s| s.name() == text)
            .ok_or_else(|| Error::Input {
                name: "split".into(),
                reason: format!("unknown split `{text}` (known: train, val, test)"),
            })
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Image file extensions read as frames or masks (lower-case, without the dot).
pub const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "tif", "tiff"];

/// Whether `name` ends in one of [`IMAGE_EXTENSIONS`] (any case).
pub fn is_image(name: &str) -> bool {
    name.rsplit_once('.')
        .is_some_and(|(_, ext)| IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()))
}

/// The error of a dataset file, optionally at a 1-based line.
pub(crate) fn invalid(store: &Store, key: &str, line: Option<u64>, reason: String) -> Error {
    let mut location = store.describe(key);
    if let Some(line) = line {
        location.push_str(&format!(" line {line}"));
    }
    Error::Dataset { location, reason }
}

/// Reads a UTF-8 text file of the dataset; a leading byte-order mark is dropped. A missing file
/// is an error naming it and what it is for.
pub(crate) fn read_text(store: &Store, key: &str, what: &str) -> Result<String> {
    let bytes = store.get(key).map_err(|e| {
        let reason = match e {
            Error::Storage { reason, .. } => reason,
            e => e.to_string(),
        };
        invalid(
            store,
            key,
            None,
            format!("cannot read the {what}: {reason}"),
        )
    })?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    String::from_utf8(bytes.to_vec()).map_err(|e| {
        invalid(
            store,
            key,
            None,
            format!("the {what} is not UTF-8 text: {e}"),
        )
    })
}

/// The keys below `prefix`, relative to the store's root.
pub(crate) fn list_keys(store: &Store, prefix: &str) -> Result<Vec<String>> {
    Ok(store.list(prefix)?.into_iter().map(|l| l.key).collect())
}

/// Refuses a name storage cannot hold as it is: control characters, and names ending in
/// `#` + digits, which local storage reserves for the temporary files of writes
/// ([`crate::store::is_temporary_name`]). Every other name round-trips, locally and in object
/// storage (`100%.mp4`, `a#b.mp4`, `[x] y.mp4`).
pub(crate) fn storable(name: &str) -> std::result::Result<(), String> {
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!(
            "`{}` contains the control character {c:?}: rename it",
            name.escape_debug()
        ));
    }
    if name.split('/').any(crate::store::is_temporary_name) {
        return Err(format!(
            "`{}` ends in `#` and digits, which local storage reserves for unfinished writes: rename it",
            name.escape_debug()
        ));
    }
    Ok(())
}

/// The error for a listed file whose name storage cannot hold (see [`storable`]), naming it.
pub(crate) fn unreadable_name(store: &Store, key: &str) -> Option<Error> {
    storable(key).err().map(|reason| Error::Dataset {
        location: store.describe(key),
        reason,
    })
}

/// Whether the store holds `key` as an object; otherwise, whether objects lie below `key/`.
pub(crate) fn key_kind(keys: &std::collections::BTreeSet<String>, key: &str) -> Option<MediaKind> {
    if keys.contains(key) {
        return Some(MediaKind::Video);
    }
    let folder = format!("{key}/");
    keys.range(folder.clone()..)
        .next()
        .filter(|k| k.starts_with(&folder))
        .map(|_| MediaKind::Frames)
}

/// A relative name inside a dataset folder: not empty, not absolute, no `..`, no backslashes.
pub(crate) fn plain_relative(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.contains('\\') {
        return Err(format!(
            "`{name}` contains a backslash: use `/` between folders"
        ));
    }
    if name.starts_with('/') || name.split('/').any(|s| s == ".." || s.is_empty()) {
        return Err(format!(
            "`{name}` is not a relative path inside the dataset (no leading `/`, `..` or empty parts)"
        ));
    }
    storable(name)
}

/// Sort key of a frame file name: its number when the stem is a number (`12.png` before
/// `100.png`), else the name itself after every numbered frame.
pub(crate) fn frame_order(name: &str) -> (u64, String) {
    let stem = name.rsplit_once('.').map_or(name, |(s, _)| s);
    let digits: String = stem
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let prefix = &stem[..stem.len() - digits.len()];
    match digits.parse::<u64>() {
        Ok(n) => (n, format!("{prefix}\u{0}{name}")),
        Err(_) => (u64::MAX, name.to_string()),
    }
}

/// The stem of a file name (`frames/12.png` → `12`).
pub(crate) fn stem(key: &str) -> &str {
    let name = key.rsplit_once('/').map_or(key, |(_, n)| n);
    name.rsplit_once('.').map_or(name, |(s, _)| s)
}

/// Decodes an image file (PNG, JPEG or TIFF, 8 or 16 bits).
pub(crate) fn decode_image(bytes: &[u8], uri: &str) -> Result<image::DynamicImage> {
    image::load_from_memory(bytes).map_err(|e| Error::Dataset {
        location: uri.to_string(),
        reason: format!("not a readable PNG, JPEG or TIFF image: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_parse_and_print() {
        for s in Split::ALL {
            assert_eq!(Split::parse(s.name()).expect("known"), s);
            assert_eq!(s.to_string(), s.name());
        }
        assert!(Split::parse("valid").is_err());
        assert_eq!(serde_json::json!(Split::Val), serde_json::json!("val"));
    }

    #[test]
    fn frames_sort_by_number_and_names_are_checked() {
        let mut names = vec!["10.png", "9.png", "img_00002.jpg", "100.png", "cover.png"];
        names.sort_by_key(|n| frame_order(n));
        assert_eq!(
            names,
            ["img_00002.jpg", "9.png", "10.png", "100.png", "cover.png"]
        );
        assert_eq!(stem("a/b/12.tif"), "12");
        assert!(is_image("x.TIF") && is_image("a.jpeg") && !is_image("a.xml"));
        assert!(plain_relative("a/b.mp4").is_ok());
        for bad in [
            "", "/a.mp4", "a/../b", "a//b", "a#1", "x/b#22", "a\nb", "a\\b",
        ] {
            assert!(plain_relative(bad).is_err(), "{bad}");
        }
        for good in ["50%.mp4", "a#1.mp4", "[x] y~.mp4", "é ü.mp4"] {
            assert!(plain_relative(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn key_kind_tells_files_from_folders() {
        let keys: std::collections::BTreeSet<String> = [
            "videos/a.mp4",
            "videos/b/1.jpg",
            "videos/b/2.jpg",
            "videos/bc.mp4",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(key_kind(&keys, "videos/a.mp4"), Some(MediaKind::Video));
        assert_eq!(key_kind(&keys, "videos/b"), Some(MediaKind::Frames));
        assert_eq!(key_kind(&keys, "videos/c"), None);
        assert_eq!(key_kind(&keys, "videos/a"), None);
    }
}
