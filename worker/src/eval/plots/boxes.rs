//! Bounding boxes over frames, for detection: a report grid of sample frames with true boxes
//! (yellow outlines) and predicted boxes (green outlines labelled "class score")
//! ([`box_grid`]), and drawing onto a frame buffer for the annotated prediction video
//! ([`draw_boxes`]: outlines only, no font; [`annotate_frame`]: outlines and labels).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::font::font;
use super::{Area, DrawResult, HEIGHT, WIDTH, font_file, render};
use crate::{Error, Result};

/// Colour of predicted boxes and their labels' background.
pub const PREDICTED_COLOUR: [u8; 3] = [0, 200, 80];
/// Colour of true boxes.
pub const TRUTH_COLOUR: [u8; 3] = [255, 220, 0];

/// One box to draw.
#[derive(Debug, Clone, PartialEq)]
pub struct DrawBox {
    /// `[x1, y1, x2, y2]` in pixels of the frame it belongs to: continuous coordinates with 0
    /// at the frame's left/top edge, so the box covers the pixel columns `floor(x1)` to
    /// `ceil(x2) - 1` (and likewise rows). Non-finite or empty/inverted boxes (`x2 <= x1` or
    /// `y2 <= y1`) are skipped when drawing.
    pub xyxy: [f64; 4],
    /// Class name, e.g. `adenoma`; empty for none.
    pub label: String,
    /// Detection score in [0, 1]; `None` for true boxes.
    pub score: Option<f64>,
}

impl DrawBox {
    /// The text drawn beside a predicted box: `"adenoma 0.87"`, the label or the score alone,
    /// or `None` when there is neither.
    pub fn caption(&self) -> Option<String> {
        match (self.label.is_empty(), self.score) {
            (true, None) => None,
            (true, Some(s)) => Some(format!("{s:.2}")),
            (false, None) => Some(self.label.clone()),
            (false, Some(s)) => Some(format!("{} {s:.2}", self.label)),
        }
    }
}

/// One frame of [`box_grid`].
#[derive(Debug, Clone)]
pub struct BoxSample {
    /// Caption under the frame (video, frame index, what was found).
    pub caption: String,
    /// RGB pixels, row-major, `height × width × 3`.
    pub rgb: Vec<u8>,
    /// Frame width, pixels.
    pub width: usize,
    /// Frame height, pixels.
    pub height: usize,
    /// True boxes (drawn yellow), in pixels of this frame.
    pub truth: Vec<DrawBox>,
    /// Predicted boxes (drawn green, labelled with [`DrawBox::caption`]), in pixels of this
    /// frame.
    pub predicted: Vec<DrawBox>,
}

/// Checks that `len` bytes hold a `width × height` RGB frame; the error names `what`.
fn check_frame(what: &str, len: usize, width: usize, height: usize) -> Result<()> {
    let expected = width.checked_mul(height).and_then(|n| n.checked_mul(3));
    match expected {
        Some(n) if n == len && n > 0 => Ok(()),
        _ => Err(Error::Input {
            name: what.to_string(),
            reason: format!(
                "{len} bytes of RGB for a {width}×{height} frame (expected {})",
                expected.map_or_else(|| "a smaller frame".to_string(), |n| n.to_string())
            ),
        }),
    }
}

/// The pixel rows and columns a box covers, inclusive and not yet clipped:
/// `(left, top, right, bottom)`; `None` for a non-finite or empty box.
fn covered(xyxy: [f64; 4]) -> Option<(i64, i64, i64, i64)> {
    let [x1, y1, x2, y2] = xyxy;
    if !xyxy.iter().all(|v| v.is_finite()) || x2 <= x1 || y2 <= y1 {
        return None;
    }
    // `as` saturates, so boxes far outside the frame stay harmless.
    let (left, top) = (x1.floor() as i64, y1.floor() as i64);
    let (right, bottom) = (
        (x2.ceil() as i64).saturating_sub(1),
        (y2.ceil() as i64).saturating_sub(1),
    );
    Some((left, top, right.max(left), bottom.max(top)))
}

