//! Pre-training checkpoints in object storage. A checkpoint is a folder
//! `checkpoints/step-NNNNNNNNN/` holding `student.safetensors` and `teacher.safetensors`
//! (published key names: usable directly by `model forward` / `model export`),
//! `optimizer.safetensors` (`exp_avg.KEY`, `exp_avg_sq.KEY`), `state.safetensors` (the loss
//! centre) and `manifest.json`, written last: a checkpoint without its manifest does not exist.
//! Snapshots are taken on the training thread (device → host copies) and written by a
//! background thread, which also keeps only the newest K checkpoints.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::thread::JoinHandle;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use endofm_shared::{ModelConfig, PretrainConfig};

use crate::model::{LoadMode, weights};
use crate::store::Store;
use crate::train::step::{LossScaler, SslTrainer};
use crate::{Error, Result};

/// Folder of all checkpoints below an output location.
pub const DIR: &str = "checkpoints";
const FILES: [&str; 4] = [
    "student.safetensors",
    "teacher.safetensors",
    "optimizer.safetensors",
    "state.safetensors",
];

/// Identifies a corpus listing, so a resumed run can tell when its data changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorpusFingerprint {
    /// Number of clips listed.
    pub clips: usize,
    /// FNV-1a hash of the listing, hex.
    pub hash: String,
}

impl CorpusFingerprint {
    /// Fingerprint of a list of clip keys.
    pub fn of(keys: &[String]) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for k in keys {
            for b in k.bytes().chain(std::iter::once(b'\n')) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        Self {
            clips: keys.len(),
            hash: format!("{h:016x}"),
        }
    }
}

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
    /// The corpus the run reads.
    pub corpus: CorpusFingerprint,
    /// AdamW step counts (all parameters, last layer).
    pub optimizer_steps: (u64, u64),
    /// fp16 loss scaler, when used.
    pub scaler: Option<LossScaler>,
    /// Model configuration.
    pub model: ModelConfig,
    /// Training hyper-parameters (the seed included).
    pub train: PretrainConfig,
    /// Files of the checkpoint and their sizes.
    pub files: BTreeMap<String, u64>,
    /// Unix time of writing.
    pub created_unix: u64,
}

/// Name of the folder of the checkpoint taken after `step` steps.
pub fn folder(step: usize) -> String {
    format!("{DIR}/step-{step:09}")
}

