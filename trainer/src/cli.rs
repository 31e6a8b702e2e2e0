//! Command-line interface of `mae-train`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use mae_models::explain::heatmap::Colormap;
use mae_models::explain::Method;
use serde::Serialize;

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
    /// Write the splits of a MedMNIST .npz file as an ImageFolder tree of PNG files
    /// (`OUTPUT/{split}/{class}/NNNNNN.png`).
    ExportNpz(ExportNpzArgs),
    /// Fine-tune a ViT classifier (from scratch, an MAE pretrain checkpoint or a classifier).
    Finetune(Box<FinetuneArgs>),
    /// Evaluate a classifier checkpoint on a split of a data set.
    Eval(EvalArgs),
    /// Linear probing: a frozen encoder, BatchNorm (no affine) + linear head, LARS.
    Linprobe(Box<LinprobeArgs>),
    /// MAE self-supervised pretraining on unlabeled (or labelled, labels ignored) images.
    Pretrain(Box<PretrainArgs>),
    /// Time forward + backward + optimizer steps on synthetic data.
    Bench(BenchArgs),
    /// Run a training command as N processes on this node (the torchrun equivalent).
    Launch(LaunchArgs),
    /// Write (and submit) a SLURM batch script that runs a training command on N nodes.
    Slurm(SlurmArgs),
    /// Write an MAE reconstruction grid (original | masked | reconstruction | pasted) as PNG,
    /// or with --explain a classifier's heatmap (rollout, gradcam, occlusion) and its map.
    Visualize(VisualizeArgs),
    /// The data-efficiency experiment: fine-tune (and linear-probe) and test every training-set
    /// size × seed × initialisation, then tabulate and plot (sweep.csv, sweep.md, sweep.png).
    Sweep(SweepArgs),
}

/// Flags of `pretrain`, spelled as upstream `main_pretrain.py` in kebab-case; the upstream
/// snake_case spellings are accepted too.
#[derive(Debug, Clone, Args, Serialize)]
#[command(
    mut_arg("model", |a| a.default_value("mae_vit_large_patch16").required(false)),
    mut_arg("batch_size", |a| a.default_value("64").required(false)),
    mut_arg("epochs", |a| a.default_value("400").required(false)),
    mut_arg("blr", |a| a.default_value("1.5e-4").required(false)),
    mut_arg("min_lr", |a| a.default_value("0").required(false)),
    mut_arg("warmup_epochs", |a| a.default_value("40").required(false)),
    mut_arg("weight_decay", |a| a.default_value("0.05").required(false))
)]
pub struct PretrainArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub arch: TrainArchArgs,
    /// Fraction of patches removed.
    #[arg(long, alias = "mask_ratio", default_value_t = 0.75)]
    pub mask_ratio: f64,
    /// Reconstruct per-patch normalised pixels.
    #[arg(long, alias = "norm_pix_loss")]
    pub norm_pix_loss: bool,
    /// Start from the encoder and decoder weights of an MAE pretraining checkpoint (one of
    /// ours, or an official `.pth` with its decoder) for continued pretraining on other images:
    /// epoch 0, a new schedule and optimizer (unlike --resume, with which it cannot be
    /// combined). The architecture is --model's, and must be the checkpoint's; position
    /// embeddings are resized when --input-size differs.
    #[arg(long, value_name = "CHECKPOINT", alias = "initial-checkpoint")]
    pub init: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub optim: OptimArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub amp: PrecisionArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub dist: DistArgs,
    /// Write a reconstruction grid of a few fixed images every N epochs (0: never).
    #[arg(long, alias = "vis_every", default_value_t = 0)]
    pub vis_every: u64,
}

/// Where a training command reads its images.
#[derive(Debug, Clone, Args, Serialize)]
pub struct DataArgs {
    /// ImageFolder root (`train/`, `val/`, optional `test/`), a `.zip` holding that tree (at
    /// its top or inside one top folder, read in place), a MedMNIST `.npz` file, or (for
    /// `pretrain`) a flat folder or `.zip` of images.
    #[arg(long, alias = "data_path")]
    pub data_path: PathBuf,
    /// Decoding and augmentation threads.
    #[arg(long, alias = "num_workers", default_value_t = 2)]
    pub num_workers: usize,
}

/// The architecture a training command starts from (a resumed run keeps its own).
#[derive(Debug, Clone, Args, Serialize)]
pub struct TrainArchArgs {
    /// Model preset (see `mae-train models`).
    #[arg(long)]
    pub model: String,
    /// Input image size, overriding the preset's.
    #[arg(long, alias = "input_size")]
    pub input_size: Option<usize>,
    /// Number of transformer blocks, overriding the preset's.
    #[arg(long)]
    pub depth: Option<usize>,
}

