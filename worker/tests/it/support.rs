//! Shared helpers: where the reference vectors are, running the worker binary, a real S3
//! server (moto) on a loopback port.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `shared/reference` of the project (beside the repository), or `ENDOFM_REFERENCE_DIR`.
pub fn reference_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("ENDOFM_REFERENCE_DIR") {
        return PathBuf::from(dir);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference");
    assert!(
        dir.is_dir(),
        "reference vectors not found at {} (set ENDOFM_REFERENCE_DIR)",
        dir.display()
    );
    dir
}

/// The tiny reference directory.
pub fn tiny() -> PathBuf {
    reference_root().join("endofm-tiny")
}

/// Runs `endofm-worker` with `args`.
pub fn worker(args: &[&str]) -> Output {
    worker_env(args, &[])
}

/// Runs `endofm-worker` with `args` and extra environment variables.
pub fn worker_env(args: &[&str], env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_endofm-worker"));
    cmd.args(args).env("RUST_LOG", "warn");
    if env.iter().any(|(k, _)| k.starts_with("AWS_")) {
        // Only the given S3 settings: none of the developer's own (a profile, a session token
        // or a second region variable would otherwise mix in).
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("running endofm-worker")
}

/// stdout of a successful run, or a panic showing stderr.
pub fn worker_ok(args: &[&str]) -> String {
    let out = worker(args);
    assert!(
        out.status.success(),
        "endofm-worker {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr of a failed run, or a panic when it succeeded.
pub fn worker_err(args: &[&str]) -> String {
    let out = worker(args);
    assert!(
        !out.status.success(),
        "endofm-worker {args:?} should have failed; stdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The venv's python (with torch), for building and reading PyTorch pickles.
pub fn python() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(p.exists(), "{} missing: run scripts/setup.sh", p.display());
    p
}

/// Runs a python snippet with the venv; panics with its stderr on failure.
pub fn run_python(code: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A moto S3 server on a free loopback port, killed when dropped (also when a test panics).
/// moto accepts any credentials and does not check signatures.
pub struct S3Server {
    child: Child,
    addr: SocketAddr,
    log: tempfile::NamedTempFile,
}

impl S3Server {
    /// Region the clients are configured with.
    pub const REGION: &'static str = "us-east-1";

    /// Starts moto from `.cache/moto-venv` (made by scripts/setup.sh; `ENDOFM_MOTO_SERVER`
    /// overrides the path) and waits until it answers.
    pub fn start() -> Self {
        let exe = std::env::var_os("ENDOFM_MOTO_SERVER").map_or_else(
            || {
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../.cache/moto-venv/bin/moto_server")
            },
            PathBuf::from,
        );
        assert!(
            exe.is_file(),
            "the S3 test server (moto) is missing at {}: run scripts/setup.sh",
            exe.display()
        );
        // The port is free when asked; another process may still take it before moto binds,
        // so a server that exits early is retried on a new port.
        let mut last_log = String::new();
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("finding a free port")
                .port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            // moto logs every request: into a file, as an unread pipe would fill and stall it.
            let log = tempfile::NamedTempFile::new().expect("creating the moto log");
            let child = Command::new(&exe)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log.reopen().expect("opening the moto log"))
                .stderr(log.reopen().expect("opening the moto log"))
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", exe.display()));
            let mut server = Self { child, addr, log };
            if server.wait_ready(Duration::from_secs(30)) {
                return server;
            }
            last_log = server.log_text();
        }
        panic!("moto did not start; its output:\n{last_log}");
    }

    fn wait_ready(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if self.request("GET", "/").is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// What moto printed so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// One plain HTTP/1.1 request without a body; the status code.
    fn request(&self, method: &str, path: &str) -> std::io::Result<u16> {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.addr
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))
    }

    /// Creates a bucket (object_store cannot: a PUT of the bucket path does).
    pub fn create_bucket(&self, name: &str) {
        let status = self
            .request("PUT", &format!("/{name}"))
            .unwrap_or_else(|e| panic!("creating bucket {name}: {e}"));
        assert_eq!(status, 200, "creating bucket {name}");
    }

    /// The `object_store` settings of a client of this server (dummy keys).
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("aws_endpoint", self.endpoint()),
            ("aws_allow_http", "true".into()),
            ("aws_region", Self::REGION.into()),
            ("aws_access_key_id", "endofm-test".into()),
            ("aws_secret_access_key", "endofm-test".into()),
        ]
    }

    /// The same settings as the environment of a spawned process.
    pub fn env(&self) -> Vec<(String, String)> {
        self.settings()
            .into_iter()
            .map(|(k, v)| (k.to_ascii_uppercase(), v))
            .collect()
    }

    /// A [`endofm_worker::store::Store`] at `uri` on this server.
    pub fn store(&self, uri: &str) -> endofm_worker::store::Store {
        let uri = endofm_shared::StorageUri::parse(uri).unwrap();
        let settings = self.settings();
        let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
        endofm_worker::store::Store::open_with(&uri, false, &settings).unwrap()
    }
}

/// Uploads every file below `dir` to `store`, keys relative to `dir`.
pub fn upload_dir(store: &endofm_worker::store::Store, dir: &Path) -> usize {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, &mut files);
    for f in &files {
        let key = f
            .strip_prefix(dir)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        store
            .put(&key, bytes::Bytes::from(std::fs::read(f).unwrap()))
            .unwrap();
    }
    files.len()
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small generated corpus (clips of `frames` frames, short side `size`).
pub fn corpus(dir: &Path, clips: usize, frames: usize, size: usize, seed: u64) -> PathBuf {
    let out = dir.join("corpus");
    worker_ok(&[
        "synth",
        "--kind",
        "pretrain",
        "--out",
        out.to_str().unwrap(),
        "--clips",
        &clips.to_string(),
        "--frames",
        &frames.to_string(),
        "--size",
        &size.to_string(),
        "--seed",
        &seed.to_string(),
    ]);
    out
}
