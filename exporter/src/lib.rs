//! `mae-export`: turns a checkpoint into a self-describing, verified ONNX model, without
//! libtorch.
//!
//! The graph is written from the architecture config and the weights ([`onnx::vit`]), wrapped
//! with the metadata of [`metadata`], written atomically ([`staging`]) and, unless `--no-check`,
//! loaded back with tract and run on the seeded probe batch ([`check`]) before it is published.

pub mod calibrate;
pub mod check;
pub mod metadata;
pub mod onnx;
pub mod source;
pub mod staging;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use mae_models::checkpoint;
use mae_models::{LoadReport, ModelConfig};

use crate::check::{CheckReport, CheckSpec};
use crate::onnx::vit::{GraphOptions, Output, Precision};
use crate::source::Request;
use crate::staging::Staging;

/// Export MAE / ViT checkpoints (ours or official facebookresearch/mae `.pth` files) to ONNX.
#[derive(Debug, Parser)]
#[command(name = "mae-export", version)]
#[command(group = clap::ArgGroup::new("action").required(true).args(["onnx", "inspect"]))]
pub struct Cli {
    /// The checkpoint: our `.safetensors` or an official `.pth`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Architecture of a checkpoint that does not describe itself (official `.pth` files),
    /// e.g. `vit_base_patch16`; `mae_vit_base_patch16` for a pretrained encoder with --features.
    #[arg(long)]
    pub model: Option<String>,
    /// Write an ONNX model.
    #[arg(long)]
    pub onnx: bool,
    /// Only read the checkpoint and print what it holds and how it matches the model.
    #[arg(long)]
    pub inspect: bool,
    /// Where to write the model (weights over 2 GB go to `<output>.data` beside it).
    #[arg(long, default_value = "model.onnx")]
    pub output: PathBuf,
    /// Class names, comma-separated, one per output of the head (default: the checkpoint's,
    /// else `class_0`, `class_1`, ...).
    #[arg(long, value_delimiter = ',')]
    pub class_names: Option<Vec<String>>,
    /// ONNX opset; below 17 LayerNormalization is written as primitive ops.
    #[arg(long, default_value_t = onnx::DEFAULT_OPSET,
          value_parser = clap::value_parser!(i64).range(onnx::MIN_OPSET..=onnx::MAX_OPSET))]
    pub opset: i64,
    /// Output the pooled embedding (`features`) instead of logits; the only export of an MAE
    /// pretraining checkpoint.
    #[arg(long)]
    pub features: bool,
    /// float16 weights and compute (float32 inputs and outputs).
    #[arg(long, conflicts_with = "int8")]
    pub fp16: bool,
    /// int8 quantisation of the linear layers: dynamic (activations quantised per call), or
    /// static with --calibration-data.
    #[arg(long)]
    pub int8: bool,
    /// Static int8: fix each linear layer's input range from these images (a MedMNIST .npz
    /// file, an ImageFolder tree or a folder of images), run through the float32 model.
    #[arg(long, value_name = "DIR|FILE.npz", requires = "int8")]
    pub calibration_data: Option<PathBuf>,
    /// Split of a .npz calibration file.
    #[arg(long, default_value = "train", value_name = "SPLIT")]
    pub calibration_split: String,
    /// Calibration images, taken evenly spaced over the data.
    #[arg(long, default_value_t = 128, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub calibration_images: u32,
    /// Take `image`, uint8 `[batch, H, W, 3]` RGB at the model's size, and normalise it inside
    /// the graph.
    #[arg(long)]
    pub with_preprocessing: bool,
    /// Write the weights to `<output>.data` beside the model (ONNX external data) even when they
    /// are under 2 GB; larger models always are.
    #[arg(long)]
    pub external_data: bool,
    /// Add explanation outputs to the graph: `rollout` (attention rollout, `[batch, H/p, W/p]`)
    /// and `gradcam` (Grad-CAM of every class on the last block's patch tokens, in closed form,
    /// `[batch, classes, H/p, W/p]`; global-pool heads only). Names and shapes go into the
    /// `mae.explain` metadata. Without it the graph is the plain one.
    #[arg(long, value_delimiter = ',', value_name = "rollout,gradcam")]
    pub explain: Vec<String>,
    /// Skip loading the written model with tract and running the probe batch.
    #[arg(long)]
    pub no_check: bool,
    /// Also write a Markdown model card of the exported model to this file.
    #[arg(long, value_name = "FILE")]
    pub card: Option<PathBuf>,
    /// What the model is for, for its card (`mae.intended_use`).
    #[arg(long, value_name = "TEXT")]
    pub intended_use: Option<String>,
    /// The imaging modality of the training data (`chest X-ray`), for its card.
    #[arg(long, value_name = "TEXT")]
    pub modality: Option<String>,
    /// Test-set metrics for the card: the JSON written by `mae-train eval --output FILE`.
    #[arg(long, value_name = "FILE")]
    pub test_metrics: Option<PathBuf>,
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if cli.inspect {
        return inspect(&cli);
    }
    export(&cli)?;
    Ok(ExitCode::SUCCESS)
}

