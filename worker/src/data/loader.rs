//! The rank-aware pre-training data loader: a corpus listing (`train.csv` of video files or
//! image-frame folders, in any storage location) read by the one corpus reader every command
//! uses ([`Corpus`], entries opened by [`Media::open_entry`]: a folder is a frame folder,
//! anything else goes to FFmpeg, whatever its name), a deterministic per-epoch permutation from
//! (seed, epoch), rank r of W taking every W-th clip, a pool of decode/augment threads feeding a
//! bounded, ordered prefetch buffer, and batches addressed by their global step, so a resumed run
//! continues mid-epoch with exactly the batches an uninterrupted run would have seen.
//!
//! A clip that is missing or fails to decode is a *bad clip*: logged once per run with its URI
//! and reason, counted once ([`LoaderStats::clips_failed`] is the number of distinct bad clips,
//! [`Loader::bad_clips`] lists them), and replaced by the next clip of the same rank's shard
//! (deterministically); a corpus where most clips fail is an error. A storage failure
//! ([`Error::StorageUnavailable`], after the store's own retries) is not a bad clip: it fails
//! the step, so the data trained on never depends on storage weather.
//!
//! Data threads never take the rank down silently: a panic while producing a clip becomes an
//! error for that sample, and [`Loader::next_batch`] checks that its threads are alive while it
//! waits.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tch::Tensor;

use endofm_shared::StorageUri;

use crate::data::CorpusFingerprint;
use crate::data::{ClipShape, DrawKey, Frames, ViewConfig, ViewPlan, render};
use crate::datasets::Media;
use crate::store::Store;
use crate::{Error, Result};

/// A corpus: the clip list of a storage location.
#[derive(Debug)]
pub struct Corpus {
    store: Store,
    clips: Vec<String>,
}

impl Corpus {
    /// Opens `uri` and reads its clip list `list`: CSV (the `csv` crate: quoting, a UTF-8
    /// byte-order mark, CRLF line ends), rows `relative/path[,label[,…]]`; blank lines and
    /// lines starting with `#` are skipped, fields are trimmed. The list is read under the
    /// store's start-up deadline, so an unreachable location is reported within seconds.
    pub fn open(uri: &StorageUri, list: &str) -> Result<Self> {
        let store = Store::open(uri, false)?;
        let text = store.startup().get(list).map_err(|e| match e {
            // Already names the list's location: only the reason, not the URI twice.
            Error::Storage { reason, .. } => Error::Storage {
                uri: store.describe(list),
                reason: format!("cannot read the clip list: {reason}"),
            },
            Error::StorageUnavailable { reason, .. } => Error::StorageUnavailable {
                uri: store.describe(list),
                reason: format!("cannot read the clip list: {reason}"),
            },
            e => Error::Storage {
                uri: store.describe(list),
                reason: format!("cannot read the clip list ({e})"),
            },
        })?;
        let clips = parse_list(&text, &store.describe(list))?;
        Ok(Self { store, clips })
    }

    /// Like [`Corpus::open`] in an opened store (one opened with settings of its own).
    pub fn open_in(store: Store, list: &str) -> Result<Self> {
        let text = store.startup().get(list)?;
        let clips = parse_list(&text, &store.describe(list))?;
        Ok(Self { store, clips })
    }

    /// Number of clips.
    pub fn len(&self) -> usize {
        self.clips.len()
    }

    /// Whether the list is empty (never, once opened).
    pub fn is_empty(&self) -> bool {
        self.clips.is_empty()
    }

    /// The clip keys, in list order.
    pub fn clips(&self) -> &[String] {
        &self.clips
    }

    /// Fingerprint of the listing.
    pub fn fingerprint(&self) -> CorpusFingerprint {
        CorpusFingerprint::of(&self.clips)
    }

    /// Opens clip `i` by what it is (a video file in any container FFmpeg reads, or a folder
    /// of image frames); see [`Media::open_entry`].
    pub fn open_clip(&self, i: usize) -> Result<Media> {
        Media::open_entry(&self.store, &self.clips[i])
    }

    /// Human-readable location of clip `i`.
    pub fn describe(&self, i: usize) -> String {
        self.store.describe(&self.clips[i])
    }

    /// The store the clips are read from.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Decodes the frames the views of clip `i` need and renders them, timing both phases.
    /// Decoded frames go into a per-thread buffer that every clip of the thread reuses.
    pub fn views(&self, i: usize, cfg: &ViewConfig, key: DrawKey) -> Result<ClipViews> {
        DECODED.with_borrow_mut(|frames| self.views_into(i, cfg, key, frames))
    }

