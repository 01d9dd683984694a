//! Decoding only the frames a view needs: [`Clip`] for video files and in-memory videos (clips
//! arrive from object storage as bytes), [`FrameFolder`] for folders of `img_%05d.jpg` frames.
//!
//! A [`Clip`] demuxes every packet of its video stream when it is opened (compressed data, about
//! a megabyte for a 150-frame 256² clip) and checks their number against the container's frame
//! count: `Input::packets()` of ffmpeg-next ends silently on I/O errors, so a truncated clip would
//! otherwise just look short. Frame `i` is the `i`-th frame in presentation order. Decoding then
//! feeds packets from memory; it jumps to the keyframe before a requested frame only when the
//! decoder has not already passed that keyframe (jumping before every frame costs 4× on clips
//! with sparse keyframes), and it sends end-of-stream once the packets run out so the decoder
//! hands over its last frames.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ffmpeg_next::{
    Packet, codec, decoder, format, format::context::StreamIo, frame, media, software::scaling,
};

use super::{ClipInfo, Frames, init};
use crate::{Error, Result};

/// An open video clip, ready to decode frames by index. One decoder thread; run one `Clip` per
/// worker thread to use several cores.
pub struct Clip {
    uri: String,
    info: ClipInfo,
    /// The video stream's packets in decode order.
    packets: Vec<Packet>,
    /// Presentation index of each packet.
    packet_index: Vec<usize>,
    /// Packet positions of keyframes, ascending.
    keyframes: Vec<usize>,
    /// Every packet's timestamp in presentation order; empty when the stream lacks distinct
    /// timestamps, in which case frames are numbered in decode order.
    sorted_ts: Vec<i64>,
    decoder: decoder::Video,
    rgb: RgbConverter,
    /// Clockwise display rotation the container asks for: 0, 90, 180 or 270 degrees.
    rotation: u32,
    /// Size of a converted frame before rotation: the coded size with the sample aspect ratio
    /// applied to the width.
    upright: (usize, usize),
    /// Converted frame before rotation (rotated clips only).
    scratch: Vec<u8>,
    decoded: frame::Video,
    /// Next packet to send.
    next_packet: usize,
    eof_sent: bool,
    /// Index of the last frame received from the decoder.
    last_index: Option<usize>,
    /// Decode-order numbering (streams without timestamps): index of the next frame out.
    next_count: usize,
    /// Packets sent to the decoder since the clip was opened (seeking shows up here).
    packets_sent: usize,
}

impl std::fmt::Debug for Clip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clip")
            .field("uri", &self.uri)
            .field("info", &self.info)
            .field("keyframes", &self.keyframes.len())
            .finish_non_exhaustive()
    }
}

impl Clip {
    /// Opens a video file.
    pub fn open(path: &Path) -> Result<Self> {
        init();
        let uri = path.display().to_string();
        let input = format::input(path).map_err(|e| decode_error(&uri, format!("opening: {e}")))?;
        Self::from_input(uri, input)
    }

    /// Opens a clip held in memory (for example an object fetched from storage); `uri` names it
    /// in errors and its extension helps format detection. Reads go through a custom AVIO
    /// context over the buffer: nothing touches the file system.
    pub fn from_bytes<B>(uri: &str, bytes: B) -> Result<Self>
    where
        B: AsRef<[u8]> + Send + 'static,
    {
        init();
        let io = StreamIo::from_read_seek(Cursor::new(bytes))
            .map_err(|e| decode_error(uri, format!("setting up in-memory reading: {e}")))?;
        let input = format::input_from_stream(io, Some(uri), None)
            .map_err(|e| decode_error(uri, format!("opening: {e}")))?;
        Self::from_input(uri.to_string(), input)
    }

