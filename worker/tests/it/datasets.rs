//! The downstream datasets end to end: `synth --kind polypdiag|cvc|kumc` writes the published
//! layouts (deterministic per seed, splits sharing no source video), the readers return exactly
//! the renderer's masks and boxes, and the classification loaders are deterministic across a
//! restart, shard ranks without overlap, name a bad video, and read from S3.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use endofm_shared::{FinetuneConfig, StorageUri};
use endofm_worker::datasets::classify::{ClipSampling, eval_shard};
use endofm_worker::datasets::{
    ClassifyEval, ClassifyLoader, Cvc, Kumc, PolypDiag, Split, iters_per_epoch, predict_windows,
};
use endofm_worker::synth::datasets::{DownstreamKind, DownstreamSpec, video_params};
use endofm_worker::synth::render_clip;

use crate::support::{self, S3Server};

fn local(dir: &Path) -> StorageUri {
    StorageUri::Local {
        path: dir.to_path_buf(),
    }
}

/// A tiny dataset written through the command line; returns its folder and JSON summary.
fn synth(dir: &Path, kind: &str, videos: usize, seed: u64) -> (PathBuf, serde_json::Value) {
    synth_threads(dir, kind, videos, seed, 2)
}

fn synth_threads(
    dir: &Path,
    kind: &str,
    videos: usize,
    seed: u64,
    threads: usize,
) -> (PathBuf, serde_json::Value) {
    let out = dir.join(format!("{kind}-{seed}"));
    let stdout = support::worker_ok(&[
        "synth",
        "--kind",
        kind,
        "--out",
        out.to_str().unwrap(),
        "--videos",
        &videos.to_string(),
        "--frames",
        "8",
        "--max-frames",
        "12",
        "--size",
        "32",
        "--seed",
        &seed.to_string(),
        "--threads",
        &threads.to_string(),
    ]);
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    (out, summary)
}

/// Every file below `dir` with its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

/// `labels.json` records.
fn records(dir: &Path) -> Vec<serde_json::Value> {
    let labels: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("labels.json")).unwrap()).unwrap();
    labels["videos"].as_array().unwrap().clone()
}

/// The spec the command line used in [`synth`] (for re-rendering a video).
fn spec(kind: DownstreamKind) -> DownstreamSpec {
    DownstreamSpec {
        short_side: 32,
        ..DownstreamSpec::new(kind)
    }
}

/// Fine-tuning sizes for 40×32 videos of 8–12 frames.
fn small_config() -> FinetuneConfig {
    FinetuneConfig {
        frames: 4,
        window: 8,
        crop: 24,
        train_short_min: 28,
        train_short_max: 36,
        test_short: 28,
        batch_per_rank: 2,
        seed: 3,
        ..FinetuneConfig::default()
    }
}

