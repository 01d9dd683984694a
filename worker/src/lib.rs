//! The endofm worker library: the Endo-FM network on libtorch (`model`), the self-supervised
//! objective (`train`), reference-vector checks (`verify`), clip encoding and decoding (`video`),
//! procedural endoscopy clips (`synth`), and the worker's command line (`cli`).
//! Nothing here does RPC yet; `model`, `video` and `synth` never will.

pub mod cli;
pub mod convert;
pub mod error;
pub mod infer;
pub mod model;
pub mod synth;
pub mod train;
pub mod verify;
pub mod video;

pub use error::{Error, Result};
