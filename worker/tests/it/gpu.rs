//! CUDA checks: the same parity in fp32 on the GPU, a bf16 autocast forward within 2e-2, and the
//! NCCL backend in a world of one. Skipped, with a message saying so, on machines without a GPU.

use std::time::{Duration, Instant};

use endofm_worker::collective::{Collective, NcclCollective, nccl};
use endofm_worker::infer::Precision;
use endofm_worker::verify::{self, ReferenceDir, Tolerances};
use tch::{Device, Kind, Tensor};

use crate::support;

fn gpu(test: &str) -> Option<Device> {
    if tch::Cuda::is_available() {
        Some(Device::Cuda(0))
    } else {
        // Written past libtest's capture so the skip shows in every run's output.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: no CUDA device visible to libtorch; runs only on a GPU machine"
        );
        None
    }
}

#[test]
fn cuda_fp32_parity() {
    let Some(device) = gpu("cuda_fp32_parity") else {
        return;
    };
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
    let Some(device) = gpu("cuda_bf16_autocast_forward") else {
        return;
    };
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

#[test]
fn nccl_world_of_one_is_the_identity() {
    let Some(device) = gpu("nccl_world_of_one_is_the_identity") else {
        assert!(!nccl::available());
        return;
    };
    assert!(
        nccl::available(),
        "CUDA is here but libnccl.so does not load"
    );
    let id = nccl::unique_id().unwrap();
    let mut group = NcclCollective::connect(0, 1, &id, 0, Duration::from_secs(60)).unwrap();
    assert_eq!((group.rank(), group.world_size()), (0, 1));
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        let x = Tensor::randn([(1 << 20) + 3], (kind, device));
        // Computed on libtorch's stream just before: the all-reduce must be ordered after it.
        let mut buffer = &x * 2.0;
        group.all_reduce_sum(&mut buffer).unwrap();
        let expected = &x * 2.0;
        assert!(
            buffer.equal(&expected),
            "{kind:?}: all-reduce of one rank changed the buffer"
        );
    }
    // Buffers it cannot take are refused and leave the group usable.
    let mut on_cpu = Tensor::ones([4], (Kind::Float, Device::Cpu));
    assert!(group.all_reduce_sum(&mut on_cpu).is_err());
    let mut strided = Tensor::ones([4, 4], (Kind::Float, device)).tr();
    assert!(group.all_reduce_sum(&mut strided).is_err());
    let mut ints = Tensor::ones([4], (Kind::Int64, device));
    assert!(group.all_reduce_sum(&mut ints).is_err());
    let mut ones = Tensor::ones([4], (Kind::Float, device));
    group.all_reduce_sum(&mut ones).unwrap();
    assert!(ones.equal(&Tensor::ones([4], (Kind::Float, device))));
}

#[test]
fn nccl_missing_peer_fails_at_the_deadline() {
    let Some(_device) = gpu("nccl_missing_peer_fails_at_the_deadline") else {
        return;
    };
    let id = nccl::unique_id().unwrap();
    let start = Instant::now();
    // Rank 1 never comes: init must give up, abort, and say so, not hang.
    let err = NcclCollective::connect(0, 2, &id, 0, Duration::from_secs(3)).unwrap_err();
    let waited = start.elapsed();
    let text = err.to_string();
    assert!(text.contains("deadline"), "{text}");
    assert!(
        waited < Duration::from_secs(30),
        "gave up after {waited:?}: {text}"
    );
}

#[test]
fn bench_allreduce_nccl_runs_or_says_skipped() {
    let out = support::worker_ok(&[
        "bench",
        "allreduce",
        "--backend",
        "nccl",
        "--mb",
        "1",
        "--iters",
        "2",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["backend"], "nccl", "{out}");
    if gpu("bench_allreduce_nccl_runs_or_says_skipped (checked its skip line)").is_some() {
        assert!(v["algbw_GBps"].as_f64().unwrap() > 0.0, "{out}");
    } else {
        assert!(
            v["skipped"].as_str().unwrap().starts_with("SKIPPED"),
            "{out}"
        );
    }
}
