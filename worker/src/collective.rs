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
    fn all_reduce_sum(&mut self, buffer: &mut Tensor) -> Result<()> {
        // The identity, but held to the contract of every backend, so that one-process runs
        // catch a buffer a multi-rank run would refuse.
        check_float32(buffer)
    }
}

/// The buffer contract every backend shares: float32 elements.
///
/// Errors: [`crate::Error::DType`] naming the buffer and its element type.
pub fn check_float32(buffer: &Tensor) -> Result<()> {
    if buffer.kind() != tch::Kind::Float {
        return Err(crate::Error::DType {
            name: "all-reduce buffer".into(),
            found: format!("{:?}", buffer.kind()),
            expected: "f32",
        });
    }
    Ok(())
}
