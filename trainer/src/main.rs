use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = mae_trainer::cli::Cli::parse();
    match mae_trainer::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mae-train: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
