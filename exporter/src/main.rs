use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = mae_exporter::Cli::parse();
    match mae_exporter::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mae-export: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
