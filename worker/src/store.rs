//! Object storage for corpora and checkpoints through `object_store` (local disk, S3 and
//! S3-compatible servers, GCS, Azure), behind blocking calls so that data-loader threads and the
//! checkpoint writer can use it without being async. Credentials and endpoints come from the
//! environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`), never from job specs.
//!
//! Keys are used verbatim: a key is split at `/` and nothing else is escaped, so every legal file
//! name (`100%.mp4`, `a#b.mp4`, `[x] y.mp4`) names the same object locally and in a bucket
//! (object_store's `Path::from` would percent-encode such characters, and S3 requests would then
//! carry them encoded twice). Keys with empty or `.`/`..` segments or control characters are
//! refused, naming the key.
//!
//! Faults (see [`StorageLimits`]): every HTTP request has a timeout, transient failures (5xx,
//! 429 and 408 answers, lost connections, timed-out idempotent requests) are retried by our own
//! layer with exponential backoff that honours `Retry-After`, for up to `retry_for` (5 minutes
//! by default), and every operation has a deadline. What still fails is
//! [`Error::StorageUnavailable`] (a missing object, refused credentials or a missing bucket are
//! [`Error::Storage`], at once). Start-up operations ([`Store::startup`]) use a short deadline, so
//! a silent endpoint is reported in seconds, and S3 without credentials is refused up front
//! when the instance-metadata service does not answer instead of waiting minutes for it.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
    ReqwestConnector,
};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use tokio::runtime::Runtime;

use endofm_shared::StorageUri;

use crate::{Error, Result};

/// Objects larger than this go up as a multipart upload.
const MULTIPART_THRESHOLD: usize = 64 << 20;
/// Part size of multipart uploads (S3 needs at least 5 MiB for all but the last part).
const PART_SIZE: usize = 16 << 20;

/// Environment variable: seconds one HTTP request may take (default 30).
pub const REQUEST_TIMEOUT_ENV: &str = "ENDOFM_STORAGE_REQUEST_TIMEOUT_S";
/// Environment variable: seconds transient failures of one operation are retried (default 300).
pub const RETRY_ENV: &str = "ENDOFM_STORAGE_RETRY_S";
/// Environment variable: deadline in seconds of start-up operations (default 20).
pub const STARTUP_ENV: &str = "ENDOFM_STORAGE_STARTUP_S";

/// Time limits of storage operations. Each can be set in the environment ([`REQUEST_TIMEOUT_ENV`],
/// [`RETRY_ENV`], [`STARTUP_ENV`]) or per store with the settings `endofm_request_timeout_s`,
/// `endofm_retry_s`, `endofm_startup_s` of [`Store::open_with`] (seconds, fractions allowed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StorageLimits {
    /// One HTTP request, from connecting to the last byte of the answer.
    pub request_timeout: Duration,
    /// Connecting to the endpoint.
    pub connect_timeout: Duration,
    /// How long transient failures of one operation are retried before it fails.
    pub retry_for: Duration,
    /// Deadline of a start-up operation (nothing is known to work yet: fail fast).
    pub startup: Duration,
}

impl Default for StorageLimits {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            retry_for: Duration::from_secs(300),
            startup: Duration::from_secs(20),
        }
    }
}

impl StorageLimits {
    /// The defaults overridden by the environment; a malformed value is an error naming it.
    pub fn from_env() -> Result<Self> {
        let mut limits = Self::default();
        for (var, key) in [
            (REQUEST_TIMEOUT_ENV, "endofm_request_timeout_s"),
            (RETRY_ENV, "endofm_retry_s"),
            (STARTUP_ENV, "endofm_startup_s"),
        ] {
            if let Ok(value) = std::env::var(var) {
                limits.set(key, &value).map_err(|reason| Error::Input {
                    name: var.into(),
                    reason,
                })?;
            }
        }
        Ok(limits)
    }

