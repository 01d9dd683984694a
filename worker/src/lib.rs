//! The endofm worker library: the Endo-FM network on libtorch (`model`), the self-supervised
//! objective (`train`), pre-training views (`data`), the downstream datasets and their
//! fine-tuning loaders (`datasets`), reference-vector checks (`verify`), clip
//! encoding and decoding (`video`),
//! procedural endoscopy clips (`synth`), and the worker's command line (`cli`).
//! The service side (`agent`: the per-node agent and its rank processes) talks gRPC to the
//! coordinator; `model`, `video` and `synth` never do RPC.

pub mod agent;
pub mod bench;
pub mod cli;
pub mod collective;
pub mod convert;
pub mod data;
pub mod datasets;
pub mod embed;
pub mod error;
pub mod eval;
pub mod finetune;
pub mod infer;
pub mod init;
pub mod model;
pub mod precision;
pub mod pretrain;
pub mod run;
pub mod store;
pub mod synth;
pub mod train;
pub mod verify;
pub mod video;

pub use error::{Error, Result};

#[cfg(test)]
pub(crate) mod test_support {
    //! libtorch's default generator is one per process: unit tests that seed it and expect
    //! reproducible draws hold this lock so that tests running in parallel do not interleave.
    use std::sync::{Mutex, MutexGuard};

    static RNG: Mutex<()> = Mutex::new(());

    /// Exclusive use of libtorch's global generator for the caller's scope.
    pub fn rng_lock() -> MutexGuard<'static, ()> {
        RNG.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A network small enough for unit tests of training code: `depth` blocks of width 32 on
    /// 32-pixel views, a 32-prototype head.
    pub fn small_model(depth: usize) -> endofm_shared::ModelConfig {
        let mut c = endofm_shared::Preset::Tiny.config();
        c.depth = depth;
        c.embed_dim = 32;
        c.num_heads = 2;
        c.img_size = 32;
        c.head.out_dim = 32;
        c.head.hidden_dim = 16;
        c.head.bottleneck_dim = 8;
        c
    }
}
