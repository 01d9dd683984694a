//! Many-step pre-training fidelity: `model replay` / `model verify` on the public trajectory
//! (`shared/reference/endofm-trajectory`) through both CPU step paths, and the check failing when
//! a hyper-parameter is perturbed (each perturbation caught by the part of the check it moves).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support;

fn trajectory_dir() -> PathBuf {
    support::reference_root().join("endofm-trajectory")
}

/// `model verify` on `dir`; returns (exit success, the trajectory JSON line's `result`).
fn verify(dir: &Path, threads: &str, one_thread_step: bool) -> (bool, Value) {
    let mut env = vec![("OMP_NUM_THREADS".to_string(), threads.to_string())];
    if one_thread_step {
        env.push(("ENDOFM_ONE_THREAD_STEP".into(), "1".into()));
    }
    let out = support::worker_env(
        &[
            "model",
            "verify",
            "--reference",
            dir.to_str().unwrap(),
            "--threads",
            threads,
        ],
        &env,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["check"] == "trajectory")
        .unwrap_or_else(|| {
            panic!(
                "no trajectory line; stdout:\n{stdout}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (out.status.success(), line["result"].clone())
}

#[test]
fn replay_matches_the_published_trajectory_on_both_cpu_step_paths() {
    for (threads, one, path) in [("2", false, "two-thread"), ("2", true, "intra-op")] {
        let (ok, r) = verify(&trajectory_dir(), threads, one);
        assert_eq!(r["step_path"], path, "{r}");
        assert!(ok && r["pass"] == true, "{path}: {r:#}");
        assert_eq!(r["steps"], 6);
        // 55 parameters, student and teacher.
        assert_eq!(r["params_checked"], 110);
        assert!(r["loss"]["err"].as_f64().unwrap() < 1e-4, "{r}");
    }
}

#[test]
fn replay_writes_loss_and_final_networks_under_published_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("replay.safetensors");
    let stdout = support::worker_ok(&[
        "model",
        "replay",
        "--reference",
        trajectory_dir().to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--threads",
        "2",
    ]);
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["steps"], 6, "{summary}");
    // The published run does not collapse: no warning, and no step anywhere near either kind
    // (uniform: ≥ 0.98 ln K; dominant: batch-mean entropy < 0.1 ln(min(K, clips))).
    assert_eq!(summary["collapse"], serde_json::json!([]), "{summary}");
    let diagnostics = summary["diagnostics"].as_array().unwrap();
    assert_eq!(diagnostics.len(), 6);
    let (ln_k, ln_clips) = (512f64.ln(), 2f64.ln());
    for d in diagnostics {
        let h = d["teacher_entropy"].as_f64().unwrap();
        let hb = d["batch_entropy"].as_f64().unwrap();
        assert!(h < 0.9 * ln_k && hb > 0.5 * ln_clips, "{d}");
        assert!(d["kl"].as_f64().unwrap() >= -1e-4, "{d}");
    }
    let file = tch::Tensor::read_safetensors(&out).unwrap();
    let names: Vec<&str> = file.iter().map(|(k, _)| k.as_str()).collect();
    let loss = &file.iter().find(|(k, _)| k == "loss").unwrap().1;
    assert_eq!(loss.size(), [6]);
    for key in [
        "final.center",
        "final.student.head.last_layer.weight_v",
        "final.teacher.backbone.pos_embed",
        "lr",
        "teacher_temp",
    ] {
        assert!(names.contains(&key), "{key} missing from {names:?}");
    }
    assert_eq!(
        names
            .iter()
            .filter(|k| k.starts_with("final.student."))
            .count(),
        55
    );
}

/// A copy of the trajectory directory (tensors linked) with `edit` applied to config.json.
fn perturbed(edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let src = trajectory_dir();
    let tmp = tempfile::tempdir().unwrap();
    for f in ["weights.safetensors", "trajectory.safetensors"] {
        std::os::unix::fs::symlink(src.join(f), tmp.path().join(f)).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg["trajectory"]);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    tmp
}

#[test]
fn perturbed_hyper_parameters_fail_the_check_where_they_act() {
    // Each setting changes what the reference did; the part of the report that must catch it.
    let cases: [(&str, Value, &str); 4] = [
        // Not a schedule: only the parameters can show it.
        ("freeze_last_layer", Value::from(0), "student_update"),
        ("clip_grad", Value::from(0.0), "student_update"),
        ("center_momentum", Value::from(0.5), "center"),
        // A schedule: the per-iteration values show it directly.
        ("weight_decay_end", Value::from(4.0), "schedules"),
    ];
    for (key, value, part) in cases {
        let dir = perturbed(|t| t[key] = value.clone());
        let (ok, r) = verify(dir.path(), "2", false);
        assert!(!ok && r["pass"] == false, "{key} = {value} passed: {r:#}");
        let e = &r[part];
        assert!(
            e["err"].as_f64().unwrap() > e["tolerance"].as_f64().unwrap(),
            "{key} = {value}: {part} within tolerance: {r:#}"
        );
    }
}

#[test]
fn unknown_trajectory_settings_are_refused_by_name() {
    let dir = perturbed(|t| t["layer_decay"] = Value::from(0.75));
    let err = support::worker_err(&[
        "model",
        "replay",
        "--reference",
        dir.path().to_str().unwrap(),
        "--output",
        dir.path().join("o.safetensors").to_str().unwrap(),
    ]);
    assert!(err.contains("layer_decay"), "{err}");
}
