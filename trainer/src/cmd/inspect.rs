//! `mae-train inspect`: what a checkpoint holds, and its load report against a model.

use std::process::ExitCode;

use anyhow::{bail, Context};
use mae_models::checkpoint::{self, Source};
use mae_models::LoadReport;

use crate::cli::InspectArgs;

pub fn inspect(a: &InspectArgs) -> anyhow::Result<ExitCode> {
    let ck = checkpoint::load(&a.checkpoint).context("cannot read checkpoint")?;
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
        (Some(_), _) => Some(a.model.preset()?.1),
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
