//! The multi-view forward of one self-supervised step: the teacher (an EMA copy of the student,
//! kept in training mode like the reference, so its drop-path is active) sees the global views
//! without gradients; the student sees every view.

use tch::Tensor;

use crate::model::EndoFm;

/// Outputs of the two networks for one batch of views.
#[derive(Debug)]
pub struct SslOutputs {
    /// Student head outputs, view-major: (views·B, out_dim).
    pub student: Tensor,
    /// Teacher head outputs for the global views, view-major: (globals·B, out_dim).
    pub teacher: Tensor,
}

/// Runs teacher and student on `views` (global views first), in training mode.
pub fn forward(
    student: &EndoFm,
    teacher: &EndoFm,
    views: &[Tensor],
    global_views: usize,
) -> SslOutputs {
    let teacher_out = tch::no_grad(|| teacher.forward_views(&views[..global_views], true));
    let student_out = student.forward_views(views, true);
    SslOutputs {
        student: student_out,
        teacher: teacher_out,
    }
}
