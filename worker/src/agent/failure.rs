//! The class of a rank's failure ([`FailureClass`]), decided from the worker's error where it is
//! known, and from the exit status where it is not (a crash, a signal, an orphaned rank). The
//! rank prints its class on stdout (`{"type":"failure",..}`) just before exiting; the agent puts
//! it on the exit it reports; the coordinator's restart policy follows it.

use endofm_shared::FailureClass;

use crate::Error;

/// The class of an error that ended a rank.
///
/// Deterministic (`non_finite_loss`, `invalid_input`): the same inputs fail the same way, so
/// another attempt would only repeat the failure. Everything that depends on the world outside
/// the inputs (storage, peers, the coordinator, the output being held by a previous attempt's
/// rank that is still stopping) is transient.
pub fn classify(error: &Error) -> FailureClass {
    match error {
        Error::Input { name, .. } if name == "loss" => FailureClass::NonFiniteLoss,
        // The output's run lock is still held, by a rank of an earlier attempt that has not
        // exited yet: the next attempt finds it free.
        Error::Input { reason, .. } if reason.contains("is in use by another run") => {
            FailureClass::Storage
        }
        Error::Input { .. }
        | Error::Config(_)
        | Error::Dataset { .. }
        | Error::MissingKey { .. }
        | Error::UnexpectedKey { .. }
        | Error::ShapeMismatch { .. }
        | Error::DType { .. }
        | Error::Safetensors { .. }
        | Error::Convert(_)
        | Error::ClipDecode { .. }
        | Error::ClipEncode { .. }
        | Error::CodecUnavailable { .. }
        | Error::EvalInput { .. } => FailureClass::InvalidInput,
        Error::Io { .. } | Error::Storage { .. } | Error::StorageUnavailable { .. } => {
            FailureClass::Storage
        }
        Error::Collective { .. } | Error::Nccl { .. } | Error::Rpc { .. } => {
            FailureClass::Collective
        }
        Error::Service { what, .. } if what == "training" => FailureClass::Stopped,
        Error::Torch(_) | Error::Service { .. } | Error::Report { .. } => FailureClass::Unknown,
        #[allow(unreachable_patterns)]
        _ => FailureClass::Unknown,
    }
}

/// The class of an exit the rank could not classify itself: an orphaned rank (its agent went
/// away) lost its worker; anything else (a signal, a panic) is unknown.
pub fn of_exit(code: Option<i32>) -> FailureClass {
    if code == Some(super::rank::EXIT_ORPHANED) {
        FailureClass::WorkerLost
    } else {
        FailureClass::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_their_classes() {
        let input = |name: &str, reason: &str| Error::Input {
            name: name.into(),
            reason: reason.into(),
        };
        let cases = [
            (
                input("loss", "is NaN at step 3: stopping (as the reference does)"),
                FailureClass::NonFiniteLoss,
            ),
            (
                input(
                    "--out",
                    "/runs/a holds checkpoints of a run with other hyper-parameters",
                ),
                FailureClass::InvalidInput,
            ),
            (
                input(
                    "--out",
                    "/runs/a is in use by another run (it holds /runs/a/run.lock)",
                ),
                FailureClass::Storage,
            ),
            (
                Error::Config(endofm_shared::Error::invalid("train.lr", "bad")),
                FailureClass::InvalidInput,
            ),
            (
                Error::Dataset {
                    location: "/d/splits/train.txt line 3".into(),
                    reason: "no such video".into(),
                },
                FailureClass::InvalidInput,
            ),
            (
                Error::StorageUnavailable {
                    uri: "s3://b/k".into(),
                    reason: "503 for 300 s".into(),
                },
                FailureClass::Storage,
            ),
            (
                Error::Storage {
                    uri: "s3://b/k".into(),
                    reason: "connection reset".into(),
                },
                FailureClass::Storage,
            ),
            (
                Error::Collective {
                    peer: 1,
                    addr: "127.0.0.1:1".parse().expect("addr"),
                    reason: "no progress for 4 s".into(),
                },
                FailureClass::Collective,
            ),
            (
                Error::Rpc {
                    call: "rendezvous get ring/1".into(),
                    reason: "unavailable".into(),
                },
                FailureClass::Collective,
            ),
            (
                Error::Service {
                    what: "training".into(),
                    reason: "stopped on request after step 3 of 8".into(),
                },
                FailureClass::Stopped,
            ),
        ];
        for (error, class) in cases {
            assert_eq!(classify(&error), class, "{error}");
        }
        assert_eq!(
            of_exit(Some(super::super::rank::EXIT_ORPHANED)),
            FailureClass::WorkerLost
        );
        assert_eq!(of_exit(None), FailureClass::Unknown);
        assert_eq!(of_exit(Some(1)), FailureClass::Unknown);
    }
}