/// Host copies of everything a checkpoint stores, taken on the training thread.
struct Snapshot {
    files: Vec<(&'static str, BTreeMap<String, Tensor>)>,
    manifest: Manifest,
}

fn host(t: &Tensor) -> Tensor {
    t.detach().to_device(Device::Cpu).copy()
}

fn snapshot(trainer: &SslTrainer, manifest: Manifest) -> Snapshot {
    let student = trainer
        .student()
        .var_store()
        .variables()
        .into_iter()
        .map(|(k, v)| (k, host(&v)))
        .collect();
    let teacher = trainer
        .teacher()
        .var_store()
        .variables()
        .into_iter()
        .map(|(k, v)| (k, host(&v)))
        .collect();
    let opt = trainer.optimizer();
    let mut optimizer = BTreeMap::new();
    for e in trainer.student_flat().trainable() {
        optimizer.insert(
            format!("exp_avg.{}", e.name),
            host(&opt.exp_avg().narrow(0, e.offset, e.numel)),
        );
        optimizer.insert(
            format!("exp_avg_sq.{}", e.name),
            host(&opt.exp_avg_sq().narrow(0, e.offset, e.numel)),
        );
    }
    let mut state = BTreeMap::new();
    state.insert("center".to_string(), host(trainer.objective().center()));
    Snapshot {
        files: vec![
            ("student.safetensors", student),
            ("teacher.safetensors", teacher),
            ("optimizer.safetensors", optimizer),
            ("state.safetensors", state),
        ],
        manifest,
    }
}

fn encode(tensors: &BTreeMap<String, Tensor>, tmp: &std::path::Path) -> Result<Bytes> {
    weights::write(tmp, tensors)?;
    let bytes = std::fs::read(tmp).map_err(|source| Error::Io {
        action: "reading back",
        path: tmp.to_path_buf(),
        source,
    })?;
    let _ = std::fs::remove_file(tmp);
    Ok(Bytes::from(bytes))
}

fn write_snapshot(store: &Store, snap: Snapshot, keep: usize) -> Result<String> {
    let dir = folder(snap.manifest.step);
    let tmp = tempfile::tempdir().map_err(|source| Error::Io {
        action: "creating a temporary directory",
        path: std::env::temp_dir(),
        source,
    })?;
    let mut manifest = snap.manifest;
    for (name, tensors) in &snap.files {
        let bytes = encode(tensors, &tmp.path().join(name))?;
        manifest
            .files
            .insert((*name).to_string(), bytes.len() as u64);
        store.put(&format!("{dir}/{name}"), bytes)?;
    }
    manifest.created_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Storage {
        uri: store.describe(&dir),
        reason: format!("serialising the manifest: {e}"),
    })?;
    store.put(&format!("{dir}/manifest.json"), Bytes::from(json))?;
    prune(store, keep)?;
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
/// checkpoint is never mistaken for a committed one), and folders left without a manifest by
/// an interrupted write older than the newest commit.
fn prune(store: &Store, keep: usize) -> Result<()> {
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

fn read_file(store: &Store, key: &str) -> Result<BTreeMap<String, Tensor>> {
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

/// Restores `trainer` from the checkpoint `manifest` describes.
pub fn restore(store: &Store, manifest: &Manifest, trainer: &mut SslTrainer) -> Result<()> {
    let dir = folder(manifest.step);
    let origin = |name: &str| std::path::PathBuf::from(store.describe(&format!("{dir}/{name}")));
    {
        let (student, teacher) = trainer.networks_mut();
        let s = read_file(store, &format!("{dir}/student.safetensors"))?;
        weights::load_tensors(
            student.var_store(),
            s,
            &origin("student.safetensors"),
            LoadMode::Strict,
        )?;
        let t = read_file(store, &format!("{dir}/teacher.safetensors"))?;
        weights::load_tensors(
            teacher.var_store(),
            t,
            &origin("teacher.safetensors"),
            LoadMode::Strict,
        )?;
    }
    let opt = read_file(store, &format!("{dir}/optimizer.safetensors"))?;
    let device = trainer.student().device();
    let mut m = Vec::new();
    let mut v = Vec::new();
    for e in trainer.student_flat().trainable() {
        for (prefix, out) in [("exp_avg", &mut m), ("exp_avg_sq", &mut v)] {
            let key = format!("{prefix}.{}", e.name);
            let t = opt.get(&key).ok_or_else(|| Error::MissingKey {
                path: origin("optimizer.safetensors"),
                key: key.clone(),
                expected: vec![e.numel],
            })?;
            if t.numel() as i64 != e.numel {
                return Err(Error::ShapeMismatch {
                    path: origin("optimizer.safetensors"),
                    key,
                    expected: vec![e.numel],
                    found: t.size(),
                });
            }
            out.push(t.reshape([-1]).to_device(device));
        }
    }
    let (steps, last) = manifest.optimizer_steps;
    trainer
        .optimizer_mut()
        .restore(&Tensor::cat(&m, 0), &Tensor::cat(&v, 0), steps, last)?;
    let state = read_file(store, &format!("{dir}/state.safetensors"))?;
    let center = state.get("center").ok_or_else(|| Error::MissingKey {
        path: origin("state.safetensors"),
        key: "center".into(),
        expected: trainer.objective().center().size(),
    })?;
    if center.size() != trainer.objective().center().size() {
        return Err(Error::ShapeMismatch {
            path: origin("state.safetensors"),
            key: "center".into(),
            expected: trainer.objective().center().size(),
            found: center.size(),
        });
    }
    trainer.objective_mut().set_center(center.to_device(device));
    trainer.set_scaler(manifest.scaler.clone());
    Ok(())
}

enum Job {
    Write(Box<Snapshot>),
}

/// Writes checkpoints on a background thread.
pub struct Writer {
    tx: Option<mpsc::SyncSender<Job>>,
    done: mpsc::Receiver<Result<String>>,
    handle: Option<JoinHandle<()>>,
    pending: usize,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "checkpoint::Writer(pending {})", self.pending)
    }
}

impl Writer {
    /// Starts the writer for `store`, keeping `keep` checkpoints.
    pub fn new(store: Store, keep: usize) -> Self {
        Self::with_observer(store, keep, None)
    }

