//! Training loss and validation metric per epoch, two panels sharing the epoch axis.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::font::font;
use super::{BLUE, GREY, ORANGE, RED, metric_label, render};
use crate::eval::report::EpochRecord;
use crate::{Error, Result};

/// `[lo, hi]` padded by 8 % (at least ±0.05 for a flat series), starting at 0 when every
/// value is non-negative and the span reaches down near 0.
fn value_range(values: &[f64], unit_interval: bool) -> (f64, f64) {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if unit_interval && lo >= 0.0 && hi <= 1.0 {
        return (0.0, 1.04);
    }
    let pad = ((hi - lo) * 0.08).max(0.05);
    let bottom = if lo >= 0.0 && lo - pad <= (hi - lo) {
        0.0
    } else {
        lo - pad
    };
    (bottom, hi + pad)
}

/// Training loss (top panel) and validation `metric` (bottom panel) per epoch, the `chosen`
/// epoch marked in both. Epochs without a loss or without the metric are left out of their
/// panel; at least one epoch is needed.
pub fn training_curves(
    history: &[EpochRecord],
    metric: &str,
    chosen: Option<usize>,
    path: &Path,
) -> Result<()> {
    let (Some(first), Some(last)) = (
        history.iter().map(|r| r.epoch).min(),
        history.iter().map(|r| r.epoch).max(),
    ) else {
        return Err(Error::Report {
            path: path.to_path_buf(),
            reason: "the history has no epochs to plot".into(),
        });
    };
    let label = metric_label(metric);
    let losses: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|r| {
            r.train_loss_mean
                .filter(|l| l.is_finite())
                .map(|l| (r.epoch as f64, l))
        })
        .collect();
    let scores: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|r| {
            r.val
                .get(metric)
                .filter(|v| v.is_finite())
                .map(|&v| (r.epoch as f64, v))
        })
        .collect();
    let x_range = (first as f64 - 0.5)..(last as f64 + 0.5);
    let epochs = last - first + 1;
    let title = format!("Fine-tuning: training loss and validation {label} per epoch");
    render(path, &title, |area| {
        let (top, bottom) = area.split_vertically(area.dim_in_pixel().1 / 2);
        let panels = [
            (&top, &losses, "train loss (epoch mean)", BLUE, false),
            (
                &bottom,
                &scores,
                &*format!("validation {label}"),
                ORANGE,
                true,
            ),
        ];
        for (panel, points, name, colour, is_metric) in panels {
            let values: Vec<f64> = points.iter().map(|p| p.1).collect();
            let (y0, y1) = if values.is_empty() {
                (0.0, 1.0)
            } else {
                value_range(&values, is_metric)
            };
            // Enough decimals that the ticks differ.
            let decimals = if y1 - y0 < 0.2 { 3 } else { 2 };
            let mut chart = ChartBuilder::on(panel)
                .margin_left(12)
                .margin_right(24)
                .margin_top(if is_metric { 16 } else { 6 })
                .x_label_area_size(if is_metric { 44 } else { 24 })
                .y_label_area_size(72)
                .build_cartesian_2d(x_range.clone(), y0..y1)?;
            let y_format = |y: &f64| format!("{y:.decimals$}");
            let mut mesh = chart.configure_mesh();
            mesh.x_labels((epochs + 1).min(12))
                .x_label_formatter(&|x| integer_label(*x))
                .y_labels(if is_metric { 6 } else { 5 })
                .y_label_formatter(&y_format)
                .y_desc(name)
                .label_style(font(14))
                .axis_desc_style(font(16))
                .bold_line_style(BLACK.mix(0.10))
                .light_line_style(TRANSPARENT);
            if is_metric {
                mesh.x_desc("epoch");
            }
            mesh.draw()?;
            if values.is_empty() {
                chart.plotting_area().draw(&Text::new(
                    format!("no {name} recorded"),
                    ((x_range.start + x_range.end) / 2.0, (y0 + y1) / 2.0),
                    font(16)
                        .color(&GREY)
                        .pos(Pos::new(HPos::Center, VPos::Center)),
                ))?;
                continue;
            }
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(2),
                ))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 22, y)], colour.stroke_width(2))
                });
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
            if let Some(epoch) = chosen {
                let x = epoch as f64;
                let line = chart.draw_series(DashedLineSeries::new(
                    [(x, y0), (x, y1)],
                    6,
                    4,
                    RED.stroke_width(2),
                ))?;
                if !is_metric {
                    line.label(format!("chosen epoch ({epoch})"))
                        .legend(move |(x, y)| {
                            PathElement::new([(x, y), (x + 22, y)], RED.stroke_width(2))
                        });
                }
                if is_metric && let Some(&(_, v)) = points.iter().find(|p| p.0 == x) {
                    chart
                        .draw_series([Circle::new((x, v), 6, RED.stroke_width(2))])?
                        .label(format!("chosen: epoch {epoch} ({label} {v:.3})"))
                        .legend(move |(x, y)| Circle::new((x + 11, y), 5, RED.stroke_width(2)));
                }
            }
            chart
                .configure_series_labels()
                .position(if is_metric {
                    SeriesLabelPosition::LowerRight
                } else {
                    SeriesLabelPosition::UpperRight
                })
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK.mix(0.3))
                .label_font(font(14))
                .draw()?;
        }
        Ok(())
    })
}

/// The tick label of an epoch axis: whole numbers only.
fn integer_label(x: f64) -> String {
    if (x - x.round()).abs() < 1e-6 {
        format!("{:.0}", x.round())
    } else {
        String::new()
    }
}
