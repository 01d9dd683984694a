//! A pre-training job that collapses tells its user through `endofm status` (issue 10): the
//! rank's collapse monitor, its progress line, the agent's report and the coordinator's stored
//! progress, end to end.

use std::time::Duration;

use crate::cluster::{Cluster, corpus, serial, tiny_spec};

#[test]
fn a_collapsing_job_shows_its_warning_in_endofm_status() {
    let _serial = serial();
    let mut c = Cluster::start();
    c.add_worker("cpu:1");
    let out = c.dir.path().join("out");
    // A teacher temperature far too high: a uniform collapse from the first step; the window of
    // a 32-step schedule is 3 steps.
    let id = c.submit(&tiny_spec(
        "collapse",
        &out,
        corpus().to_str().unwrap(),
        1,
        "max_steps = 6",
        "teacher_temp = 50.0\nwarmup_teacher_temp = 50.0",
    ));
    let (code, job) = c.wait(&id, Duration::from_secs(240));
    assert_eq!(code, 0, "{job}");
    let collapse = job["progress"]["collapse"].as_str().unwrap_or_default();
    assert!(
        collapse.contains("uniform collapse") && collapse.contains("teacher_temp"),
        "{job}"
    );
    let text = c.cli(&["status", &id]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("WARNING: uniform collapse"), "{text}");
    // The rank's warning line reached the job's events too.
    let events = c.events(&id).join("\n");
    assert!(events.contains("uniform collapse"), "{events}");
    // And the report on the job's output records the episode.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["collapse"][0]["kind"], "uniform", "{report}");
}
