use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = mae_runtime::Cli::parse();
    match mae_runtime::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mae-run: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
