//! A grid of sample frames with the predicted mask (green tint) and the true mask's outline
//! (yellow) drawn over them, each captioned, for segmentation reports.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::font::font;
use super::{HEIGHT, WIDTH, render};
use crate::{Error, Result};

/// One frame of the grid.
#[derive(Debug, Clone)]
pub struct OverlaySample {
    /// Caption (sequence, frame, its Dice).
    pub caption: String,
    /// RGB pixels, `side × side × 3`.
    pub rgb: Vec<u8>,
    /// Predicted mask, `side × side`, non-zero = polyp.
    pub predicted: Vec<u8>,
    /// True mask, `side × side`, non-zero = polyp.
    pub truth: Vec<u8>,
    /// Frame side in pixels.
    pub side: usize,
}

const GREEN: (f64, f64, f64) = (0.0, 200.0, 80.0);
const YELLOW: RGBColor = RGBColor(255, 220, 0);

/// The colour of pixel (x, y) of `s`: the frame, tinted green where predicted, yellow on the
/// true mask's boundary (a polyp pixel with a background 4-neighbour or at the frame's edge).
fn pixel(s: &OverlaySample, x: usize, y: usize) -> RGBColor {
    let n = s.side;
    let i = y * n + x;
    let truth = |x: usize, y: usize| s.truth[y * n + x] != 0;
    if truth(x, y) {
        let edge = x == 0
            || y == 0
            || x + 1 == n
            || y + 1 == n
            || !truth(x - 1, y)
            || !truth(x + 1, y)
            || !truth(x, y - 1)
            || !truth(x, y + 1);
        if edge {
            return YELLOW;
        }
    }
    let (r, g, b) = (
        f64::from(s.rgb[3 * i]),
        f64::from(s.rgb[3 * i + 1]),
        f64::from(s.rgb[3 * i + 2]),
    );
    if s.predicted[i] != 0 {
        let mix = |a: f64, c: f64| (0.55 * a + 0.45 * c).round() as u8;
        RGBColor(mix(r, GREEN.0), mix(g, GREEN.1), mix(b, GREEN.2))
    } else {
        RGBColor(r as u8, g as u8, b as u8)
    }
}

/// Draws up to 8 samples in a 4 × 2 grid (each scaled to fit its cell, nearest) with a legend,
/// as an 800×500 PNG at `path`.
pub fn mask_grid(samples: &[OverlaySample], title: &str, path: &Path) -> Result<()> {
    if samples.is_empty() {
        return Err(Error::Report {
            path: path.to_path_buf(),
            reason: "no samples to draw".into(),
        });
    }
    for s in samples {
        let n = s.side * s.side;
        if s.rgb.len() != 3 * n || s.predicted.len() != n || s.truth.len() != n {
            return Err(Error::Report {
                path: path.to_path_buf(),
                reason: format!("sample `{}` has buffers of the wrong size", s.caption),
            });
        }
    }
    render(path, title, |area| {
        let cols = 4i32;
        let rows = (samples.len().min(8) as i32 + cols - 1) / cols;
        let legend = 30;
        let cell_w = WIDTH as i32 / cols;
        let cell_h = (HEIGHT as i32 - 46 - legend) / rows;
        let caption = 18;
        let tile = (cell_w - 12).min(cell_h - caption - 6).max(8);
        for (k, s) in samples.iter().take((cols * rows) as usize).enumerate() {
            let (c, r) = (k as i32 % cols, k as i32 / cols);
            let x0 = c * cell_w + (cell_w - tile) / 2;
            let y0 = r * cell_h + 2;
            for ty in 0..tile {
                let sy = (ty as usize * s.side) / tile as usize;
                for tx in 0..tile {
                    let sx = (tx as usize * s.side) / tile as usize;
                    area.draw_pixel((x0 + tx, y0 + ty), &pixel(s, sx, sy))?;
                }
            }
            area.draw(&Text::new(
                s.caption.clone(),
                (c * cell_w + cell_w / 2, y0 + tile + 10),
                font(12).pos(Pos::new(HPos::Center, VPos::Center)),
            ))?;
        }
        let y = rows * cell_h + legend / 2;
        area.draw(&Rectangle::new(
            [(200, y - 6), (214, y + 6)],
            RGBColor(0, 200, 80).filled(),
        ))?;
        area.draw(&Text::new(
            "predicted polyp",
            (220, y),
            font(14).pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
        area.draw(&Rectangle::new(
            [(420, y - 6), (434, y + 6)],
            YELLOW.filled(),
        ))?;
        area.draw(&Text::new(
            "true mask outline",
            (440, y),
            font(14).pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
        Ok(())
    })
}
