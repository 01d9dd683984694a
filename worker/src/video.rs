//! Clips as RGB frames: MPEG-4 Part 2 encoding into MP4 ([`encode`]) and decoding of only the
//! frames a view needs from files, in-memory bytes or JPEG-frame folders ([`decode`]).
//! All of it runs on the system FFmpeg (Debian 12: 5.1) through `ffmpeg-next`.

pub mod decode;
pub mod encode;

use std::sync::Once;

pub use decode::{Clip, DecodeBench, FrameFolder, bench_decode};
pub use encode::{Container, EncodeOptions, Mp4Writer, Quality, encode_mp4, write_jpeg};

/// A stack of RGB frames, `t × h × w × 3` bytes, row-major: byte `((i·h + y)·w + x)·3 + c` is
/// channel `c` (R, G, B) of pixel (`x`, `y`) of frame `i`.
///
/// Decoders write into an existing `Frames` and keep its allocation, so one value per worker
/// thread serves every clip (clips above glibc's mmap threshold would otherwise page-fault on
/// every allocation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frames {
    /// Number of frames.
    pub t: usize,
    /// Height in pixels.
    pub h: usize,
    /// Width in pixels.
    pub w: usize,
    /// The pixels, `t·h·w·3` bytes.
    pub data: Vec<u8>,
}

impl Frames {
    /// Black frames of the given shape.
    pub fn new(t: usize, h: usize, w: usize) -> Self {
        Self {
            t,
            h,
            w,
            data: vec![0; t * h * w * 3],
        }
    }

    /// Wraps existing pixels after checking that their length is `t·h·w·3`.
    pub fn from_vec(t: usize, h: usize, w: usize, data: Vec<u8>) -> crate::Result<Self> {
        let expected = t
            .checked_mul(h)
            .and_then(|n| n.checked_mul(w))
            .and_then(|n| n.checked_mul(3));
        if expected != Some(data.len()) {
            return Err(crate::Error::Input {
                name: "frames".into(),
                reason: format!("{} bytes do not hold {t} RGB frames of {h}×{w}", data.len()),
            });
        }
        Ok(Self { t, h, w, data })
    }

    /// Bytes per frame (`h·w·3`).
    pub fn frame_len(&self) -> usize {
        self.h * self.w * 3
    }

    /// Frame `i` as `h·w·3` bytes. Panics when `i >= t`.
    pub fn frame(&self, i: usize) -> &[u8] {
        let n = self.frame_len();
        &self.data[i * n..(i + 1) * n]
    }

    /// Frame `i`, mutable. Panics when `i >= t`.
    pub fn frame_mut(&mut self, i: usize) -> &mut [u8] {
        let n = self.frame_len();
        &mut self.data[i * n..(i + 1) * n]
    }

    /// Reshapes to `t × h × w`, reusing the allocation (contents unspecified afterwards).
    pub fn reshape(&mut self, t: usize, h: usize, w: usize) {
        self.t = t;
        self.h = h;
        self.w = w;
        self.data.resize(t * h * w * 3, 0);
    }
}

/// What a clip holds, read from its container without decoding.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ClipInfo {
    /// Number of frames (one per video packet, checked against the stream header).
    pub frames: usize,
    /// Frames per second (the stream's average frame rate).
    pub fps: f64,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
}

/// Initialises FFmpeg once per process and silences its own stderr logging: every failure
/// reaches the caller as a [`crate::Error`] instead.
pub(crate) fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if let Err(e) = ffmpeg_next::init() {
            tracing::warn!(error = %e, "FFmpeg initialisation reported an error");
        }
        ffmpeg_next::util::log::set_level(ffmpeg_next::util::log::Level::Quiet);
    });
}
