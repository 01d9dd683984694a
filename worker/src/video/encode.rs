//! Writing RGB frames as MPEG-4 Part 2 video in MP4 (codec `mpeg4`, FourCC `mp4v`, the format of
//! the published pre-training corpus), and single frames as JPEG files.

use std::path::{Path, PathBuf};

use ffmpeg_next::{Dictionary, Packet, Rational, codec, encoder, format, frame, software::scaling};

use super::{Frames, init};
use crate::{Error, Result};

/// FFmpeg's lambda per quantiser step (`FF_QP2LAMBDA`): `-q:v q` means global quality `q·118`.
const QP2LAMBDA: u32 = 118;

/// How hard the encoder compresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quality {
    /// A constant quantiser, 1 (best) to 31 (worst), like `ffmpeg -q:v`.
    QScale(u8),
    /// A target bit rate in bits per second (FFmpeg's one-pass rate control).
    Bitrate(u64),
}

/// Settings of [`Mp4Writer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Frames per second (the stream's time base is `1/fps`).
    pub fps: u32,
    /// Quantiser or bit rate.
    pub quality: Quality,
    /// Frames per group of pictures, i.e. the keyframe interval (12: FFmpeg's and OpenCV's
    /// default for `mp4v`).
    pub gop: u32,
    /// Put the index (`moov`) before the media data so that a reader can start from the first
    /// bytes (costs a second pass over the file).
    pub faststart: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self {
            fps: 30,
            quality: Quality::QScale(4),
            gop: 12,
            faststart: false,
        }
    }
}

impl EncodeOptions {
    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::ClipEncode {
                path: path.to_path_buf(),
                reason,
            })
        };
        if !(1..=1000).contains(&self.fps) {
            return bad(format!("fps must be in 1..=1000, got {}", self.fps));
        }
        if self.gop == 0 {
            return bad("gop must be at least 1".into());
        }
        match self.quality {
            Quality::QScale(q) if !(1..=31).contains(&q) => {
                bad(format!("qscale must be in 1..=31, got {q}"))
            }
            Quality::Bitrate(0) => bad("bit rate must be positive".into()),
            _ => Ok(()),
        }
    }
}

/// Attaches a display matrix asking players to rotate the stream `degrees` clockwise (what a
/// phone writes for a portrait recording); the MP4 muxer stores it as the track matrix.
#[allow(unsafe_code)]
fn add_display_matrix(
    stream: &mut format::stream::StreamMut<'_>,
    degrees: i32,
) -> std::result::Result<(), String> {
    use ffmpeg_next::ffi;
    // SAFETY: the stream belongs to an output context that is alive and not yet written;
    // av_stream_new_side_data returns a zeroed buffer of the requested size (9 × i32) owned by
    // the stream, or null, and av_display_rotation_set writes exactly 9 i32 into it.
    unsafe {
        let data = ffi::av_stream_new_side_data(
            stream.as_mut_ptr(),
            ffi::AVPacketSideDataType::AV_PKT_DATA_DISPLAYMATRIX,
            9 * std::mem::size_of::<i32>(),
        );
        if data.is_null() {
            return Err("cannot attach a display matrix (out of memory)".into());
        }
        // The matrix of `av_display_rotation_set(m, θ)` is one that FFmpeg's own
        // autorotation (`-round(av_display_rotation_get(m))`) turns clockwise by θ.
        ffi::av_display_rotation_set(data.cast::<i32>(), f64::from(degrees));
    }
    Ok(())
}

/// The container of [`Mp4Writer::create_in`] and what it says about display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// FFmpeg muxer name: `mp4` (the default), `mpeg` (MPEG-PS `.mpg`), `avi`, `matroska`.
    pub format: String,
    /// A display rotation in degrees clockwise (a display matrix on the stream, written by the
    /// MP4 muxer as the track matrix).
    pub rotate: Option<i32>,
    /// Sample (pixel) aspect ratio, `(num, den)`.
    pub sample_aspect: Option<(i32, i32)>,
}

