//! `endofm up --pipeline` as a first-time user runs it: a local cluster, a generated corpus and
//! PolypDiag-layout dataset, and three dependent jobs (pre-train → fine-tune from its checkpoint
//! → evaluate the fine-tuned checkpoint), each started only once the one before succeeded.

use std::time::Duration;

use endofm_tests::bin;
use serde_json::Value;

use crate::cluster::serial;

#[test]
fn up_pipeline_chains_pretrain_finetune_and_evaluate_and_prints_the_result() {
    let _serial = serial();
    bin("endofm-worker").unwrap(); // `up` starts the worker binary next to itself
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().display().to_string();
    let args = [
        "up",
        "--pipeline",
        "--workers",
        "1",
        "--clips",
        "4",
        "--frames",
        "24",
        "--size",
        "64",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--batch",
        "1",
        "--checkpoint-every",
        "2",
        "--ft-epochs",
        "1",
        "--ft-batch",
        "2",
        "--ft-videos",
        "6",
        "--dir",
        &dir_arg,
    ];
    let out = endofm_tests::run(&bin("endofm").unwrap(), &args, Duration::from_secs(600)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "endofm up --pipeline failed:\n{stderr}"
    );
    // One JSON line per job on stdout, in pipeline order (event lines are not JSON objects).
    let jobs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["id"].is_string() && v["kind"].is_string())
        .collect();
    let kinds: Vec<&str> = jobs.iter().filter_map(|j| j["kind"].as_str()).collect();
    assert_eq!(kinds, ["pretrain", "finetune", "evaluate"], "{stderr}");
    for job in &jobs {
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    let (pre, ft, ev) = (&jobs[0], &jobs[1], &jobs[2]);
    // Each job waited for the one before and started from its last checkpoint.
    assert_eq!(ft["after"], serde_json::json!([pre["id"]]));
    assert_eq!(ev["after"], serde_json::json!([ft["id"]]));
    assert_eq!(ft["init_resolved"], pre["last_checkpoint"]["uri"], "{ft}");
    assert_eq!(ev["init_resolved"], ft["last_checkpoint"]["uri"], "{ev}");
    assert_eq!(
        ev["spec"]["init"],
        format!("job:{}", ft["id"].as_str().unwrap())
    );
    assert!(
        pre["finished_unix_ms"].as_i64() <= ft["started_unix_ms"].as_i64(),
        "the finetune job started before pre-training ended"
    );
    // The evaluation's result is on the job, in the report file, and printed.
    let result = &ev["result"];
    let headline = result["headline"].as_str().unwrap();
    assert!(headline.starts_with("test_"), "{result}");
    let value = result["metrics"][headline].as_f64();
    assert!(value.is_some_and(|v| (0.0..=1.0).contains(&v)), "{result}");
    let report = result["report"].as_str().unwrap();
    let text = std::fs::read_to_string(report.trim_start_matches("file://"))
        .unwrap_or_else(|e| panic!("reading the report {report}: {e}"));
    serde_json::from_str::<Value>(&text).expect("report.json is JSON");
    assert!(
        stderr.contains(&format!(
            "result of {} (evaluate): {headline}",
            ev["id"].as_str().unwrap()
        )),
        "{stderr}"
    );
}