fn inspect(cli: &Cli) -> anyhow::Result<ExitCode> {
    let ck = load(&cli.checkpoint)?;
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
    Ok(ExitCode::SUCCESS)
}

fn load(path: &Path) -> anyhow::Result<checkpoint::Checkpoint> {
    // The error names the file.
    checkpoint::load(path).context("cannot read checkpoint")
}

/// What an export wrote.
#[derive(Debug)]
pub struct Exported {
    pub path: PathBuf,
    pub data_path: Option<PathBuf>,
    pub bytes: u64,
    pub check: Option<CheckReport>,
}

/// Exports the checkpoint of `cli` to ONNX; prints what it did.
pub fn export(cli: &Cli) -> anyhow::Result<Exported> {
    let started = Instant::now();
    let precision = match (cli.fp16, cli.int8) {
        (true, _) => Precision::Fp16,
        (_, true) => Precision::Int8,
        _ => Precision::Fp32,
    };
    let explain = onnx::explain::Explain::parse(&cli.explain)
        .map_err(|e| anyhow::anyhow!("--explain: {e}"))?;
    let ck = load(&cli.checkpoint)?;
    let sha256 = sha256_file(&cli.checkpoint)?;
    let req = Request {
        model: cli.model.clone(),
        class_names: cli.class_names.clone(),
        features: cli.features,
    };
    let r = source::resolve(ck, &req)?;
    println!(
        "{}: {} ({}, {} classes, {} head)",
        cli.checkpoint.display(),
        r.arch,
        if r.task.is_some() {
            "classifier"
        } else {
            "features"
        },
        r.cfg.num_classes,
        if r.cfg.global_pool {
            "global-pool"
        } else {
            "class-token"
        }
    );
    println!("{}", r.report);
    if !r.ignored.is_empty() {
        println!(
            "not exported: {} tensors ({})",
            r.ignored.len(),
            summary(&r.ignored)
        );
    }

    let output = r.task.map_or(Output::Features, Output::Logits);
    explain
        .check(&r.cfg, r.task.is_some())
        .map_err(|e| anyhow::anyhow!("--explain: {e}"))?;
    let calibration = match &cli.calibration_data {
        Some(path) => {
            let src = calibrate::CalibrationSource {
                path,
                split: &cli.calibration_split,
                images: cli.calibration_images as usize,
            };
            let c =
                calibrate::calibrate(&r.cfg, &r.tensors, cli.opset, output, &r.preprocess, &src)?;
            println!(
                "calibrated {} linear inputs on {} of {} images from {} in {:.1} s",
                c.ranges.len(),
                c.images,
                c.available,
                path.display(),
                c.seconds
            );
            Some(c)
        }
        None => None,
    };
    let quantization =
        (precision == Precision::Int8).then(|| quantization_json(calibration.as_ref(), cli));
    let opts = GraphOptions {
        opset: cli.opset,
        precision,
        output,
        preprocessing: cli.with_preprocessing.then(|| r.preprocess.clone()),
        activation_ranges: calibration.map(|c| c.ranges),
        tap_linear_inputs: false,
        explain,
    };
    let graph = onnx::vit::build(&r.cfg, &r.tensors, &opts).with_context(|| {
        format!(
            "cannot build the ONNX graph of {}",
            cli.checkpoint.display()
        )
    })?;
    let input_name = if cli.with_preprocessing {
        onnx::vit::IMAGE
    } else {
        onnx::vit::PIXEL_VALUES
    };
    let mut card = card_props(cli, &r)?;
    if let Some(q) = quantization {
        card.push((mae_models::onnx_keys::QUANTIZATION, q));
    }
    if explain.any() {
        card.push((mae_models::onnx_keys::EXPLAIN, explain.metadata(&r.cfg)));
    }
    let props = metadata::props(&metadata::ModelInfo {
        task: r.task,
        class_names: &r.class_names,
        input_name,
        preprocess: &r.preprocess,
        architecture: &r.arch,
        config: &r.cfg,
        precision,
        checkpoint_file: &source::file_name(&cli.checkpoint),
        checkpoint_sha256: &sha256,
        metrics: &r.metrics,
        epoch: r.epoch,
        card,
    });
    let card_props = props.clone();
    let doc = format!(
        "{} exported by mae-export {} from {}",
        r.arch,
        env!("CARGO_PKG_VERSION"),
        source::file_name(&cli.checkpoint)
    );
    let mut model = onnx::model(graph, cli.opset, props, &doc);
    let io = model.graph.as_ref().map_or_else(Default::default, |g| {
        let d = |v: &[tract_onnx::pb::ValueInfoProto]| v.iter().map(onnx::describe_io).collect();
        (d(&g.input), d(&g.output))
    });
    drop(r.tensors);

    let name = staging::file_name(&cli.output)?;
    let mut staged = Staging::new(&cli.output)?;
    let mut data_name = None;
    if cli.external_data || onnx::weight_bytes(&model) >= onnx::MAX_INLINE_BYTES {
        let data = format!("{name}.data");
        let chunks = onnx::externalize(&mut model, &data);
        staged.write_with(&data, |w| {
            for (pad, bytes) in &chunks {
                w.write_all(&vec![0u8; *pad])?;
                w.write_all(bytes)?;
            }
            Ok(())
        })?;
        data_name = Some(data);
    }
    let bytes = onnx::encode(&model);
    drop(model);
    staged.write_with(&name, |w| w.write_all(&bytes))?;
    let mut size = bytes.len() as u64;
    if let Some(d) = &data_name {
        size += std::fs::metadata(staged.path(d)).map_or(0, |m| m.len());
    }
    drop(bytes);

    let check = if cli.no_check {
        None
    } else {
        let spec = CheckSpec {
            img_size: r.cfg.img_size,
            in_chans: r.cfg.in_chans,
            task: r.task,
            width: if r.task.is_some() {
                r.cfg.num_classes
            } else {
                r.cfg.embed_dim
            },
            preprocessing: cli.with_preprocessing,
            precision,
            probe: r.probe.as_ref(),
            explain: explain.outputs(&r.cfg),
        };
        let report = check::self_check(&staged.path(&name), &spec)
            .context("self-check failed; nothing was written")?;
        print_check(&report).context("self-check failed; nothing was written")?;
        Some(report)
    };
    let card_text = match &cli.card {
        Some(_) => Some(card_markdown(
            &cli.output,
            &staged.path(&name),
            card_props,
            io,
        )?),
        None => None,
    };
    staged.commit()?;
    if let (Some(path), Some(text)) = (&cli.card, card_text) {
        mae_models::io::atomic_write(path, text.as_bytes())
            .with_context(|| format!("cannot write the model card {}", path.display()))?;
        println!("wrote the model card {}", path.display());
    }
    let dir = cli.output.parent().unwrap_or(Path::new(""));
    let data_path = data_name.map(|d| dir.join(d));
    println!(
        "wrote {} ({:.1} MB{}, opset {}, {}) in {:.1} s",
        cli.output.display(),
        size as f64 / 1e6,
        data_path
            .as_ref()
            .map_or(String::new(), |d| format!(", weights in {}", d.display())),
        cli.opset,
        match precision {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
        },
        started.elapsed().as_secs_f64()
    );
    Ok(Exported {
        path: cli.output.clone(),
        data_path,
        bytes: size,
        check,
    })
}

