//! `mae-train finetune`: the MAE fine-tuning recipe (facebookresearch/mae `main_finetune.py`,
//! `engine_finetune.py`).

use crate::cli::FinetuneArgs;
use crate::data::mixup::{mix, MixConfig};
use crate::data::randaug;
use crate::data::transform::TrainAug;
use crate::data::{self, Dataset};
use crate::engine::dist::Dist;
use crate::engine::*;
use crate::engine::{epochs_to_run, train_epoch, RunDir, Schedule, TrainBatches};
use crate::model::load::{adapt_for_classifier, load_into, state_dict};
use crate::model::vit::VisionTransformer;
use crate::optim::{param_groups, scaled_lr, AdamW};
use crate::rng::Rng;
use anyhow::{bail, Context};
use mae_models::checkpoint::{self, Task};
use mae_models::{ModelConfig, Overrides, VitConfig};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

/// `n / (classes × n_class)` over the training images `order` (scikit-learn's "balanced").
fn balanced_weights(train: &Dataset, order: &[usize]) -> anyhow::Result<Vec<f32>> {
    if train.task == Task::MultiLabel {
        bail!("--balance-classes applies to multi-class and binary tasks, not multi-label");
    }
    let c = train.num_outputs();
    let mut counts = vec![0usize; c];
    for &i in order {
        counts[train.items[i].class().min(c - 1)] += 1;
    }
    Ok(counts
        .iter()
        .map(|&n| order.len() as f32 / (c as f32 * n.max(1) as f32))
        .collect())
}

/// Reads the checkpoint of `--finetune` and loads what fits, printing the load report.
fn init_from(vs: &nn::VarStore, cfg: &VitConfig, path: &Path) -> anyhow::Result<()> {
    let ck = checkpoint::load(path)
        .with_context(|| format!("cannot read --finetune checkpoint {}", path.display()))?;
    let mut sd = ck.tensors;
    println!("Load pre-trained checkpoint from: {}", path.display());
    for note in adapt_for_classifier(&mut sd, &cfg.parameters()) {
        println!("{note}");
    }
    let report = load_into(vs, &sd);
    println!("{report}");
    if !report.mismatched.is_empty() {
        bail!(
            "{}: {} tensors do not fit {} (first: {})",
            path.display(),
            report.mismatched.len(),
            "the model",
            report.mismatched[0].name
        );
    }
    if report.applied.is_empty() {
        bail!(
            "{}: no tensor of this checkpoint fits the model",
            path.display()
        );
    }
    Ok(())
}

