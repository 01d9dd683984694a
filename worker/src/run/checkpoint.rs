//! Checkpoints of any run in object storage. A checkpoint is a folder
//! `checkpoints/step-NNNNNNNNN/` holding the safetensors files the task snapshots (pre-training:
//! `student.safetensors`, `teacher.safetensors`, `optimizer.safetensors`, `state.safetensors`;
//! fine-tuning: `model.safetensors`, `optimizer.safetensors`), each under published key names,
//! and `manifest.json`, written last: a checkpoint without its manifest does not exist.
//! Snapshots are taken on the training thread (device → host copies) and written by a
//! background thread, which also keeps only the newest K checkpoints and removes the temporary
//! files of interrupted writes (`NAME#N` on local disk).
//!
//! Failures: a periodic checkpoint that cannot be written is a warning (logged, counted in
//! [`Writer::failed`]) and the run goes on; the final one ([`Writer::finish`]) fails the run.
//! The training thread never waits on storage for long: a save finding the writer still busy
//! waits at most [`Writer::with_limits`]'s `queue_wait` and then skips that checkpoint
//! (warning); after an error the caller drops the writer, which abandons whatever is queued
//! (nothing is drained); [`Writer::finish_within`] bounds the wait for the last write (SIGTERM
//! under a grace period). The manifest is written last, so an abandoned write never leaves a
//! checkpoint that looks committed.
//!
//! The manifest holds what every run has (step, epoch, schedule length, world size, the data's
//! fingerprint, the backbone configuration) and, flattened beside them, the task's own fields
//! (pre-training: `optimizer_steps`, `scaler`, `train`; fine-tuning: `task`, `finetune`, the
//! validation history), so manifests written before this split still read.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use endofm_shared::ModelConfig;

use crate::data::CorpusFingerprint;
use crate::model::weights;
use crate::run::RunObserver;
use crate::store::Store;
use crate::{Error, Result};

/// Folder of all checkpoints below an output location.
pub const DIR: &str = "checkpoints";

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version.
    pub version: u32,
    /// Steps completed (the next step to run). Data cursor and every random draw derive from
    /// it and the seed: epoch = step / iters_per_epoch, position = step % iters_per_epoch.
    pub step: usize,
    /// Epoch of the next step.
    pub epoch: usize,
    /// Steps per epoch of the run.
    pub iters_per_epoch: usize,
    /// Total steps of the run.
    pub total_steps: usize,
    /// Ranks of the run.
    pub world_size: usize,
    /// The data the run reads.
    pub corpus: CorpusFingerprint,
    /// Backbone configuration.
    pub model: ModelConfig,
    /// Files of the checkpoint and their sizes in bytes.
    pub files: BTreeMap<String, u64>,
    /// Unix time of writing (seconds).
    pub created_unix: u64,
    /// The task's own fields.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Manifest {
    /// A task field, deserialised; a missing or malformed field is an error naming it.
    pub fn field<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T> {
        let value = self
            .extra
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Storage {
                uri: format!("checkpoint manifest (step {})", self.step),
                reason: format!("has no `{name}` field"),
            })?;
        serde_json::from_value(value).map_err(|e| Error::Storage {
            uri: format!("checkpoint manifest (step {})", self.step),
            reason: format!("field `{name}`: {e}"),
        })
    }
}

/// Host copies of what a checkpoint stores: safetensors files (name → tensors) and the task's
/// manifest fields.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// `(file name, tensors under their published keys)`, written in this order.
    pub files: Vec<(String, BTreeMap<String, Tensor>)>,
    /// The task's manifest fields.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A host copy of a tensor (detached, contiguous, CPU).
pub fn host(t: &Tensor) -> Tensor {
    t.detach().to_device(Device::Cpu).copy()
}

/// Host copies of every variable of a variable store.
pub fn host_vars(vs: &tch::nn::VarStore) -> BTreeMap<String, Tensor> {
    vs.variables()
        .into_iter()
        .map(|(k, v)| (k, host(&v)))
        .collect()
}

/// State a run can checkpoint and restore.
pub trait Checkpointable {
    /// Host copies of everything the checkpoint stores.
    fn snapshot(&self) -> Snapshot;
    /// Restores from a committed checkpoint; a failure leaves no partial state that the run
    /// would use (the run stops).
    fn restore(&mut self, checkpoint: &Committed<'_>) -> Result<()>;
}

/// A committed checkpoint being read back.
#[derive(Debug)]
pub struct Committed<'a> {
    store: &'a Store,
    manifest: &'a Manifest,
}

