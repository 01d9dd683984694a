//! The rank-aware pre-training data loader: a corpus listing (`train.csv` of MP4 clips or
//! JPEG-frame folders) in any storage location, a deterministic per-epoch permutation from
//! (seed, epoch), rank r of W taking every W-th clip, a pool of decode/augment threads feeding a
//! bounded, ordered prefetch buffer, and batches addressed by their global step, so a resumed run
//! continues mid-epoch with exactly the batches an uninterrupted run would have seen.
//!
//! A clip that fails to read or decode is logged with its URI, counted, and replaced by the next
//! clip of the same rank's shard (deterministically); a corpus where most clips fail is an error.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tch::Tensor;

use endofm_shared::StorageUri;

use crate::checkpoint::CorpusFingerprint;
use crate::data::{ClipShape, DrawKey, ViewConfig, ViewPlan, render};
use crate::store::Store;
use crate::video::{Clip, FrameFolder};
use crate::{Error, Result};

/// Extensions read as video files; any other entry is a folder of `img_%05d.jpg` frames.
const VIDEO_EXTENSIONS: [&str; 6] = ["mp4", "avi", "mkv", "mov", "webm", "m4v"];

/// A corpus: the clip list of a storage location.
#[derive(Debug)]
pub struct Corpus {
    store: Store,
    clips: Vec<String>,
}

impl Corpus {
    /// Opens `uri` and reads its clip list `list` (lines `relative/path,label`; blank lines and
    /// lines starting with `#` are skipped).
    pub fn open(uri: &StorageUri, list: &str) -> Result<Self> {
        let store = Store::open(uri, false)?;
        let text = store.get(list).map_err(|e| Error::Storage {
            uri: store.describe(list),
            reason: match e {
                // Already names the list's location: only the reason, not the URI twice.
                Error::Storage { reason, .. } => format!("cannot read the clip list: {reason}"),
                e => format!("cannot read the clip list ({e})"),
            },
        })?;
        let text = String::from_utf8_lossy(&text);
        let mut clips = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let path = line.split(',').next().unwrap_or("").trim();
            if path.is_empty() || path.starts_with('/') || path.split('/').any(|s| s == "..") {
                return Err(Error::Input {
                    name: format!("{} line {}", store.describe(list), n + 1),
                    reason: format!("`{line}` is not `relative/path,label`"),
                });
            }
            clips.push(path.to_string());
        }
        if clips.is_empty() {
            return Err(Error::Input {
                name: store.describe(list),
                reason: "lists no clips".into(),
            });
        }
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

    /// The bytes of clip `i` (video files only).
    pub fn read(&self, i: usize) -> Result<bytes::Bytes> {
        self.store.get(&self.clips[i])
    }

    /// Human-readable location of clip `i`.
    pub fn describe(&self, i: usize) -> String {
        self.store.describe(&self.clips[i])
    }

    /// Decodes the frames the views of clip `i` need and renders them.
    pub fn views(&self, i: usize, cfg: &ViewConfig, key: DrawKey) -> Result<Vec<Tensor>> {
        let rel = &self.clips[i];
        let uri = self.describe(i);
        let is_video = rel
            .rsplit_once('.')
            .is_some_and(|(_, ext)| VIDEO_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()));
        let frames = if is_video {
            let bytes = self.store.get(rel)?;
            let mut clip = Clip::from_bytes(&uri, bytes)?;
            let info = clip.info();
            let shape = ClipShape {
                frames: info.frames,
                height: info.height,
                width: info.width,
            };
            let plan = ViewPlan::draw(cfg, shape, key)?;
            let decoded = clip.decode(&plan.decode)?;
            (plan, decoded)
        } else {
            let StorageUri::Local { path } = self.store.uri() else {
                return Err(Error::ClipDecode {
                    uri,
                    reason: "frame folders are read from local storage only; store clips as MP4 in object storage".into(),
                });
            };
            let mut folder = FrameFolder::open(&PathBuf::from(path).join(rel))?;
            let first = folder.decode(&[0])?;
            let shape = ClipShape {
                frames: folder.len(),
                height: first.h,
                width: first.w,
            };
            let plan = ViewPlan::draw(cfg, shape, key)?;
            let decoded = folder.decode(&plan.decode)?;
            (plan, decoded)
        };
        let (plan, decoded) = frames;
        let frames = crate::data::Frames::new(decoded.t, decoded.h, decoded.w, decoded.data)?;
        Ok(render(cfg, &plan, &frames)?.tensors)
    }
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
    /// Clips that failed (each attempt counts).
    pub clips_failed: AtomicU64,
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
    fingerprint_len: usize,
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
        let perm = permutation(self.fingerprint_len, self.cfg.seed, epoch);
        (perm[k * self.cfg.world + self.cfg.rank], epoch)
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
            match self.corpus.views(clip, &self.cfg.views, key) {
                Ok(views) => {
                    self.stats.clips_ok.fetch_add(1, Ordering::Relaxed);
                    return Ok(Sample { clip, views });
                }
                Err(e) => {
                    let failed = self.stats.clips_failed.fetch_add(1, Ordering::Relaxed) + 1;
                    let ok = self.stats.clips_ok.load(Ordering::Relaxed);
                    tracing::warn!(uri = %self.corpus.describe(clip), error = %e, "clip skipped");
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
            let sample = self.produce(seq);
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
            fingerprint_len: corpus.len(),
            corpus,
            next: AtomicUsize::new(start_seq),
            consumed: Mutex::new(start_seq),
            ready: Mutex::new(BTreeMap::new()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            stats: LoaderStats::default(),
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

    /// The next batch, in step order.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let started = Instant::now();
        let b = self.shared.cfg.batch;
        let first = self.next_step * b;
        let mut samples = Vec::with_capacity(b);
        for seq in first..first + b {
            let mut ready = self.shared.ready.lock().unwrap_or_else(|e| e.into_inner());
            let sample = loop {
                if let Some(s) = ready.remove(&seq) {
                    break s;
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
        let views = (0..n_views)
            .map(|v| Tensor::stack(&samples.iter().map(|s| &s.views[v]).collect::<Vec<_>>(), 0))
            .collect();
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