    fn from_input(uri: String, mut input: format::context::Input) -> Result<Self> {
        let err = |reason: String| decode_error(&uri, reason);
        let stream = input
            .streams()
            .best(media::Type::Video)
            .ok_or_else(|| err("no video stream".into()))?;
        let stream_index = stream.index();
        let declared = stream.frames();
        let rotation = display_rotation(&stream).map_err(&err)?;
        let rate = [stream.avg_frame_rate(), stream.rate()]
            .into_iter()
            .find(|r| r.numerator() > 0 && r.denominator() > 0);
        let mut ctx = codec::context::Context::from_parameters(stream.parameters())
            .map_err(|e| err(format!("reading codec parameters: {e}")))?;
        ctx.set_threading(codec::threading::Config::count(1));
        let decoder = ctx.decoder().video().map_err(|e| match e {
            ffmpeg_next::Error::DecoderNotFound => {
                err("this FFmpeg build has no decoder for its codec".into())
            }
            e => err(format!("opening the decoder: {e}")),
        })?;

        let mut packets = Vec::with_capacity(declared.max(0) as usize);
        loop {
            let mut packet = Packet::empty();
            match packet.read(&mut input) {
                Ok(()) if packet.stream() == stream_index => {
                    if packet.is_corrupt() {
                        return Err(err(format!(
                            "packet {} is corrupt (truncated file?)",
                            packets.len()
                        )));
                    }
                    packets.push(packet);
                }
                Ok(()) => {}
                Err(ffmpeg_next::Error::Eof) => break,
                Err(e) => {
                    return Err(err(format!(
                        "reading packet {} of {declared}: {e}",
                        packets.len()
                    )));
                }
            }
        }
        if packets.is_empty() {
            return Err(err("the video stream holds no frames".into()));
        }
        if declared > 0 && packets.len() as i64 != declared {
            return Err(err(format!(
                "the container declares {declared} frames but holds {} (truncated or corrupt)",
                packets.len()
            )));
        }

        let timestamps: Option<Vec<i64>> = packets.iter().map(|p| p.pts().or(p.dts())).collect();
        let mut sorted_ts = timestamps.clone().unwrap_or_default();
        sorted_ts.sort_unstable();
        let distinct = sorted_ts.windows(2).all(|w| w[0] < w[1]);
        let packet_index: Vec<usize> = match timestamps {
            Some(ts) if distinct => ts
                .iter()
                .map(|t| sorted_ts.partition_point(|s| s < t))
                .collect(),
            _ => {
                sorted_ts.clear();
                (0..packets.len()).collect()
            }
        };
        let keyframes: Vec<usize> = (0..packets.len())
            .filter(|&i| packets[i].is_key())
            .collect();
        if keyframes.first() != Some(&0) {
            return Err(err("the video stream does not start with a keyframe".into()));
        }
        let frames = packets.len();
        let fps = match rate {
            Some(r) => f64::from(r.numerator()) / f64::from(r.denominator()),
            None => 0.0,
        };
        let (coded_w, coded_h) = (decoder.width() as usize, decoder.height() as usize);
        if coded_w == 0 || coded_h == 0 {
            return Err(err("the video stream has no frame size".into()));
        }
        // Non-square pixels: the width is resampled to the display aspect ratio, like players
        // (and FFmpeg's own `scale=iw*sar:ih`) show the clip.
        let sar = decoder.aspect_ratio();
        let upright_w = if sar.numerator() > 0
            && sar.denominator() > 0
            && sar.numerator() != sar.denominator()
        {
            let w = (coded_w as f64 * f64::from(sar.numerator()) / f64::from(sar.denominator()))
                .round() as usize;
            tracing::debug!(uri = %uri, sar = %format!("{}:{}", sar.numerator(), sar.denominator()), coded_w, w, "non-square pixels: width resampled");
            w.max(1)
        } else {
            coded_w
        };
        let upright = (upright_w, coded_h);
        let (width, height) = if rotation % 180 == 90 {
            (upright.1, upright.0)
        } else {
            upright
        };
        let info = ClipInfo {
            frames,
            fps,
            width,
            height,
        };
        Ok(Self {
            uri,
            info,
            packets,
            packet_index,
            keyframes,
            sorted_ts,
            decoder,
            rgb: RgbConverter::default(),
            rotation,
            upright,
            scratch: Vec::new(),
            decoded: frame::Video::empty(),
            next_packet: 0,
            eof_sent: false,
            last_index: None,
            next_count: 0,
            packets_sent: 0,
        })
    }

    /// Frame count, frame rate and size.
    pub fn info(&self) -> ClipInfo {
        self.info
    }

    /// The clip's name in errors.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Packets handed to the decoder so far: the decoding work done, for benchmarks and tests.
    pub fn packets_sent(&self) -> usize {
        self.packets_sent
    }

    /// Decodes frames `indices` (ascending, repeats allowed) into a new [`Frames`].
    pub fn decode(&mut self, indices: &[usize]) -> Result<Frames> {
        let mut out = Frames::default();
        self.decode_into(indices, &mut out)?;
        Ok(out)
    }

    /// Decodes every frame.
    pub fn decode_all(&mut self) -> Result<Frames> {
        let all: Vec<usize> = (0..self.info.frames).collect();
        self.decode(&all)
    }

    /// Decodes frames `indices` (ascending, repeats allowed) into `out`, reusing its allocation;
    /// `out` becomes `indices.len() × height × width`.
    pub fn decode_into(&mut self, indices: &[usize], out: &mut Frames) -> Result<()> {
        check_indices(indices, self.info.frames)?;
        out.reshape(indices.len(), self.info.height, self.info.width);
        for (slot, &target) in indices.iter().enumerate() {
            if slot > 0 && indices[slot - 1] == target {
                let n = out.frame_len();
                out.data.copy_within((slot - 1) * n..slot * n, slot * n);
                continue;
            }
            self.position_for(target);
            self.receive(target, out.frame_mut(slot))?;
        }
        Ok(())
    }

    /// Jumps to the keyframe before `target` when the decoder cannot reach `target` by going
    /// forward (it is already past it) or when it has not yet reached that keyframe.
    fn position_for(&mut self, target: usize) {
        // The last keyframe (in decode order) whose frame is not after `target`.
        let key = self
            .keyframes
            .iter()
            .rev()
            .copied()
            .find(|&k| self.packet_index[k] <= target)
            .unwrap_or(0);
        let behind = self.last_index.is_some_and(|last| last >= target);
        if behind || key > self.next_packet {
            self.decoder.flush();
            self.next_packet = key;
            self.eof_sent = false;
            self.last_index = None;
            self.next_count = self.packet_index[key];
        }
    }