/// `mae.quantization` of an int8 export: how activations and weights were quantised.
fn quantization_json(c: Option<&calibrate::Calibration>, cli: &Cli) -> String {
    let weights = "int8, symmetric per output channel, 7 bits";
    let v = match c {
        None => serde_json::json!({
            "method": "dynamic",
            "activations": "uint8 per tensor, range measured on each call",
            "weights": weights,
        }),
        Some(c) => {
            let data = source::file_name(cli.calibration_data.as_deref().unwrap_or(Path::new("")));
            let mut cal = serde_json::json!({ "data": data, "images": c.images });
            if data.ends_with(".npz") {
                cal["split"] = serde_json::json!(cli.calibration_split);
            }
            serde_json::json!({
                "method": "static",
                "activations": "uint8 per tensor, min-max range from calibration",
                "weights": weights,
                "calibration": cal,
            })
        }
    };
    v.to_string()
}

/// Prints the self-check's outcome; a probe mismatch is an error.
fn print_check(report: &CheckReport) -> anyhow::Result<()> {
    let what = format!(
        "self-check (tract): probe seed {} batch {}",
        report.seed, report.batch
    );
    match &report.vs_probe {
        Some((c, tol)) if c.within => {
            println!(
                "{what}: max |Δ| vs the checkpoint's probe outputs {:.3e} (tolerance {tol})",
                c.max_abs
            );
            Ok(())
        }
        Some((c, tol)) => {
            let (i, got, want) = c.worst;
            bail!(
                "the exported model disagrees with the checkpoint's probe outputs: max |Δ| {:.3e} \
                 beyond tolerance {tol}; worst element {i}: {got} vs {want}",
                c.max_abs
            )
        }
        None => {
            let note = report.note.as_deref().unwrap_or("no comparison");
            println!("{what}: outputs finite and well formed ({note})");
            Ok(())
        }
    }
}

