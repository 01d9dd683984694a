//! The endofm gRPC API, version 1 (`endofm.v1`), generated from `proto/endofm/v1/service.proto`:
//! messages, the `Jobs` and `Workers` clients and servers, and the file descriptor set for
//! gRPC reflection.

#![allow(missing_docs, clippy::all)]

/// Version 1 of the API.
pub mod v1 {
    tonic::include_proto!("endofm.v1");

    /// The encoded file descriptor set of `endofm.v1` (for gRPC reflection).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("endofm_v1_descriptor");

    impl JobState {
        /// Whether a job in this state will not change again.
        pub fn is_final(self) -> bool {
            matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
        }

        /// Lower-case name used by the CLI and in logs ("queued", "running", ...).
        pub fn label(self) -> &'static str {
            match self {
                Self::Unspecified => "unspecified",
                Self::Queued => "queued",
                Self::Running => "running",
                Self::Succeeded => "succeeded",
                Self::Failed => "failed",
                Self::Cancelled => "cancelled",
            }
        }
    }
}

/// TLS for clients of the coordinator: `https://` URLs are verified against the CA in
/// `ENDOFM_TLS_CA` (a PEM file) when it is set, else against the system's roots.
pub mod tls {
    use std::path::Path;

    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

    /// Environment variable naming the PEM file of the CA that signed the coordinator's
    /// certificate.
    pub const CA_ENV: &str = "ENDOFM_TLS_CA";

    /// Makes ring the process's rustls crypto provider (idempotent). Needed before any TLS
    /// handshake: with both of rustls's providers compiled in, it cannot choose by itself.
    pub fn install_crypto_provider() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }

    /// Adds TLS to `endpoint` when `url` is `https://`; `ca` (a PEM file) replaces the
    /// system roots. Errors are messages naming the file or the URL.
    pub fn configure(endpoint: Endpoint, url: &str, ca: Option<&Path>) -> Result<Endpoint, String> {
        if !url.starts_with("https://") {
            return Ok(endpoint);
        }
        install_crypto_provider();
        let mut cfg = ClientTlsConfig::new();
        match ca {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("reading the CA certificate {}: {e}", path.display()))?;
                cfg = cfg.ca_certificate(Certificate::from_pem(pem));
            }
            None => cfg = cfg.with_native_roots(),
        }
        endpoint
            .tls_config(cfg)
            .map_err(|e| format!("TLS for {url}: {e}"))
    }

    /// [`configure`] with the CA from `ENDOFM_TLS_CA`.
    pub fn configure_from_env(endpoint: Endpoint, url: &str) -> Result<Endpoint, String> {
        let ca = std::env::var_os(CA_ENV).map(std::path::PathBuf::from);
        configure(endpoint, url, ca.as_deref())
    }
}