/// Draws the outline of each box on an RGB frame (row-major, `height × width × 3`) in
/// `colour`, `thickness` pixels wide (at least 1) inside the box's edges, clipped to the
/// frame. Boxes with non-finite coordinates or `x2 <= x1` / `y2 <= y1` are skipped. Pure
/// pixel drawing: no font needed. Errors when `rgb` does not hold `width × height` pixels.
pub fn draw_boxes(
    rgb: &mut [u8],
    width: usize,
    height: usize,
    boxes: &[DrawBox],
    colour: [u8; 3],
    thickness: usize,
) -> Result<()> {
    check_frame("frame to draw boxes on", rgb.len(), width, height)?;
    let (w, h) = (width as i64, height as i64);
    let t = thickness.max(1) as i64;
    let mut fill = |x0: i64, y0: i64, x1: i64, y1: i64| {
        let (x0, x1) = (x0.max(0), x1.min(w - 1));
        let (y0, y1) = (y0.max(0), y1.min(h - 1));
        for y in y0..=y1 {
            for x in x0..=x1 {
                let i = 3 * (y as usize * width + x as usize);
                rgb[i..i + 3].copy_from_slice(&colour);
            }
        }
    };
    let mut skipped = 0usize;
    for b in boxes {
        let Some((l, t0, r, b0)) = covered(b.xyxy) else {
            skipped += 1;
            continue;
        };
        if r < 0 || b0 < 0 || l >= w || t0 >= h {
            continue;
        }
        // Each band stays inside the box, however thick.
        fill(l, t0, r, (t0 + t - 1).min(b0)); // top
        fill(l, (b0 - t + 1).max(t0), r, b0); // bottom
        fill(l, t0, (l + t - 1).min(r), b0); // left
        fill((r - t + 1).max(l), t0, r, b0); // right
    }
    if skipped > 0 {
        tracing::debug!(
            skipped,
            "boxes with non-finite or inverted coordinates not drawn"
        );
    }
    Ok(())
}

/// Draws `text` (black on a filled [`PREDICTED_COLOUR`] background) at the top-left corner
/// `(bx, by)` of a box, in area coordinates: above the box when there is room below `top`,
/// else just inside its top edge; kept within `[left, right)` horizontally.
fn draw_label(
    area: &Area,
    text: &str,
    size: u32,
    (bx, by): (i32, i32),
    (left, top, right): (i32, i32, i32),
) -> DrawResult {
    let style = font(size);
    let (tw, th) = area.estimate_text_size(text, &style)?;
    let (tw, th) = (tw as i32 + 6, th as i32 + 4);
    let x = bx.min(right - tw).max(left);
    let y = if by - th >= top { by - th } else { by };
    let [r, g, b] = PREDICTED_COLOUR;
    area.draw(&Rectangle::new(
        [(x, y), (x + tw, y + th)],
        RGBColor(r, g, b).filled(),
    ))?;
    area.draw(&Text::new(
        text.to_string(),
        (x + 3, y + th / 2),
        style.color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center)),
    ))?;
    Ok(())
}

