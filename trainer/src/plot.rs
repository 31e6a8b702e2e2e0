//! Training curves as a PNG (`plots.png` in the run folder), drawn from `log.txt` after every
//! epoch: loss (train and validation), learning rate, and validation accuracy / AUC when the run
//! has them. Drawn with our own small raster code and a built-in 5×7 pixel font, so plotting
//! needs no system fonts or plotting libraries.

use std::path::{Path, PathBuf};

use anyhow::Context;
use image::{Rgb, RgbImage};

/// One panel's width and height in pixels.
pub const PANEL_W: u32 = 420;
pub const PANEL_H: u32 = 300;
const MARGIN_L: i32 = 70;
const MARGIN_R: i32 = 14;
const MARGIN_T: i32 = 44;
const MARGIN_B: i32 = 36;
const SCALE: i32 = 2;

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([30, 30, 30]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
/// Series colours, in order.
pub const COLOURS: [Rgb<u8>; 3] = [Rgb([31, 119, 180]), Rgb([255, 127, 14]), Rgb([44, 160, 44])];

/// A named series of (x, y) points.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A panel: title and up to three series.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

/// The panels of a run's `log.txt` (JSON lines with upstream's keys): loss, lr, and validation
/// accuracy / AUC when present. Lines that are not JSON objects are skipped.
pub fn panels_from_log(text: &str) -> Vec<Panel> {
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.is_object())
        .collect();
    let series = |key: &str, label: &str, scale: f64| -> Option<Series> {
        let points: Vec<(f64, f64)> = rows
            .iter()
            .filter_map(|r| Some((r["epoch"].as_f64()?, r[key].as_f64()? * scale)))
            .filter(|(_, y)| y.is_finite())
            .collect();
        (!points.is_empty()).then(|| Series {
            label: label.into(),
            points,
        })
    };
    let mut panels = Vec::new();
    let loss: Vec<Series> = [
        series("train_loss", "train loss", 1.0),
        series("test_loss", "val loss", 1.0),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !loss.is_empty() {
        panels.push(Panel {
            title: "loss".into(),
            series: loss,
        });
    }
    if let Some(lr) = series("train_lr", "lr", 1.0) {
        panels.push(Panel {
            title: "learning rate".into(),
            series: vec![lr],
        });
    }
    let val: Vec<Series> = [
        series("test_acc1", "val acc1", 0.01),
        series("test_auc", "val auc", 1.0),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !val.is_empty() {
        panels.push(Panel {
            title: "validation".into(),
            series: val,
        });
    }
    panels
}

/// Draws the panels side by side.
pub fn render(panels: &[Panel]) -> RgbImage {
    let n = panels.len().max(1) as u32;
    let mut img = RgbImage::from_pixel(PANEL_W * n, PANEL_H, WHITE);
    for (i, p) in panels.iter().enumerate() {
        draw_panel(&mut img, (i as u32 * PANEL_W) as i32, p);
    }
    img
}

/// Reads `run_dir/log.txt` and writes `run_dir/plots.png` atomically; returns its path.
pub fn write_run_plots(run_dir: &Path) -> anyhow::Result<PathBuf> {
    let log = run_dir.join("log.txt");
    let text =
        std::fs::read_to_string(&log).with_context(|| format!("cannot read {}", log.display()))?;
    let img = render(&panels_from_log(&text));
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .context("cannot encode the plots")?;
    let out = run_dir.join("plots.png");
    mae_models::io::atomic_write(&out, &bytes)?;
    Ok(out)
}

fn draw_panel(img: &mut RgbImage, x0: i32, p: &Panel) {
    let (w, h) = (PANEL_W as i32, PANEL_H as i32);
    let (left, right) = (x0 + MARGIN_L, x0 + w - MARGIN_R);
    let (top, bottom) = (MARGIN_T, h - MARGIN_B);
    text(img, x0 + MARGIN_L, 6, &p.title, BLACK);
    let pts = p.series.iter().flat_map(|s| s.points.iter());
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        xmin = xmin.min(x);
        xmax = xmax.max(x);
        ymin = ymin.min(y);
        ymax = ymax.max(y);
    }
    if xmin > xmax {
        text(img, left + 10, (top + bottom) / 2, "no data yet", BLACK);
        return;
    }
    if xmax - xmin < 1.0 {
        xmax = xmin + 1.0;
    }
    let pad = ((ymax - ymin) * 0.08).max(ymax.abs() * 1e-3).max(1e-12);
    // Non-negative quantities (loss, lr, accuracy) keep a non-negative axis.
    ymin = if ymin >= 0.0 {
        (ymin - pad).max(0.0)
    } else {
        ymin - pad
    };
    ymax += pad;
    let px = |x: f64| left + ((x - xmin) / (xmax - xmin) * (right - left) as f64).round() as i32;
    let py = |y: f64| bottom - ((y - ymin) / (ymax - ymin) * (bottom - top) as f64).round() as i32;
    // Grid and y labels at 5 levels.
    for k in 0..5 {
        let v = ymin + (ymax - ymin) * k as f64 / 4.0;
        let y = py(v);
        hline(img, left, right, y, GRID);
        let label = number(v);
        let tw = text_width(&label);
        text(img, left - 6 - tw, y - 7, &label, BLACK);
    }
    // x labels: epochs, at most 6.
    let span = (xmax - xmin).max(1.0);
    let step = (span / 5.0).ceil().max(1.0);
    let mut e = xmin.ceil();
    while e <= xmax + 1e-9 {
        let x = px(e);
        vline(img, x, bottom, bottom + 4, BLACK);
        let label = format!("{}", e as i64);
        text(img, x - text_width(&label) / 2, bottom + 8, &label, BLACK);
        e += step;
    }
    text(
        img,
        right - text_width("epoch"),
        bottom + 22,
        "epoch",
        BLACK,
    );
    // Axes.
    hline(img, left, right, bottom, BLACK);
    vline(img, left, top, bottom, BLACK);
    // Series and legend.
    let mut lx = x0 + MARGIN_L;
    for (s, colour) in p.series.iter().zip(COLOURS) {
        let mut prev: Option<(i32, i32)> = None;
        for &(x, y) in &s.points {
            let (cx, cy) = (px(x), py(y));
            if let Some((ax, ay)) = prev {
                line(img, ax, ay, cx, cy, colour);
            }
            fill(img, cx - 2, cy - 2, 5, 5, colour);
            prev = Some((cx, cy));
        }
        fill(img, lx, 24, 10, 10, colour);
        text(img, lx + 14, 22, &s.label, BLACK);
        lx += 14 + text_width(&s.label) + 14;
    }
}

/// A short label for an axis value: 3 significant digits, scientific when small or large.
pub fn number(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-2..1e4).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn put(img: &mut RgbImage, x: i32, y: i32, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn fill(img: &mut RgbImage, x: i32, y: i32, w: i32, h: i32, c: Rgb<u8>) {
    for dy in 0..h {
        for dx in 0..w {
            put(img, x + dx, y + dy, c);
        }
    }
}

fn hline(img: &mut RgbImage, x0: i32, x1: i32, y: i32, c: Rgb<u8>) {
    for x in x0..=x1 {
        put(img, x, y, c);
    }
}

fn vline(img: &mut RgbImage, x: i32, y0: i32, y1: i32, c: Rgb<u8>) {
    for y in y0..=y1 {
        put(img, x, y, c);
    }
}

/// A 2-pixel-wide line (Bresenham).
fn line(img: &mut RgbImage, x0: i32, y0: i32, x1: i32, y1: i32, c: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        fill(img, x, y, 2, 2, c);
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// Width in pixels of `s` in the built-in font.
pub fn text_width(s: &str) -> i32 {
    s.chars().count() as i32 * 6 * SCALE
}

/// Draws `s` with its top-left corner at (x, y); letters are drawn in upper case, characters
/// without a glyph as a blank.
pub fn text(img: &mut RgbImage, x: i32, y: i32, s: &str, c: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let Some(rows) = glyph(ch.to_ascii_uppercase()) else {
            continue;
        };
        let gx = x + i as i32 * 6 * SCALE;
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) != 0 {
                    fill(img, gx + col * SCALE, y + r as i32 * SCALE, SCALE, SCALE, c);
                }
            }
        }
    }
}

