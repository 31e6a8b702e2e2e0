//! `mae-run predict`: labelled predictions for images, DICOM files, folders and `.npz` splits.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use std::collections::HashSet;

use anyhow::{bail, Context};
use mae_models::predictions::csv_field;
use serde_json::json;

use crate::engine::settings::ModelArgs;
use crate::engine::{Engine, Prediction};
use crate::explain::heatmap::{self, Colormap};
use crate::explain::occlusion::{self, Occlusion};
use crate::explain::{self, Explanation, Method};
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
    #[command(flatten)]
    pub explain: ExplainArgs,
}

/// Heatmaps of `mae-run predict`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExplainArgs {
    /// Explain each prediction with a heatmap (needs --heatmaps): `rollout` or `gradcam`, outputs
    /// of models exported with `mae-export --onnx --explain rollout,gradcam` (almost free), or
    /// `occlusion`, which works with any classifier but costs one pass of the model per window
    /// position per image (⌈(size − window) / stride⌉ + 1 positions along each side: 225 at the
    /// defaults).
    #[arg(long, value_enum, value_name = "METHOD", requires = "heatmaps")]
    pub explain: Option<Method>,
    /// Folder for the heatmaps, created if needed: per image `NAME.METHOD.png` (the map of the
    /// most probable class over the image the model saw) and `NAME.METHOD.npy` (float32 map:
    /// `[h, w]` for rollout, `[classes, h, w]` for gradcam and occlusion), written atomically.
    #[arg(long, value_name = "DIR", requires = "explain")]
    pub heatmaps: Option<PathBuf>,
    /// Colour map of the PNG heatmaps.
    #[arg(long, value_enum, default_value_t = Colormap::Jet)]
    pub colormap: Colormap,
    /// Opacity of the heatmap over the image, from 0 (image only) to 1 (heatmap only).
    #[arg(long, default_value_t = 0.5, value_name = "A")]
    pub opacity: f32,
    /// Occlusion: side of the square window, in pixels of the model's input (default: the
    /// input size / 8). Smaller windows give finer maps and cost more passes.
    #[arg(long, value_name = "PX")]
    pub occlusion_window: Option<usize>,
    /// Occlusion: step between window positions, in pixels (default: half the window; at most
    /// the window).
    #[arg(long, value_name = "PX")]
    pub occlusion_stride: Option<usize>,
    /// Occlusion: the value occluded pixels take in the model's normalised input (0: the
    /// normalisation's mean colour).
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "V",
        allow_negative_numbers = true
    )]
    pub occlusion_baseline: f32,
}

/// Where and how `predict` writes heatmaps.
#[derive(Debug)]
pub struct Heatmaps {
    pub method: Method,
    pub dir: PathBuf,
    pub style: heatmap::Style,
    pub occlusion: Occlusion,
    /// File stems used so far (two inputs of the same name get distinct files).
    used: HashSet<String>,
    pub written: usize,
}

impl Heatmaps {
    /// Checks the flags against the model and creates the folder; `None` without --explain.
    pub fn open(args: &ExplainArgs, engine: &Engine) -> anyhow::Result<Option<Self>> {
        let (Some(method), Some(dir)) = (args.explain, &args.heatmaps) else {
            return Ok(None);
        };
        if !(0.0..=1.0).contains(&args.opacity) {
            bail!("--opacity {} must be between 0 and 1", args.opacity);
        }
        explain::require(engine, method)?;
        let occlusion = Occlusion::resolve::<anyhow::Error>(
            args.occlusion_window,
            args.occlusion_stride,
            args.occlusion_baseline,
            engine.meta.preprocess.input_size,
        )?;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create --heatmaps folder {}", dir.display()))?;
        Ok(Some(Self {
            method,
            dir: dir.clone(),
            style: heatmap::Style {
                colormap: args.colormap,
                opacity: args.opacity,
                min_side: 224,
            },
            occlusion,
            used: HashSet::new(),
            written: 0,
        }))
    }

