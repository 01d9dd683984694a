//! Links the worker (and its test binaries) so it runs without LD_LIBRARY_PATH: an rpath to
//! libtorch and to the CUDA libraries of the venv's `nvidia/*` wheels, and `libtorch_cuda`
//! forced into DT_NEEDED (the linker's `--as-needed` would otherwise drop it, leaving CUDA
//! unavailable at run time). Makes the `libnccl.so` link next to the wheel's `libnccl.so.2`
//! (cudarc's loader only looks for the former; that dir is on the rpath). Also checks that the
//! libtorch found is 2.13.0, since torch-sys skips that check when `LIBTORCH` is set.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB unset: binaries will need LD_LIBRARY_PATH");
        return;
    };
    let lib = PathBuf::from(lib);
    let lib = lib.canonicalize().unwrap_or(lib);
    check_version(&lib);
    let mut rpaths = vec![lib.clone()];
    // <site-packages>/torch/lib -> <site-packages>/nvidia/*/lib
    if let Some(site) = lib.parent().and_then(Path::parent)
        && let Ok(entries) = std::fs::read_dir(site.join("nvidia"))
    {
        {
            let mut dirs: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path().join("lib")))
                .filter(|p| p.is_dir())
                .collect();
            dirs.sort();
            rpaths.extend(dirs);
        }
    }
    if let Some(nccl) = rpaths.iter().find(|d| d.join("libnccl.so.2").exists()) {
        link_libnccl(nccl);
    }
    // The venv's python runs the checkpoint converter (torch pickles) at run time.
    // <venv>/lib/pythonX.Y/site-packages/torch/lib -> <venv>/bin/python
    if let Some(venv) = lib.ancestors().nth(5) {
        let python = venv.join("bin").join("python");
        if python.exists() {
            println!("cargo:rustc-env=ENDOFM_VENV_PYTHON={}", python.display());
        }
    }
    for dir in &rpaths {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    }
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}

/// `libnccl.so -> libnccl.so.2` in `dir`, unless a `libnccl.so` is there already.
fn link_libnccl(dir: &Path) {
    let link = dir.join("libnccl.so");
    if link.symlink_metadata().is_ok() {
        return;
    }
    if let Err(e) = std::os::unix::fs::symlink("libnccl.so.2", &link) {
        println!(
            "cargo:warning=cannot create {} ({e}): the NCCL backend will not find NCCL",
            link.display()
        );
    }
}

fn check_version(lib: &Path) {
    let version_file = lib.parent().map(|torch| torch.join("version.py"));
    let Some(text) = version_file.and_then(|f| std::fs::read_to_string(f).ok()) else {
        println!(
            "cargo:warning=cannot read torch/version.py next to {}",
            lib.display()
        );
        return;
    };
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| v.trim().trim_matches('\'').trim_matches('"').to_string())
        .unwrap_or_default();
    if !version.starts_with("2.13.0") {
        panic!(
            "libtorch at {} is version `{version}`, but tch 0.26 needs 2.13.0: run scripts/setup.sh",
            lib.display()
        );
    }
}