/// Batching, epochs and the optimiser's schedule; each command sets its upstream defaults.
#[derive(Debug, Clone, Args, Serialize)]
pub struct OptimArgs {
    /// Images per batch (per process).
    #[arg(long, alias = "batch_size")]
    pub batch_size: usize,
    /// Epochs of the schedule.
    #[arg(long)]
    pub epochs: u64,
    /// Accumulate gradients over this many batches before each optimizer step.
    #[arg(long, alias = "accum_iter", default_value_t = 1)]
    pub accum_iter: usize,
    /// Absolute learning rate; default blr × effective batch / 256.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Base learning rate (per 256 images).
    #[arg(long)]
    pub blr: f64,
    /// Lower bound of the cosine schedule.
    #[arg(long, alias = "min_lr")]
    pub min_lr: f64,
    /// Epochs of linear warm-up.
    #[arg(long, alias = "warmup_epochs")]
    pub warmup_epochs: f64,
    #[arg(long, alias = "weight_decay")]
    pub weight_decay: f64,
}

/// The run folder, its resumption, the seed and the device.
#[derive(Debug, Clone, Args, Serialize)]
pub struct RunArgs {
    /// Output folder: arguments, log.txt, checkpoints, metrics, plots.
    #[arg(long, alias = "output_dir", default_value = "./output_dir")]
    pub output_dir: PathBuf,
    /// Continue a run from one of its checkpoints (epoch, optimizer state, schedule).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Epoch checkpoints to keep: the newest N (`checkpoint-{epoch}` with its optimizer
    /// state; `checkpoint-best` is always kept). 0 keeps every one.
    #[arg(long, alias = "keep_checkpoints", default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// Seed of the initial weights, the data order, augmentation and masking.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Stop after this many epochs of this invocation (the schedule still spans --epochs).
    #[arg(long, alias = "stop_after")]
    pub stop_after: Option<u64>,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Model preset: a vit_* classifier or an mae_* pretraining model.
    #[arg(long, default_value = "vit_base_patch16")]
    pub model: String,
    #[arg(long, alias = "batch_size", default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, alias = "input_size")]
    pub input_size: Option<usize>,
    /// Override the preset's depth.
    #[arg(long)]
    pub depth: Option<usize>,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[command(flatten)]
    pub amp: PrecisionArgs,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Print the figures as JSON (per-step times included) instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct VisualizeArgs {
    /// The checkpoint: an MAE pretraining checkpoint (the reconstruction grid), or with
    /// --explain a classifier (fine-tuned or linear-probed).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Image to reconstruct or explain.
    #[arg(long)]
    pub image: PathBuf,
    /// Fraction of patches masked in the reconstruction grid.
    #[arg(long, default_value_t = 0.75)]
    pub mask_ratio: f64,
    /// Seed of the masking noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output PNG (default: `<image stem>.mae.png` in the current folder; with --explain
    /// `<image file name>.<method>.png`, as `mae-run predict --heatmaps` names it). With
    /// --explain the map is written beside it as `.npy`.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub explain: VisualizeExplainArgs,
}

/// Heatmaps of `visualize`: the maps of `mae-run predict --explain`, computed in libtorch.
#[derive(Debug, Clone, Args)]
pub struct VisualizeExplainArgs {
    /// Explain a classifier checkpoint's prediction instead of drawing a reconstruction: a PNG
    /// of the most probable class's map over the image the model sees, and the map as `.npy`
    /// (`[h, w]` for rollout, `[classes, h, w]` for gradcam and occlusion). `rollout`:
    /// attention rollout; `gradcam`: Grad-CAM on the last block's patch tokens (global-pool
    /// heads only); `occlusion`: one pass of the model per window position (⌈(size − window) /
    /// stride⌉ + 1 positions along each side).
    #[arg(long, value_enum, value_name = "METHOD")]
    pub explain: Option<Method>,
    /// Colour map of the PNG heatmap.
    #[arg(long, value_enum, default_value_t = Colormap::Jet, requires = "explain")]
    pub colormap: Colormap,
    /// Opacity of the heatmap over the image, from 0 (image only) to 1 (heatmap only).
    #[arg(long, default_value_t = 0.5, value_name = "A", requires = "explain")]
    pub opacity: f32,
    /// Occlusion: side of the square window, in pixels of the model's input (default: the
    /// input size / 8).
    #[arg(long, value_name = "PX", requires = "explain")]
    pub occlusion_window: Option<usize>,
    /// Occlusion: step between window positions, in pixels (default: half the window; at most
    /// the window).
    #[arg(long, value_name = "PX", requires = "explain")]
    pub occlusion_stride: Option<usize>,
    /// Occlusion: the value occluded pixels take in the model's normalised input (0: the
    /// normalisation's mean colour).
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "V",
        allow_negative_numbers = true,
        requires = "explain"
    )]
    pub occlusion_baseline: f32,
}

