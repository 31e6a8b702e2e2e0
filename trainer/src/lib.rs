//! `mae-train`: MAE pretraining, fine-tuning, linear probing and evaluation on libtorch.

pub mod cli;
mod cmd;
pub mod synth;

use std::process::ExitCode;

use cli::{Cli, Command};

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Info => cmd::info(),
        Command::Models(a) => cmd::models(&a),
        Command::Inspect(a) => cmd::inspect(&a),
        Command::Synth(a) => cmd::synth(&a),
    }
}
