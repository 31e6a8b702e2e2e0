//! `mae-train`: MAE pretraining, fine-tuning, linear probing and evaluation on libtorch.

pub mod chart;
pub mod cli;
pub mod cmd;
pub mod data;
pub mod ema;
pub mod engine;
pub mod explain;
pub mod model;
pub mod optim;
pub mod plot;
pub mod recon;
pub mod rng;

use std::process::ExitCode;

use cli::{Cli, Command};

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Info => cmd::info::info(),
        Command::Models(a) => cmd::models::models(&a),
        Command::Inspect(a) => cmd::inspect::inspect(&a),
        Command::Synth(a) => cmd::synth::synth(&a),
        Command::ExportNpz(a) => cmd::export_npz::export_npz(&a),
        Command::Finetune(a) => cmd::finetune::finetune(&a),
        Command::Eval(a) => cmd::eval::eval(&a),
        Command::Linprobe(a) => cmd::linprobe::linprobe(&a),
        Command::Pretrain(a) => cmd::pretrain::pretrain(&a),
        Command::Visualize(a) => cmd::visualize::visualize(&a),
        Command::Bench(a) => cmd::bench::bench(&a),
        Command::Launch(a) => cmd::launch::launch(&a),
        Command::Slurm(a) => cmd::launch::slurm(&a),
        Command::Sweep(a) => cmd::sweep::sweep(&a),
    }
}