/// Device selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceArg {
    /// CUDA when available, else the CPU.
    Auto,
    Cuda,
    Cpu,
}

/// Mixed precision, shared by the commands that train (and `bench`).
#[derive(Debug, Clone, Args, Serialize)]
pub struct PrecisionArgs {
    /// Autocast precision: bf16 by default on CUDA, fp32 on the CPU; fp16 adds a loss scaler.
    #[arg(long, value_enum)]
    pub precision: Option<Autocast>,
    /// fp16: the loss scaler's initial scale (PyTorch's `GradScaler(init_scale)`).
    #[arg(long, default_value_t = 65536.0, value_name = "SCALE")]
    pub loss_scale: f64,
    /// fp16: good steps after which the loss scale doubles (`growth_interval`).
    #[arg(long, default_value_t = 2000, value_name = "STEPS")]
    pub loss_scale_growth_interval: u64,
}

/// Numeric precision of the forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Autocast {
    Bf16,
    Fp16,
    Fp32,
}

/// Flags of `finetune`, spelled as upstream `main_finetune.py` in kebab-case; the upstream
/// snake_case spellings are accepted too.
#[derive(Debug, Clone, Args, Serialize)]
#[command(
    mut_arg("model", |a| a.default_value("vit_base_patch16").required(false)),
    mut_arg("batch_size", |a| a.default_value("64").required(false)),
    mut_arg("epochs", |a| a.default_value("50").required(false)),
    mut_arg("blr", |a| a.default_value("1e-3").required(false)),
    mut_arg("min_lr", |a| a.default_value("1e-6").required(false)),
    mut_arg("warmup_epochs", |a| a.default_value("5").required(false)),
    mut_arg("weight_decay", |a| a.default_value("0.05").required(false))
)]
pub struct FinetuneArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub arch: TrainArchArgs,
    /// Number of classes; inferred from the data when omitted.
    #[arg(long, alias = "nb_classes")]
    pub nb_classes: Option<usize>,
    /// Initialise from this checkpoint: an official MAE `.pth` or one of ours.
    #[arg(long)]
    pub finetune: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub optim: OptimArgs,
    /// Layer-wise learning-rate decay (BEiT): block i of L learns at lr × decay^(L − i). For
    /// fine-tuning pretrained weights; use 1.0 when training from scratch.
    #[arg(long, alias = "layer_decay", default_value_t = 0.75)]
    pub layer_decay: f64,
    /// Clip the global gradient norm to this value.
    #[arg(long, alias = "clip_grad")]
    pub clip_grad: Option<f64>,
    /// Stochastic depth rate of the last block.
    #[arg(long, alias = "drop_path", default_value_t = 0.1)]
    pub drop_path: f64,
    /// Label smoothing of the training loss.
    #[arg(long, default_value_t = 0.1)]
    pub smoothing: f64,
    /// Mixup alpha; mixup is on when > 0.
    #[arg(long, default_value_t = 0.0)]
    pub mixup: f64,
    /// CutMix alpha; cutmix is on when > 0.
    #[arg(long, default_value_t = 0.0)]
    pub cutmix: f64,
    /// Probability of mixing a batch at all.
    #[arg(long, alias = "mixup_prob", default_value_t = 1.0)]
    pub mixup_prob: f64,
    /// Probability of CutMix rather than Mixup when both are on.
    #[arg(long, alias = "mixup_switch_prob", default_value_t = 0.5)]
    pub mixup_switch_prob: f64,
    /// How mixing pairs samples; this build mixes whole batches, as upstream's default.
    #[arg(long, alias = "mixup_mode", default_value = "batch", value_parser = ["batch"])]
    pub mixup_mode: String,
    /// Random erasing probability (pixel mode).
    #[arg(long, default_value_t = 0.25)]
    pub reprob: f64,
    /// RandAugment policy in timm's grammar: `rand` then `-m9` magnitude, `-n2` ops per image,
    /// `-p0.5` probability of each op, `-mstd0.5` magnitude noise, `-mmax10` magnitude clip,
    /// `-inc1` ops increasing with the magnitude; `none` disables it.
    #[arg(long, default_value = "rand-m9-mstd0.5-inc1")]
    pub aa: String,
    /// Smallest area fraction of RandomResizedCrop.
    #[arg(long, alias = "min_crop_scale", default_value_t = 0.08)]
    pub min_crop_scale: f64,
    /// Weight each class's loss by n / (classes × n_class) of the training images (single-label
    /// tasks), so a rare class counts as much as a common one.
    #[arg(long)]
    pub balance_classes: bool,
    /// Classify the class token (`norm` head) instead of the mean-pooled tokens (`fc_norm`).
    #[arg(long, alias = "cls_token")]
    pub cls_token: bool,
    /// Train on a seeded, class-stratified subset of this many images.
    #[arg(long, alias = "train_samples")]
    pub train_samples: Option<usize>,
    /// Keep an exponential moving average of the weights (timm's model EMA), updated after
    /// every optimizer step; validation, the best checkpoint and every saved checkpoint use the
    /// average (the training weights travel in the optimizer state, for --resume).
    #[arg(long, alias = "model_ema")]
    pub model_ema: bool,
    /// Decay of --model-ema, warmed up as timm's: min(DECAY, (1 + n) / (10 + n)) at step n.
    /// Short runs want less than the default, e.g. 0.99 for a few hundred steps.
    #[arg(long, alias = "model_ema_decay", default_value_t = 0.9998, value_parser = ema_decay)]
    pub model_ema_decay: f64,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub amp: PrecisionArgs,
    /// Only evaluate (with --resume or --finetune), as upstream's --eval.
    #[arg(long)]
    pub eval: bool,
    #[arg(long, alias = "pin_mem", hide = true)]
    #[serde(skip)]
    pub pin_mem: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub dist: DistArgs,
}

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Classifier checkpoint to evaluate: one of ours, or a foreign `.pth` (an official
    /// fine-tuned checkpoint) with `--model`.
    #[arg(long)]
    pub resume: PathBuf,
    /// Architecture of a checkpoint that records none (a foreign `.pth`); ours carry it.
    #[command(flatten)]
    pub model: ArchArgs,
    /// Autocast precision of the forward passes: bf16 by default on CUDA, fp32 on the CPU.
    #[arg(long, value_enum)]
    pub precision: Option<Autocast>,
    /// ImageFolder root, a `.zip` holding that tree, or a MedMNIST `.npz` file.
    #[arg(long, alias = "data_path")]
    pub data_path: PathBuf,
    /// Split to evaluate.
    #[arg(long, default_value = "test")]
    pub split: String,
    #[arg(long, alias = "batch_size", default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    #[arg(long, alias = "num_workers", default_value_t = 2)]
    pub num_workers: usize,
    /// Write the metrics as JSON to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub dist: DistArgs,
    /// Write one CSV row per image (index, label, predicted class, probabilities) to this file.
    #[arg(long, value_name = "FILE")]
    pub predictions: Option<PathBuf>,
}