    /// Like [`Writer::new`], telling `observer` about every committed checkpoint (from the
    /// writer's thread, after the manifest is written).
    pub fn with_observer(
        store: Store,
        keep: usize,
        observer: Option<std::sync::Arc<dyn crate::pretrain::RunObserver>>,
    ) -> Self {
        // One snapshot in flight and one queued: the trainer waits rather than piling up copies.
        let (tx, rx) = mpsc::sync_channel::<Job>(1);
        let (done_tx, done) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                for job in rx {
                    let Job::Write(snap) = job;
                    let step = snap.manifest.step;
                    let started = std::time::Instant::now();
                    let result = write_snapshot(&store, *snap, keep);
                    match &result {
                        Ok(dir) => {
                            let uri = store.describe(dir);
                            tracing::info!(step, dir = %uri, secs = started.elapsed().as_secs_f64(), "checkpoint committed");
                            if let Some(observer) = &observer {
                                observer.on_checkpoint(step, &uri);
                            }
                        }
                        Err(e) => tracing::error!(step, error = %e, "checkpoint failed"),
                    }
                    if done_tx.send(result).is_err() {
                        break;
                    }
                }
            })
            .ok();
        Self {
            tx: Some(tx),
            done,
            handle,
            pending: 0,
        }
    }

    /// Errors of finished writes (non-blocking); the first failure is returned.
    fn collect(&mut self, block: bool) -> Result<()> {
        while self.pending > 0 {
            let r = if block {
                self.done.recv().map_err(|_| Error::Storage {
                    uri: "checkpoint writer".into(),
                    reason: "the writer thread stopped".into(),
                })?
            } else {
                match self.done.try_recv() {
                    Ok(r) => r,
                    Err(_) => return Ok(()),
                }
            };
            self.pending -= 1;
            r?;
        }
        Ok(())
    }

    /// Snapshots `trainer` now and queues the write; returns an earlier write's error if any.
    pub fn save(&mut self, trainer: &SslTrainer, manifest: Manifest) -> Result<()> {
        self.collect(false)?;
        let snap = snapshot(trainer, manifest);
        let tx = self.tx.as_ref().ok_or_else(|| Error::Storage {
            uri: "checkpoint writer".into(),
            reason: "closed".into(),
        })?;
        tx.send(Job::Write(Box::new(snap)))
            .map_err(|_| Error::Storage {
                uri: "checkpoint writer".into(),
                reason: "the writer thread stopped".into(),
            })?;
        self.pending += 1;
        Ok(())
    }

    /// Waits for every queued write; returns the first error.
    pub fn finish(mut self) -> Result<()> {
        let r = self.collect(true);
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        r
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A manifest for `trainer` after `step` steps.
pub fn manifest_for(
    trainer: &SslTrainer,
    model: &ModelConfig,
    step: usize,
    world_size: usize,
    corpus: CorpusFingerprint,
) -> Manifest {
    Manifest {
        version: 1,
        step,
        epoch: step / trainer.iters_per_epoch(),
        iters_per_epoch: trainer.iters_per_epoch(),
        total_steps: trainer.total_steps(),
        world_size,
        corpus,
        optimizer_steps: (
            trainer.optimizer().steps,
            trainer.optimizer().last_layer_steps,
        ),
        scaler: trainer.scaler().cloned(),
        model: model.clone(),
        train: trainer.config().clone(),
        files: FILES.iter().map(|f| ((*f).to_string(), 0)).collect(),
        created_unix: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Solo;
    use endofm_shared::StorageUri;
    use tch::Kind;

    fn small() -> ModelConfig {
        crate::test_support::small_model(1)
    }

    fn views(step: usize) -> Vec<Tensor> {
        let base = Tensor::arange(3 * 4 * 32 * 32, (Kind::Float, Device::Cpu));
        let g = (base * (0.001 * (step + 1) as f64))
            .sin()
            .reshape([1, 3, 4, 32, 32]);
        let l = g
            .narrow(2, 0, 2)
            .narrow(3, 0, 16)
            .narrow(4, 0, 16)
            .contiguous();
        vec![
            g.shallow_clone(),
            g.flip([2]),
            l.shallow_clone(),
            l.flip([3]),
        ]
    }

    #[test]
    fn resumed_training_equals_uninterrupted() {
        let _rng = crate::test_support::rng_lock();
        for two_threads in [false, true] {
            resume_case(two_threads);
        }
    }

    fn resume_case(two_threads: bool) {
        let cfg = PretrainConfig {
            epochs: 2,
            batch_per_rank: 1,
            warmup_epochs: 1,
            lr: 0.1,
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            &StorageUri::parse(dir.path().to_str().unwrap()).unwrap(),
            true,
        )
        .unwrap();
        let corpus = CorpusFingerprint::of(&["a.mp4".to_string()]);

        let mut straight = SslTrainer::new(&small(), &cfg, Device::Cpu, 3, 1).unwrap();
        straight.set_two_threads(two_threads).unwrap();
        for step in 0..6 {
            straight.step(&views(step), step, &mut Solo).unwrap();
        }

        let mut first = SslTrainer::new(&small(), &cfg, Device::Cpu, 3, 1).unwrap();
        first.set_two_threads(two_threads).unwrap();
        let mut writer = Writer::new(store.clone(), 2);
        for step in 0..4 {
            first.step(&views(step), step, &mut Solo).unwrap();
            writer
                .save(
                    &first,
                    manifest_for(&first, &small(), step + 1, 1, corpus.clone()),
                )
                .unwrap();
        }
        writer.finish().unwrap();
        drop(first);
        assert_eq!(
            committed(&store).unwrap(),
            vec![3, 4],
            "keeps the newest two"
        );

        let manifest = latest(&store).unwrap().unwrap();
        assert_eq!(manifest.step, 4);
        let mut resumed = SslTrainer::new(&small(), &cfg, Device::Cpu, 3, 1).unwrap();
        resumed.set_two_threads(two_threads).unwrap();
        restore(&store, &manifest, &mut resumed).unwrap();
        for step in manifest.step..6 {
            resumed.step(&views(step), step, &mut Solo).unwrap();
        }
        assert!(
            resumed
                .student_flat()
                .buffer()
                .equal(straight.student_flat().buffer()),
            "student differs"
        );
        assert!(
            resumed
                .teacher_flat()
                .buffer()
                .equal(straight.teacher_flat().buffer()),
            "teacher differs"
        );
        assert!(
            resumed
                .objective()
                .center()
                .equal(straight.objective().center())
        );
    }

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
}
