//! `mae-export`: turns a checkpoint into a self-describing ONNX model, without libtorch.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Parser;
use mae_models::checkpoint;
use mae_models::{LoadReport, ModelConfig};

/// Export MAE / ViT checkpoints (ours or official facebookresearch/mae `.pth` files).
#[derive(Debug, Parser)]
#[command(name = "mae-export", version)]
pub struct Cli {
    /// The checkpoint: our `.safetensors` or an official `.pth`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Architecture of a checkpoint that does not describe itself (official `.pth` files).
    #[arg(long)]
    pub model: Option<String>,
    /// Write an ONNX model.
    #[arg(long, conflicts_with = "inspect")]
    pub onnx: bool,
    /// Only read the checkpoint and print what it holds and how it matches the model.
    #[arg(long)]
    pub inspect: bool,
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ck = checkpoint::load(&cli.checkpoint)
        .with_context(|| format!("cannot read checkpoint {}", cli.checkpoint.display()))?;
    let cfg = match (&cli.model, &ck.meta) {
        (Some(name), _) => ModelConfig::preset(name)?,
        (None, Some(meta)) => meta.config.clone(),
        (None, None) => bail!(
            "{} does not describe its architecture; pass --model (e.g. vit_base_patch16)",
            cli.checkpoint.display()
        ),
    };
    let report = LoadReport::compare(&cfg.parameters(), ck.shapes());
    println!("{}: {} tensors", cli.checkpoint.display(), ck.tensors.len());
    println!("{report}");
    if cli.onnx {
        bail!("ONNX writing is not part of this build yet; --inspect reads the checkpoint");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