impl<'a> Committed<'a> {
    /// The checkpoint `manifest` describes, in `store`.
    pub fn new(store: &'a Store, manifest: &'a Manifest) -> Self {
        Self { store, manifest }
    }

    /// Its manifest.
    pub fn manifest(&self) -> &Manifest {
        self.manifest
    }

    /// Where a file of it is, for messages.
    pub fn origin(&self, name: &str) -> PathBuf {
        PathBuf::from(
            self.store
                .describe(&format!("{}/{name}", folder(self.manifest.step))),
        )
    }

    /// Reads one safetensors file of it.
    pub fn read(&self, name: &str) -> Result<BTreeMap<String, Tensor>> {
        read_file(
            self.store,
            &format!("{}/{name}", folder(self.manifest.step)),
        )
    }
}

/// Name of the folder of the checkpoint taken after `step` steps.
pub fn folder(step: usize) -> String {
    format!("{DIR}/step-{step:09}")
}

/// Serialises tensors to safetensors bytes.
pub fn encode(tensors: &BTreeMap<String, Tensor>) -> Result<Bytes> {
    let tmp = tempfile::NamedTempFile::new().map_err(|source| Error::Io {
        action: "creating a temporary file",
        path: std::env::temp_dir(),
        source,
    })?;
    weights::write(tmp.path(), tensors)?;
    let bytes = std::fs::read(tmp.path()).map_err(|source| Error::Io {
        action: "reading back",
        path: tmp.path().to_path_buf(),
        source,
    })?;
    Ok(Bytes::from(bytes))
}

fn write_snapshot(
    store: &Store,
    snap: Snapshot,
    mut manifest: Manifest,
    keep: usize,
) -> Result<String> {
    let dir = folder(manifest.step);
    manifest.files.clear();
    for (name, tensors) in &snap.files {
        let bytes = encode(tensors)?;
        manifest.files.insert(name.clone(), bytes.len() as u64);
        store.put(&format!("{dir}/{name}"), bytes)?;
    }
    manifest.extra = snap.extra;
    manifest.created_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Storage {
        uri: store.describe(&dir),
        reason: format!("serialising the manifest: {e}"),
    })?;
    store.put(&format!("{dir}/manifest.json"), Bytes::from(json))?;
    if let Err(e) = prune(store, keep) {
        // The checkpoint is committed; an old one left behind is only wasted space.
        tracing::warn!(error = %e, "pruning old checkpoints failed");
    }
    Ok(dir)
}

/// Steps of every committed checkpoint (those with a manifest), ascending.
pub fn committed(store: &Store) -> Result<Vec<usize>> {
    let mut steps: Vec<usize> = store
        .list(DIR)?
        .into_iter()
        .filter_map(|l| {
            let rest = l.key.strip_prefix(&format!("{DIR}/step-"))?;
            let (step, file) = rest.split_once('/')?;
            (file == "manifest.json")
                .then(|| step.parse().ok())
                .flatten()
        })
        .collect();
    steps.sort_unstable();
    Ok(steps)
}

/// Deletes all but the newest `keep` committed checkpoints (manifest first, so a half-deleted
/// checkpoint is never mistaken for a committed one), folders left without a manifest by
/// an interrupted write older than the newest commit, and the temporary files of interrupted
/// writes anywhere below `checkpoints/`.
pub fn prune(store: &Store, keep: usize) -> Result<()> {
    store.remove_temporaries(DIR)?;
    let steps = committed(store)?;
    let Some(&newest) = steps.last() else {
        return Ok(());
    };
    let doomed: Vec<usize> = steps.iter().rev().skip(keep).copied().collect();
    for step in &doomed {
        store.delete(&format!("{}/manifest.json", folder(*step)))?;
    }
    for l in store.list(DIR)? {
        let step = l
            .key
            .strip_prefix(&format!("{DIR}/step-"))
            .and_then(|r| r.split_once('/'))
            .and_then(|(s, _)| s.parse::<usize>().ok());
        if let Some(step) = step
            && (doomed.contains(&step) || (step < newest && !steps.contains(&step)))
        {
            store.delete(&l.key)?;
        }
    }
    // Object stores have no folders; on disk, remove the emptied ones.
    if let endofm_shared::StorageUri::Local { path } = store.uri() {
        for step in doomed {
            let _ = std::fs::remove_dir(path.join(folder(step)));
        }
    }
    Ok(())
}

