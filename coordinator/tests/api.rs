//! The coordinator's gRPC surface in-process: bearer tokens (UNAUTHENTICATED for none or a
//! wrong one, PERMISSION_DENIED for the other role's), gRPC health and reflection as stock tools
//! use them, validation errors naming the field, request size limits, and the watch stream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use endofm_coordinator::client;
use endofm_coordinator::core::Timing;
use endofm_coordinator::server::{self, Bound, ServeConfig};
use endofm_proto::v1 as pb;
use tokio::sync::oneshot;

const USER: &str = "user-secret";
const WORKER: &str = "worker-secret";

/// Submits `spec`, expecting a refusal.
async fn refused(jobs: &mut client::Jobs, spec: String) -> tonic::Status {
    jobs.submit_job(pb::SubmitJobRequest { spec, format: 0 })
        .await
        .expect_err("the spec was accepted")
}

/// Whether a client for `url` (trusting `ca`, else the system roots) connects and lists jobs.
async fn lists_jobs(url: &str, ca: Option<&std::path::Path>) -> bool {
    match client::channel_with_ca(url, ca, Duration::ZERO).await {
        Ok(ch) => pb::jobs_client::JobsClient::new(ch)
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .is_ok(),
        Err(_) => false,
    }
}

/// The configuration of the first test: tokens, metrics, a local root, no TLS.
fn config(dir: &std::path::Path) -> ServeConfig {
    ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        state: dir.to_path_buf(),
        timing: Timing::default(),
        user_token: Some(USER.into()),
        worker_token: Some(WORKER.into()),
        local_roots: vec!["/tmp/endofm-api-test".into()],
        tls: None,
        preemption: false,
    }
}

/// Serves `cfg` in this runtime until the returned sender is used or dropped.
async fn start(cfg: ServeConfig) -> (Bound, oneshot::Sender<()>) {
    let (ready_tx, ready_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        server::serve(
            cfg,
            move |b| {
                let _ = ready_tx.send(b);
            },
            async move {
                let _ = stop_rx.await;
            },
        )
        .await
        .unwrap();
    });
    (ready_rx.await.unwrap(), stop_tx)
}

const SPEC: &str = r#"
kind = "pretrain"
output = "/tmp/endofm-api-test/out"
[data]
uri = "/tmp/endofm-api-test/corpus"
[model]
preset = "tiny"
[resources]
world_size = 2
device = "cpu"
"#;

