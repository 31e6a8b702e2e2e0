//! `mae-train pretrain`: MAE self-supervised pretraining (facebookresearch/mae
//! `main_pretrain.py`, `engine_pretrain.py`).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use mae_models::checkpoint::{self, CheckpointKind, CheckpointMeta, StateDict, Task};
use mae_models::preprocess::PreprocessSpec;
use mae_models::{LoadReport, MaeConfig, ModelConfig, Overrides};
use tch::{nn, Kind, Tensor};

use crate::cli::PretrainArgs;
use crate::data::transform::TrainAug;
use crate::data::{self, Dataset};
use crate::engine::setup::Setup;
use crate::engine::to_input;
use crate::engine::{train_epoch, TrainBatches};
use crate::model::load::{adapt_for_mae, load_into, state_dict};
use crate::model::mae::MaskedAutoencoderViT;
use crate::optim::{param_groups, AdamW};
use crate::recon::{render_grid, save_grid};
use crate::rng::Rng;

/// Images of a pretraining set: the train split of an ImageFolder tree (in a folder or a zip
/// archive) or `.npz`, or every image under a flat folder or in a zip archive (labels are not
/// used).
pub fn open_unlabeled(path: &Path) -> anyhow::Result<Dataset> {
    if data::has_split(path, "train")? {
        return data::open(path, "train");
    }
    let items = data::unlabeled_items(path)?;
    if items.is_empty() {
        bail!(
            "no images ({}) under {}",
            data::IMAGE_EXTENSIONS.join(", "),
            path.display()
        );
    }
    Ok(Dataset {
        items,
        class_names: vec!["image".into()],
        task: Task::MultiClass,
        source: path.display().to_string(),
    })
}