    fn views_into(
        &self,
        i: usize,
        cfg: &ViewConfig,
        key: DrawKey,
        frames: &mut Frames,
    ) -> Result<ClipViews> {
        let started = Instant::now();
        let plan = self.decode(i, cfg, key, frames)?;
        let decoded = Instant::now();
        let tensors = render(cfg, &plan, frames)?.tensors;
        Ok(ClipViews {
            tensors,
            frames_decoded: plan.decode.len(),
            decode_s: (decoded - started).as_secs_f64(),
            render_s: decoded.elapsed().as_secs_f64(),
        })
    }

    /// Reads clip `i`, draws its views' plan and decodes the frames the plan lists into
    /// `frames`: everything of [`Corpus::views`] except rendering.
    pub fn decode(
        &self,
        i: usize,
        cfg: &ViewConfig,
        key: DrawKey,
        frames: &mut Frames,
    ) -> Result<ViewPlan> {
        let mut media = self.open_clip(i)?;
        let info = media.info();
        let shape = ClipShape {
            frames: info.frames,
            height: info.height,
            width: info.width,
        };
        let plan = ViewPlan::draw(cfg, shape, key)?;
        media.decode_into(&plan.decode, frames)?;
        Ok(plan)
    }
}

/// Parses a clip list (see [`Corpus::open`]); `name` names the list in errors, with the line.
/// Each line is one CSV record (quoted fields may hold commas and quotes, not line breaks), so
/// that errors carry the exact line number.
pub fn parse_list(bytes: &[u8], name: &str) -> Result<Vec<String>> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut clips = Vec::new();
    for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line_no = n + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let trimmed = line.trim_ascii();
        if trimmed.is_empty() || trimmed.starts_with(b"#") {
            continue;
        }
        let at = || format!("{name} line {line_no}");
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(trimmed);
        let mut record = csv::StringRecord::new();
        match reader.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                return Err(Error::Input {
                    name: at(),
                    reason: format!("not a CSV row: {e}"),
                });
            }
        }
        let path = record.get(0).unwrap_or("");
        if path.is_empty()
            || path.starts_with('/')
            || path
                .split('/')
                .any(|s| s == ".." || s == "." || s.is_empty())
            || path.chars().any(char::is_control)
        {
            return Err(Error::Input {
                name: at(),
                reason: format!(
                    "`{}` is not `relative/path,label` (a relative path without `..`, empty parts or control characters)",
                    String::from_utf8_lossy(trimmed).escape_debug()
                ),
            });
        }
        clips.push(path.to_string());
    }
    if clips.is_empty() {
        return Err(Error::Input {
            name: name.to_string(),
            reason: "lists no clips".into(),
        });
    }
    Ok(clips)
}

thread_local! {
    /// Per-thread decode buffer: a data thread decodes clip after clip into one allocation
    /// (tens of megabytes, which would otherwise be mapped and page-faulted for every clip).
    static DECODED: std::cell::RefCell<Frames> = std::cell::RefCell::default();
}

/// The views of one clip and what producing them cost.
#[derive(Debug)]
pub struct ClipViews {
    /// One tensor per view, (3, T, S, S), global views first.
    pub tensors: Vec<Tensor>,
    /// Distinct frames decoded for the views.
    pub frames_decoded: usize,
    /// Seconds spent reading, demuxing and decoding to RGB.
    pub decode_s: f64,
    /// Seconds spent rendering the views from the decoded frames.
    pub render_s: f64,
}

/// Loader settings.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Seed of the permutations and augmentations.
    pub seed: u64,
    /// Clips per batch on this rank.
    pub batch: usize,
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Decode/augment threads.
    pub threads: usize,
    /// Clips decoded ahead of the trainer.
    pub prefetch: usize,
    /// The views.
    pub views: ViewConfig,
}

/// Steps per epoch: every rank takes the same number of full batches (the remainder of the
/// permutation is dropped, like the reference's `drop_last`).
pub fn iters_per_epoch(clips: usize, batch: usize, world: usize) -> usize {
    clips / (batch * world).max(1)
}

/// A permutation of `0..n` for `epoch`, a pure function of (seed, epoch).
pub fn permutation(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0xA076_1D64_78BD_642F));
    order.shuffle(&mut rng);
    order
}

