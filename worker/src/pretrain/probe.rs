//! The k-NN probe of pre-training: how well the teacher's features already separate the classes
//! of a small labelled PolypDiag-layout dataset, measured every few steps so that a user sees
//! features improving (or not) while the self-supervised loss alone says little.
//!
//! The method is DINO's `eval_knn.py` (Caron et al. 2021, §4.2 / appendix): L2-normalised CLS
//! features of the teacher backbone in eval mode, each `val` video classified by the `k` most
//! cosine-similar `train` videos, each voting for its class with weight `exp(sim / T)`; the
//! accuracy is the share of `val` videos whose top-weighted class is their label. Clips come
//! from the fine-tuning evaluation pipeline ([`ClassifyEval`]: `frames` frames over the window,
//! short side resized, centre crop) at the network's frame count and image size; decoded once
//! and kept in memory (up to [`CACHE_BYTES`]).

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use endofm_shared::{FinetuneConfig, StorageUri};

use crate::datasets::classify::ClassifyEval;
use crate::datasets::{PolypDiag, Split};
use crate::model::EndoFm;
use crate::{Error, Result};

/// Decoded probe clips kept in memory up to this many bytes (beyond, they are decoded again at
/// every probe).
pub const CACHE_BYTES: i64 = 1 << 30;

/// Neighbours of DINO's k-NN evaluation (fewer when the bank is smaller).
pub const DEFAULT_K: usize = 20;

/// Temperature of the neighbours' vote weights `exp(sim / T)` (DINO's).
pub const VOTE_TEMPERATURE: f64 = 0.07;

/// What to probe with and how often.
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    /// A PolypDiag-layout dataset (`videos/`, `splits/train.txt`, `splits/val.txt`).
    pub data: StorageUri,
    /// Probe after every this many steps (and after the last one; also once before training);
    /// `None`: at every epoch end.
    pub every: Option<usize>,
    /// Neighbours.
    pub k: usize,
}

/// One split's clips: decoded batches (or `None` when over the cache budget) and labels.
#[derive(Debug)]
struct SplitClips {
    split: Split,
    batches: Option<Vec<Tensor>>,
    labels: Tensor,
}

/// An opened probe set.
#[derive(Debug)]
pub struct Probe {
    spec: ProbeSpec,
    every: usize,
    dataset: Arc<PolypDiag>,
    cfg: FinetuneConfig,
    threads: usize,
    train: SplitClips,
    val: SplitClips,
}

/// The result of one probe.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ProbeResult {
    /// Share of `val` videos classified correctly.
    pub accuracy: f64,
    /// Videos in the bank (`train`).
    pub bank: usize,
    /// Videos classified (`val`).
    pub queries: usize,
    /// Neighbours used.
    pub k: usize,
}

impl Probe {
    /// Opens the dataset and decodes both splits at the network's frame count and image size
    /// (errors name the dataset's file; a split without videos is refused); `iters_per_epoch`
    /// resolves `every = None`.
    pub fn open(
        spec: ProbeSpec,
        model: &endofm_shared::ModelConfig,
        threads: usize,
        iters_per_epoch: usize,
    ) -> Result<Self> {
        if spec.every == Some(0) {
            return Err(Error::Input {
                name: "--probe-every".into(),
                reason: "must be at least 1".into(),
            });
        }
        if spec.k == 0 {
            return Err(Error::Input {
                name: "--probe-k".into(),
                reason: "must be at least 1".into(),
            });
        }
        let dataset = Arc::new(PolypDiag::open(&spec.data)?);
        let cfg = FinetuneConfig {
            frames: model.num_frames,
            crop: model.img_size,
            test_short: model.img_size,
            batch_per_rank: 4,
            ..FinetuneConfig::default()
        };
        let threads = threads.max(1);
        let mut probe = Self {
            train: SplitClips {
                split: Split::Train,
                batches: None,
                labels: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
            },
            val: SplitClips {
                split: Split::Val,
                batches: None,
                labels: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
            },
            every: spec.every.unwrap_or(iters_per_epoch).max(1),
            spec,
            dataset,
            cfg,
            threads,
        };
        for split in [Split::Train, Split::Val] {
            let (batches, labels) = probe.decode(split)?;
            if labels.numel() == 0 {
                return Err(Error::Input {
                    name: format!("--probe-data {}", probe.spec.data),
                    reason: format!("the {split} split lists no video"),
                });
            }
            let bytes: i64 = batches.iter().map(|b| b.numel() as i64 * 4).sum();
            let clips = SplitClips {
                split,
                batches: (bytes <= CACHE_BYTES / 2).then_some(batches),
                labels,
            };
            match split {
                Split::Train => probe.train = clips,
                _ => probe.val = clips,
            }
        }
        tracing::info!(
            data = %probe.spec.data,
            train = probe.train.labels.numel(),
            val = probe.val.labels.numel(),
            every = probe.every,
            "k-NN probe ready"
        );
        Ok(probe)
    }

    /// The probe's settings.
    pub fn spec(&self) -> &ProbeSpec {
        &self.spec
    }

    /// Whether to probe after `done` steps of a run ending at `end`.
    pub fn due(&self, done: usize, end: usize) -> bool {
        done.is_multiple_of(self.every) || done == end
    }

