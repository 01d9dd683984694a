//! Reading and writing parameters as safetensors under the reference's state-dict keys. Loading
//! is strict by default: a missing or unexpected key, or a wrong shape, is an error naming the
//! key. Keys prefixed `module.` (saved from a DistributedDataParallel wrapper) are accepted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use tch::{Kind, Tensor, nn::VarStore};

use crate::{Error, Result};

/// How to treat keys that do not match the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// Every parameter present with its shape, nothing extra (the default).
    Strict,
    /// Load what matches (same key and shape is still required for a key both sides have),
    /// report the rest.
    Partial,
}

/// What a load did.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Parameters copied from the file.
    pub loaded: usize,
    /// Network parameters the file lacked (only in [`LoadMode::Partial`]).
    pub missing: Vec<String>,
    /// File tensors the network has no parameter for (only in [`LoadMode::Partial`]).
    pub unexpected: Vec<String>,
}

/// Reads every tensor of a safetensors file, keyed by name.
pub fn read(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::Io {
            action: "reading",
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let tensors = Tensor::read_safetensors(path).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(tensors.into_iter().collect())
}

/// Writes named tensors to `path` atomically (a temporary file renamed into place), keys sorted.
pub fn write(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let io = |source| Error::Io {
        action: "writing",
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let named: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(k, t)| (k.as_str(), t.to_device(tch::Device::Cpu).contiguous()))
        .collect();
    let tmp = path.with_extension("safetensors.partial");
    Tensor::write_safetensors(&named, &tmp).map_err(|e| Error::Safetensors {
        path: tmp.clone(),
        reason: e.to_string(),
    })?;
    std::fs::rename(&tmp, path).map_err(|e| {
        // Nothing half-written stays behind (e.g. when `path` is a directory).
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

/// Saves every variable of `vs` (frozen ones included) under its path.
pub fn save(vs: &VarStore, path: &Path) -> Result<()> {
    let tensors: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    write(path, &tensors)
}

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

/// Copies the tensors of `path` into the variables of `vs`.
pub fn load(vs: &VarStore, path: &Path, mode: LoadMode) -> Result<LoadReport> {
    let file = read(path)?;
    load_tensors(vs, file, path, mode)
}

/// Copies already-read tensors into `vs` (`origin` names them in errors).
pub fn load_tensors(
    vs: &VarStore,
    tensors: BTreeMap<String, Tensor>,
    origin: &Path,
    mode: LoadMode,
) -> Result<LoadReport> {
    let file: BTreeMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| match k.strip_prefix("module.") {
            Some(stripped) => (stripped.to_string(), t),
            None => (k, t),
        })
        .collect();
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let mut report = LoadReport::default();

    for (key, var) in &vars {
        let Some(src) = file.get(key) else {
            if mode == LoadMode::Strict {
                return Err(Error::MissingKey {
                    path: origin.to_path_buf(),
                    key: key.clone(),
                    expected: var.size(),
                });
            }
            report.missing.push(key.clone());
            continue;
        };
        if src.size() != var.size() {
            return Err(Error::ShapeMismatch {
                path: origin.to_path_buf(),
                key: key.clone(),
                expected: var.size(),
                found: src.size(),
            });
        }
        // Parameters and float buffers take float tensors; integer buffers (BatchNorm's
        // `num_batches_tracked`) integer ones.
        if is_float(var.kind()) != is_float(src.kind()) {
            return Err(Error::DType {
                name: format!("{} in {}", key, origin.display()),
                found: format!("{:?}", src.kind()),
                expected: if is_float(var.kind()) {
                    "a floating-point type"
                } else {
                    "an integer type"
                },
            });
        }
    }
    let known: BTreeSet<&String> = vars.keys().collect();
    for (key, t) in &file {
        if !known.contains(key) {
            if mode == LoadMode::Strict {
                return Err(Error::UnexpectedKey {
                    path: origin.to_path_buf(),
                    key: key.clone(),
                    found: t.size(),
                });
            }
            report.unexpected.push(key.clone());
        }
    }
    // Everything checked: copy (nothing is half-loaded on error).
    tch::no_grad(|| {
        for (key, var) in &vars {
            if let Some(src) = file.get(key) {
                let mut var = var.shallow_clone();
                var.copy_(&src.to_device(var.device()).to_kind(var.kind()));
                report.loaded += 1;
            }
        }
    });
    Ok(report)
}