impl Default for Container {
    fn default() -> Self {
        Self {
            format: "mp4".into(),
            rotate: None,
            sample_aspect: None,
        }
    }
}

/// A streaming MP4 writer: [`Mp4Writer::create`], one [`Mp4Writer::push`] per RGB frame, then
/// [`Mp4Writer::finish`] (without it the file has no index and is unreadable). One encoder
/// thread, so the output bytes depend only on the input and the options.
pub struct Mp4Writer {
    path: PathBuf,
    output: format::context::Output,
    encoder: encoder::Video,
    scaler: scaling::Context,
    rgb: frame::Video,
    packet: Packet,
    width: usize,
    height: usize,
    frames: i64,
    encoder_time_base: Rational,
    stream_time_base: Rational,
}

impl Mp4Writer {
    /// Creates (or truncates) `path` for `width × height` RGB frames. Both sizes must be even
    /// (4:2:0 chroma). The container is MP4 whatever the file name says.
    pub fn create(path: &Path, width: usize, height: usize, opts: &EncodeOptions) -> Result<Self> {
        Self::create_in(path, width, height, opts, &Container::default())
    }

    /// Like [`Mp4Writer::create`] in another container and with display metadata (tests of
    /// containers and orientation: MPEG-PS, AVI, Matroska; a `rotate` tag; non-square pixels).
    pub fn create_in(
        path: &Path,
        width: usize,
        height: usize,
        opts: &EncodeOptions,
        container: &Container,
    ) -> Result<Self> {
        init();
        opts.validate(path)?;
        let fail = |reason: String| Error::ClipEncode {
            path: path.to_path_buf(),
            reason,
        };
        let ff = |what: &'static str| {
            move |e: ffmpeg_next::Error| Error::ClipEncode {
                path: path.to_path_buf(),
                reason: format!("{what}: {e}"),
            }
        };
        if width == 0
            || height == 0
            || width % 2 == 1
            || height % 2 == 1
            || width > 8192
            || height > 8192
        {
            return Err(fail(format!(
                "frame size {width}×{height}: width and height must be even and in 2..=8192"
            )));
        }
        let codec = encoder::find(codec::Id::MPEG4).ok_or(Error::CodecUnavailable {
            codec: "mpeg4",
            role: "encoder",
        })?;
        let mut output =
            format::output_as(path, &container.format).map_err(ff("creating the file"))?;
        let global_header = output
            .format()
            .flags()
            .contains(format::Flags::GLOBAL_HEADER);

        let time_base = Rational::new(1, opts.fps as i32);
        let mut enc = codec::context::Context::new_with_codec(codec)
            .encoder()
            .video()
            .map_err(ff("configuring the encoder"))?;
        enc.set_width(width as u32);
        enc.set_height(height as u32);
        enc.set_format(format::Pixel::YUV420P);
        enc.set_time_base(time_base);
        enc.set_frame_rate(Some(Rational::new(opts.fps as i32, 1)));
        enc.set_gop(opts.gop);
        enc.set_max_b_frames(0);
        let mut flags = codec::Flags::empty();
        if global_header {
            flags |= codec::Flags::GLOBAL_HEADER;
        }
        let mut dict = Dictionary::new();
        dict.set("threads", "1");
        match opts.quality {
            Quality::QScale(q) => {
                // A fixed quantiser: the QSCALE flag alone takes the quantiser from each frame's
                // `quality` field, so pin qmin = qmax as well.
                flags |= codec::Flags::QSCALE;
                enc.set_quality((u32::from(q) * QP2LAMBDA) as usize);
                dict.set("qmin", &q.to_string());
                dict.set("qmax", &q.to_string());
            }
            Quality::Bitrate(b) => enc.set_bit_rate(b as usize),
        }
        enc.set_flags(flags);
        if let Some((num, den)) = container.sample_aspect {
            enc.set_aspect_ratio(Rational::new(num, den));
        }
        let encoder = enc
            .open_as_with(codec, dict)
            .map_err(ff("opening the mpeg4 encoder"))?;

