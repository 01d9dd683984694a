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
/// (or `state_dict.safetensors`); returns the converter's JSON report. Nothing appears in
/// `out_dir` unless the whole conversion succeeded (see [`import_checked`]).
pub fn import(python: &Path, src: &Path, out_dir: &Path, trust: bool) -> Result<String> {
    import_checked(python, src, out_dir, trust, |_, _| Ok(()))
}

/// Like [`import`], with `check(file, name)` run on every converted file (`name`: `student`,
/// `teacher` or `state_dict`) before anything is moved into `out_dir`: the conversion goes to a
/// staging folder beside `out_dir`, and only a conversion whose every file passes is moved
/// there. Errors name `src` and the file (and the check's key, when it names one).
pub fn import_checked(
    python: &Path,
    src: &Path,
    out_dir: &Path,
    trust: bool,
    check: impl Fn(&Path, &str) -> Result<()>,
) -> Result<String> {
    if !src.is_file() {
        return Err(Error::Convert(format!(
            "{}: no such checkpoint file",
            src.display()
        )));
    }
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|source| Error::Io {
        action: "creating",
        path: parent.clone(),
        source,
    })?;
    let staging = tempfile::Builder::new()
        .prefix(".endofm-import-")
        .tempdir_in(&parent)
        .map_err(|source| Error::Io {
            action: "creating a staging folder in",
            path: parent.clone(),
            source,
        })?;
    let mut args = vec![
        "import".as_ref(),
        src.as_os_str(),
        staging.path().as_os_str(),
    ];
    if trust {
        args.push("--trust".as_ref());
    }
    let report = run(python, &args).map_err(|e| match e {
        Error::Convert(msg) => Error::Convert(format!("{}: {msg}", src.display())),
        e => e,
    })?;
    let mut files: Vec<(String, PathBuf)> = std::fs::read_dir(staging.path())
        .map_err(|source| Error::Io {
            action: "listing",
            path: staging.path().to_path_buf(),
            source,
        })?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".safetensors")?.to_string();
            Some((stem, e.path()))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Convert(format!(
            "{}: the converter wrote no weights",
            src.display()
        )));
    }
    for (name, path) in &files {
        check(path, name).map_err(|e| {
            let text = e.to_string().replace(
                &path.display().to_string(),
                &format!("{} ({name})", src.display()),
            );
            Error::Convert(format!(
                "{}: the imported {name} does not fit the configuration: {text}; nothing was written to {}",
                src.display(),
                out_dir.display()
            ))
        })?;
    }
    std::fs::create_dir_all(out_dir).map_err(|source| Error::Io {
        action: "creating",
        path: out_dir.to_path_buf(),
        source,
    })?;
    for (name, path) in &files {
        let dest = out_dir.join(format!("{name}.safetensors"));
        std::fs::rename(path, &dest).map_err(|source| Error::Io {
            action: "moving the imported weights to",
            path: dest.clone(),
            source,
        })?;
    }
    Ok(report.replace(
        &staging.path().display().to_string(),
        &out_dir.display().to_string(),
    ))
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
