//! `mae-train visualize`: the reconstruction grid (`crate::recon`) of one image by an MAE
//! pretraining checkpoint, or with `--explain` a classifier's heatmap (`crate::explain`), drawn
//! as `mae-run predict --heatmaps` draws it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use mae_models::checkpoint;
use mae_models::preprocess::PreprocessSpec;
use mae_models::ModelConfig;
use tch::{nn, Device, Kind, Tensor};

use crate::cli::{VisualizeArgs, VisualizeExplainArgs};
use crate::engine::evaluate::probabilities;
use crate::explain;
use crate::model::load::load_into;
use crate::model::mae::MaskedAutoencoderViT;
use crate::model::vit::VisionTransformer;
use crate::recon::{render_grid, save_grid, CAPTION_H};
use mae_models::checkpoint::Task;
use mae_models::explain::heatmap::{self, Style};
use mae_models::explain::occlusion::Occlusion;
use mae_models::explain::{Explanation, Method};
use tch::nn::ModuleT;

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
    if let Some(method) = a.explain.explain {
        return explain_image(a, method);
    }
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

/// A classifier checkpoint loaded into a fresh model on the CPU, with its preprocessing and
/// task (a linear-probe head folded into the one linear layer it equals).
pub fn load_classifier(
    path: &Path,
) -> anyhow::Result<(
    VisionTransformer,
    PreprocessSpec,
    Task,
    Vec<String>,
    nn::VarStore,
)> {
    let mut ck = checkpoint::load(path).context("cannot read checkpoint")?;
    checkpoint::fold_bn_head(&mut ck.tensors, checkpoint::LINPROBE_BN_EPS)
        .map_err(|e| anyhow::anyhow!("{}: linear-probe head: {e}", path.display()))?;
    let meta = ck.meta.as_ref().with_context(|| {
        format!(
            "{} has no mae metadata; visualize --explain needs a classifier checkpoint of \
             mae-train finetune or linprobe",
            path.display()
        )
    })?;
    let ModelConfig::Vit(cfg) = &meta.config else {
        bail!(
            "{} is an MAE pretraining checkpoint, which classifies nothing; --explain needs a \
             classifier (fine-tune it with mae-train finetune first), or leave --explain out \
             for the reconstruction grid",
            path.display()
        );
    };
    if cfg.num_classes == 0 {
        bail!("{} has no classification head to explain", path.display());
    }
    let vs = nn::VarStore::new(Device::Cpu);
    let model = VisionTransformer::new(&vs.root(), cfg, 0.0);
    let report = load_into(&vs, &ck.tensors);
    if !report.is_exact() {
        bail!(
            "{}: weights do not match the recorded architecture:\n{report}",
            path.display()
        );
    }
    let task = meta.task.unwrap_or(Task::MultiClass);
    Ok((
        model,
        meta.preprocess.clone(),
        task,
        meta.class_names.clone(),
        vs,
    ))
}

/// The map of `method` for one normalised image `[3, s, s]` whose probabilities are `probs`.
pub fn explain_one(
    model: &VisionTransformer,
    pixels: &[f32],
    task: Task,
    method: Method,
    occlusion: &Occlusion,
) -> anyhow::Result<Explanation> {
    let s = model.cfg.img_size;
    if pixels.len() != 3 * s * s {
        bail!("{} input values, expected 3 × {s} × {s}", pixels.len());
    }
    let s = s as i64;
    let xs = Tensor::from_slice(pixels).reshape([1, 3, s, s]);
    let (maps, per_class) = match method {
        Method::Rollout => (explain::rollout(model, &xs), false),
        Method::Gradcam => (explain::gradcam(model, &xs)?, true),
        Method::Occlusion => return explain::occlusion(model, pixels, task, occlusion),
    };
    let maps = maps.get(0).contiguous();
    let shape: Vec<usize> = maps.size().iter().map(|&d| d as usize).collect();
    let values = Vec::<f32>::try_from(maps.flatten(0, -1))?;
    Ok(Explanation {
        method,
        shape,
        values,
        per_class,
    })
}

/// `visualize --explain`: the heatmap PNG and the map's `.npy` of one image.
fn explain_image(a: &VisualizeArgs, method: Method) -> anyhow::Result<ExitCode> {
    let e: &VisualizeExplainArgs = &a.explain;
    if !(0.0..=1.0).contains(&e.opacity) {
        bail!("--opacity {} must be between 0 and 1", e.opacity);
    }
    let (model, spec, task, names, _vs) = load_classifier(&a.checkpoint)?;
    explain::check(&model, method)?;
    let occlusion = Occlusion::resolve::<anyhow::Error>(
        e.occlusion_window,
        e.occlusion_stride,
        e.occlusion_baseline,
        spec.input_size,
    )?;
    let img = mae_models::input::load(&a.image)?;
    let pixels = mae_models::imaging::preprocess_eval(&img, &spec);
    let s = spec.input_size as i64;
    let xs = Tensor::from_slice(&pixels).reshape([1, 3, s, s]);
    let probs = tch::no_grad(|| probabilities(&model.forward_t(&xs, false), task));
    let probs = Vec::<f32>::try_from(probs.flatten(0, -1))?;
    let class = (0..probs.len()).fold(0, |m, i| if probs[i] > probs[m] { i } else { m });
    let map = explain_one(&model, &pixels, task, method, &occlusion)?;
    let style = Style {
        colormap: e.colormap,
        opacity: e.opacity,
        min_side: 224,
    };
    let png = heatmap::overlay(
        &pixels,
        spec.input_size,
        (spec.mean, spec.std),
        map.class_map(class)?,
        map.grid(),
        &style,
    )?;
    let out = a.output.clone().unwrap_or_else(|| {
        let name = a
            .image
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        PathBuf::from(format!("{name}.{}.png", method.as_str()))
    });
    let npy = out.with_extension("npy");
    mae_models::io::atomic_write(&npy, &heatmap::npy(&map.shape, &map.values))
        .with_context(|| format!("cannot write the map {}", npy.display()))?;
    mae_models::io::atomic_write(&out, &heatmap::png(&png)?)
        .with_context(|| format!("cannot write the heatmap {}", out.display()))?;
    let label = names
        .get(class)
        .cloned()
        .unwrap_or_else(|| class.to_string());
    println!(
        "{}: {label} {:.4}; wrote {} ({} of {label}) and {} ({:?})",
        a.image.display(),
        probs[class],
        out.display(),
        method.as_str(),
        npy.display(),
        map.shape
    );
    Ok(ExitCode::SUCCESS)
}
