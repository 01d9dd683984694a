//! Object storage under faults: a real S3 server (moto on loopback) behind a small
//! fault-injecting HTTP proxy of our own ([`FaultProxy`]: brownouts answering 503 SlowDown with
//! `Retry-After` on reads or writes of chosen keys, a frozen endpoint that reads requests and
//! never answers) and a silent endpoint (a socket nobody answers). Every time limit is set per
//! store (`endofm_*_s` settings) so the tests take seconds.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use endofm_shared::StorageUri;
use endofm_worker::data::ViewConfig;
use endofm_worker::data::loader::{Corpus, Loader, LoaderConfig};
use endofm_worker::run::checkpoint::{self, Checkpointable, Committed, Manifest, Snapshot, Writer};
use endofm_worker::store::Store;

use crate::support::{self, S3Server};

const BUCKET: &str = "faults";

/// A 503 brownout: requests of `method` whose path contains `key` are answered
/// `503 SlowDown` (with `Retry-After: retry_after` seconds when set) until `until`.
#[derive(Debug, Clone)]
struct Brownout {
    method: &'static str,
    key: String,
    retry_after: Option<u32>,
    until: Instant,
}

#[derive(Debug, Default)]
struct Faults {
    brownouts: Vec<Brownout>,
    frozen: bool,
}

/// A fault-injecting HTTP/1.1 proxy in front of `upstream`, one request per connection
/// (`Connection: close` both ways).
struct FaultProxy {
    addr: SocketAddr,
    faults: Arc<Mutex<Faults>>,
    /// `METHOD PATH` of every request, and whether it was refused.
    log: Arc<Mutex<Vec<(String, bool)>>>,
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
}

fn read_head(r: &mut impl BufRead) -> Option<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            return Some(lines);
        }
        lines.push(line);
    }
}

