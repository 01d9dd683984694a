//! One dataset entry opened for decoding selected frames: a video file (any container FFmpeg
//! opens, decoded by [`crate::video::Clip`] from the object's bytes) or a folder of image frames
//! (PNG, JPEG or TIFF in frame-number order, decoded with the `image` crate from any store).
//!
//! FFmpeg's [`crate::video::FrameFolder`] reads only local `img_NNNNN.jpg` folders; the
//! downstream layouts name frames `12.jpg`, `img_00012.jpg` or `12.tif` and live in object
//! storage too, hence the second reader.

use std::collections::BTreeSet;

use endofm_shared::StorageUri;

use super::{decode_image, frame_order, is_image, key_kind, list_keys, unreadable_name};
use crate::store::Store;
use crate::video::{Clip, Frames};
use crate::{Error, Result};

/// What a dataset entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaKind {
    /// A video file.
    Video,
    /// A folder of image frames.
    Frames,
}

/// Frame count, rate and size of an entry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MediaInfo {
    /// Number of frames.
    pub frames: usize,
    /// Frames per second of a video (its average rate); `None` for frame folders.
    pub fps: Option<f64>,
    /// Frame height in pixels.
    pub height: usize,
    /// Frame width in pixels.
    pub width: usize,
}

/// An opened entry.
#[derive(Debug)]
pub enum Media {
    /// A video file.
    Video(Clip),
    /// A folder of frames.
    Frames(ImageFolder),
}

impl Media {
    /// Opens `key` of `store` as `kind`. Reads a video's packets (not its pixels) or a folder's
    /// listing and first frame (for the size).
    pub fn open(store: &Store, key: &str, kind: MediaKind) -> Result<Self> {
        match kind {
            MediaKind::Video => {
                let uri = store.describe(key);
                let bytes = store.get(key).map_err(|e| Error::ClipDecode {
                    uri: uri.clone(),
                    reason: match e {
                        Error::Storage { reason, .. } => reason,
                        e => e.to_string(),
                    },
                })?;
                Ok(Media::Video(Clip::from_bytes(&uri, bytes)?))
            }
            MediaKind::Frames => Ok(Media::Frames(ImageFolder::open(store, key)?)),
        }
    }

    /// Opens entry `key` of `store` by what it is, never by its name: a local directory, or in
    /// object storage a key with no object but objects below `key/`, is a frame folder;
    /// anything else is handed to FFmpeg, which recognises every container it reads by content
    /// (MP4, MPEG-PS `.mpg`, AVI, Matroska, a file without extension, …). Every command reads
    /// its inputs through this (pre-training, embedding, fine-tuning, evaluation, benchmarks).
    ///
    /// Errors: [`Error::ClipDecode`] for an entry that is missing or cannot be decoded (bad
    /// data), [`Error::StorageUnavailable`] when storage failed (not the data's fault).
    pub fn open_entry(store: &Store, key: &str) -> Result<Self> {
        let uri = store.describe(key);
        let missing = || Error::ClipDecode {
            uri: uri.clone(),
            reason: "no such file, object or frame folder".into(),
        };
        if let StorageUri::Local { path } = store.uri() {
            let full = path.join(key);
            if full.is_dir() {
                return Ok(Media::Frames(ImageFolder::open(store, key)?));
            }
            if !full.exists() {
                return Err(missing());
            }
        }
        let bytes = store.get_opt(key).map_err(|e| match e {
            Error::Storage { reason, .. } => Error::ClipDecode {
                uri: uri.clone(),
                reason,
            },
            e => e,
        })?;
        match bytes {
            Some(bytes) => Ok(Media::Video(Clip::from_bytes(&uri, bytes)?)),
            None => {
                if list_keys(store, key)?.is_empty() {
                    return Err(missing());
                }
                Ok(Media::Frames(ImageFolder::open(store, key)?))
            }
        }
    }