    /// Runs the decoder until frame `target` comes out and writes it into `dst` as RGB.
    fn receive(&mut self, target: usize, dst: &mut [u8]) -> Result<()> {
        loop {
            match self.decoder.receive_frame(&mut self.decoded) {
                Ok(()) => {
                    let index = self.frame_index()?;
                    self.last_index = Some(index);
                    if index == target {
                        if self.decoded.is_corrupt() || self.decoded.has_decode_errors() {
                            return Err(self.error(format!("frame {index} decoded with errors")));
                        }
                        let (w, h) = self.upright;
                        let rotation = self.rotation;
                        let target_buf = if rotation == 0 {
                            &mut *dst
                        } else {
                            self.scratch.resize(w * h * 3, 0);
                            &mut self.scratch[..]
                        };
                        self.rgb
                            .convert(&self.decoded, w, h, target_buf)
                            .map_err(|reason| {
                                decode_error(&self.uri, format!("frame {index}: {reason}"))
                            })?;
                        if rotation != 0 {
                            rotate_rgb(&self.scratch, w, h, rotation, dst);
                        }
                        return Ok(());
                    }
                    if index > target {
                        return Err(self.error(format!(
                            "frame {target} never came out of the decoder (next was {index})"
                        )));
                    }
                }
                Err(ffmpeg_next::Error::Other { errno })
                    if errno == ffmpeg_next::util::error::EAGAIN =>
                {
                    if self.next_packet < self.packets.len() {
                        let n = self.next_packet;
                        self.next_packet += 1;
                        self.packets_sent += 1;
                        self.decoder
                            .send_packet(&self.packets[n])
                            .map_err(|e| self.error(format!("decoding packet {n}: {e}")))?;
                    } else if !self.eof_sent {
                        self.eof_sent = true;
                        self.decoder
                            .send_eof()
                            .map_err(|e| self.error(format!("draining the decoder: {e}")))?;
                    } else {
                        return Err(self.error("the decoder stalled after end of stream".into()));
                    }
                }
                Err(ffmpeg_next::Error::Eof) => {
                    return Err(self.error(format!(
                        "frame {target} requested, but the decoder ended after frame {:?} of {} (corrupt clip?)",
                        self.last_index, self.info.frames
                    )));
                }
                Err(e) => return Err(self.error(format!("decoding frame {target}: {e}"))),
            }
        }
    }

    /// Presentation index of the frame just decoded.
    fn frame_index(&mut self) -> Result<usize> {
        if self.sorted_ts.is_empty() {
            let i = self.next_count;
            self.next_count += 1;
            return Ok(i);
        }
        let ts = self
            .decoded
            .pts()
            .or_else(|| self.decoded.timestamp())
            .ok_or_else(|| self.error("a decoded frame has no timestamp".into()))?;
        self.sorted_ts.binary_search(&ts).map_err(|_| {
            self.error(format!(
                "a decoded frame has timestamp {ts}, which no packet carries"
            ))
        })
    }

    fn error(&self, reason: String) -> Error {
        decode_error(&self.uri, reason)
    }
}

/// The clockwise display rotation (0, 90, 180 or 270 degrees) a video stream's container asks
/// for: its display matrix (`AV_PKT_DATA_DISPLAYMATRIX`, what MP4/MOV `tkhd` matrices become),
/// else an old-style `rotate` tag. Rotations that are not a multiple of 90° and mirrored
/// matrices are refused (a clip shown differently from what we would train on).
fn display_rotation(stream: &format::stream::Stream<'_>) -> std::result::Result<u32, String> {
    let matrix = stream.side_data().find_map(|sd| {
        (sd.kind() == codec::packet::side_data::Type::DisplayMatrix && sd.data().len() >= 36).then(
            || {
                let d = sd.data();
                let mut m = [0i32; 9];
                for (i, v) in m.iter_mut().enumerate() {
                    *v = i32::from_ne_bytes([d[4 * i], d[4 * i + 1], d[4 * i + 2], d[4 * i + 3]]);
                }
                m
            },
        )
    });
    let degrees = if let Some(m) = matrix {
        // libavutil's av_display_rotation_get (16.16 fixed point), negated: clockwise.
        let fp = |x: i32| f64::from(x) / 65536.0;
        let scale0 = fp(m[0]).hypot(fp(m[3]));
        let scale1 = fp(m[1]).hypot(fp(m[4]));
        if scale0 == 0.0 || scale1 == 0.0 {
            return Err("the container's display matrix is degenerate".into());
        }
        let det = fp(m[0]) * fp(m[4]) - fp(m[1]) * fp(m[3]);
        if det < 0.0 {
            return Err(
                "the container asks for a mirrored display (display matrix with a flip), which endofm does not apply: re-encode the clip as it should be seen".into(),
            );
        }
        (fp(m[1]) / scale1).atan2(fp(m[0]) / scale0).to_degrees()
    } else if let Some(tag) = stream.metadata().get("rotate") {
        tag.trim()
            .parse::<f64>()
            .map_err(|_| format!("the container's `rotate` tag `{tag}` is not a number"))?
    } else {
        return Ok(0);
    };
    let norm = degrees.rem_euclid(360.0);
    let quarter = (norm / 90.0).round();
    if (norm - quarter * 90.0).abs() > 1.0 {
        return Err(format!(
            "the container asks for a display rotation of {norm:.1}°, which endofm does not apply (only multiples of 90°): re-encode the clip upright"
        ));
    }
    Ok((quarter as u32 % 4) * 90)
}