/// The card's optional metadata: trainer version and data summary from the checkpoint, and
/// the intended use, modality and test metrics given on the command line.
fn card_props(cli: &Cli, r: &source::Resolved) -> anyhow::Result<Vec<(&'static str, String)>> {
    use mae_models::onnx_keys as keys;
    let mut v = Vec::new();
    if let Some(w) = &r.writer {
        v.push((keys::TRAINER_VERSION, w.clone()));
    }
    if let Some(d) = &r.data {
        v.push((keys::DATA, serde_json::to_string(d)?));
    }
    if let Some(u) = &cli.intended_use {
        v.push((keys::INTENDED_USE, u.trim().to_string()));
    }
    if let Some(m) = &cli.modality {
        v.push((keys::MODALITY, m.trim().to_string()));
    }
    if let Some(p) = &cli.test_metrics {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read --test-metrics {}", p.display()))?;
        let j: serde_json::Value = serde_json::from_str(&text).with_context(|| {
            format!(
                "--test-metrics {}: not JSON (expected `mae-train eval --output`)",
                p.display()
            )
        })?;
        let Some(acc1) = j.get("acc1").and_then(|v| v.as_f64()) else {
            bail!(
                "--test-metrics {}: no `acc1` field (expected the JSON of `mae-train eval --output`)",
                p.display()
            );
        };
        let mut t = serde_json::json!({ "acc1": acc1 });
        for k in ["data", "split", "samples", "auc", "loss"] {
            if let Some(x) = j.get(k).filter(|x| !x.is_null()) {
                t[k] = x.clone();
            }
        }
        v.push((keys::TEST_METRICS, t.to_string()));
    }
    Ok(v)
}

/// The model card of the staged model `staged` (to be published as `output`), whose graph
/// has the inputs and outputs `io`.
fn card_markdown(
    output: &Path,
    staged: &Path,
    props: Vec<(String, String)>,
    (inputs, outputs): (Vec<String>, Vec<String>),
) -> anyhow::Result<String> {
    let bytes = std::fs::metadata(staged)
        .with_context(|| format!("cannot read {}", staged.display()))?
        .len();
    Ok(mae_models::card::model_card(&mae_models::card::CardFacts {
        props: props.into_iter().collect(),
        file_name: source::file_name(output),
        sha256: sha256_file(staged)?,
        bytes,
        inputs,
        outputs,
    }))
}

fn summary(keys: &[String]) -> String {
    let mut s: Vec<&str> = keys.iter().take(4).map(String::as_str).collect();
    if keys.len() > 4 {
        s.push("...");
    }
    s.join(", ")
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    mae_models::digest::sha256_file(path).with_context(|| format!("cannot read {}", path.display()))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
