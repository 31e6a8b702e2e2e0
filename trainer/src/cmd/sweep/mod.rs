//! `mae-train sweep`: the data-efficiency experiment as one command.
//!
//! A sweep is a grid of cells, training-set size × seed × initialisation. Each cell is one
//! `mae-train finetune` with the same flags (plus the cell's `--train-samples`, `--seed`,
//! `--finetune` and the init's own extra flags), then one `mae-train eval` of its best checkpoint
//! on the test split. Cells run as child processes of this same binary, each in its own folder
//! with its log, so a failing cell names its log and a finished one is never run again: a cell
//! is done when its `cell.json` exists, which is written last and atomically. After every cell
//! the summary (`sweep.csv`, `sweep.md`, `sweep.png`) is written anew from the finished cells.

mod chart;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::cli::{Cli, Command as Sub, FinetuneArgs, SweepArgs};

/// Flags the sweep sets per cell; giving them among the shared flags is an error.
const OWN_FLAGS: [&str; 5] = [
    "--output-dir",
    "--seed",
    "--train-samples",
    "--finetune",
    "--resume",
];

/// One initialisation: training from scratch or from a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Init {
    /// The name in folders, tables and the plot (`scratch`, or the checkpoint's stem).
    pub name: String,
    pub checkpoint: Option<PathBuf>,
    /// Extra fine-tune flags of this init (`--init-args NAME=FLAGS`).
    pub extra: Vec<String>,
}

/// A training-set size: a number of images, or the whole training split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Size {
    Count(usize),
    All,
}

impl Size {
    fn label(self) -> String {
        match self {
            Size::Count(n) => n.to_string(),
            Size::All => "all".into(),
        }
    }
}

/// One cell of the grid.
#[derive(Debug, Clone)]
pub struct Cell {
    pub size: Size,
    pub seed: u64,
    pub init: Init,
    pub dir: PathBuf,
}

/// What a finished cell measured: one row of `sweep.csv`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Row {
    pub size: String,
    /// Training images actually used.
    pub train_images: usize,
    pub seed: u64,
    pub init: String,
    pub best_epoch: Option<u64>,
    pub val_auc: Option<f64>,
    pub val_acc: f64,
    pub test_auc: Option<f64>,
    pub test_acc: f64,
    pub train_seconds: f64,
}

/// Parses `600,6000,all`.
pub fn parse_sizes(items: &[String]) -> anyhow::Result<Vec<Size>> {
    let mut sizes = Vec::new();
    for s in items {
        let size = match s.trim() {
            "all" => Size::All,
            t => match t.parse::<usize>() {
                Ok(0) | Err(_) => {
                    bail!("--train-samples: '{s}' is neither a positive count nor 'all'")
                }
                Ok(n) => Size::Count(n),
            },
        };
        if sizes.contains(&size) {
            bail!("--train-samples: '{s}' is given twice");
        }
        sizes.push(size);
    }
    if sizes.is_empty() {
        bail!("--train-samples: give at least one size");
    }
    sizes.sort();
    Ok(sizes)
}

/// Parses the `--init` list (`scratch`, `PATH`, `NAME=PATH`) and attaches each
/// `--init-args NAME=FLAGS` to its init.
pub fn parse_inits(items: &[String], init_args: &[String]) -> anyhow::Result<Vec<Init>> {
    let mut inits: Vec<Init> = Vec::new();
    for item in items {
        let item = item.trim();
        let init = if item == "scratch" {
            Init {
                name: "scratch".into(),
                checkpoint: None,
                extra: Vec::new(),
            }
        } else {
            let (name, path) = match item.split_once('=') {
                Some((n, p)) if !n.is_empty() && !n.contains('/') => (n.to_string(), p),
                _ => {
                    let stem = Path::new(item)
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    (stem, item)
                }
            };
            let path = PathBuf::from(path);
            if !path.is_file() {
                bail!("--init: checkpoint {} does not exist", path.display());
            }
            Init {
                name,
                checkpoint: Some(path),
                extra: Vec::new(),
            }
        };
        let bad = init.name.is_empty()
            || init.name == "."
            || init.name == ".."
            || init.name.chars().any(|c| c == '/' || c == ',');
        if bad {
            bail!("--init: '{item}' gives no usable name; write it as NAME=PATH");
        }
        if inits.iter().any(|i| i.name == init.name) {
            bail!(
                "--init: two inits are named '{}'; name them apart as NAME=PATH",
                init.name
            );
        }
        inits.push(init);
    }
    if inits.is_empty() {
        bail!("--init: give at least one of scratch or a checkpoint");
    }
    for spec in init_args {
        let Some((name, flags)) = spec.split_once('=') else {
            bail!("--init-args '{spec}': expected NAME=FLAGS, e.g. 'scratch=--layer-decay 1.0'");
        };
        let Some(init) = inits.iter_mut().find(|i| i.name == name) else {
            let names: Vec<&str> = inits.iter().map(|i| i.name.as_str()).collect();
            bail!("--init-args '{spec}': no init is named '{name}' (inits: {names:?})");
        };
        let words = shlex::split(flags)
            .with_context(|| format!("--init-args '{spec}': unbalanced quotes"))?;
        init.extra.extend(words);
    }
    Ok(inits)
}

