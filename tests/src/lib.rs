//! Support for the end-to-end tests: locating (building if needed) the real binaries of the
//! workspace, and running them with a deadline.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The workspace's target profile directory this test binary was built into.
fn profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test binary")?;
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("test binary is not inside target/<profile>/deps")
}

/// Path of the workspace binary `name` (`endofm`, `endofm-worker`), built with cargo first if it
/// is not there yet (cargo builds other packages' binaries only for their own tests).
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let dir = profile_dir()?;
    let path = dir.join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let release = dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--bin", name]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .context("running cargo build")?;
        if !status.success() || !path.exists() {
            bail!("could not build {name} at {}", path.display());
        }
    }
    Ok(path)
}

/// Runs `bin args`, killing it after `timeout`; returns its output.
pub fn run(bin: &Path, args: &[&str], timeout: Duration) -> anyhow::Result<Output> {
    let mut child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let started = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "{} {args:?} did not finish within {timeout:?}; stderr:\n{}",
                bin.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Parses every stdout line of a successful run as JSON.
pub fn json_lines(out: &Output) -> anyhow::Result<Vec<serde_json::Value>> {
    if !out.status.success() {
        bail!("command failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect()
}