        let mut stream = output.add_stream(codec).map_err(ff("adding the stream"))?;
        stream.set_parameters(&encoder);
        stream.set_time_base(time_base);
        if let Some(degrees) = container.rotate {
            add_display_matrix(&mut stream, degrees).map_err(fail)?;
        }
        let mut header_opts = Dictionary::new();
        if opts.faststart {
            header_opts.set("movflags", "+faststart");
        }
        output
            .write_header_with(header_opts)
            .map_err(ff("writing the header"))?;
        let stream_time_base = output
            .stream(0)
            .map(|s| s.time_base())
            .ok_or_else(|| fail("the muxer lost its stream".into()))?;
        let scaler = scaling::Context::get(
            format::Pixel::RGB24,
            width as u32,
            height as u32,
            format::Pixel::YUV420P,
            width as u32,
            height as u32,
            scaling::Flags::BILINEAR,
        )
        .map_err(ff("creating the colour converter"))?;
        Ok(Self {
            path: path.to_path_buf(),
            output,
            encoder,
            scaler,
            rgb: frame::Video::new(format::Pixel::RGB24, width as u32, height as u32),
            packet: Packet::empty(),
            width,
            height,
            frames: 0,
            encoder_time_base: time_base,
            stream_time_base,
        })
    }

    fn error(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::ClipEncode {
            path: self.path.clone(),
            reason: format!("{what}: {e}"),
        }
    }

    /// Appends one frame of `height·width·3` RGB bytes.
    pub fn push(&mut self, rgb: &[u8]) -> Result<()> {
        let row = self.width * 3;
        if rgb.len() != row * self.height {
            return Err(self.error(
                "frame size",
                format!(
                    "got {} bytes, a {}×{} RGB frame has {}",
                    rgb.len(),
                    self.width,
                    self.height,
                    row * self.height
                ),
            ));
        }
        let stride = self.rgb.stride(0);
        let dst = self.rgb.data_mut(0);
        for (y, src) in rgb.chunks_exact(row).enumerate() {
            dst[y * stride..y * stride + row].copy_from_slice(src);
        }
        // A fresh YUV frame each time: the encoder may keep a reference to the frame it was sent,
        // so overwriting a reused one could change a picture it has not finished with.
        let mut yuv = frame::Video::empty();
        self.scaler
            .run(&self.rgb, &mut yuv)
            .map_err(|e| self.error("converting to YUV", e))?;
        yuv.set_pts(Some(self.frames));
        self.encoder
            .send_frame(&yuv)
            .map_err(|e| self.error(&format!("encoding frame {}", self.frames), e))?;
        self.frames += 1;
        self.write_packets()
    }

    fn write_packets(&mut self) -> Result<()> {
        loop {
            match self.encoder.receive_packet(&mut self.packet) {
                Ok(()) => {
                    self.packet.set_stream(0);
                    // Without a duration the muxer's edit list drops the last frame.
                    self.packet.set_duration(1);
                    self.packet
                        .rescale_ts(self.encoder_time_base, self.stream_time_base);
                    self.packet
                        .write_interleaved(&mut self.output)
                        .map_err(|e| self.error("writing a packet", e))?;
                }
                Err(ffmpeg_next::Error::Eof) => return Ok(()),
                Err(ffmpeg_next::Error::Other { errno })
                    if errno == ffmpeg_next::util::error::EAGAIN =>
                {
                    return Ok(());
                }
                Err(e) => return Err(self.error("receiving a packet", e)),
            }
        }
    }

    /// Frames pushed so far.
    pub fn frames(&self) -> usize {
        self.frames as usize
    }

    /// Drains the encoder, writes the index and closes the file; returns the file's size in bytes.
    pub fn finish(mut self) -> Result<u64> {
        if self.frames == 0 {
            return Err(self.error("finishing", "no frames were written"));
        }
        self.encoder
            .send_eof()
            .map_err(|e| self.error("flushing the encoder", e))?;
        self.write_packets()?;
        self.output
            .write_trailer()
            .map_err(|e| self.error("writing the index", e))?;
        let path = self.path.clone();
        drop(self);
        std::fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|source| Error::Io {
                action: "reading the size of",
                path,
                source,
            })
    }
}