    /// Opens one video file or frame folder named by a path or object-store URI
    /// (`s3://bucket/videos/a.mp4`); a local directory, or a remote prefix with objects below
    /// it, is a frame folder.
    pub fn open_uri(uri: &str) -> Result<Self> {
        let parsed = StorageUri::parse(uri)?;
        if let StorageUri::Local { path } = &parsed {
            if path.is_dir() {
                let store = Store::open(&parsed, false)?;
                return Ok(Media::Frames(ImageFolder::open(&store, "")?));
            }
            return Ok(Media::Video(Clip::open(path)?));
        }
        let prefix = parsed.prefix();
        let (parent, name) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        if name.is_empty() {
            return Err(Error::ClipDecode {
                uri: uri.to_string(),
                reason: "names a bucket, not a video".into(),
            });
        }
        let parent_uri = with_prefix(&parsed, parent);
        let store = Store::open(&parent_uri, false)?;
        let keys: BTreeSet<String> = list_keys(&store, name)?.into_iter().collect();
        match key_kind(&keys, name) {
            Some(kind) => Self::open(&store, name, kind),
            None => Err(Error::ClipDecode {
                uri: uri.to_string(),
                reason: "no such object or folder".into(),
            }),
        }
    }

    /// Frame count, rate and size.
    pub fn info(&self) -> MediaInfo {
        match self {
            Media::Video(clip) => {
                let i = clip.info();
                MediaInfo {
                    frames: i.frames,
                    fps: (i.fps.is_finite() && i.fps > 0.0).then_some(i.fps),
                    height: i.height,
                    width: i.width,
                }
            }
            Media::Frames(folder) => MediaInfo {
                frames: folder.keys.len(),
                fps: None,
                height: folder.height,
                width: folder.width,
            },
        }
    }

    /// The entry's name in errors.
    pub fn uri(&self) -> &str {
        match self {
            Media::Video(clip) => clip.uri(),
            Media::Frames(folder) => &folder.uri,
        }
    }

    /// Decodes frames `indices` (ascending, repeats allowed) into `out`, reusing its allocation.
    pub fn decode_into(&mut self, indices: &[usize], out: &mut Frames) -> Result<()> {
        match self {
            Media::Video(clip) => clip.decode_into(indices, out),
            Media::Frames(folder) => folder.decode_into(indices, out),
        }
    }
}

/// `uri` with its key prefix replaced by `prefix`.
fn with_prefix(uri: &StorageUri, prefix: &str) -> StorageUri {
    let prefix = prefix.to_string();
    match uri.clone() {
        StorageUri::S3 { bucket, .. } => StorageUri::S3 { bucket, prefix },
        StorageUri::Gcs { bucket, .. } => StorageUri::Gcs { bucket, prefix },
        StorageUri::Azure { container, .. } => StorageUri::Azure { container, prefix },
        local @ StorageUri::Local { .. } => local,
    }
}

/// A folder of image frames in any store, in frame-number order (`frame_order`): every image
/// file directly inside the folder is a frame; all frames must share one size.
#[derive(Debug)]
pub struct ImageFolder {
    store: Store,
    uri: String,
    keys: Vec<String>,
    height: usize,
    width: usize,
}

impl ImageFolder {
    /// Lists the frames of folder `key` (empty: the store's root) and reads the first one.
    pub fn open(store: &Store, key: &str) -> Result<Self> {
        let uri = store.describe(key);
        let prefix = if key.is_empty() {
            String::new()
        } else {
            format!("{}/", key.trim_end_matches('/'))
        };
        let mut keys: Vec<String> = list_keys(store, key)?
            .into_iter()
            .filter(|k| {
                k.strip_prefix(&prefix)
                    .is_some_and(|name| !name.contains('/') && is_image(name))
            })
            .collect();
        if let Some(e) = keys.iter().find_map(|k| unreadable_name(store, k)) {
            return Err(e);
        }
        keys.sort_by_cached_key(|k| frame_order(&k[prefix.len()..]));
        let Some(first) = keys.first() else {
            return Err(Error::ClipDecode {
                uri,
                reason: "the folder holds no .png, .jpg or .tif frames".into(),
            });
        };
        let image = read_image(store, first)?;
        Ok(Self {
            height: image.height() as usize,
            width: image.width() as usize,
            store: store.clone(),
            uri,
            keys,
        })
    }

