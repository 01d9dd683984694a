//! One corpus reader for every command: a clip list naming videos in several containers
//! (MPEG-PS `.mpg`, AVI, Matroska without an extension, MP4 under names with `%`, `,` and
//! spaces) and frame folders (JPEG `img_00001.jpg`, PNG, one named like a video) is read the
//! same way by the pre-training loader and by embedding, locally and from S3; the list has a
//! byte-order mark, CRLF line ends and quoted names.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use endofm_shared::StorageUri;
use endofm_worker::data::ViewConfig;
use endofm_worker::data::loader::{Corpus, Loader, LoaderConfig};
use endofm_worker::embed::{EmbedOptions, load_clip};
use endofm_worker::precision::Precision;
use endofm_worker::video::{Clip, Container, EncodeOptions, Frames, Mp4Writer, write_jpeg};

use crate::support::{self, S3Server};

fn encode(path: &Path, frames: &Frames, format: &str) {
    let container = Container {
        format: format.into(),
        ..Container::default()
    };
    let mut w = Mp4Writer::create_in(
        path,
        frames.w,
        frames.h,
        &EncodeOptions::default(),
        &container,
    )
    .unwrap();
    for i in 0..frames.t {
        w.push(frames.frame(i)).unwrap();
    }
    w.finish().unwrap();
}

/// Writes the mixed corpus into `dir`; returns the number of clips listed.
fn mixed_corpus(dir: &Path) -> usize {
    let synth = support::corpus(dir, 1, 12, 48, 4);
    let clip = std::fs::read_dir(synth.join("synth"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "mp4"))
        .unwrap();
    let frames = Clip::open(&clip).unwrap().decode_all().unwrap();
    let root = dir.join("mixed");
    std::fs::create_dir_all(&root).unwrap();
    encode(&root.join("a.mpg"), &frames, "mpeg");
    encode(&root.join("b.avi"), &frames, "avi");
    encode(&root.join("c"), &frames, "matroska");
    std::fs::copy(&clip, root.join("100%.mp4")).unwrap();
    std::fs::copy(&clip, root.join("e,1 x.mp4")).unwrap();
    // A JPEG frame folder in the reference's naming, and a PNG folder named like a video.
    let jpg = root.join("from0");
    let png = root.join("d.mp4");
    std::fs::create_dir_all(&jpg).unwrap();
    std::fs::create_dir_all(&png).unwrap();
    for i in 0..frames.t {
        write_jpeg(
            &jpg.join(format!("img_{:05}.jpg", i + 1)),
            frames.frame(i),
            frames.w,
            frames.h,
            2,
        )
        .unwrap();
        image::RgbImage::from_raw(frames.w as u32, frames.h as u32, frames.frame(i).to_vec())
            .unwrap()
            .save(png.join(format!("{i}.png")))
            .unwrap();
    }
    let list = "\u{feff}# path,label\r\na.mpg,-1\r\nb.avi,-1\r\nc,-1\r\n\"100%.mp4\",-1\r\n\"e,1 x.mp4\",-1\r\nfrom0,-1\r\nd.mp4,-1\r\n\"from0\",-1\r\n";
    std::fs::write(root.join("train.csv"), list).unwrap();
    8
}

fn read_everything(corpus: Corpus, n: usize) {
    assert_eq!(corpus.len(), n);
    assert_eq!(
        corpus.clips()[0],
        "a.mpg",
        "the byte-order mark is not part of a name"
    );
    assert_eq!(corpus.clips()[4], "e,1 x.mp4");
    let opts = EmbedOptions {
        frames: 4,
        size: 32,
        batch: 2,
        precision: Precision::Fp32,
    };
    // Embedding reads every entry.
    for i in 0..n {
        let x = load_clip(&corpus, i, &opts)
            .unwrap_or_else(|e| panic!("embedding {}: {e}", corpus.describe(i)));
        assert_eq!(x.size(), [3, 4, 32, 32]);
    }
    // Pre-training reads every entry: one epoch of 4 steps × 2 clips, nothing skipped.
    let cfg = LoaderConfig {
        seed: 3,
        batch: 2,
        rank: 0,
        world: 1,
        threads: 2,
        prefetch: 2,
        views: ViewConfig {
            global_size: 16,
            local_size: 8,
            ..ViewConfig::default()
        },
    };
    let mut loader = Loader::start(Arc::new(corpus), cfg, 0).unwrap();
    let mut seen = Vec::new();
    for _ in 0..n / 2 {
        seen.extend(loader.next_batch().unwrap().clips);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..n).collect::<Vec<_>>());
    assert_eq!(
        loader.stats().clips_failed.load(Ordering::Relaxed),
        0,
        "{:?}",
        loader.bad_clips()
    );
}

#[test]
fn every_command_reads_every_container_and_frame_folder_locally_and_on_s3() {
    let dir = tempfile::tempdir().unwrap();
    let n = mixed_corpus(dir.path());
    let root = dir.path().join("mixed");
    read_everything(
        Corpus::open(
            &StorageUri::parse(root.to_str().unwrap()).unwrap(),
            "train.csv",
        )
        .unwrap(),
        n,
    );

    let server = S3Server::start();
    server.create_bucket("corpus");
    let store = server.store("s3://corpus/mixed");
    support::upload_dir(&store, &root);
    read_everything(Corpus::open_in(store, "train.csv").unwrap(), n);
}