/// Encodes all of `frames` into an MP4 file at `path`; returns its size in bytes.
pub fn encode_mp4(path: &Path, frames: &Frames, opts: &EncodeOptions) -> Result<u64> {
    let mut writer = Mp4Writer::create(path, frames.w, frames.h, opts)?;
    for i in 0..frames.t {
        writer.push(frames.frame(i))?;
    }
    writer.finish()
}

/// Writes one `height × width` RGB frame as a baseline JPEG (FFmpeg's `mjpeg` encoder, 4:2:0,
/// full range); `qscale` 1 (best) to 31, 2–5 is visually lossless.
pub fn write_jpeg(path: &Path, rgb: &[u8], width: usize, height: usize, qscale: u8) -> Result<()> {
    init();
    let fail = |reason: String| Error::ClipEncode {
        path: path.to_path_buf(),
        reason,
    };
    if width == 0 || height == 0 || rgb.len() != width * height * 3 {
        return Err(fail(format!(
            "got {} bytes for a {width}×{height} RGB frame",
            rgb.len()
        )));
    }
    if !(1..=31).contains(&qscale) {
        return Err(fail(format!("qscale must be in 1..=31, got {qscale}")));
    }
    let codec = encoder::find(codec::Id::MJPEG).ok_or(Error::CodecUnavailable {
        codec: "mjpeg",
        role: "encoder",
    })?;
    let mut enc = codec::context::Context::new_with_codec(codec)
        .encoder()
        .video()
        .map_err(|e| fail(format!("configuring the encoder: {e}")))?;
    enc.set_width(width as u32);
    enc.set_height(height as u32);
    enc.set_format(format::Pixel::YUVJ420P);
    enc.set_time_base(Rational::new(1, 25));
    enc.set_flags(codec::Flags::QSCALE);
    enc.set_quality((u32::from(qscale) * QP2LAMBDA) as usize);
    let mut dict = Dictionary::new();
    dict.set("qmin", &qscale.to_string());
    dict.set("qmax", &qscale.to_string());
    let mut encoder = enc
        .open_as_with(codec, dict)
        .map_err(|e| fail(format!("opening the mjpeg encoder: {e}")))?;
    let mut src = frame::Video::new(format::Pixel::RGB24, width as u32, height as u32);
    let stride = src.stride(0);
    let row = width * 3;
    let dst = src.data_mut(0);
    for (y, line) in rgb.chunks_exact(row).enumerate() {
        dst[y * stride..y * stride + row].copy_from_slice(line);
    }
    let mut scaler = scaling::Context::get(
        format::Pixel::RGB24,
        width as u32,
        height as u32,
        format::Pixel::YUVJ420P,
        width as u32,
        height as u32,
        scaling::Flags::BILINEAR,
    )
    .map_err(|e| fail(format!("creating the colour converter: {e}")))?;
    let mut yuv = frame::Video::empty();
    scaler
        .run(&src, &mut yuv)
        .map_err(|e| fail(format!("converting to YUV: {e}")))?;
    yuv.set_pts(Some(0));
    let mut packet = Packet::empty();
    encoder
        .send_frame(&yuv)
        .and_then(|()| encoder.send_eof())
        .and_then(|()| encoder.receive_packet(&mut packet))
        .map_err(|e| fail(format!("encoding: {e}")))?;
    let data = packet
        .data()
        .ok_or_else(|| fail("the encoder produced no data".into()))?;
    std::fs::write(path, data).map_err(|source| Error::Io {
        action: "writing",
        path: path.to_path_buf(),
        source,
    })
}
