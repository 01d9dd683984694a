//! PNG plots of a run report (800×500, plotters' bitmap backend): training loss and validation
//! metric per epoch (`training`), confusion-matrix heat maps (`confusion`), ROC curves
//! (`roc`), values per step in stacked panels (`series`, pre-training's report), segmentation
//! mask overlays (`overlay`), detection boxes over frames (`boxes`, also drawn onto the frames
//! of the annotated prediction video) and precision–recall curves (`pr`). Text is
//! drawn with a TrueType font read once at run time (`font`: DejaVu Sans, installed by
//! `scripts/setup.sh`); without one, every plot function returns an error that says what to
//! install.

mod boxes;
mod confusion;
mod font;
mod overlay;
mod pr;
mod roc;
mod series;
mod training;

use std::io::Cursor;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

pub use boxes::{
    BoxSample, DrawBox, PREDICTED_COLOUR, TRUTH_COLOUR, annotate_frame, box_grid, draw_boxes,
};
pub use confusion::confusion_matrix;
pub use font::{FONT_ENV, font_file};
pub use overlay::{OverlaySample, mask_grid};
pub use pr::{PrCurve, pr_curve};
pub use roc::roc_curve;
pub use series::{Corner, Panel, Series, step_panels};
pub use training::training_curves;

use super::report::{Report, write_atomically};
use crate::{Error, Result};
use font::title_font;

/// Width of every plot, pixels.
pub const WIDTH: u32 = 800;
/// Height of every plot, pixels.
pub const HEIGHT: u32 = 500;

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

// A small qualitative palette (colour-blind safe: Okabe–Ito blue, orange, vermillion).
const BLUE: RGBColor = RGBColor(0, 114, 178);
const ORANGE: RGBColor = RGBColor(230, 159, 0);
const RED: RGBColor = RGBColor(213, 94, 0);
const GREY: RGBColor = RGBColor(120, 120, 120);
/// Darkest cell of the confusion heat map (the lightest is white).
const HEAT: RGBColor = RGBColor(8, 69, 148);

/// Draws onto a white 800×500 canvas with a centred title and writes it as a PNG at `path`
/// (through a temporary file and a rename).
fn render(path: &Path, title: &str, draw: impl FnOnce(&Area) -> DrawResult) -> Result<()> {
    let fail = |reason: String| Error::Report {
        path: path.to_path_buf(),
        reason,
    };
    font_file().map_err(|reason| fail(reason.to_string()))?;
    let mut pixels = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        let drawn: DrawResult = (|| {
            let (top, body) = root.split_vertically(46);
            top.draw(&Text::new(
                title.to_string(),
                (WIDTH as i32 / 2, 26),
                title_font().pos(Pos::new(HPos::Center, VPos::Center)),
            ))?;
            draw(&body)?;
            root.present()?;
            Ok(())
        })();
        drawn.map_err(|e| fail(format!("drawing the plot: {e}")))?;
    }
    let image = image::RgbImage::from_raw(WIDTH, HEIGHT, pixels)
        .ok_or_else(|| fail("plot buffer has the wrong size".into()))?;
    let mut png = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| fail(format!("encoding PNG: {e}")))?;
    write_atomically(path, &png, "writing plot")
}

/// How a metric's name is shown: `f1` → `F1`, `auroc` → `AUROC`, `dice` → `Dice`.
pub fn metric_label(name: &str) -> String {
    match name {
        "f1" => "F1".into(),
        "auroc" => "AUROC".into(),
        "iou" => "IoU".into(),
        "dice" => "Dice".into(),
        other => other.replace('_', " "),
    }
}

/// File name of the training-curve plot.
pub const TRAINING_PLOT: &str = "training.png";

