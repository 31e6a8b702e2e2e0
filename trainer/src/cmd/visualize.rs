//! `mae-train visualize`: the reconstruction grid (`crate::recon`) of one image by an MAE
//! pretraining checkpoint.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use mae_models::checkpoint;
use mae_models::preprocess::PreprocessSpec;
use mae_models::ModelConfig;
use tch::{nn, Device, Kind, Tensor};

use crate::cli::VisualizeArgs;
use crate::model::load::load_into;
use crate::model::mae::MaskedAutoencoderViT;
use crate::recon::{render_grid, save_grid, CAPTION_H};

/// Loads an MAE pretraining checkpoint into a fresh model on `device`.
pub fn load_mae(
    path: &Path,
    device: Device,
) -> anyhow::Result<(MaskedAutoencoderViT, PreprocessSpec, nn::VarStore)> {
    let ck = checkpoint::load(path).context("cannot read checkpoint")?;
    let meta = ck.meta.as_ref().with_context(|| {
        format!(
            "{} has no mae metadata; visualize needs a checkpoint of mae-train pretrain",
            path.display()
        )
    })?;
    let ModelConfig::Mae(cfg) = &meta.config else {
        bail!(
            "{} is a classifier; visualize needs an MAE pretraining checkpoint",
            path.display()
        );
    };
    let vs = nn::VarStore::new(device);
    let model = MaskedAutoencoderViT::new(&vs.root(), cfg);
    let report = load_into(&vs, &ck.tensors);
    if !report.is_exact() {
        bail!(
            "{}: weights do not match the recorded architecture:\n{report}",
            path.display()
        );
    }
    Ok((model, meta.preprocess.clone(), vs))
}

/// `mae-train visualize`.
pub fn visualize(a: &VisualizeArgs) -> anyhow::Result<ExitCode> {
    if !(0.0..1.0).contains(&a.mask_ratio) {
        bail!("--mask-ratio {} must be in [0, 1)", a.mask_ratio);
    }
    let (model, spec, _vs) = load_mae(&a.checkpoint, Device::Cpu)?;
    let img = mae_models::input::load(&a.image)?;
    let s = spec.input_size as i64;
    let xs = Tensor::from_slice(&mae_models::imaging::preprocess_eval(&img, &spec))
        .reshape([1, 3, s, s]);
    let l = model.pos_embed.size()[1] - 1;
    tch::manual_seed(a.seed as i64);
    let noise = Tensor::rand([1, l], (Kind::Float, Device::Cpu));
    let grid = render_grid(&model, &xs, &noise, a.mask_ratio, &spec);
    let out = a.output.clone().unwrap_or_else(|| {
        let stem = a
            .image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        PathBuf::from(format!("{stem}.mae.png"))
    });
    save_grid(&grid, a.mask_ratio, &out)?;
    println!(
        "wrote {} ({}×{}): original | masked | reconstruction | reconstruction + visible",
        out.display(),
        grid.width(),
        grid.height() + CAPTION_H
    );
    Ok(ExitCode::SUCCESS)
}