/// Draws the true boxes (yellow) and the predicted boxes (green, each labelled "class score"
/// in black on green above its top-left corner) on an RGB frame (row-major,
/// `height × width × 3`), for the annotated prediction video. Outlines are
/// `max(2, min(width, height) / 200)` pixels wide; text is `clamp(height / 30, 9, 28)` pixels
/// high. Errors when `rgb` does not hold `width × height` pixels, or when a box has a label
/// and no font is installed (the error says what to install).
pub fn annotate_frame(
    rgb: &mut [u8],
    width: usize,
    height: usize,
    truth: &[DrawBox],
    predicted: &[DrawBox],
) -> Result<()> {
    let what = "annotated frame";
    check_frame(what, rgb.len(), width, height)?;
    let thickness = (width.min(height) / 200).max(2);
    draw_boxes(rgb, width, height, truth, TRUTH_COLOUR, thickness)?;
    draw_boxes(rgb, width, height, predicted, PREDICTED_COLOUR, thickness)?;
    let labels: Vec<((i32, i32), String)> = predicted
        .iter()
        .filter_map(|b| {
            let (l, t, _, _) = covered(b.xyxy)?;
            let corner = (
                l.clamp(0, width as i64) as i32,
                t.clamp(0, height as i64) as i32,
            );
            Some((corner, b.caption()?))
        })
        .collect();
    if labels.is_empty() {
        return Ok(());
    }
    let fail = |reason: String| Error::Input {
        name: what.to_string(),
        reason,
    };
    font_file().map_err(|reason| fail(reason.to_string()))?;
    let (w, h) = match (u32::try_from(width), u32::try_from(height)) {
        (Ok(w), Ok(h)) => (w, h),
        _ => {
            return Err(fail(format!(
                "{width}×{height} is too large to draw text on"
            )));
        }
    };
    let size = (h / 30).clamp(9, 28);
    let drawn: DrawResult = (|| {
        let backend: BitMapBackend = BitMapBackend::with_buffer_and_format(rgb, (w, h))?;
        let area = backend.into_drawing_area();
        for (corner, text) in &labels {
            draw_label(&area, text, size, *corner, (0, 0, w as i32))?;
        }
        area.present()?;
        Ok(())
    })();
    drawn.map_err(|e| fail(format!("drawing box labels: {e}")))
}

/// Where a sample goes in [`box_grid`]'s body area (below the title): the frame's
/// top-left corner, its scaled size and the cell's caption line, all in body pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tile {
    x0: i32,
    y0: i32,
    w: i32,
    h: i32,
    caption_y: i32,
    cell_x: i32,
    cell_w: i32,
}

const COLS: i32 = 4;
const LEGEND: i32 = 30;
const TITLE: i32 = 46;
/// Cell height: two rows fill the body above the legend; a single row is as high.
const CELL_H: i32 = (HEIGHT as i32 - TITLE - LEGEND) / 2;

fn rows(n: usize) -> i32 {
    (n.min(8) as i32 + COLS - 1) / COLS
}

/// Where sample `k` goes (its frame `width × height`).
fn tile(k: usize, width: usize, height: usize) -> Tile {
    let (cell_w, cell_h) = (WIDTH as i32 / COLS, CELL_H);
    let caption = 18;
    // The box the frame is fitted into, aspect kept.
    let (fit_w, fit_h) = ((cell_w - 12).max(8), (cell_h - caption - 6).max(8));
    let scale = (f64::from(fit_w) / width as f64).min(f64::from(fit_h) / height as f64);
    let w = ((width as f64 * scale).round() as i32).clamp(1, fit_w);
    let h = ((height as f64 * scale).round() as i32).clamp(1, fit_h);
    let (c, r) = (k as i32 % COLS, k as i32 / COLS);
    let top = r * cell_h + 2;
    Tile {
        x0: c * cell_w + (cell_w - w) / 2,
        // Frames sit on their caption, whatever their aspect.
        y0: top + fit_h - h,
        w,
        h,
        caption_y: top + fit_h + 10,
        cell_x: c * cell_w,
        cell_w,
    }
}

/// Scales a frame's box by `sx` horizontally and `sy` vertically (frame → tile pixels).
fn scale_box(b: &DrawBox, sx: f64, sy: f64) -> DrawBox {
    let [x1, y1, x2, y2] = b.xyxy;
    DrawBox {
        xyxy: [x1 * sx, y1 * sy, x2 * sx, y2 * sy],
        ..b.clone()
    }
}

