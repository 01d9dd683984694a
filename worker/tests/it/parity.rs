//! Parity with the vectors computed by the published PyTorch code (fp32, CPU).

use endofm_worker::infer::Precision;
use endofm_worker::verify::{self, ReferenceDir, Tolerances};
use tch::Device;

use crate::support;

#[test]
fn forward_matches_the_reference_on_all_cases() {
    let dir = ReferenceDir::open(&support::tiny()).unwrap();
    let model = dir.model(Device::Cpu).unwrap();
    let tol = Tolerances::FP32;
    let cases = verify::check_forward(
        &model,
        &dir.file("forward.safetensors"),
        Precision::Fp32,
        &tol,
    )
    .unwrap();
    let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["g16", "g8", "l2", "l4", "t1"]);
    let worst = cases
        .iter()
        .map(|c| c.features_rel_err.max(c.head_rel_err))
        .fold(0.0, f64::max);
    for c in &cases {
        assert!(
            c.pass,
            "case {} {:?}: features rel err {:.3e}, head rel err {:.3e} (tolerance {:.0e}; worst of all cases {worst:.3e})",
            c.name, c.shape, c.features_rel_err, c.head_rel_err, tol.forward_rel
        );
    }
}

#[test]
fn training_step_matches_the_reference() {
    let dir = ReferenceDir::open(&support::tiny()).unwrap();
    let tol = Tolerances::FP32;
    let r = verify::check_train_step(&dir, Device::Cpu, Precision::Fp32, &tol).unwrap();
    assert_eq!(r.views, 10);
    assert!(r.grad_mismatches.is_empty(), "{:?}", r.grad_mismatches);
    // Every parameter but the frozen head.last_layer.weight_g has a gradient.
    assert_eq!(r.grads_checked, 94);
    assert!(
        r.student_out_rel_err <= tol.outputs_rel && r.teacher_out_rel_err <= tol.outputs_rel,
        "student {:.3e}, teacher {:.3e}",
        r.student_out_rel_err,
        r.teacher_out_rel_err
    );
    assert!(
        r.loss_abs_err <= tol.loss_abs,
        "loss {} vs reference {}: abs err {:.3e}",
        r.loss,
        r.reference_loss,
        r.loss_abs_err
    );
    assert!(
        r.worst_grad_rel_err <= tol.grad_rel,
        "worst gradient {} rel err {:.3e}",
        r.worst_grad,
        r.worst_grad_rel_err
    );
    assert!(r.pass);
}

#[test]
fn bf16_autocast_forward_on_the_cpu_is_within_2e_2() {
    let dir = ReferenceDir::open(&support::tiny()).unwrap();
    let model = dir.model(Device::Cpu).unwrap();
    let tol = Tolerances::BF16;
    let cases = verify::check_forward(
        &model,
        &dir.file("forward.safetensors"),
        Precision::Bf16,
        &tol,
    )
    .unwrap();
    for c in &cases {
        assert!(
            c.pass,
            "bf16 case {}: features {:.3e}, head {:.3e} (tolerance {:.0e})",
            c.name, c.features_rel_err, c.head_rel_err, tol.forward_rel
        );
        // And it really ran in reduced precision.
        assert!(
            c.features_rel_err > 1e-5,
            "bf16 run is as exact as fp32: autocast off?"
        );
    }
}
