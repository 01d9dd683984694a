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

async fn start(dir: &std::path::Path) -> (Bound, oneshot::Sender<()>) {
    let (ready_tx, ready_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let cfg = ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        state: dir.to_path_buf(),
        timing: Timing::default(),
        user_token: Some(USER.into()),
        worker_token: Some(WORKER.into()),
        local_roots: vec!["/tmp/endofm-api-test".into()],
    };
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
    let (bound, stop) = start(dir.path()).await;
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
    let err = jobs
        .submit_job(pb::SubmitJobRequest {
            spec: SPEC.replace("world_size = 2", "world_size = 0"),
            format: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("resources.world_size"),
        "{}",
        err.message()
    );
    let err = jobs
        .submit_job(pb::SubmitJobRequest {
            spec: SPEC.replace("/tmp/endofm-api-test/out", "/etc/out"),
            format: 0,
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("output") && err.message().contains("allowed roots"),
        "{}",
        err.message()
    );
    let huge = "#".repeat(server::MAX_REQUEST_BYTES + 1);
    let err = jobs
        .submit_job(pb::SubmitJobRequest {
            spec: huge,
            format: 0,
        })
        .await
        .unwrap_err();
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
