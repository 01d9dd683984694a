//! Import of PyTorch checkpoints (pickles with `student` / `teacher` state dicts, as published)
//! into safetensors, and export of ours into that pickle format, by running the converter script
//! embedded here with the project venv's torch.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

const SCRIPT: &str = include_str!("../python/checkpoint.py");

/// The Python interpreter used for conversions: `--python`, then `ENDOFM_PYTHON`, then the
/// venv the worker was built against, then `python3`.
pub fn python(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("ENDOFM_PYTHON") {
        return PathBuf::from(p);
    }
    match option_env!("ENDOFM_VENV_PYTHON") {
        Some(p) if Path::new(p).exists() => PathBuf::from(p),
        _ => PathBuf::from("python3"),
    }
}

/// Runs the converter with `args`; returns its stdout (one JSON line).
fn run(python: &Path, args: &[&std::ffi::OsStr]) -> Result<String> {
    let output = Command::new(python)
        .arg("-c")
        .arg(SCRIPT)
        .args(args)
        .output()
        .map_err(|e| Error::Convert(format!("cannot run {}: {e}", python.display())))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let msg = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        return Err(Error::Convert(
            msg.trim_start_matches("error: ").to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// Converts the checkpoint `src` into `out_dir/{student,teacher}.safetensors`
/// (or `state_dict.safetensors`); returns the converter's JSON report.
pub fn import(python: &Path, src: &Path, out_dir: &Path, trust: bool) -> Result<String> {
    let mut args = vec!["import".as_ref(), src.as_os_str(), out_dir.as_os_str()];
    if trust {
        args.push("--trust".as_ref());
    }
    run(python, &args)
}

/// Writes `out` as a reference-style checkpoint from our safetensors files.
pub fn export(
    python: &Path,
    student: &Path,
    teacher: Option<&Path>,
    out: &Path,
    epoch: Option<u64>,
) -> Result<String> {
    let epoch = epoch.map(|e| e.to_string());
    let mut args = vec![
        "export".as_ref(),
        out.as_os_str(),
        "--student".as_ref(),
        student.as_os_str(),
    ];
    if let Some(t) = teacher {
        args.push("--teacher".as_ref());
        args.push(t.as_os_str());
    }
    if let Some(e) = &epoch {
        args.push("--epoch".as_ref());
        args.push(e.as_ref());
    }
    run(python, &args)
}