/// `mae-train pretrain`.
pub fn pretrain(a: &PretrainArgs) -> anyhow::Result<ExitCode> {
    if !(0.0..1.0).contains(&a.mask_ratio) {
        bail!("--mask-ratio {} must be in [0, 1)", a.mask_ratio);
    }
    if let (Some(init), Some(resume)) = (&a.init, &a.run.resume) {
        bail!(
            "--init {} cannot be combined with --resume {}: --init starts a new run from a \
             checkpoint's weights (epoch 0, a new schedule and optimizer), --resume continues a \
             run from its own checkpoint; to continue a run started with --init, drop --init",
            init.display(),
            resume.display()
        );
    }
    let setup = Setup::new(&a.run, &a.dist, &a.amp)?;
    let device = setup.device;
    let train = Arc::new(open_unlabeled(&a.data.data_path)?);
    let cfg = match setup.config(&a.arch, Overrides::default())? {
        ModelConfig::Mae(mut c) => {
            if setup.resume.is_none() {
                c.norm_pix_loss = a.norm_pix_loss;
            }
            c
        }
        ModelConfig::Vit(_) if setup.resume.is_some() => {
            bail!("--resume needs an MAE pretraining checkpoint")
        }
        ModelConfig::Vit(_) => bail!(
            "--model {} is not an MAE model; pretraining needs mae_* presets",
            a.arch.model
        ),
    };
    let spec = PreprocessSpec::imagenet(cfg.img_size);
    setup.dist.check_same(
        "model configuration and data",
        &format!("{cfg:?} {}", train.len()),
    )?;
    // --init's weights, checked before the run folder is made; their digest goes into
    // args.json (the main process reads the file).
    let init = match &a.init {
        Some(p) => Some(read_init(p, &cfg, &a.arch.model)?),
        None => None,
    };
    let mut record = serde_json::Map::new();
    if let (Some(p), true) = (&a.init, setup.dist.is_main()) {
        let sha = mae_models::digest::sha256_file(p)
            .with_context(|| format!("cannot read --init checkpoint {}", p.display()))?;
        record.insert("init_sha256".into(), sha.into());
    }
    let (run, args) = setup.open_run_recording("pretrain", a, record)?;

    // The model: encoder and decoder of MAE.
    tch::manual_seed(a.run.seed as i64);
    let vs = nn::VarStore::new(device);
    let model = MaskedAutoencoderViT::new(&vs.root(), &cfg);
    if let (Some(sd), Some(p)) = (&init, &a.init) {
        let report = load_into(&vs, sd);
        println!("{report}");
        if !report.is_exact() {
            bail!(
                "--init {} does not fit the model: {}",
                p.display(),
                misfit(&report)
            );
        }
    }
    setup.dist.broadcast_vars(&vs)?;

    // The optimiser: AdamW (betas 0.9, 0.95), no layer decay.
    let mut names: Vec<(String, usize)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(k, t)| (k, t.dim()))
        .collect();
    names.sort();
    let n_parameters: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    let groups = param_groups(&names, cfg.depth, a.optim.weight_decay, 1.0, &[]);
    let mut opt = AdamW::new(&vs, &groups, (0.9, 0.95));
    let (start_epoch, _) = setup.restore(&vs, &mut opt, &run)?;
    println!(
        "model {} ({n_parameters} trainable parameters), {} images, device {device:?}",
        a.arch.model,
        train.len()
    );
    let sched = setup.schedule(&a.optim, &a.amp, None)?;
    let epochs = setup.epochs(train.len(), &a.optim, start_epoch)?;
    let vis = vis_batch(&train, &spec, &model, a.run.seed)?;
    // The augmentation: RandomResizedCrop (scale 0.2–1) and flip.
    let batches = TrainBatches {
        spec: spec.clone(),
        aug: TrainAug {
            scale: (0.2, 1.0),
            hflip: true,
            randaug: None,
        },
        reprob: 0.0,
        batch_size: a.optim.batch_size,
        workers: a.data.num_workers,
        seed: a.run.seed,
    };
    let all: Vec<usize> = (0..train.len()).collect();
    let n_patches = model.pos_embed.size()[1] - 1;
    let started = Instant::now();
    for epoch in epochs {
        let loader = batches.epoch(&train, &all, epoch, &setup.dist);
        // The loss: mean squared error on the masked patches.
        let stats = train_epoch(loader, epoch, &sched, &mut opt, &setup.dist, |b, _| {
            let noise = mask_noise(&b.indices, n_patches, a.run.seed, epoch).to_device(device);
            model
                .forward_with_noise(&to_input(b, spec.input_size, device), &noise, a.mask_ratio)
                .loss
        })?;
        let (train_loss, cur_lr) = (stats.loss, stats.lr);
        println!(
            "epoch {epoch}: train_loss {train_loss:.4} lr {cur_lr:.2e} | {:.0}s",
            started.elapsed().as_secs_f64()
        );
        run.log(&serde_json::json!({"train_lr": cur_lr, "train_loss": train_loss, "epoch": epoch, "n_parameters": n_parameters}))?;
        if !run.main {
            continue;
        }
        if let Err(e) = crate::plot::write_run_plots(&run.path) {
            eprintln!("warning: no plots this epoch: {e:#}");
        }
        let mut meta = CheckpointMeta::new(
            CheckpointKind::MaePretrain,
            &a.arch.model,
            ModelConfig::Mae(cfg.clone()),
            concat!("mae-train ", env!("CARGO_PKG_VERSION")),
        );
        meta.preprocess = spec.clone();
        meta.epoch = Some(epoch);
        meta.args = args.clone();
        meta.metrics.insert("train_loss".into(), train_loss);
        let scaler = sched.scaler_state();
        run.save_epoch(epoch, &state_dict(&vs), &meta, &opt, scaler.as_ref())?;
        if a.vis_every > 0 && ((epoch + 1) % a.vis_every == 0 || epoch + 1 == a.optim.epochs) {
            let (imgs, noise) = &vis;
            let grid = render_grid(
                &model,
                &imgs.to_device(device),
                &noise.to_device(device),
                a.mask_ratio,
                &spec,
            );
            std::fs::create_dir_all(run.file("vis")).context("cannot create vis folder")?;
            save_grid(
                &grid,
                a.mask_ratio,
                &run.file(&format!("vis/epoch-{epoch:04}.png")),
            )?;
        }
    }
    println!(
        "training time {:.0}s; outputs in {}",
        started.elapsed().as_secs_f64(),
        run.path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads the checkpoint of `--init`: its encoder and decoder tensors, with the position
/// embeddings resized to `cfg`'s grid; refuses a checkpoint of another architecture.
fn read_init(path: &Path, cfg: &MaeConfig, model: &str) -> anyhow::Result<StateDict> {
    let ck = checkpoint::load(path)
        .with_context(|| format!("cannot read --init checkpoint {}", path.display()))?;
    println!("Load pre-trained checkpoint from: {}", path.display());
    let p = path.display();
    match ck.meta.as_ref().map(|m| (&m.config, &m.arch)) {
        Some((ModelConfig::Vit(_), arch)) => bail!(
            "--init {p}: a classifier checkpoint ({arch}), not MAE pretraining; --init needs \
             the encoder and decoder of a pretraining checkpoint (a classifier is a start for \
             finetune, not pretrain)"
        ),
        Some((ModelConfig::Mae(c), arch)) => {
            let diff = architecture_differences(c, cfg);
            if !diff.is_empty() {
                bail!(
                    "--init {p}: the checkpoint ({arch}) is another architecture than --model \
                     {model}: {}; give its --model and --depth",
                    diff.join("; ")
                );
            }
            if c.norm_pix_loss != cfg.norm_pix_loss {
                println!(
                    "note: the checkpoint was trained with norm_pix_loss {}, this run uses {}",
                    c.norm_pix_loss, cfg.norm_pix_loss
                );
            }
        }
        None => {}
    }
    if !ck.tensors.contains_key("decoder_embed.weight") {
        let what = if ck.tensors.contains_key("head.weight") {
            "a classifier (it has head.weight)"
        } else if ck.tensors.contains_key("patch_embed.proj.weight") {
            "encoder weights only"
        } else {
            "no ViT weights (no patch_embed.proj.weight)"
        };
        bail!(
            "--init {p}: {what}, without the MAE decoder (no decoder_embed.weight); --init \
             needs a pretraining checkpoint with its decoder (mae-train pretrain's, or an \
             official mae_visualize_vit_*.pth); encoder-only weights are a start for \
             finetune --finetune"
        );
    }
    let mut sd = ck.tensors;
    let expected = cfg.parameters();
    for note in adapt_for_mae(&mut sd, &expected) {
        println!("{note}");
    }
    let report = LoadReport::compare(
        &expected,
        sd.iter().map(|(k, v)| (k.as_str(), v.shape.as_slice())),
    );
    if !report.is_exact() {
        bail!(
            "--init {p} does not fit --model {model}: {}\n{report}",
            misfit(&report)
        );
    }
    Ok(sd)
}

/// The architecture fields in which `ck` (a checkpoint's) differs from `model`, as
/// "embed_dim 192 in the checkpoint, 384 in the model"; the input size may differ (the
/// position embeddings are resized) and so may the loss.
fn architecture_differences(ck: &MaeConfig, model: &MaeConfig) -> Vec<String> {
    let fields: [(&str, String, String); 10] = [
        (
            "patch_size",
            ck.patch_size.to_string(),
            model.patch_size.to_string(),
        ),
        (
            "in_chans",
            ck.in_chans.to_string(),
            model.in_chans.to_string(),
        ),
        (
            "embed_dim",
            ck.embed_dim.to_string(),
            model.embed_dim.to_string(),
        ),
        ("depth", ck.depth.to_string(), model.depth.to_string()),
        (
            "num_heads",
            ck.num_heads.to_string(),
            model.num_heads.to_string(),
        ),
        (
            "decoder_embed_dim",
            ck.decoder_embed_dim.to_string(),
            model.decoder_embed_dim.to_string(),
        ),
        (
            "decoder_depth",
            ck.decoder_depth.to_string(),
            model.decoder_depth.to_string(),
        ),
        (
            "decoder_num_heads",
            ck.decoder_num_heads.to_string(),
            model.decoder_num_heads.to_string(),
        ),
        (
            "mlp_ratio",
            ck.mlp_ratio.to_string(),
            model.mlp_ratio.to_string(),
        ),
        (
            "layer_norm_eps",
            ck.layer_norm_eps.to_string(),
            model.layer_norm_eps.to_string(),
        ),
    ];
    fields
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .map(|(name, a, b)| format!("{name} {a} in the checkpoint, {b} in the model"))
        .collect()
}

/// What keeps a load report from matching exactly, counted, with the first key of each kind.
fn misfit(r: &LoadReport) -> String {
    let mut parts = Vec::new();
    if let Some(m) = r.mismatched.first() {
        parts.push(format!(
            "{} tensors of another shape (first: {} is {:?} in the checkpoint, {:?} in the model)",
            r.mismatched.len(),
            m.name,
            m.found,
            m.expected
        ));
    }
    if let Some(k) = r.missing.first() {
        parts.push(format!("{} missing (first: {k})", r.missing.len()));
    }
    if let Some(k) = r.unexpected.first() {
        parts.push(format!("{} unexpected (first: {k})", r.unexpected.len()));
    }
    parts.join("; ")
}

/// Per-image masking noise `[b, l]` drawn from (seed, epoch, image index): the same mask for an
/// image whichever rank or batch it lands in.
fn mask_noise(indices: &[usize], l: i64, seed: u64, epoch: u64) -> Tensor {
    let mut noise = Vec::with_capacity(indices.len() * l as usize);
    for &i in indices {
        let mut rng = Rng::derive(&[seed, epoch, i as u64, 0x6d61736b]);
        noise.extend((0..l).map(|_| rng.unit() as f32));
    }
    Tensor::from_slice(&noise).reshape([indices.len() as i64, l])
}

/// The fixed images and masking noise of the progress grids: the first four images.
fn vis_batch(
    ds: &Dataset,
    spec: &PreprocessSpec,
    model: &MaskedAutoencoderViT,
    seed: u64,
) -> anyhow::Result<(Tensor, Tensor)> {
    let k = ds.len().min(4);
    let s = spec.input_size as i64;
    let mut px = Vec::new();
    for item in &ds.items[..k] {
        px.extend(mae_models::imaging::preprocess_eval(&item.image()?, spec));
    }
    let l = model.pos_embed.size()[1] - 1;
    let mut rng = Rng::derive(&[seed, 0x715]);
    let noise: Vec<f32> = (0..k as i64 * l).map(|_| rng.unit() as f32).collect();
    Ok((
        Tensor::from_slice(&px).reshape([k as i64, 3, s, s]),
        Tensor::from_slice(&noise)
            .reshape([k as i64, l])
            .to_kind(Kind::Float),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architecture_differences_name_the_fields_but_not_the_input_size() {
        let base = MaeConfig::preset("mae_vit_tiny_patch4_28").expect("preset");
        let mut other = base.clone();
        other.img_size = 32;
        other.norm_pix_loss = !base.norm_pix_loss;
        assert!(architecture_differences(&base, &other).is_empty());
        other.embed_dim = 384;
        other.depth = 2;
        assert_eq!(
            architecture_differences(&base, &other),
            [
                format!(
                    "embed_dim {} in the checkpoint, 384 in the model",
                    base.embed_dim
                ),
                format!("depth {} in the checkpoint, 2 in the model", base.depth),
            ]
        );
    }
}
