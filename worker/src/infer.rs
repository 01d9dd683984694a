//! Inference over named tensors: every `NAME.input` video batch of a safetensors file goes
//! through the network in eval mode and yields `NAME.features` (the backbone's CLS feature) and
//! `NAME.head` (the projection head's output). Used by `model forward` and the reference checks.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use crate::model::EndoFm;
pub use crate::precision::{Precision, with_precision};
use crate::{Error, Result};

/// Suffix that marks an input tensor.
pub const INPUT_SUFFIX: &str = ".input";

/// Forward of every `NAME.input` in `inputs`; returns `NAME.features` and `NAME.head` (CPU,
/// float32). Other tensors are ignored; a file without any input is an error.
pub fn forward_named(
    model: &EndoFm,
    inputs: &BTreeMap<String, Tensor>,
    precision: Precision,
) -> Result<BTreeMap<String, Tensor>> {
    let named: Vec<(&str, &Tensor)> = inputs
        .iter()
        .filter_map(|(k, t)| k.strip_suffix(INPUT_SUFFIX).map(|n| (n, t)))
        .collect();
    if named.is_empty() {
        return Err(Error::Input {
            name: "(inputs)".into(),
            reason: format!(
                "no tensor named NAME{INPUT_SUFFIX}; found: {}",
                inputs.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        });
    }
    // Check everything before computing anything.
    for (name, t) in &named {
        let key = format!("{name}{INPUT_SUFFIX}");
        if t.kind() != Kind::Float {
            return Err(Error::DType {
                name: key,
                found: format!("{:?}", t.kind()),
                expected: "float32",
            });
        }
        model.backbone().check_input(&key, t)?;
    }
    let device = model.device();
    let mut out = BTreeMap::new();
    for (name, t) in named {
        let x = t.to_device(device);
        let (features, head) = with_precision(precision, device, || {
            tch::no_grad(|| model.forward_t(&x, false))
        })?;
        tracing::debug!(input = name, shape = ?t.size(), "forward done");
        out.insert(
            format!("{name}.features"),
            features.to_kind(Kind::Float).to_device(Device::Cpu),
        );
        out.insert(
            format!("{name}.head"),
            head.to_kind(Kind::Float).to_device(Device::Cpu),
        );
    }
    Ok(out)
}
