//! Evaluation of fine-tuned models: metrics (`metrics`), the run's `report.json` (`report`) and
//! its PNG plots (`plots`). Nothing here touches libtorch: callers pass plain numbers.

pub mod metrics;
pub mod plots;
pub mod report;