/// Reads the newest committed checkpoint's manifest.
pub fn latest(store: &Store) -> Result<Option<Manifest>> {
    let Some(step) = committed(store)?.last().copied() else {
        return Ok(None);
    };
    let key = format!("{}/manifest.json", folder(step));
    let bytes = store.get(&key)?;
    let manifest = serde_json::from_slice(&bytes).map_err(|e| Error::Storage {
        uri: store.describe(&key),
        reason: format!("not a valid manifest: {e}"),
    })?;
    Ok(Some(manifest))
}

/// Reads a safetensors object of a store.
pub fn read_file(store: &Store, key: &str) -> Result<BTreeMap<String, Tensor>> {
    let bytes = store.get(key)?;
    let tmp = tempfile::NamedTempFile::new().map_err(|source| Error::Io {
        action: "creating a temporary file",
        path: std::env::temp_dir(),
        source,
    })?;
    std::fs::write(tmp.path(), &bytes).map_err(|source| Error::Io {
        action: "writing",
        path: tmp.path().to_path_buf(),
        source,
    })?;
    weights::read(tmp.path()).map_err(|e| Error::Storage {
        uri: store.describe(key),
        reason: e.to_string(),
    })
}

/// Restores `target` from the checkpoint `manifest` describes.
pub fn restore(store: &Store, manifest: &Manifest, target: &mut dyn Checkpointable) -> Result<()> {
    target.restore(&Committed::new(store, manifest))
}

/// One queued write: the snapshot, its manifest, and files written once it is committed.
struct Job {
    snap: Box<Snapshot>,
    manifest: Manifest,
    after: Vec<(String, Bytes)>,
}

/// Writes checkpoints on a background thread.
pub struct Writer {
    tx: Option<mpsc::SyncSender<Job>>,
    done: mpsc::Receiver<(usize, Result<String>)>,
    handle: Option<JoinHandle<()>>,
    /// Steps of the writes queued or in flight.
    pending: Vec<usize>,
    /// Set when the writer is dropped: queued writes are not started.
    abandon: Arc<AtomicBool>,
    /// Periodic checkpoints that failed or were skipped.
    failed: u64,
    /// The newest step a save was asked for, and the newest step committed.
    requested: Option<usize>,
    committed: Option<usize>,
    /// The last write's error, if it failed.
    last_error: Option<Error>,
    queue_wait: Duration,
    /// Whether the last save found the writer stuck (the next ones skip at once).
    stuck: bool,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "checkpoint::Writer(pending {:?})", self.pending)
    }
}

impl Writer {
    /// Starts the writer for `store`, keeping `keep` checkpoints.
    pub fn new(store: Store, keep: usize) -> Self {
        Self::with_observer(store, keep, None)
    }

    /// Like [`Writer::new`], telling `observer` about every committed checkpoint (from the
    /// writer's thread, after the manifest is written). A save waits up to the store's request
    /// timeout for a busy writer.
    pub fn with_observer(
        store: Store,
        keep: usize,
        observer: Option<Arc<dyn RunObserver>>,
    ) -> Self {
        let wait = store.limits().request_timeout;
        Self::with_limits(store, keep, observer, wait)
    }

