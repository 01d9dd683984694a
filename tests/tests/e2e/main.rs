//! End-to-end tests: the real binaries, driven as a user drives them.

#![allow(clippy::unwrap_used)] // tests fail by panicking

mod cluster;
mod collapse;
mod finetune;
mod hardening;
mod programs;
mod service;
mod up;
