//! Object storage end to end against a real S3 server (moto on a loopback port): a corpus read
//! from a bucket, checkpoints and metrics written there and resumed from, errors naming the
//! missing location, and multipart uploads of large objects.

use std::time::Instant;

use bytes::Bytes;

use crate::support::{self, S3Server};

const BUCKET: &str = "endofm";

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Runs the worker against `server`; stdout, or a panic with stderr and moto's log tail.
fn worker_ok(server: &S3Server, args: &[&str]) -> String {
    let out = support::worker_env(args, &server.env());
    if !out.status.success() {
        let log = server.log_text();
        let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
        panic!(
            "endofm-worker {args:?} failed:\n{}\nmoto (last lines, newest first):\n{tail}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn worker_err(server: &S3Server, args: &[&str]) -> String {
    let out = support::worker_env(args, &server.env());
    assert!(
        !out.status.success(),
        "endofm-worker {args:?} should have failed; stdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A small synthetic corpus uploaded to `s3://BUCKET/corpus`.
fn upload_corpus(server: &S3Server) {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("corpus");
    support::worker_ok(&[
        "synth",
        "--kind",
        "pretrain",
        "--out",
        local.to_str().unwrap(),
        "--clips",
        "6",
        "--frames",
        "24",
        "--size",
        "96",
        "--seed",
        "1",
    ]);
    let store = server.store(&format!("s3://{BUCKET}/corpus"));
    let n = support::upload_dir(&store, &local);
    assert!(store.exists("train.csv").unwrap());
    assert!(n >= 7, "uploaded {n} files, expected train.csv and 6 clips");
}

fn pretrain_args<'a>(config: &'a str, max_steps: &'a str) -> Vec<&'a str> {
    vec![
        "pretrain",
        "--data",
        "s3://endofm/corpus",
        "--out",
        "s3://endofm/run1",
        "--preset",
        "tiny",
        "--config",
        config,
        "--epochs",
        "1",
        "--batch",
        "2",
        "--threads",
        "1",
        "--data-threads",
        "2",
        "--checkpoint-every",
        "1",
        "--max-steps",
        max_steps,
        "--progress",
        "never",
    ]
}

fn checkpoint_steps(run: &endofm_worker::store::Store) -> Vec<String> {
    let mut steps: Vec<String> = run
        .list("checkpoints")
        .unwrap()
        .into_iter()
        .filter_map(|l| {
            l.key
                .strip_suffix("/manifest.json")
                .and_then(|d| d.strip_prefix("checkpoints/"))
                .map(str::to_string)
        })
        .collect();
    steps.sort();
    steps
}

#[test]
fn pretrain_reads_and_writes_s3_and_resumes_from_it() {
    let started = Instant::now();
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    upload_corpus(&server);
    // Two checkpoints kept (the default is 3), so that the resumed run must prune one.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.json");
    std::fs::write(&config, r#"{"train": {"keep_checkpoints": 2}}"#).unwrap();
    let config = config.to_str().unwrap();

    let summary = json(&worker_ok(&server, &pretrain_args(config, "2")));
    assert_eq!(summary["started_at"], 0, "{summary}");
    assert_eq!(summary["steps"], 2, "{summary}");
    assert_eq!(
        summary["checkpoint"], "s3://endofm/run1/checkpoints/step-000000002",
        "{summary}"
    );
    let run = server.store(&format!("s3://{BUCKET}/run1"));
    assert!(run.exists("config.json").unwrap());
    let resolved = json(std::str::from_utf8(&run.get("config.json").unwrap()).unwrap());
    assert_eq!(resolved["data"], "s3://endofm/corpus");
    assert_eq!(resolved["train"]["keep_checkpoints"], 2);
    assert!(
        run.exists("checkpoints/step-000000002/manifest.json")
            .unwrap()
    );
    let metrics = run.get("metrics.jsonl").unwrap();
    let metrics = std::str::from_utf8(&metrics).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    assert_eq!(checkpoint_steps(&run), ["step-000000001", "step-000000002"]);

    // The same command with a later stop resumes from the bucket's newest checkpoint.
    let summary = json(&worker_ok(&server, &pretrain_args(config, "3")));
    assert_eq!(summary["started_at"], 2, "{summary}");
    assert_eq!(summary["steps"], 3, "{summary}");
    assert_eq!(
        checkpoint_steps(&run),
        ["step-000000002", "step-000000003"],
        "the oldest checkpoint should have been pruned"
    );
    let leftovers: Vec<String> = run
        .list("checkpoints/step-000000001")
        .unwrap()
        .into_iter()
        .map(|l| l.key)
        .collect();
    assert!(leftovers.is_empty(), "pruned checkpoint left {leftovers:?}");
    let metrics = run.get("metrics.jsonl").unwrap();
    let steps: Vec<u64> = std::str::from_utf8(&metrics)
        .unwrap()
        .lines()
        .map(|l| json(l)["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [0, 1, 2]);
    eprintln!(
        "s3 pretrain + resume: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn missing_bucket_and_clip_list_are_named() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let args = |data: &'static str, out: &'static str| {
        vec![
            "pretrain",
            "--data",
            data,
            "--out",
            out,
            "--preset",
            "tiny",
            "--progress",
            "never",
        ]
    };
    let err = worker_err(&server, &args("s3://nosuchbucket/x", "s3://endofm/out"));
    assert!(err.contains("s3://nosuchbucket/x/train.csv"), "{err}");
    assert!(err.contains("clip list"), "{err}");
    assert!(err.contains("bucket does not exist"), "{err}");
    let err = worker_err(&server, &args("s3://endofm/empty", "s3://endofm/out"));
    assert!(err.contains("s3://endofm/empty/train.csv"), "{err}");
    assert!(err.contains("not found"), "{err}");
    assert!(
        !server
            .store("s3://endofm/out")
            .exists("config.json")
            .unwrap(),
        "a refused run wrote its output"
    );
    // A good corpus with an output bucket that does not exist.
    upload_corpus(&server);
    let err = worker_err(
        &server,
        &args("s3://endofm/corpus", "s3://nosuchbucket/out"),
    );
    assert!(
        err.contains("s3://nosuchbucket/out/") && err.contains("bucket does not exist"),
        "{err}"
    );
}

#[test]
fn large_objects_round_trip_through_multipart_uploads() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let store = server.store(&format!("s3://{BUCKET}/big"));
    // Above the 64 MiB multipart threshold; a pattern that would show misordered parts.
    let data: Vec<u8> = (0..70u32 << 20)
        .map(|i| (i ^ (i >> 16).wrapping_mul(31)) as u8)
        .collect();
    let data = Bytes::from(data);
    let started = Instant::now();
    store.put("blob.bin", data.clone()).unwrap();
    let put_s = started.elapsed().as_secs_f64();
    let listed = store.list("").unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].key, "blob.bin");
    assert_eq!(listed[0].size, data.len() as u64);
    let back = store.get("blob.bin").unwrap();
    assert!(back == data, "70 MiB object came back different");
    assert!(
        server.log_text().contains("uploadId="),
        "the 70 MiB put did not use a multipart upload"
    );
    eprintln!(
        "70 MiB multipart put {put_s:.1} s, round trip {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
