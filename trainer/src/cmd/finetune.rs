//! `mae-train finetune`: the MAE fine-tuning recipe (facebookresearch/mae `main_finetune.py`,
//! `engine_finetune.py`).

use crate::cli::FinetuneArgs;
use crate::data::mixup::{mix, MixConfig};
use crate::data::randaug;
use crate::data::transform::TrainAug;
use crate::data::{self, Dataset};
use crate::engine::classifier::data_summary;
use crate::engine::setup::Setup;
use crate::engine::*;
use crate::engine::{train_epoch, TrainBatches};
use crate::model::load::{adapt_for_classifier, load_into, state_dict};
use crate::model::vit::VisionTransformer;
use crate::optim::{param_groups, AdamW};
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

/// The classifier's architecture: the resumed run's, or the preset with the data's classes.
fn classifier_config(
    setup: &Setup,
    a: &FinetuneArgs,
    train: &Dataset,
) -> anyhow::Result<VitConfig> {
    if let Some(n) = a.nb_classes {
        if n != train.num_outputs() {
            bail!(
                "--nb-classes {n} but {} has {} classes",
                train.source,
                train.num_outputs()
            );
        }
    }
    let classes = Overrides {
        num_classes: Some(train.num_outputs()),
        ..Default::default()
    };
    Ok(match setup.config(&a.arch, classes)? {
        ModelConfig::Vit(mut c) => {
            if setup.resume.is_none() {
                c.global_pool = !a.cls_token;
            }
            c
        }
        ModelConfig::Mae(_) if setup.resume.is_some() => {
            bail!("--resume needs a classifier checkpoint; use --finetune for MAE weights")
        }
        ModelConfig::Mae(_) => bail!(
            "--model {} is an MAE model; fine-tune its encoder with a vit_* model",
            a.arch.model
        ),
    })
}

/// AdamW (betas 0.9, 0.999) over layer-decayed parameter groups.
fn optimizer(vs: &nn::VarStore, cfg: &VitConfig, a: &FinetuneArgs) -> AdamW {
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
        a.optim.weight_decay,
        a.layer_decay,
        &["cls_token", "pos_embed"],
    );
    AdamW::new(vs, &groups, (0.9, 0.999))
}

/// RandomResizedCrop, flip, RandAugment and random erasing per image; Mixup/CutMix per batch.
fn augmentation(
    a: &FinetuneArgs,
    spec: &mae_models::preprocess::PreprocessSpec,
    randaug: Option<randaug::RandAugment>,
) -> (TrainBatches, MixConfig) {
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
        batch_size: a.optim.batch_size,
        workers: a.data.num_workers,
        seed: a.run.seed,
    };
    (batches, mix_cfg)
}

