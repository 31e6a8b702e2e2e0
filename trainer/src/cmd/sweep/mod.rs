//! `mae-train sweep`: the data-efficiency experiment as one command.
//!
//! A sweep is a grid of cells, training-set size × seed × initialisation × kind. A cell of kind
//! `finetune` is one `mae-train finetune`, of kind `linprobe` one `mae-train linprobe`, with the
//! shared flags, its kind's, its size's and (fine-tune cells) its init's (`flags.rs`), plus the
//! cell's own `--train-samples`, `--seed`, `--finetune` and `--output-dir`; then one
//! `mae-train eval` of its best checkpoint on the test split. Cells run as child processes of
//! this same binary, each in its own folder with its log, so a failing cell names its log and a
//! finished one is never run again: a cell is done when its `cell.json` exists, which is written
//! last and atomically. After every cell the summary (`sweep.csv`, `sweep.md`, `sweep.png`) is
//! written anew from the finished cells.

mod chart;
mod flags;
pub mod summary;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;

use crate::cli::{
    Cli, Command as Sub, DataArgs, FinetuneArgs, LinprobeArgs, OptimArgs, RunArgs, SweepArgs,
    SweepKind,
};
use summary::Row;

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
    pub kind: SweepKind,
    /// Its training flags: the shared ones, its kind's and its init's, layered.
    pub flags: Vec<String>,
    pub dir: PathBuf,
}

