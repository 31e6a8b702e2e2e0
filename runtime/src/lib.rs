//! `mae-run`: inference from self-describing ONNX models on clinic-side machines.
//! It needs no Python and no libtorch: everything comes from the ONNX file.

use std::process::ExitCode;

use clap::Parser;

/// Predictions, evaluation, an HTTP service and benchmarks from ONNX models.
#[derive(Debug, Parser)]
#[command(name = "mae-run", version)]
pub struct Cli {}

/// Runs one parsed command line.
pub fn run(_cli: Cli) -> anyhow::Result<ExitCode> {
    eprintln!(
        "mae-run {}: no inference commands in this build yet",
        env!("CARGO_PKG_VERSION")
    );
    Ok(ExitCode::from(2))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
