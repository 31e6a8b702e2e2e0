//! One function per subcommand.

pub mod sweep;

use std::process::ExitCode;

use anyhow::{bail, Context};
use mae_models::checkpoint::{self, Source};
use mae_models::config::{count_params, mae_presets, vit_presets};
use mae_models::{LoadReport, ModelConfig, Overrides};

use crate::cli::{InspectArgs, ModelArgs, ModelsArgs, SynthArgs};

pub fn info() -> anyhow::Result<ExitCode> {
    println!("mae-train {}", env!("CARGO_PKG_VERSION"));
    println!("cuda available: {}", tch::Cuda::is_available());
    println!("cuda devices:   {}", tch::Cuda::device_count());
    println!("cudnn:          {}", tch::Cuda::cudnn_is_available());
    println!("cpu threads:    {}", tch::get_num_threads());
    let device = tch::Device::cuda_if_available();
    println!("default device: {device:?}");
    Ok(ExitCode::SUCCESS)
}

/// The preset named by `--model`, with the overrides applied and validated.
pub fn model_config(a: &ModelArgs, default: &str) -> anyhow::Result<(String, ModelConfig)> {
    let name = a.model.as_deref().unwrap_or(default).to_string();
    let overrides = Overrides {
        img_size: a.input_size,
        patch_size: a.patch_size,
        num_classes: a.nb_classes,
        depth: a.depth,
    };
    let cfg = ModelConfig::preset(&name)?.with_overrides(&overrides)?;
    Ok((name, cfg))
}

pub fn models(a: &ModelsArgs) -> anyhow::Result<ExitCode> {
    if a.model.model.is_none() {
        println!("{:<26} {:>14}", "model", "parameters");
        for name in vit_presets().iter().chain(mae_presets().iter()) {
            let cfg = ModelConfig::preset(name)?;
            println!("{name:<26} {:>14}", count_params(&cfg.parameters()));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (name, cfg) = model_config(&a.model, "")?;
    let params = cfg.parameters();
    println!("{name}: {}", serde_json::to_string(&cfg)?);
    for p in &params {
        println!("{:<40} {:?}", p.name, p.shape);
    }
    println!(
        "{} tensors, {} parameters",
        params.len(),
        count_params(&params)
    );
    Ok(ExitCode::SUCCESS)
}

pub fn inspect(a: &InspectArgs) -> anyhow::Result<ExitCode> {
    let ck = checkpoint::load(&a.checkpoint)
        .with_context(|| format!("cannot read checkpoint {}", a.checkpoint.display()))?;
    let kind = match ck.source {
        Source::Pth => "PyTorch .pth",
        Source::Safetensors => "safetensors",
    };
    let total: usize = ck.tensors.values().map(|t| t.numel()).sum();
    println!(
        "{}: {kind}, {} tensors, {total} values",
        a.checkpoint.display(),
        ck.tensors.len()
    );
    if let Some(meta) = &ck.meta {
        println!("metadata: {}", serde_json::to_string_pretty(meta)?);
    }
    if a.tensors {
        for (name, t) in &ck.tensors {
            println!("{name:<40} {:<9} {:?}", t.dtype.to_string(), t.shape);
        }
    }
    let cfg = match (&a.model.model, &ck.meta) {
        (Some(_), _) => Some(model_config(&a.model, "")?.1),
        (None, Some(meta)) => Some(meta.config.clone()),
        (None, None) => None,
    };
    let Some(cfg) = cfg else {
        println!("(pass --model NAME to compare with a model's parameter table)");
        return Ok(ExitCode::SUCCESS);
    };
    let report = LoadReport::compare(&cfg.parameters(), ck.shapes());
    println!("{report}");
    if !report.mismatched.is_empty() {
        bail!(
            "{} tensors have shapes other than the model's",
            report.mismatched.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn synth(a: &SynthArgs) -> anyhow::Result<ExitCode> {
    let summary = crate::synth::generate(&a.output, a.per_class, a.size, a.seed)?;
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}
