//! Self-supervised pre-training: the DINO/SVT objective with its centre ([`loss`]), the
//! multi-view student/teacher forward ([`ssl`]), the schedules ([`schedule`]), and the updates
//! over flat parameter buffers: AdamW, per-tensor clipping, EMA ([`optim`]); the collapse
//! diagnostics and their monitor ([`diagnostics`]).

pub mod diagnostics;
pub mod loss;
pub mod optim;
pub mod schedule;
pub mod ssl;
pub mod step;
