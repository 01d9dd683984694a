//! Integration tests of the worker: parity with the published code's vectors, weight names and
//! files, checkpoint conversion, and the command line. One test binary, modules by concern.

#![allow(clippy::unwrap_used)] // tests fail by panicking

mod cli;
mod convert;
mod gpu;
mod parity;
mod pretrain;
mod support;
mod weights;
