//! Mixed precision: autocast regions in bf16 (default on CUDA) or fp16, on CUDA and the CPU.
//! tch only switches CUDA autocast on, in fp16; the device-generic switches and the dtype
//! setter of libtorch's `at::autocast` are called directly (plain C++ functions taking two
//! one-byte enums, ABI-compatible with these declarations on x86-64 and aarch64 Linux).

use tch::Device;

use crate::{Error, Result};

/// Numeric precision of a forward pass.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Plain float32.
    Fp32,
    /// bfloat16 autocast; parameters and outputs stay float32.
    Bf16,
    /// float16 autocast (CUDA; training then needs a loss scaler).
    Fp16,
}

#[allow(unsafe_code)]
mod ffi {
    //! The `at::autocast` functions used here (libtorch_cpu.so, always linked).
    unsafe extern "C" {
        #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
        pub fn set_autocast_dtype(device: i8, dtype: i8);
        #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
        pub fn get_autocast_dtype(device: i8) -> i8;
        #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
        pub fn set_autocast_enabled(device: i8, enabled: bool);
        #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
        pub fn is_autocast_enabled(device: i8) -> bool;
        #[link_name = "_ZN2at8autocast17increment_nestingEv"]
        pub fn increment_nesting() -> i32;
        #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
        pub fn decrement_nesting() -> i32;
        #[link_name = "_ZN2at8autocast11clear_cacheEv"]
        pub fn clear_cache();
    }

    /// c10::DeviceType values.
    pub const CPU: i8 = 0;
    pub const CUDA: i8 = 1;
    /// c10::ScalarType values.
    pub const HALF: i8 = 5;
    pub const BFLOAT16: i8 = 15;

    pub fn dtype(device: i8) -> i8 {
        // SAFETY: a plain getter of a thread-local setting; any device type value is valid.
        unsafe { get_autocast_dtype(device) }
    }

    pub fn enabled(device: i8) -> bool {
        // SAFETY: as above.
        unsafe { is_autocast_enabled(device) }
    }

    /// Enables autocast for `device` in `dtype`; returns the previous (enabled, dtype).
    pub fn enter(device: i8, dtype: i8) -> (bool, i8) {
        let previous = (enabled(device), self::dtype(device));
        // SAFETY: thread-local setters with valid enum values; nesting is balanced by `exit`.
        unsafe {
            set_autocast_dtype(device, dtype);
            set_autocast_enabled(device, true);
            increment_nesting();
        }
        previous
    }

    pub fn exit(device: i8, previous: (bool, i8)) {
        // SAFETY: restores what `enter` saw; clears the cast cache when leaving the outermost
        // region, as torch.autocast does.
        unsafe {
            if decrement_nesting() == 0 {
                clear_cache();
            }
            set_autocast_enabled(device, previous.0);
            set_autocast_dtype(device, previous.1);
        }
    }
}

struct Region {
    device: i8,
    previous: (bool, i8),
}

impl Drop for Region {
    fn drop(&mut self) {
        ffi::exit(self.device, self.previous);
    }
}

/// Runs `f` in the requested precision on `device` (autocast for bf16/fp16). fp16 needs CUDA.
pub fn with_precision<T>(precision: Precision, device: Device, f: impl FnOnce() -> T) -> Result<T> {
    let dtype = match precision {
        Precision::Fp32 => return Ok(f()),
        Precision::Bf16 => ffi::BFLOAT16,
        Precision::Fp16 if device.is_cuda() => ffi::HALF,
        Precision::Fp16 => {
            return Err(Error::Input {
                name: "precision".into(),
                reason: "fp16 autocast needs a CUDA device; use bf16 or fp32 on the CPU".into(),
            });
        }
    };
    let device = if device.is_cuda() {
        ffi::CUDA
    } else {
        ffi::CPU
    };
    let _region = Region {
        device,
        previous: ffi::enter(device, dtype),
    };
    Ok(f())
}

/// Whether autocast is on for `device` right now (for tests and assertions).
pub fn autocast_enabled(device: Device) -> bool {
    ffi::enabled(if device.is_cuda() {
        ffi::CUDA
    } else {
        ffi::CPU
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn bf16_autocast_on_the_cpu_and_restored_after() {
        let _rng = crate::test_support::rng_lock();
        let a = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([8, 3], (Kind::Float, Device::Cpu));
        assert!(!autocast_enabled(Device::Cpu));
        let kind = with_precision(Precision::Bf16, Device::Cpu, || {
            assert!(autocast_enabled(Device::Cpu));
            a.matmul(&b).kind()
        })
        .unwrap();
        assert_eq!(kind, Kind::BFloat16);
        assert!(!autocast_enabled(Device::Cpu));
        assert_eq!(a.matmul(&b).kind(), Kind::Float);
        let fp32 = with_precision(Precision::Fp32, Device::Cpu, || a.matmul(&b).kind()).unwrap();
        assert_eq!(fp32, Kind::Float);
        assert!(with_precision(Precision::Fp16, Device::Cpu, || ()).is_err());
    }
}