/// The 5×7 glyph of `c`: seven rows, bit 4 the leftmost column.
pub fn glyph(c: char) -> Option<[u8; 7]> {
    Some(match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        ' ' => [0; 7],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const LOG: &str = r#"{"train_lr": 0.001, "train_loss": 1.2, "test_loss": 1.1, "test_acc1": 40.0, "test_auc": 0.6, "epoch": 0}
{"train_lr": 0.0005, "train_loss": 0.8, "test_loss": 0.9, "test_acc1": 70.0, "test_auc": 0.8, "epoch": 1}
{"train_lr": 0.0001, "train_loss": 0.5, "test_loss": 0.7, "test_acc1": 85.0, "test_auc": 0.9, "epoch": 2}
"#;

    fn count(img: &RgbImage, c: Rgb<u8>) -> usize {
        img.pixels().filter(|p| **p == c).count()
    }

    #[test]
    fn a_finetune_log_gives_three_panels_with_every_series_drawn() {
        let panels = panels_from_log(LOG);
        let titles: Vec<&str> = panels.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(titles, ["loss", "learning rate", "validation"]);
        assert_eq!(panels[2].series[0].points[2], (2.0, 0.85));
        let img = render(&panels);
        assert_eq!((img.width(), img.height()), (3 * PANEL_W, PANEL_H));
        // Two series in the loss and validation panels, one in the lr panel.
        assert!(count(&img, COLOURS[0]) > 3 * 40);
        assert!(count(&img, COLOURS[1]) > 2 * 40);
        assert_eq!(count(&img, COLOURS[2]), 0);
        // Each panel's first series is drawn inside that panel.
        for i in 0..3 {
            let inside = (i * PANEL_W..(i + 1) * PANEL_W)
                .flat_map(|x| (0..PANEL_H).map(move |y| (x, y)))
                .filter(|&(x, y)| *img.get_pixel(x, y) == COLOURS[0])
                .count();
            assert!(
                inside > 40,
                "panel {i}: {inside} pixels of the first series"
            );
        }
    }

    #[test]
    fn a_pretrain_log_has_loss_and_lr_only_and_bad_lines_are_skipped() {
        let log = "{\"train_lr\": 1e-4, \"train_loss\": 0.9, \"epoch\": 0}\nnot json\n";
        let panels = panels_from_log(log);
        assert_eq!(panels.len(), 2);
        assert_eq!(panels[0].series.len(), 1);
        let img = render(&panels);
        assert_eq!(img.width(), 2 * PANEL_W);
    }

    #[test]
    fn text_and_numbers() {
        let mut img = RgbImage::from_pixel(100, 20, WHITE);
        text(&mut img, 0, 0, "1", BLACK);
        // '1' has 10 lit cells in its 5×7 glyph, each SCALE² pixels.
        let lit: u32 = glyph('1').unwrap().iter().map(|b| b.count_ones()).sum();
        assert_eq!(lit, 10);
        assert_eq!(count(&img, BLACK), 10 * (SCALE * SCALE) as usize);
        assert!(glyph('?').is_none());
        assert_eq!(number(0.5), "0.500");
        assert_eq!(number(12.34), "12.3");
        assert_eq!(number(2.5e-4), "2.5e-4");
        assert_eq!(text_width("abc"), 3 * 6 * SCALE);
    }

    #[test]
    fn plots_are_written_atomically_beside_the_log() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("log.txt"), LOG).unwrap();
        let out = write_run_plots(dir.path()).unwrap();
        let img = image::open(&out).unwrap();
        assert_eq!(img.width(), 3 * PANEL_W);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "only log.txt and plots.png: {names:?}");
        assert!(write_run_plots(&dir.path().join("missing")).is_err());
    }
}
