//! Types shared by every endofm program (coordinator, CLI, worker): the model configuration with
//! its named presets, the error type, and telemetry set-up. Never depends on libtorch.

pub mod detect_config;
pub mod error;
pub mod failure;
pub mod finetune_config;
pub mod job_spec;
pub mod model_config;
pub mod overlay;
pub mod prom_text;
pub mod segmenter_config;
pub mod storage;
pub mod telemetry;
pub mod text;
pub mod train_config;

pub use detect_config::{DetectorConfig, IouLossKind};
pub use error::{Error, Result};
pub use failure::FailureClass;
pub use finetune_config::{FinetuneConfig, InitFrom, TaskKind};
pub use job_spec::{DeviceKind, JobKind, JobSpec, ViewSizes};
pub use model_config::{HeadConfig, ModelConfig, ParamCounts, Preset};
pub use segmenter_config::SegmenterConfig;
pub use storage::StorageUri;
pub use train_config::{PretrainConfig, TrainPrecision};
