//! The `endofm` binary must not depend on libtorch or FFmpeg: read its dynamic section.

#![allow(clippy::unwrap_used)] // tests fail by panicking

use std::process::Command;

#[test]
fn endofm_binary_does_not_link_libtorch_or_ffmpeg() {
    let bin = env!("CARGO_BIN_EXE_endofm");
    let out = Command::new("readelf")
        .args(["-d", bin])
        .output()
        .expect("readelf (Debian binutils, installed by scripts/setup.sh)");
    assert!(
        out.status.success(),
        "readelf failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dynamic = String::from_utf8_lossy(&out.stdout);
    let needed: Vec<&str> = dynamic
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1).map(|s| s.trim_end_matches(']')))
        .collect();
    assert!(
        !needed.is_empty(),
        "no NEEDED entries parsed from:\n{dynamic}"
    );
    let forbidden = [
        "torch", "c10", "avcodec", "avformat", "avutil", "swscale", "cuda", "nccl",
    ];
    let bad: Vec<&&str> = needed
        .iter()
        .filter(|lib| forbidden.iter().any(|f| lib.contains(f)))
        .collect();
    assert!(bad.is_empty(), "endofm links {bad:?} (all: {needed:?})");
    assert!(
        !dynamic.contains("torch"),
        "a libtorch path is in the dynamic section:\n{dynamic}"
    );
}

#[test]
fn presets_command_reports_the_published_counts() {
    let out = Command::new(env!("CARGO_BIN_EXE_endofm"))
        .arg("presets")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let vit: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["preset"] == "vit_b")
        .expect("vit_b listed");
    assert_eq!(vit["params"], 144_397_312u64);
    assert_eq!(vit["backbone_params"], 121_258_752u64);
}