/// Parses `600,6000,all`.
pub fn parse_sizes(items: &[String]) -> anyhow::Result<Vec<Size>> {
    let mut sizes = Vec::new();
    for s in items {
        let Some(size) = parse_size(s) else {
            bail!("--train-samples: '{s}' is neither a positive count nor 'all'")
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

/// One size: `all` or a positive count.
fn parse_size(s: &str) -> Option<Size> {
    match s.trim() {
        "all" => Some(Size::All),
        t => match t.parse::<usize>() {
            Ok(n) if n > 0 => Some(Size::Count(n)),
            _ => None,
        },
    }
}

/// Gathers each `--size-args SIZE=FLAGS` by its size, which must be one of `sizes`.
pub fn parse_size_args(
    sizes: &[Size],
    size_args: &[String],
) -> anyhow::Result<Vec<(Size, Vec<String>)>> {
    let mut out: Vec<(Size, Vec<String>)> = Vec::new();
    for spec in size_args {
        let Some((label, flags)) = spec.split_once('=') else {
            bail!("--size-args '{spec}': expected SIZE=FLAGS, e.g. 'all=--epochs 4'");
        };
        let size = parse_size(label).filter(|s| sizes.contains(s));
        let Some(size) = size else {
            let labels: Vec<String> = sizes.iter().map(|s| s.label()).collect();
            bail!(
                "--size-args '{spec}': '{label}' is not among --train-samples ({})",
                labels.join(",")
            );
        };
        let words = shlex::split(flags)
            .with_context(|| format!("--size-args '{spec}': unbalanced quotes"))?;
        match out.iter_mut().find(|(s, _)| *s == size) {
            Some((_, extra)) => extra.extend(words),
            None => out.push((size, words)),
        }
    }
    Ok(out)
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

/// Checks `--kinds` and gathers each kind's `--kind-args KIND=FLAGS`.
pub fn parse_kinds(
    kinds: &[SweepKind],
    kind_args: &[String],
) -> anyhow::Result<Vec<(SweepKind, Vec<String>)>> {
    let mut out: Vec<(SweepKind, Vec<String>)> = Vec::new();
    for &kind in kinds {
        if out.iter().any(|(k, _)| *k == kind) {
            bail!("--kinds: '{}' is given twice", kind.command());
        }
        out.push((kind, Vec::new()));
    }
    if out.is_empty() {
        bail!("--kinds: give at least one of finetune, linprobe");
    }
    for spec in kind_args {
        let Some((name, flags)) = spec.split_once('=') else {
            bail!(
                "--kind-args '{spec}': expected KIND=FLAGS, e.g. 'linprobe=--epochs 90 --blr 0.1'"
            );
        };
        let names: Vec<&str> = out.iter().map(|(k, _)| k.command()).collect();
        let Some((_, extra)) = out.iter_mut().find(|(k, _)| k.command() == name) else {
            bail!(
                "--kind-args '{spec}': '{name}' is not among --kinds ({})",
                names.join(",")
            );
        };
        let words = shlex::split(flags)
            .with_context(|| format!("--kind-args '{spec}': unbalanced quotes"))?;
        extra.extend(words);
    }
    Ok(out)
}

/// The training arguments of one cell, without the program name.
/// Writes `sweep.csv`, `sweep.md` and `sweep.png` in `dir`, each atomically.
fn write_summary(dir: &Path, rows: &[Row], command_line: &str) -> anyhow::Result<()> {
    summary::write_tables(dir, rows, command_line)?;
    chart::sweep_png(&dir.join("sweep.png"), rows)
}

fn cell_args(cell: &Cell) -> Vec<String> {
    let mut v = vec![cell.kind.command().to_string()];
    v.extend(cell.flags.iter().cloned());
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

/// A cell's training flags as its command parsed them.
#[derive(Debug)]
enum Parsed {
    Finetune(Box<FinetuneArgs>),
    Linprobe(Box<LinprobeArgs>),
}

impl Parsed {
    /// The flag groups the evaluation of the cell reads.
    fn parts(&self) -> (&DataArgs, &OptimArgs, &RunArgs) {
        match self {
            Parsed::Finetune(a) => (&a.data, &a.optim, &a.run),
            Parsed::Linprobe(a) => (&a.data, &a.optim, &a.run),
        }
    }
}

/// Parses a cell's training arguments as `mae-train` will, so a bad flag fails before any
/// cell runs.
fn parse_cell(args: &[String]) -> anyhow::Result<Parsed> {
    let kind = args.first().map_or("", |s| s.as_str());
    let argv = std::iter::once("mae-train".to_string()).chain(args.iter().cloned());
    match Cli::try_parse_from(argv) {
        Ok(Cli {
            command: Sub::Finetune(a),
        }) => Ok(Parsed::Finetune(a)),
        Ok(Cli {
            command: Sub::Linprobe(a),
        }) => Ok(Parsed::Linprobe(a)),
        Ok(_) => bail!("the {kind} flags did not parse as a training command"),
        Err(e) => {
            let text = e.to_string();
            bail!(
                "the {kind} flags are not valid: {}",
                text.trim().trim_start_matches("error: ")
            )
        }
    }
}

/// The eval arguments of one cell (its best checkpoint on `split`).
fn eval_args(cell: &Cell, parsed: &Parsed, split: &str) -> Vec<String> {
    let (data, optim, run) = parsed.parts();
    let device = clap::ValueEnum::to_possible_value(&run.device)
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
        data.data_path.display().to_string(),
        "--split".into(),
        split.into(),
        "--batch-size".into(),
        optim.batch_size.to_string(),
        "--num-workers".into(),
        data.num_workers.to_string(),
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

/// The grid of a sweep, checked: every cell's flags parse and every size fits the data.
struct Plan {
    cells: Vec<Cell>,
    parsed: Vec<Parsed>,
    train_len: usize,
    /// "8 cells (2 sizes × 2 seeds × 2 inits)".
    shape: String,
}

/// The cells of `a` in the order they run (seed, size, init, kind), checked before any runs.
fn plan(a: &SweepArgs) -> anyhow::Result<Plan> {
    let sizes = parse_sizes(&a.train_samples)?;
    let inits = parse_inits(&a.init, &a.init_args)?;
    let kinds = parse_kinds(&a.kinds, &a.kind_args)?;
    let size_args = parse_size_args(&sizes, &a.size_args)?;
    if a.seeds.is_empty() {
        bail!("--seeds: give at least one seed");
    }
    flags::check_own_flags(&a.shared, "the shared flags")?;
    for (kind, extra) in &kinds {
        flags::check_own_flags(extra, &format!("--kind-args of '{}'", kind.command()))?;
    }
    for init in &inits {
        flags::check_own_flags(&init.extra, &format!("--init-args of '{}'", init.name))?;
    }
    for (size, extra) in &size_args {
        flags::check_own_flags(extra, &format!("--size-args of '{}'", size.label()))?;
    }
    let has_finetune = kinds.iter().any(|(k, _)| *k == SweepKind::Finetune);
    if !a.init_args.is_empty() && !has_finetune {
        bail!("--init-args gives fine-tune flags, but --kinds has no finetune");
    }
    let kind_list: Vec<SweepKind> = kinds.iter().map(|(k, _)| *k).collect();
    flags::check_shared_flags_fit(&a.shared, &kind_list)?;
    let mut cells = Vec::new();
    for &seed in &a.seeds {
        for &size in &sizes {
            let size_extra: &[String] = size_args
                .iter()
                .find(|(s, _)| *s == size)
                .map_or(&[], |(_, extra)| extra);
            for init in &inits {
                for (kind, extra) in &kinds {
                    cells.push(new_cell(
                        &a.output_dir,
                        &a.shared,
                        (*kind, extra, size_extra),
                        init,
                        size,
                        seed,
                    ));
                }
            }
        }
    }
    // Every cell's flags parse before anything runs.
    let mut parsed = Vec::with_capacity(cells.len());
    for cell in &cells {
        let p =
            parse_cell(&cell_args(cell)).with_context(|| format!("cell {}", cell_name(cell)))?;
        parsed.push(p);
    }
    let data_path = &parsed[0].parts().0.data_path;
    let train_len = crate::data::open(data_path, "train")?.len();
    for &size in &sizes {
        if let Size::Count(n) = size {
            if n > train_len {
                bail!(
                    "--train-samples {n} is more than the {train_len} training images; use 'all'"
                );
            }
        }
    }
    let kinds_shape = match kinds.len() {
        1 => String::new(),
        n => format!(" × {n} kinds"),
    };
    let shape = format!(
        "{} cells ({} sizes × {} seeds × {} inits{kinds_shape})",
        cells.len(),
        sizes.len(),
        a.seeds.len(),
        inits.len()
    );
    Ok(Plan {
        cells,
        parsed,
        train_len,
        shape,
    })
}

/// One cell: fine-tune cells in `DIR/cells/{init}/n{size}/seed{seed}/` (as before sweeps had
/// kinds, so an old sweep resumes), linear-probe cells in `DIR/cells/{init}/linprobe/...`.
fn new_cell(
    out: &Path,
    shared: &[String],
    (kind, kind_extra, size_extra): (SweepKind, &[String], &[String]),
    init: &Init,
    size: Size,
    seed: u64,
) -> Cell {
    let mut dir = out.join("cells").join(&init.name);
    let flags = match kind {
        SweepKind::Finetune => flags::layered(kind, &[shared, kind_extra, size_extra, &init.extra]),
        SweepKind::Linprobe => {
            dir.push(kind.command());
            flags::layered(kind, &[shared, kind_extra, size_extra])
        }
    };
    dir.push(format!("n{}", size.label()));
    dir.push(format!("seed{seed}"));
    Cell {
        size,
        seed,
        init: init.clone(),
        kind,
        flags,
        dir,
    }
}

/// `mae-train sweep`.
pub fn sweep(a: &SweepArgs) -> anyhow::Result<ExitCode> {
    let plan = plan(a)?;
    let exe = std::env::current_exe().context("cannot find the mae-train executable")?;
    if a.dry_run {
        println!("{}, {} training images", plan.shape, plan.train_len);
        for (cell, parsed) in plan.cells.iter().zip(&plan.parsed) {
            let done = cell.dir.join("cell.json").is_file();
            println!(
                "# {}{}",
                cell_name(cell),
                if done { " (done, will be skipped)" } else { "" }
            );
            let train = launched(cell_args(cell), a.nproc_per_node);
            println!("{}", shell_line(&exe, &train));
            let eval = launched(eval_args(cell, parsed, &a.eval_split), a.nproc_per_node);
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
    let total = plan.cells.len();
    for (i, (cell, parsed)) in plan.cells.iter().zip(&plan.parsed).enumerate() {
        let tag = format!("[{}/{total}] {}", i + 1, cell_name(cell));
        let done = cell.dir.join("cell.json");
        if let Some(row) = read_row(&done) {
            println!("{tag}: done before, skipped");
            rows.push(row);
            continue;
        }
        println!(
            "{tag}: training ({:.0}s into the sweep)",
            started.elapsed().as_secs_f64()
        );
        let row = run_cell(&exe, a, cell, parsed, plan.train_len)
            .with_context(|| format!("cell {}", cell_name(cell)))?;
        println!(
            "{tag}: best epoch {}, val AUC {}, test AUC {} ACC {:.4} ({:.0}s)",
            row.best_epoch.map_or("-".into(), |e| e.to_string()),
            fmt_opt(row.val_auc),
            fmt_opt(row.test_auc),
            row.test_acc,
            row.train_seconds
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

/// Trains and tests one cell from nothing (an interrupted one is cleared first) and reads its
/// results.
fn run_cell(
    exe: &Path,
    a: &SweepArgs,
    cell: &Cell,
    parsed: &Parsed,
    train_len: usize,
) -> anyhow::Result<Row> {
    if cell.dir.exists() {
        std::fs::remove_dir_all(&cell.dir)
            .with_context(|| format!("cannot clear the unfinished cell {}", cell.dir.display()))?;
    }
    std::fs::create_dir_all(&cell.dir)
        .with_context(|| format!("cannot create {}", cell.dir.display()))?;
    let t0 = Instant::now();
    let train = launched(cell_args(cell), a.nproc_per_node);
    let doing = match cell.kind {
        SweepKind::Finetune => "fine-tuning",
        SweepKind::Linprobe => "linear probing",
    };
    run_logged(exe, &train, &cell.dir.join("train.log"))
        .with_context(|| format!("{doing} failed"))?;
    let train_seconds = t0.elapsed().as_secs_f64();
    let eval = launched(eval_args(cell, parsed, &a.eval_split), a.nproc_per_node);
    run_logged(exe, &eval, &cell.dir.join("eval.log")).context("evaluation failed")?;
    cell_row(cell, train_len, train_seconds).context("reading its results")
}

/// `init mae · 600 images · seed 0`; a linear-probe cell says so after its init.
fn cell_name(cell: &Cell) -> String {
    let kind = match cell.kind {
        SweepKind::Finetune => String::new(),
        SweepKind::Linprobe => format!(" · {}", cell.kind.command()),
    };
    format!(
        "init {}{kind} · {} images · seed {}",
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
        kind: cell.kind.command().into(),
        best_epoch: meta.epoch,
        val_auc: meta.metrics.get("auc").copied(),
        val_acc: meta.metrics.get("acc1").copied().unwrap_or(f64::NAN),
        test_auc: test["auc"].as_f64(),
        test_acc,
        train_seconds,
    })
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
        let shared = s(&["--data-path", "d.npz", "--epochs", "3"]);
        let cell = new_cell(
            Path::new("out"),
            &shared,
            (SweepKind::Finetune, &[], &[]),
            &init,
            Size::Count(600),
            2,
        );
        assert_eq!(cell.dir, Path::new("out/cells/mae/n600/seed2"));
        let args = cell_args(&cell);
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
        let Parsed::Finetune(ft) = parse_cell(&args).unwrap() else {
            panic!("not a fine-tune")
        };
        assert_eq!(ft.train_samples, Some(600));
        assert_eq!(ft.layer_decay, 0.75);
        assert_eq!(
            launched(s(&["eval"]), 2)[..4],
            s(&["launch", "--nproc-per-node", "2", "--"])[..]
        );
        assert!(parse_cell(&s(&["finetune", "--bogus"])).is_err());

        // A linear-probe cell: its own folder, its kind's flags over the shared ones, and
        // not the init's fine-tune flags.
        let lp = s(&["--epochs", "1", "--blr", "0.1"]);
        let cell = new_cell(
            Path::new("out"),
            &shared,
            (SweepKind::Linprobe, &lp, &[]),
            &init,
            Size::All,
            0,
        );
        assert_eq!(cell.dir, Path::new("out/cells/mae/linprobe/nall/seed0"));
        let args = cell_args(&cell);
        assert_eq!(
            args[..7],
            s(&[
                "linprobe",
                "--data-path",
                "d.npz",
                "--epochs",
                "1",
                "--blr",
                "0.1"
            ])[..]
        );
        let Parsed::Linprobe(lp) = parse_cell(&args).unwrap() else {
            panic!("not a linear probe")
        };
        assert_eq!((lp.optim.epochs, lp.train_samples), (1, None));
        assert_eq!(
            cell_name(&cell),
            "init mae · linprobe · all images · seed 0"
        );
    }

    #[test]
    fn kinds_take_their_own_flags() {
        let both = [SweepKind::Finetune, SweepKind::Linprobe];
        let kinds = parse_kinds(&both, &s(&["linprobe=--blr 0.1 --epochs ' 3'"])).unwrap();
        assert_eq!(kinds[0], (SweepKind::Finetune, vec![]));
        assert_eq!(
            kinds[1],
            (SweepKind::Linprobe, s(&["--blr", "0.1", "--epochs", " 3"]))
        );
        let one = [SweepKind::Finetune];
        let err = parse_kinds(&one, &s(&["linprobe=--blr 0.1"])).unwrap_err();
        assert!(err
            .to_string()
            .contains("'linprobe' is not among --kinds (finetune)"));
        assert!(parse_kinds(&one, &s(&["no-equals"])).is_err());
        assert!(parse_kinds(&[SweepKind::Linprobe; 2], &[]).is_err());
        assert!(parse_kinds(&[], &[]).is_err());
    }
}
