//! `--devices`: which slots this worker offers. `cpu` is one CPU slot, `cpu:N` is N CPU slots
//! (indices 0..N), `cuda` is every visible GPU, `cuda:0,1` the listed GPUs. Indices are unique and
//! GPUs must exist; one rank runs per slot.

use endofm_proto::v1;
use endofm_shared::DeviceKind;

use crate::{Error, Result};

/// The most CPU slots one worker offers.
const MAX_CPU_SLOTS: u32 = 256;

/// One slot a rank can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceSlot {
    /// CPU or CUDA.
    pub kind: DeviceKind,
    /// Index within the kind.
    pub index: u32,
}

impl DeviceSlot {
    /// `cpu:0`, `cuda:1`: the metrics label and log name.
    pub fn label(&self) -> String {
        format!("{}:{}", self.kind.name(), self.index)
    }

    /// The slot as registered with the coordinator.
    pub fn to_proto(&self) -> v1::Device {
        v1::Device {
            kind: self.kind.name().to_string(),
            index: self.index,
            name: self.label(),
            memory_bytes: 0,
        }
    }
}

fn bad(text: &str, reason: impl Into<String>) -> Error {
    Error::Service {
        what: format!("--devices `{text}`"),
        reason: reason.into(),
    }
}

/// Parses `--devices`; `cuda_count` is asked for the number of visible GPUs only for `cuda`.
pub fn parse_devices(text: &str, cuda_count: impl FnOnce() -> usize) -> Result<Vec<DeviceSlot>> {
    let (kind, rest) = match text.split_once(':') {
        Some((k, r)) => (k, Some(r)),
        None => (text, None),
    };
    match (kind, rest) {
        ("cpu", None) => Ok(vec![DeviceSlot {
            kind: DeviceKind::Cpu,
            index: 0,
        }]),
        ("cpu", Some(n)) => {
            let n: u32 = n
                .parse()
                .map_err(|_| bad(text, "expected cpu:N with N a number of slots"))?;
            if !(1..=MAX_CPU_SLOTS).contains(&n) {
                return Err(bad(
                    text,
                    format!("{n} CPU slots is outside 1..={MAX_CPU_SLOTS}"),
                ));
            }
            Ok((0..n)
                .map(|index| DeviceSlot {
                    kind: DeviceKind::Cpu,
                    index,
                })
                .collect())
        }
        ("cuda", rest) => {
            let count = cuda_count();
            let indices: Vec<u32> = match rest {
                None => {
                    if count == 0 {
                        return Err(bad(text, "no CUDA device is visible"));
                    }
                    (0..count as u32).collect()
                }
                Some(list) => list
                    .split(',')
                    .map(|i| {
                        i.trim()
                            .parse::<u32>()
                            .map_err(|_| bad(text, format!("`{i}` is not a GPU index (cuda:0,1)")))
                    })
                    .collect::<Result<_>>()?,
            };
            let mut seen = std::collections::HashSet::new();
            for &i in &indices {
                if !seen.insert(i) {
                    return Err(bad(text, format!("GPU {i} is listed twice")));
                }
                if i as usize >= count {
                    return Err(bad(
                        text,
                        format!("GPU {i} requested, but {count} CUDA device(s) are visible"),
                    ));
                }
            }
            Ok(indices
                .into_iter()
                .map(|index| DeviceSlot {
                    kind: DeviceKind::Cuda,
                    index,
                })
                .collect())
        }
        _ => Err(bad(text, "use cpu, cpu:N, cuda or cuda:I,J,...")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(slots: &[DeviceSlot]) -> Vec<String> {
        slots.iter().map(DeviceSlot::label).collect()
    }

    #[test]
    fn device_lists_parse() {
        let none = || panic!("CPU lists must not ask for GPUs");
        assert_eq!(kinds(&parse_devices("cpu", none).unwrap()), ["cpu:0"]);
        assert_eq!(
            kinds(&parse_devices("cpu:3", || 0).unwrap()),
            ["cpu:0", "cpu:1", "cpu:2"]
        );
        assert_eq!(
            kinds(&parse_devices("cuda:0,1", || 2).unwrap()),
            ["cuda:0", "cuda:1"]
        );
        assert_eq!(
            kinds(&parse_devices("cuda", || 2).unwrap()),
            ["cuda:0", "cuda:1"]
        );
        assert_eq!(kinds(&parse_devices("cuda:1", || 2).unwrap()), ["cuda:1"]);
    }

    #[test]
    fn bad_device_lists_are_refused() {
        for (text, needle) in [
            ("gpu", "use cpu"),
            ("cpu:0", "outside"),
            ("cpu:x", "number of slots"),
            ("cuda", "no CUDA device"),
            ("cuda:0,0", "twice"),
            ("cuda:2", "1 CUDA device"),
            ("cuda:a", "not a GPU index"),
        ] {
            let err = parse_devices(text, || if text == "cuda" { 0 } else { 1 })
                .expect_err(text)
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
            assert!(err.contains("--devices"), "{text}: {err}");
        }
    }
}
