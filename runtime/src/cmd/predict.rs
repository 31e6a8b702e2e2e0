//! `mae-run predict`: labelled predictions for images, DICOM files, folders and `.npz` splits.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use mae_models::predictions::csv_field;
use serde_json::json;

use crate::engine::settings::ModelArgs;
use crate::engine::{Engine, Prediction};
use crate::inputs::{self, Failure};
use crate::serve::audit::{AuditLog, AuditRecord};

/// Arguments of `mae-run predict`.
#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image files (PNG, JPEG, BMP, TIFF, PPM/PGM, WebP), DICOM files (`FILE.dcm#N` for frame
    /// N, from 0), folders (walked recursively) and MedMNIST .npz files.
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// Split of .npz inputs.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Frame of multi-frame DICOM files: a number (from 0), or `all` for a row per frame.
    /// Rows are then named FILE#N. Without it, each file's first frame, under its name.
    #[arg(long, value_name = "N|all")]
    pub frame: Option<inputs::Frames>,
    /// Images per inference batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Classes listed per input, most probable first.
    #[arg(long, default_value_t = 1)]
    pub top_k: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Write the output to FILE (atomically) instead of standard output.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Append one JSON line per prediction to FILE (time, input and its SHA-256, model SHA-256,
    /// outputs).
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Threads decoding and preprocessing images while the model runs.
    #[arg(long, default_value_t = 1)]
    pub decode_threads: usize,
}

/// `predict --format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
    Jsonl,
}

/// One input's result.
#[derive(Debug, Clone)]
pub struct Row {
    pub input: String,
    pub input_sha256: String,
    pub prediction: Prediction,
}

/// Runs the model over every input; failures (unreadable, undecodable) are collected, not
/// fatal. Returns the rows in input order and the failures.
pub fn predict_all(
    engine: &mut Engine,
    inputs: &[PathBuf],
    split: &str,
    frames: Option<inputs::Frames>,
    batch_size: usize,
    top_k: usize,
    decode_threads: usize,
) -> anyhow::Result<(Vec<Row>, Vec<Failure>)> {
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let (items, mut failures) = inputs::collect(inputs, split, frames);
    let total = items.len() as u64;
    let bar = crate::output::progress(total);
    let rx = inputs::pipeline(
        items,
        engine.meta.preprocess.clone(),
        batch_size,
        decode_threads,
    );
    let mut rows = Vec::with_capacity(total as usize);
    for batch in rx {
        bar.inc((batch.items.len() + batch.failures.len()) as u64);
        failures.extend(batch.failures);
        if batch.items.is_empty() {
            continue;
        }
        match engine.probabilities(&batch.pixels, batch.items.len()) {
            Ok(probs) => {
                for ((item, sha), p) in batch.items.into_iter().zip(batch.sha256).zip(probs) {
                    rows.push(Row {
                        input: item.name,
                        input_sha256: sha,
                        prediction: engine.label(&p, top_k),
                    });
                }
            }
            Err(e) => {
                for item in batch.items {
                    failures.push(Failure {
                        input: item.name,
                        error: format!("inference failed: {e:#}"),
                    });
                }
            }
        }
    }
    bar.finish_and_clear();
    Ok((rows, failures))
}