/// Refuses shared flags that the sweep sets per cell.
fn check_shared_flags(flags: &[String]) -> anyhow::Result<()> {
    for f in flags {
        let name = f.split('=').next().unwrap_or(f).replace('_', "-");
        if OWN_FLAGS.contains(&name.as_str()) {
            bail!("{f} is set by the sweep for each cell; leave it out of the fine-tune flags");
        }
    }
    Ok(())
}

/// The fine-tune arguments of one cell, without the program name.
fn finetune_args(shared: &[String], cell: &Cell) -> Vec<String> {
    let mut v = vec!["finetune".to_string()];
    v.extend(shared.iter().cloned());
    v.extend(cell.init.extra.iter().cloned());
    v.push("--output-dir".into());
    v.push(cell.dir.display().to_string());
    v.push("--seed".into());
    v.push(cell.seed.to_string());
    if let Size::Count(n) = cell.size {
        v.push("--train-samples".into());
        v.push(n.to_string());
    }
    if let Some(p) = &cell.init.checkpoint {
        v.push("--finetune".into());
        v.push(p.display().to_string());
    }
    v
}

/// Parses a cell's fine-tune arguments as `mae-train` will, so a bad flag fails before any
/// cell runs.
fn parse_finetune(args: &[String]) -> anyhow::Result<FinetuneArgs> {
    let argv = std::iter::once("mae-train".to_string()).chain(args.iter().cloned());
    match Cli::try_parse_from(argv) {
        Ok(Cli {
            command: Sub::Finetune(a),
        }) => Ok(*a),
        Ok(_) => bail!("the fine-tune flags did not parse as a fine-tune command"),
        Err(e) => {
            let text = e.to_string();
            bail!(
                "the fine-tune flags are not valid: {}",
                text.trim().trim_start_matches("error: ")
            )
        }
    }
}

/// The eval arguments of one cell (its best checkpoint on `split`).
fn eval_args(cell: &Cell, ft: &FinetuneArgs, split: &str) -> Vec<String> {
    let device = clap::ValueEnum::to_possible_value(&ft.run.device)
        .map(|v| v.get_name().to_string())
        .unwrap_or_else(|| "auto".into());
    vec![
        "eval".into(),
        "--resume".into(),
        cell.dir
            .join("checkpoint-best.safetensors")
            .display()
            .to_string(),
        "--data-path".into(),
        ft.data.data_path.display().to_string(),
        "--split".into(),
        split.into(),
        "--batch-size".into(),
        ft.optim.batch_size.to_string(),
        "--num-workers".into(),
        ft.data.num_workers.to_string(),
        "--device".into(),
        device,
        "--output".into(),
        cell.dir.join("test.json").display().to_string(),
    ]
}

/// Wraps a command in `launch` when a cell runs data-parallel.
fn launched(args: Vec<String>, nproc: usize) -> Vec<String> {
    if nproc <= 1 {
        return args;
    }
    let mut v = vec![
        "launch".to_string(),
        "--nproc-per-node".into(),
        nproc.to_string(),
        "--".into(),
    ];
    v.extend(args);
    v
}

