//! Polyp segmentation (CVC-12k) as the published TransUNet `trainer.py` fine-tunes it: the
//! hybrid network ([`crate::model::Segmenter`]) on the frames of one sequence at a time, the
//! loss of [`loss`], AdamW with polynomial decay.

pub mod loss;
