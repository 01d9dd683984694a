//! Feature extraction (the reference has no entry point for it): every clip of a corpus goes
//! through the backbone in eval mode with a deterministic test-time transform — `frames` frames
//! spaced uniformly over the clip, short side resized to `size` (bilinear), centre crop, ImageNet
//! normalisation — and yields its CLS feature. Also a k-nearest-neighbour probe on the features.

use tch::{Device, Kind, Tensor};

use crate::data::loader::Corpus;
use crate::data::views::linspace_indices;
use crate::model::EndoFm;
use crate::precision::{Precision, with_precision};
use crate::video::Frames;
use crate::{Error, Result};

/// Test-time transform settings.
#[derive(Debug, Clone, Copy)]
pub struct EmbedOptions {
    /// Frames per clip.
    pub frames: usize,
    /// Side of the square input.
    pub size: usize,
    /// Clips per forward pass.
    pub batch: usize,
    /// Precision of the forward pass.
    pub precision: Precision,
}

/// Frames → normalised (3, T, size, size) tensor.
pub fn clip_tensor(frames: &Frames, size: usize) -> Tensor {
    let (t, h, w) = (frames.t as i64, frames.h as i64, frames.w as i64);
    let x = Tensor::from_slice(&frames.data)
        .reshape([t, h, w, 3])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        / 255.0;
    let s = size as i64;
    let (nh, nw) = if h <= w {
        (s, (w * s + h / 2) / h)
    } else {
        ((h * s + w / 2) / w, s)
    };
    let x = x.upsample_bilinear2d([nh, nw], false, None, None);
    let x = x.narrow(2, (nh - s) / 2, s).narrow(3, (nw - s) / 2, s);
    // The same normalisation as the pre-training views.
    let views = crate::data::ViewConfig::reference();
    let mean = Tensor::from_slice(&views.mean).reshape([1, 3, 1, 1]);
    let std = Tensor::from_slice(&views.std).reshape([1, 3, 1, 1]);
    ((x - mean) / std).permute([1, 0, 2, 3]).contiguous()
}

/// Decodes clip `i` of `corpus` for embedding: the corpus reader every command uses (a video
/// in any container, or a frame folder, decided by what the entry is).
pub fn load_clip(corpus: &Corpus, i: usize, opts: &EmbedOptions) -> Result<Tensor> {
    let mut clip = corpus.open_clip(i)?;
    let n = clip.info().frames;
    let indices = linspace_indices(0, n as i64 - 1, opts.frames, n);
    let mut frames = Frames::default();
    clip.decode_into(&indices, &mut frames)?;
    Ok(clip_tensor(&frames, opts.size))
}

/// CLS features of every clip: (clips, D) on the CPU, in corpus order. A clip that cannot be
/// decoded is an error naming it (features must line up with labels).
pub fn embed_corpus(model: &EndoFm, corpus: &Corpus, opts: &EmbedOptions) -> Result<Tensor> {
    if opts.frames == 0 || opts.size < model.config().patch_size || opts.batch == 0 {
        return Err(Error::Input {
            name: "embed options".into(),
            reason: format!(
                "frames {} / size {} / batch {} (need ≥ 1 frame, size ≥ patch {}, batch ≥ 1)",
                opts.frames,
                opts.size,
                opts.batch,
                model.config().patch_size
            ),
        });
    }
    let mut features = Vec::new();
    let n = corpus.len();
    let mut start = 0;
    while start < n {
        let end = (start + opts.batch).min(n);
        let clips = (start..end)
            .map(|i| load_clip(corpus, i, opts))
            .collect::<Result<Vec<_>>>()?;
        let x = Tensor::stack(&clips, 0).to_device(model.device());
        let f = with_precision(opts.precision, model.device(), || {
            tch::no_grad(|| model.features(&x, false))
        })?;
        features.push(f.to_kind(Kind::Float).to_device(Device::Cpu));
        start = end;
    }
    Ok(Tensor::cat(&features, 0))
}

/// Leave-one-out k-nearest-neighbour accuracy (cosine similarity, majority vote, ties to the
/// nearest) of binary `labels` from `features` (N, D).
pub fn knn_accuracy(features: &Tensor, labels: &[bool], k: usize) -> f64 {
    let n = labels.len();
    if n < 2 {
        return 0.0;
    }
    let f = features.to_kind(Kind::Double);
    let f = &f / f.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
    let sim = f.matmul(&f.transpose(0, 1));
    let sim: Vec<f64> = sim.reshape([-1]).try_into().unwrap_or_default();
    let mut correct = 0;
    for i in 0..n {
        let mut others: Vec<(f64, usize)> = (0..n)
            .filter(|&j| j != i)
            .map(|j| (sim[i * n + j], j))
            .collect();
        others.sort_by(|a, b| b.0.total_cmp(&a.0));
        let votes: Vec<bool> = others
            .iter()
            .take(k.max(1))
            .map(|(_, j)| labels[*j])
            .collect();
        let yes = votes.iter().filter(|v| **v).count();
        let no = votes.len() - yes;
        let predicted = if yes == no { votes[0] } else { yes > no };
        if predicted == labels[i] {
            correct += 1;
        }
    }
    correct as f64 / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knn_separates_separable_features() {
        let f = Tensor::from_slice(&[1.0f32, 0.0, 0.9, 0.1, 0.0, 1.0, 0.1, 0.9]).reshape([4, 2]);
        assert_eq!(knn_accuracy(&f, &[true, true, false, false], 1), 1.0);
        assert_eq!(knn_accuracy(&f, &[true, false, true, false], 1), 0.0);
    }

    #[test]
    fn transform_is_centre_cropped_and_normalised() {
        let frames = Frames {
            t: 2,
            h: 4,
            w: 8,
            data: vec![255; 2 * 4 * 8 * 3],
        };
        let x = clip_tensor(&frames, 4);
        assert_eq!(x.size(), vec![3, 2, 4, 4]);
        let red = x.get(0).mean(Kind::Float).double_value(&[]);
        assert!((red - (1.0 - 0.485) / 0.229).abs() < 1e-4, "{red}");
    }
}
