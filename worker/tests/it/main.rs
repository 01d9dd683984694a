//! Integration tests of the worker: parity with the published code's vectors, weight names and
//! files, checkpoint conversion, the command line, and object storage on a real S3 server. One
//! test binary, modules by concern.

#![allow(clippy::unwrap_used)] // tests fail by panicking

mod agent;
mod cli;
mod convert;
mod corpus;
mod datasets;
mod detect;
mod detect_run;
mod faults;
mod finetune;
mod gpu;
mod parity;
mod pretrain;
mod s3;
mod segment;
mod support;
mod trajectory;
mod weights;