#[tokio::test]
async fn tokens_health_reflection_validation_and_watch() {
    let dir = tempfile::tempdir().unwrap();
    let (bound, stop) = start(config(dir.path())).await;
    let url = format!("http://{}", bound.grpc);
    let patience = Duration::from_secs(10);

    // Tokens: none, wrong, and the workers' token on the jobs service.
    for (token, code) in [
        (None, tonic::Code::Unauthenticated),
        (Some("nope"), tonic::Code::Unauthenticated),
        (Some(WORKER), tonic::Code::PermissionDenied),
    ] {
        let mut jobs = client::jobs(&url, token, patience).await.unwrap();
        let err = jobs
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "token {token:?}: {err}");
    }
    let mut workers = client::workers(&url, Some(USER), patience).await.unwrap();
    let err = workers
        .register(pb::RegisterRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // Health and reflection need no token (probes and grpcurl).
    let channel = client::channel(&url, patience).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "endofm.v1.Jobs", "endofm.v1.Workers"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "endofm.v1.Jobs",
        "endofm.v1.Workers",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }

    // Validation names the field; nothing is queued.
    let mut jobs = client::jobs(&url, Some(USER), patience).await.unwrap();
    let err = refused(&mut jobs, SPEC.replace("world_size = 2", "world_size = 0")).await;
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("resources.world_size"),
        "{}",
        err.message()
    );
    let err = refused(
        &mut jobs,
        SPEC.replace("/tmp/endofm-api-test/out", "/etc/out"),
    )
    .await;
    assert!(
        err.message().contains("output") && err.message().contains("allowed roots"),
        "{}",
        err.message()
    );
    let huge = "#".repeat(server::MAX_REQUEST_BYTES + 1);
    let err = refused(&mut jobs, huge).await;
    assert!(err.message().contains("too large"), "{err}");
    assert!(
        jobs.list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .jobs
            .is_empty()
    );

    // A valid job is queued; its watch stream starts with the job and its history, then
    // follows new events (cancel) and ends with the final job.
    let job = jobs
        .submit_job(pb::SubmitJobRequest {
            spec: SPEC.into(),
            format: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, pb::JobState::Queued as i32);
    let mut watch = jobs
        .watch_job(pb::WatchJobRequest {
            id: job.id.clone(),
            after_seq: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert!(matches!(first.update, Some(pb::job_update::Update::Job(_))));
    let submitted = watch.message().await.unwrap().unwrap();
    assert!(
        matches!(&submitted.update, Some(pb::job_update::Update::Event(e)) if e.kind == "submitted")
    );
    jobs.cancel_job(pb::CancelJobRequest {
        id: job.id.clone(),
        reason: "test".into(),
    })
    .await
    .unwrap();
    let mut kinds = Vec::new();
    while let Some(update) = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .unwrap()
        .unwrap()
    {
        match update.update {
            Some(pb::job_update::Update::Event(e)) => kinds.push(e.kind),
            Some(pb::job_update::Update::Job(j)) => {
                assert_eq!(j.state, pb::JobState::Cancelled as i32);
                kinds.push("final".into());
            }
            _ => {}
        }
    }
    assert_eq!(kinds, ["cancelled", "final"]);
    let err = jobs
        .get_job(pb::GetJobRequest {
            id: "job-999".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let _ = stop.send(());
}

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn tls_when_certificates_are_configured() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=endofm test CA",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ],
    );
    let cfg = ServeConfig {
        metrics_listen: None,
        user_token: None,
        worker_token: None,
        local_roots: vec![],
        tls: Some((d.join("server.pem"), d.join("server.key"))),
        ..config(&d.join("state"))
    };
    let (bound, _stop) = start(cfg).await;
    let port = bound.grpc.port();
    let patience = Duration::from_secs(5);
    let ca = d.join("ca.pem");
    let channel =
        client::channel_with_ca(&format!("https://localhost:{port}"), Some(&ca), patience)
            .await
            .unwrap();
    let mut jobs = pb::jobs_client::JobsClient::new(channel);
    assert!(
        jobs.list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .jobs
            .is_empty()
    );
    // Plain-text gRPC against the TLS port fails; so does TLS without trusting the CA.
    let plain_ok = lists_jobs(&format!("http://127.0.0.1:{port}"), None).await;
    assert!(!plain_ok, "plain text accepted on the TLS port");
    let wrong_ca = d.join("server.pem");
    let untrusted_ok = lists_jobs(&format!("https://localhost:{port}"), Some(&wrong_ca)).await;
    assert!(
        !untrusted_ok,
        "a certificate from an untrusted CA was accepted"
    );
}

#[tokio::test]
async fn dependencies_are_checked_at_submit_and_followed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServeConfig {
        user_token: None,
        worker_token: None,
        local_roots: vec![],
        metrics_listen: None,
        ..config(dir.path())
    };
    let (bound, stop) = start(cfg).await;
    let url = format!("http://{}", bound.grpc);
    let mut jobs = client::jobs(&url, None, Duration::from_secs(10))
        .await
        .unwrap();
    let finetune = |extra: &str| {
        format!(
            "{extra}\nkind = \"finetune\"\ntask = \"classify\"\noutput = \"/tmp/ft\"\n[data]\nuri = \"/tmp/polypdiag\"\n[resources]\ndevice = \"cpu\"\n"
        )
    };

    // Unknown ids are refused with the field and the id named; nothing is queued.
    for (extra, field, id) in [
        ("after = [\"job-5\"]", "after[0]", "job-5"),
        ("init = \"job:job-9\"", "init", "job-9"),
    ] {
        let err = refused(&mut jobs, finetune(extra)).await;
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert!(
            err.message().contains(field) && err.message().contains(id),
            "{}",
            err.message()
        );
    }
    // A detection network section on a classification job is refused by name.
    let err = refused(
        &mut jobs,
        format!("{}[detector]\nnum_convs = 1\n", finetune("")),
    )
    .await;
    assert!(
        err.message().contains("`detector`") && err.message().contains("detect"),
        "{}",
        err.message()
    );
    assert!(
        jobs.list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .jobs
            .is_empty()
    );

    // A dependent job waits, shows what it waits for, and fails when its dependency is
    // cancelled.
    let submit = |spec: String| pb::SubmitJobRequest { spec, format: 0 };
    let pre = jobs
        .submit_job(submit(SPEC.into()))
        .await
        .unwrap()
        .into_inner();
    let ft = jobs
        .submit_job(submit(finetune(&format!("init = \"job:{}\"", pre.id))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ft.kind, "finetune");
    assert_eq!(ft.after, std::slice::from_ref(&pre.id));
    assert_eq!(ft.waiting_for, std::slice::from_ref(&pre.id));
    assert_eq!(ft.state, pb::JobState::Queued as i32);
    jobs.cancel_job(pb::CancelJobRequest {
        id: pre.id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let ft = jobs
        .get_job(pb::GetJobRequest { id: ft.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ft.state, pb::JobState::Failed as i32);
    assert!(
        ft.message.contains(&pre.id) && ft.message.contains("CANCELLED"),
        "{}",
        ft.message
    );
    assert_eq!(ft.generation, 0, "it never ran");
    let _ = stop.send(());
}
