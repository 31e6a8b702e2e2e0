//! `mae-train`: MAE pretraining, fine-tuning, linear probing and evaluation on libtorch.

pub mod bench;
pub mod chart;
pub mod cli;
mod cmd;
pub mod data;
pub mod dist;
pub mod finetune;
pub mod launch;
pub mod linprobe;
pub mod mixup;
pub mod model;
pub mod optim;
pub mod plot;
pub mod precision;
pub mod pretrain;
pub mod rng;
pub mod run;
pub mod synth;
pub mod visualize;

use std::process::ExitCode;

use cli::{Cli, Command};

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Info => cmd::info(),
        Command::Models(a) => cmd::models(&a),
        Command::Inspect(a) => cmd::inspect(&a),
        Command::Synth(a) => cmd::synth(&a),
        Command::Finetune(a) => finetune::finetune(&a),
        Command::Eval(a) => finetune::eval(&a),
        Command::Linprobe(a) => linprobe::linprobe(&a),
        Command::Pretrain(a) => pretrain::pretrain(&a),
        Command::Visualize(a) => visualize::visualize(&a),
        Command::Bench(a) => bench::bench(&a),
        Command::Launch(a) => launch::launch(&a),
        Command::Slurm(a) => launch::slurm(&a),
        Command::Sweep(a) => cmd::sweep::sweep(&a),
    }
}