/// Counters of the loader.
#[derive(Debug, Default)]
pub struct LoaderStats {
    /// Clips decoded and rendered.
    pub clips_ok: AtomicU64,
    /// Distinct bad clips met so far (missing or undecodable; each counted once per run).
    pub clips_failed: AtomicU64,
    /// Attempts that met a bad clip (a bad clip met again counts again).
    pub failed_attempts: AtomicU64,
    /// Frames decoded for the clips that succeeded.
    pub frames_decoded: AtomicU64,
    /// Nanoseconds the data threads spent reading and decoding the clips that succeeded.
    pub decode_ns: AtomicU64,
    /// Nanoseconds the data threads spent rendering views.
    pub render_ns: AtomicU64,
}

/// One rank's batch.
#[derive(Debug)]
pub struct Batch {
    /// Global step this batch belongs to.
    pub step: usize,
    /// The views, each (B, 3, T, S, S), global views first.
    pub views: Vec<Tensor>,
    /// Corpus indices of the clips, in batch order.
    pub clips: Vec<usize>,
    /// Seconds the caller waited for the batch.
    pub wait_s: f64,
}

struct Sample {
    clip: usize,
    views: Vec<Tensor>,
}

struct Shared {
    corpus: Arc<Corpus>,
    cfg: LoaderConfig,
    per_epoch: usize,
    /// Next sample sequence number to claim (per-rank stream).
    next: AtomicUsize,
    /// First sample the consumer still needs.
    consumed: Mutex<usize>,
    ready: Mutex<BTreeMap<usize, Result<Sample>>>,
    changed: Condvar,
    stop: AtomicBool,
    stats: LoaderStats,
    /// The permutation of the epoch being read (computed once per epoch, not per clip).
    order: Mutex<Option<(usize, Arc<Vec<usize>>)>>,
    /// Bad clips met so far: corpus index → (URI, reason).
    bad: Mutex<BTreeMap<usize, BadClip>>,
}

/// The process's stop flag (SIGTERM/SIGINT), set by [`watch_stop_flag`].
static STOP_FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

/// How long [`Loader::next_batch`] keeps waiting for data once a stop was requested.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Makes [`Loader::next_batch`] give up waiting [`STOP_WAIT`] after `flag` is set (a stop
/// request while storage stalls must not keep the rank past its grace period). The first call
/// wins; signals are process-wide.
pub fn watch_stop_flag(flag: Arc<AtomicBool>) {
    let _ = STOP_FLAG.set(flag);
}

/// A clip the loader skipped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BadClip {
    /// Where the clip is.
    pub uri: String,
    /// Why it was skipped (the first error met).
    pub reason: String,
}

/// Whether an error means the clip itself is bad (missing, unreadable as a video or frame
/// folder): it is skipped. Anything else (storage unavailable, libtorch, a panic) fails.
fn is_bad_clip(e: &Error) -> bool {
    matches!(
        e,
        Error::ClipDecode { .. } | Error::Storage { .. } | Error::Dataset { .. }
    )
}

/// The text of a panic payload.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Attempts before a clip's replacement search gives up.
const MAX_REPLACEMENTS: usize = 16;
/// Once this many clips were tried, more than half failing is fatal.
const FAILURE_WINDOW: u64 = 16;

impl Shared {
    /// Corpus index of the `j`-th replacement for sample `seq` of this rank's stream.
    fn clip_for(&self, seq: usize, j: usize) -> (usize, usize) {
        let epoch = seq / self.per_epoch;
        let k = (seq % self.per_epoch + j) % self.per_epoch;
        let perm = {
            let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
            match order.as_ref() {
                Some((e, perm)) if *e == epoch => Arc::clone(perm),
                _ => {
                    let perm = Arc::new(permutation(self.corpus.len(), self.cfg.seed, epoch));
                    *order = Some((epoch, Arc::clone(&perm)));
                    perm
                }
            }
        };
        (perm[k * self.cfg.world + self.cfg.rank], epoch)
    }