/// Writes every plot the report has data for into `dir` and lists them in `report.plots`:
/// [`TRAINING_PLOT`] when there is a history (the selection's metric, else the primary one),
/// `confusion_{split}.png` and `roc_{split}.png` for each split with a confusion matrix or a
/// ROC curve (characters other than ASCII letters, digits and `-` in the split's name become
/// `_`). Returns the new file names.
pub fn write_report_plots(report: &mut Report, dir: &Path) -> Result<Vec<String>> {
    let mut written = Vec::new();
    if !report.history.is_empty() {
        let (metric, chosen) = match &report.selection {
            Some(s) => (s.metric.clone(), Some(s.epoch)),
            None => (report.primary_metric.clone(), None),
        };
        training_curves(&report.history, &metric, chosen, &dir.join(TRAINING_PLOT))?;
        written.push(TRAINING_PLOT.to_string());
    }
    for (split, m) in &report.splits {
        // Split names become part of file names: nothing but letters, digits, '-' and '_'.
        let stem: String = split
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if let Some(matrix) = &m.confusion {
            let names: Vec<String> = if m.class_names.len() == matrix.n_classes() {
                m.class_names.clone()
            } else {
                (0..matrix.n_classes())
                    .map(|c| format!("class {c}"))
                    .collect()
            };
            let file = format!("confusion_{stem}.png");
            confusion_matrix(
                matrix,
                &names,
                &format!("Confusion matrix: {split} split"),
                &dir.join(&file),
            )?;
            written.push(file);
        }
        if !m.roc.is_empty() {
            let file = format!("roc_{stem}.png");
            let auc = m.metrics.get("auroc").copied();
            roc_curve(
                &m.roc,
                auc,
                &format!("ROC curve: {split} split"),
                &dir.join(&file),
            )?;
            written.push(file);
        }
    }
    for f in &written {
        if !report.plots.contains(f) {
            report.plots.push(f.clone());
        }
    }
    Ok(written)
}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::eval::metrics::{BinaryMetrics, BinaryPrediction, ConfusionMatrix};
    use crate::eval::report::EpochRecord;
    use crate::eval::report::SplitMetrics;
    use endofm_shared::TaskKind;

    /// Decodes a PNG and checks its size and that it is not blank: it has at least `colours`
    /// distinct colours and a fair share of non-white pixels.
    fn check_png(path: &Path, colours: usize) {
        let img = image::open(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT), "{}", path.display());
        let distinct: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
        assert!(
            distinct.len() >= colours,
            "{}: {} colours",
            path.display(),
            distinct.len()
        );
        let inked = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        assert!(
            inked > 2_000,
            "{}: only {inked} non-white pixels",
            path.display()
        );
    }

    /// A classification report with a plausible history and test split (deterministic).
    fn sample_report() -> Report {
        let mut r = Report::new(TaskKind::Classify, "test", serde_json::Value::Null);
        r.history = (0..12)
            .map(|e| {
                let t = e as f64;
                EpochRecord {
                    epoch: e,
                    train_loss_mean: Some(0.7 * (-t / 4.0).exp() + 0.05),
                    val: BTreeMap::from([(
                        "f1".to_string(),
                        0.9 - 0.4 * (-t / 3.0).exp() - 0.01 * (t - 7.0).abs(),
                    )]),
                }
            })
            .collect();
        r.select_best("f1");
        let samples: Vec<BinaryPrediction> = (0..80)
            .map(|i| {
                let label = i64::from(i % 3 != 0);
                let score = ((i * 37 % 80) as f64 / 80.0 + 0.35 * label as f64).min(1.0);
                BinaryPrediction::new(label, i64::from(score > 0.5), score).unwrap()
            })
            .collect();
        let m = BinaryMetrics::from_predictions(&samples).unwrap();
        r.splits.insert(
            "test".into(),
            SplitMetrics::from_binary(&m, ["normal", "abnormal"]),
        );
        r
    }

    #[test]
    fn report_plots_are_valid_pngs() {
        let dir = tempfile::tempdir().unwrap();
        let mut report = sample_report();
        let files = write_report_plots(&mut report, dir.path()).unwrap();
        assert_eq!(
            files,
            ["training.png", "confusion_test.png", "roc_test.png"]
        );
        assert_eq!(report.plots, files);
        for f in &files {
            check_png(&dir.path().join(f), 20);
            assert!(!dir.path().join(format!("{f}.tmp")).exists());
        }
        // Writing again does not list the plots twice.
        write_report_plots(&mut report, dir.path()).unwrap();
        assert_eq!(report.plots.len(), 3);
        // A split name cannot lead a plot out of the folder.
        let test = report.splits["test"].clone();
        report.splits.insert("../hold out".into(), test);
        let files = write_report_plots(&mut report, dir.path()).unwrap();
        assert!(
            files.contains(&"roc____hold_out.png".to_string()),
            "{files:?}"
        );
        assert!(dir.path().join("confusion____hold_out.png").is_file());
    }

    #[test]
    fn sparse_and_multi_class_inputs_still_plot() {
        let dir = tempfile::tempdir().unwrap();
        // One epoch, no loss, no chosen epoch.
        let history = [EpochRecord {
            epoch: 0,
            train_loss_mean: None,
            val: BTreeMap::from([("f1".to_string(), 0.4)]),
        }];
        let path = dir.path().join("one.png");
        training_curves(&history, "f1", None, &path).unwrap();
        check_png(&path, 10);
        // Four classes, one of them never seen.
        let pairs = [(0, 0), (0, 1), (1, 1), (2, 2), (2, 0), (2, 2), (1, 1)];
        let m = ConfusionMatrix::from_pairs(4, pairs).unwrap();
        let names: Vec<String> = ["adenoma", "hyperplastic", "serrated", "other"]
            .map(String::from)
            .to_vec();
        let path = dir.path().join("cm4.png");
        confusion_matrix(&m, &names, "Four classes", &path).unwrap();
        check_png(&path, 10);
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.png");
        let err = training_curves(&[], "f1", None, &p).unwrap_err();
        assert!(err.to_string().contains("no epochs"), "{err}");
        let m = ConfusionMatrix::new(2).unwrap();
        let err = confusion_matrix(&m, &["one".to_string()], "t", &p).unwrap_err();
        assert!(err.to_string().contains("1 class names"), "{err}");
        assert!(roc_curve(&[], None, "t", &p).is_err());
        let missing_dir = dir.path().join("no/such/dir/x.png");
        let err =
            roc_curve(&sample_report().splits["test"].roc, None, "t", &missing_dir).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }

    #[test]
    fn metric_labels() {
        assert_eq!(metric_label("f1"), "F1");
        assert_eq!(metric_label("auroc"), "AUROC");
        assert_eq!(metric_label("mean_iou"), "mean iou");
    }
}
