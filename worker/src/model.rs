//! The Endo-FM network: the TimeSformer backbone ([`timesformer`]) and the DINO projection head
//! ([`head`]) in one variable store whose paths are the published state-dict keys
//! (`backbone.…`, `head.…`), with strict safetensors loading and saving ([`weights`]).

pub mod classifier;
pub mod detector;
pub mod head;
pub mod segmenter;
pub mod timesformer;
pub mod weights;

use std::path::Path;

use tch::{Device, Tensor, nn};

use endofm_shared::{ModelConfig, ParamCounts};

use crate::Result;
pub use classifier::Classifier;
pub use detector::Detector;
pub use head::DinoHead;
pub use segmenter::Segmenter;
pub use timesformer::TimeSformer;
pub use weights::{LoadMode, LoadReport};

/// The runs of consecutive views with the same (T, H, W), as index ranges in order: the
/// batches [`EndoFm::forward_views`] runs the backbone on.
pub fn equal_shape_runs(views: &[Tensor]) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    while start < views.len() {
        let shape = views[start].size();
        let mut end = start + 1;
        while end < views.len() && views[end].size().get(2..) == shape.get(2..) {
            end += 1;
        }
        runs.push(start..end);
        start = end;
    }
    runs
}

/// Backbone + projection head: the student (and, as a copy, the teacher) of pre-training.
#[derive(Debug)]
pub struct EndoFm {
    vs: nn::VarStore,
    backbone: TimeSformer,
    head: DinoHead,
    cfg: ModelConfig,
}

impl EndoFm {
    /// Builds a randomly initialised network (libtorch's generator: seed it with
    /// `tch::manual_seed` for reproducible weights). The configuration is validated first.
    pub fn new(cfg: &ModelConfig, device: Device) -> Result<Self> {
        cfg.validate()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let backbone = TimeSformer::new(&root / "backbone", cfg);
        let head = DinoHead::new(&root / "head", cfg);
        Ok(Self {
            vs,
            backbone,
            head,
            cfg: cfg.clone(),
        })
    }

    /// The configuration the network was built with.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The variable store (parameters under their state-dict keys).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Mutable access to the variable store (freezing, device moves).
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// The backbone alone.
    pub fn backbone(&self) -> &TimeSformer {
        &self.backbone
    }

    /// The projection head alone.
    pub fn head(&self) -> &DinoHead {
        &self.head
    }

    /// Device the parameters live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Counts the parameters actually allocated (frozen ones included).
    pub fn param_counts(&self) -> ParamCounts {
        let mut counts = ParamCounts {
            backbone: 0,
            head: 0,
            total: 0,
        };
        for (name, t) in self.vs.variables() {
            let n = t.numel() as u64;
            if name.starts_with("backbone.") {
                counts.backbone += n;
            } else {
                counts.head += n;
            }
            counts.total += n;
        }
        counts
    }

    /// CLS features of a (B, C, T, H, W) batch: (B, D).
    pub fn features(&self, x: &Tensor, train: bool) -> Tensor {
        self.backbone.forward_t(x, train)
    }

    /// Features and head outputs of one batch: ((B, D), (B, out_dim)).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> (Tensor, Tensor) {
        let features = self.features(x, train);
        let head = self.head.forward(&features);
        (features, head)
    }

    /// The multi-view forward of pre-training: runs the backbone once per run of consecutive
    /// views with the same (T, H, W) (views of equal shape batched together, as the reference
    /// does), then the head once on all CLS features. Output rows are view-major: view 0's
    /// batch, then view 1's, ...
    pub fn forward_views(&self, views: &[Tensor], train: bool) -> Tensor {
        let features: Vec<Tensor> = equal_shape_runs(views)
            .into_iter()
            .map(|run| {
                let batch = if run.len() == 1 {
                    views[run.start].shallow_clone()
                } else {
                    Tensor::cat(&views[run], 0)
                };
                self.backbone.forward_t(&batch, train)
            })
            .collect();
        self.head.forward(&Tensor::cat(&features, 0))
    }

    /// Loads parameters from a safetensors file.
    pub fn load(&mut self, path: &Path, mode: LoadMode) -> Result<LoadReport> {
        weights::load(&self.vs, path, mode)
    }

    /// Saves every parameter to a safetensors file under the published keys.
    pub fn save(&self, path: &Path) -> Result<()> {
        weights::save(&self.vs, path)
    }

    /// A second network with the same configuration and a copy of these parameters (the
    /// teacher at the start of pre-training).
    pub fn try_clone(&self) -> Result<Self> {
        let mut other = Self::new(&self.cfg, self.device())?;
        other.vs.copy(&self.vs)?;
        Ok(other)
    }
}