    /// Sample `seq`, with a panic of the decoding/rendering code turned into an error.
    fn produce_caught(&self, seq: usize) -> Result<Sample> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.produce(seq)))
            .unwrap_or_else(|payload| {
                let text = panic_text(payload.as_ref());
                tracing::error!(sample = seq, panic = %text, "a data thread panicked");
                Err(Error::Service {
                    what: "data loader".into(),
                    reason: format!(
                        "a data thread panicked producing sample {seq}: {text}; this is a bug, please report it with the clip"
                    ),
                })
            })
    }

    fn produce(&self, seq: usize) -> Result<Sample> {
        let mut last_error = None;
        for j in 0..MAX_REPLACEMENTS {
            let (clip, epoch) = self.clip_for(seq, j);
            let key = DrawKey {
                seed: self.cfg.seed,
                epoch: epoch as u64,
                clip: clip as u64,
            };
            #[cfg(test)]
            if self.corpus.clips()[clip].contains("panic-in-test") {
                panic!("injected panic on {}", self.corpus.clips()[clip]);
            }
            match self.corpus.views(clip, &self.cfg.views, key) {
                Ok(views) => {
                    let stats = &self.stats;
                    stats.clips_ok.fetch_add(1, Ordering::Relaxed);
                    stats
                        .frames_decoded
                        .fetch_add(views.frames_decoded as u64, Ordering::Relaxed);
                    let nanos = |s: f64| (s * 1e9) as u64;
                    stats
                        .decode_ns
                        .fetch_add(nanos(views.decode_s), Ordering::Relaxed);
                    stats
                        .render_ns
                        .fetch_add(nanos(views.render_s), Ordering::Relaxed);
                    return Ok(Sample {
                        clip,
                        views: views.tensors,
                    });
                }
                Err(e) if !is_bad_clip(&e) => return Err(e),
                Err(e) => {
                    let failed = self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed) + 1;
                    let ok = self.stats.clips_ok.load(Ordering::Relaxed);
                    let first_time = {
                        let mut bad = self.bad.lock().unwrap_or_else(|e| e.into_inner());
                        let uri = self.corpus.describe(clip);
                        let new = !bad.contains_key(&clip);
                        if new {
                            bad.insert(
                                clip,
                                BadClip {
                                    uri,
                                    reason: e.to_string(),
                                },
                            );
                            self.stats.clips_failed.fetch_add(1, Ordering::Relaxed);
                        }
                        new
                    };
                    if first_time {
                        tracing::warn!(uri = %self.corpus.describe(clip), error = %e, "bad clip skipped (replaced by the next clip of the shard; reported once)");
                    }
                    if failed + ok >= FAILURE_WINDOW && failed * 2 > failed + ok {
                        return Err(Error::Input {
                            name: "corpus".into(),
                            reason: format!(
                                "{failed} of {} clips failed to read or decode (last: {e}); check the corpus",
                                failed + ok
                            ),
                        });
                    }
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| Error::Input {
            name: "corpus".into(),
            reason: "no readable clip found".into(),
        }))
    }

    fn worker(&self) {
        tch::set_num_threads(1);
        loop {
            let seq = self.next.fetch_add(1, Ordering::SeqCst);
            {
                let mut consumed = self.consumed.lock().unwrap_or_else(|e| e.into_inner());
                while seq >= *consumed + self.cfg.prefetch && !self.stop.load(Ordering::SeqCst) {
                    consumed = self
                        .changed
                        .wait_timeout(consumed, Duration::from_millis(200))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let sample = self.produce_caught(seq);
            self.ready
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(seq, sample);
            self.changed.notify_all();
        }
    }
}

/// The running loader.
pub struct Loader {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    next_step: usize,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Loader(next step {})", self.next_step)
    }
}