/// Model selection shared by every command that builds a model.
#[derive(Debug, Clone, Args)]
pub struct ArchArgs {
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

impl ArchArgs {
    /// The preset named by `--model`, with the overrides applied and validated, and its name.
    pub fn preset(&self) -> anyhow::Result<(String, mae_models::ModelConfig)> {
        let name = self.model.clone().unwrap_or_default();
        let overrides = mae_models::Overrides {
            img_size: self.input_size,
            patch_size: self.patch_size,
            num_classes: self.nb_classes,
            depth: self.depth,
        };
        let cfg = mae_models::ModelConfig::preset(&name)?.with_overrides(&overrides)?;
        Ok((name, cfg))
    }
}

#[derive(Debug, Args)]
pub struct ModelsArgs {
    #[command(flatten)]
    pub model: ArchArgs,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The checkpoint file.
    pub checkpoint: PathBuf,
    /// Compare the tensors with this model's parameter table and print the load report
    /// (defaults to the architecture recorded in our checkpoints).
    #[command(flatten)]
    pub model: ArchArgs,
    /// List every tensor with its dtype and shape.
    #[arg(long)]
    pub tensors: bool,
}

#[derive(Debug, Args)]
pub struct ExportNpzArgs {
    /// The MedMNIST `.npz` file.
    #[arg(long, alias = "data_path", value_name = "FILE.npz")]
    pub data_path: PathBuf,
    /// Output folder, which must not exist or be empty; it is written beside and renamed into
    /// place when complete.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Splits to write (default: every split of the file).
    #[arg(long, value_delimiter = ',', value_name = "SPLIT,...")]
    pub splits: Vec<String>,
    /// Folder names of the classes in label order, which must sort in that order (default:
    /// the labels, zero-padded to one width).
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    pub class_names: Option<Vec<String>>,
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

/// Keys of `args.json` that record what a run started from rather than a flag (the SHA-256 of
/// `pretrain --init`'s checkpoint); [`command_line`] leaves them out.
pub const RECORD_ONLY_KEYS: &[&str] = &["init_sha256"];

/// The `mae-train` arguments (after the program name) that `args.json` records: its `command`,
/// then each key as its flag (`batch_size` → `--batch-size VALUE`, a true switch as the bare
/// flag; null and false are the defaults and are left out; [`RECORD_ONLY_KEYS`] are skipped).
/// Running them repeats the run.
pub fn command_line(args: &serde_json::Value) -> anyhow::Result<Vec<String>> {
    use anyhow::{bail, Context};
    let map = args.as_object().context("args.json is not a JSON object")?;
    let command = map
        .get("command")
        .and_then(|v| v.as_str())
        .context("args.json names no command")?;
    let mut argv = vec![command.to_string()];
    let flags = map
        .iter()
        .filter(|(k, _)| *k != "command" && !RECORD_ONLY_KEYS.contains(&k.as_str()));
    for (key, value) in flags {
        let flag = format!("--{}", key.replace('_', "-"));
        match value {
            serde_json::Value::Null | serde_json::Value::Bool(false) => {}
            serde_json::Value::Bool(true) => argv.push(flag),
            serde_json::Value::Number(n) => argv.extend([flag, n.to_string()]),
            serde_json::Value::String(s) => argv.extend([flag, s.clone()]),
            other => bail!("args.json: {key} holds {other}, which is not a flag's value"),
        }
    }
    Ok(argv)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// Parses `mae-train ARGS` and returns what the command records in `args.json`.
    fn recorded(argv: &[String]) -> serde_json::Value {
        let cli = Cli::try_parse_from(
            std::iter::once("mae-train".to_string()).chain(argv.iter().cloned()),
        )
        .unwrap();
        let (name, mut v) = match cli.command {
            Command::Finetune(a) => ("finetune", serde_json::to_value(&*a).unwrap()),
            Command::Linprobe(a) => ("linprobe", serde_json::to_value(&*a).unwrap()),
            Command::Pretrain(a) => ("pretrain", serde_json::to_value(&*a).unwrap()),
            other => panic!("not a training command: {other:?}"),
        };
        v.as_object_mut()
            .unwrap()
            .insert("command".into(), name.into());
        v
    }

    #[test]
    fn every_args_json_key_round_trips_into_the_same_command() {
        let words = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let shared = "--data-path d.npz --num-workers 3 --input-size 32 --depth 3 --batch-size 16 \
             --epochs 7 --accum-iter 2 --lr 0.002 --blr 0.0005 --min-lr 1e-7 --warmup-epochs 1.5 \
             --weight-decay 0.01 --output-dir runs/x --resume runs/x/checkpoint-3.safetensors \
             --keep-checkpoints 0 --seed 9 --device cpu --stop-after 2 --precision fp16 \
             --loss-scale 1024 --loss-scale-growth-interval 50 --dist-backend gloo \
             --dist-timeout 30 --dist-eval --world-size 1 --local-rank 0 --dist-url env://";
        let commands = [
            format!(
                "finetune {shared} --model vit_tiny_patch4_28 --nb-classes 2 --finetune pt.pth \
                 --layer-decay 0.65 --clip-grad 3 --drop-path 0.2 --smoothing 0.05 --mixup 0.8 \
                 --cutmix 1 --mixup-prob 0.9 --mixup-switch-prob 0.4 --reprob 0.1 --aa none \
                 --min-crop-scale 0.5 --balance-classes --cls-token --train-samples 300 --eval"
            ),
            format!(
                "linprobe {shared} --model vit_tiny_patch4_28 --finetune pt.pth --global-pool \
                 --train-samples 100"
            ),
            format!(
                "pretrain {shared} --model mae_vit_tiny_patch4_28 --mask-ratio 0.6 \
                 --norm-pix-loss --vis-every 5 --init pt.safetensors"
            ),
        ];
        for line in &commands {
            let argv = words(line);
            let first = recorded(&argv);
            let again = super::command_line(&first).unwrap();
            let second = recorded(&again);
            assert_eq!(first, second, "{line}");
            // Every flag given was recorded with its value: none is dropped from args.json.
            let map = first.as_object().unwrap();
            for flag in argv.iter().filter(|w| w.starts_with("--")) {
                let key = flag.trim_start_matches("--").replace('-', "_");
                let v = map
                    .get(&key)
                    .unwrap_or_else(|| panic!("{key} not recorded: {line}"));
                assert!(
                    !v.is_null() && *v != serde_json::Value::Bool(false),
                    "{key} lost"
                );
            }
        }
        // The defaults round-trip too (nothing given but the data).
        for cmd in ["finetune", "linprobe", "pretrain"] {
            let first = recorded(&words(&format!("{cmd} --data-path d")));
            assert_eq!(
                first,
                recorded(&super::command_line(&first).unwrap()),
                "{cmd}"
            );
        }
    }

    #[test]
    fn record_only_keys_are_left_out_of_the_command_line() {
        let argv = ["pretrain", "--data-path", "d", "--init", "pt.safetensors"].map(String::from);
        let mut first = recorded(&argv);
        first
            .as_object_mut()
            .unwrap()
            .insert("init_sha256".into(), "ab".repeat(32).into());
        let again = super::command_line(&first).unwrap();
        assert!(!again.iter().any(|w| w.contains("sha256")), "{again:?}");
        assert!(again.windows(2).any(|w| w == ["--init", "pt.safetensors"]));
    }

    #[test]
    fn each_command_keeps_its_upstream_defaults() {
        let words = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let get =
            |cmd: &str, key: &str| recorded(&words(&format!("{cmd} --data-path d")))[key].clone();
        assert_eq!(get("pretrain", "blr"), serde_json::json!(1.5e-4));
        assert_eq!(get("pretrain", "epochs"), serde_json::json!(400));
        assert_eq!(
            get("pretrain", "model"),
            serde_json::json!("mae_vit_large_patch16")
        );
        assert_eq!(get("finetune", "blr"), serde_json::json!(1e-3));
        assert_eq!(get("finetune", "min_lr"), serde_json::json!(1e-6));
        assert_eq!(get("finetune", "warmup_epochs"), serde_json::json!(5.0));
        assert_eq!(get("linprobe", "batch_size"), serde_json::json!(512));
        assert_eq!(get("linprobe", "weight_decay"), serde_json::json!(0.0));
        assert_eq!(get("linprobe", "epochs"), serde_json::json!(90));
    }

    #[test]
    fn upstream_snake_case_flags_parse() {
        let cli = Cli::try_parse_from([
            "mae-train",
            "finetune",
            "--batch_size",
            "32",
            "--model",
            "vit_base_patch16",
            "--finetune",
            "mae_pretrain_vit_base.pth",
            "--epochs",
            "50",
            "--blr",
            "5e-4",
            "--layer_decay",
            "0.65",
            "--weight_decay",
            "0.05",
            "--drop_path",
            "0.1",
            "--mixup",
            "0.8",
            "--cutmix",
            "1.0",
            "--reprob",
            "0.25",
            "--dist_eval",
            "--data_path",
            "eval_data",
        ])
        .unwrap();
        let Command::Finetune(a) = cli.command else {
            panic!("not finetune")
        };
        assert_eq!(a.optim.batch_size, 32);
        assert_eq!(a.layer_decay, 0.65);
        assert_eq!(a.drop_path, 0.1);
        assert!(a.dist.dist_eval);
        assert_eq!(a.data.data_path, PathBuf::from("eval_data"));
    }
}

/// Flags of `linprobe`, spelled as upstream `main_linprobe.py` in kebab-case (snake_case
/// accepted), with upstream's defaults.
#[derive(Debug, Clone, Args, Serialize)]
#[command(
    mut_arg("model", |a| a.default_value("vit_large_patch16").required(false)),
    mut_arg("batch_size", |a| a.default_value("512").required(false)),
    mut_arg("epochs", |a| a.default_value("90").required(false)),
    mut_arg("blr", |a| a.default_value("0.1").required(false)),
    mut_arg("min_lr", |a| a.default_value("0").required(false)),
    mut_arg("warmup_epochs", |a| a.default_value("10").required(false)),
    mut_arg("weight_decay", |a| a.default_value("0").required(false))
)]
pub struct LinprobeArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub arch: TrainArchArgs,
    /// The pretrained encoder: an official MAE `.pth` or one of our checkpoints.
    #[arg(long)]
    pub finetune: Option<PathBuf>,
    /// Probe the mean-pooled tokens (`fc_norm`) instead of the class token (`norm`, default).
    #[arg(long, alias = "global_pool")]
    pub global_pool: bool,
    /// Train on a seeded, class-stratified subset of this many images.
    #[arg(long, alias = "train_samples")]
    pub train_samples: Option<usize>,
    #[command(flatten)]
    #[serde(flatten)]
    pub optim: OptimArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub amp: PrecisionArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub dist: DistArgs,
}

