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
