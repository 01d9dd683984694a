//! The agent against a fake coordinator (tonic, in memory): one world-size-2 CPU job runs to the
//! end (both ranks report progress, rank 0 a checkpoint, both exits succeed), and a stop order
//! ends a long job's ranks within the grace period.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use endofm_proto::v1;
use endofm_proto::v1::workers_server::{Workers, WorkersServer};
use tonic::{Request, Response, Status};

use crate::support;

#[derive(Default)]
struct State {
    assignments: Vec<v1::Assignment>,
    stops: Vec<v1::StopOrder>,
    reports: Vec<v1::RankReport>,
    exits: Vec<v1::RankExit>,
    rendezvous: HashMap<(String, u64, String), Vec<u8>>,
    registered: u32,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<State>>);

#[tonic::async_trait]
impl Workers for Fake {
    async fn register(
        &self,
        _r: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        self.0.lock().unwrap().registered += 1;
        Ok(Response::new(v1::RegisterResponse {
            worker_id: "w1".into(),
            heartbeat_interval_ms: 200,
            lease_ms: 5000,
        }))
    }
    async fn heartbeat(
        &self,
        r: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let mut s = self.0.lock().unwrap();
        s.exits.extend(r.into_inner().exited);
        Ok(Response::new(v1::HeartbeatResponse {
            assignments: std::mem::take(&mut s.assignments),
            stop: std::mem::take(&mut s.stops),
            reregister: false,
        }))
    }
    async fn report(
        &self,
        r: Request<v1::ReportRequest>,
    ) -> Result<Response<v1::ReportResponse>, Status> {
        self.0
            .lock()
            .unwrap()
            .reports
            .extend(r.into_inner().reports);
        Ok(Response::new(v1::ReportResponse {}))
    }
    async fn rendezvous_put(
        &self,
        r: Request<v1::RendezvousPutRequest>,
    ) -> Result<Response<v1::RendezvousPutResponse>, Status> {
        let r = r.into_inner();
        let rank = r.rank.unwrap_or_default();
        self.0
            .lock()
            .unwrap()
            .rendezvous
            .insert((rank.job_id, rank.generation, r.key), r.value);
        Ok(Response::new(v1::RendezvousPutResponse {}))
    }
    async fn rendezvous_get(
        &self,
        r: Request<v1::RendezvousGetRequest>,
    ) -> Result<Response<v1::RendezvousGetResponse>, Status> {
        let r = r.into_inner();
        let rank = r.rank.unwrap_or_default();
        let key = (rank.job_id, rank.generation, r.key);
        let until = Instant::now() + Duration::from_millis(u64::from(r.wait_ms));
        loop {
            if let Some(v) = self.0.lock().unwrap().rendezvous.get(&key) {
                return Ok(Response::new(v1::RendezvousGetResponse {
                    found: true,
                    value: v.clone(),
                }));
            }
            if Instant::now() >= until {
                return Ok(Response::new(v1::RendezvousGetResponse::default()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A spec whose steps take a fraction of a second on one CPU thread.
fn spec(data: &str, out: &Path, epochs: usize, max_steps: Option<usize>) -> String {
    let mut model = endofm_shared::Preset::Tiny.config();
    model.depth = 1;
    model.embed_dim = 32;
    model.num_heads = 2;
    model.img_size = 32;
    model.head.out_dim = 32;
    model.head.hidden_dim = 16;
    model.head.bottleneck_dim = 8;
    let mut spec = serde_json::json!({
        "kind": "pretrain",
        "data": {"uri": data, "threads": 1},
        "output": out.to_str().unwrap(),
        "model": {"preset": "tiny", "config": model},
        "resources": {"world_size": 2, "device": "cpu", "threads_per_rank": 1},
        "collective_timeout_s": 60.0,
        "train": {"epochs": epochs, "batch_per_rank": 1, "checkpoint_every": 2, "warmup_epochs": 0},
    });
    if let Some(m) = max_steps {
        spec["max_steps"] = m.into();
    }
    endofm_shared::JobSpec::from_json(&spec.to_string())
        .unwrap()
        .to_json()
}

fn assignments(job: &str, spec: &str) -> Vec<v1::Assignment> {
    (0..2)
        .map(|rank| v1::Assignment {
            rank: Some(v1::RankRef {
                job_id: job.into(),
                generation: 1,
                rank,
            }),
            world_size: 2,
            device_index: rank,
            device_kind: "cpu".into(),
            spec_json: spec.into(),
        })
        .collect()
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_for(fake: &Fake, what: &str, limit: Duration, done: impl Fn(&State) -> bool) {
    let until = Instant::now() + limit;
    while !done(&fake.0.lock().unwrap()) {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn progress_ranks(s: &State, job: &str) -> Vec<u32> {
    let mut ranks: Vec<u32> = s
        .reports
        .iter()
        .filter(|r| matches!(r.report, Some(v1::rank_report::Report::Progress(_))))
        .filter_map(|r| r.rank.as_ref())
        .filter(|r| r.job_id == job)
        .map(|r| r.rank)
        .collect();
    ranks.sort();
    ranks.dedup();
    ranks
}

fn exits_of(s: &State, job: &str) -> Vec<v1::RankExit> {
    s.exits
        .iter()
        .filter(|e| e.rank.as_ref().is_some_and(|r| r.job_id == job))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_runs_a_two_rank_job_and_obeys_stop_orders() {
    let dir = tempfile::tempdir().unwrap();
    let data = support::corpus(dir.path(), 4, 8, 40, 0)
        .to_string_lossy()
        .into_owned();
    let fake = Fake::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(WorkersServer::new(fake.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);

    let _agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_endofm-worker"))
            .args([
                "agent",
                "--coordinator",
                &format!("http://{addr}"),
                "--devices",
                "cpu:2",
                "--stop-grace-s",
                "10",
                "--threads-per-rank",
                "1",
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&fake, "registration", Duration::from_secs(30), |s| {
        s.registered > 0
    })
    .await;

    // A complete run: 3 steps, a checkpoint at step 2 and at the end.
    let done_spec = spec(&data, &dir.path().join("out-a"), 2, Some(3));
    fake.0.lock().unwrap().assignments = assignments("job-a", &done_spec);
    wait_for(
        &fake,
        "exits and reports of job-a (reports may trail exits by a flush)",
        Duration::from_secs(240),
        |s| {
            exits_of(s, "job-a").len() == 2
                && progress_ranks(s, "job-a").len() == 2
                && s.reports.iter().any(|r| {
                    matches!(&r.report, Some(v1::rank_report::Report::Checkpoint(c)) if c.step == 3)
                })
        },
    )
    .await;
    {
        let s = fake.0.lock().unwrap();
        for e in exits_of(&s, "job-a") {
            assert!(e.success, "rank failed: {e:?}");
        }
        assert_eq!(progress_ranks(&s, "job-a"), [0, 1]);
        let checkpoints: Vec<(u32, u64)> = s
            .reports
            .iter()
            .filter_map(|r| match &r.report {
                Some(v1::rank_report::Report::Checkpoint(c)) => {
                    Some((r.rank.as_ref().unwrap().rank, c.step))
                }
                _ => None,
            })
            .collect();
        assert!(checkpoints.contains(&(0, 3)), "{checkpoints:?}");
        assert!(checkpoints.iter().all(|(rank, _)| *rank == 0));
    }
    assert!(dir.path().join("out-a/checkpoints").is_dir());

    // A long run stopped by the coordinator.
    let long_spec = spec(&data, &dir.path().join("out-b"), 500, None);
    fake.0.lock().unwrap().assignments = assignments("job-b", &long_spec);
    wait_for(&fake, "progress of job-b", Duration::from_secs(120), |s| {
        progress_ranks(s, "job-b").len() == 2
    })
    .await;
    let stopped = Instant::now();
    fake.0.lock().unwrap().stops = (0..2)
        .map(|rank| v1::StopOrder {
            rank: Some(v1::RankRef {
                job_id: "job-b".into(),
                generation: 1,
                rank,
            }),
            reason: "cancelled".into(),
        })
        .collect();
    wait_for(&fake, "both exits of job-b", Duration::from_secs(20), |s| {
        exits_of(s, "job-b").len() == 2
    })
    .await;
    assert!(stopped.elapsed() < Duration::from_secs(12));
    let s = fake.0.lock().unwrap();
    for e in exits_of(&s, "job-b") {
        assert!(e.message.contains("cancelled"), "{e:?}");
    }
}
