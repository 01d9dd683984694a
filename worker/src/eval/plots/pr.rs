//! Precision–recall curves (detection: box-level, per class and overall) with an optional
//! operating point on each.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::font::font;
use super::{BLUE, GREY, ORANGE, RED, render};
use crate::{Error, Result};

/// One precision–recall curve.
#[derive(Debug, Clone, PartialEq)]
pub struct PrCurve {
    /// Legend text, e.g. `"overall, AP50 0.91"`.
    pub name: String,
    /// `(recall, precision)` after each detection in descending score order, both in [0, 1];
    /// empty when the split has no true boxes of this curve's class.
    pub points: Vec<(f64, f64)>,
    /// `(recall, precision)` at the reporting score threshold (0.5), drawn as a dot.
    pub operating_point: Option<(f64, f64)>,
}

/// Okabe–Ito (colour-blind safe) colours for successive curves; the first is overall's.
const PALETTE: [RGBColor; 6] = [
    BLUE,
    ORANGE,
    RGBColor(0, 158, 115),
    RED,
    RGBColor(204, 121, 167),
    GREY,
];

/// Note drawn for curves without points.
const NO_TRUTH: &str = "no true boxes";

fn in_unit(v: f64) -> bool {
    (0.0..=1.0).contains(&v)
}