    /// Sets one of our settings; `Ok(false)` when `key` is not ours.
    fn set(&mut self, key: &str, value: &str) -> std::result::Result<bool, String> {
        let slot = match key {
            "endofm_request_timeout_s" => &mut self.request_timeout,
            "endofm_retry_s" => &mut self.retry_for,
            "endofm_startup_s" => &mut self.startup,
            _ => return Ok(false),
        };
        let secs: f64 = value
            .trim()
            .parse()
            .ok()
            .filter(|s: &f64| s.is_finite() && *s > 0.0 && *s < 1e7)
            .ok_or_else(|| format!("`{value}` is not a positive number of seconds"))?;
        *slot = Duration::from_secs_f64(secs);
        Ok(true)
    }

    /// Deadline of one ordinary operation: every retry and one last request.
    fn deadline(&self) -> Duration {
        self.retry_for + self.request_timeout + self.connect_timeout
    }
}

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

/// Our retry layer under object_store's HTTP client (whose own retries are turned off: they
/// ignore `Retry-After` and give up after ~10 tries whatever the server asks for).
#[derive(Debug)]
struct Patient {
    inner: HttpClient,
    retry_for: Duration,
}

/// Connector building [`Patient`] clients.
#[derive(Debug)]
struct PatientConnector {
    retry_for: Duration,
}

impl HttpConnector for PatientConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(Patient {
            inner,
            retry_for: self.retry_for,
        }))
    }
}

/// Whether an HTTP status is worth retrying (server trouble, throttling, request timeout).
fn transient_status(status: http::StatusCode) -> bool {
    status.is_server_error()
        || status == http::StatusCode::TOO_MANY_REQUESTS
        || status == http::StatusCode::REQUEST_TIMEOUT
}

/// The wait a `Retry-After` header asks for (seconds or an HTTP date).
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// Exponential backoff: 0.2 s, 0.4 s, … capped at 15 s, with up to 25 % jitter taken
/// from the clock (retries of many ranks spread out; no shared random state).
fn backoff(attempt: u32) -> Duration {
    let base = 0.2 * 2f64.powi(attempt.min(10) as i32);
    let jitter = f64::from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() % 1000)
            .unwrap_or(0),
    ) / 4000.0;
    Duration::from_secs_f64(base.min(15.0) * (1.0 + jitter))
}

#[async_trait::async_trait]
impl HttpService for Patient {
    async fn call(&self, req: HttpRequest) -> std::result::Result<HttpResponse, HttpError> {
        let started = Instant::now();
        let idempotent = req.method() != http::Method::POST;
        let mut attempt = 0u32;
        loop {
            let result = self.inner.execute(req.clone()).await;
            let wait = match &result {
                Ok(r) if transient_status(r.status()) => {
                    Some(retry_after(r.headers()).unwrap_or_else(|| backoff(attempt)))
                }
                Ok(_) => None,
                Err(e) => match e.kind() {
                    HttpErrorKind::Connect | HttpErrorKind::Request => Some(backoff(attempt)),
                    HttpErrorKind::Timeout | HttpErrorKind::Interrupted if idempotent => {
                        Some(backoff(attempt))
                    }
                    _ => None,
                },
            };
            let Some(wait) = wait else {
                return result;
            };
            if started.elapsed() + wait > self.retry_for {
                return result;
            }
            let what = match &result {
                Ok(r) => r.status().to_string(),
                Err(e) => e.to_string(),
            };
            tracing::warn!(
                method = %req.method(),
                uri = %req.uri().path(),
                attempt,
                wait_s = wait.as_secs_f64(),
                error = %what,
                "transient storage failure, retrying"
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
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
    limits: StorageLimits,
    /// Deadline of each operation of this handle ([`Store::startup`] shortens it).
    deadline: Duration,
    /// Which limit the deadline is, for messages.
    deadline_setting: &'static str,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.uri)
    }
}

/// Whether any of `vars` is set (non-empty) in the environment.
fn env_set(vars: &[&str]) -> bool {
    vars.iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
}

/// Whether the EC2 instance-metadata service accepts a connection within `limit`.
fn metadata_service_answers(endpoint: &str, limit: Duration) -> bool {
    use std::net::ToSocketAddrs;
    let host = endpoint
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/');
    let host = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    host.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|addr| std::net::TcpStream::connect_timeout(&addr, limit).is_ok())
}

impl Store {
    /// Opens `uri`. A local directory is created when `create` is set, and must exist otherwise.
    pub fn open(uri: &StorageUri, create: bool) -> Result<Self> {
        Self::open_with(uri, create, &[])
    }

