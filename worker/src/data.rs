//! Pre-training input: the multi-view sampling of Endo-FM (two global and eight local views of a
//! clip, [`views`]) and their augmentation into normalised tensors ([`augment`]).
//!
//! Use in two steps so that a decoder decodes only what is needed: [`ViewPlan::draw`] picks
//! every view's frames and random draws (a pure function of seed, epoch and clip index), then
//! [`render`] turns the frames listed in `plan.decode` into the view tensors. Data workers
//! must run libtorch with one intra-op thread (`tch::set_num_threads(1)`): a worker renders one
//! clip per core, and libtorch's own threads would only compete with the other workers.

pub mod augment;
pub mod bicubic;
pub mod fingerprint;
pub mod loader;
pub mod views;

use std::time::Instant;

/// Decoded frames are the decoder's own type: rendering reads what [`crate::video`] writes.
pub use crate::video::Frames;
pub use augment::{Views, render};
pub use fingerprint::CorpusFingerprint;
pub use views::{
    ClipShape, CropBox, DrawKey, GrayWeights, JitterOp, ViewConfig, ViewDraw, ViewKind, ViewPlan,
};

use crate::Result;

/// Result of [`bench_views`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ViewBench {
    /// Clips rendered (after one warm-up clip).
    pub clips: usize,
    /// Wall time of those clips in seconds.
    pub seconds: f64,
    /// Clips per second.
    pub clips_per_s: f64,
}

/// Times planning + rendering of `clips` synthetic decoded clips of `shape` on the calling
/// thread, after setting libtorch to one intra-op thread (the data-worker set-up). The clip is
/// deterministic noise with some structure; the cost does not depend on pixel values.
pub fn bench_views(cfg: &ViewConfig, shape: ClipShape, clips: usize) -> Result<ViewBench> {
    tch::set_num_threads(1);
    let frames = synthetic_clip(shape)?;
    let run = |clip: u64| -> Result<Views> {
        let key = DrawKey {
            seed: 0,
            epoch: 0,
            clip,
        };
        let plan = ViewPlan::draw(cfg, shape, key)?;
        render(cfg, &plan, &frames)
    };
    run(u64::MAX)?;
    let start = Instant::now();
    for clip in 0..clips {
        std::hint::black_box(run(clip as u64)?);
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(ViewBench {
        clips,
        seconds,
        clips_per_s: clips as f64 / seconds.max(f64::MIN_POSITIVE),
    })
}

/// A clip of smooth gradients plus a little noise, for benchmarks and tests.
pub fn synthetic_clip(shape: ClipShape) -> Result<Frames> {
    let ClipShape {
        frames,
        height,
        width,
    } = shape;
    let mut data = Vec::with_capacity(frames * height * width * 3);
    let mut state = 0x9e37_79b9_u32;
    for t in 0..frames {
        for y in 0..height {
            for x in 0..width {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let noise = (state >> 28) as usize;
                data.push(((x * 255 / width.max(1) + t + noise) % 256) as u8);
                data.push(((y * 255 / height.max(1) + 2 * t + noise) % 256) as u8);
                data.push((((x + y) * 127 / (width + height).max(1) + noise) % 256) as u8);
            }
        }
    }
    Frames::from_vec(frames, height, width, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clips/s on one thread for 256×256 150-frame clips; run with
    /// `cargo test --release -p endofm-worker bench_views_one_thread -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing run; use --release --ignored"]
    fn bench_views_one_thread() {
        let shape = ClipShape {
            frames: 150,
            height: 256,
            width: 256,
        };
        let report = bench_views(&ViewConfig::default(), shape, 20).expect("bench");
        println!(
            "views: {:.2} clips/s on one thread ({} clips in {:.2} s)",
            report.clips_per_s, report.clips, report.seconds
        );
    }
}