#[test]
fn polypdiag_synth_is_balanced_disjoint_and_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let (a, summary) = synth(dir.path(), "polypdiag", 12, 7);
    assert_eq!(summary["kind"], "polypdiag");
    assert_eq!(summary["videos"], 12);
    for (split, n) in [("train", 4), ("val", 1), ("test", 1)] {
        for class in ["0", "1"] {
            assert_eq!(
                summary["splits"][split]["classes"][class], n,
                "{split} {class}: {summary}"
            );
        }
    }
    assert!(
        summary["paths"]["train_list"]
            .as_str()
            .unwrap()
            .ends_with("splits/train.txt")
    );

    let ds = PolypDiag::open(&local(&a)).unwrap();
    let mut names = BTreeSet::new();
    let mut seeds = BTreeMap::new();
    for r in records(&a) {
        assert!(names.insert(r["name"].as_str().unwrap().to_string()), "{r}");
        let seed = r["seed"].as_u64().unwrap();
        assert!(
            seeds.insert(seed, r["split"].clone()).is_none(),
            "seed {seed} used twice"
        );
        let frames = r["frames"].as_u64().unwrap();
        let polyp = r["polyp_frames"].as_u64().unwrap();
        if r["label"] == 1 {
            assert!(polyp * 2 >= frames, "{r}");
        } else {
            assert_eq!(polyp, 0, "{r}");
        }
    }
    let mut listed = BTreeSet::new();
    for split in Split::ALL {
        for e in ds.split(split).unwrap() {
            assert!(listed.insert(e.name.clone()), "{} in two splits", e.name);
            let r = records(&a)
                .into_iter()
                .find(|r| r["name"] == e.name.as_str())
                .unwrap();
            assert_eq!(
                (r["label"].as_i64().unwrap(), r["split"].as_str().unwrap()),
                (e.label, split.name())
            );
        }
    }
    assert_eq!(listed, names);

    // Same seed: the same bytes, whatever the thread count; another seed: other videos.
    let (b, _) = synth_threads(&dir.path().join("again"), "polypdiag", 12, 7, 1);
    assert_eq!(files(&a), files(&b));
    let (c, _) = synth(dir.path(), "polypdiag", 12, 8);
    assert_ne!(
        files(&a).get(Path::new("videos/0000.mp4")),
        files(&c).get(Path::new("videos/0000.mp4"))
    );

    let err = support::worker_err(&[
        "synth",
        "--kind",
        "polypdiag",
        "--out",
        "/tmp/x",
        "--videos",
        "4",
    ]);
    assert!(err.contains("at least 6"), "{err}");
    let err = support::worker_err(&[
        "synth",
        "--kind",
        "cvc",
        "--out",
        "/tmp/x",
        "--polyp-probability",
        "1",
    ]);
    assert!(err.contains("--polyp-probability"), "{err}");
}

#[test]
fn cvc_masks_and_frames_are_the_renderers() {
    let dir = tempfile::tempdir().unwrap();
    let (root, summary) = synth(dir.path(), "cvc", 4, 2);
    assert_eq!(summary["splits"]["train"]["videos"], 2);
    let cvc = Cvc::open(&local(&root)).unwrap();
    let spec = spec(DownstreamKind::Cvc);
    let mut seen = 0;
    for r in records(&root) {
        let name = r["name"].as_str().unwrap();
        let split = Split::parse(r["split"].as_str().unwrap()).unwrap();
        assert!(cvc.split(split).unwrap().iter().any(|n| n == name));
        let seq = cvc.read(name).unwrap();
        let frames = r["frames"].as_u64().unwrap() as usize;
        let (want, labels) = render_clip(
            &video_params(&spec, frames, 1, None),
            r["seed"].as_u64().unwrap(),
        )
        .unwrap();
        assert_eq!(
            seq.frames, want,
            "{name}: frames differ from the renderer's"
        );
        assert_eq!(
            seq.masks, labels.masks.data,
            "{name}: masks differ from the renderer's"
        );
        assert!(labels.polyp_frames() * 2 >= frames);
        seen += 1;
    }
    assert_eq!(seen, 4);
}

#[test]
fn kumc_boxes_are_the_renderers() {
    let dir = tempfile::tempdir().unwrap();
    let (root, _) = synth(dir.path(), "kumc", 4, 3);
    let kumc = Kumc::open(&local(&root)).unwrap();
    let spec = spec(DownstreamKind::Kumc);
    let by_name: BTreeMap<String, serde_json::Value> = records(&root)
        .into_iter()
        .map(|r| (r["name"].as_str().unwrap().to_string(), r))
        .collect();
    let mut boxes = 0;
    for split in kumc.splits() {
        let frames = kumc.split(split).unwrap();
        for video in kumc.videos(split).unwrap() {
            let r = &by_name[video];
            assert_eq!(r["split"], split.name());
            let n = r["frames"].as_u64().unwrap() as usize;
            // The class the record names sets the polyps' size and colour.
            let class = r["class"]
                .as_str()
                .and_then(endofm_worker::datasets::kumc::PolypClass::parse);
            assert!(class.is_some(), "{r}");
            let (_, labels) = render_clip(
                &video_params(&spec, n, 1, class),
                r["seed"].as_u64().unwrap(),
            )
            .unwrap();
            let mine: Vec<_> = frames.iter().filter(|f| f.video == video).collect();
            assert_eq!(mine.len(), n);
            for f in mine {
                let got: Vec<[f64; 4]> = f
                    .annotation
                    .boxes
                    .iter()
                    .map(|b| [b.xmin, b.ymin, b.xmax, b.ymax])
                    .collect();
                let want: Vec<[f64; 4]> = labels.boxes[f.number - 1]
                    .iter()
                    .map(|b| [b.x0, b.y0, b.x1, b.y1].map(f64::from))
                    .collect();
                assert_eq!(got, want, "{video} frame {}", f.number);
                assert!(
                    f.annotation
                        .boxes
                        .iter()
                        .all(|b| b.class.name() == r["class"])
                );
                boxes += got.len();
            }
            let first = frames.iter().find(|f| f.video == video).unwrap();
            let img = kumc.read_frame(first).unwrap();
            assert_eq!((img.h, img.w), (32, 40));
        }
    }
    assert!(boxes > 0, "no polyp boxes in the whole dataset");
}