fn shell_line(exe: &Path, args: &[String]) -> String {
    std::iter::once(exe.display().to_string())
        .chain(args.iter().cloned())
        .map(|s| shlex::try_quote(&s).map_or(s.clone(), |q| q.into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `mae-train sweep`.
pub fn sweep(a: &SweepArgs) -> anyhow::Result<ExitCode> {
    let sizes = parse_sizes(&a.train_samples)?;
    let inits = parse_inits(&a.init, &a.init_args)?;
    if a.seeds.is_empty() {
        bail!("--seeds: give at least one seed");
    }
    check_shared_flags(&a.finetune)?;
    for init in &inits {
        check_shared_flags(&init.extra)
            .with_context(|| format!("--init-args of '{}'", init.name))?;
    }
    let mut cells = Vec::new();
    for &seed in &a.seeds {
        for &size in &sizes {
            for init in &inits {
                let dir = a
                    .output_dir
                    .join("cells")
                    .join(&init.name)
                    .join(format!("n{}", size.label()))
                    .join(format!("seed{seed}"));
                cells.push(Cell {
                    size,
                    seed,
                    init: init.clone(),
                    dir,
                });
            }
        }
    }
    // Every cell's flags parse before anything runs.
    let mut parsed = Vec::with_capacity(cells.len());
    for cell in &cells {
        let ft = parse_finetune(&finetune_args(&a.finetune, cell))
            .with_context(|| format!("cell {}", cell_name(cell)))?;
        parsed.push(ft);
    }
    let train_len = {
        let ft = &parsed[0];
        crate::data::open(&ft.data.data_path, "train")?.len()
    };
    for &size in &sizes {
        if let Size::Count(n) = size {
            if n > train_len {
                bail!(
                    "--train-samples {n} is more than the {train_len} training images; use 'all'"
                );
            }
        }
    }
    let exe = std::env::current_exe().context("cannot find the mae-train executable")?;
    if a.dry_run {
        println!(
            "{} cells ({} sizes × {} seeds × {} inits), {train_len} training images",
            cells.len(),
            sizes.len(),
            a.seeds.len(),
            inits.len()
        );
        for (cell, ft) in cells.iter().zip(&parsed) {
            let done = cell.dir.join("cell.json").is_file();
            println!(
                "# {}{}",
                cell_name(cell),
                if done { " (done, will be skipped)" } else { "" }
            );
            let train = launched(finetune_args(&a.finetune, cell), a.nproc_per_node);
            println!("{}", shell_line(&exe, &train));
            let eval = launched(eval_args(cell, ft, &a.eval_split), a.nproc_per_node);
            println!("{}", shell_line(&exe, &eval));
        }
        return Ok(ExitCode::SUCCESS);
    }

    std::fs::create_dir_all(&a.output_dir)
        .with_context(|| format!("cannot create {}", a.output_dir.display()))?;
    let command_line = std::env::args()
        .map(|s| shlex::try_quote(&s).map_or(s.clone(), |q| q.into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    mae_models::io::atomic_write(
        &a.output_dir.join("sweep.command.txt"),
        format!("{command_line}\n").as_bytes(),
    )?;
    let started = Instant::now();
    let mut rows = Vec::new();
    let total = cells.len();
    for (i, (cell, ft)) in cells.iter().zip(&parsed).enumerate() {
        let name = cell_name(cell);
        let done = cell.dir.join("cell.json");
        if let Some(row) = read_row(&done) {
            println!("[{}/{total}] {name}: done before, skipped", i + 1);
            rows.push(row);
            continue;
        }
        if cell.dir.exists() {
            // An interrupted cell starts again from nothing.
            std::fs::remove_dir_all(&cell.dir).with_context(|| {
                format!("cannot clear the unfinished cell {}", cell.dir.display())
            })?;
        }
        std::fs::create_dir_all(&cell.dir)
            .with_context(|| format!("cannot create {}", cell.dir.display()))?;
        println!(
            "[{}/{total}] {name}: training ({:.0}s into the sweep)",
            i + 1,
            started.elapsed().as_secs_f64()
        );
        let t0 = Instant::now();
        let train = launched(finetune_args(&a.finetune, cell), a.nproc_per_node);
        run_logged(&exe, &train, &cell.dir.join("train.log"))
            .with_context(|| format!("cell {name}: fine-tuning failed"))?;
        let train_seconds = t0.elapsed().as_secs_f64();
        let eval = launched(eval_args(cell, ft, &a.eval_split), a.nproc_per_node);
        run_logged(&exe, &eval, &cell.dir.join("eval.log"))
            .with_context(|| format!("cell {name}: evaluation failed"))?;
        let row = cell_row(cell, train_len, train_seconds)
            .with_context(|| format!("cell {name}: reading its results"))?;
        println!(
            "[{}/{total}] {name}: best epoch {}, val AUC {}, test AUC {} ACC {:.4} ({:.0}s)",
            i + 1,
            row.best_epoch.map_or("-".into(), |e| e.to_string()),
            fmt_opt(row.val_auc),
            fmt_opt(row.test_auc),
            row.test_acc,
            train_seconds
        );
        mae_models::io::atomic_write(&done, serde_json::to_string_pretty(&row)?.as_bytes())?;
        rows.push(row);
        write_summary(&a.output_dir, &rows, &command_line)?;
    }
    write_summary(&a.output_dir, &rows, &command_line)?;
    println!(
        "sweep finished: {total} cells in {:.0}s; results in {}",
        started.elapsed().as_secs_f64(),
        a.output_dir.join("sweep.md").display()
    );
    Ok(ExitCode::SUCCESS)
}

fn cell_name(cell: &Cell) -> String {
    format!(
        "init {} · {} images · seed {}",
        cell.init.name,
        cell.size.label(),
        cell.seed
    )
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.4}"))
}

/// Runs `exe args`, its output going to `log`; an error quotes the log's last lines.
fn run_logged(exe: &Path, args: &[String], log: &Path) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = file.try_clone()?;
    let status = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err))
        .status()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{} exited with {status}; its log is {}:\n{}",
            args.first().map_or("mae-train", |s| s.as_str()),
            log.display(),
            tail.join("\n")
        );
    }
    Ok(())
}