    /// Like [`Writer::with_observer`]; a save that finds one write in flight and one queued
    /// waits at most `queue_wait` on the training thread, then skips its checkpoint.
    pub fn with_limits(
        store: Store,
        keep: usize,
        observer: Option<Arc<dyn RunObserver>>,
        queue_wait: Duration,
    ) -> Self {
        // One snapshot in flight and one queued.
        let (tx, rx) = mpsc::sync_channel::<Job>(1);
        let (done_tx, done) = mpsc::channel();
        let abandon = Arc::new(AtomicBool::new(false));
        let abandoned = Arc::clone(&abandon);
        let handle = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                for job in rx {
                    if abandoned.load(Ordering::SeqCst) {
                        break;
                    }
                    let step = job.manifest.step;
                    let started = Instant::now();
                    let result = write_snapshot(&store, *job.snap, job.manifest, keep);
                    match &result {
                        Ok(dir) => {
                            let uri = store.describe(dir);
                            tracing::info!(step, dir = %uri, secs = started.elapsed().as_secs_f64(), "checkpoint committed");
                            if let Some(observer) = &observer {
                                observer.on_checkpoint(step, &uri);
                            }
                            for (key, bytes) in job.after {
                                if let Err(e) = store.put(&key, bytes) {
                                    tracing::warn!(key, error = %e, "writing after a checkpoint failed");
                                }
                            }
                        }
                        Err(e) => tracing::warn!(step, error = %e, "checkpoint failed"),
                    }
                    if done_tx.send((step, result)).is_err() {
                        break;
                    }
                }
            })
            .ok();
        Self {
            tx: Some(tx),
            done,
            handle,
            pending: Vec::new(),
            abandon,
            failed: 0,
            requested: None,
            committed: None,
            last_error: None,
            queue_wait,
            stuck: false,
        }
    }

    /// Periodic checkpoints that failed or were skipped so far.
    pub fn failed(&self) -> u64 {
        self.failed
    }

    fn record(&mut self, step: usize, r: Result<String>) {
        self.pending.retain(|&s| s != step);
        self.stuck = false;
        match r {
            Ok(_) => {
                self.committed = self.committed.max(Some(step));
                self.last_error = None;
            }
            Err(e) => {
                self.failed += 1;
                tracing::warn!(step, error = %e, failed = self.failed, "periodic checkpoint failed; the run goes on (the final checkpoint must succeed)");
                self.last_error = Some(e);
            }
        }
    }

    /// Collects finished writes without waiting.
    fn poll(&mut self) {
        while let Ok((step, r)) = self.done.try_recv() {
            self.record(step, r);
        }
    }

    /// Snapshots `source` now and queues the write. A failed earlier write is not an error
    /// here (see the module docs); an error means the writer thread is gone.
    pub fn save(&mut self, source: &dyn Checkpointable, manifest: Manifest) -> Result<()> {
        self.save_with(source, manifest, Vec::new())
    }

    /// Like [`Writer::save`], writing `after` (key, bytes) once the checkpoint is committed
    /// (`metrics.jsonl`), on the writer's thread.
    pub fn save_with(
        &mut self,
        source: &dyn Checkpointable,
        manifest: Manifest,
        after: Vec<(String, Bytes)>,
    ) -> Result<()> {
        self.poll();
        let stopped = || Error::Storage {
            uri: "checkpoint writer".into(),
            reason: "the writer thread stopped".into(),
        };
        let step = manifest.step;
        self.requested = Some(step);
        let snap = source.snapshot();
        let tx = self.tx.clone().ok_or_else(stopped)?;
        let mut job = Job {
            snap: Box::new(snap),
            manifest,
            after,
        };
        let deadline = Instant::now()
            + if self.stuck {
                Duration::ZERO
            } else {
                self.queue_wait
            };
        loop {
            match tx.try_send(job) {
                Ok(()) => {
                    self.pending.push(step);
                    return Ok(());
                }
                Err(mpsc::TrySendError::Disconnected(_)) => return Err(stopped()),
                Err(mpsc::TrySendError::Full(j)) => {
                    if Instant::now() >= deadline {
                        self.stuck = true;
                        self.failed += 1;
                        tracing::warn!(
                            step,
                            pending = ?self.pending,
                            "checkpoint skipped: earlier checkpoints are still being written (storage slow or stalled); the run goes on"
                        );
                        return Ok(());
                    }
                    job = j;
                    std::thread::sleep(Duration::from_millis(5));
                    self.poll();
                }
            }
        }
    }

    /// Waits for every queued write; an error when the newest checkpoint asked for was not
    /// committed (its write's error).
    pub fn wait(&mut self) -> Result<()> {
        while !self.pending.is_empty() {
            let (step, r) = self.done.recv().map_err(|_| Error::Storage {
                uri: "checkpoint writer".into(),
                reason: "the writer thread stopped".into(),
            })?;
            self.record(step, r);
        }
        self.final_outcome()
    }

    /// Whether the newest checkpoint asked for was committed.
    fn final_outcome(&mut self) -> Result<()> {
        match self.requested {
            Some(step) if self.committed != Some(step) => {
                Err(self.last_error.take().unwrap_or_else(|| Error::Storage {
                    uri: "checkpoint writer".into(),
                    reason: format!(
                        "the checkpoint of step {step} was skipped: earlier writes were stuck (the newest committed checkpoint: {:?})",
                        self.committed
                    ),
                }))
            }
            _ => Ok(()),
        }
    }

    /// Waits for every queued write and stops the thread; the last write's error (the final
    /// checkpoint's) fails.
    pub fn finish(mut self) -> Result<()> {
        let r = self.wait();
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        r
    }

    /// Like [`Writer::finish`], waiting at most `limit`; past it the writes still queued are
    /// abandoned (an unfinished checkpoint has no manifest: the last committed one stays the
    /// newest) and the error says so.
    pub fn finish_within(mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while !self.pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.done.recv_timeout(left) {
                Ok((step, r)) => self.record(step, r),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(Error::StorageUnavailable {
                        uri: "checkpoint writer".into(),
                        reason: format!(
                            "the checkpoints of steps {:?} were not written within {:.0} s and are abandoned; the newest committed checkpoint is intact",
                            self.pending,
                            limit.as_secs_f64()
                        ),
                    });
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        self.finish()
    }
}

