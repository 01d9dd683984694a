//! Gradient synchronisation behind one trait. A rank hands flat float32 buffers to
//! [`Collective::all_reduce_sum`]; backends (a TCP ring on CPUs, NCCL on GPUs) implement it.
//! Knows nothing about the model.

pub mod nccl;
pub mod ring;

pub use nccl::NcclCollective;
pub use ring::RingCollective;

use tch::Tensor;

use crate::Result;

/// A group of ranks that sum buffers together.
pub trait Collective: Send {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Replaces `buffer` on every rank by the element-wise sum over all ranks.
    fn all_reduce_sum(&mut self, buffer: &mut Tensor) -> Result<()>;
}

/// The group of one: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buffer: &mut Tensor) -> Result<()> {
        Ok(())
    }
}
