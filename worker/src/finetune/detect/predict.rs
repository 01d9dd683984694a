//! Detecting polyps in a video (or frame folder) with a fine-tuned detector: every frame with
//! its test-time reference frames of the same video (half before, half after, clamped to the
//! video, as in scoring), boxes in the video's pixels written as JSON lines
//! (`detections.jsonl`) and drawn on an annotated video a person can watch (`annotated.mp4`:
//! boxes scoring at least the threshold in green with their class and score).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use tch::{Device, Tensor};

use super::data::{TEST_SALT, input_from_rgb, item_rng, scaled_boxes, test_references};
use super::input_size;
use super::run::{class_name, load_detector};
use crate::eval::plots::{DrawBox, annotate_frame};
use crate::{Error, Result};

/// Frames decoded per chunk (with the references around them).
const CHUNK: usize = 16;

/// One box of a prediction.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PredictedBox {
    /// Class name (`adenomatous`, `hyperplastic`).
    pub class: String,
    /// Published class id (1-based).
    pub label: i64,
    /// Score in [0, 1].
    pub score: f64,
    /// x1 y1 x2 y2 in the video's pixels.
    pub xyxy: [f64; 4],
}

/// The detections of one frame.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FrameDetections {
    /// Frame index in the video (0-based).
    pub frame: usize,
    /// Boxes scoring at least the model's `score_threshold`, highest first.
    pub boxes: Vec<PredictedBox>,
}

/// Where a prediction went.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PredictionFiles {
    /// Frames predicted.
    pub frames: usize,
    /// The JSON lines file.
    pub detections: String,
    /// The annotated video.
    pub annotated: String,
    /// The score threshold applied.
    pub score_threshold: f64,
}

/// Detects polyps in every frame of `video`, writing `out/detections.jsonl` and
/// `out/annotated.mp4`; returns the per-frame detections and the files.
///
/// Errors: a model that is not a detector, a video without frames, an output folder that
/// already holds a prediction, a decode or write failure (named).
pub fn predict(
    weights_text: &str,
    fallback: &crate::finetune::Fallback,
    video: &str,
    out: &Path,
    device: Device,
) -> Result<(Vec<FrameDetections>, PredictionFiles)> {
    let (net, cfg) = load_detector(weights_text, fallback, None, device)?;
    let mut media = crate::datasets::media::Media::open_uri(video)?;
    let info = media.info();
    if info.frames == 0 {
        return Err(Error::Input {
            name: video.to_string(),
            reason: "has no frames".into(),
        });
    }
    let lines_path = out.join("detections.jsonl");
    let video_path = out.join("annotated.mp4");
    for p in [&lines_path, &video_path] {
        if p.exists() {
            return Err(Error::Input {
                name: "--out".into(),
                reason: format!(
                    "{} already exists (another prediction?); give an empty or new folder",
                    p.display()
                ),
            });
        }
    }
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        action: "creating",
        path: out.to_path_buf(),
        source,
    })?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io {
            action: "writing",
            path,
            source,
        }
    };
    let mut lines =
        std::io::BufWriter::new(std::fs::File::create(&lines_path).map_err(io(&lines_path))?);
    let (h, w) = (info.height, info.width);
    let (even_w, even_h) = (w - w % 2, h - h % 2);
    let mut writer = crate::video::encode::Mp4Writer::create(
        &video_path,
        even_w.max(2),
        even_h.max(2),
        &crate::video::encode::EncodeOptions {
            fps: info.fps.unwrap_or(25.0).round().max(1.0) as u32,
            ..Default::default()
        },
    )?;
    let size = input_size(&cfg, h, w);
    let n = info.frames;
    let mut all = Vec::with_capacity(n);
    let mut decoded = crate::video::Frames::default();
    let mut start = 0;
    while start < n {
        let end = (start + CHUNK).min(n);
        // References of each frame (1-based numbers, as the dataset's), drawn per frame.
        let refs: Vec<Vec<usize>> = (start..end)
            .map(|k| {
                let mut rng = item_rng(cfg.seed, TEST_SALT, k);
                test_references(&mut rng, k + 1, n, cfg.ref_max_offset, cfg.test_refs)
            })
            .collect();
        let mut needed: Vec<usize> = (start..end)
            .chain(refs.iter().flatten().map(|r| r - 1))
            .collect();
        needed.sort_unstable();
        needed.dedup();
        media.decode_into(&needed, &mut decoded)?;
        let mut inputs: BTreeMap<usize, Tensor> = BTreeMap::new();
        for (slot, &k) in needed.iter().enumerate() {
            inputs.insert(k, input_from_rgb(decoded.frame(slot), (h, w), size, false));
        }
        for (offset, k) in (start..end).enumerate() {
            let mut clip = vec![inputs[&k].shallow_clone()];
            clip.extend(
                refs[offset]
                    .iter()
                    .map(|r| inputs[&(r - 1)].shallow_clone()),
            );
            let x = Tensor::stack(&clip, 1).unsqueeze(0).to_device(device);
            let (_, dets) = net.detect(&x)?;
            let boxes: Vec<PredictedBox> =
                scaled_boxes(&dets[0], (size.0 as f64, size.1 as f64), (h, w))
                    .into_iter()
                    .filter(|b| b.score >= cfg.score_threshold)
                    .map(|b| PredictedBox {
                        class: class_name(b.label),
                        label: b.label,
                        score: b.score,
                        xyxy: b.xyxy,
                    })
                    .collect();
            let frame = FrameDetections { frame: k, boxes };
            serde_json::to_writer(&mut lines, &frame)
                .map_err(|e| std::io::Error::other(e.to_string()))
                .map_err(io(&lines_path))?;
            lines.write_all(b"\n").map_err(io(&lines_path))?;
            let slot = needed.binary_search(&k).unwrap_or(0);
            let rgb = decoded.frame(slot);
            let mut picture = Vec::with_capacity(even_w * even_h * 3);
            for y in 0..even_h {
                picture.extend_from_slice(&rgb[y * w * 3..(y * w + even_w) * 3]);
            }
            let drawn: Vec<DrawBox> = frame
                .boxes
                .iter()
                .map(|b| DrawBox {
                    xyxy: b.xyxy,
                    label: b.class.clone(),
                    score: Some(b.score),
                })
                .collect();
            annotate_frame(&mut picture, even_w, even_h, &[], &drawn)?;
            writer.push(&picture)?;
            all.push(frame);
        }
        start = end;
    }
    writer.finish()?;
    lines.flush().map_err(io(&lines_path))?;
    tracing::info!(frames = n, out = %out.display(), "detections written");
    Ok((
        all,
        PredictionFiles {
            frames: n,
            detections: lines_path.display().to_string(),
            annotated: video_path.display().to_string(),
            score_threshold: cfg.score_threshold,
        },
    ))
}
