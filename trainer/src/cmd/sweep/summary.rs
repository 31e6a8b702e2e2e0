//! What a sweep's finished cells measured, and the summary written from them after every
//! cell: `sweep.csv` (one row per cell), `sweep.md` (mean ± standard deviation per kind, init
//! and size) and `sweep.png`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What a finished cell measured: one row of `sweep.csv`, kept in its `cell.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Row {
    pub size: String,
    /// Training images actually used.
    pub train_images: usize,
    pub seed: u64,
    pub init: String,
    /// `finetune` or `linprobe`; a `cell.json` written before sweeps had kinds is a fine-tune.
    #[serde(default = "finetune")]
    pub kind: String,
    pub best_epoch: Option<u64>,
    pub val_auc: Option<f64>,
    pub val_acc: f64,
    pub test_auc: Option<f64>,
    pub test_acc: f64,
    pub train_seconds: f64,
}

fn finetune() -> String {
    "finetune".into()
}

/// How a kind reads in the chart's legend.
pub fn kind_label(kind: &str) -> &str {
    match kind {
        "finetune" => "fine-tune",
        "linprobe" => "linear probe",
        other => other,
    }
}

/// Mean and sample standard deviation (0 for one value).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// One (kind, init, size) group of finished cells.
#[derive(Debug)]
pub struct Group<'a> {
    pub kind: &'a str,
    pub init: &'a str,
    pub train_images: usize,
    pub size: &'a str,
    pub rows: Vec<&'a Row>,
}

/// The (kind, init) pairs of `rows`, in order of first appearance.
pub fn series(rows: &[Row]) -> Vec<(&str, &str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in rows {
        let key = (r.kind.as_str(), r.init.as_str());
        if !out.contains(&key) {
            out.push(key);
        }
    }
    out
}

/// Rows grouped by kind and init (in order of first appearance) and size (ascending).
pub fn groups(rows: &[Row]) -> Vec<Group<'_>> {
    let mut out = Vec::new();
    for (kind, init) in series(rows) {
        let mut by_size: BTreeMap<usize, Group> = BTreeMap::new();
        for r in rows.iter().filter(|r| r.kind == kind && r.init == init) {
            by_size
                .entry(r.train_images)
                .or_insert_with(|| Group {
                    kind,
                    init,
                    train_images: r.train_images,
                    size: &r.size,
                    rows: Vec::new(),
                })
                .rows
                .push(r);
        }
        out.extend(by_size.into_values());
    }
    out
}

/// `sweep.csv`; `kind` is the last column, so readers of the columns before it are unchanged.
fn csv(rows: &[Row]) -> String {
    let mut csv = String::from(
        "size,train_images,seed,init,best_epoch,val_auc,val_acc,test_auc,test_acc,train_seconds,kind\n",
    );
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{:.6},{},{:.6},{:.1},{}\n",
            r.size,
            r.train_images,
            r.seed,
            mae_models::predictions::csv_field(&r.init),
            r.best_epoch.map_or(String::new(), |e| e.to_string()),
            opt(r.val_auc),
            r.val_acc,
            opt(r.test_auc),
            r.test_acc,
            r.train_seconds,
            r.kind
        ));
    }
    csv
}

