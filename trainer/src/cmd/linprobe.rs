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
use crate::engine::classifier::data_summary;
use crate::engine::setup::Setup;
use crate::engine::{loss_fn, targets, to_input, ClassifierEpoch};
use crate::engine::{train_epoch, TrainBatches};
use crate::model::load::{adapt_for_classifier, load_into};
use crate::model::probe::{probe_state_dict, LinearProbe};
use crate::optim::Lars;
use anyhow::{bail, Context};
use mae_models::checkpoint::{self, Task};
use mae_models::{ModelConfig, Overrides};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;
use tch::nn::{self, ModuleT};
use tch::Tensor;

/// `mae-train linprobe`.
pub fn linprobe(a: &LinprobeArgs) -> anyhow::Result<ExitCode> {
    let setup = Setup::new(&a.run, &a.dist, &a.amp)?;
    let device = setup.device;
    let train = data::open(&a.data.data_path, "train")?;
    let val = data::open(&a.data.data_path, "val")?;
    if a.finetune.is_none() && setup.resume.is_none() {
        eprintln!(
            "note: no --finetune checkpoint: probing a randomly initialised encoder (a baseline)"
        );
    }
    let classes = Overrides {
        num_classes: Some(train.num_outputs()),
        ..Default::default()
    };
    let cfg = match setup.config(&a.arch, classes)? {
        ModelConfig::Vit(mut c) => {
            if setup.resume.is_none() {
                c.global_pool = a.global_pool;
            }
            c
        }
        ModelConfig::Mae(_) if setup.resume.is_some() => {
            bail!("--resume needs a linear-probe checkpoint of ours")
        }
        ModelConfig::Mae(_) => bail!(
            "--model {} is an MAE model; probe its encoder with the vit_* model",
            a.arch.model
        ),
    };
    if train.task != Task::MultiClass && train.task != Task::Binary {
        bail!(
            "linear probing trains a softmax classifier; {} is {}",
            train.source,
            train.task.as_str()
        );
    }
    let spec = mae_models::preprocess::PreprocessSpec::imagenet(cfg.img_size);
    setup.dist.check_same(
        "model configuration and data",
        &format!("{cfg:?} {} {}", train.len(), val.len()),
    )?;
    let (run, args_json) = setup.open_run("linprobe", a)?;
    let order = crate::engine::training_order(&train, a.train_samples, a.run.seed, &run)?;
    let train = Arc::new(train);
    let val = Arc::new(val);

    // The model head: BatchNorm (no affine) + linear on a frozen encoder.
    tch::manual_seed(a.run.seed as i64);
    let vs = nn::VarStore::new(device);
    let model = LinearProbe::new(&vs.root(), &cfg);
    if let (Some(p), None) = (&a.finetune, &setup.resume) {
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
                a.arch.model
            );
        }
    }
    setup.dist.broadcast_vars(&vs)?;
    LinearProbe::freeze_encoder(&vs);

    // The optimiser: LARS on the head only.
    let head_params: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(k, _)| k.starts_with("head.1."))
        .collect();
    let n_parameters: i64 = head_params.iter().map(|(_, t)| t.numel() as i64).sum();
    let mut opt = Lars::new(head_params, a.optim.weight_decay);
    let (start_epoch, mut best) = setup.restore(&vs, &mut opt, &run)?;
    println!(
        "linear probe of {} ({n_parameters} trainable parameters), {} classes, {} train / {} val images, device {device:?}",
        a.arch.model,
        train.num_outputs(),
        order.len(),
        val.len()
    );
    let sched = setup.schedule(&a.optim, &a.amp, None)?;
    let epochs = setup.epochs(order.len(), &a.optim, start_epoch)?;
    // The augmentation: RandomResizedCrop and flip only.
    let batches = TrainBatches {
        spec: spec.clone(),
        aug: TrainAug {
            scale: (0.08, 1.0),
            hflip: true,
            randaug: None,
        },
        reprob: 0.0,
        batch_size: a.optim.batch_size,
        workers: a.data.num_workers,
        seed: a.run.seed,
    };
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
        eval_dist: setup.eval_dist(a.dist.dist_eval),
        started: Instant::now(),
        data: &data,
    };
    // The loss: cross-entropy without smoothing.
    let c = train.num_outputs();
    for epoch in epochs {
        let loader = batches.epoch(&train, &order, epoch, &setup.dist);
        let stats = train_epoch(loader, epoch, &sched, &mut opt, &setup.dist, |b, _| {
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