/// Flags of distributed runs. Each process reads its place from torchrun's variables (`RANK`,
/// `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or SLURM's (`SLURM_PROCID`,
/// `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_JOB_NODELIST`), as set by `mae-train launch`,
/// `mae-train slurm`, torchrun or srun.
#[derive(Debug, Clone, Args, Serialize)]
pub struct DistArgs {
    /// Collective backend: nccl (CUDA) or gloo (CPU); by default nccl on CUDA, gloo otherwise.
    #[arg(long, alias = "dist_backend", value_parser = ["gloo", "nccl"])]
    pub dist_backend: Option<String>,
    /// Seconds a rendezvous or collective waits for the other ranks before the run fails.
    #[arg(long, alias = "dist_timeout", default_value_t = 60)]
    pub dist_timeout: u64,
    /// Shard evaluation over the ranks and gather the predictions (exact metrics over the set).
    #[arg(long, alias = "dist_eval")]
    pub dist_eval: bool,
    /// Upstream's flag: must equal the environment's WORLD_SIZE (1 when not distributed).
    #[arg(long, alias = "world_size")]
    pub world_size: Option<usize>,
    /// Upstream's flag (legacy `torch.distributed.launch`): the local rank when the
    /// environment gives no LOCAL_RANK; must agree with it otherwise.
    #[arg(long, alias = "local_rank")]
    pub local_rank: Option<usize>,
    /// Upstream's flag: only `env://` (the rendezvous comes from the environment).
    #[arg(long, alias = "dist_url")]
    pub dist_url: Option<String>,
}

