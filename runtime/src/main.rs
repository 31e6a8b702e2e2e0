use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    mae_runtime::heap::keep_freed_memory();
    mae_models::io::exit_quietly_on_broken_pipe();
    let cli = mae_runtime::Cli::parse();
    match mae_runtime::run(cli) {
        Ok(code) => code,
        // The reader of standard output went away: end quietly, as Unix tools do.
        Err(e) if e.chain().any(mae_models::io::is_broken_pipe) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mae-run: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