/// `sweep.md`: a table per kind, a row per init and size.
fn markdown(rows: &[Row], command_line: &str) -> String {
    let mut md = String::from("# Sweep results\n\n");
    md.push_str(&format!("```\n{command_line}\n```\n\n"));
    md.push_str(
        "Mean ± standard deviation over seeds; test metrics from the best-validation checkpoint.\n",
    );
    let pm = |v: &[f64]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            let (m, s) = mean_std(v);
            format!("{m:.4} ± {s:.4}")
        }
    };
    let gs = groups(rows);
    let mut kinds: Vec<&str> = Vec::new();
    for (kind, _) in series(rows) {
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    for kind in kinds {
        let title = match kind {
            "finetune" => "Fine-tuning",
            "linprobe" => "Linear probing",
            other => other,
        };
        md.push_str(&format!(
            "\n## {title}\n\n\
             | init | training images | seeds | test AUC | test ACC | val AUC | training s |\n\
             |---|---:|---:|---|---|---|---:|\n"
        ));
        for g in gs.iter().filter(|g| g.kind == kind) {
            let test_auc: Vec<f64> = g.rows.iter().filter_map(|r| r.test_auc).collect();
            let test_acc: Vec<f64> = g.rows.iter().map(|r| r.test_acc).collect();
            let val_auc: Vec<f64> = g.rows.iter().filter_map(|r| r.val_auc).collect();
            let secs: Vec<f64> = g.rows.iter().map(|r| r.train_seconds).collect();
            md.push_str(&format!(
                "| {} | {}{} | {} | {} | {} | {} | {:.0} |\n",
                g.init,
                g.train_images,
                if g.size == "all" { " (all)" } else { "" },
                g.rows.len(),
                pm(&test_auc),
                pm(&test_acc),
                pm(&val_auc),
                mean_std(&secs).0
            ));
        }
    }
    let total: f64 = rows.iter().map(|r| r.train_seconds).sum();
    md.push_str(&format!(
        "\n{} cells, {:.0} s of training in all.\n\n![test AUC and ACC against training images](sweep.png)\n",
        rows.len(),
        total
    ));
    md
}

/// Writes `sweep.csv` and `sweep.md` in `dir`, each atomically.
pub fn write_tables(dir: &Path, rows: &[Row], command_line: &str) -> anyhow::Result<()> {
    mae_models::io::atomic_write(&dir.join("sweep.csv"), csv(rows).as_bytes())?;
    mae_models::io::atomic_write(
        &dir.join("sweep.md"),
        markdown(rows, command_line).as_bytes(),
    )?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn row(kind: &str, init: &str, n: usize, seed: u64, auc: f64) -> Row {
        Row {
            size: n.to_string(),
            train_images: n,
            seed,
            init: init.into(),
            kind: kind.into(),
            best_epoch: Some(1),
            val_auc: Some(auc),
            val_acc: 0.5,
            test_auc: Some(auc),
            test_acc: 0.5,
            train_seconds: 1.0,
        }
    }

    #[test]
    fn groups_by_kind_init_and_size_with_spread() {
        let rows = vec![
            row("finetune", "scratch", 600, 0, 0.8),
            row("finetune", "scratch", 100, 0, 0.6),
            row("finetune", "mae", 100, 0, 0.7),
            row("linprobe", "mae", 100, 0, 0.65),
            row("finetune", "scratch", 600, 1, 0.9),
        ];
        let g = groups(&rows);
        let keys: Vec<(&str, &str, usize, usize)> = g
            .iter()
            .map(|g| (g.kind, g.init, g.train_images, g.rows.len()))
            .collect();
        assert_eq!(
            keys,
            vec![
                ("finetune", "scratch", 100, 1),
                ("finetune", "scratch", 600, 2),
                ("finetune", "mae", 100, 1),
                ("linprobe", "mae", 100, 1)
            ]
        );
        let (m, sd) = mean_std(&[0.8, 0.9]);
        assert!((m - 0.85).abs() < 1e-12 && (sd - 0.0707106781).abs() < 1e-9);
        assert_eq!(mean_std(&[0.5]), (0.5, 0.0));
        let md = markdown(&rows, "mae-train sweep");
        let ft = md.find("## Fine-tuning").unwrap();
        let lp = md.find("## Linear probing").unwrap();
        assert!(ft < lp && md[lp..].contains("| mae | 100 | 1 | 0.6500 ± 0.0000"));
        assert!(csv(&rows).lines().nth(4).unwrap().ends_with(",linprobe"));
    }

    #[test]
    fn a_cell_json_without_a_kind_is_a_fine_tune() {
        let mut v = serde_json::to_value(row("linprobe", "mae", 16, 0, 0.7)).unwrap();
        v.as_object_mut().unwrap().remove("kind");
        let r: Row = serde_json::from_value(v).unwrap();
        assert_eq!(r.kind, "finetune");
    }
}
