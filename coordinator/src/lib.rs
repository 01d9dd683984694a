//! The endofm coordinator and CLI library: the durable store, the scheduling state machine,
//! the gRPC server and metrics, and the client side used by the `endofm` command line.
//! Never links libtorch, FFmpeg or CUDA (a test checks the binary's dynamic section).

pub mod client;
pub mod core;
pub mod error;
pub mod metrics;
pub mod records;
pub mod server;
pub mod store;

pub use error::{Error, Result};