fn rewrite_head(lines: &[String]) -> Vec<u8> {
    let mut out = String::new();
    for l in lines {
        if l.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

impl FaultProxy {
    fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Self {
            addr,
            faults: Arc::default(),
            log: Arc::default(),
            stop: Arc::default(),
            refused: Arc::default(),
        };
        let (faults, log, stop, refused) = (
            Arc::clone(&proxy.faults),
            Arc::clone(&proxy.log),
            Arc::clone(&proxy.stop),
            Arc::clone(&proxy.refused),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (faults, log, stop, refused) = (
                    Arc::clone(&faults),
                    Arc::clone(&log),
                    Arc::clone(&stop),
                    Arc::clone(&refused),
                );
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream, &faults, &log, &stop, &refused);
                });
            }
        });
        proxy
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn brownout(&self, method: &'static str, key: &str, retry_after: Option<u32>, secs: f64) {
        self.faults.lock().unwrap().brownouts.push(Brownout {
            method,
            key: key.to_string(),
            retry_after,
            until: Instant::now() + Duration::from_secs_f64(secs),
        });
    }

    fn freeze(&self, frozen: bool) {
        self.faults.lock().unwrap().frozen = frozen;
    }

    fn requests(&self) -> Vec<(String, bool)> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.freeze(false);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(
    conn: TcpStream,
    upstream: SocketAddr,
    faults: &Mutex<Faults>,
    log: &Mutex<Vec<(String, bool)>>,
    stop: &AtomicBool,
    refused: &AtomicUsize,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let Some(head) = read_head(&mut reader) else {
        return Ok(());
    };
    let request_line = head.first().cloned().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let length: usize = head
        .iter()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    // Frozen: the request was read, no answer ever comes (until unfrozen or the proxy stops).
    while faults.lock().unwrap().frozen && !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let brownout = {
        let f = faults.lock().unwrap();
        f.brownouts
            .iter()
            .find(|b| b.method == method && path.contains(&b.key) && Instant::now() < b.until)
            .cloned()
    };
    log.lock()
        .unwrap()
        .push((format!("{method} {path}"), brownout.is_some()));
    let mut conn = conn;
    if let Some(b) = brownout {
        refused.fetch_add(1, Ordering::SeqCst);
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
        let retry = b
            .retry_after
            .map(|s| format!("Retry-After: {s}\r\n"))
            .unwrap_or_default();
        write!(
            conn,
            "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n{retry}Connection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    }
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(&rewrite_head(&head))?;
    up.write_all(&body)?;
    let mut up_reader = BufReader::new(up);
    let Some(response) = read_head(&mut up_reader) else {
        return Ok(());
    };
    conn.write_all(&rewrite_head(&response))?;
    std::io::copy(&mut up_reader, &mut conn)?;
    Ok(())
}

/// Settings of a client of `endpoint` (moto's dummy keys) with short time limits.
fn settings(endpoint: &str, retry_s: f64) -> Vec<(&'static str, String)> {
    vec![
        ("aws_endpoint", endpoint.to_string()),
        ("aws_allow_http", "true".into()),
        ("aws_region", S3Server::REGION.into()),
        ("aws_access_key_id", "endofm-test".into()),
        ("aws_secret_access_key", "endofm-test".into()),
        ("endofm_retry_s", retry_s.to_string()),
        ("endofm_request_timeout_s", "2".into()),
        ("endofm_startup_s", "2".into()),
    ]
}

fn open(uri: &str, settings: &[(&'static str, String)]) -> Store {
    let s: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Store::open_with(&StorageUri::parse(uri).unwrap(), false, &s).unwrap()
}

fn server_addr(server: &S3Server) -> SocketAddr {
    server
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .unwrap()
}

#[test]
fn every_legal_name_round_trips_on_s3_and_locally() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let proxy = FaultProxy::start(server_addr(&server));
    let s3 = open(
        &format!("s3://{BUCKET}/names"),
        &settings(&proxy.endpoint(), 5.0),
    );
    let dir = tempfile::tempdir().unwrap();
    let local = Store::open(
        &StorageUri::parse(dir.path().to_str().unwrap()).unwrap(),
        true,
    )
    .unwrap();
    let names = [
        "100%.mp4",
        "a#b [x]{y}.mp4",
        "é ü+&=,;.mp4",
        "sub dir/q?*~^|`.mp4",
        "%2F%25.mp4",
    ];
    for store in [&s3, &local] {
        for (i, name) in names.iter().enumerate() {
            store.put(name, Bytes::from(vec![i as u8; 3])).unwrap();
            assert_eq!(
                &store.get(name).unwrap()[..],
                &[i as u8; 3],
                "{store:?} {name}"
            );
            assert!(store.exists(name).unwrap(), "{store:?} {name}");
        }
        let mut listed: Vec<String> = store.list("").unwrap().into_iter().map(|l| l.key).collect();
        listed.sort();
        let mut expected: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(listed, expected, "{store:?}");
    }
    // Encoded once on the wire: `%` travels as %25, never %2525.
    let requests = proxy.requests();
    assert!(
        requests
            .iter()
            .any(|(r, _)| r == "GET /faults/names/100%25.mp4")
            && requests
                .iter()
                .any(|(r, _)| r == "GET /faults/names/%252F%2525.mp4")
            && !requests.iter().any(|(r, _)| r.contains("100%2525")),
        "{requests:?}"
    );
    // Keys storage cannot hold are refused naming them.
    let err = local.put("a/../b", Bytes::new()).unwrap_err().to_string();
    assert!(err.contains("a/../b"), "{err}");
}

/// A small corpus in the bucket: 4 clips of 8 frames at 48 px, `train.csv`.
fn upload_corpus(server: &S3Server) {
    let dir = tempfile::tempdir().unwrap();
    let local = support::corpus(dir.path(), 4, 8, 48, 2);
    let store = server.store(&format!("s3://{BUCKET}/corpus"));
    support::upload_dir(&store, &local);
}

fn loader_config() -> LoaderConfig {
    LoaderConfig {
        seed: 1,
        batch: 2,
        rank: 0,
        world: 1,
        threads: 1,
        prefetch: 2,
        views: ViewConfig {
            global_size: 16,
            local_size: 8,
            ..ViewConfig::default()
        },
    }
}

fn batches(store: Store, steps: usize) -> endofm_worker::Result<(Vec<Vec<tch::Tensor>>, u64)> {
    let corpus = Arc::new(Corpus::open_in(store, "train.csv")?);
    let mut loader = Loader::start(corpus, loader_config(), 0)?;
    let mut out = Vec::new();
    for _ in 0..steps {
        out.push(loader.next_batch()?.views);
    }
    Ok((out, loader.stats().clips_failed.load(Ordering::Relaxed)))
}

#[test]
fn a_read_brownout_is_ridden_out_honouring_retry_after_and_changes_nothing() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    upload_corpus(&server);
    let proxy = FaultProxy::start(server_addr(&server));
    let direct = open(
        &format!("s3://{BUCKET}/corpus"),
        &settings(&server.endpoint(), 5.0),
    );
    let (reference, _) = batches(direct, 2).unwrap();

    // Every clip read answers 503 SlowDown, Retry-After 1, for 2.5 s.
    let through = open(
        &format!("s3://{BUCKET}/corpus"),
        &settings(&proxy.endpoint(), 30.0),
    );
    let started = Instant::now();
    proxy.brownout("GET", "/corpus/synth/", Some(1), 2.5);
    let (got, failed) = batches(through, 2).unwrap();
    assert_eq!(failed, 0, "a storage error is not a bad clip");
    for (a, b) in got.iter().flatten().zip(reference.iter().flatten()) {
        assert!(a.equal(b), "the brownout changed the training data");
    }
    let refused = proxy.refused.load(Ordering::SeqCst);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "not retried through the brownout"
    );
    // One data thread, Retry-After 1 s over 2.5 s: about three refusals, not a burst of ten.
    assert!((1..=5).contains(&refused), "{refused} requests refused");
}

#[test]
fn a_persistent_read_brownout_fails_the_step_without_skipping_a_clip() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    upload_corpus(&server);
    let proxy = FaultProxy::start(server_addr(&server));
    proxy.brownout("GET", "/corpus/synth/", None, 600.0);
    let through = open(
        &format!("s3://{BUCKET}/corpus"),
        &settings(&proxy.endpoint(), 1.0),
    );
    let started = Instant::now();
    let err = batches(through, 2).map(|_| ()).unwrap_err();
    assert!(
        matches!(err, endofm_worker::Error::StorageUnavailable { .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("synth/") && text.contains("ENDOFM_STORAGE_RETRY_S"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// A checkpointable value (one small tensor).
struct Value(f32);

impl Checkpointable for Value {
    fn snapshot(&self) -> Snapshot {
        let mut files = std::collections::BTreeMap::new();
        files.insert("x".to_string(), tch::Tensor::from_slice(&[self.0]));
        Snapshot {
            files: vec![("state.safetensors".into(), files)],
            extra: serde_json::Map::new(),
        }
    }
    fn restore(&mut self, _: &Committed<'_>) -> endofm_worker::Result<()> {
        Ok(())
    }
}

fn manifest(step: usize) -> Manifest {
    let model = endofm_shared::Preset::Tiny.config();
    serde_json::from_value(serde_json::json!({
        "version": 1, "step": step, "epoch": 0, "iters_per_epoch": 10, "total_steps": 10,
        "world_size": 1, "corpus": endofm_worker::data::CorpusFingerprint::of(&[]),
        "model": model, "files": {}, "created_unix": 0,
    }))
    .unwrap()
}

#[test]
fn a_failed_periodic_checkpoint_is_a_warning_and_the_final_one_fails() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let proxy = FaultProxy::start(server_addr(&server));
    let store = open(
        &format!("s3://{BUCKET}/run"),
        &settings(&proxy.endpoint(), 0.5),
    );
    proxy.brownout("PUT", "step-000000001/", Some(1), 600.0);
    let mut writer = Writer::new(store.clone(), 5);
    for step in 1..=3 {
        writer.save(&Value(step as f32), manifest(step)).unwrap();
        writer.wait().ok();
    }
    assert_eq!(writer.failed(), 1);
    writer.finish().expect("the final checkpoint committed");
    assert_eq!(checkpoint::committed(&store).unwrap(), vec![2, 3]);

    proxy.brownout("PUT", "step-000000004/", None, 600.0);
    let mut writer = Writer::new(store.clone(), 5);
    writer.save(&Value(4.0), manifest(4)).unwrap();
    let err = writer
        .finish()
        .expect_err("the final checkpoint failed")
        .to_string();
    assert!(err.contains("step-000000004"), "{err}");
    assert_eq!(checkpoint::committed(&store).unwrap(), vec![2, 3]);
}

#[test]
fn a_frozen_endpoint_fails_within_the_deadlines_and_stops_in_time() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let proxy = FaultProxy::start(server_addr(&server));
    let patient = open(
        &format!("s3://{BUCKET}/run"),
        &settings(&proxy.endpoint(), 60.0),
    );
    let mut s = settings(&proxy.endpoint(), 1.0);
    s.retain(|(k, _)| *k != "endofm_request_timeout_s");
    s.push(("endofm_request_timeout_s", "0.5".into()));
    let store = open(&format!("s3://{BUCKET}/run"), &s);
    store.put("before", Bytes::from_static(b"x")).unwrap();
    proxy.freeze(true);

    let started = Instant::now();
    let err = patient.startup().get("before").unwrap_err().to_string();
    assert!(
        err.contains("no answer within 2 s") && err.contains("ENDOFM_STORAGE_STARTUP_S"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(4));

    let started = Instant::now();
    let err = store.get("before").unwrap_err();
    assert!(
        matches!(err, endofm_worker::Error::StorageUnavailable { .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("no answer within 0.5 s")
            && text.contains("ENDOFM_STORAGE_REQUEST_TIMEOUT_S"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );

    // The training thread never waits on the stalled writer for long, and a stop is bounded.
    let started = Instant::now();
    let mut writer = Writer::with_limits(store.clone(), 3, None, Duration::from_millis(200));
    for step in 1..=4 {
        writer.save(&Value(1.0), manifest(step)).unwrap();
    }
    assert!(
        writer.failed() >= 1,
        "a checkpoint past the queue is skipped"
    );
    let err = writer
        .finish_within(Duration::from_secs(1))
        .expect_err("nothing was written")
        .to_string();
    assert!(err.contains("abandoned"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    proxy.freeze(false);
    assert!(checkpoint::committed(&store).unwrap().is_empty());
}

#[test]
fn start_up_names_a_silent_endpoint_and_missing_credentials_within_seconds() {
    // A socket that accepts connections (the kernel's backlog) and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let store = open("s3://nowhere/corpus", &settings(&endpoint, 60.0));
    let started = Instant::now();
    let err = Corpus::open_in(store, "train.csv").unwrap_err().to_string();
    assert!(
        err.contains("train.csv") && err.contains("no answer within 2 s"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let creds = [
        "AWS_ACCESS_KEY_ID",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ];
    if let Some(var) = creds.iter().find(|v| std::env::var_os(v).is_some()) {
        eprintln!("skipped the missing-credentials case: {var} is set in this environment");
        return;
    }
    // Nothing listens on the metadata endpoint given: no instance credentials either.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let metadata = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let started = Instant::now();
    let err = Store::open_with(
        &StorageUri::parse("s3://bucket/x").unwrap(),
        false,
        &[
            ("aws_endpoint", endpoint.as_str()),
            ("aws_region", "us-east-1"),
            ("aws_metadata_endpoint", metadata.as_str()),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("no S3 credentials") && err.contains("AWS_ACCESS_KEY_ID"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}
