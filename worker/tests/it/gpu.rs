//! CUDA checks: the same parity in fp32 on the GPU, and a bf16 autocast forward within 2e-2.
//! Skipped, with a message saying so, on machines without a GPU.

use endofm_worker::infer::Precision;
use endofm_worker::verify::{self, ReferenceDir, Tolerances};
use tch::Device;

use crate::support;

fn gpu() -> Option<Device> {
    if tch::Cuda::is_available() {
        Some(Device::Cuda(0))
    } else {
        // Written past libtest's capture so the skip shows in every run's output.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED gpu tests: no CUDA device visible to libtorch; GPU parity runs only on a GPU machine"
        );
        None
    }
}

#[test]
fn cuda_fp32_parity() {
    let Some(device) = gpu() else { return };
    let dir = ReferenceDir::open(&support::tiny()).unwrap();
    let model = dir.model(device).unwrap();
    let tol = Tolerances::FP32;
    for c in verify::check_forward(
        &model,
        &dir.file("forward.safetensors"),
        Precision::Fp32,
        &tol,
    )
    .unwrap()
    {
        assert!(c.pass, "{c:?}");
    }
    let step = verify::check_train_step(&dir, device, Precision::Fp32, &tol).unwrap();
    assert!(step.pass, "{step:?}");
}

#[test]
fn cuda_bf16_autocast_forward() {
    let Some(device) = gpu() else { return };
    let dir = ReferenceDir::open(&support::tiny()).unwrap();
    let model = dir.model(device).unwrap();
    let tol = Tolerances::BF16;
    for c in verify::check_forward(
        &model,
        &dir.file("forward.safetensors"),
        Precision::Bf16,
        &tol,
    )
    .unwrap()
    {
        assert!(c.pass, "{c:?}");
    }
}
