//! The one error type of the worker library.

use std::path::PathBuf;

/// Everything that can go wrong in the worker library, with what a person needs to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("reading weights", ...).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file that is not a valid safetensors archive.
    #[error("{path} is not a readable safetensors file: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// A parameter the network has but the weights lack.
    #[error(
        "{path}: missing parameter `{key}` (expected shape {expected:?}); the weights do not fit this model configuration"
    )]
    MissingKey {
        /// The weights file.
        path: PathBuf,
        /// The state-dict key.
        key: String,
        /// The shape the network expects.
        expected: Vec<i64>,
    },
    /// A tensor in the weights that the network has no parameter for.
    #[error(
        "{path}: unexpected tensor `{key}` with shape {found:?}: the network has no such parameter (wrong configuration, or weights of another model)"
    )]
    UnexpectedKey {
        /// The weights file.
        path: PathBuf,
        /// The state-dict key.
        key: String,
        /// Its shape in the file.
        found: Vec<i64>,
    },
    /// A parameter whose shape differs from the network's.
    #[error("{path}: parameter `{key}` has shape {found:?}, the configuration needs {expected:?}")]
    ShapeMismatch {
        /// The weights file.
        path: PathBuf,
        /// The state-dict key.
        key: String,
        /// The shape the network expects.
        expected: Vec<i64>,
        /// The shape in the file.
        found: Vec<i64>,
    },
    /// A tensor whose element type cannot be used where it was given.
    #[error("`{name}` has element type {found}, expected {expected}")]
    DType {
        /// Name of the tensor.
        name: String,
        /// Its element type.
        found: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// An input tensor of the wrong shape.
    #[error("input `{name}`: {reason}")]
    Input {
        /// Name of the input.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An invalid configuration.
    #[error(transparent)]
    Config(#[from] endofm_shared::Error),
    /// A libtorch failure not covered above.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// An object-storage operation failed.
    #[error("storage {uri}: {reason}")]
    Storage {
        /// The object or location.
        uri: String,
        /// What failed.
        reason: String,
    },
    /// Object storage kept failing transiently (5xx, throttling, timeouts, lost connections)
    /// past the retry budget, or missed an operation's deadline: the data is not known to be
    /// bad, the storage is unavailable. Never a reason to skip an input; the step fails.
    #[error("storage {uri}: {reason}")]
    StorageUnavailable {
        /// The object or location.
        uri: String,
        /// What failed, for how long, and the setting that bounds it.
        reason: String,
    },
    /// The external checkpoint converter failed.
    #[error("checkpoint conversion failed: {0}")]
    Convert(String),
    /// A clip (video file, in-memory video or JPEG-frame folder) that cannot be decoded as asked:
    /// unreadable, truncated, corrupt, or shorter than the frames requested.
    #[error("decoding clip {uri}: {reason}")]
    ClipDecode {
        /// The clip: a path, an object-storage URI or a folder.
        uri: String,
        /// What went wrong.
        reason: String,
    },
    /// A downstream dataset that does not follow its layout (`datasets`): the file, with the
    /// line where there is one, and what is wrong with it.
    #[error("dataset {location}: {reason}")]
    Dataset {
        /// The file or folder, e.g. `/data/PolypDiag/splits/train.txt line 4`.
        location: String,
        /// What is wrong and, where it helps, what to do.
        reason: String,
    },
    /// A clip that cannot be written.
    #[error("encoding clip {path}: {reason}")]
    ClipEncode {
        /// The output file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The FFmpeg libraries found at run time lack a codec endofm needs.
    #[error(
        "this FFmpeg build has no {codec} {role}: install Debian's libavcodec (scripts/setup.sh) or an FFmpeg build that includes it"
    )]
    CodecUnavailable {
        /// FFmpeg's codec name.
        codec: &'static str,
        /// "encoder" or "decoder".
        role: &'static str,
    },
    /// A collective operation failed because of a peer: refused handshake, lost connection or
    /// no progress within the deadline. The group is unusable afterwards; restart the attempt.
    #[error("collective with rank {peer} ({addr}): {reason}")]
    Collective {
        /// The peer's rank.
        peer: usize,
        /// The peer's address.
        addr: std::net::SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// An NCCL operation failed or missed its deadline (or NCCL cannot run here). The
    /// communicator has been aborted; restart the attempt.
    #[error("nccl{}: {reason}", nccl_rank(*.rank, *.world))]
    Nccl {
        /// This rank.
        rank: usize,
        /// Number of ranks; 0 before there is a communicator (making the unique id).
        world: usize,
        /// What happened: the operation, seconds waited, NCCL's code and last error.
        reason: String,
    },
    /// A call to the coordinator failed (unreachable, refused, or a stale generation).
    #[error("coordinator {call}: {reason}")]
    Rpc {
        /// The call ("register", "rendezvous get ring/1", ...).
        call: String,
        /// The status or transport error.
        reason: String,
    },
    /// The agent or a rank process could not do its part of the service (bad flags, spawning or
    /// supervising a rank, rendezvous).
    #[error("{what}: {reason}")]
    Service {
        /// What was being done.
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// Evaluation input that metrics cannot be computed from (`eval`): no samples, a class
    /// outside the known ones, a score that is not a probability, masks of different sizes.
    #[error("evaluation input {what}: {reason}")]
    EvalInput {
        /// The input ("label", "sample 3: logits", "masks", ...).
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A run report or one of its plots that cannot be made, written or read.
    #[error("report {path}: {reason}")]
    Report {
        /// The report or plot file.
        path: PathBuf,
        /// What went wrong and, where it helps, what to do (e.g. install a font).
        reason: String,
    },
}

/// " rank R of W", or nothing before there is a communicator.
fn nccl_rank(rank: usize, world: usize) -> String {
    if world == 0 {
        String::new()
    } else {
        format!(" rank {rank} of {world}")
    }
}

/// Result alias for the worker library.
pub type Result<T> = std::result::Result<T, Error>;
