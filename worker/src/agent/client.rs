//! The coordinator's `Workers` client as agents and ranks use it: a lazily connecting channel
//! (an unreachable coordinator is an error per call, never at start, and the channel reconnects
//! by itself) and, when `ENDOFM_WORKER_TOKEN` is set, `authorization: Bearer <token>` on every
//! call.

use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use endofm_proto::v1::workers_client::WorkersClient;

use crate::{Error, Result};

/// The environment variable holding the workers' bearer token.
pub const TOKEN_ENV: &str = "ENDOFM_WORKER_TOKEN";

/// Adds the bearer token (if any) to every request.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    header: Option<MetadataValue<Ascii>>,
}

impl Auth {
    /// The token from [`TOKEN_ENV`] (none when unset or empty).
    pub fn from_env() -> Result<Self> {
        match std::env::var(TOKEN_ENV) {
            Ok(token) if !token.trim().is_empty() => {
                let header =
                    format!("Bearer {}", token.trim())
                        .parse()
                        .map_err(|_| Error::Service {
                            what: TOKEN_ENV.into(),
                            reason: "is not a valid header value (printable ASCII only)".into(),
                        })?;
                Ok(Self {
                    header: Some(header),
                })
            }
            _ => Ok(Self::default()),
        }
    }
}

impl Interceptor for Auth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        Ok(request)
    }
}

/// The client type.
pub type Client = WorkersClient<InterceptedService<Channel, Auth>>;

/// A client for `url` (`http://host:port`); connects on first use. Must be called inside a
/// tokio runtime.
pub fn connect(url: &str) -> Result<Client> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| Error::Service {
            what: format!("--coordinator `{url}`"),
            reason: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_keepalive(Some(Duration::from_secs(30)));
    let endpoint =
        endofm_proto::tls::configure_from_env(endpoint, url).map_err(|reason| Error::Service {
            what: format!("--coordinator `{url}`"),
            reason,
        })?;
    let channel = endpoint.connect_lazy();
    Ok(WorkersClient::with_interceptor(channel, Auth::from_env()?))
}

/// Maps a failed call to the crate's error.
pub fn rpc_error(call: impl Into<String>, status: &tonic::Status) -> Error {
    Error::Rpc {
        call: call.into(),
        reason: format!("{:?}: {}", status.code(), status.message()),
    }
}