/// `mae-train finetune`.
pub fn finetune(a: &FinetuneArgs) -> anyhow::Result<ExitCode> {
    let (dist, device) = Dist::init(&a.dist, device(a.device)?)?;
    let single = Dist::single();
    let eval_dist = if a.dist.dist_eval { &dist } else { &single };
    let precision = crate::engine::precision::configure(a.amp.precision, device)?;
    let randaug = randaug::parse_aa(&a.aa).with_context(|| format!("--aa {}", a.aa))?;
    let run = RunDir::create(&a.output_dir, a.keep_checkpoints, dist.is_main())?;
    let train = data::open(&a.data_path, "train")?;
    let val = data::open(&a.data_path, "val")?;
    if let Some(n) = a.nb_classes {
        if n != train.num_outputs() {
            bail!(
                "--nb-classes {n} but {} has {} classes",
                train.source,
                train.num_outputs()
            );
        }
    }
    let resume = crate::engine::read_resume(a.resume.as_deref())?;
    let cfg = match resume.as_ref().and_then(|r| r.meta.as_ref()) {
        Some(meta) => match &meta.config {
            ModelConfig::Vit(c) => c.clone(),
            ModelConfig::Mae(_) => {
                bail!("--resume needs a classifier checkpoint; use --finetune for MAE weights")
            }
        },
        None if resume.is_some() => {
            bail!("--resume checkpoint has no mae metadata; use --finetune")
        }
        None => {
            let o = Overrides {
                img_size: a.input_size,
                num_classes: Some(train.num_outputs()),
                depth: a.depth,
                ..Default::default()
            };
            let ModelConfig::Vit(mut c) = ModelConfig::preset(&a.model)?.with_overrides(&o)? else {
                bail!(
                    "--model {} is an MAE model; fine-tune its encoder with a vit_* model",
                    a.model
                )
            };
            c.global_pool = !a.cls_token;
            c
        }
    };
    let spec = mae_models::preprocess::PreprocessSpec::imagenet(cfg.img_size);
    dist.check_same(
        "model configuration and data",
        &format!("{cfg:?} {} {}", train.len(), val.len()),
    )?;

    let order = crate::engine::training_order(&train, a.train_samples, a.seed, &run)?;
    let train = Arc::new(train);
    let val = Arc::new(val);

    tch::manual_seed(a.seed as i64);
    let mut vs = nn::VarStore::new(device);
    let model = VisionTransformer::new(&vs.root(), &cfg, a.drop_path);
    let n_parameters: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    if let Some(p) = &a.finetune {
        if resume.is_none() {
            init_from(&vs, &cfg, p)?;
        }
    }
    if a.finetune.is_none() && a.resume.is_none() && a.layer_decay < 1.0 && dist.is_main() {
        println!(
            "note: training from scratch with --layer-decay {} (lower blocks learn more slowly); \
             layer decay is meant for pretrained weights, --layer-decay 1.0 trains every block alike",
            a.layer_decay
        );
    }
    dist.broadcast_vars(&vs)?;
    let names_dims: Vec<(String, usize)> = {
        let mut v: Vec<_> = vs
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.dim()))
            .collect();
        v.sort();
        v
    };
    let groups = param_groups(
        &names_dims,
        cfg.depth,
        a.weight_decay,
        a.layer_decay,
        &["cls_token", "pos_embed"],
    );
    let mut opt = AdamW::new(&vs, &groups, (0.9, 0.999));
    let eff_batch = a.batch_size * a.accum_iter * dist.world;
    let lr = a.lr.unwrap_or_else(|| scaled_lr(a.blr, eff_batch));
    let mut start_epoch = 0;
    let mut best = f64::NEG_INFINITY;
    if let (Some(ck), Some(path)) = (&resume, &a.resume) {
        start_epoch = crate::engine::resume(&vs, &mut opt, ck, path, &run)?;
        let meta = ck.meta.as_ref().expect("checked above");
        best = meta
            .metrics
            .get("best")
            .copied()
            .unwrap_or(f64::NEG_INFINITY);
    }
    let args_json = args_json(a);
    run.write("args.json", &serde_json::to_string_pretty(&args_json)?)?;
    println!(
        "model {} ({n_parameters} parameters), {} classes ({}), {} train / {} val images, device {device:?}",
        a.model,
        train.num_outputs(),
        train.task.as_str(),
        order.len(),
        val.len()
    );
    println!(
        "base lr: {:.2e}, actual lr: {lr:.2e}, effective batch size: {eff_batch}, precision {}",
        lr * 256.0 / eff_batch as f64,
        crate::engine::precision::name(precision)
    );

    if a.eval {
        let ev = evaluate(
            &model,
            &val,
            &spec,
            device,
            a.batch_size,
            a.num_workers,
            "eval",
            eval_dist,
        )?;
        println!("{}", ev.metrics);
        return Ok(ExitCode::SUCCESS);
    }

    let epochs = epochs_to_run(
        order.len(),
        a.batch_size,
        start_epoch,
        a.epochs,
        a.stop_after,
    )?;
    let sched = Schedule {
        lr,
        min_lr: a.min_lr,
        warmup_epochs: a.warmup_epochs,
        epochs: a.epochs,
        accum_iter: a.accum_iter,
        clip_grad: a.clip_grad,
        scaler: crate::engine::precision::scaler_for(precision, &a.amp),
    };
    crate::engine::load_scaler(&sched, a.resume.as_deref())?;
    let mix_cfg = MixConfig {
        mixup_alpha: a.mixup,
        cutmix_alpha: a.cutmix,
        prob: a.mixup_prob,
        switch_prob: a.mixup_switch_prob,
    };
    let batches = TrainBatches {
        spec: spec.clone(),
        aug: TrainAug {
            scale: (a.min_crop_scale, 1.0),
            hflip: true,
            randaug,
        },
        reprob: a.reprob,
        batch_size: a.batch_size,
        workers: a.num_workers,
        seed: a.seed,
    };
    let end = ClassifierEpoch {
        run: &run,
        arch: &a.model,
        cfg: &cfg,
        train: &train,
        val: &val,
        spec: &spec,
        args: &args_json,
        n_parameters,
        device,
        batch_size: a.batch_size,
        workers: a.num_workers,
        eval_dist,
        started: Instant::now(),
    };
    let c = train.num_outputs();
    let class_weights = if a.balance_classes {
        let w = balanced_weights(&train, &order)?;
        println!("class weights: {w:.3?}");
        Some(Tensor::from_slice(&w).to_device(device))
    } else {
        None
    };
    for epoch in epochs {
        let loader = batches.epoch(&train, &order, epoch, &dist);
        let stats = train_epoch(loader, epoch, &sched, &mut opt, &dist, |b, it| {
            let xs = to_input(b, spec.input_size, device);
            let t = targets(&b.labels, train.task, c, a.smoothing).to_device(device);
            let mut mix_rng = Rng::derive(&[a.seed, epoch, it as u64, 2]);
            let (xs, t, _) = mix(&xs, &t, &mix_cfg, &mut mix_rng);
            let logits = model.forward_t(&xs, true);
            match &class_weights {
                // Each sample weighs what its (soft) target's classes weigh.
                Some(w) => {
                    let sw = (&t * w).sum_dim_intlist(-1, false, Kind::Float);
                    (per_sample_loss(&logits, &t, train.task) * &sw).sum(Kind::Float)
                        / sw.sum(Kind::Float)
                }
                None => loss_fn(&logits, &t, train.task),
            }
        })?;
        let scaler = sched.scaler_state();
        end.finish(
            epoch,
            stats,
            &model,
            &mut best,
            state_dict(&vs),
            (&opt, scaler.as_ref()),
        )?;
    }
    vs.freeze();
    println!(
        "training time {:.0}s; outputs in {}",
        end.started.elapsed().as_secs_f64(),
        run.path.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn args_json(a: &FinetuneArgs) -> serde_json::Value {
    serde_json::json!({
        "data_path": a.data_path, "model": a.model, "input_size": a.input_size, "depth": a.depth,
        "finetune": a.finetune, "batch_size": a.batch_size, "epochs": a.epochs,
        "accum_iter": a.accum_iter, "lr": a.lr, "blr": a.blr, "min_lr": a.min_lr,
        "warmup_epochs": a.warmup_epochs, "layer_decay": a.layer_decay,
        "weight_decay": a.weight_decay, "clip_grad": a.clip_grad, "drop_path": a.drop_path,
        "smoothing": a.smoothing, "mixup": a.mixup, "cutmix": a.cutmix,
        "mixup_prob": a.mixup_prob, "mixup_switch_prob": a.mixup_switch_prob, "reprob": a.reprob,
        "aa": a.aa, "min_crop_scale": a.min_crop_scale, "cls_token": a.cls_token,
        "balance_classes": a.balance_classes,
        "train_samples": a.train_samples, "seed": a.seed,
        "precision": a.amp.precision.map(crate::engine::precision::name),
    })
}