/// `mae-train launch`.
#[derive(Debug, Clone, Args)]
#[command(trailing_var_arg = true)]
pub struct LaunchArgs {
    /// Processes to start (one per GPU on a GPU node).
    #[arg(long, alias = "nproc_per_node", default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Rendezvous address (this node).
    #[arg(long, alias = "master_addr", default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Rendezvous port; 0 picks a free one.
    #[arg(long, alias = "master_port", default_value_t = 0)]
    pub master_port: u16,
    /// Show the standard output of every rank, not only rank 0's.
    #[arg(long)]
    pub all_output: bool,
    /// The command each process runs: `finetune ...`, `pretrain ...`, `linprobe ...` or
    /// `eval ...` (after `--`).
    #[arg(required = true, allow_hyphen_values = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `mae-train sweep`.
///
/// Example: `mae-train sweep --train-samples 600,6000,all --seeds 0,1,2 --init
/// scratch,mae=pt/checkpoint-best.safetensors --init-args 'scratch=--layer-decay 1.0'
/// --kinds finetune,linprobe --kind-args 'linprobe=--epochs 90 --blr 0.1' --output-dir runs/sweep
/// -- --data-path data.npz --model vit_tiny_patch4_28 --epochs 20`.
/// Each fine-tune cell is `DIR/cells/{init}/n{size}/seed{seed}/`, each linear-probe cell
/// `DIR/cells/{init}/linprobe/n{size}/seed{seed}/`: a complete run folder with `train.log`,
/// `eval.log`, `test.json` and, once finished, `cell.json`; run the same command again to
/// resume: finished cells are skipped, an unfinished one starts again.
#[derive(Debug, Clone, Args)]
#[command(trailing_var_arg = true)]
pub struct SweepArgs {
    /// Training-set sizes, comma-separated, `all` for the whole training split. Subsets are
    /// class-stratified and nested for a seed (the 600 images are among the 6000).
    #[arg(long, alias = "train_samples", value_delimiter = ',', required = true)]
    pub train_samples: Vec<String>,
    /// Seeds, comma-separated: each picks the subset, the initial head and the data order.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub seeds: Vec<u64>,
    /// Initialisations, comma-separated: `scratch`, or a checkpoint to start from
    /// (`PATH`, named after its file stem, or `NAME=PATH`).
    #[arg(long, value_delimiter = ',', required = true)]
    pub init: Vec<String>,
    /// Extra fine-tune flags of one init, `NAME=FLAGS` (e.g. 'scratch=--layer-decay 1.0'),
    /// for where its recipe really differs; repeat for several inits. They go to that init's
    /// fine-tune cells only, and replace the same flags given shared or in --kind-args.
    #[arg(long = "init-args", alias = "init_args", value_name = "NAME=FLAGS")]
    pub init_args: Vec<String>,
    /// Kinds of cell, comma-separated: `finetune` (`mae-train finetune`) and `linprobe`
    /// (`mae-train linprobe`: a BatchNorm + linear head on the frozen encoder, LARS). Every
    /// kind runs every size × seed × init.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "finetune")]
    pub kinds: Vec<SweepKind>,
    /// Flags of one kind's cells, `KIND=FLAGS` (e.g. 'linprobe=--epochs 90 --blr 0.1
    /// --batch-size 512'): its own recipe. A flag given here replaces the same shared flag in
    /// that kind's cells; repeat for several kinds.
    #[arg(long = "kind-args", alias = "kind_args", value_name = "KIND=FLAGS")]
    pub kind_args: Vec<String>,
    /// Flags of one training-set size's cells, every kind, `SIZE=FLAGS` (e.g. 'all=--epochs 4
    /// --warmup-epochs 1'): fewer epochs where the images are many, so a large size costs about
    /// as many steps as a small one. They replace the same flags given shared or in
    /// --kind-args; an init's --init-args still come last. Repeat for several sizes.
    #[arg(long = "size-args", alias = "size_args", value_name = "SIZE=FLAGS")]
    pub size_args: Vec<String>,
    /// Folder of the sweep: its cells, sweep.csv, sweep.md and sweep.png.
    #[arg(long, alias = "output_dir")]
    pub output_dir: PathBuf,
    /// Split each cell's best checkpoint is tested on.
    #[arg(long, default_value = "test")]
    pub eval_split: String,
    /// Run every cell data-parallel as N processes on this node (through `mae-train launch`).
    #[arg(long, alias = "nproc_per_node", default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Print the cells of every kind and their commands; run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The flags every cell of every kind shares (after `--`): data, model, device, and the
    /// recipe where the kinds agree. Each must be a flag of every kind in --kinds (a flag of
    /// one kind only is refused before any cell runs; give it in --kind-args). The sweep sets
    /// `--output-dir`, `--seed`, `--train-samples` and `--finetune` itself.
    #[arg(required = true, allow_hyphen_values = true, value_name = "CELL_FLAGS")]
    pub shared: Vec<String>,
}

/// A kind of sweep cell: the training command it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SweepKind {
    /// `mae-train finetune`.
    Finetune,
    /// `mae-train linprobe`.
    Linprobe,
}