    fn decode(&self, split: Split) -> Result<(Vec<Tensor>, Tensor)> {
        let eval = ClassifyEval::start(
            Arc::clone(&self.dataset),
            split,
            &self.cfg,
            0,
            1,
            self.threads,
        )?;
        let mut batches = Vec::new();
        let mut labels = Vec::new();
        for batch in eval {
            let batch = batch?;
            batches.push(batch.videos);
            labels.push(batch.labels);
        }
        let labels = if labels.is_empty() {
            Tensor::zeros([0], (Kind::Int64, Device::Cpu))
        } else {
            Tensor::cat(&labels, 0)
        };
        Ok((batches, labels))
    }

    fn features(&self, model: &EndoFm, clips: &SplitClips) -> Result<Tensor> {
        let device = model.device();
        let run = |batches: &[Tensor]| -> Tensor {
            let feats: Vec<Tensor> = batches
                .iter()
                .map(|b| tch::no_grad(|| model.features(&b.to_device(device), false)))
                .collect();
            Tensor::cat(&feats, 0)
                .to_device(Device::Cpu)
                .to_kind(Kind::Float)
        };
        Ok(match &clips.batches {
            Some(b) => run(b),
            None => run(&self.decode(clips.split)?.0),
        })
    }

    /// Classifies `val` from `train` with `model`'s features (eval mode, no gradient).
    pub fn run(&self, model: &EndoFm) -> Result<ProbeResult> {
        let bank = self.features(model, &self.train)?;
        let queries = self.features(model, &self.val)?;
        let k = self.spec.k.min(bank.size()[0] as usize);
        let accuracy = knn_accuracy(
            &bank,
            &self.train.labels,
            &queries,
            &self.val.labels,
            k,
            PolypDiag::NUM_CLASSES as i64,
        );
        Ok(ProbeResult {
            accuracy,
            bank: bank.size()[0] as usize,
            queries: queries.size()[0] as usize,
            k,
        })
    }
}

/// DINO's weighted k-NN accuracy: `bank` (N, D) with `bank_labels` (N,), `queries` (M, D) with
/// `query_labels` (M,), classes `0..classes`; cosine similarity, the `k` nearest vote with
/// weight `exp(sim / T)` ([`VOTE_TEMPERATURE`]); ties go to the lower class.
pub fn knn_accuracy(
    bank: &Tensor,
    bank_labels: &Tensor,
    queries: &Tensor,
    query_labels: &Tensor,
    k: usize,
    classes: i64,
) -> f64 {
    let m = queries.size()[0];
    if m == 0 || bank.size()[0] == 0 {
        return 0.0;
    }
    let norm = |x: &Tensor| {
        let x = x.to_kind(Kind::Double);
        &x / x.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12)
    };
    let sim = norm(queries).matmul(&norm(bank).transpose(0, 1)); // (M, N)
    let k = (k as i64).clamp(1, bank.size()[0]);
    let (top, idx) = sim.topk(k, 1, true, true);
    let votes = bank_labels
        .to_kind(Kind::Int64)
        .index_select(0, &idx.reshape([-1]))
        .reshape([m, k]);
    let weights = (top / VOTE_TEMPERATURE).exp();
    let scores = Tensor::zeros([m, classes], (Kind::Double, Device::Cpu));
    let scores = scores.scatter_add(1, &votes, &weights);
    let predicted = scores.argmax(1, false);
    let correct = predicted
        .eq_tensor(&query_labels.to_kind(Kind::Int64))
        .to_kind(Kind::Double)
        .sum(Kind::Double)
        .double_value(&[]);
    correct / m as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_knn_follows_the_nearest_and_the_weights() {
        let bank = Tensor::from_slice(&[1.0f32, 0.0, 0.9, 0.1, 0.0, 1.0, 0.1, 0.9]).reshape([4, 2]);
        let labels = Tensor::from_slice(&[0i64, 0, 1, 1]);
        let q = Tensor::from_slice(&[1.0f32, 0.05, 0.05, 1.0]).reshape([2, 2]);
        let right = Tensor::from_slice(&[0i64, 1]);
        assert_eq!(knn_accuracy(&bank, &labels, &q, &right, 1, 2), 1.0);
        assert_eq!(knn_accuracy(&bank, &labels, &q, &right, 2, 2), 1.0);
        let wrong = Tensor::from_slice(&[1i64, 1]);
        assert_eq!(knn_accuracy(&bank, &labels, &q, &wrong, 1, 2), 0.5);
        // All four neighbours: the two close ones outweigh the two far ones.
        assert_eq!(knn_accuracy(&bank, &labels, &q, &right, 4, 2), 1.0);
        // k beyond the bank is clamped; an empty query set scores 0.
        assert_eq!(knn_accuracy(&bank, &labels, &q, &right, 99, 2), 1.0);
        let none = Tensor::zeros([0, 2], (Kind::Float, Device::Cpu));
        let no_labels = Tensor::zeros([0], (Kind::Int64, Device::Cpu));
        assert_eq!(knn_accuracy(&bank, &labels, &none, &no_labels, 1, 2), 0.0);
    }
}
