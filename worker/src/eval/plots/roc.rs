//! ROC curve with the chance diagonal.

use std::path::Path;

use plotters::prelude::*;

use super::font::font;
use super::{BLUE, GREY, render};
use crate::eval::metrics::RocPoint;
use crate::{Error, Result};

/// A ROC curve (false-positive rate against true-positive rate) with the chance diagonal;
/// the area under it, when given, goes in the legend and the title.
pub fn roc_curve(points: &[RocPoint], auc: Option<f64>, title: &str, path: &Path) -> Result<()> {
    if points.is_empty() {
        return Err(Error::Report {
            path: path.to_path_buf(),
            reason: "no ROC points to plot".into(),
        });
    }
    let title = match auc {
        Some(a) => format!("{title} (AUC {a:.3})"),
        None => title.to_string(),
    };
    let curve: Vec<(f64, f64)> = points.iter().map(|p| (p.fpr, p.tpr)).collect();
    render(path, &title, |area| {
        // A square plotting area, centred.
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
            .build_cartesian_2d(0.0..1.0f64, 0.0..1.0f64)?;
        chart
            .configure_mesh()
            .x_labels(6)
            .y_labels(6)
            .x_label_formatter(&|v| format!("{v:.1}"))
            .y_label_formatter(&|v| format!("{v:.1}"))
            .x_desc("false-positive rate (1 − specificity)")
            .y_desc("true-positive rate (recall)")
            .label_style(font(14))
            .axis_desc_style(font(16))
            .bold_line_style(BLACK.mix(0.10))
            .light_line_style(TRANSPARENT)
            .draw()?;
        chart.draw_series(AreaSeries::new(curve.iter().copied(), 0.0, BLUE.mix(0.12)))?;
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, 0.0), (1.0, 1.0)],
                6,
                5,
                GREY.stroke_width(1),
            ))?
            .label("chance (AUC 0.5)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 22, y)], GREY.stroke_width(1)));
        let label = match auc {
            Some(a) => format!("ROC (AUC {a:.3})"),
            None => "ROC".to_string(),
        };
        chart
            .draw_series(LineSeries::new(curve.iter().copied(), BLUE.stroke_width(2)))?
            .label(label)
            .legend(|(x, y)| PathElement::new([(x, y), (x + 22, y)], BLUE.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.3))
            .label_font(font(14))
            .draw()?;
        Ok(())
    })
}