/// Draws up to 8 frames in a 4 × 2 grid (each scaled to fit its cell with its aspect kept,
/// nearest-neighbour) with their true boxes as yellow outlines and predicted boxes as green
/// outlines (2 px in the grid, whatever the scale) labelled "class score", a caption under
/// each and a legend, as an 800×500 PNG at `path`. Errors: no samples, a sample whose `rgb`
/// does not hold `width × height` pixels (named by its caption), no font.
pub fn box_grid(samples: &[BoxSample], title: &str, path: &Path) -> Result<()> {
    let fail = |reason: String| Error::Report {
        path: path.to_path_buf(),
        reason,
    };
    if samples.is_empty() {
        return Err(fail("no samples to draw".into()));
    }
    for s in samples {
        check_frame(&s.caption, s.rgb.len(), s.width, s.height)
            .map_err(|e| fail(format!("sample `{}`: {e}", s.caption)))?;
    }
    let shown = &samples[..samples.len().min(8)];
    // Each frame scaled into its tile with the boxes drawn on it.
    let mut tiles = Vec::with_capacity(shown.len());
    for (k, s) in shown.iter().enumerate() {
        let t = tile(k, s.width, s.height);
        let (tw, th) = (t.w as usize, t.h as usize);
        let mut px = vec![0u8; tw * th * 3];
        for ty in 0..th {
            let sy = ty * s.height / th;
            for tx in 0..tw {
                let sx = tx * s.width / tw;
                let (i, j) = (3 * (ty * tw + tx), 3 * (sy * s.width + sx));
                px[i..i + 3].copy_from_slice(&s.rgb[j..j + 3]);
            }
        }
        let (fx, fy) = (tw as f64 / s.width as f64, th as f64 / s.height as f64);
        let truth: Vec<DrawBox> = s.truth.iter().map(|b| scale_box(b, fx, fy)).collect();
        let predicted: Vec<DrawBox> = s.predicted.iter().map(|b| scale_box(b, fx, fy)).collect();
        draw_boxes(&mut px, tw, th, &truth, TRUTH_COLOUR, 2)?;
        draw_boxes(&mut px, tw, th, &predicted, PREDICTED_COLOUR, 2)?;
        tiles.push((t, px, predicted));
    }
    render(path, title, |area| {
        for ((t, px, predicted), s) in tiles.iter().zip(shown) {
            for ty in 0..t.h {
                for tx in 0..t.w {
                    let i = 3 * (ty * t.w + tx) as usize;
                    let c = RGBColor(px[i], px[i + 1], px[i + 2]);
                    area.draw_pixel((t.x0 + tx, t.y0 + ty), &c)?;
                }
            }
            for b in predicted {
                if let (Some((l, top, _, _)), Some(text)) = (covered(b.xyxy), b.caption()) {
                    let corner = (
                        t.x0 + l.clamp(0, i64::from(t.w)) as i32,
                        t.y0 + top.clamp(0, i64::from(t.h)) as i32,
                    );
                    draw_label(area, &text, 11, corner, (t.x0, t.y0, t.x0 + t.w))?;
                }
            }
            area.draw(&Text::new(
                s.caption.clone(),
                (t.cell_x + t.cell_w / 2, t.caption_y),
                font(12).pos(Pos::new(HPos::Center, VPos::Center)),
            ))?;
        }
        let y = rows(shown.len()) * CELL_H + LEGEND / 2;
        for (x, [r, g, b], text) in [
            (190, PREDICTED_COLOUR, "predicted box (class, score)"),
            (470, TRUTH_COLOUR, "true box"),
        ] {
            area.draw(&Rectangle::new(
                [(x, y - 6), (x + 14, y + 6)],
                RGBColor(r, g, b).stroke_width(3),
            ))?;
            area.draw(&Text::new(
                text,
                (x + 22, y),
                font(14).pos(Pos::new(HPos::Left, VPos::Center)),
            ))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bx(xyxy: [f64; 4]) -> DrawBox {
        DrawBox {
            xyxy,
            label: String::new(),
            score: None,
        }
    }

    const C: [u8; 3] = [10, 200, 30];

    fn at(rgb: &[u8], width: usize, x: usize, y: usize) -> [u8; 3] {
        let i = 3 * (y * width + x);
        [rgb[i], rgb[i + 1], rgb[i + 2]]
    }

    fn coloured(rgb: &[u8]) -> usize {
        rgb.chunks(3).filter(|p| *p != [0, 0, 0]).count()
    }

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

    #[test]
    fn outline_on_edges_not_inside() {
        let (w, h) = (20, 16);
        let mut rgb = vec![0u8; w * h * 3];
        draw_boxes(&mut rgb, w, h, &[bx([4.0, 3.0, 14.0, 12.0])], C, 2).unwrap();
        // Covers columns 4..=13, rows 3..=11: 10 × 9, less the 6 × 5 inside the 2-px outline.
        assert_eq!(coloured(&rgb), 10 * 9 - 6 * 5);
        for (x, y) in [
            (4, 3),
            (13, 3),
            (4, 11),
            (13, 11),
            (5, 4),
            (12, 10),
            (8, 3),
            (4, 7),
        ] {
            assert_eq!(at(&rgb, w, x, y), C, "({x}, {y}) should be on the outline");
        }
        for (x, y) in [(6, 5), (11, 9), (8, 7), (3, 3), (14, 11), (4, 2), (4, 12)] {
            assert_eq!(
                at(&rgb, w, x, y),
                [0, 0, 0],
                "({x}, {y}) should be untouched"
            );
        }
        // Fractional coordinates cover the pixels they touch.
        let mut rgb2 = vec![0u8; w * h * 3];
        draw_boxes(&mut rgb2, w, h, &[bx([4.3, 3.9, 13.2, 11.01])], C, 2).unwrap();
        assert_eq!(rgb2, rgb);
    }

    #[test]
    fn boxes_outside_the_frame_are_clipped() {
        let (w, h) = (20, 16);
        let mut rgb = vec![0u8; w * h * 3];
        draw_boxes(&mut rgb, w, h, &[bx([-5.0, -5.0, 10.0, 30.0])], C, 1).unwrap();
        // Only the right edge (column 9) lies in the frame.
        assert_eq!(coloured(&rgb), h);
        assert_eq!(at(&rgb, w, 9, 0), C);
        assert_eq!(at(&rgb, w, 9, 15), C);
        assert_eq!(at(&rgb, w, 0, 0), [0, 0, 0]);
        let before = rgb.clone();
        let far = [
            bx([30.0, 30.0, 40.0, 40.0]),
            bx([-40.0, -40.0, -30.0, -30.0]),
            bx([20.0, 0.0, 25.0, 5.0]),
        ];
        draw_boxes(&mut rgb, w, h, &far, C, 3).unwrap();
        assert_eq!(rgb, before);
        // Huge coordinates saturate instead of overflowing; the frame's border is drawn.
        let mut rgb = vec![0u8; w * h * 3];
        draw_boxes(&mut rgb, w, h, &[bx([-1e300, -1e300, 1e300, 1e300])], C, 1).unwrap();
        assert_eq!(coloured(&rgb), 0);
        draw_boxes(&mut rgb, w, h, &[bx([0.0, 0.0, 20.0, 16.0])], C, 1).unwrap();
        assert_eq!(coloured(&rgb), 2 * w + 2 * (h - 2));
    }

    #[test]
    fn non_finite_or_inverted_boxes_are_skipped() {
        let (w, h) = (12, 10);
        let mut rgb = vec![0u8; w * h * 3];
        let bad = [
            bx([f64::NAN, 1.0, 5.0, 5.0]),
            bx([1.0, 1.0, f64::INFINITY, 5.0]),
            bx([8.0, 8.0, 2.0, 2.0]),
            bx([3.0, 3.0, 3.0, 6.0]),
            bx([3.0, 6.0, 7.0, 6.0]),
        ];
        draw_boxes(&mut rgb, w, h, &bad, C, 2).unwrap();
        assert_eq!(coloured(&rgb), 0);
        // A thickness larger than the box fills it; 0 draws 1 px.
        draw_boxes(&mut rgb, w, h, &[bx([1.0, 1.0, 4.0, 4.0])], C, 9).unwrap();
        assert_eq!(coloured(&rgb), 9);
        let mut rgb = vec![0u8; w * h * 3];
        draw_boxes(&mut rgb, w, h, &[bx([1.0, 1.0, 4.0, 4.0])], C, 0).unwrap();
        assert_eq!(coloured(&rgb), 8);
    }

    #[test]
    fn wrong_frame_buffer_is_an_error() {
        let mut rgb = vec![0u8; 10];
        let err = draw_boxes(&mut rgb, 2, 2, &[], C, 1).unwrap_err();
        assert!(err.to_string().contains("2×2 frame (expected 12)"), "{err}");
        let err = annotate_frame(&mut rgb, 0, 2, &[], &[]).unwrap_err();
        assert!(err.to_string().contains("annotated frame"), "{err}");
        let err = draw_boxes(&mut rgb, usize::MAX, 2, &[], C, 1).unwrap_err();
        assert!(
            err.to_string().contains("expected a smaller frame"),
            "{err}"
        );
    }

    #[test]
    fn captions() {
        let mut b = bx([0.0; 4]);
        assert_eq!(b.caption(), None);
        b.score = Some(0.8712);
        assert_eq!(b.caption().as_deref(), Some("0.87"));
        b.label = "adenoma".into();
        assert_eq!(b.caption().as_deref(), Some("adenoma 0.87"));
        b.score = None;
        assert_eq!(b.caption().as_deref(), Some("adenoma"));
    }

    #[test]
    fn annotated_frame_has_outlines_and_labels() {
        let (w, h) = (320, 240);
        let truth = [bx([40.0, 60.0, 140.0, 160.0])];
        let predicted = [DrawBox {
            xyxy: [180.0, 100.0, 300.0, 220.0],
            label: "adenoma".into(),
            score: Some(0.87),
        }];
        // Without labels no font is needed.
        let mut plain = vec![0u8; w * h * 3];
        annotate_frame(&mut plain, w, h, &truth, &[bx(predicted[0].xyxy)]).unwrap();
        let count = |rgb: &[u8], c: [u8; 3]| rgb.chunks(3).filter(|p| *p == c).count();
        assert_eq!(count(&plain, TRUTH_COLOUR), 2 * 2 * (100 + 96));
        assert_eq!(count(&plain, PREDICTED_COLOUR), 2 * 2 * (120 + 116));
        let Some(()) = font_or_skip("annotated_frame_has_outlines_and_labels") else {
            return;
        };
        // A grey frame, so that black text and the untouched frame differ.
        let grey = [60u8, 60, 60];
        let mut rgb = grey.repeat(w * h);
        annotate_frame(&mut rgb, w, h, &truth, &predicted).unwrap();
        assert_eq!(count(&rgb, TRUTH_COLOUR), count(&plain, TRUTH_COLOUR));
        // The label's green background sits just above the box's top-left corner...
        let label_rows: Vec<usize> = (0..h)
            .filter(|&y| y < 100 && at(&rgb, w, 181, y) == PREDICTED_COLOUR)
            .collect();
        assert!(
            label_rows.len() >= 9
                && label_rows[0] >= 100 - 24
                && label_rows[label_rows.len() - 1] == 99,
            "{label_rows:?}"
        );
        // ...with dark text on it.
        let text = label_rows
            .iter()
            .flat_map(|&y| (182..300).map(move |x| (x, y)))
            .filter(|&(x, y)| {
                let p = at(&rgb, w, x, y);
                p != PREDICTED_COLOUR && p != grey
            })
            .count();
        assert!(text > 30, "{text} text pixels in the label");
        if let Some(dir) = std::env::var_os("ENDOFM_PLOT_EXAMPLES") {
            let img = image::RgbImage::from_raw(w as u32, h as u32, rgb).unwrap();
            img.save(Path::new(&dir).join("annotated_frame.png"))
                .unwrap();
        }
    }

    fn frame(width: usize, height: usize, seed: usize) -> Vec<u8> {
        (0..width * height)
            .flat_map(|i| {
                let (x, y) = (i % width, i / width);
                let v = ((x + 2 * y + seed * 37) % 64) as u8;
                [90 + v, 40 + v / 2, 50 + v / 3]
            })
            .collect()
    }

    #[test]
    fn grid_is_written_with_boxes_where_they_belong() {
        let Some(()) = font_or_skip("grid_is_written_with_boxes_where_they_belong") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        // One wide black frame with one true box: its outline must land where the scaling says.
        let (fw, fh) = (320usize, 160usize);
        let sample = BoxSample {
            caption: "video 1 frame 3".into(),
            rgb: vec![0; fw * fh * 3],
            width: fw,
            height: fh,
            truth: vec![bx([80.0, 40.0, 240.0, 120.0])],
            predicted: vec![],
        };
        let path = dir.path().join("one.png");
        box_grid(std::slice::from_ref(&sample), "Detections", &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        keep_example(&path);
        let t = tile(0, fw, fh);
        assert_eq!((t.w, t.h), (188, 94), "aspect kept");
        let yellow: Vec<(i32, i32)> = img
            .enumerate_pixels()
            .filter(|(_, y, p)| p.0 == TRUTH_COLOUR && (*y as i32) < TITLE + t.y0 + t.h)
            .map(|(x, y, _)| (x as i32, y as i32 - TITLE))
            .collect();
        let xs = yellow.iter().map(|p| p.0);
        let ys = yellow.iter().map(|p| p.1);
        let (x0, x1) = (xs.clone().min().unwrap(), xs.max().unwrap());
        let (y0, y1) = (ys.clone().min().unwrap(), ys.max().unwrap());
        let s = f64::from(t.w) / fw as f64;
        let first = |v: f64, o: i32| o + (v * s).floor() as i32;
        let last = |v: f64, o: i32| o + (v * s).ceil() as i32 - 1;
        assert_eq!((x0, y0), (first(80.0, t.x0), first(40.0, t.y0)));
        assert_eq!((x1, y1), (last(240.0, t.x0), last(120.0, t.y0)));
        // Outline at least 2 px thick after scaling down.
        let p = |x: i32, y: i32| img.get_pixel(x as u32, (y + TITLE) as u32).0;
        assert_eq!(p(x0 + 1, (y0 + y1) / 2), TRUTH_COLOUR);
        assert_eq!(p(x0 + 2, (y0 + y1) / 2), [0, 0, 0]);

        // Eight frames of different shapes with labelled predictions.
        let samples: Vec<BoxSample> = (0..9)
            .map(|k| {
                let (w, h) = [(320, 240), (200, 300), (64, 64), (640, 200)][k % 4];
                BoxSample {
                    caption: format!("frame {k}"),
                    rgb: frame(w, h, k),
                    width: w,
                    height: h,
                    truth: vec![bx([
                        w as f64 * 0.2,
                        h as f64 * 0.3,
                        w as f64 * 0.6,
                        h as f64 * 0.8,
                    ])],
                    predicted: vec![DrawBox {
                        xyxy: [
                            w as f64 * 0.25,
                            h as f64 * 0.25,
                            w as f64 * 0.65,
                            h as f64 * 0.75,
                        ],
                        label: "adenoma".into(),
                        score: Some(0.5 + k as f64 / 20.0),
                    }],
                }
            })
            .collect();
        let path = dir.path().join("eight.png");
        box_grid(&samples, "Detections: test split", &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        let count = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
        assert!(count(TRUTH_COLOUR) > 8 * 100, "{}", count(TRUTH_COLOUR));
        assert!(
            count(PREDICTED_COLOUR) > 8 * 200,
            "{}",
            count(PREDICTED_COLOUR)
        );
        assert!(!dir.path().join("eight.png.tmp").exists());
        keep_example(&path);
    }

    #[test]
    fn grid_refuses_bad_samples() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let err = box_grid(&[], "t", &path).unwrap_err();
        assert!(err.to_string().contains("no samples"), "{err}");
        let bad = BoxSample {
            caption: "clip 7 frame 2".into(),
            rgb: vec![0; 3 * 10 * 10 - 1],
            width: 10,
            height: 10,
            truth: vec![],
            predicted: vec![],
        };
        let err = box_grid(&[bad], "t", &path).unwrap_err();
        assert!(err.to_string().contains("sample `clip 7 frame 2`"), "{err}");
        assert!(!path.exists());
    }
}
