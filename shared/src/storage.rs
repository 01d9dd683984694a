//! Storage locations as users write them (a local path, `file://`, `s3://`, `gs://`, `az://`),
//! parsed and checked without touching the network, so that a bad URI is refused early with
//! what is wrong. Opening a location is the worker's business.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Where data or checkpoints live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "lowercase")]
pub enum StorageUri {
    /// A local directory or file (absolute after parsing when given as `file://`).
    Local {
        /// The path.
        path: PathBuf,
    },
    /// Amazon S3 or an S3-compatible server (`s3://bucket/prefix`).
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix inside the bucket (no leading or trailing slash; may be empty).
        prefix: String,
    },
    /// Google Cloud Storage (`gs://bucket/prefix`).
    Gcs {
        /// Bucket name.
        bucket: String,
        /// Object prefix.
        prefix: String,
    },
    /// Azure Blob Storage (`az://container/prefix`).
    Azure {
        /// Container name.
        container: String,
        /// Blob prefix.
        prefix: String,
    },
}

fn bucket_and_prefix(rest: &str, uri: &str, what: &str) -> Result<(String, String)> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(Error::invalid(
            "uri",
            format!("`{uri}` names no {what} (expected scheme://{what}/prefix)"),
        ));
    }
    let valid = bucket
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.' || c == '_');
    if !valid || bucket.len() < 3 || bucket.len() > 63 {
        return Err(Error::invalid(
            "uri",
            format!(
                "`{bucket}` in `{uri}` is not a valid {what} name (3-63 lower-case letters, digits, '-', '.')"
            ),
        ));
    }
    let prefix = prefix.trim_matches('/').to_string();
    if prefix.split('/').any(|seg| seg == "..") {
        return Err(Error::invalid("uri", format!("`{uri}` contains `..`")));
    }
    Ok((bucket.to_string(), prefix))
}

impl StorageUri {
    /// Parses a location. Plain paths are local; `file://` must be followed by an absolute path.
    pub fn parse(uri: &str) -> Result<Self> {
        let uri = uri.trim();
        if uri.is_empty() {
            return Err(Error::invalid("uri", "is empty"));
        }
        match uri.split_once("://") {
            None => Ok(StorageUri::Local {
                path: PathBuf::from(uri),
            }),
            Some(("file", rest)) => {
                if !rest.starts_with('/') {
                    return Err(Error::invalid(
                        "uri",
                        format!("`{uri}`: file:// needs an absolute path (file:///data/corpus)"),
                    ));
                }
                Ok(StorageUri::Local {
                    path: PathBuf::from(rest),
                })
            }
            Some(("s3", rest)) => {
                let (bucket, prefix) = bucket_and_prefix(rest, uri, "bucket")?;
                Ok(StorageUri::S3 { bucket, prefix })
            }
            Some(("gs", rest)) => {
                let (bucket, prefix) = bucket_and_prefix(rest, uri, "bucket")?;
                Ok(StorageUri::Gcs { bucket, prefix })
            }
            Some(("az" | "azure", rest)) => {
                let (container, prefix) = bucket_and_prefix(rest, uri, "container")?;
                Ok(StorageUri::Azure { container, prefix })
            }
            Some((scheme, _)) => Err(Error::invalid(
                "uri",
                format!(
                    "`{uri}`: unsupported scheme `{scheme}` (use a path, file://, s3://, gs:// or az://)"
                ),
            )),
        }
    }

    /// The key prefix inside the store (empty for local paths, which are the store's root).
    pub fn prefix(&self) -> &str {
        match self {
            StorageUri::Local { .. } => "",
            StorageUri::S3 { prefix, .. }
            | StorageUri::Gcs { prefix, .. }
            | StorageUri::Azure { prefix, .. } => prefix,
        }
    }

    /// A location below this one.
    pub fn join(&self, child: &str) -> Self {
        let child = child.trim_matches('/');
        let join = |p: &str| {
            if p.is_empty() {
                child.to_string()
            } else {
                format!("{p}/{child}")
            }
        };
        match self {
            StorageUri::Local { path } => StorageUri::Local {
                path: path.join(child),
            },
            StorageUri::S3 { bucket, prefix } => StorageUri::S3 {
                bucket: bucket.clone(),
                prefix: join(prefix),
            },
            StorageUri::Gcs { bucket, prefix } => StorageUri::Gcs {
                bucket: bucket.clone(),
                prefix: join(prefix),
            },
            StorageUri::Azure { container, prefix } => StorageUri::Azure {
                container: container.clone(),
                prefix: join(prefix),
            },
        }
    }
}

impl fmt::Display for StorageUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let with = |scheme: &str, b: &str, p: &str| {
            if p.is_empty() {
                format!("{scheme}://{b}")
            } else {
                format!("{scheme}://{b}/{p}")
            }
        };
        match self {
            StorageUri::Local { path } => write!(f, "{}", path.display()),
            StorageUri::S3 { bucket, prefix } => f.write_str(&with("s3", bucket, prefix)),
            StorageUri::Gcs { bucket, prefix } => f.write_str(&with("gs", bucket, prefix)),
            StorageUri::Azure { container, prefix } => f.write_str(&with("az", container, prefix)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme() {
        assert_eq!(
            StorageUri::parse("data/corpus").unwrap(),
            StorageUri::Local {
                path: "data/corpus".into()
            }
        );
        assert_eq!(
            StorageUri::parse("file:///data/c").unwrap(),
            StorageUri::Local {
                path: "/data/c".into()
            }
        );
        assert_eq!(
            StorageUri::parse("s3://my-bucket/runs/a/").unwrap(),
            StorageUri::S3 {
                bucket: "my-bucket".into(),
                prefix: "runs/a".into()
            }
        );
        assert_eq!(
            StorageUri::parse("gs://bkt").unwrap(),
            StorageUri::Gcs {
                bucket: "bkt".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            StorageUri::parse("az://cont/x").unwrap().to_string(),
            "az://cont/x"
        );
    }

    #[test]
    fn refuses_bad_locations_with_a_reason() {
        for (uri, needle) in [
            ("ftp://x/y", "unsupported scheme `ftp`"),
            ("s3://", "names no bucket"),
            ("s3://Bad_Bucket!/x", "not a valid bucket"),
            ("file://relative/path", "absolute"),
            ("s3://bucket/../etc", ".."),
            ("  ", "empty"),
        ] {
            let err = StorageUri::parse(uri).unwrap_err().to_string();
            assert!(err.contains(needle), "{uri}: {err}");
        }
    }

    #[test]
    fn joins_children() {
        let s3 = StorageUri::parse("s3://bkt/run").unwrap();
        assert_eq!(
            s3.join("checkpoints/x").to_string(),
            "s3://bkt/run/checkpoints/x"
        );
        let root = StorageUri::parse("s3://bkt").unwrap();
        assert_eq!(root.join("a").prefix(), "a");
    }
}
