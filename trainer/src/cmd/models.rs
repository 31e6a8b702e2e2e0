//! `mae-train models`: the model zoo, or one model's parameter table.

use std::process::ExitCode;

use mae_models::config::{count_params, mae_presets, vit_presets};
use mae_models::{ModelConfig, Overrides};

use crate::cli::{ArchArgs, ModelsArgs};

/// The preset named by `--model`, with the overrides applied and validated.
pub fn model_config(a: &ArchArgs, default: &str) -> anyhow::Result<(String, ModelConfig)> {
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
