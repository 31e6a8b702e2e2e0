//! `sweep.png`: test AUC and ACC against training images, one line per init and kind.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::summary::{groups, kind_label, mean_std, series, Row};
use crate::chart::{bounds, write_png, COLOURS, FAMILY};

/// `sweep.png`: test AUC and test ACC against training images (log scale), one line per init
/// and kind through the seed means, with the seeds' min–max band and every seed as a point.
/// An init keeps its colour across kinds; linear-probe lines are dashed.
pub fn sweep_png(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let metrics: [(&str, Metric); 2] = [
        ("test AUC", |r| r.test_auc),
        ("test ACC", |r| Some(r.test_acc)),
    ];
    write_png(path, (1200, 520), |root| {
        let panels = root.split_evenly((1, 2));
        for (area, (label, get)) in panels.iter().zip(metrics) {
            panel(area, rows, label, get)?;
        }
        Ok(())
    })
}

/// Reads one metric off a sweep row.
type Metric = fn(&Row) -> Option<f64>;

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    rows: &[Row],
    label: &str,
    get: Metric,
) -> anyhow::Result<()> {
    let err = |e: plotters::drawing::DrawingAreaErrorKind<_>| anyhow::anyhow!("{e:?}");
    let values: Vec<f64> = rows.iter().filter_map(get).collect();
    let xs: Vec<f64> = rows.iter().map(|r| r.train_images as f64).collect();
    let (xmin, xmax) = bounds(&xs, 1.0);
    let (ymin, ymax) = if values.is_empty() {
        (0.0, 1.0)
    } else {
        let (lo, hi) = bounds(&values, 0.0);
        let pad = ((hi - lo) * 0.1).max(0.01);
        ((lo - pad).max(0.0), (hi + pad).min(1.0))
    };
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{label} against training images"), (FAMILY, 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin / 1.25..xmax * 1.25).log_scale(), ymin..ymax)
        .map_err(err)?;
    // The x axis is labelled at the sizes the sweep ran, not at powers of ten.
    chart
        .configure_mesh()
        .x_desc("training images (log scale)")
        .y_desc(label)
        .x_labels(0)
        .x_label_formatter(&|_| String::new())
        .disable_x_mesh()
        .y_label_formatter(&|y| format!("{y:.3}"))
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .draw()
        .map_err(err)?;
    let mut sizes: Vec<usize> = rows.iter().map(|r| r.train_images).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let tick_style = TextStyle::from((FAMILY, 14).into_font())
        .pos(Pos::new(HPos::Center, VPos::Top))
        .color(&BLACK);
    let (bx, by) = area.get_base_pixel();
    for n in sizes {
        // Backend pixels, made relative to this panel.
        let (px, py) = chart.backend_coord(&(n as f64, ymin));
        let (px, py) = (px - bx, py - by);
        area.draw(&PathElement::new(vec![(px, py), (px, py + 5)], BLACK))
            .map_err(err)?;
        area.draw(&Text::new(n.to_string(), (px, py + 7), tick_style.clone()))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(n as f64, ymin), (n as f64, ymax)],
                BLACK.mix(0.08),
            )))
            .map_err(err)?;
    }
    let gs = groups(rows);
    let lines = series(rows);
    let mut inits: Vec<&str> = Vec::new();
    for &(_, init) in &lines {
        if !inits.contains(&init) {
            inits.push(init);
        }
    }
    let several_kinds = lines.iter().any(|&(kind, _)| kind != lines[0].0);
    for (kind, init) in lines {
        let k = inits.iter().position(|i| *i == init).unwrap_or(0);
        let colour = COLOURS[k % COLOURS.len()];
        let dashed = kind == "linprobe";
        let mut mean_line = Vec::new();
        let mut lows = Vec::new();
        let mut highs = Vec::new();
        let mut points = Vec::new();
        for g in gs.iter().filter(|g| g.init == init && g.kind == kind) {
            let v: Vec<f64> = g.rows.iter().filter_map(|r| get(r)).collect();
            if v.is_empty() {
                continue;
            }
            let x = g.train_images as f64;
            let (lo, hi) = bounds(&v, 0.0);
            mean_line.push((x, mean_std(&v).0));
            lows.push((x, lo));
            highs.push((x, hi));
            points.extend(v.iter().map(|&y| (x, y)));
        }
        if mean_line.len() > 1 {
            let band: Vec<(f64, f64)> = highs.iter().chain(lows.iter().rev()).copied().collect();
            chart
                .draw_series(std::iter::once(Polygon::new(
                    band,
                    colour.mix(0.18).filled(),
                )))
                .map_err(err)?;
        }
        let label = if several_kinds {
            format!("{init} · {}", kind_label(kind))
        } else {
            init.to_string()
        };
        let style = colour.stroke_width(3);
        let drawn = if dashed {
            chart.draw_series(DashedLineSeries::new(mean_line, 10, 6, style))
        } else {
            chart.draw_series(LineSeries::new(mean_line, style))
        };
        drawn.map_err(err)?.label(label).legend(move |(x, y)| {
            let dash = if dashed { 10 } else { 24 };
            PathElement::new(vec![(x, y), (x + dash, y)], style)
        });
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 4, colour.mix(0.8).filled())),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FAMILY, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn row(init: &str, n: usize, seed: u64, auc: f64) -> Row {
        Row {
            size: n.to_string(),
            train_images: n,
            seed,
            init: init.into(),
            kind: "finetune".into(),
            best_epoch: Some(2),
            val_auc: Some(auc),
            val_acc: 0.7,
            test_auc: Some(auc),
            test_acc: auc - 0.1,
            train_seconds: 3.0,
        }
    }

    #[test]
    fn sweep_chart_draws_a_line_per_init() {
        let dir = tempfile::tempdir().unwrap();
        let rows = vec![
            row("scratch", 100, 0, 0.70),
            row("scratch", 100, 1, 0.74),
            row("scratch", 1000, 0, 0.85),
            row("scratch", 1000, 1, 0.88),
            row("mae", 100, 0, 0.80),
            row("mae", 1000, 0, 0.91),
        ];
        let path = dir.path().join("sweep.png");
        sweep_png(&path, &rows).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (1200, 520));
        let count = |c: RGBColor| img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count();
        // Both inits' lines are drawn, in their own colours, and text was rendered (dark
        // anti-aliased pixels other than pure black appear only where glyphs are).
        assert!(count(COLOURS[0]) > 200, "scratch line");
        assert!(count(COLOURS[1]) > 200, "mae line");
        let grey_text = img
            .pixels()
            .filter(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2] && (40..200).contains(&p.0[0]))
            .count();
        assert!(grey_text > 500, "anti-aliased text: {grey_text} pixels");
        // A sweep with a single finished cell still plots.
        sweep_png(&path, &rows[..1]).unwrap();
    }

    #[test]
    fn sweep_chart_draws_a_line_per_init_and_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sweep.png");
        let mae = [row("mae", 100, 0, 0.90), row("mae", 1000, 0, 0.95)];
        let lower = |init: &str, kind: &str| {
            [(100, 0.70), (1000, 0.80)].map(|(n, auc)| Row {
                kind: kind.into(),
                ..row(init, n, 0, auc)
            })
        };
        let pixels = |rows: &[Row], c: RGBColor| {
            sweep_png(&path, rows).unwrap();
            let img = image::open(&path).unwrap().to_rgb8();
            img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count()
        };
        // The same two lines on the same axes: a second init's solid line in its own colour,
        // or the first init's linear probe, dashed in the first init's colour.
        let inits = [&mae[..], &lower("scratch", "finetune")].concat();
        let kinds = [&mae[..], &lower("mae", "linprobe")].concat();
        let (mae_alone, solid) = (pixels(&inits, COLOURS[0]), pixels(&inits, COLOURS[1]));
        let dashed = pixels(&kinds, COLOURS[0]).saturating_sub(mae_alone);
        assert!(
            dashed > solid / 3 && dashed < solid * 9 / 10,
            "dashed {dashed}, solid {solid} pixels"
        );
    }
}
