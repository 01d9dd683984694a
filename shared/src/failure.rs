//! Why an attempt failed, in classes that decide what the coordinator does next. A rank that
//! fails prints its class (`{"type":"failure",..}` on stdout, classified by the worker from its
//! error); the agent puts it on the rank's exit; the coordinator restarts the attempt (after a
//! backoff) only when the class can be cured by trying again.
//!
//! Deterministic classes (never restarted: the same inputs fail the same way):
//! `non_finite_loss` (the loss became NaN/inf, e.g. a learning rate far too high) and
//! `invalid_input` (the configuration, the data, the weights or the output location cannot be
//! used as given). Transient classes (restarted with backoff): `worker_lost` (lease expired,
//! agent gone), `collective` (a peer died or a collective timed out), `storage` (object storage
//! or file system errors), `stopped` (a rank stopped on request before the end) and `unknown`
//! (anything not classified, e.g. a crash or a kill).

use serde::{Deserialize, Serialize};

/// A failure class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The loss became non-finite: retrying from the same checkpoint repeats it.
    NonFiniteLoss,
    /// Configuration, data, weights or output refused by the run: retrying cannot help.
    InvalidInput,
    /// The worker running a rank stopped answering (lease expired) or its agent went away.
    WorkerLost,
    /// A collective failed: a peer died, a connection broke, or the deadline passed.
    Collective,
    /// Object storage or the file system failed.
    Storage,
    /// A rank stopped on request before the end of its run.
    Stopped,
    /// Not classified (a crash, a signal, an error of no known class).
    Unknown,
}

impl FailureClass {
    /// Every class.
    pub const ALL: [FailureClass; 7] = [
        FailureClass::NonFiniteLoss,
        FailureClass::InvalidInput,
        FailureClass::WorkerLost,
        FailureClass::Collective,
        FailureClass::Storage,
        FailureClass::Stopped,
        FailureClass::Unknown,
    ];

    /// The name used on the wire and in `endofm status`.
    pub fn name(self) -> &'static str {
        match self {
            FailureClass::NonFiniteLoss => "non_finite_loss",
            FailureClass::InvalidInput => "invalid_input",
            FailureClass::WorkerLost => "worker_lost",
            FailureClass::Collective => "collective",
            FailureClass::Storage => "storage",
            FailureClass::Stopped => "stopped",
            FailureClass::Unknown => "unknown",
        }
    }

    /// Parses a name; an empty or unknown name is [`FailureClass::Unknown`] (older agents send
    /// none).
    pub fn parse(name: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|c| c.name() == name)
            .unwrap_or(FailureClass::Unknown)
    }

    /// Whether another attempt can succeed where this one failed.
    pub fn restartable(self) -> bool {
        !matches!(
            self,
            FailureClass::NonFiniteLoss | FailureClass::InvalidInput
        )
    }

    /// Words for people: what the class means.
    pub fn describe(self) -> &'static str {
        match self {
            FailureClass::NonFiniteLoss => "the loss became non-finite",
            FailureClass::InvalidInput => "invalid configuration, data or weights",
            FailureClass::WorkerLost => "a worker was lost",
            FailureClass::Collective => "a collective failed or timed out",
            FailureClass::Storage => "a storage error",
            FailureClass::Stopped => "a rank stopped before the end",
            FailureClass::Unknown => "an unclassified failure",
        }
    }
}

impl std::fmt::Display for FailureClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_only_deterministic_classes_are_final() {
        for c in FailureClass::ALL {
            assert_eq!(FailureClass::parse(c.name()), c);
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.name()));
        }
        assert_eq!(FailureClass::parse(""), FailureClass::Unknown);
        assert_eq!(FailureClass::parse("bogus"), FailureClass::Unknown);
        let final_: Vec<_> = FailureClass::ALL
            .into_iter()
            .filter(|c| !c.restartable())
            .collect();
        assert_eq!(
            final_,
            [FailureClass::NonFiniteLoss, FailureClass::InvalidInput]
        );
    }
}
