//! `mae-run`: inference from self-describing ONNX models on clinic-side machines.
//! It needs no Python and no libtorch: everything comes from the ONNX file.
//!
//! Backends: tract (pure Rust, CPU, default) and ONNX Runtime (`libonnxruntime.so` loaded at run
//! time; CPU or CUDA). Preprocessing and metrics are `mae_models`' shared implementations, the
//! ones `mae-train eval` uses, so a prediction here equals the one made in training.
//!
//! The layers, each importing only those below it:
//! - [`cmd`]: one file per command;
//! - [`serve`]: the HTTP service (routes, workers, metrics, audit log, transport);
//! - [`dicom`]: the DICOM node (listener, spool, results as SR and Secondary Capture, outboxes);
//! - [`explain`]: explanation maps (rollout and Grad-CAM from the graph, occlusion) and heatmaps;
//! - [`inputs`], [`output`]: what the commands read and write;
//! - [`engine`]: a loaded model, its settings and its backends;
//! - [`accel`]: mae-run's rewrites of tract's graph, and its operators;
//! - [`kernels`]: the CPU kernels of those operators.

pub mod accel;
pub mod cmd;
pub mod dicom;
pub mod engine;
pub mod explain;
pub mod heap;
pub mod inputs;
pub mod kernels;
pub mod output;
pub mod serve;
#[cfg(test)]
pub(crate) mod testgraph;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    Info(cmd::info::InfoArgs),
    /// Classify images, DICOM files, folders and .npz splits.
    Predict(cmd::predict::PredictArgs),
    /// Metrics on a labelled data set (the table `mae-train eval` prints).
    Eval(cmd::eval::EvalArgs),
    /// Fit a temperature (and a binary decision threshold) on validation data; write them into
    /// a copy of the model.
    Calibrate(cmd::calibrate::CalibrateArgs),
    /// Serve predictions over HTTP (JSON API, dynamic batching).
    Serve(cmd::serve::ServeArgs),
    /// Load time, latency percentiles, throughput and peak memory.
    Bench(cmd::bench::BenchArgs),
    /// C-ECHO a DICOM node (AE@HOST:PORT).
    DicomEcho(cmd::dicom_echo::DicomEchoArgs),
    /// Send DICOM files to a DICOM node by C-STORE.
    DicomSend(cmd::dicom_send::DicomSendArgs),
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
        Command::Info(a) => cmd::info::run(a),
        Command::Predict(a) => cmd::predict::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Calibrate(a) => cmd::calibrate::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::DicomEcho(a) => cmd::dicom_echo::run(a),
        Command::DicomSend(a) => cmd::dicom_send::run(a),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
