//! Confusion-matrix heat map with counts in the cells and a summary beside it.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontTransform;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::font::font;
use super::{Area, DrawResult, HEAT, render};
use crate::eval::metrics::ConfusionMatrix;
use crate::{Error, Result};

/// Heat map of a confusion matrix: rows true classes, columns predicted, each cell shaded by
/// its share of the row (the class's recall on the diagonal) and labelled with its count and
/// that share. A panel beside it lists the sample count and accuracy, and for two classes
/// F1, precision, recall and specificity of class 1. `class_names` names classes `0..n`.
pub fn confusion_matrix(
    matrix: &ConfusionMatrix,
    class_names: &[String],
    title: &str,
    path: &Path,
) -> Result<()> {
    let n = matrix.n_classes();
    if class_names.len() != n {
        return Err(Error::Report {
            path: path.to_path_buf(),
            reason: format!(
                "{} class names for a {n}-class confusion matrix",
                class_names.len()
            ),
        });
    }
    render(path, title, |area| {
        let (w, h) = area.dim_in_pixel();
        let (w, h) = (w as i32, h as i32);
        // The grid: square, left of the summary panel, room for labels left and below.
        let label_size = if n <= 4 { 16 } else { 12 };
        let widest = class_names
            .iter()
            .map(|name| {
                area.estimate_text_size(name, &font(label_size))
                    .map(|(w, _)| w as i32)
            })
            .try_fold(0, |a, w| w.map(|w| a.max(w)))?;
        // Left of the grid: the rotated axis title, then the class names (at most 200 px).
        let (left, top, bottom_room) = (60 + widest.min(200), 24, 74);
        let side = (h - top - bottom_room).min(w - left - 320);
        let cell = side / n as i32;
        let side = cell * n as i32;
        for (t, row) in matrix.rows().iter().enumerate() {
            let support: u64 = row.iter().sum();
            for (p, &count) in row.iter().enumerate() {
                let share = if support > 0 {
                    count as f64 / support as f64
                } else {
                    0.0
                };
                let (x, y) = (left + p as i32 * cell, top + t as i32 * cell);
                area.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    heat(share).filled(),
                ))?;
                area.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    WHITE.stroke_width(2),
                ))?;
                let ink = if share > 0.5 { WHITE } else { BLACK };
                let (cx, cy) = (x + cell / 2, y + cell / 2);
                // Even sizes: plotters places glyphs at size / 2 from the baseline, and an odd size
                // rounds digits and points half a pixel apart.
                let count_size = (cell / 5).clamp(12, 30) as u32 & !1;
                area.draw(&Text::new(
                    count.to_string(),
                    (cx, cy - count_size as i32 / 3),
                    font(count_size)
                        .color(&ink)
                        .pos(Pos::new(HPos::Center, VPos::Center)),
                ))?;
                area.draw(&Text::new(
                    format!("{:.1} % of row", 100.0 * share),
                    (cx, cy + count_size as i32 * 2 / 3),
                    font((count_size / 2).max(10) & !1)
                        .color(&ink)
                        .pos(Pos::new(HPos::Center, VPos::Center)),
                ))?;
            }
        }
        // Column names shrink when the widest does not fit its cell.
        let column_size = if widest <= cell - 8 { label_size } else { 12 };
        for (i, name) in class_names.iter().enumerate() {
            let mid = i as i32 * cell + cell / 2;
            area.draw(&Text::new(
                name.clone(),
                (left - 10, top + mid),
                font(label_size).pos(Pos::new(HPos::Right, VPos::Center)),
            ))?;
            area.draw(&Text::new(
                name.clone(),
                (left + mid, top + side + 10),
                font(column_size).pos(Pos::new(HPos::Center, VPos::Top)),
            ))?;
        }
        area.draw(&Text::new(
            "predicted class",
            (left + side / 2, top + side + 44),
            font(16).pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
        area.draw(&Text::new(
            "true class",
            (28, top + side / 2),
            font(16)
                .transform(FontTransform::Rotate270)
                .pos(Pos::new(HPos::Center, VPos::Center)),
        ))?;
        colour_bar(area, (left + side + 24, top), side)?;
        summary(area, matrix, class_names, (left + side + 100, top + 10))
    })
}

/// White → [`HEAT`] as `share` goes 0 → 1.
fn heat(share: f64) -> RGBColor {
    let mix = |c: u8| (255.0 - (255.0 - f64::from(c)) * share.clamp(0.0, 1.0)).round() as u8;
    RGBColor(mix(HEAT.0), mix(HEAT.1), mix(HEAT.2))
}

/// A vertical scale of the heat colours, 100 % at the top, `height` pixels tall.
fn colour_bar(area: &Area, (x, y): (i32, i32), height: i32) -> DrawResult {
    let width = 16;
    for i in 0..height {
        let share = 1.0 - f64::from(i) / f64::from(height.max(1));
        area.draw(&Rectangle::new(
            [(x, y + i), (x + width, y + i + 1)],
            heat(share).filled(),
        ))?;
    }
    area.draw(&Rectangle::new(
        [(x, y), (x + width, y + height)],
        BLACK.mix(0.4).stroke_width(1),
    ))?;
    for (share, text) in [(1.0, "100 %"), (0.5, "50 %"), (0.0, "0 %")] {
        let ty = y + ((1.0 - share) * f64::from(height)) as i32;
        area.draw(&Text::new(
            text,
            (x + width + 5, ty),
            font(12).pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    Ok(())
}

/// The numbers beside the heat map.
fn summary(
    area: &Area,
    m: &ConfusionMatrix,
    class_names: &[String],
    (x, y): (i32, i32),
) -> DrawResult {
    let mut lines = vec![format!("samples: {}", m.total())];
    if let Some(acc) = m.accuracy() {
        lines.push(format!("accuracy: {acc:.3}"));
    }
    if m.n_classes() == 2 {
        let [tn, fp, fn_, tp] = [(0, 0), (0, 1), (1, 0), (1, 1)].map(|(t, p)| m.count(t, p) as f64);
        let or_zero = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        lines.push(String::new());
        lines.push(format!("positive class: {}", class_names[1]));
        lines.push(format!(
            "    F1: {:.3}",
            or_zero(2.0 * tp, 2.0 * tp + fp + fn_)
        ));
        lines.push(format!("    precision: {:.3}", or_zero(tp, tp + fp)));
        lines.push(format!("    recall: {:.3}", or_zero(tp, tp + fn_)));
        lines.push(format!("    specificity: {:.3}", or_zero(tn, tn + fp)));
    }
    for (i, line) in lines.into_iter().enumerate() {
        area.draw(&Text::new(
            line,
            (x, y + 24 * i as i32),
            font(16).pos(Pos::new(HPos::Left, VPos::Top)),
        ))?;
    }
    Ok(())
}
