//! The classification data loaders: [`ClassifyLoader`] (training, rank-sharded, addressed by
//! global step so a resumed run replays exactly) and [`ClassifyEval`] (a whole split in order,
//! each video once across ranks, deterministic transform).
//!
//! Training follows the published `torch.utils.data.DistributedSampler(shuffle=True)` feeding a
//! `DataLoader` of `batch_size_per_gpu`: each epoch is a permutation of the split drawn from
//! (seed, epoch); global batch `g` is permutation positions `g·B·W .. (g+1)·B·W`, of which rank
//! `r` takes positions `g·B·W + j·W + r` (`j < B`), i.e. the sampler's `indices[r::W]` cut into
//! batches of `B`. Unlike the sampler, which pads the permutation to a multiple of `W` and
//! keeps a last short batch, the incomplete last global batch is dropped so every step has
//! `B·W` distinct videos ([`iters_per_epoch`]).

use std::sync::Arc;
use std::time::Instant;

use tch::Tensor;

use endofm_shared::FinetuneConfig;

use super::{ClipPlan, ClipRng, ClipSampling, clips_tensor, render};
use crate::data::DrawKey;
use crate::data::loader::permutation;
use crate::datasets::prefetch::Prefetch;
use crate::datasets::{PolypDiag, Split, VideoEntry};
use crate::video::Frames;
use crate::{Error, Result};

/// Steps per epoch: full global batches of `batch_per_rank · world` videos; the remainder of
/// each epoch's permutation is dropped (a `DistributedSampler` with `drop_last`).
pub fn iters_per_epoch(n_videos: usize, batch_per_rank: usize, world: usize) -> usize {
    n_videos / (batch_per_rank * world).max(1)
}

/// The videos rank `rank` of `world` evaluates: split indices `rank, rank + W, rank + 2W, …`.
/// Every video belongs to exactly one rank, shares differ by at most one video, and there is no
/// padding; gather results by the indices each batch carries.
pub fn eval_shard(n_videos: usize, rank: usize, world: usize) -> Vec<usize> {
    (rank..n_videos).step_by(world.max(1)).collect()
}

/// One batch of clips.
#[derive(Debug)]
pub struct ClassifyBatch {
    /// `(B, 3, T, crop, crop)` float32, normalised.
    pub videos: Tensor,
    /// `(B,)` int64 class labels.
    pub labels: Tensor,
    /// Index of each video in the split's list, in batch order.
    pub indices: Vec<usize>,
    /// Seconds the caller waited for the batch.
    pub wait_s: f64,
}

/// One rendered video.
struct Sample {
    index: usize,
    label: i64,
    data: Vec<f32>,
}

thread_local! {
    /// Per-thread decode buffer, reused from video to video.
    static DECODED: std::cell::RefCell<Frames> = std::cell::RefCell::default();
}

/// How a video is drawn.
#[derive(Clone, Copy)]
enum Draw {
    Train(DrawKey),
    Test,
}

