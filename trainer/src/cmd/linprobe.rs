//! `mae-train linprobe`: linear probing of a frozen encoder, as upstream `main_linprobe.py`.
//!
//! The encoder (from an MAE pretraining checkpoint, official or ours) is frozen; its pooled
//! embedding goes through `BatchNorm1d(d, affine=False, eps=1e-6)` and a linear layer
//! (`head.0`, `head.1`, trunc-normal std 0.01), trained with LARS (momentum 0.9, trust
//! coefficient 0.001, weight decay 0 by default) under the per-step warm-up + cosine schedule,
//! on RandomResizedCrop + flip only. Checkpoints keep the upstream `head.0.*` / `head.1.*`
//! names; `mae-train eval` and `mae-export` fold the normalisation into the linear layer.

use crate::cli::LinprobeArgs;
use crate::data::transform::TrainAug;
use crate::data::{self};
use crate::engine::dist::Dist;
use crate::engine::{device, loss_fn, targets, to_input, ClassifierEpoch};
use crate::engine::{epochs_to_run, train_epoch, RunDir, Schedule, TrainBatches};
use crate::model::load::{adapt_for_classifier, load_into};
use crate::model::probe::{probe_state_dict, LinearProbe};
use crate::optim::{scaled_lr, Lars};
use anyhow::{bail, Context};
use mae_models::checkpoint;
use mae_models::{ModelConfig, Overrides};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;
use tch::nn::{self, ModuleT};
use tch::Tensor;