    /// Opens `uri` like [`Store::open`], with settings that override the environment's: for
    /// the cloud stores `object_store` configuration keys such as `aws_endpoint` or
    /// `aws_allow_http` (ignored for local directories), and for every store our time limits
    /// (`endofm_request_timeout_s`, `endofm_retry_s`, `endofm_startup_s`, see
    /// [`StorageLimits`]). For programs that talk to more than one endpoint, and for tests,
    /// which must not change their own process's environment.
    ///
    /// S3 without credentials (no access key in the settings or the environment, no web
    /// identity, container or profile credentials) is refused at once, naming what to set,
    /// when the instance-metadata service does not accept a connection within a second.
    pub fn open_with(uri: &StorageUri, create: bool, settings: &[(&str, &str)]) -> Result<Self> {
        let err = |reason: String| Error::Storage {
            uri: uri.to_string(),
            reason,
        };
        let mut limits = StorageLimits::from_env()?;
        let mut rest = Vec::new();
        for (k, v) in settings {
            match limits.set(k, v) {
                Ok(true) => {}
                Ok(false) => rest.push((*k, *v)),
                Err(reason) => return Err(err(format!("setting `{k}`: {reason}"))),
            }
        }
        let settings = rest;
        let bad_key = |key: &str| err(format!("unknown storage setting `{key}`"));
        let secs = |d: Duration| format!("{}ms", d.as_millis().max(1));
        let timeouts = [
            ("timeout", secs(limits.request_timeout)),
            ("connect_timeout", secs(limits.connect_timeout)),
        ];
        // Our layer retries; object_store's own retries would ignore Retry-After.
        let retry = RetryConfig {
            max_retries: 0,
            retry_timeout: limits.retry_for,
            ..RetryConfig::default()
        };
        let connector = PatientConnector {
            retry_for: limits.retry_for,
        };
        // The three cloud builders share no trait: apply the settings, then build.
        macro_rules! build {
            ($builder:expr, $check:expr) => {{
                let mut b = $builder;
                for (k, v) in &timeouts {
                    b = b.with_config(k.parse().map_err(|_| bad_key(k))?, v.as_str());
                }
                for (k, v) in &settings {
                    b = b.with_config(k.parse().map_err(|_| bad_key(k))?, *v);
                }
                let b = b.with_retry(retry.clone()).with_http_connector(connector);
                #[allow(clippy::redundant_closure_call)]
                ($check)(&b)?;
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
                use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey as K};
                build!(
                    AmazonS3Builder::from_env().with_bucket_name(bucket),
                    |b: &AmazonS3Builder| -> Result<()> {
                        let has = |k: K| b.get_config_value(&k).is_some_and(|v| !v.is_empty());
                        if has(K::AccessKeyId)
                            || has(K::SkipSignature)
                                && b.get_config_value(&K::SkipSignature).as_deref() == Some("true")
                            || has(K::ContainerCredentialsRelativeUri)
                            || has(K::ContainerCredentialsFullUri)
                            || env_set(&[
                                "AWS_WEB_IDENTITY_TOKEN_FILE",
                                "AWS_PROFILE",
                                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                            ])
                        {
                            return Ok(());
                        }
                        let endpoint = b
                            .get_config_value(&K::MetadataEndpoint)
                            .unwrap_or_else(|| "http://169.254.169.254".into());
                        if metadata_service_answers(&endpoint, Duration::from_secs(1)) {
                            return Ok(());
                        }
                        Err(err(format!(
                            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                             (or AWS_WEB_IDENTITY_TOKEN_FILE, AWS_PROFILE, container credentials); \
                             the instance-metadata service at {endpoint} did not answer within 1 s"
                        )))
                    }
                )
            }
            StorageUri::Gcs { bucket, .. } => build!(
                object_store::gcp::GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket),
                |_: &_| -> Result<()> { Ok(()) }
            ),
            StorageUri::Azure { container, .. } => build!(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(container),
                |_: &_| -> Result<()> { Ok(()) }
            ),
        };
        Ok(Self {
            inner,
            root: uri.prefix().to_string(),
            uri: uri.clone(),
            limits,
            deadline: limits.deadline(),
            deadline_setting: RETRY_ENV,
        })
    }