/// Decodes the frames one video's plan needs and renders them. Any failure is an error naming
/// the video: fine-tuning sets are small and curated, a bad video is not skipped.
fn load(dataset: &PolypDiag, entry: &VideoEntry, s: &ClipSampling, draw: Draw) -> Result<Vec<f32>> {
    let uri = dataset.describe(entry);
    let mut media = dataset.open_media(entry)?;
    let info = media.info();
    let plan = match draw {
        Draw::Train(key) => ClipPlan::train(s, &info, &mut ClipRng::new(key)),
        Draw::Test => ClipPlan::test(s, &info, 0.0),
    }
    .map_err(|e| Error::ClipDecode {
        uri: uri.clone(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::with_capacity(s.clip_len());
    DECODED.with_borrow_mut(|frames| {
        media.decode_into(&plan.frames, frames)?;
        render(s, &plan, frames, &mut out)
    })?;
    Ok(out)
}

/// Checks rank, world and threads, and returns the split's videos.
fn prepare(
    dataset: &PolypDiag,
    split: Split,
    cfg: &FinetuneConfig,
    rank: usize,
    world: usize,
) -> Result<(ClipSampling, Arc<Vec<VideoEntry>>)> {
    cfg.validate()?;
    let s = ClipSampling::from_config(cfg);
    s.validate()?;
    if world == 0 || rank >= world {
        return Err(Error::Input {
            name: "data loader".into(),
            reason: format!("rank {rank} of a world of {world}"),
        });
    }
    Ok((s, Arc::new(dataset.split(split)?.to_vec())))
}

/// Assembles samples into a batch (on the caller's thread: the only libtorch use).
fn assemble(samples: Vec<Sample>, s: &ClipSampling, started: Instant) -> Result<ClassifyBatch> {
    let n = samples.len();
    let mut data = Vec::with_capacity(n * s.clip_len());
    let mut labels = Vec::with_capacity(n);
    let mut indices = Vec::with_capacity(n);
    for sample in samples {
        data.extend_from_slice(&sample.data);
        labels.push(sample.label);
        indices.push(sample.index);
    }
    Ok(ClassifyBatch {
        videos: clips_tensor(&data, n, s)?,
        labels: Tensor::f_from_slice(&labels)?,
        indices,
        wait_s: started.elapsed().as_secs_f64(),
    })
}

/// The training loader of one rank: batches in global-step order, prefetched by background
/// threads.
pub struct ClassifyLoader {
    pool: Prefetch<Sample>,
    sampling: ClipSampling,
    batch: usize,
    per_epoch: usize,
    next_step: usize,
}

impl std::fmt::Debug for ClassifyLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClassifyLoader(next step {})", self.next_step)
    }
}

impl ClassifyLoader {
    /// Starts `threads` data threads for rank `rank` of `world` over `split`; the first batch
    /// returned is the one of global step `start_step`. Batches hold `cfg.batch_per_rank`
    /// videos; an epoch has [`iters_per_epoch`] steps (an error when that is 0).
    pub fn start(
        dataset: Arc<PolypDiag>,
        split: Split,
        cfg: &FinetuneConfig,
        rank: usize,
        world: usize,
        threads: usize,
        start_step: usize,
    ) -> Result<Self> {
        let (sampling, entries) = prepare(&dataset, split, cfg, rank, world)?;
        let batch = cfg.batch_per_rank;
        let n = entries.len();
        let steps = iters_per_epoch(n, batch, world);
        if steps == 0 {
            return Err(Error::Input {
                name: "data loader".into(),
                reason: format!(
                    "the {split} split has {n} videos, fewer than one global batch of {batch} × {world} ranks"
                ),
            });
        }
        let per_epoch = steps * batch;
        let seed = cfg.seed;
        let s = sampling.clone();
        let produce = move |seq: usize| -> Result<Sample> {
            let epoch = seq / per_epoch;
            let k = seq % per_epoch;
            let index = permutation(n, seed, epoch)[k * world + rank];
            let key = DrawKey {
                seed,
                epoch: epoch as u64,
                clip: index as u64,
            };
            let entry = &entries[index];
            Ok(Sample {
                index,
                label: entry.label,
                data: load(&dataset, entry, &s, Draw::Train(key))?,
            })
        };
        let depth = (2 * batch).max(threads);
        let pool = Prefetch::start(
            "classify",
            threads,
            depth,
            (start_step * batch, None),
            produce,
        )?;
        tracing::debug!(%split, rank, world, steps_per_epoch = steps, start_step, "classification loader started");
        Ok(Self {
            pool,
            sampling,
            batch,
            per_epoch: steps,
            next_step: start_step,
        })
    }

    /// Steps per epoch.
    pub fn iters_per_epoch(&self) -> usize {
        self.per_epoch
    }

    /// The global step of the next batch.
    pub fn next_step(&self) -> usize {
        self.next_step
    }

    /// The batch of the next global step.
    pub fn next_batch(&mut self) -> Result<ClassifyBatch> {
        let started = Instant::now();
        let samples = (0..self.batch)
            .map(|_| self.pool.take())
            .collect::<Result<Vec<_>>>()?;
        self.next_step += 1;
        assemble(samples, &self.sampling, started)
    }
}

/// Evaluation over a whole split: this rank's share ([`eval_shard`]) in order, in batches of
/// `cfg.batch_per_rank` (the last one shorter), with the deterministic evaluation transform.
pub struct ClassifyEval {
    pool: Prefetch<Sample>,
    sampling: ClipSampling,
    shard: Vec<usize>,
    batch: usize,
    next: usize,
}

impl std::fmt::Debug for ClassifyEval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ClassifyEval({} of {} videos)",
            self.next,
            self.shard.len()
        )
    }
}

impl ClassifyEval {
    /// Starts evaluating `split` on rank `rank` of `world` with `threads` data threads.
    pub fn start(
        dataset: Arc<PolypDiag>,
        split: Split,
        cfg: &FinetuneConfig,
        rank: usize,
        world: usize,
        threads: usize,
    ) -> Result<Self> {
        let (sampling, entries) = prepare(&dataset, split, cfg, rank, world)?;
        let shard = eval_shard(entries.len(), rank, world);
        let batch = cfg.batch_per_rank;
        let s = sampling.clone();
        let order = shard.clone();
        let produce = move |seq: usize| -> Result<Sample> {
            let index = order[seq];
            let entry = &entries[index];
            Ok(Sample {
                index,
                label: entry.label,
                data: load(&dataset, entry, &s, Draw::Test)?,
            })
        };
        let depth = (2 * batch).max(threads);
        let pool = Prefetch::start("evaluate", threads, depth, (0, Some(shard.len())), produce)?;
        Ok(Self {
            pool,
            sampling,
            shard,
            batch,
            next: 0,
        })
    }

    /// The split indices this rank evaluates, in order.
    pub fn shard(&self) -> &[usize] {
        &self.shard
    }
}

impl Iterator for ClassifyEval {
    type Item = Result<ClassifyBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.shard.len() {
            return None;
        }
        let started = Instant::now();
        let n = self.batch.min(self.shard.len() - self.next);
        self.next += n;
        let samples = (0..n).map(|_| self.pool.take()).collect::<Result<Vec<_>>>();
        Some(samples.and_then(|s| assemble(s, &self.sampling, started)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_drop_the_last_incomplete_global_batch() {
        assert_eq!(iters_per_epoch(253, 4, 1), 63);
        assert_eq!(iters_per_epoch(253, 4, 2), 31);
        assert_eq!(iters_per_epoch(7, 4, 2), 0);
        assert_eq!(iters_per_epoch(8, 4, 2), 1);
    }

    #[test]
    fn eval_shards_cover_every_video_once() {
        for (n, world) in [(0, 1), (1, 3), (10, 3), (253, 4), (5, 5)] {
            let mut all: Vec<usize> = (0..world).flat_map(|r| eval_shard(n, r, world)).collect();
            let sizes: Vec<usize> = (0..world).map(|r| eval_shard(n, r, world).len()).collect();
            all.sort_unstable();
            assert_eq!(all, (0..n).collect::<Vec<_>>(), "n={n} world={world}");
            let (lo, hi) = (sizes.iter().min(), sizes.iter().max());
            assert!(hi.zip(lo).is_none_or(|(h, l)| h - l <= 1), "{sizes:?}");
        }
    }
}