/// `mae-train linprobe`.
pub fn linprobe(a: &LinprobeArgs) -> anyhow::Result<ExitCode> {
    let (dist, device) = Dist::init(&a.dist, device(a.device)?)?;
    let single = Dist::single();
    let precision = crate::engine::precision::configure(a.amp.precision, device)?;
    let train = data::open(&a.data_path, "train")?;
    let val = data::open(&a.data_path, "val")?;
    if a.finetune.is_none() && a.resume.is_none() {
        eprintln!(
            "note: no --finetune checkpoint: probing a randomly initialised encoder (a baseline)"
        );
    }
    let resume = crate::engine::read_resume(a.resume.as_deref())?;
    let cfg = match resume.as_ref().map(|r| r.meta.as_ref()) {
        Some(Some(meta)) => match &meta.config {
            ModelConfig::Vit(c) => c.clone(),
            ModelConfig::Mae(_) => bail!("--resume needs a linear-probe checkpoint of ours"),
        },
        Some(None) => bail!("--resume checkpoint has no mae metadata; use --finetune"),
        None => {
            let o = Overrides {
                img_size: a.input_size,
                num_classes: Some(train.num_outputs()),
                depth: a.depth,
                ..Default::default()
            };
            let ModelConfig::Vit(mut c) = ModelConfig::preset(&a.model)?.with_overrides(&o)? else {
                bail!(
                    "--model {} is an MAE model; probe its encoder with the vit_* model",
                    a.model
                )
            };
            c.global_pool = a.global_pool;
            c
        }
    };
    if train.task != mae_models::checkpoint::Task::MultiClass
        && train.task != mae_models::checkpoint::Task::Binary
    {
        bail!(
            "linear probing trains a softmax classifier; {} is {}",
            train.source,
            train.task.as_str()
        );
    }
    let spec = mae_models::preprocess::PreprocessSpec::imagenet(cfg.img_size);
    let run = RunDir::create(&a.output_dir, a.keep_checkpoints, dist.is_main())?;
    dist.check_same(
        "model configuration and data",
        &format!("{cfg:?} {} {}", train.len(), val.len()),
    )?;

    let order = crate::engine::training_order(&train, a.train_samples, a.seed, &run)?;
    let train = Arc::new(train);
    let val = Arc::new(val);

    tch::manual_seed(a.seed as i64);
    let vs = nn::VarStore::new(device);
    let model = LinearProbe::new(&vs.root(), &cfg);
    if let (Some(p), None) = (&a.finetune, &resume) {
        let ck = checkpoint::load(p)
            .with_context(|| format!("cannot read --finetune checkpoint {}", p.display()))?;
        let mut sd = ck.tensors;
        println!("Load pre-trained checkpoint from: {}", p.display());
        let mut expected = cfg.parameters();
        expected.retain(|s| !s.name.starts_with("head."));
        for note in adapt_for_classifier(&mut sd, &expected) {
            println!("{note}");
        }
        sd.retain(|k, _| !k.starts_with("head."));
        let report = load_into(&vs, &sd);
        println!("{report}");
        if !report.mismatched.is_empty() || report.applied.is_empty() {
            bail!(
                "{}: the checkpoint does not fit {} (see the report above)",
                p.display(),
                a.model
            );
        }
    }
    dist.broadcast_vars(&vs)?;
    LinearProbe::freeze_encoder(&vs);
    let head_params: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(k, _)| k.starts_with("head.1."))
        .collect();
    let n_parameters: i64 = head_params.iter().map(|(_, t)| t.numel() as i64).sum();
    let mut opt = Lars::new(head_params, a.weight_decay);
    let eff_batch = a.batch_size * a.accum_iter * dist.world;
    let lr = a.lr.unwrap_or_else(|| scaled_lr(a.blr, eff_batch));
    let mut start_epoch = 0;
    let mut best = f64::NEG_INFINITY;
    if let (Some(ck), Some(path)) = (&resume, &a.resume) {
        start_epoch = crate::engine::resume(&vs, &mut opt, ck, path, &run)?;
        best = ck
            .meta
            .as_ref()
            .and_then(|m| m.metrics.get("best").copied())
            .unwrap_or(f64::NEG_INFINITY);
    }
    let args_json = serde_json::json!({
        "command": "linprobe", "data_path": a.data_path, "model": a.model,
        "input_size": a.input_size, "depth": a.depth, "finetune": a.finetune,
        "batch_size": a.batch_size, "epochs": a.epochs, "accum_iter": a.accum_iter,
        "lr": a.lr, "blr": a.blr, "min_lr": a.min_lr, "warmup_epochs": a.warmup_epochs,
        "weight_decay": a.weight_decay, "global_pool": a.global_pool,
        "train_samples": a.train_samples, "seed": a.seed,
    });
    run.write("args.json", &serde_json::to_string_pretty(&args_json)?)?;
    println!(
        "linear probe of {} ({n_parameters} trainable parameters), {} classes, {} train / {} val images, device {device:?}",
        a.model,
        train.num_outputs(),
        order.len(),
        val.len()
    );
    println!(
        "base lr: {:.2e}, actual lr: {lr:.2e}, effective batch size: {eff_batch}",
        lr * 256.0 / eff_batch as f64
    );
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
        clip_grad: None,
        scaler: crate::engine::precision::scaler_for(precision, &a.amp),
    };
    crate::engine::load_scaler(&sched, a.resume.as_deref())?;
    let batches = TrainBatches {
        spec: spec.clone(),
        aug: TrainAug {
            scale: (0.08, 1.0),
            hflip: true,
            randaug: None,
        },
        reprob: 0.0,
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
        eval_dist: if a.dist.dist_eval { &dist } else { &single },
        started: Instant::now(),
    };
    let c = train.num_outputs();
    for epoch in epochs {
        let loader = batches.epoch(&train, &order, epoch, &dist);
        let stats = train_epoch(loader, epoch, &sched, &mut opt, &dist, |b, _| {
            let xs = to_input(b, spec.input_size, device);
            let t = targets(&b.labels, train.task, c, 0.0).to_device(device);
            loss_fn(&model.forward_t(&xs, true), &t, train.task)
        })?;
        let scaler = sched.scaler_state();
        end.finish(
            epoch,
            stats,
            &model,
            &mut best,
            probe_state_dict(&vs),
            (&opt, scaler.as_ref()),
        )?;
    }
    println!(
        "training time {:.0}s; outputs in {}",
        end.started.elapsed().as_secs_f64(),
        run.path.display()
    );
    Ok(ExitCode::SUCCESS)
}