impl SweepKind {
    /// The subcommand, and the kind's name in folders, tables and `--kind-args`.
    pub fn command(self) -> &'static str {
        match self {
            SweepKind::Finetune => "finetune",
            SweepKind::Linprobe => "linprobe",
        }
    }
}

/// `mae-train slurm`.
#[derive(Debug, Clone, Args)]
#[command(trailing_var_arg = true)]
pub struct SlurmArgs {
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// GPUs per node; one process (task) per GPU.
    #[arg(long, alias = "ngpus", default_value_t = 8)]
    pub gpus_per_node: usize,
    /// SLURM partition.
    #[arg(long)]
    pub partition: Option<String>,
    /// Time limit in minutes.
    #[arg(long, default_value_t = 4320)]
    pub timeout: u64,
    /// Folder of the batch script and the job's logs; also the run's --output-dir unless the
    /// command names one.
    #[arg(long)]
    pub job_dir: PathBuf,
    /// CPU cores per task (data-loading workers run there).
    #[arg(long, default_value_t = 10)]
    pub cpus_per_task: usize,
    /// Memory per GPU in GB.
    #[arg(long, default_value_t = 40)]
    pub mem_per_gpu: usize,
    /// Extra `#SBATCH --constraint`.
    #[arg(long)]
    pub constraint: Option<String>,
    /// Only write the script; do not call sbatch.
    #[arg(long)]
    pub dry_run: bool,
    /// The training command (after `--`).
    #[arg(required = true, allow_hyphen_values = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// A decay of `--model-ema-decay`: in [0, 1).
fn ema_decay(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if (0.0..1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{v} is outside [0, 1): the average would not follow the weights"
        ))
    }
}