/// Rotates a packed RGB frame `w × h` clockwise by `degrees` (90, 180 or 270) into `dst`
/// (`h × w` for 90 and 270).
fn rotate_rgb(src: &[u8], w: usize, h: usize, degrees: u32, dst: &mut [u8]) {
    let px = |x: usize, y: usize| &src[(y * w + x) * 3..(y * w + x) * 3 + 3];
    match degrees {
        90 => {
            // Output w' = h, h' = w: dst(x', y') = src(y', h − 1 − x').
            for y2 in 0..w {
                for x2 in 0..h {
                    let o = (y2 * h + x2) * 3;
                    dst[o..o + 3].copy_from_slice(px(y2, h - 1 - x2));
                }
            }
        }
        180 => {
            for y in 0..h {
                for x in 0..w {
                    let o = (y * w + x) * 3;
                    dst[o..o + 3].copy_from_slice(px(w - 1 - x, h - 1 - y));
                }
            }
        }
        270 => {
            // dst(x', y') = src(w − 1 − y', x').
            for y2 in 0..w {
                for x2 in 0..h {
                    let o = (y2 * h + x2) * 3;
                    dst[o..o + 3].copy_from_slice(px(w - 1 - y2, x2));
                }
            }
        }
        _ => dst[..src.len()].copy_from_slice(src),
    }
}

fn decode_error(uri: &str, reason: String) -> Error {
    Error::ClipDecode {
        uri: uri.to_string(),
        reason,
    }
}

fn check_indices(indices: &[usize], frames: usize) -> Result<()> {
    if let Some(w) = indices.windows(2).find(|w| w[0] > w[1]) {
        return Err(Error::Input {
            name: "frame indices".into(),
            reason: format!("must be ascending, got {} before {}", w[0], w[1]),
        });
    }
    match indices.last() {
        Some(&last) if last >= frames => Err(Error::Input {
            name: "frame indices".into(),
            reason: format!("frame {last} requested from a clip of {frames} frames"),
        }),
        _ => Ok(()),
    }
}

/// Decoded pictures → packed RGB24, with one reused scaler and output frame.
#[derive(Default)]
struct RgbConverter {
    scaler: Option<scaling::Context>,
    rgb: Option<frame::Video>,
}

impl RgbConverter {
    /// Converts `src` into `dst` (`height·width·3` bytes), resampling its width to `width` (non-square
    /// pixels); its height must be `height`.
    fn convert(
        &mut self,
        src: &frame::Video,
        width: usize,
        height: usize,
        dst: &mut [u8],
    ) -> std::result::Result<(), String> {
        if src.height() as usize != height {
            return Err(format!(
                "size {}×{} differs from the clip's (height {height})",
                src.width(),
                src.height()
            ));
        }
        let stale = self.scaler.as_ref().is_none_or(|s| {
            let i = s.input();
            let o = s.output();
            i.format != src.format()
                || i.width != src.width()
                || i.height != src.height()
                || o.width as usize != width
        });
        if stale {
            // Bilinear chroma upsampling and the default BT.601 limited-range matrix: what
            // PyAV's `to_ndarray(format="rgb24")` does, so frames match the reference loader.
            let scaler = scaling::Context::get(
                src.format(),
                src.width(),
                src.height(),
                format::Pixel::RGB24,
                width as u32,
                src.height(),
                scaling::Flags::BILINEAR,
            )
            .map_err(|e| format!("cannot convert {:?} to RGB: {e}", src.format()))?;
            self.scaler = Some(scaler);
            self.rgb = None;
        }
        let (Some(scaler), rgb) = (self.scaler.as_mut(), &mut self.rgb) else {
            return Err("internal: no colour converter".into());
        };
        let rgb = rgb.get_or_insert_with(frame::Video::empty);
        scaler
            .run(src, rgb)
            .map_err(|e| format!("converting to RGB: {e}"))?;
        let row = width * 3;
        let stride = rgb.stride(0);
        let data = rgb.data(0);
        for (y, line) in dst.chunks_exact_mut(row).take(height).enumerate() {
            line.copy_from_slice(&data[y * stride..y * stride + row]);
        }
        Ok(())
    }
}

/// A folder of JPEG frames `img_00001.jpg`, `img_00002.jpg`, … (the reference's other clip
/// layout; numbering may start at 0 or 1 but must have no gaps), decoded with FFmpeg's `mjpeg`.
pub struct FrameFolder {
    dir: PathBuf,
    first: usize,
    count: usize,
    decoder: decoder::Video,
    rgb: RgbConverter,
    decoded: frame::Video,
    size: Option<(usize, usize)>,
}