/// Runs `mae-run predict`.
pub fn run(args: PredictArgs) -> anyhow::Result<ExitCode> {
    let audit = args.audit_log.as_deref().map(AuditLog::open).transpose()?;
    let mut engine = args.model.load()?;
    engine.note_calibration();
    let (rows, failures) = predict_all(
        &mut engine,
        &args.inputs,
        &args.split,
        args.frame,
        args.batch_size,
        args.top_k,
        args.decode_threads,
    )?;
    if let Some(log) = &audit {
        for r in &rows {
            log.append(&AuditRecord {
                api: Some("cli"),
                model: Some(engine.file.path.display().to_string()),
                backend: Some(engine.describe_backend()),
                ..AuditRecord::prediction(
                    &engine.meta,
                    r.input.clone(),
                    &r.input_sha256,
                    &r.prediction,
                )
            })?;
        }
    }
    let text = render(&engine, &rows, &failures, args.format);
    crate::output::emit(args.output.as_deref(), &text)?;
    for f in &failures {
        eprintln!("mae-run: failed: {}: {}", f.input, f.error);
    }
    eprintln!(
        "mae-run: {} predicted, {} failed · model {} ({})",
        rows.len(),
        failures.len(),
        &engine.file.sha256[..12],
        engine
            .meta
            .arch
            .as_deref()
            .unwrap_or("unknown architecture")
    );
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn class_text(p: &Prediction) -> String {
    match &p.class {
        Some(c) => c.clone(),
        None if p.labels.is_empty() => "(none)".to_string(),
        None => p.labels.join("+"),
    }
}

/// The output document of `predict`.
pub fn render(engine: &Engine, rows: &[Row], failures: &[Failure], format: Format) -> String {
    let meta = &engine.meta;
    let c = rows
        .first()
        .map_or(meta.class_names.len(), |r| r.prediction.probabilities.len());
    let names: Vec<String> = (0..c).map(|i| meta.class_name(i)).collect();
    let sha = &engine.file.sha256;
    let arch = meta.arch.clone().unwrap_or_default();
    let row_json = |r: &Row| {
        json!({
            "input": r.input,
            "input_sha256": r.input_sha256,
            "class": r.prediction.class,
            "probability": r.prediction.probability,
            "labels": r.prediction.labels,
            "top": r.prediction.top,
            "probabilities": r.prediction.probabilities,
            "model_sha256": sha,
            "arch": arch,
        })
    };
    match format {
        Format::Json => {
            let doc = json!({
                "model": {
                    "path": engine.file.path,
                    "sha256": sha,
                    "arch": meta.arch,
                    "task": meta.task.as_str(),
                    "class_names": names,
                    "backend": engine.describe_backend(),
                    "temperature": meta.temperature,
                    "threshold": meta.decision_threshold(),
                },
                "predictions": rows.iter().map(row_json).collect::<Vec<_>>(),
                "failures": failures,
                "summary": {"predicted": rows.len(), "failed": failures.len()},
            });
            serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
        }
        Format::Jsonl => {
            let mut s = String::new();
            for r in rows {
                s += &row_json(r).to_string();
                s.push('\n');
            }
            for f in failures {
                s +=
                    &json!({"input": f.input, "error": f.error, "model_sha256": sha, "arch": arch})
                        .to_string();
                s.push('\n');
            }
            s
        }
        Format::Csv => {
            let mut s = String::from("input,class,probability");
            for n in &names {
                let _ = write!(s, ",{}", csv_field(&format!("p_{n}")));
            }
            s += ",input_sha256,model_sha256,arch\n";
            for r in rows {
                let p = &r.prediction;
                let _ = write!(
                    s,
                    "{},{},{}",
                    csv_field(&r.input),
                    csv_field(&class_text(p)),
                    p.probability.map_or(String::new(), |v| format!("{v:.6}"))
                );
                for v in &p.probabilities {
                    let _ = write!(s, ",{v:.6}");
                }
                let _ = writeln!(s, ",{},{sha},{}", r.input_sha256, csv_field(&arch));
            }
            s
        }
        Format::Table => {
            let w = rows
                .iter()
                .map(|r| r.input.chars().count())
                .max()
                .unwrap_or(5)
                .clamp(5, 60);
            let cw = rows
                .iter()
                .map(|r| class_text(&r.prediction).chars().count())
                .max()
                .unwrap_or(5)
                .max(5);
            let mut s = format!("{:<w$}  {:<cw$}  {:>7}  top\n", "input", "class", "prob");
            for r in rows {
                let p = &r.prediction;
                let top: Vec<String> = p
                    .top
                    .iter()
                    .map(|t| format!("{} {:.4}", t.name, t.probability))
                    .collect();
                let _ = writeln!(
                    s,
                    "{:<w$}  {:<cw$}  {:>7}  {}",
                    shorten(&r.input, w),
                    class_text(p),
                    p.probability.map_or("-".into(), |v| format!("{v:.4}")),
                    top.join(", ")
                );
            }
            let _ = writeln!(
                s,
                "{} predicted, {} failed · model sha256 {sha} · {}",
                rows.len(),
                failures.len(),
                if arch.is_empty() {
                    "unknown architecture"
                } else {
                    &arch
                }
            );
            s
        }
    }
}

/// The last `w` characters of `s`, with an ellipsis when cut.
fn shorten(s: &str, w: usize) -> String {
    let n = s.chars().count();
    if n <= w {
        s.to_string()
    } else {
        format!("…{}", s.chars().skip(n - w + 1).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quoting() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(shorten("abcdef", 4), "…def");
    }
}
