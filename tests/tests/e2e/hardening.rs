//! The service faults of issue 11, end to end over the real binaries: specs that cannot run,
//! two jobs in one output, a diverging job burning its restarts, a stalled coordinator, a
//! coordinator stopped while a client follows a job.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use endofm_tests::bin;

use crate::cluster::{Cluster, corpus, serial, signal, tiny_spec};

const LONG: Duration = Duration::from_secs(240);

/// Items 6, 7, 8: a spec that cannot run is refused by name; a second job naming a live job's
/// output is refused; a job whose loss becomes NaN fails once, without restarts, and `status`
/// says why.
#[test]
fn a_diverging_job_fails_once_and_owns_its_output_meanwhile() {
    let _serial = serial();
    let mut c = Cluster::start();
    let out = c.dir.path().join("out");
    let data = corpus();
    let data = data.to_str().unwrap();
    let spec = tiny_spec(
        "diverges",
        &out,
        data,
        1,
        "max_steps = 8",
        "lr = 1e6\nwarmup_epochs = 0",
    );
    // Refused at submission with the field named (nothing reaches a worker).
    for (bad, field) in [
        (
            spec.replace(&format!("\"{}\"", out.display()), "\"runs/out\""),
            "output",
        ),
        (
            spec.replace(&format!("uri = \"{data}\""), "uri = \"corpus\""),
            "data.uri",
        ),
        (
            spec.replace(
                "drop_path_rate = 0.0",
                "drop_path_rate = 0.0\nprecision = \"fp16\"",
            ),
            "train.precision",
        ),
    ] {
        let path = c.dir.path().join("bad.toml");
        std::fs::write(&path, &bad).unwrap();
        let res = c.cli(&["submit", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success(), "{field}: accepted");
        assert!(err.contains(field), "{field}: {err}");
    }
    let id = c.submit(&spec);
    // The same spec again, while the first is live: refused, naming the owner.
    let path = c.dir.path().join("again.toml");
    std::fs::write(&path, &spec).unwrap();
    let again = c.cli(&["submit", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success(),
        "a second job into {out:?} was accepted"
    );
    assert!(err.contains("output") && err.contains(&id), "{err}");

    c.add_worker("cpu:1");
    let (code, job) = c.wait(&id, LONG);
    assert_ne!(code, 0, "{job}");
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(
        job["restarts"], 0,
        "restarted a deterministic failure: {job}"
    );
    let message = job["message"].as_str().unwrap_or("");
    assert!(
        message.contains("non_finite_loss") && message.contains("without a restart"),
        "{message}"
    );
    let events = c.events(&id);
    let attempts = events
        .iter()
        .filter(|e| e.contains("attempt_failed"))
        .count();
    assert_eq!(attempts, 1, "{events:#?}");
    assert!(
        !events.iter().any(|e| e.contains("restarting")),
        "{events:#?}"
    );
    // The plain `status` says why too.
    let text = c.cli(&["status", &id]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("non_finite_loss"), "{text}");
    // Once it ended, its output is free again.
    let job2 = c.submit(&spec.replace("lr = 1e6", "lr = 1e-4"));
    c.cli(&["cancel", &job2]);
}

/// Item 19: SIGTERM stops a coordinator promptly even while a client follows a job (the watch
/// stream ends, every task joins), and what it acknowledged is there after a restart.
#[test]
fn sigterm_stops_the_coordinator_while_a_client_follows_a_job() {
    let _serial = serial();
    let mut c = Cluster::start();
    let data = corpus();
    let id = c.submit(&tiny_spec(
        "followed",
        &c.dir.path().join("out"),
        data.to_str().unwrap(),
        1,
        "",
        "",
    ));
    let mut follower = Command::new(bin("endofm").unwrap())
        .args(["--coordinator", &c.url, "logs", &id, "--follow"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("endofm logs --follow");
    // The follower has its stream once it printed the history.
    let mut stdout = follower.stdout.take().expect("stdout");
    let mut first = [0u8; 64];
    let n = stdout.read(&mut first).expect("reading the follower");
    assert!(n > 0, "the follower printed nothing");
    std::thread::sleep(Duration::from_millis(300));
    let stopped = Instant::now();
    signal(c.coordinator_pid(), "TERM");
    let status = c.wait_coordinator(Duration::from_secs(15));
    let _ = follower.kill();
    let _ = follower.wait();
    let status = status.unwrap_or_else(|| {
        panic!(
            "the coordinator did not stop within 15 s of SIGTERM:\n{}",
            c.log("coordinator")
        )
    });
    assert!(status.success(), "{status:?}\n{}", c.log("coordinator"));
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "{:?}",
        stopped.elapsed()
    );
    let log = c.log("coordinator");
    assert!(log.contains("coordinator stopped"), "{log}");
    assert!(!log.contains("did not stop in time"), "{log}");
    c.start_coordinator();
    assert_eq!(c.status(&id)["state"], "queued");
}

/// Item 9: a coordinator stopped (SIGSTOP) for longer than a lease does not declare its healthy
/// workers lost when it continues, and the checkpoints committed meanwhile are recorded.
#[test]
fn a_stalled_coordinator_keeps_its_workers_and_their_checkpoints() {
    let _serial = serial();
    let mut c = Cluster::start();
    c.add_worker("cpu:1");
    let data = corpus();
    let spec = tiny_spec(
        "stalled",
        &c.dir.path().join("out"),
        data.to_str().unwrap(),
        1,
        "",
        "",
    )
    .replace("epochs = 4", "epochs = 40");
    let id = c.submit(&spec);
    let before = c.wait_until(&id, LONG, "training", |j| {
        j["progress"]["step"].as_u64().unwrap_or(0) >= 2
    });
    let step_before = before["progress"]["step"].as_u64().unwrap_or(0);
    let pid = c.coordinator_pid();
    signal(pid, "STOP");
    std::thread::sleep(Duration::from_millis(crate::cluster::LEASE_MS + 2500));
    signal(pid, "CONT");
    // Several lease-timer ticks after it continued: nothing was expired or restarted, and a
    // checkpoint written during the pause is known.
    std::thread::sleep(Duration::from_millis(1500));
    let job = c.wait_until(&id, Duration::from_secs(20), "reporting checkpoints", |j| {
        j["last_checkpoint"]["step"].as_u64().unwrap_or(0) > step_before
    });
    let events = c.events(&id);
    assert_eq!(job["state"], "running", "{job}\n{events:#?}");
    assert_eq!(job["restarts"], 0, "{job}\n{events:#?}");
    assert!(
        !events
            .iter()
            .any(|e| e.contains("worker_lost") || e.contains("attempt_failed")),
        "{events:#?}"
    );
    assert!(
        c.log("coordinator").contains("the coordinator was stalled"),
        "the gap was not noticed"
    );
    c.cli(&["cancel", &id]);
}
