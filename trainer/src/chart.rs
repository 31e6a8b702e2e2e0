//! Charts drawn with plotters into an RGB buffer and written as PNG: the embedded font, the
//! series colours and the PNG writer that every chart of mae-train uses.
//!
//! Text uses DejaVu Sans (Bitstream Vera licence, `assets/DejaVuSans-LICENSE.txt`), embedded in
//! the binary, so charts look the same on every machine and need no system font library.

use std::path::Path;
use std::sync::Once;

use anyhow::Context;
use plotters::prelude::*;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
/// The font family name the embedded font is registered under.
pub const FAMILY: &str = "sans-serif";

/// Line colours, one per series, colour-blind safe (Okabe–Ito).
pub const COLOURS: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded font is known good; a failure here would only leave text undrawn.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// Draws into a `w`×`h` RGB buffer with `draw` and writes it to `path` as PNG, atomically.
pub fn write_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    save_png(&render(size, draw)?, path)
}

/// Draws into a white `w`×`h` RGB image with `draw`.
pub fn render(
    (w, h): (u32, u32),
    draw: impl FnOnce(DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> anyhow::Result<()>,
) -> anyhow::Result<image::RgbImage> {
    register_font();
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        draw(root.clone())?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    image::RgbImage::from_raw(w, h, buf).context("chart buffer size")
}

/// Writes `img` to `path` as PNG, atomically.
pub fn save_png(img: &image::RgbImage, path: &Path) -> anyhow::Result<()> {
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .context("cannot encode the image as PNG")?;
    mae_models::io::atomic_write(path, &png)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The (min, max) of `v`, or (`fallback`, `fallback` + 1) when it is empty.
pub fn bounds(v: &[f64], fallback: f64) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if lo.is_finite() && hi.is_finite() {
        (lo, hi)
    } else {
        (fallback, fallback + 1.0)
    }
}
