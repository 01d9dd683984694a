//! Shared helpers: where the reference vectors are, running the worker binary.

use std::path::PathBuf;
use std::process::{Command, Output};

/// `shared/reference` of the project (beside the repository), or `ENDOFM_REFERENCE_DIR`.
pub fn reference_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("ENDOFM_REFERENCE_DIR") {
        return PathBuf::from(dir);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference");
    assert!(
        dir.is_dir(),
        "reference vectors not found at {} (set ENDOFM_REFERENCE_DIR)",
        dir.display()
    );
    dir
}

/// The tiny reference directory.
pub fn tiny() -> PathBuf {
    reference_root().join("endofm-tiny")
}

/// Runs `endofm-worker` with `args`.
pub fn worker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_endofm-worker"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running endofm-worker")
}

/// stdout of a successful run, or a panic showing stderr.
pub fn worker_ok(args: &[&str]) -> String {
    let out = worker(args);
    assert!(
        out.status.success(),
        "endofm-worker {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr of a failed run, or a panic when it succeeded.
pub fn worker_err(args: &[&str]) -> String {
    let out = worker(args);
    assert!(
        !out.status.success(),
        "endofm-worker {args:?} should have failed; stdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The venv's python (with torch), for building and reading PyTorch pickles.
pub fn python() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(p.exists(), "{} missing: run scripts/setup.sh", p.display());
    p
}

/// Runs a python snippet with the venv; panics with its stderr on failure.
pub fn run_python(code: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