impl std::fmt::Debug for FrameFolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameFolder")
            .field("dir", &self.dir)
            .field("first", &self.first)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl FrameFolder {
    /// Lists the frames of `dir`; reads no image yet.
    pub fn open(dir: &Path) -> Result<Self> {
        init();
        let uri = dir.display().to_string();
        let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
            action: "listing frames in",
            path: dir.to_path_buf(),
            source,
        })?;
        let mut numbers = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| Error::Io {
                action: "listing frames in",
                path: dir.to_path_buf(),
                source,
            })?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let number = name
                .strip_prefix("img_")
                .and_then(|s| s.strip_suffix(".jpg"))
                .filter(|s| s.len() >= 5 && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<usize>().ok());
            if let Some(n) = number {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();
        let (Some(&first), Some(&last)) = (numbers.first(), numbers.last()) else {
            return Err(decode_error(&uri, "no img_NNNNN.jpg frames".into()));
        };
        if last - first + 1 != numbers.len() {
            return Err(decode_error(
                &uri,
                format!(
                    "frames img_{first:05}.jpg … img_{last:05}.jpg have gaps ({} files)",
                    numbers.len()
                ),
            ));
        }
        let codec = decoder::find(codec::Id::MJPEG).ok_or(Error::CodecUnavailable {
            codec: "mjpeg",
            role: "decoder",
        })?;
        let mut ctx = codec::context::Context::new_with_codec(codec);
        ctx.set_threading(codec::threading::Config::count(1));
        let decoder = ctx
            .decoder()
            .video()
            .map_err(|e| decode_error(&uri, format!("opening the mjpeg decoder: {e}")))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            first,
            count: numbers.len(),
            decoder,
            rgb: RgbConverter::default(),
            decoded: frame::Video::empty(),
            size: None,
        })
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the folder has no frames (never true for an opened folder).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Decodes frames `indices` (0-based, ascending, repeats allowed) into a new [`Frames`].
    pub fn decode(&mut self, indices: &[usize]) -> Result<Frames> {
        let mut out = Frames::default();
        self.decode_into(indices, &mut out)?;
        Ok(out)
    }

    /// Decodes frames `indices` into `out`, reusing its allocation. All frames must share one size.
    pub fn decode_into(&mut self, indices: &[usize], out: &mut Frames) -> Result<()> {
        check_indices(indices, self.count)?;
        let mut shaped = false;
        for (slot, &index) in indices.iter().enumerate() {
            if slot > 0 && indices[slot - 1] == index {
                let n = out.frame_len();
                out.data.copy_within((slot - 1) * n..slot * n, slot * n);
                continue;
            }
            let path = self.dir.join(format!("img_{:05}.jpg", self.first + index));
            let uri = path.display().to_string();
            self.decode_file(&path, &uri)?;
            let (w, h) = (
                self.decoded.width() as usize,
                self.decoded.height() as usize,
            );
            match self.size {
                None => self.size = Some((w, h)),
                Some(size) if size != (w, h) => {
                    return Err(decode_error(
                        &uri,
                        format!(
                            "size {w}×{h} differs from the folder's {}×{}",
                            size.0, size.1
                        ),
                    ));
                }
                Some(_) => {}
            }
            if !shaped {
                out.reshape(indices.len(), h, w);
                shaped = true;
            }
            self.rgb
                .convert(&self.decoded, w, h, out.frame_mut(slot))
                .map_err(|reason| decode_error(&uri, reason))?;
        }
        if indices.is_empty() {
            out.reshape(0, 0, 0);
        }
        Ok(())
    }

    fn decode_file(&mut self, path: &Path, uri: &str) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            action: "reading frame",
            path: path.to_path_buf(),
            source,
        })?;
        let packet = Packet::copy(&bytes);
        self.decoder
            .send_packet(&packet)
            .map_err(|e| decode_error(uri, format!("decoding JPEG: {e}")))?;
        let received = match self.decoder.receive_frame(&mut self.decoded) {
            Err(ffmpeg_next::Error::Other { errno })
                if errno == ffmpeg_next::util::error::EAGAIN =>
            {
                // A decoder that holds the picture back: drain it, then reset it for the next file.
                let drained = self
                    .decoder
                    .send_eof()
                    .and_then(|()| self.decoder.receive_frame(&mut self.decoded));
                self.decoder.flush();
                drained
            }
            other => other,
        };
        received.map_err(|e| decode_error(uri, format!("decoding JPEG: {e}")))?;
        if self.decoded.is_corrupt() || self.decoded.has_decode_errors() {
            return Err(decode_error(uri, "JPEG decoded with errors".into()));
        }
        Ok(())
    }
}

/// Throughput of [`bench_decode`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct DecodeBench {
    /// Clips opened and decoded.
    pub clips: usize,
    /// Frames decoded in all.
    pub frames: usize,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Clips per second on this thread.
    pub clips_per_s: f64,
    /// Frames per second on this thread.
    pub frames_per_s: f64,
}

