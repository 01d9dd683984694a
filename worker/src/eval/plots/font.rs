//! The font plot text is drawn with: DejaVu Sans (or the file named by `ENDOFM_PLOT_FONT`),
//! read once per process and registered with plotters' ab_glyph text renderer.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

/// Environment variable naming a `.ttf`/`.otf` file to draw text with instead of the
/// system's DejaVu Sans.
pub const FONT_ENV: &str = "ENDOFM_PLOT_FONT";

/// Where DejaVu Sans lives on Debian/Ubuntu (`fonts-dejavu-core`), Arch and Fedora.
const FONT_CANDIDATES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
];

/// The family name plots ask plotters for.
pub(super) const FAMILY: &str = "sans-serif";

static FONT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();

/// The font file text is drawn with, loaded (once per process) on first use: the file named
/// by [`FONT_ENV`] when set, else the first DejaVu Sans found. `Err` says what to install.
pub fn font_file() -> std::result::Result<&'static Path, &'static str> {
    match FONT.get_or_init(load_font) {
        Ok(p) => Ok(p.as_path()),
        Err(reason) => Err(reason.as_str()),
    }
}

fn load_font() -> std::result::Result<PathBuf, String> {
    find_and_register(
        std::env::var_os(FONT_ENV).map(PathBuf::from),
        &FONT_CANDIDATES,
    )
}

/// Registers `chosen`, or else the first of `candidates` that exists.
pub(super) fn find_and_register(
    chosen: Option<PathBuf>,
    candidates: &[&str],
) -> std::result::Result<PathBuf, String> {
    let path = match chosen {
        Some(p) => p,
        None => candidates
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| {
                format!(
                    "no font for plot text: none of {} exists; install Debian's fonts-dejavu-core (scripts/setup.sh does) or set {FONT_ENV} to a .ttf file",
                    candidates.join(", ")
                )
            })?,
    };
    register(&path, FontStyle::Normal)?;
    // Titles use the bold face when it sits beside the regular one; plotters falls back to
    // the regular face otherwise.
    let bold = path.with_file_name("DejaVuSans-Bold.ttf");
    if bold != path && bold.is_file() && register(&bold, FontStyle::Bold).is_err() {
        tracing::warn!(font = %bold.display(), "bold plot font unreadable; titles use the regular face");
    }
    tracing::debug!(font = %path.display(), "plot font loaded");
    Ok(path)
}

/// Reads a font file and hands it to plotters, which keeps fonts for the whole process
/// (hence the leak: this runs at most twice per process, guarded by [`FONT`]).
fn register(path: &Path, style: FontStyle) -> std::result::Result<(), String> {
    let bytes =
        std::fs::read(path).map_err(|e| format!("reading plot font {}: {e}", path.display()))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FAMILY, style, bytes)
        .map_err(|_| format!("{} is not a TrueType/OpenType font", path.display()))
}

pub(super) fn font(size: u32) -> TextStyle<'static> {
    TextStyle::from((FAMILY, size).into_font())
}

/// Title font of every plot.
pub(super) fn title_font() -> TextStyle<'static> {
    TextStyle::from((FAMILY, 22, FontStyle::Bold).into_font())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_invalid_font_is_a_clear_error() {
        let err = find_and_register(None, &["/nonexistent/DejaVuSans.ttf"]).unwrap_err();
        assert!(
            err.contains("fonts-dejavu-core") && err.contains(FONT_ENV),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake.ttf");
        std::fs::write(&fake, b"not a font").unwrap();
        let err = find_and_register(Some(fake), &[]).unwrap_err();
        assert!(err.contains("not a TrueType/OpenType font"), "{err}");
        let err = find_and_register(Some(dir.path().join("absent.ttf")), &[]).unwrap_err();
        assert!(err.contains("reading plot font"), "{err}");
    }
}