/// Precision (y) against recall (x), both 0–1, one line per curve in [`PALETTE`] order with a
/// legend, and each curve's operating point as a dot (legend entry "score ≥ 0.5"). A curve
/// without points is listed in the legend as having no true boxes; when every curve is empty
/// the axes are drawn with that note. Errors: no curves, a point or operating point outside
/// [0, 1] or not finite (named by the curve), no font. Writes an 800×500 PNG at `path`.
pub fn pr_curve(curves: &[PrCurve], title: &str, path: &Path) -> Result<()> {
    let fail = |reason: String| Error::Report {
        path: path.to_path_buf(),
        reason,
    };
    if curves.is_empty() {
        return Err(fail("no precision–recall curves to plot".into()));
    }
    for c in curves {
        let bad = c
            .points
            .iter()
            .chain(&c.operating_point)
            .find(|(r, p)| !in_unit(*r) || !in_unit(*p));
        if let Some((r, p)) = bad {
            return Err(fail(format!(
                "curve `{}`: point (recall {r}, precision {p}) is outside [0, 1]",
                c.name
            )));
        }
    }
    let all_empty = curves.iter().all(|c| c.points.is_empty());
    render(path, title, |area| {
        // A square plotting area, centred (as the ROC plot).
        let (w, h) = area.dim_in_pixel();
        let side = h as i32 - 70;
        let margin = (w as i32 - side - 70) / 2;
        let mut chart = ChartBuilder::on(area)
            .margin_left(margin)
            .margin_right(margin)
            .margin_top(4)
            .margin_bottom(8)
            .x_label_area_size(50)
            .y_label_area_size(62)
            .build_cartesian_2d(0.0..1.0f64, 0.0..1.02f64)?;
        chart
            .configure_mesh()
            .x_labels(6)
            .y_labels(6)
            .x_label_formatter(&|v| format!("{v:.1}"))
            .y_label_formatter(&|v| format!("{v:.1}"))
            .x_desc("recall")
            .y_desc("precision")
            .label_style(font(14))
            .axis_desc_style(font(16))
            .bold_line_style(BLACK.mix(0.10))
            .light_line_style(TRANSPARENT)
            .draw()?;
        for (k, c) in curves.iter().enumerate() {
            let colour = PALETTE[k % PALETTE.len()];
            if c.points.is_empty() {
                chart
                    .draw_series(std::iter::empty::<PathElement<(f64, f64)>>())?
                    .label(format!("{}: {NO_TRUTH}", c.name))
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 22, y)], colour.mix(0.6).stroke_width(1))
                    });
                continue;
            }
            chart
                .draw_series(LineSeries::new(
                    c.points.iter().copied(),
                    colour.stroke_width(2),
                ))?
                .label(c.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 22, y)], colour.stroke_width(2))
                });
            if c.points.len() == 1 {
                chart.draw_series(std::iter::once(Circle::new(
                    c.points[0],
                    3,
                    colour.filled(),
                )))?;
            }
        }
        // Operating points over every line, so that none hides under another curve.
        let mut dots = curves
            .iter()
            .enumerate()
            .filter_map(|(k, c)| Some((PALETTE[k % PALETTE.len()], c.operating_point?)))
            .peekable();
        if dots.peek().is_some() {
            let dots: Vec<_> = dots.collect();
            chart.draw_series(
                dots.iter()
                    .map(|&(colour, p)| Circle::new(p, 6, colour.filled())),
            )?;
            chart
                .draw_series(
                    dots.iter()
                        .map(|&(_, p)| Circle::new(p, 6, BLACK.stroke_width(1))),
                )?
                .label("score ≥ 0.5")
                .legend(|(x, y)| Circle::new((x + 11, y), 5, BLACK.stroke_width(1)));
        }
        if all_empty {
            chart.plotting_area().draw(&Text::new(
                NO_TRUTH,
                (0.5, 0.5),
                font(18)
                    .color(&GREY)
                    .pos(Pos::new(HPos::Center, VPos::Center)),
            ))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.3))
            .label_font(font(14))
            .draw()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::super::font_file;
    use super::*;

    /// Copies a plot to the folder named by `ENDOFM_PLOT_EXAMPLES`, when set, to look at.
    fn keep_example(path: &Path) {
        if let Some(dir) = std::env::var_os("ENDOFM_PLOT_EXAMPLES") {
            let dir = Path::new(&dir);
            std::fs::create_dir_all(dir).unwrap();
            std::fs::copy(path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }

    /// `None` (and a printed reason) when no plot font is installed.
    fn font_or_skip(test: &str) -> Option<()> {
        match font_file() {
            Ok(_) => Some(()),
            Err(reason) => {
                println!("{test} skipped: {reason}");
                None
            }
        }
    }

    /// A plausible curve: precision falls from 1 as recall rises to `reach`.
    fn curve(name: &str, reach: f64, n: usize) -> PrCurve {
        let points = (1..=n)
            .map(|i| {
                let r = reach * i as f64 / n as f64;
                (r, 1.0 - 0.6 * r.powi(3))
            })
            .collect();
        PrCurve {
            name: name.into(),
            points,
            operating_point: Some((reach * 0.8, 1.0 - 0.6 * (reach * 0.8).powi(3))),
        }
    }

    fn count(path: &Path, colour: RGBColor) -> usize {
        let img = image::open(path).unwrap().to_rgb8();
        assert_eq!(
            img.dimensions(),
            (super::super::WIDTH, super::super::HEIGHT)
        );
        img.pixels()
            .filter(|p| p.0 == [colour.0, colour.1, colour.2])
            .count()
    }

    #[test]
    fn curves_and_operating_points_are_drawn() {
        let Some(()) = font_or_skip("curves_and_operating_points_are_drawn") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pr.png");
        let mut adenoma = curve("adenoma, AP50 0.84", 0.8, 25);
        for p in adenoma
            .points
            .iter_mut()
            .chain(&mut adenoma.operating_point)
        {
            p.1 = 1.0 - 0.7 * p.0.powi(2);
        }
        let curves = [curve("overall, AP50 0.91", 0.95, 40), adenoma];
        pr_curve(&curves, "Precision–recall: test split", &path).unwrap();
        assert!(count(&path, BLUE) > 300, "{}", count(&path, BLUE));
        assert!(count(&path, ORANGE) > 300, "{}", count(&path, ORANGE));
        assert!(!dir.path().join("pr.png.tmp").exists());
        keep_example(&path);
        // Without operating points fewer pixels are blue (the dot is gone).
        let bare: Vec<PrCurve> = curves
            .iter()
            .map(|c| PrCurve {
                operating_point: None,
                ..c.clone()
            })
            .collect();
        let path2 = dir.path().join("bare.png");
        pr_curve(&bare, "t", &path2).unwrap();
        assert!(
            count(&path2, BLUE) + 25 < count(&path, BLUE),
            "{} {}",
            count(&path2, BLUE),
            count(&path, BLUE)
        );
    }

    #[test]
    fn empty_curves_still_plot() {
        let Some(()) = font_or_skip("empty_curves_still_plot") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let empty = PrCurve {
            name: "hyperplastic".into(),
            points: vec![],
            operating_point: None,
        };
        let path = dir.path().join("some.png");
        pr_curve(&[curve("overall", 0.9, 10), empty.clone()], "t", &path).unwrap();
        assert!(count(&path, BLUE) > 100);
        keep_example(&path);
        let path = dir.path().join("none.png");
        pr_curve(&[empty.clone(), empty], "t", &path).unwrap();
        assert_eq!(count(&path, BLUE), 0);
        keep_example(&path);
        // A one-point curve is visible as a dot.
        let single = PrCurve {
            name: "one".into(),
            points: vec![(0.5, 1.0)],
            operating_point: None,
        };
        let path = dir.path().join("single.png");
        pr_curve(&[single], "t", &path).unwrap();
        assert!(count(&path, BLUE) > 10);
    }

    #[test]
    fn bad_curves_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let err = pr_curve(&[], "t", &path).unwrap_err();
        assert!(
            err.to_string().contains("no precision–recall curves"),
            "{err}"
        );
        let mut c = curve("adenoma", 0.9, 5);
        c.points[2].1 = f64::NAN;
        let err = pr_curve(&[c], "t", &path).unwrap_err();
        assert!(err.to_string().contains("curve `adenoma`"), "{err}");
        let mut c = curve("overall", 0.9, 5);
        c.operating_point = Some((1.2, 0.5));
        let err = pr_curve(&[c], "t", &path).unwrap_err();
        assert!(err.to_string().contains("recall 1.2"), "{err}");
        assert!(!path.exists());
    }
}
