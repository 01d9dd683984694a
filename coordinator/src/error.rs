//! The one error type of the coordinator library.

use std::path::PathBuf;

/// Errors of the coordinator and the CLI's client side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The durable store could not be opened, read or written.
    #[error("state store {path}: {action}: {message}")]
    Store {
        /// The store's file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The underlying error.
        message: String,
    },
    /// A stored record that does not decode (a newer format or damage).
    #[error("state store: record {key} does not decode: {message}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// The decoder's message.
        message: String,
    },
    /// Bad input from a caller.
    #[error("{0}")]
    Invalid(String),
    /// A socket or file could not be used.
    #[error("{action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A gRPC call failed.
    #[error("{call}: {status}")]
    Rpc {
        /// Which call.
        call: &'static str,
        /// The status the server (or the transport) returned.
        status: Box<tonic::Status>,
    },
    /// The coordinator cannot be reached.
    #[error("cannot connect to the coordinator at {url}: {message}")]
    Connect {
        /// The address tried.
        url: String,
        /// Why.
        message: String,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn store(
        path: &std::path::Path,
        action: &'static str,
        e: impl std::fmt::Display,
    ) -> Self {
        Error::Store {
            path: path.to_path_buf(),
            action,
            message: e.to_string(),
        }
    }

    pub(crate) fn rpc(call: &'static str, status: tonic::Status) -> Self {
        Error::Rpc {
            call,
            status: Box::new(status),
        }
    }
}
