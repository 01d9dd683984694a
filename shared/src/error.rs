//! The one error type of `endofm-shared`.

/// Errors raised while reading or validating shared types.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range or inconsistent with another one.
    #[error("invalid configuration: field `{field}`: {reason}")]
    InvalidConfig {
        /// Dotted path of the offending field.
        field: String,
        /// What is wrong and what would be accepted.
        reason: String,
    },
    /// A preset name that does not exist.
    #[error("unknown model preset `{name}` (known presets: {known})")]
    UnknownPreset {
        /// The name given.
        name: String,
        /// Comma-separated list of valid names.
        known: String,
    },
    /// A job spec that does not parse (syntax, unknown field, wrong type); the message names
    /// the field.
    #[error("invalid job spec ({format}): {message}")]
    SpecParse {
        /// "TOML" or "JSON".
        format: &'static str,
        /// The parser's message (with the field and position).
        message: String,
    },
    /// A configuration document that is not valid JSON or has fields of the wrong type.
    #[error("cannot parse configuration {origin}: {source}")]
    Parse {
        /// Where the document came from (a path or a description).
        origin: String,
        /// The underlying parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// `Ok(())` when `ok`, else [`Error::InvalidConfig`] for `field` with the reason `reason` gives
/// (computed only on failure).
pub fn check(ok: bool, field: &str, reason: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(field, reason()))
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::InvalidConfig`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