    /// The frame files, in frame order.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// Decodes frames `indices` (ascending, repeats allowed) into `out` as RGB.
    pub fn decode_into(&mut self, indices: &[usize], out: &mut Frames) -> Result<()> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.keys.len()) {
            return Err(Error::ClipDecode {
                uri: self.uri.clone(),
                reason: format!("frame {bad} requested of {}", self.keys.len()),
            });
        }
        out.reshape(indices.len(), self.height, self.width);
        for (slot, &index) in indices.iter().enumerate() {
            if slot > 0 && indices[slot - 1] == index {
                let n = out.frame_len();
                out.data.copy_within((slot - 1) * n..slot * n, slot * n);
                continue;
            }
            let key = &self.keys[index];
            let rgb = read_image(&self.store, key)?.to_rgb8();
            if (rgb.height() as usize, rgb.width() as usize) != (self.height, self.width) {
                return Err(Error::ClipDecode {
                    uri: self.store.describe(key),
                    reason: format!(
                        "frame is {}×{}, the folder's first frame {}×{}",
                        rgb.width(),
                        rgb.height(),
                        self.width,
                        self.height
                    ),
                });
            }
            out.frame_mut(slot).copy_from_slice(rgb.as_raw());
        }
        Ok(())
    }
}

/// Reads and decodes one image of `store`.
pub(crate) fn read_image(store: &Store, key: &str) -> Result<image::DynamicImage> {
    let uri = store.describe(key);
    let bytes = store.get(key)?;
    decode_image(&bytes, &uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &std::path::Path, w: u32, h: u32, value: u8) {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([value, x as u8, y as u8]));
        img.save(path).expect("writing a png");
    }

    #[test]
    fn folders_decode_in_frame_number_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let folder = dir.path().join("cl#ip");
        std::fs::create_dir(&folder).expect("mkdir");
        for (n, v) in [(1, 10u8), (2, 20), (10, 100)] {
            write_png(&folder.join(format!("{n}.png")), 6, 4, v);
        }
        std::fs::write(folder.join("notes.txt"), "not a frame").expect("write");
        let mut media = Media::open_uri(&folder.to_string_lossy()).expect("open");
        let info = media.info();
        assert_eq!(
            (info.frames, info.height, info.width, info.fps),
            (3, 4, 6, None)
        );
        let mut out = Frames::default();
        media.decode_into(&[0, 2, 2], &mut out).expect("decode");
        assert_eq!((out.t, out.h, out.w), (3, 4, 6));
        assert_eq!(
            [out.frame(0)[0], out.frame(1)[0], out.frame(2)[0]],
            [10, 100, 100]
        );
        assert_eq!(&out.frame(1)[3..6], &[100, 1, 0]);
        let err = media.decode_into(&[3], &mut out).expect_err("past the end");
        assert!(err.to_string().contains("clip"), "{err}");

        write_png(&folder.join("11.png"), 5, 4, 1);
        let mut media = Media::open_uri(&folder.to_string_lossy()).expect("open");
        let err = media.decode_into(&[3], &mut out).expect_err("odd size");
        assert!(err.to_string().contains("11.png"), "{err}");
        std::fs::remove_file(folder.join("11.png")).expect("rm");

        // Names with characters object stores escape round-trip (keys are used verbatim).
        write_png(&folder.join("12#b%20[x].png"), 6, 4, 120);
        let mut media = Media::open_uri(&folder.to_string_lossy()).expect("escaped names");
        media.decode_into(&[3], &mut out).expect("decode");
        assert_eq!(out.frame(0)[0], 120);

        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).expect("mkdir");
        let err = Media::open_uri(&empty.to_string_lossy()).expect_err("no frames");
        assert!(err.to_string().contains("no .png"), "{err}");
    }
}
