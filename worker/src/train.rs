//! Self-supervised pre-training pieces shared by the trainer and the reference checks: the
//! DINO/SVT objective with its centre ([`loss`]) and the multi-view student/teacher forward
//! ([`ssl`]).

pub mod loss;
pub mod ssl;
