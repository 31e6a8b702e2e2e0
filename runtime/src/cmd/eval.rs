//! `mae-run eval`: metrics on labelled data, through the shared implementation
//! (`mae_models::metrics`) that `mae-train eval` uses.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use mae_models::metrics::{evaluate_with, EvalOptions, Metrics};
use serde_json::json;

use crate::engine::settings::ModelArgs;
use crate::engine::Engine;
use crate::inputs::{self, labelled_items, Failure, Item};

/// Arguments of `mae-run eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A MedMNIST .npz file, an ImageFolder root (its `<split>/` folder is read), or a folder
    /// with one subfolder of images per class (read by torchvision's ImageFolder rules, each
    /// folder named after one of the model's classes).
    #[arg(long, value_name = "DIR|FILE.npz")]
    pub data_path: PathBuf,
    /// Split of a .npz file or an ImageFolder root.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Frame of multi-frame DICOM files: a number (from 0), or `all` for a sample per frame,
    /// each with its folder's label. Without it, each file's first frame.
    #[arg(long, value_name = "N|all")]
    pub frame: Option<inputs::Frames>,
    /// Images per inference batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Evaluate the first N samples only.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = EvalFormat::Table)]
    pub format: EvalFormat,
    /// Write the metrics to FILE (atomically) instead of standard output.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Also write every sample's label, prediction and probabilities as CSV to FILE.
    #[arg(long, value_name = "FILE")]
    pub predictions: Option<PathBuf>,
    /// Threads decoding and preprocessing images while the model runs.
    #[arg(long, default_value_t = 1)]
    pub decode_threads: usize,
}

/// `eval --format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalFormat {
    Table,
    Json,
}

/// Probabilities and labels of every sample that could be read.
#[derive(Debug, Default)]
pub struct Scored {
    pub names: Vec<String>,
    pub probs: Vec<Vec<f32>>,
    pub labels: Vec<Vec<i64>>,
    pub failures: Vec<Failure>,
}

/// Runs the model over labelled items.
pub fn score(
    engine: &mut Engine,
    items: Vec<Item>,
    batch_size: usize,
    decode_threads: usize,
) -> anyhow::Result<Scored> {
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let bar = crate::output::progress(items.len() as u64);
    let rx = inputs::pipeline(
        items,
        engine.meta.preprocess.clone(),
        batch_size,
        decode_threads,
    );
    let mut out = Scored::default();
    for batch in rx {
        bar.inc((batch.items.len() + batch.failures.len()) as u64);
        out.failures.extend(batch.failures);
        if batch.items.is_empty() {
            continue;
        }
        let probs = engine.probabilities(&batch.pixels, batch.items.len())?;
        for (item, p) in batch.items.into_iter().zip(probs) {
            out.names.push(item.name);
            out.labels.push(item.label.unwrap_or_default());
            out.probs.push(p);
        }
    }
    bar.finish_and_clear();
    Ok(out)
}

/// Metrics of scored samples, with the model's threshold and class names.
pub fn metrics(engine: &Engine, scored: &Scored) -> anyhow::Result<Metrics> {
    let c = scored
        .probs
        .first()
        .map_or(engine.meta.class_names.len(), Vec::len);
    if c == 0 {
        bail!("nothing was evaluated");
    }
    let flat: Vec<f32> = scored.probs.iter().flatten().copied().collect();
    let opts = EvalOptions {
        threshold: engine.meta.decision_threshold(),
        class_names: (0..c).map(|i| engine.meta.class_name(i)).collect(),
    };
    Ok(evaluate_with(
        engine.meta.task,
        &flat,
        c,
        &scored.labels,
        &opts,
    )?)
}

/// Runs `mae-run eval`.
pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let mut engine = args.model.load()?;
    engine.note_calibration();
    let items = labelled_items(&args.data_path, &args.split, &engine.meta.class_names)?;
    let (mut items, unreadable) = inputs::with_frames(items, args.frame);
    if let Some(n) = args.limit {
        items.truncate(n);
    }
    if items.is_empty() {
        bail!("{}: no samples", args.data_path.display());
    }
    let mut scored = score(&mut engine, items, args.batch_size, args.decode_threads)?;
    scored.failures.splice(0..0, unreadable);
    let m = metrics(&engine, &scored)?;
    let header = format!(
        "model {} · sha256 {} · {}\ndata {} ({})\n",
        engine.file.path.display(),
        engine.file.sha256,
        engine.describe_backend(),
        args.data_path.display(),
        args.split
    );
    let text = match args.format {
        EvalFormat::Table => format!("{header}{m}"),
        EvalFormat::Json => {
            serde_json::to_string_pretty(&json!({
                "model": {
                    "path": engine.file.path,
                    "sha256": engine.file.sha256,
                    "arch": engine.meta.arch,
                    "backend": engine.describe_backend(),
                    "temperature": engine.meta.temperature,
                    "threshold": engine.meta.decision_threshold(),
                },
                "data": {"path": args.data_path, "split": args.split},
                "summary": m.summary(),
                "metrics": m,
                "failures": scored.failures,
            }))? + "\n"
        }
    };
    crate::output::emit(args.output.as_deref(), &text)?;
    if let Some(p) = &args.predictions {
        let mut csv = mae_models::predictions::PredictionsCsv::new(m.num_classes, true);
        for (i, ((name, label), probs)) in scored
            .names
            .iter()
            .zip(&scored.labels)
            .zip(&scored.probs)
            .enumerate()
        {
            let pred = engine.label(probs, 1);
            csv.push(i, Some(name), label, &pred.labels, probs);
        }
        mae_models::io::atomic_write(p, csv.into_string().as_bytes())?;
        eprintln!("mae-run: wrote {}", p.display());
    }
    for f in &scored.failures {
        eprintln!("mae-run: failed: {}: {}", f.input, f.error);
    }
    Ok(if scored.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
