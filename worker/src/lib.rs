//! The endofm worker library: the Endo-FM network on libtorch (`model`), the pre-training views
//! (`data`), the self-supervised objective (`train`), reference-vector checks (`verify`), and
//! the worker's command line (`cli`).
//! Nothing here does RPC yet; `model` never will.

pub mod cli;
pub mod convert;
pub mod data;
pub mod error;
pub mod infer;
pub mod model;
pub mod train;
pub mod verify;

pub use error::{Error, Result};
