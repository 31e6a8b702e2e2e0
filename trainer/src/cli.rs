//! Command-line interface of `mae-train`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// MAE pretraining, fine-tuning, linear probing and evaluation of Vision Transformers on libtorch.
#[derive(Debug, Parser)]
#[command(name = "mae-train", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show libtorch's view of this machine: CUDA, cuDNN, devices, threads.
    Info,
    /// List the model zoo, or print one model's parameter table.
    Models(ModelsArgs),
    /// Read a checkpoint (.pth or .safetensors) and report what it holds.
    Inspect(InspectArgs),
    /// Generate a small labelled image set (ImageFolder layout) for trying the tools.
    Synth(SynthArgs),
}

/// Model selection shared by every command that builds a model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Preset name, as upstream spells it (see `mae-train models`).
    #[arg(long)]
    pub model: Option<String>,
    /// Input image size, overriding the preset's.
    #[arg(long)]
    pub input_size: Option<usize>,
    /// Patch size, overriding the preset's.
    #[arg(long)]
    pub patch_size: Option<usize>,
    /// Number of classes of the head, overriding the preset's 1000.
    #[arg(long)]
    pub nb_classes: Option<usize>,
    /// Number of transformer blocks, overriding the preset's.
    #[arg(long)]
    pub depth: Option<usize>,
}

#[derive(Debug, Args)]
pub struct ModelsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The checkpoint file.
    pub checkpoint: PathBuf,
    /// Compare the tensors with this model's parameter table and print the load report
    /// (defaults to the architecture recorded in our checkpoints).
    #[command(flatten)]
    pub model: ModelArgs,
    /// List every tensor with its dtype and shape.
    #[arg(long)]
    pub tensors: bool,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output folder; `train/`, `val/` and `test/` are created inside it.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Images per class in the training split (val and test get a quarter each, at least 4).
    #[arg(long, default_value_t = 40)]
    pub per_class: usize,
    /// Side of the square images, in pixels.
    #[arg(long, default_value_t = 28)]
    pub size: u32,
    /// Seed of the generator; the same seed gives the same files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}