impl Drop for Writer {
    /// Abandons what is queued; waits for the thread only when it is idle (a write in flight
    /// is left to end with the process: it never commits a partial checkpoint).
    fn drop(&mut self) {
        self.abandon.store(true, Ordering::SeqCst);
        self.tx.take();
        if let Some(h) = self.handle.take()
            && (self.pending.is_empty() || h.is_finished())
        {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use endofm_shared::StorageUri;

    #[test]
    fn a_folder_without_manifest_is_not_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            &StorageUri::parse(dir.path().to_str().unwrap()).unwrap(),
            true,
        )
        .unwrap();
        store
            .put(
                &format!("{}/student.safetensors", folder(7)),
                Bytes::from_static(b"x"),
            )
            .unwrap();
        assert!(latest(&store).unwrap().is_none());
    }

    #[test]
    fn interrupted_writes_temporaries_are_removed_by_pruning() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            &StorageUri::parse(dir.path().to_str().unwrap()).unwrap(),
            true,
        )
        .unwrap();
        // What a write killed before its rename leaves: `NAME#N` beside the real files.
        let step6 = dir.path().join(folder(6));
        std::fs::create_dir_all(&step6).unwrap();
        std::fs::write(step6.join("student.safetensors#1"), vec![0u8; 1024]).unwrap();
        std::fs::write(step6.join("manifest.json#12"), b"{").unwrap();
        std::fs::write(dir.path().join("metrics.jsonl#3"), b"x").unwrap();
        // A name with `#` that is not a temporary stays.
        std::fs::write(step6.join("notes#a.txt"), b"keep").unwrap();
        prune(&store, 3).unwrap();
        assert!(!step6.join("student.safetensors#1").exists());
        assert!(!step6.join("manifest.json#12").exists());
        assert!(step6.join("notes#a.txt").exists());
        // Outside checkpoints/: removed by the next run's start (remove_temporaries of the root).
        assert!(dir.path().join("metrics.jsonl#3").exists());
        let removed = store.remove_temporaries("").unwrap();
        assert_eq!(removed, vec!["metrics.jsonl#3".to_string()]);
    }

    #[derive(Debug)]
    struct Counter(Tensor);

    impl Checkpointable for Counter {
        fn snapshot(&self) -> Snapshot {
            let mut files = BTreeMap::new();
            files.insert("x".to_string(), host(&self.0));
            let mut extra = serde_json::Map::new();
            extra.insert("note".into(), serde_json::json!("hello"));
            Snapshot {
                files: vec![("state.safetensors".into(), files)],
                extra,
            }
        }
        fn restore(&mut self, c: &Committed<'_>) -> Result<()> {
            let f = c.read("state.safetensors")?;
            self.0 = f["x"].shallow_clone();
            assert_eq!(c.manifest().field::<String>("note")?, "hello");
            Ok(())
        }
    }

    #[test]
    fn task_fields_round_trip_and_old_checkpoints_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            &StorageUri::parse(dir.path().to_str().unwrap()).unwrap(),
            true,
        )
        .unwrap();
        let mut writer = Writer::new(store.clone(), 2);
        for step in 1..=3 {
            let c = Counter(Tensor::from_slice(&[step as f32]));
            let manifest = Manifest {
                version: 1,
                step,
                epoch: 0,
                iters_per_epoch: 3,
                total_steps: 3,
                world_size: 1,
                corpus: CorpusFingerprint::of(&[]),
                model: crate::test_support::small_model(1),
                files: BTreeMap::new(),
                created_unix: 0,
                extra: serde_json::Map::new(),
            };
            writer.save(&c, manifest).unwrap();
        }
        writer.finish().unwrap();
        assert_eq!(committed(&store).unwrap(), vec![2, 3]);
        let m = latest(&store).unwrap().unwrap();
        assert!(m.files["state.safetensors"] > 0);
        let mut c = Counter(Tensor::from_slice(&[0f32]));
        restore(&store, &m, &mut c).unwrap();
        assert_eq!(c.0.double_value(&[0]), 3.0);
        assert!(
            m.field::<u64>("missing")
                .unwrap_err()
                .to_string()
                .contains("missing")
        );
    }
}
