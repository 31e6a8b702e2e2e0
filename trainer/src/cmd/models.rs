//! `mae-train models`: the model zoo, or one model's parameter table.

use std::process::ExitCode;

use mae_models::config::{count_params, mae_presets, vit_presets};
use mae_models::ModelConfig;

use crate::cli::ModelsArgs;

pub fn models(a: &ModelsArgs) -> anyhow::Result<ExitCode> {
    if a.model.model.is_none() {
        println!("{:<26} {:>14}", "model", "parameters");
        for name in vit_presets().iter().chain(mae_presets().iter()) {
            let cfg = ModelConfig::preset(name)?;
            println!("{name:<26} {:>14}", count_params(&cfg.parameters()));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (name, cfg) = a.model.preset()?;
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