impl Loader {
    /// Starts the threads; the first batch returned is the one of `start_step`.
    pub fn start(corpus: Arc<Corpus>, cfg: LoaderConfig, start_step: usize) -> Result<Self> {
        cfg.views.validate()?;
        if cfg.world == 0 || cfg.rank >= cfg.world || cfg.batch == 0 {
            return Err(Error::Input {
                name: "loader".into(),
                reason: format!(
                    "rank {} of world {} with batch {}",
                    cfg.rank, cfg.world, cfg.batch
                ),
            });
        }
        let ipe = iters_per_epoch(corpus.len(), cfg.batch, cfg.world);
        if ipe == 0 {
            return Err(Error::Input {
                name: "corpus".into(),
                reason: format!(
                    "{} clips are fewer than one global batch ({} per rank × {} ranks)",
                    corpus.len(),
                    cfg.batch,
                    cfg.world
                ),
            });
        }
        let start_seq = start_step * cfg.batch;
        let threads_n = cfg.threads.max(1);
        let shared = Arc::new(Shared {
            per_epoch: ipe * cfg.batch,
            order: Mutex::new(None),
            corpus,
            next: AtomicUsize::new(start_seq),
            consumed: Mutex::new(start_seq),
            ready: Mutex::new(BTreeMap::new()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            stats: LoaderStats::default(),
            bad: Mutex::new(BTreeMap::new()),
            cfg: LoaderConfig {
                prefetch: cfg.prefetch.max(cfg.batch),
                ..cfg
            },
        });
        let threads = (0..threads_n)
            .map(|i| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("data-{i}"))
                    .spawn(move || s.worker())
                    .map_err(|e| Error::Input {
                        name: "loader".into(),
                        reason: format!("cannot start a data thread: {e}"),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            shared,
            threads,
            next_step: start_step,
        })
    }

    /// Counters.
    pub fn stats(&self) -> &LoaderStats {
        &self.shared.stats
    }

    /// The bad clips met so far (each once), by corpus index.
    pub fn bad_clips(&self) -> BTreeMap<usize, BadClip> {
        self.shared
            .bad
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// An error when a data thread has ended (it only ends when the loader stops).
    fn check_threads(&self) -> Result<()> {
        match self.threads.iter().find(|t| t.is_finished()) {
            Some(t) => Err(Error::Service {
                what: "data loader".into(),
                reason: format!(
                    "data thread {} ended unexpectedly (a panic outside clip decoding?); the rank cannot get its batches",
                    t.thread().name().unwrap_or("?")
                ),
            }),
            None => Ok(()),
        }
    }

    /// The next batch, in step order. Waits for the data threads, checking every 200 ms that
    /// they are alive; a thread that ended or panicked is an error.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let started = Instant::now();
        let b = self.shared.cfg.batch;
        let first = self.next_step * b;
        let mut samples = Vec::with_capacity(b);
        let mut stop_seen: Option<Instant> = None;
        for seq in first..first + b {
            let mut ready = self.shared.ready.lock().unwrap_or_else(|e| e.into_inner());
            let sample = loop {
                if let Some(s) = ready.remove(&seq) {
                    break s;
                }
                if STOP_FLAG.get().is_some_and(|f| f.load(Ordering::SeqCst)) {
                    let since = *stop_seen.get_or_insert_with(Instant::now);
                    if since.elapsed() >= STOP_WAIT {
                        // A stop (class `stopped`: the attempt restarts from its checkpoint).
                        return Err(Error::Service {
                            what: "training".into(),
                            reason: format!(
                                "stop requested while waiting {:.0} s for sample {seq} (storage stalled?); exiting without a new checkpoint, the newest committed one is intact",
                                started.elapsed().as_secs_f64()
                            ),
                        });
                    }
                }
                if let Err(e) = self.check_threads() {
                    // A sample may have arrived just before the thread ended.
                    match ready.remove(&seq) {
                        Some(s) => break s,
                        None => return Err(e),
                    }
                }
                ready = self
                    .shared
                    .changed
                    .wait_timeout(ready, Duration::from_millis(200))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            };
            drop(ready);
            samples.push(sample?);
            *self
                .shared
                .consumed
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = seq + 1;
            self.shared.changed.notify_all();
        }
        let n_views = samples.first().map_or(0, |s| s.views.len());
        let views = match samples.as_slice() {
            // One clip: a view of its tensors, no copy.
            [one] => one.views.iter().map(|v| v.unsqueeze(0)).collect(),
            _ => (0..n_views)
                .map(|v| Tensor::stack(&samples.iter().map(|s| &s.views[v]).collect::<Vec<_>>(), 0))
                .collect(),
        };
        let batch = Batch {
            step: self.next_step,
            views,
            clips: samples.iter().map(|s| s.clip).collect(),
            wait_s: started.elapsed().as_secs_f64(),
        };
        self.next_step += 1;
        Ok(batch)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::*;
    use crate::synth::{CorpusSpec, write_pretrain_corpus};

    const SEED: u64 = 3;

    /// Writes `clips` clips of 16 frames at 80×64 (a few milliseconds each to decode).
    fn write_corpus(dir: &Path, clips: usize) -> Arc<Corpus> {
        let spec = CorpusSpec {
            clips,
            frames: 16,
            short_side: 64,
            seed: 5,
            threads: 2,
            ..CorpusSpec::default()
        };
        write_pretrain_corpus(dir, &spec).expect("writing the test corpus");
        Arc::new(open(dir, "train.csv").expect("opening the test corpus"))
    }

    fn open(dir: &Path, list: &str) -> Result<Corpus> {
        let uri = StorageUri::Local {
            path: dir.to_path_buf(),
        };
        Corpus::open(&uri, list)
    }

    /// The reference's views at 32 px (global) and 16 px (local): same frames, cheap pixels.
    fn loader_config(batch: usize, rank: usize, world: usize) -> LoaderConfig {
        LoaderConfig {
            seed: SEED,
            batch,
            rank,
            world,
            threads: 2,
            prefetch: 4,
            views: ViewConfig {
                global_size: 32,
                local_size: 16,
                ..ViewConfig::default()
            },
        }
    }

    fn batches(corpus: &Arc<Corpus>, cfg: LoaderConfig, start: usize, n: usize) -> Vec<Batch> {
        let mut loader = Loader::start(Arc::clone(corpus), cfg, start).expect("starting");
        (0..n)
            .map(|_| loader.next_batch().expect("a batch"))
            .collect()
    }

    /// Replaces clip `i`'s file: garbage bytes, or its first half.
    fn spoil(dir: &Path, corpus: &Corpus, i: usize, truncate: bool) {
        let path = dir.join(&corpus.clips()[i]);
        let bytes = std::fs::read(&path).expect("reading a clip");
        let spoiled = if truncate {
            bytes[..bytes.len() / 2].to_vec()
        } else {
            (0..bytes.len() as u32)
                .map(|k| (k.wrapping_mul(2_654_435_761) >> 11) as u8)
                .collect()
        };
        std::fs::write(&path, spoiled).expect("spoiling a clip");
    }

    #[test]
    fn permutation_is_a_shuffle_fixed_by_seed_and_epoch() {
        for n in [0, 1, 2, 8, 100] {
            let mut p = permutation(n, SEED, 4);
            assert_eq!(p, permutation(n, SEED, 4), "n={n}: same (seed, epoch)");
            p.sort_unstable();
            assert_eq!(p, (0..n).collect::<Vec<_>>(), "n={n}: not a permutation");
        }
        let epochs: BTreeSet<Vec<usize>> = (0..6).map(|e| permutation(100, SEED, e)).collect();
        assert_eq!(epochs.len(), 6, "six epochs must give six orders");
        assert_ne!(permutation(100, SEED, 0), permutation(100, SEED + 1, 0));
        assert_ne!(permutation(100, SEED, 0), (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn two_ranks_split_each_epoch_without_overlap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let corpus = write_corpus(dir.path(), 8);
        // 8 clips, 2 ranks × 3 clips: one step per epoch, 2 clips of each epoch left out.
        let (batch, world) = (3, 2);
        let ipe = iters_per_epoch(corpus.len(), batch, world);
        assert_eq!(ipe, 1);
        let per_rank: Vec<Vec<Batch>> = (0..world)
            .map(|rank| batches(&corpus, loader_config(batch, rank, world), 0, 2 * ipe))
            .collect();
        for epoch in 0..2 {
            let mut seen = BTreeSet::new();
            for (rank, rank_batches) in per_rank.iter().enumerate() {
                let clips: Vec<usize> = rank_batches[epoch * ipe..(epoch + 1) * ipe]
                    .iter()
                    .flat_map(|b| b.clips.iter().copied())
                    .collect();
                assert_eq!(clips.len(), ipe * batch, "rank {rank}, epoch {epoch}");
                for c in clips {
                    assert!(
                        seen.insert(c),
                        "epoch {epoch}: clip {c} given twice (rank {rank})"
                    );
                }
            }
            let perm = permutation(corpus.len(), SEED, epoch);
            let expected: BTreeSet<usize> = perm[..ipe * batch * world].iter().copied().collect();
            assert_eq!(seen, expected, "epoch {epoch}");
        }
        let first = &per_rank[0][0];
        assert_eq!(first.step, 0);
        assert_eq!(first.views.len(), 10);
        assert_eq!(first.views[0].size(), [3, 3, 8, 32, 32]);
        assert_eq!(first.views[1].size(), [3, 3, 16, 32, 32]);
        assert_eq!(first.views[2].size(), [3, 3, 2, 16, 16]);
        assert_eq!(first.views[9].size(), [3, 3, 16, 16, 16]);
    }

    #[test]
    fn resumed_loader_yields_the_uninterrupted_batches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let corpus = write_corpus(dir.path(), 8);
        let cfg = || loader_config(2, 0, 1);
        let ipe = iters_per_epoch(corpus.len(), 2, 1);
        assert_eq!(ipe, 4);
        let whole = batches(&corpus, cfg(), 0, 6);
        let epoch0: BTreeSet<usize> = whole[..4].iter().flat_map(|b| b.clips.clone()).collect();
        assert_eq!(epoch0.len(), 8, "epoch 0 shows every clip once");
        // Mid-epoch (steps 2, 3) and across the epoch boundary (steps 3, 4, 5).
        for (start, n) in [(2, 2), (3, 3)] {
            for (offset, resumed) in batches(&corpus, cfg(), start, n).iter().enumerate() {
                let step = start + offset;
                let reference = &whole[step];
                assert_eq!(resumed.step, step);
                assert_eq!(
                    resumed.clips, reference.clips,
                    "step {step} resumed at {start}"
                );
                for (v, (a, b)) in resumed.views.iter().zip(&reference.views).enumerate() {
                    assert!(
                        a.equal(b),
                        "step {step} resumed at {start}: view {v} differs by up to {}",
                        (a - b).abs().max().double_value(&[])
                    );
                }
            }
        }
        // Epoch 1 draws new views of a clip: resuming must not just replay epoch 0.
        let first = whole[0].clips[0];
        let later = whole[4..]
            .iter()
            .flat_map(|b| b.clips.iter().enumerate().map(move |(k, &c)| (b, k, c)))
            .find(|&(_, _, c)| c == first);
        if let Some((b, k, _)) = later {
            assert!(!b.views[0].get(k as i64).equal(&whole[0].views[0].get(0)));
        }
    }

    #[test]
    fn corrupt_clips_are_replaced_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let corpus = write_corpus(dir.path(), 8);
        let (garbage, truncated) = (1, 5);
        spoil(dir.path(), &corpus, garbage, false);
        spoil(dir.path(), &corpus, truncated, true);
        let cfg = loader_config(2, 0, 1);
        let per_epoch = iters_per_epoch(corpus.len(), 2, 1) * 2;
        let bad = |c: usize| c == garbage || c == truncated;
        // What the loader must do: take the next clip of the shard instead of a bad one.
        let attempts = |seq: usize| -> (usize, usize) {
            let perm = permutation(corpus.len(), SEED, seq / per_epoch);
            // Attempt j fails j times before it succeeds.
            for j in 0..per_epoch {
                let c = perm[(seq % per_epoch + j) % per_epoch];
                if !bad(c) {
                    return (c, j);
                }
            }
            unreachable!("the test corpus has good clips")
        };
        let steps = 5; // one epoch and one step of the next
        let mut loader = Loader::start(Arc::clone(&corpus), cfg.clone(), 0).expect("starting");
        for step in 0..steps {
            let batch = loader
                .next_batch()
                .expect("bad clips must not stop the run");
            let expected: Vec<usize> = (step * 2..step * 2 + 2).map(|s| attempts(s).0).collect();
            assert_eq!(batch.clips, expected, "step {step}");
            assert_eq!(batch.views[0].size()[0], 2);
        }
        let consumed = steps * 2;
        let at_least: usize = (0..consumed).map(|s| attempts(s).1).sum();
        let at_most: usize = (0..consumed + cfg.prefetch).map(|s| attempts(s).1).sum();
        let stats = loader.stats();
        let tries = stats.failed_attempts.load(Ordering::Relaxed) as usize;
        assert!(
            at_least > 2 && (at_least..=at_most).contains(&tries),
            "{tries} failed attempts; expected {at_least}..={at_most} (more than the 2 bad clips, or the test shows nothing)"
        );
        // Each bad clip is counted and listed once, with its reason, however often it is met.
        assert_eq!(stats.clips_failed.load(Ordering::Relaxed), 2);
        let listed = loader.bad_clips();
        assert_eq!(listed.keys().copied().collect::<Vec<_>>(), {
            let mut v = vec![garbage, truncated];
            v.sort_unstable();
            v
        });
        for (i, bad) in &listed {
            assert_eq!(bad.uri, corpus.describe(*i));
            assert!(bad.reason.contains("decoding clip"), "{}", bad.reason);
        }
        assert!(stats.clips_ok.load(Ordering::Relaxed) >= consumed as u64);
        assert!(stats.frames_decoded.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn mostly_corrupt_corpus_is_an_error_that_counts_the_failures() {
        let dir = tempfile::tempdir().expect("tempdir");
        let corpus = write_corpus(dir.path(), 8);
        for i in 0..6 {
            spoil(dir.path(), &corpus, i, i % 2 == 0);
        }
        let mut loader = Loader::start(corpus, loader_config(2, 0, 1), 0).expect("starting");
        let err = (0..12)
            .find_map(|_| loader.next_batch().err())
            .expect("a mostly corrupt corpus must fail");
        let msg = err.to_string();
        // "input `corpus`: F of N clips failed to read or decode (last: …); check the corpus"
        let counts: Vec<u64> = msg
            .split_once("`corpus`: ")
            .map(|(_, rest)| rest.split(' ').take(3).filter_map(|w| w.parse().ok()))
            .into_iter()
            .flatten()
            .collect();
        assert!(
            msg.contains("clips failed") && counts.len() == 2 && counts[0] * 2 > counts[1],
            "{msg}"
        );
        assert!(counts[1] >= FAILURE_WINDOW, "{msg}");
        assert!(loader.stats().failed_attempts.load(Ordering::Relaxed) >= counts[0]);
        assert!(loader.stats().clips_failed.load(Ordering::Relaxed) <= 6);
    }

    #[test]
    fn corpus_open_errors_name_the_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = open(&dir.path().join("absent"), "train.csv")
            .expect_err("missing folder")
            .to_string();
        assert!(err.contains("absent"), "{err}");
        let err = open(dir.path(), "missing.csv")
            .expect_err("missing list")
            .to_string();
        assert!(
            err.contains("missing.csv") && err.contains("clip list"),
            "{err}"
        );

        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).expect("writing a list");
        };
        write("empty.csv", "# nothing yet\n\n   \n");
        let err = open(dir.path(), "empty.csv")
            .expect_err("empty list")
            .to_string();
        assert!(
            err.contains("empty.csv") && err.contains("no clips"),
            "{err}"
        );

        for (text, line) in [
            ("a/ok.mp4,-1\n/abs/clip.mp4,-1\n", 2),
            ("# header\na/ok.mp4,-1\n\nsrc/../../etc/clip.mp4,-1\n", 4),
            ("..,-1\n", 1),
            ("a.mp4,-1\n,-1\n", 2),
        ] {
            write("bad.csv", text);
            let err = open(dir.path(), "bad.csv").expect_err(text).to_string();
            assert!(
                err.contains("bad.csv") && err.contains(&format!("line {line}")),
                "{text:?}: {err}"
            );
        }

        write(
            "good.csv",
            "# path,label\nsynth/00000.mp4,-1\n\n  frames/a , 3 \n",
        );
        let corpus = open(dir.path(), "good.csv").expect("a valid list");
        assert_eq!(corpus.clips(), ["synth/00000.mp4", "frames/a"]);
    }

    #[test]
    fn clip_lists_are_csv_with_bom_quotes_and_crlf() {
        let parse = |text: &[u8]| parse_list(text, "list.csv");
        // A byte-order mark does not become part of the first clip's name.
        assert_eq!(
            parse(b"\xEF\xBB\xBFc0.mp4,-1\nc1.mp4,-1\n").expect("bom"),
            ["c0.mp4", "c1.mp4"]
        );
        // Quoted fields keep their commas and quotes; CRLF line ends.
        assert_eq!(
            parse(b"\"a,b.mp4\",-1\r\n\"say \"\"hi\"\".mp4\",1\r\n100%.mp4\r\n").expect("quoted"),
            ["a,b.mp4", "say \"hi\".mp4", "100%.mp4"]
        );
        // Comments and blank lines; rows with fewer or more fields.
        assert_eq!(
            parse(b"# path,label\r\n\r\nx/y z.mpg\n  w.mkv , 1, extra\n").expect("mixed"),
            ["x/y z.mpg", "w.mkv"]
        );
        let err = parse(b"ok.mp4\n\"a/../b.mp4\",1\n")
            .expect_err("dotdot")
            .to_string();
        assert!(err.contains("list.csv line 2"), "{err}");
        let err = parse(b"\"unterminated\n").map(|_| ()).err();
        if let Some(err) = err {
            assert!(err.to_string().contains("list.csv"), "{err}");
        }
    }

    #[test]
    fn a_panicking_data_thread_fails_the_batch_instead_of_hanging() {
        let dir = tempfile::tempdir().expect("tempdir");
        let corpus = write_corpus(dir.path(), 4);
        // Every clip's name carries the test-only panic trigger.
        let list: String = corpus
            .clips()
            .iter()
            .map(|c| {
                let renamed = format!("panic-in-test-{}", c.replace('/', "-"));
                std::fs::copy(dir.path().join(c), dir.path().join(&renamed)).expect("copy");
                format!("{renamed},-1\n")
            })
            .collect();
        std::fs::write(dir.path().join("panic.csv"), list).expect("list");
        let corpus = Arc::new(open(dir.path(), "panic.csv").expect("open"));
        let started = Instant::now();
        let mut loader = Loader::start(corpus, loader_config(2, 0, 1), 0).expect("start");
        let err = loader
            .next_batch()
            .expect_err("a panic must fail the batch")
            .to_string();
        assert!(
            err.contains("panicked") && err.contains("injected panic"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}
