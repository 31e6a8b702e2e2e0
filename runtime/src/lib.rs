//! `mae-run`: inference from self-describing ONNX models on clinic-side machines.
//! It needs no Python and no libtorch: everything comes from the ONNX file.
//!
//! Backends: tract (pure Rust, CPU, default) and ONNX Runtime (`libonnxruntime.so` loaded at run
//! time; CPU or CUDA). Preprocessing and metrics are `mae_models`' shared implementations, the
//! ones `mae-train eval` uses, so a prediction here equals the one made in training.

pub mod audit;
pub mod auth;
pub mod backend;
pub mod bench;
pub mod calibrate;
pub mod dense;
pub mod dicom;
pub mod engine;
pub mod eval;
pub mod info;
pub mod inputs;
pub mod model;
pub mod oip;
pub mod ortlib;
pub mod predict;
pub mod protoedit;
pub mod qdense;
pub mod repository;
pub mod serve;
#[cfg(test)]
pub(crate) mod testgraph;
pub mod tract_rewrite;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::backend::{BackendKind, Device, LoadOptions};
use crate::engine::Engine;
use crate::model::MetaOverrides;

/// Predictions, evaluation, an HTTP service and benchmarks from ONNX models exported by
/// mae-export (or any ONNX image classifier, given its preprocessing).
#[derive(Debug, Parser)]
#[command(name = "mae-run", version)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace), or a tracing filter.
    #[arg(long, global = true, default_value = "warn")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inputs, outputs, opsets, metadata and SHA-256 of a model.
    Info(info::InfoArgs),
    /// Classify images, DICOM files, folders and .npz splits.
    Predict(predict::PredictArgs),
    /// Metrics on a labelled data set (the table `mae-train eval` prints).
    Eval(eval::EvalArgs),
    /// Fit a temperature (and a binary decision threshold) on validation data; write them into
    /// a copy of the model.
    Calibrate(calibrate::CalibrateArgs),
    /// Serve predictions over HTTP (JSON API, dynamic batching).
    Serve(serve::ServeArgs),
    /// Load time, latency percentiles, throughput and peak memory.
    Bench(bench::BenchArgs),
}

/// `--parallel` values: how tract uses its threads on a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Parallel {
    Auto,
    Images,
    Ops,
}

/// Options shared by every command that runs a model.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// The ONNX model.
    #[arg(long, short = 'm', value_name = "FILE")]
    pub model: PathBuf,
    /// Inference engine.
    #[arg(long, value_enum, default_value_t = BackendKind::Tract)]
    pub backend: BackendKind,
    /// Where to run: cpu, cuda (ONNX Runtime's CUDA provider; an error without it) or auto
    /// (CUDA when available, else CPU with a warning).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Threads for inference (default: every core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// How tract spreads a batch over its threads: `images` gives each thread a share of the
    /// batch's images (a single-threaded plan each: throughput), `ops` splits every matrix
    /// product across the threads (latency), `auto` takes images for batches of two or more
    /// and ops for one image (and for a batch's images past its last whole round over the
    /// threads). ONNX Runtime uses its own intra-op threads.
    #[arg(long, value_enum, default_value_t = Parallel::Auto)]
    pub parallel: Parallel,
    /// libonnxruntime.so to load (default: ORT_DYLIB_PATH, beside the executable, the project
    /// virtualenv, the system library folders).
    #[arg(long, value_name = "FILE")]
    pub ort_lib: Option<PathBuf>,
    /// Refuse the model unless its SHA-256 is this (hex).
    #[arg(long, value_name = "HEX")]
    pub expect_sha256: Option<String>,
    #[command(flatten)]
    pub overrides: MetaOverrides,
}

impl ModelArgs {
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            kind: self.backend,
            device: self.device,
            threads: engine::threads(self.threads),
            parallel: self.parallel,
            ort_lib: self.ort_lib.clone(),
        }
    }

    /// Loads the model, reporting what was loaded on standard error.
    pub fn load(&self) -> anyhow::Result<Engine> {
        let engine = Engine::load(
            &self.model,
            self.expect_sha256.as_deref(),
            &self.overrides,
            &self.load_options(),
        )?;
        tracing::info!(
            "loaded {} ({}) in {:.0} ms on {}",
            self.model.display(),
            &engine.file.sha256[..12],
            engine.load_time.as_secs_f64() * 1e3,
            engine.describe_backend()
        );
        Ok(engine)
    }
}

/// Says on standard error that a calibration stored in the model is in force.
pub fn note_calibration(engine: &Engine) {
    let m = &engine.meta;
    if m.temperature.is_some() || m.threshold.is_some() {
        let mut parts = Vec::new();
        if let Some(t) = m.temperature {
            parts.push(format!("temperature {t:.4}"));
        }
        if let Some(t) = m.threshold {
            parts.push(format!("threshold {t:.4}"));
        }
        eprintln!(
            "mae-run: applying the model's calibration: {} (--no-calibration to ignore)",
            parts.join(", ")
        );
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    init_logging(&cli.log);
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Bench(a) => bench::run(a),
    }
}

/// Writes `text` to `path` atomically, or to standard output when `path` is `None`.
pub fn emit(path: Option<&std::path::Path>, text: &str) -> anyhow::Result<()> {
    match path {
        Some(p) => {
            mae_models::io::atomic_write(p, text.as_bytes())?;
            eprintln!("mae-run: wrote {}", p.display());
        }
        None => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
