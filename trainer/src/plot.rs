//! Training curves as a PNG (`plots.png` in the run folder), drawn from `log.txt` after every
//! epoch: loss (train and validation), learning rate, and validation accuracy / AUC when the run
//! has them. Drawn with plotters and the embedded font of [`crate::chart`].

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;

use crate::chart::{bounds, write_png, COLOURS, FAMILY};

/// One panel's width and height in pixels.
pub const PANEL_W: u32 = 480;
pub const PANEL_H: u32 = 340;

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

/// Reads `run_dir/log.txt` and writes `run_dir/plots.png` (the panels side by side) atomically;
/// returns its path.
pub fn write_run_plots(run_dir: &Path) -> anyhow::Result<PathBuf> {
    let log = run_dir.join("log.txt");
    let text =
        std::fs::read_to_string(&log).with_context(|| format!("cannot read {}", log.display()))?;
    let out = run_dir.join("plots.png");
    write_panels(&out, &panels_from_log(&text))?;
    Ok(out)
}

/// Draws `panels` side by side into the PNG `path`.
pub fn write_panels(path: &Path, panels: &[Panel]) -> anyhow::Result<()> {
    let n = panels.len().max(1);
    write_png(path, (PANEL_W * n as u32, PANEL_H), |root| {
        for (area, p) in root.split_evenly((1, n)).iter().zip(panels) {
            draw_panel(area, p)?;
        }
        Ok(())
    })
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    p: &Panel,
) -> anyhow::Result<()> {
    let err = |e: plotters::drawing::DrawingAreaErrorKind<_>| anyhow::anyhow!("{e:?}");
    let xs: Vec<f64> = p
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|q| q.0))
        .collect();
    let ys: Vec<f64> = p
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|q| q.1))
        .collect();
    let (x0, x1) = bounds(&xs, 0.0);
    let (x0, x1) = if x1 > x0 {
        (x0, x1)
    } else {
        (x0 - 0.5, x0 + 0.5)
    };
    let (y0, y1) = bounds(&ys, 0.0);
    let pad = ((y1 - y0) * 0.08).max(y1.abs().max(1e-12) * 1e-3);
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FAMILY, 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_labels(((x1 - x0).round() as usize + 1).clamp(2, 8))
        .y_labels(6)
        // Epochs are whole numbers: no label at a fractional tick.
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-6 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| number(*y))
        .label_style((FAMILY, 13))
        .axis_desc_style((FAMILY, 14))
        .light_line_style(WHITE)
        .bold_line_style(BLACK.mix(0.1))
        .draw()
        .map_err(err)?;
    for (k, s) in p.series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                colour.stroke_width(2),
            ))
            .map_err(err)?
            .label(&s.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
        chart
            .draw_series(s.points.iter().map(|&q| Circle::new(q, 3, colour.filled())))
            .map_err(err)?;
    }
    // The legend goes in the corner with the fewest points under it.
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let under = |right: bool, top: bool| {
        let (xr, yr) = (x1 - x0, (y1 - y0).max(1e-12));
        p.series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|q| {
                let fx = (q.0 - x0) / xr;
                let fy = (q.1 - y0) / yr;
                (if right { fx > 0.6 } else { fx < 0.4 })
                    && (if top { fy > 0.65 } else { fy < 0.35 })
            })
            .count()
    };
    let corner = corners
        .into_iter()
        .min_by_key(|&(_, right, top)| under(right, top))
        .map_or(SeriesLabelPosition::UpperRight, |c| c.0);
    chart
        .configure_series_labels()
        .position(corner)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font((FAMILY, 13))
        .draw()
        .map_err(err)?;
    Ok(())
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const LOG: &str = r#"{"train_lr": 0.001, "train_loss": 1.2, "test_loss": 1.1, "test_acc1": 40.0, "test_auc": 0.6, "epoch": 0}
{"train_lr": 0.0005, "train_loss": 0.8, "test_loss": 0.9, "test_acc1": 70.0, "test_auc": 0.8, "epoch": 1}
{"train_lr": 0.0001, "train_loss": 0.5, "test_loss": 0.7, "test_acc1": 85.0, "test_auc": 0.9, "epoch": 2}
"#;

    /// Pixels of exactly `c` in columns `xs`.
    fn count(img: &image::RgbImage, c: RGBColor, xs: std::ops::Range<u32>) -> usize {
        xs.flat_map(|x| (0..img.height()).map(move |y| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0 == [c.0, c.1, c.2])
            .count()
    }

    #[test]
    fn a_finetune_log_gives_three_panels_with_every_series_drawn() {
        let panels = panels_from_log(LOG);
        let titles: Vec<&str> = panels.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(titles, ["loss", "learning rate", "validation"]);
        assert_eq!(panels[2].series[0].points[2], (2.0, 0.85));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        write_panels(&path, &panels).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), (3 * PANEL_W, PANEL_H));
        // Each panel draws its first series; the loss and validation panels a second one; no
        // panel has a third.
        for i in 0..3 {
            let cols = i * PANEL_W..(i + 1) * PANEL_W;
            let first = count(&img, COLOURS[0], cols.clone());
            assert!(first > 100, "panel {i}: {first} pixels of the first series");
            let second = count(&img, COLOURS[1], cols.clone());
            assert_eq!(
                second > 100,
                i != 1,
                "panel {i}: {second} pixels of a second series"
            );
            assert_eq!(count(&img, COLOURS[2], cols), 0, "panel {i}");
        }
    }

    #[test]
    fn a_pretrain_log_has_loss_and_lr_only_and_bad_lines_are_skipped() {
        let log = "{\"train_lr\": 1e-4, \"train_loss\": 0.9, \"epoch\": 0}\nnot json\n";
        let panels = panels_from_log(log);
        assert_eq!(panels.len(), 2);
        assert_eq!(panels[0].series.len(), 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        // One point per series (a single epoch) still draws.
        write_panels(&path, &panels).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.width(), 2 * PANEL_W);
        assert!(count(&img, COLOURS[0], 0..PANEL_W) > 10);
    }

    #[test]
    fn numbers() {
        assert_eq!(number(0.5), "0.500");
        assert_eq!(number(12.34), "12.3");
        assert_eq!(number(2.5e-4), "2.5e-4");
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