fn read_row(path: &Path) -> Option<Row> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Reads a finished cell's best checkpoint (epoch, validation metrics) and test metrics.
fn cell_row(cell: &Cell, train_len: usize, train_seconds: f64) -> anyhow::Result<Row> {
    let best = cell.dir.join("checkpoint-best.safetensors");
    let (_, meta) = mae_models::checkpoint::safetensors::read(&best)?;
    let meta = meta.with_context(|| format!("{} has no metadata", best.display()))?;
    let test_path = cell.dir.join("test.json");
    let text = std::fs::read_to_string(&test_path)
        .with_context(|| format!("cannot read {}", test_path.display()))?;
    let test: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", test_path.display()))?;
    let test_acc = test["acc1"]
        .as_f64()
        .with_context(|| format!("{} has no acc1", test_path.display()))?;
    Ok(Row {
        size: cell.size.label(),
        train_images: match cell.size {
            Size::Count(n) => n,
            Size::All => train_len,
        },
        seed: cell.seed,
        init: cell.init.name.clone(),
        best_epoch: meta.epoch,
        val_auc: meta.metrics.get("auc").copied(),
        val_acc: meta.metrics.get("acc1").copied().unwrap_or(f64::NAN),
        test_auc: test["auc"].as_f64(),
        test_acc,
        train_seconds,
    })
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

/// One (init, size) group of finished cells.
#[derive(Debug)]
pub struct Group<'a> {
    pub init: &'a str,
    pub train_images: usize,
    pub size: &'a str,
    pub rows: Vec<&'a Row>,
}