#[test]
fn classify_loader_resumes_exactly_and_shards_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let (root, _) = synth(dir.path(), "polypdiag", 12, 1);
    let ds = Arc::new(PolypDiag::open(&local(&root)).unwrap());
    let cfg = small_config();
    let n = ds.split(Split::Train).unwrap().len();
    assert_eq!(n, 8);
    // One rank: 4 steps per epoch; the run crosses into epoch 1.
    assert_eq!(iters_per_epoch(n, 2, 1), 4);
    let run = |start: usize, steps: usize, rank: usize, world: usize| {
        let mut loader =
            ClassifyLoader::start(Arc::clone(&ds), Split::Train, &cfg, rank, world, 2, start)
                .unwrap();
        (0..steps)
            .map(|_| loader.next_batch().unwrap())
            .collect::<Vec<_>>()
    };
    let whole = run(0, 6, 0, 1);
    assert_eq!(whole[0].videos.size(), [2, 3, 4, 24, 24]);
    assert_eq!(whole[0].videos.kind(), tch::Kind::Float);
    assert_eq!(whole[0].labels.kind(), tch::Kind::Int64);
    let entries = ds.split(Split::Train).unwrap();
    for b in &whole {
        let labels: Vec<i64> = Vec::try_from(&b.labels).unwrap();
        assert_eq!(
            labels,
            b.indices
                .iter()
                .map(|&i| entries[i].label)
                .collect::<Vec<_>>()
        );
    }
    let epoch0: BTreeSet<usize> = whole[..4].iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(epoch0.len(), 8, "epoch 0 shows every video once");
    for (start, count) in [(2, 2), (3, 3)] {
        for (k, b) in run(start, count, 0, 1).iter().enumerate() {
            let w = &whole[start + k];
            assert_eq!(
                b.indices,
                w.indices,
                "step {} resumed at {start}",
                start + k
            );
            assert!(
                b.videos.equal(&w.videos),
                "step {} resumed at {start}",
                start + k
            );
        }
    }
    // Epoch 1 redraws the augmentation of a video seen in epoch 0.
    let first = whole[0].indices[0];
    let again = whole[4..].iter().find_map(|b| {
        b.indices
            .iter()
            .position(|&i| i == first)
            .map(|k| b.videos.get(k as i64))
    });
    if let Some(v) = again {
        assert!(!v.equal(&whole[0].videos.get(0)));
    }

    // Two ranks: 2 steps per epoch; each global batch holds 4 distinct videos.
    let ranks: Vec<_> = (0..2).map(|r| run(0, 2, r, 2)).collect();
    let mut global = BTreeSet::new();
    for rank in &ranks {
        for b in rank {
            for &i in &b.indices {
                assert!(global.insert(i), "video {i} twice in one epoch");
            }
        }
    }
    assert_eq!(global.len(), 8);

    // Evaluation: every validation video once across ranks, same tensors as one rank.
    let val = ds.split(Split::Val).unwrap().len();
    let single: Vec<_> = ClassifyEval::start(Arc::clone(&ds), Split::Val, &cfg, 0, 1, 2)
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(single.iter().map(|b| b.indices.len()).sum::<usize>(), val);
    let mut covered = Vec::new();
    for rank in 0..3 {
        let eval = ClassifyEval::start(Arc::clone(&ds), Split::Val, &cfg, rank, 3, 1).unwrap();
        assert_eq!(eval.shard(), eval_shard(val, rank, 3));
        for b in eval {
            let b = b.unwrap();
            for (k, &i) in b.indices.iter().enumerate() {
                let (bi, pos) = (i / 2, i % 2);
                assert!(
                    b.videos
                        .get(k as i64)
                        .equal(&single[bi].videos.get(pos as i64))
                );
                covered.push(i);
            }
        }
    }
    covered.sort_unstable();
    assert_eq!(covered, (0..val).collect::<Vec<_>>());
}