/// Benchmark hook: opens the in-memory clip `bytes` `repeats` times on the calling thread and
/// decodes `indices` each time (`None`: every frame) into one reused buffer, as a data loader
/// would. Run it on several threads to measure scaling.
pub fn bench_decode(
    uri: &str,
    bytes: &Arc<[u8]>,
    indices: Option<&[usize]>,
    repeats: usize,
) -> Result<DecodeBench> {
    let mut out = Frames::default();
    let mut all = Vec::new();
    let started = Instant::now();
    let mut frames = 0;
    for _ in 0..repeats {
        let mut clip = Clip::from_bytes(uri, Arc::clone(bytes))?;
        let wanted = match indices {
            Some(i) => i,
            None => {
                all.clear();
                all.extend(0..clip.info().frames);
                &all
            }
        };
        clip.decode_into(wanted, &mut out)?;
        frames += wanted.len();
    }
    let seconds = started.elapsed().as_secs_f64();
    let rate = |n: usize| {
        if seconds > 0.0 {
            n as f64 / seconds
        } else {
            0.0
        }
    };
    Ok(DecodeBench {
        clips: repeats,
        frames,
        seconds,
        clips_per_s: rate(repeats),
        frames_per_s: rate(frames),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::video::encode::{
        Container, EncodeOptions, Mp4Writer, Quality, encode_mp4, write_jpeg,
    };

    /// Writes `frames` into `path` in `container`.
    fn encode_in(path: &Path, frames: &Frames, container: &Container) {
        let opts = EncodeOptions {
            quality: Quality::QScale(2),
            ..EncodeOptions::default()
        };
        let mut w = Mp4Writer::create_in(path, frames.w, frames.h, &opts, container)
            .expect("creating the clip");
        for i in 0..frames.t {
            w.push(frames.frame(i)).expect("encoding");
        }
        w.finish().expect("finishing");
    }

    #[test]
    fn containers_are_recognised_by_content_and_display_metadata_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let frames = test_frames(4, 32, 48);
        let plain = dir.path().join("plain.mp4");
        encode_in(&plain, &frames, &Container::default());
        let reference = Clip::open(&plain)
            .expect("open")
            .decode_all()
            .expect("decode");
        // Every container FFmpeg reads, whatever the name (no extension, a wrong one).
        for (format, name) in [
            ("mpeg", "clip.mpg"),
            ("avi", "clip.avi"),
            ("matroska", "clip"),
            ("mp4", "clip.jpg"),
        ] {
            let path = dir.path().join(name);
            let container = Container {
                format: format.into(),
                ..Container::default()
            };
            encode_in(&path, &frames, &container);
            let bytes = std::fs::read(&path).expect("read");
            let mut clip = Clip::from_bytes("memory", bytes).expect(format);
            assert_eq!(clip.info().frames, 4, "{format}");
            let got = clip.decode_all().expect(format);
            assert_eq!((got.h, got.w), (32, 48), "{format}");
            let (mean, _) = abs_error(&got.data, &reference.data);
            assert!(mean < 2.0, "{format}: differs from the MP4 by {mean}");
        }
        // A display rotation of 90°: frames come out as shown (portrait), the pixels rotated.
        let rotated = dir.path().join("rotated.mp4");
        encode_in(
            &rotated,
            &frames,
            &Container {
                rotate: Some(90),
                ..Container::default()
            },
        );
        let mut clip = Clip::open(&rotated).expect("open");
        assert_eq!((clip.info().width, clip.info().height), (32, 48));
        let got = clip.decode_all().expect("decode");
        assert_eq!((got.w, got.h), (32, 48));
        let mut expected = vec![0; reference.frame_len()];
        rotate_rgb(reference.frame(1), 48, 32, 90, &mut expected);
        assert!(got.frame(1) == &expected[..], "not rotated 90° clockwise");
        // Non-square pixels (2:1): the width doubles, as players show it.
        let wide = dir.path().join("wide.mp4");
        encode_in(
            &wide,
            &frames,
            &Container {
                sample_aspect: Some((2, 1)),
                ..Container::default()
            },
        );
        let mut clip = Clip::open(&wide).expect("open");
        assert_eq!((clip.info().width, clip.info().height), (96, 32));
        let got = clip.decode(&[0]).expect("decode");
        let (x, y) = (60, 20);
        let px = |f: &Frames, x: usize, y: usize| f.frame(0)[(y * f.w + x) * 3];
        assert!(px(&got, x, y).abs_diff(px(&reference, x / 2, y)) <= 6);
    }

    #[test]
    fn rotations_are_exact_permutations() {
        // 3 × 2 frame, pixel value = index.
        let src: Vec<u8> = (0..6u8).flat_map(|v| [v, v, v]).collect();
        let mut dst = vec![0; 18];
        rotate_rgb(&src, 3, 2, 90, &mut dst);
        // Rows of the source: [0 1 2] / [3 4 5]; clockwise: [3 0] / [4 1] / [5 2].
        let got: Vec<u8> = dst.chunks(3).map(|p| p[0]).collect();
        assert_eq!(got, [3, 0, 4, 1, 5, 2]);
        rotate_rgb(&src, 3, 2, 270, &mut dst);
        let got: Vec<u8> = dst.chunks(3).map(|p| p[0]).collect();
        assert_eq!(got, [2, 5, 1, 4, 0, 3]);
        rotate_rgb(&src, 3, 2, 180, &mut dst);
        let got: Vec<u8> = dst.chunks(3).map(|p| p[0]).collect();
        assert_eq!(got, [5, 4, 3, 2, 1, 0]);
    }

    /// Smooth gradients plus a moving bright square: content whose per-pixel codec error is small.
    fn test_frames(t: usize, h: usize, w: usize) -> Frames {
        let mut f = Frames::new(t, h, w);
        for i in 0..t {
            let frame = f.frame_mut(i);
            for y in 0..h {
                for x in 0..w {
                    let p = &mut frame[(y * w + x) * 3..][..3];
                    p[0] = (40 + x * 150 / w + i * 2) as u8;
                    p[1] = (30 + y * 120 / h) as u8;
                    p[2] = (90 + (x + y) * 60 / (w + h)) as u8;
                    // A brighter square (luma only: 4:2:0 chroma cannot keep sharp colour edges).
                    let (sx, sy) = (4 + i % (w - 16), 6);
                    if (sx..sx + 12).contains(&x) && (sy..sy + 12).contains(&y) {
                        p.iter_mut().for_each(|c| *c = c.saturating_add(70));
                    }
                }
            }
        }
        f
    }

    fn abs_error(a: &[u8], b: &[u8]) -> (f64, u8) {
        let mut sum = 0u64;
        let mut max = 0u8;
        for (&x, &y) in a.iter().zip(b) {
            let d = x.abs_diff(y);
            sum += u64::from(d);
            max = max.max(d);
        }
        (sum as f64 / a.len() as f64, max)
    }

    fn encode_test_clip(dir: &Path, name: &str, frames: &Frames, opts: &EncodeOptions) -> PathBuf {
        let path = dir.join(name);
        let bytes = encode_mp4(&path, frames, opts).expect("encoding the test clip");
        assert!(bytes > 0);
        path
    }

    fn opts(q: u8, gop: u32) -> EncodeOptions {
        EncodeOptions {
            quality: Quality::QScale(q),
            gop,
            ..EncodeOptions::default()
        }
    }

    #[test]
    fn decoded_frames_match_the_encoder_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = test_frames(20, 48, 64);
        let path = encode_test_clip(dir.path(), "clip.mp4", &src, &opts(2, 12));
        let mut clip = Clip::open(&path).expect("opening");
        let info = clip.info();
        assert_eq!(
            (info.frames, info.width, info.height),
            (20, 64, 48),
            "{info:?}"
        );
        assert!((info.fps - 30.0).abs() < 1e-9, "{info:?}");
        let out = clip.decode_all().expect("decoding");
        assert_eq!((out.t, out.h, out.w), (20, 48, 64));
        for i in 0..out.t {
            let (mean, max) = abs_error(out.frame(i), src.frame(i));
            assert!(
                mean < 2.5 && max < 48,
                "frame {i}: mean abs error {mean:.3}, max {max} (limits 2.5, 48)"
            );
        }
        let (mean, max) = abs_error(&out.data, &src.data);
        assert!(
            mean < 2.0,
            "clip: mean abs error {mean:.3}, max {max} (limit 2)"
        );
        eprintln!("round trip at qscale 2: mean abs error {mean:.3}, max {max}");
    }

    #[test]
    fn selected_frames_equal_the_same_frames_of_a_full_decode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = test_frames(40, 32, 48);
        let path = encode_test_clip(dir.path(), "clip.mp4", &src, &opts(4, 5));
        let all = Clip::open(&path)
            .and_then(|mut c| c.decode_all())
            .expect("full decode");
        let mut clip = Clip::open(&path).expect("opening");
        let mut out = Frames::default();
        // Forward jumps across keyframes, repeats, then (same decoder) a jump backwards.
        for indices in [
            vec![0, 3, 3, 17, 18, 26, 39, 39],
            vec![1, 2, 30],
            vec![12],
            vec![],
        ] {
            clip.decode_into(&indices, &mut out)
                .expect("selective decode");
            assert_eq!(out.t, indices.len());
            for (slot, &i) in indices.iter().enumerate() {
                assert!(
                    out.frame(slot) == all.frame(i),
                    "indices {indices:?}: frame {i} differs from the full decode"
                );
            }
        }
    }

    #[test]
    fn decoder_seeks_only_when_it_saves_work() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = encode_test_clip(
            dir.path(),
            "clip.mp4",
            &test_frames(40, 16, 32),
            &opts(4, 5),
        );
        let mut clip = Clip::open(&path).expect("opening");
        // Frame 37: jump to the keyframe at 35 instead of decoding 0..=37.
        clip.decode(&[37]).expect("decoding");
        assert!(
            clip.packets_sent() <= 4,
            "sent {} packets for frame 37",
            clip.packets_sent()
        );
        // Frames 1 and 3 share the GOP starting at 0: one pass, no second seek.
        let mut clip = Clip::open(&path).expect("opening");
        clip.decode(&[1, 3, 4, 6]).expect("decoding");
        assert!(
            clip.packets_sent() <= 8,
            "sent {} packets for frames 1..=6",
            clip.packets_sent()
        );
    }

    #[test]
    fn in_memory_decode_equals_file_decode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = test_frames(10, 32, 32);
        let path = encode_test_clip(dir.path(), "clip.mp4", &src, &opts(3, 12));
        let from_file = Clip::open(&path)
            .and_then(|mut c| c.decode_all())
            .expect("file");
        let bytes = std::fs::read(&path).expect("reading");
        let mut clip = Clip::from_bytes("s3://bucket/clip.mp4", bytes).expect("opening bytes");
        assert_eq!(clip.info().frames, 10);
        assert_eq!(clip.decode_all().expect("decoding bytes"), from_file);
    }

    #[test]
    fn truncated_clips_are_errors_naming_the_clip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = test_frames(30, 32, 32);
        for faststart in [false, true] {
            let o = EncodeOptions {
                faststart,
                ..opts(2, 12)
            };
            let path = encode_test_clip(dir.path(), "full.mp4", &src, &o);
            let bytes = std::fs::read(&path).expect("reading");
            let mut keeps: Vec<usize> = (0..bytes.len()).step_by(bytes.len() / 20 + 1).collect();
            if faststart {
                // The last byte of the media data. (Without faststart the file ends in metadata
                // that the frames do not need.)
                keeps.push(bytes.len() - 1);
            }
            for keep in keeps {
                let cut = dir.path().join("cut.mp4");
                std::fs::write(&cut, &bytes[..keep]).expect("writing");
                let result = Clip::open(&cut).and_then(|mut c| c.decode_all());
                let Err(err) = result else {
                    panic!(
                        "faststart {faststart}: the first {keep} of {} bytes decoded",
                        bytes.len()
                    );
                };
                assert!(
                    matches!(&err, Error::ClipDecode { uri, .. } if uri.ends_with("cut.mp4")),
                    "faststart {faststart}, {keep} bytes: {err}"
                );
                let mem = Clip::from_bytes("mem://cut.mp4", bytes[..keep].to_vec())
                    .and_then(|mut c| c.decode_all());
                assert!(
                    mem.is_err(),
                    "faststart {faststart}, {keep} of {} bytes in memory",
                    bytes.len()
                );
            }
        }
    }

    #[test]
    fn garbage_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("garbage.mp4");
        let noise: Vec<u8> = (0..20_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(&path, &noise).expect("writing");
        let err = Clip::open(&path).expect_err("garbage must not open");
        assert!(err.to_string().contains("garbage.mp4"), "{err}");
        assert!(Clip::from_bytes("mem://garbage.mp4", noise).is_err());
        assert!(Clip::from_bytes("mem://empty.mp4", Vec::new()).is_err());
        assert!(Clip::open(&dir.path().join("missing.mp4")).is_err());
    }

    #[test]
    fn bad_indices_are_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = encode_test_clip(
            dir.path(),
            "clip.mp4",
            &test_frames(5, 16, 32),
            &opts(4, 12),
        );
        let mut clip = Clip::open(&path).expect("opening");
        assert!(matches!(clip.decode(&[3, 1]), Err(Error::Input { .. })));
        assert!(matches!(clip.decode(&[0, 5]), Err(Error::Input { .. })));
        assert_eq!(clip.decode(&[4]).expect("valid").t, 1);
    }

    #[test]
    fn jpeg_folders_decode_like_clips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = test_frames(5, 32, 48);
        for i in 0..src.t {
            let path = dir.path().join(format!("img_{:05}.jpg", i + 1));
            write_jpeg(&path, src.frame(i), src.w, src.h, 2).expect("writing JPEG");
        }
        std::fs::write(dir.path().join("notes.txt"), "not a frame").expect("writing");
        let mut folder = FrameFolder::open(dir.path()).expect("opening the folder");
        assert_eq!(folder.len(), 5);
        let out = folder.decode(&[0, 2, 2, 4]).expect("decoding");
        assert_eq!((out.t, out.h, out.w), (4, 32, 48));
        for (slot, i) in [0, 2, 2, 4].into_iter().enumerate() {
            let (mean, max) = abs_error(out.frame(slot), src.frame(i));
            assert!(mean < 3.0, "frame {i}: mean abs error {mean:.3}, max {max}");
        }
        assert!(folder.decode(&[5]).is_err());
        std::fs::remove_file(dir.path().join("img_00003.jpg")).expect("removing");
        let err = FrameFolder::open(dir.path()).expect_err("a gap must be an error");
        assert!(err.to_string().contains("gaps"), "{err}");
        std::fs::write(dir.path().join("img_00003.jpg"), b"not a jpeg").expect("writing");
        let mut folder = FrameFolder::open(dir.path()).expect("opening");
        assert!(folder.decode(&[2]).is_err());
    }

    #[test]
    fn bench_hook_counts_frames() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = encode_test_clip(
            dir.path(),
            "clip.mp4",
            &test_frames(12, 16, 32),
            &opts(4, 12),
        );
        let bytes: Arc<[u8]> = std::fs::read(&path).expect("reading").into();
        let all = bench_decode("clip.mp4", &bytes, None, 2).expect("bench");
        assert_eq!((all.clips, all.frames), (2, 24));
        let some = bench_decode("clip.mp4", &bytes, Some(&[0, 5, 11]), 3).expect("bench");
        assert_eq!((some.clips, some.frames), (3, 9));
    }
}
