//! Object storage for corpora and checkpoints through `object_store` (local disk, S3 and
//! S3-compatible servers, GCS, Azure), behind blocking calls so that data-loader threads and the
//! checkpoint writer can use it without being async. Credentials and endpoints come from the
//! environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`), never from job specs.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::runtime::Runtime;

use endofm_shared::StorageUri;

use crate::{Error, Result};

/// Objects larger than this go up as a multipart upload.
const MULTIPART_THRESHOLD: usize = 64 << 20;
/// Part size of multipart uploads (S3 needs at least 5 MiB for all but the last part).
const PART_SIZE: usize = 16 << 20;

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("endofm-io")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the I/O runtime: {e}"))
    })
}

/// An object listed under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Key relative to the store's root.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// A storage location opened for reading and writing keys below it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    root: String,
    uri: StorageUri,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.uri)
    }
}

impl Store {
    /// Opens `uri`. A local directory is created when `create` is set, and must exist otherwise.
    pub fn open(uri: &StorageUri, create: bool) -> Result<Self> {
        Self::open_with(uri, create, &[])
    }

    /// Opens `uri` like [`Store::open`], with settings that override the environment's for the
    /// cloud stores: `object_store` configuration keys such as `aws_endpoint` or
    /// `aws_allow_http` (ignored for local directories). For programs that talk to more than
    /// one endpoint, and for tests, which must not change their own process's environment.
    pub fn open_with(uri: &StorageUri, create: bool, settings: &[(&str, &str)]) -> Result<Self> {
        let err = |reason: String| Error::Storage {
            uri: uri.to_string(),
            reason,
        };
        let bad_key = |key: &str| err(format!("unknown storage setting `{key}`"));
        // The three cloud builders share no trait: apply the settings, then build.
        macro_rules! build {
            ($builder:expr) => {{
                let mut b = $builder;
                for (k, v) in settings {
                    b = b.with_config(k.parse().map_err(|_| bad_key(k))?, *v);
                }
                Arc::new(b.build().map_err(|e| err(e.to_string()))?)
            }};
        }
        let inner: Arc<dyn ObjectStore> = match uri {
            StorageUri::Local { path } => {
                if create {
                    std::fs::create_dir_all(path)
                        .map_err(|e| err(format!("cannot create directory: {e}")))?;
                } else if !path.is_dir() {
                    return Err(err("no such directory".into()));
                }
                let fs = object_store::local::LocalFileSystem::new_with_prefix(path)
                    .map_err(|e| err(e.to_string()))?;
                Arc::new(fs)
            }
            StorageUri::S3 { bucket, .. } => {
                build!(object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket))
            }
            StorageUri::Gcs { bucket, .. } => build!(
                object_store::gcp::GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket)
            ),
            StorageUri::Azure { container, .. } => build!(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(container)
            ),
        };
        Ok(Self {
            inner,
            root: uri.prefix().to_string(),
            uri: uri.clone(),
        })
    }

    /// The location this store was opened at.
    pub fn uri(&self) -> &StorageUri {
        &self.uri
    }

    /// Human-readable location of `key`.
    pub fn describe(&self, key: &str) -> String {
        self.uri.join(key).to_string()
    }

    fn path(&self, key: &str) -> ObjectPath {
        let key = key.trim_matches('/');
        if self.root.is_empty() {
            ObjectPath::from(key)
        } else if key.is_empty() {
            ObjectPath::from(self.root.as_str())
        } else {
            ObjectPath::from(format!("{}/{key}", self.root))
        }
    }

    fn relative(&self, path: &ObjectPath) -> String {
        let full = path.as_ref();
        if self.root.is_empty() {
            full.to_string()
        } else {
            full.strip_prefix(&self.root)
                .map(|s| s.trim_start_matches('/').to_string())
                .unwrap_or_else(|| full.to_string())
        }
    }

    fn storage_err(&self, key: &str, op: &str, e: object_store::Error) -> Error {
        let reason = match &e {
            // S3 and Azure answer 404 with a code in the body for a missing bucket/container;
            // object_store's message carries the body.
            object_store::Error::NotFound { .. }
                if ["NoSuchBucket", "ContainerNotFound"]
                    .iter()
                    .any(|code| e.to_string().contains(code)) =>
            {
                format!(
                    "{op}: the {} does not exist",
                    match self.uri {
                        StorageUri::Azure { .. } => "container",
                        _ => "bucket",
                    }
                )
            }
            object_store::Error::NotFound { .. } => format!("{op}: not found"),
            _ => format!("{op}: {e}"),
        };
        Error::Storage {
            uri: self.describe(key),
            reason,
        }
    }

    /// Reads a whole object.
    pub fn get(&self, key: &str) -> Result<Bytes> {
        let path = self.path(key);
        runtime()
            .block_on(async {
                let r = self.inner.get(&path).await?;
                r.bytes().await
            })
            .map_err(|e| self.storage_err(key, "read", e))
    }

    /// Whether an object exists.
    pub fn exists(&self, key: &str) -> Result<bool> {
        let path = self.path(key);
        match runtime().block_on(self.inner.head(&path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.storage_err(key, "stat", e)),
        }
    }

    /// Writes a whole object (replacing it), with up to 3 attempts on failure (the HTTP stores
    /// also retry transient errors internally). Large objects go up in multipart chunks.
    pub fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path(key);
        let mut last = None;
        for attempt in 0..3 {
            let result = runtime().block_on(async {
                if data.len() > MULTIPART_THRESHOLD {
                    let mut upload = self.inner.put_multipart(&path).await?;
                    let sent = async {
                        for chunk in data.chunks(PART_SIZE) {
                            upload
                                .put_part(PutPayload::from(data.slice_ref(chunk)))
                                .await?;
                        }
                        upload.complete().await.map(|_| ())
                    }
                    .await;
                    if sent.is_err() {
                        // Otherwise the server keeps (and bills) the parts already uploaded.
                        let _ = upload.abort().await;
                    }
                    sent
                } else {
                    self.inner
                        .put(&path, PutPayload::from(data.clone()))
                        .await
                        .map(|_| ())
                }
            });
            match result {
                Ok(()) => return Ok(()),
                // A missing bucket or a refused credential stays so: no retry.
                Err(
                    e @ (object_store::Error::NotFound { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }),
                ) => return Err(self.storage_err(key, "write", e)),
                Err(e) => {
                    tracing::warn!(key, attempt, error = %e, "write failed, retrying");
                    last = Some(e);
                    if attempt < 2 {
                        std::thread::sleep(std::time::Duration::from_millis(200 << attempt));
                    }
                }
            }
        }
        match last {
            Some(e) => Err(self.storage_err(key, "write", e)),
            None => Ok(()),
        }
    }

    /// Lists every object below `prefix` (recursively), keys relative to the store's root.
    pub fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let path = self.path(prefix);
        let path = if prefix.is_empty() && self.root.is_empty() {
            None
        } else {
            Some(path)
        };
        let metas: Vec<object_store::ObjectMeta> = runtime()
            .block_on(self.inner.list(path.as_ref()).try_collect())
            .map_err(|e| self.storage_err(prefix, "list", e))?;
        let mut out: Vec<Listed> = metas
            .into_iter()
            .map(|m| Listed {
                key: self.relative(&m.location),
                size: m.size,
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Deletes an object (absent objects are fine).
    pub fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        match runtime().block_on(self.inner.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.storage_err(key, "delete", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_override_the_environment_and_unknown_ones_are_named() {
        let uri = StorageUri::parse("s3://some-bucket/p").unwrap();
        let store = Store::open_with(
            &uri,
            false,
            &[
                ("aws_endpoint", "http://127.0.0.1:9"),
                ("aws_allow_http", "true"),
                ("aws_region", "us-east-1"),
            ],
        )
        .unwrap();
        assert_eq!(store.describe("a"), "s3://some-bucket/p/a");
        let err = Store::open_with(&uri, false, &[("aws_no_such_setting", "1")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("aws_no_such_setting"), "{err}");
    }

    #[test]
    fn local_round_trip_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let uri = StorageUri::parse(&dir.path().join("out").display().to_string()).unwrap();
        assert!(
            Store::open(&uri, false).is_err(),
            "opened a missing directory for reading"
        );
        let store = Store::open(&uri, true).unwrap();
        store.put("a/b.txt", Bytes::from_static(b"hello")).unwrap();
        store.put("a/c.txt", Bytes::from_static(b"x")).unwrap();
        assert_eq!(&store.get("a/b.txt").unwrap()[..], b"hello");
        assert!(store.exists("a/c.txt").unwrap());
        assert!(!store.exists("a/zzz").unwrap());
        let keys: Vec<String> = store
            .list("a")
            .unwrap()
            .into_iter()
            .map(|l| l.key)
            .collect();
        assert_eq!(keys, vec!["a/b.txt", "a/c.txt"]);
        store.delete("a/c.txt").unwrap();
        store.delete("a/c.txt").unwrap();
        let err = store.get("a/c.txt").unwrap_err().to_string();
        assert!(
            err.contains("a/c.txt") && err.contains("not found"),
            "{err}"
        );
    }
}