#[test]
fn prediction_windows_and_bad_videos() {
    let dir = tempfile::tempdir().unwrap();
    let (root, _) = synth(dir.path(), "polypdiag", 6, 4);
    let ds = Arc::new(PolypDiag::open(&local(&root)).unwrap());
    let cfg = small_config();
    let entry = ds.split(Split::Val).unwrap()[0].clone();
    let path = root.join("videos").join(&entry.name);
    let r = records(&root)
        .into_iter()
        .find(|r| r["name"] == entry.name.as_str())
        .unwrap();
    let n = r["frames"].as_u64().unwrap() as usize;
    let clips = predict_windows(path.to_str().unwrap(), &cfg).unwrap();
    // Windows of 8 frames from frame 0 while one starts inside the video.
    assert_eq!(clips.frames, n);
    assert_eq!(clips.span, 8);
    assert_eq!(clips.starts, (0..n).step_by(8).collect::<Vec<_>>());
    assert_eq!(
        clips.clips.size(),
        [clips.starts.len() as i64, 3, 4, 24, 24]
    );
    assert_eq!(clips.indices[0], [0, 2, 4, 7]);
    assert_eq!(*clips.indices[1].last().unwrap(), n - 1);
    // The first window is the evaluation clip.
    let eval = ClassifyEval::start(Arc::clone(&ds), Split::Val, &cfg, 0, 1, 1)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert!(clips.clips.get(0).equal(&eval.videos.get(0)));
    assert_eq!(ClipSampling::from_config(&cfg).clip_len(), 3 * 4 * 24 * 24);

    // A damaged training video stops the loader with its name.
    let victim = ds.split(Split::Train).unwrap()[0].name.clone();
    std::fs::write(root.join("videos").join(&victim), b"not a video").unwrap();
    let mut loader = ClassifyLoader::start(
        Arc::clone(&ds),
        Split::Train,
        &FinetuneConfig {
            batch_per_rank: 1,
            ..cfg
        },
        0,
        1,
        1,
        0,
    )
    .unwrap();
    let err = (0..4)
        .find_map(|_| loader.next_batch().err())
        .expect("the damaged video must fail");
    assert!(err.to_string().contains(&victim), "{err}");
}

#[test]
fn polypdiag_reads_from_s3() {
    let server = S3Server::start();
    server.create_bucket("endofm");
    let dir = tempfile::tempdir().unwrap();
    let (root, _) = synth(dir.path(), "polypdiag", 6, 9);
    let store = server.store("s3://endofm/polypdiag");
    support::upload_dir(&store, &root);
    let ds = Arc::new(PolypDiag::open_store(store).unwrap());
    let local_ds = Arc::new(PolypDiag::open(&local(&root)).unwrap());
    let cfg = small_config();
    let remote: Vec<_> = ClassifyEval::start(ds, Split::Train, &cfg, 0, 1, 2)
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    let here: Vec<_> = ClassifyEval::start(local_ds, Split::Train, &cfg, 0, 1, 2)
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(remote.len(), here.len());
    for (a, b) in remote.iter().zip(&here) {
        assert!(a.videos.equal(&b.videos));
    }
    let missing = server.store("s3://endofm/nothing");
    let err = PolypDiag::open_store(missing).unwrap_err().to_string();
    assert!(
        err.contains("s3://endofm/nothing/splits/train.txt"),
        "{err}"
    );
}
