//! The client side of the API for the CLI (and tests, benchmarks): connecting with retries and
//! an optional bearer token, and the calls the commands make.

use std::time::{Duration, Instant};

use endofm_proto::v1 as pb;
use endofm_proto::v1::jobs_client::JobsClient;
use endofm_proto::v1::workers_client::WorkersClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::{Error, Result};

/// Adds `authorization: Bearer <token>` when a token is configured.
#[derive(Debug, Clone)]
pub struct Auth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Auth {
    /// From a token (none: no header).
    pub fn new(token: Option<&str>) -> Result<Self> {
        token
            .filter(|t| !t.is_empty())
            .map(|t| {
                format!("Bearer {t}").parse().map_err(|_| {
                    Error::Invalid("the token contains characters not allowed in a header".into())
                })
            })
            .transpose()
            .map(Auth)
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(
        &mut self,
        mut req: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A jobs client.
pub type Jobs = JobsClient<InterceptedService<Channel, Auth>>;
/// A workers client.
pub type Workers = WorkersClient<InterceptedService<Channel, Auth>>;

/// Normalises `host:port` to `http://host:port`.
pub fn normalise(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

/// Connects a channel, retrying until `patience` has passed (`https://`: TLS, verified against
/// `ENDOFM_TLS_CA` or the system roots).
pub async fn channel(url: &str, patience: Duration) -> Result<Channel> {
    let ca = std::env::var_os(endofm_proto::tls::CA_ENV).map(std::path::PathBuf::from);
    channel_with_ca(url, ca.as_deref(), patience).await
}

/// [`channel`] with an explicit CA file.
pub async fn channel_with_ca(
    url: &str,
    ca: Option<&std::path::Path>,
    patience: Duration,
) -> Result<Channel> {
    let url = normalise(url);
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| Error::Connect {
            url: url.clone(),
            message: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let endpoint =
        endofm_proto::tls::configure(endpoint, &url, ca).map_err(|message| Error::Connect {
            url: url.clone(),
            message,
        })?;
    let started = Instant::now();
    loop {
        match endpoint.connect().await {
            Ok(ch) => return Ok(ch),
            Err(e) if started.elapsed() >= patience => {
                return Err(Error::Connect {
                    url,
                    message: format!("{e} (is `endofm coordinator` running there?)"),
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A jobs client for `url`, with the user token from `ENDOFM_USER_TOKEN` or `token`.
pub async fn jobs(url: &str, token: Option<&str>, patience: Duration) -> Result<Jobs> {
    let ch = channel(url, patience).await?;
    Ok(JobsClient::with_interceptor(ch, Auth::new(token)?).max_decoding_message_size(64 << 20))
}

/// A workers client for `url` (simulated workers in the benchmark, tests).
pub async fn workers(url: &str, token: Option<&str>, patience: Duration) -> Result<Workers> {
    let ch = channel(url, patience).await?;
    Ok(WorkersClient::with_interceptor(ch, Auth::new(token)?))
}

/// Human-readable state name of a job.
pub fn state_of(job: &pb::Job) -> &'static str {
    pb::JobState::try_from(job.state)
        .unwrap_or(pb::JobState::Unspecified)
        .label()
}

/// Whether the job is final.
pub fn is_final(job: &pb::Job) -> bool {
    pb::JobState::try_from(job.state).is_ok_and(|s| s.is_final())
}

/// Follows a job until it ends, calling `on_update` for every update; returns the final job.
/// Reconnects (continuing after the last event seen) when the coordinator restarts.
pub async fn follow(
    url: &str,
    token: Option<&str>,
    id: &str,
    after_seq: u64,
    mut on_update: impl FnMut(&pb::job_update::Update),
) -> Result<pb::Job> {
    let mut last_seq = after_seq;
    let mut last_job: Option<pb::Job> = None;
    loop {
        let mut client = jobs(url, token, Duration::from_secs(120)).await?;
        let stream = client
            .watch_job(pb::WatchJobRequest {
                id: id.to_string(),
                after_seq: last_seq,
                follow: true,
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(s) => return Err(Error::rpc("WatchJob", s)),
        };
        loop {
            match stream.message().await {
                Ok(Some(update)) => {
                    let Some(u) = update.update else { continue };
                    match &u {
                        pb::job_update::Update::Event(e) => last_seq = last_seq.max(e.seq),
                        pb::job_update::Update::Job(j) => last_job = Some(j.clone()),
                        pb::job_update::Update::Progress(_) => {}
                    }
                    on_update(&u);
                }
                Ok(None) => {
                    if let Some(job) = last_job.as_ref().filter(|j| is_final(j)) {
                        return Ok(job.clone());
                    }
                    break; // the server went away mid-stream: reconnect
                }
                Err(_) => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