/// `mae-train finetune`.
pub fn finetune(a: &FinetuneArgs) -> anyhow::Result<ExitCode> {
    let setup = Setup::new(&a.run, &a.dist, &a.amp)?;
    let device = setup.device;
    let eval_dist = setup.eval_dist(a.dist.dist_eval);
    let randaug = randaug::parse_aa(&a.aa).with_context(|| format!("--aa {}", a.aa))?;
    let train = data::open(&a.data.data_path, "train")?;
    let val = data::open(&a.data.data_path, "val")?;
    let cfg = classifier_config(&setup, a, &train)?;
    let spec = mae_models::preprocess::PreprocessSpec::imagenet(cfg.img_size);
    setup.dist.check_same(
        "model configuration and data",
        &format!("{cfg:?} {} {}", train.len(), val.len()),
    )?;
    let (run, args_json) = setup.open_run("finetune", a)?;
    let order = crate::engine::training_order(&train, a.train_samples, a.run.seed, &run)?;
    let train = Arc::new(train);
    let val = Arc::new(val);

    // The model head: a ViT classifier, from scratch or from --finetune's weights.
    tch::manual_seed(a.run.seed as i64);
    let mut vs = nn::VarStore::new(device);
    let model = VisionTransformer::new(&vs.root(), &cfg, a.drop_path);
    let n_parameters: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    if let Some(p) = &a.finetune {
        if setup.resume.is_none() {
            init_from(&vs, &cfg, p)?;
        }
    }
    if a.finetune.is_none() && setup.resume.is_none() && a.layer_decay < 1.0 && setup.dist.is_main()
    {
        println!(
            "note: training from scratch with --layer-decay {} (lower blocks learn more slowly); \
             layer decay is meant for pretrained weights, --layer-decay 1.0 trains every block alike",
            a.layer_decay
        );
    }
    setup.dist.broadcast_vars(&vs)?;

    // The optimiser: AdamW over layer-decayed groups.
    // With --model-ema, the moving average of the weights. `--eval` evaluates the weights a
    // checkpoint holds, which for a run with the average are the average.
    let mut opt = crate::ema::Averaged::new(
        optimizer(&vs, &cfg, a),
        &vs,
        (a.model_ema && !a.eval).then_some(a.model_ema_decay),
    );
    let (start_epoch, mut best) = setup.restore(&vs, &mut opt, &run)?;
    println!(
        "model {} ({n_parameters} parameters), {} classes ({}), {} train / {} val images, device {device:?}",
        a.arch.model,
        train.num_outputs(),
        train.task.as_str(),
        order.len(),
        val.len()
    );
    let sched = setup.schedule(&a.optim, &a.amp, a.clip_grad)?;

    if a.eval {
        let plan = EvalPlan {
            spec: &spec,
            device,
            batch_size: a.optim.batch_size,
            workers: a.data.num_workers,
            dist: eval_dist,
        };
        let ev = evaluate(&model, &val, &plan, "eval")?;
        println!("{}", ev.metrics);
        return Ok(ExitCode::SUCCESS);
    }

    let epochs = setup.epochs(order.len(), &a.optim, start_epoch)?;
    // The augmentation: RandomResizedCrop, flip, RandAugment, random erasing, Mixup/CutMix.
    let (batches, mix_cfg) = augmentation(a, &spec, randaug);
    let data = data_summary(&a.data.data_path, &train, &order, &val, a.train_samples);
    let end = ClassifierEpoch {
        run: &run,
        arch: &a.arch.model,
        cfg: &cfg,
        train: &train,
        val: &val,
        spec: &spec,
        args: &args_json,
        n_parameters,
        device,
        batch_size: a.optim.batch_size,
        workers: a.data.num_workers,
        eval_dist,
        started: Instant::now(),
        data: &data,
    };
    // The loss: (class-weighted) soft-target cross-entropy, or BCE for multi-label.
    let c = train.num_outputs();
    let class_weights = if a.balance_classes {
        let w = balanced_weights(&train, &order)?;
        println!("class weights: {w:.3?}");
        Some(Tensor::from_slice(&w).to_device(device))
    } else {
        None
    };
    for epoch in epochs {
        let loader = batches.epoch(&train, &order, epoch, &setup.dist);
        let stats = train_epoch(loader, epoch, &sched, &mut opt, &setup.dist, |b, it| {
            let xs = to_input(b, spec.input_size, device);
            let t = targets(&b.labels, train.task, c, a.smoothing).to_device(device);
            let mut mix_rng = Rng::derive(&[a.run.seed, epoch, it as u64, 2]);
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
        // With --model-ema the average is validated and saved, then trained on no further.
        opt.swap();
        let finished = end.finish(
            epoch,
            stats,
            &model,
            &mut best,
            state_dict(&vs),
            (&opt, scaler.as_ref()),
        );
        opt.swap();
        finished?;
    }
    vs.freeze();
    println!(
        "training time {:.0}s; outputs in {}",
        end.started.elapsed().as_secs_f64(),
        run.path.display()
    );
    Ok(ExitCode::SUCCESS)
}