    /// Writes the PNG and `.npy` of one input's explanation; the PNG shows class `class`.
    fn write(
        &mut self,
        engine: &Engine,
        input: &str,
        pixels: &[f32],
        e: &Explanation,
        class: usize,
    ) -> anyhow::Result<()> {
        let base = heatmap::stem(input);
        let mut stem = base.clone();
        let mut k = 1;
        while !self.used.insert(stem.clone()) {
            stem = format!("{base}_{k}");
            k += 1;
        }
        let p = &engine.meta.preprocess;
        let img = heatmap::overlay(
            pixels,
            p.input_size,
            (p.mean, p.std),
            e.class_map(class)?,
            e.grid(),
            &self.style,
        )?;
        let m = self.method.as_str();
        heatmap::write(
            &self.dir.join(format!("{stem}.{m}.npy")),
            &heatmap::npy(&e.shape, &e.values),
        )?;
        heatmap::write(
            &self.dir.join(format!("{stem}.{m}.png")),
            &heatmap::png(&img)?,
        )?;
        self.written += 1;
        Ok(())
    }
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
    let job = Job {
        inputs,
        split,
        frames,
        batch_size,
        top_k,
        decode_threads,
    };
    predict_explained(engine, &job, None)
}

/// What `predict` runs over.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    pub inputs: &'a [PathBuf],
    pub split: &'a str,
    pub frames: Option<inputs::Frames>,
    pub batch_size: usize,
    pub top_k: usize,
    pub decode_threads: usize,
}

/// [`predict_all`], writing a heatmap of each prediction when `heatmaps` is given (a failure to
/// explain an image is that image's failure; a failure to write is fatal).
pub fn predict_explained(
    engine: &mut Engine,
    job: &Job<'_>,
    mut heatmaps: Option<&mut Heatmaps>,
) -> anyhow::Result<(Vec<Row>, Vec<Failure>)> {
    let Job {
        inputs,
        split,
        frames,
        batch_size,
        top_k,
        decode_threads,
    } = *job;
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
        let n = batch.items.len();
        let method = heatmaps.as_ref().map(|h| h.method);
        let result = match method {
            Some(m @ (Method::Rollout | Method::Gradcam)) => engine
                .scores(&batch.pixels, n)
                .and_then(|s| Ok((s.probabilities, explain::split_maps(&s.maps, m, n)?)))
                .map(|(p, e)| (p, e.into_iter().map(Some).collect())),
            _ => engine
                .probabilities(&batch.pixels, n)
                .map(|p| (p, vec![None; n])),
        };
        match result {
            Ok((probs, maps)) => {
                let len = engine.image_len();
                let rows_in = batch.items.into_iter().zip(batch.sha256).zip(probs);
                for (i, (((item, sha), p), map)) in rows_in.zip(maps).enumerate() {
                    let prediction = engine.label(&p, top_k);
                    if let Some(h) = heatmaps.as_deref_mut() {
                        let pixels = &batch.pixels[i * len..(i + 1) * len];
                        let e = match map {
                            Some(e) => Ok(e),
                            None => {
                                occlusion::explain(engine, pixels, &p, &h.occlusion, batch_size)
                            }
                        };
                        let e = match e {
                            Ok(e) => e,
                            Err(e) => {
                                failures.push(Failure {
                                    input: item.name,
                                    error: format!("explanation failed: {e:#}"),
                                });
                                continue;
                            }
                        };
                        let class = prediction.top.first().map_or(0, |t| t.index);
                        h.write(engine, &item.name, pixels, &e, class)?;
                    }
                    rows.push(Row {
                        input: item.name,
                        input_sha256: sha,
                        prediction,
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
    let mut heatmaps = Heatmaps::open(&args.explain, &engine)?;
    let job = Job {
        inputs: &args.inputs,
        split: &args.split,
        frames: args.frame,
        batch_size: args.batch_size,
        top_k: args.top_k,
        decode_threads: args.decode_threads,
    };
    let (rows, failures) = predict_explained(&mut engine, &job, heatmaps.as_mut())?;
    if let Some(h) = &heatmaps {
        eprintln!(
            "mae-run: wrote {} {} heatmaps (PNG and .npy) to {}",
            h.written,
            h.method.as_str(),
            h.dir.display()
        );
    }
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