    /// The same store with the start-up deadline on every operation ([`StorageLimits::startup`]):
    /// for the first operations of a command (reading a clip list, looking for checkpoints), so
    /// that an endpoint that is silent, unreachable or refusing is reported within seconds.
    pub fn startup(&self) -> Self {
        Self {
            deadline: self.limits.startup,
            deadline_setting: STARTUP_ENV,
            ..self.clone()
        }
    }

    /// The time limits of this store.
    pub fn limits(&self) -> StorageLimits {
        self.limits
    }

    /// The location this store was opened at.
    pub fn uri(&self) -> &StorageUri {
        &self.uri
    }

    /// Human-readable location of `key`.
    pub fn describe(&self, key: &str) -> String {
        self.uri.join(key).to_string()
    }

    /// The object path of `key`, verbatim (see the module docs).
    fn path(&self, key: &str) -> Result<ObjectPath> {
        let key = key.trim_matches('/');
        let full = match (self.root.is_empty(), key.is_empty()) {
            (true, _) => key.to_string(),
            (false, true) => self.root.clone(),
            (false, false) => format!("{}/{key}", self.root),
        };
        ObjectPath::parse(&full).map_err(|e| Error::Storage {
            uri: self.describe(key),
            reason: format!("not a usable object key: {e}"),
        })
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

    /// Runs one operation under this handle's deadline.
    fn run<T>(
        &self,
        key: &str,
        op: &str,
        fut: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T> {
        let deadline = self.deadline;
        // The timer must be created inside the runtime.
        match runtime().block_on(async move { tokio::time::timeout(deadline, fut).await }) {
            Ok(r) => r.map_err(|e| self.storage_err(key, op, e)),
            Err(_) => Err(Error::StorageUnavailable {
                uri: self.describe(key),
                reason: format!(
                    "{op}: no answer within {:.0} s (a silent, frozen or unreachable endpoint; {} sets this limit)",
                    deadline.as_secs_f64(),
                    self.deadline_setting
                ),
            }),
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
            _ if timed_out(&e) => format!(
                "{op}: no answer within {} s (request timeout; {REQUEST_TIMEOUT_ENV} sets it): {e}",
                self.limits.request_timeout.as_secs_f64()
            ),
            _ => format!("{op}: {e}"),
        };
        let uri = self.describe(key);
        match e {
            object_store::Error::NotFound { .. }
            | object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
            | object_store::Error::InvalidPath { .. }
            | object_store::Error::NotSupported { .. }
            | object_store::Error::NotImplemented { .. }
            | object_store::Error::UnknownConfigurationKey { .. } => Error::Storage { uri, reason },
            // Everything else went through our retry layer for `retry_for` first.
            _ => Error::StorageUnavailable {
                uri,
                reason: format!(
                    "{reason} (transient failures retried for up to {:.0} s; {RETRY_ENV} sets this)",
                    self.limits.retry_for.as_secs_f64()
                ),
            },
        }
    }

    /// Reads a whole object.
    pub fn get(&self, key: &str) -> Result<Bytes> {
        let path = self.path(key)?;
        self.run(key, "read", async {
            let r = self.inner.get(&path).await?;
            r.bytes().await
        })
    }

    /// Reads a whole object; `None` when there is no object of that key (a missing bucket is
    /// still an error).
    pub fn get_opt(&self, key: &str) -> Result<Option<Bytes>> {
        let path = self.path(key)?;
        let bucket_missing = |e: &object_store::Error| {
            ["NoSuchBucket", "ContainerNotFound"]
                .iter()
                .any(|code| e.to_string().contains(code))
        };
        self.run(key, "read", async {
            match self.inner.get(&path).await {
                Ok(r) => r.bytes().await.map(Some),
                Err(e @ object_store::Error::NotFound { .. }) if !bucket_missing(&e) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    /// Whether an object exists.
    pub fn exists(&self, key: &str) -> Result<bool> {
        let path = self.path(key)?;
        self.run(key, "stat", async {
            match self.inner.head(&path).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    /// Writes a whole object (replacing it). Transient failures are retried like every request;
    /// large objects go up in multipart chunks (an upload that fails is aborted).
    pub fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path(key)?;
        self.run(key, "write", async {
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
        })
    }

    /// Lists every object below `prefix` (recursively), keys relative to the store's root.
    pub fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let path = if prefix.is_empty() && self.root.is_empty() {
            None
        } else {
            Some(self.path(prefix)?)
        };
        let metas: Vec<object_store::ObjectMeta> =
            self.run(prefix, "list", self.inner.list(path.as_ref()).try_collect())?;
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
        let path = self.path(key)?;
        self.run(key, "delete", async {
            match self.inner.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    /// Removes the temporary files that interrupted writes left below `prefix` and returns
    /// their keys. On local disk a write goes to `NAME#N` and is renamed to `NAME` when complete;
    /// a killed process leaves `NAME#N` behind, invisible to [`Store::list`]. Object stores
    /// write atomically (a failed multipart upload is aborted by [`Store::put`]), so there is
    /// nothing to remove there.
    pub fn remove_temporaries(&self, prefix: &str) -> Result<Vec<String>> {
        let StorageUri::Local { path } = &self.uri else {
            return Ok(Vec::new());
        };
        let dir = path.join(prefix.trim_matches('/'));
        let mut removed = Vec::new();
        let mut stack = vec![dir];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let p = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(p);
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                if is_temporary_name(&name) {
                    std::fs::remove_file(&p).map_err(|source| Error::Io {
                        action: "removing an interrupted write's temporary file",
                        path: p.clone(),
                        source,
                    })?;
                    let key = p
                        .strip_prefix(path)
                        .map(|r| r.to_string_lossy().replace('\\', "/"))
                        .unwrap_or_else(|_| p.display().to_string());
                    tracing::info!(file = %p.display(), "removed an interrupted write's temporary file");
                    removed.push(key);
                }
            }
        }
        removed.sort();
        Ok(removed)
    }
}

/// Whether an error (anywhere in its chain) is an HTTP request that timed out: reqwest says
/// only "error sending request" for it.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(http) = err.downcast_ref::<HttpError>()
            && matches!(http.kind(), HttpErrorKind::Timeout)
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// Whether a file name is a local write's temporary file (`NAME#N`, N digits): such names are
/// reserved for it, and local storage cannot hold a file of that name.
pub fn is_temporary_name(name: &str) -> bool {
    name.rsplit_once('#')
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
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
    fn retry_after_is_read_in_seconds_or_as_a_date_and_limits_parse() {
        let mut h = http::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(http::header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        let later = std::time::SystemTime::now() + Duration::from_secs(30);
        h.insert(
            http::header::RETRY_AFTER,
            httpdate::fmt_http_date(later).parse().unwrap(),
        );
        let wait = retry_after(&h).unwrap();
        assert!(
            (Duration::from_secs(28)..=Duration::from_secs(30)).contains(&wait),
            "{wait:?}"
        );
        assert!(transient_status(http::StatusCode::SERVICE_UNAVAILABLE));
        assert!(transient_status(http::StatusCode::TOO_MANY_REQUESTS));
        assert!(!transient_status(http::StatusCode::FORBIDDEN));
        assert!(backoff(0) < backoff(3) && backoff(40) <= Duration::from_secs_f64(15.0 * 1.25));
        assert!(is_temporary_name("student.safetensors#1") && !is_temporary_name("a#b.mp4"));

        let mut limits = StorageLimits::default();
        assert_eq!(limits.set("endofm_retry_s", "2.5"), Ok(true));
        assert_eq!(limits.retry_for, Duration::from_millis(2500));
        assert_eq!(limits.set("aws_endpoint", "x"), Ok(false));
        assert!(limits.set("endofm_startup_s", "-1").is_err());
        let uri = StorageUri::parse("s3://some-bucket/p").unwrap();
        let err = Store::open_with(&uri, false, &[("endofm_request_timeout_s", "soon")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("endofm_request_timeout_s") && err.contains("soon"),
            "{err}"
        );
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
