//! Values per training step in stacked panels sharing the step axis (pre-training's loss,
//! collapse diagnostics, probe accuracy and schedules).

use std::path::Path;

use plotters::prelude::*;

use super::font::font;
use super::{BLUE, GREY, ORANGE, RED, render};
use crate::{Error, Result};

/// One line of a panel.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// (step, value) points in step order; non-finite values are left out.
    pub points: Vec<(f64, f64)>,
    /// Draw a marker at every point (sparse series such as probe accuracy).
    pub markers: bool,
}

/// One panel: its y-axis text, its lines and horizontal reference lines (label, value).
#[derive(Debug, Clone)]
pub struct Panel {
    /// The y-axis description.
    pub y_desc: String,
    /// Up to three lines (blue, orange, grey).
    pub series: Vec<Series>,
    /// Dashed red reference lines, e.g. ln K.
    pub references: Vec<(String, f64)>,
    /// Where the legend sits (away from the data).
    pub legend: Corner,
    /// A fixed y range (e.g. 0..1 for an accuracy); `None`: the data's, padded.
    pub y_range: Option<(f64, f64)>,
}

/// A corner of a panel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Corner {
    /// Upper right.
    #[default]
    UpperRight,
    /// Lower right.
    LowerRight,
    /// Upper left.
    UpperLeft,
    /// Lower left.
    LowerLeft,
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.08
    } else {
        (hi.abs() * 0.01).max(1e-9)
    };
    (lo - pad, hi + pad)
}

/// Tick labels that stay short for values from 1e-6 to 1e4.
fn tick(y: f64, span: f64) -> String {
    if y == 0.0 {
        "0".into()
    } else if y.abs() < 1e-2 || y.abs() >= 1e4 {
        format!("{y:.1e}")
    } else if span < 0.05 {
        format!("{y:.4}")
    } else {
        format!("{y:.2}")
    }
}

/// Draws `panels` stacked top to bottom over the step axis (labelled `x_desc` under the last)
/// with `title`, as an 800×500 PNG at `path`. Every panel needs at least one point or
/// reference; an error names the file otherwise.
pub fn step_panels(title: &str, x_desc: &str, panels: &[Panel], path: &Path) -> Result<()> {
    let xs: Vec<f64> = panels
        .iter()
        .flat_map(|p| p.series.iter().flat_map(|s| s.points.iter().map(|q| q.0)))
        .collect();
    if panels.is_empty() || xs.is_empty() {
        return Err(Error::Report {
            path: path.to_path_buf(),
            reason: "nothing to plot".into(),
        });
    }
    let x0 = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let x1 = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let pad = ((x1 - x0) * 0.02).max(0.5);
    let x_range = (x0 - pad)..(x1 + pad);
    render(path, title, |area| {
        let rows = area.split_evenly((panels.len(), 1));
        for (i, (panel, p)) in rows.iter().zip(panels).enumerate() {
            let last = i + 1 == panels.len();
            let values = p
                .series
                .iter()
                .flat_map(|s| s.points.iter().map(|q| q.1))
                .chain(p.references.iter().map(|r| r.1))
                .filter(|v| v.is_finite());
            let (y0, y1) = p.y_range.unwrap_or_else(|| range(values));
            let mut chart = ChartBuilder::on(panel)
                .margin_left(12)
                .margin_right(24)
                .margin_top(6)
                .x_label_area_size(if last { 44 } else { 20 })
                .y_label_area_size(84)
                .build_cartesian_2d(x_range.clone(), y0..y1)?;
            let fmt = |y: &f64| tick(*y, y1 - y0);
            let step_fmt = |x: &f64| {
                if (x - x.round()).abs() < 1e-6 && *x >= 0.0 {
                    format!("{:.0}", x.round())
                } else {
                    String::new()
                }
            };
            let mut mesh = chart.configure_mesh();
            mesh.x_labels(10)
                .x_label_formatter(&step_fmt)
                .y_labels(4)
                .y_label_formatter(&fmt)
                .y_desc(p.y_desc.as_str())
                .label_style(font(13))
                .axis_desc_style(font(14))
                .bold_line_style(BLACK.mix(0.10))
                .light_line_style(TRANSPARENT);
            if last {
                mesh.x_desc(x_desc);
            }
            mesh.draw()?;
            for (j, s) in p.series.iter().enumerate() {
                let colour = [BLUE, ORANGE, GREY][j % 3];
                let points: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|q| q.1.is_finite())
                    .collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
                    .label(s.name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 22, y)], colour.stroke_width(2))
                    });
                if s.markers || points.len() == 1 {
                    chart
                        .draw_series(points.iter().map(|&q| Circle::new(q, 4, colour.filled())))?;
                }
            }
            for (label, value) in &p.references {
                chart
                    .draw_series(DashedLineSeries::new(
                        [(x_range.start, *value), (x_range.end, *value)],
                        6,
                        4,
                        RED.stroke_width(1),
                    ))?
                    .label(label.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 22, y)], RED.stroke_width(1))
                    });
            }
            chart
                .configure_series_labels()
                .position(match p.legend {
                    Corner::UpperRight => SeriesLabelPosition::UpperRight,
                    Corner::LowerRight => SeriesLabelPosition::LowerRight,
                    Corner::UpperLeft => SeriesLabelPosition::UpperLeft,
                    Corner::LowerLeft => SeriesLabelPosition::LowerLeft,
                })
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .label_font(font(12))
                .draw()?;
        }
        Ok(())
    })
}