/// Rows grouped by init (in order of first appearance) and size (ascending).
pub fn groups(rows: &[Row]) -> Vec<Group<'_>> {
    let mut inits: Vec<&str> = Vec::new();
    for r in rows {
        if !inits.contains(&r.init.as_str()) {
            inits.push(&r.init);
        }
    }
    let mut out = Vec::new();
    for init in inits {
        let mut by_size: BTreeMap<usize, Group> = BTreeMap::new();
        for r in rows.iter().filter(|r| r.init == init) {
            by_size
                .entry(r.train_images)
                .or_insert_with(|| Group {
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

fn write_summary(dir: &Path, rows: &[Row], command_line: &str) -> anyhow::Result<()> {
    let mut csv = String::from(
        "size,train_images,seed,init,best_epoch,val_auc,val_acc,test_auc,test_acc,train_seconds\n",
    );
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{:.6},{},{:.6},{:.1}\n",
            r.size,
            r.train_images,
            r.seed,
            mae_models::predictions::csv_field(&r.init),
            r.best_epoch.map_or(String::new(), |e| e.to_string()),
            opt(r.val_auc),
            r.val_acc,
            opt(r.test_auc),
            r.test_acc,
            r.train_seconds
        ));
    }
    mae_models::io::atomic_write(&dir.join("sweep.csv"), csv.as_bytes())?;

    let mut md = String::from("# Sweep results\n\n");
    md.push_str(&format!("```\n{command_line}\n```\n\n"));
    md.push_str(
        "Mean ± standard deviation over seeds; test metrics from the best-validation checkpoint.\n\n\
         | init | training images | seeds | test AUC | test ACC | val AUC | training s |\n\
         |---|---:|---:|---|---|---|---:|\n",
    );
    let pm = |v: &[f64]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            let (m, s) = mean_std(v);
            format!("{m:.4} ± {s:.4}")
        }
    };
    for g in groups(rows) {
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
    let total: f64 = rows.iter().map(|r| r.train_seconds).sum();
    md.push_str(&format!(
        "\n{} cells, {:.0} s of training in all.\n\n![test AUC and ACC against training images](sweep.png)\n",
        rows.len(),
        total
    ));
    mae_models::io::atomic_write(&dir.join("sweep.md"), md.as_bytes())?;
    chart::sweep_png(&dir.join("sweep.png"), rows)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn sizes_parse_sorted_and_refuse_nonsense() {
        let got = parse_sizes(&s(&["all", "6000", "600"])).unwrap();
        assert_eq!(got, vec![Size::Count(600), Size::Count(6000), Size::All]);
        for bad in [&["0"][..], &["x"], &["600", "600"], &[]] {
            assert!(parse_sizes(&s(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn inits_take_names_and_their_own_flags() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("mae_pretrain_vit_base.pth");
        std::fs::write(&ck, b"x").unwrap();
        let p = ck.display().to_string();
        let inits = parse_inits(
            &s(&["scratch", &p, &format!("mine={p}")]),
            &s(&["scratch=--layer-decay 1.0 --aa 'rand-m9'"]),
        )
        .unwrap();
        assert_eq!(
            inits[0].extra,
            s(&["--layer-decay", "1.0", "--aa", "rand-m9"])
        );
        assert_eq!(inits[1].name, "mae_pretrain_vit_base");
        assert_eq!(inits[2].name, "mine");
        assert!(inits[1].extra.is_empty());
        assert!(parse_inits(&s(&["scratch"]), &s(&["other=--x"])).is_err());
        assert!(parse_inits(&s(&["scratch"]), &s(&["no-equals"])).is_err());
        assert!(parse_inits(&s(&[&p, &p]), &[]).is_err(), "duplicate names");
        assert!(parse_inits(&s(&["/absent/x.pth"]), &[]).is_err());
    }

    #[test]
    fn cell_flags_are_the_shared_ones_plus_the_cells_own() {
        let init = Init {
            name: "mae".into(),
            checkpoint: Some("pt.safetensors".into()),
            extra: s(&["--layer-decay", "0.75"]),
        };
        let cell = Cell {
            size: Size::Count(600),
            seed: 2,
            init,
            dir: "out/cells/mae/n600/seed2".into(),
        };
        let args = finetune_args(&s(&["--data-path", "d.npz", "--epochs", "3"]), &cell);
        assert_eq!(
            args,
            s(&[
                "finetune",
                "--data-path",
                "d.npz",
                "--epochs",
                "3",
                "--layer-decay",
                "0.75",
                "--output-dir",
                "out/cells/mae/n600/seed2",
                "--seed",
                "2",
                "--train-samples",
                "600",
                "--finetune",
                "pt.safetensors"
            ])
        );
        let ft = parse_finetune(&args).unwrap();
        assert_eq!(ft.train_samples, Some(600));
        assert_eq!(ft.layer_decay, 0.75);
        assert_eq!(
            launched(s(&["eval"]), 2)[..4],
            s(&["launch", "--nproc-per-node", "2", "--"])[..]
        );
        assert!(check_shared_flags(&s(&["--seed", "3"])).is_err());
        assert!(check_shared_flags(&s(&["--output_dir=x"])).is_err());
        assert!(check_shared_flags(&s(&["--epochs", "3"])).is_ok());
        assert!(parse_finetune(&s(&["finetune", "--bogus"])).is_err());
    }

    #[test]
    fn groups_and_spread() {
        let row = |init: &str, n: usize, seed: u64, auc: f64| Row {
            size: n.to_string(),
            train_images: n,
            seed,
            init: init.into(),
            best_epoch: Some(1),
            val_auc: Some(auc),
            val_acc: 0.5,
            test_auc: Some(auc),
            test_acc: 0.5,
            train_seconds: 1.0,
        };
        let rows = vec![
            row("scratch", 600, 0, 0.8),
            row("scratch", 100, 0, 0.6),
            row("mae", 100, 0, 0.7),
            row("scratch", 600, 1, 0.9),
        ];
        let g = groups(&rows);
        let keys: Vec<(&str, usize, usize)> = g
            .iter()
            .map(|g| (g.init, g.train_images, g.rows.len()))
            .collect();
        assert_eq!(
            keys,
            vec![("scratch", 100, 1), ("scratch", 600, 2), ("mae", 100, 1)]
        );
        let (m, sd) = mean_std(&[0.8, 0.9]);
        assert!((m - 0.85).abs() < 1e-12 && (sd - 0.0707106781).abs() < 1e-9);
        assert_eq!(mean_std(&[0.5]), (0.5, 0.0));
    }
}
