//! `mae-train linprobe`: linear probing of a frozen encoder, as upstream `main_linprobe.py`.
//!
//! The encoder (from an MAE pretraining checkpoint, official or ours) is frozen; its pooled
//! embedding goes through `BatchNorm1d(d, affine=False, eps=1e-6)` and a linear layer
//! (`head.0`, `head.1`, trunc-normal std 0.01), trained with LARS (momentum 0.9, trust
//! coefficient 0.001, weight decay 0 by default) under the per-step warm-up + cosine schedule,
//! on RandomResizedCrop + flip only. Checkpoints keep the upstream `head.0.*` / `head.1.*`
//! names; `mae-train eval` and `mae-export` fold the normalisation into the linear layer.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use mae_models::checkpoint;
use mae_models::{DType, ModelConfig, Overrides, TensorData};
use tch::nn::{self, ModuleT};
use tch::Tensor;

use crate::cli::LinprobeArgs;
use crate::data::transform::TrainAug;
use crate::data::{self};
use crate::dist::Dist;
use crate::finetune::{device, loss_fn, targets, to_input, ClassifierEpoch};
use crate::model::load::{adapt_for_classifier, load_into, state_dict};
use crate::model::trunc_normal_;
use crate::model::vit::VisionTransformer;
use crate::optim::{scaled_lr, Lars};
use crate::run::{epochs_to_run, train_epoch, RunDir, Schedule, TrainBatches};

/// Momentum of the BatchNorm running statistics (PyTorch's default).
const BN_MOMENTUM: f64 = 0.1;

/// A frozen encoder, a non-affine BatchNorm and a linear classifier.
#[derive(Debug)]
pub struct LinearProbe {
    pub encoder: VisionTransformer,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    pub head: nn::Linear,
}

impl LinearProbe {
    /// Builds the probe under `p` for `cfg` (its `num_classes` sizes the head); only the head's
    /// linear layer is trainable.
    pub fn new(p: &nn::Path, cfg: &mae_models::VitConfig) -> Self {
        let mut enc_cfg = cfg.clone();
        enc_cfg.num_classes = 0;
        let encoder = VisionTransformer::new(p, &enc_cfg, 0.0);
        let d = cfg.embed_dim as i64;
        let bn = p / "head" / "0";
        let running_mean = bn.zeros_no_train("running_mean", &[d]);
        let running_var = bn.ones_no_train("running_var", &[d]);
        let num_batches_tracked = bn.zeros_no_train("num_batches_tracked", &[]);
        let head = nn::linear(
            p / "head" / "1",
            d,
            cfg.num_classes as i64,
            Default::default(),
        );
        trunc_normal_(&head.ws, 0.01);
        if let Some(b) = &head.bs {
            let _ = tch::no_grad(|| b.shallow_clone().zero_());
        }
        Self {
            encoder,
            running_mean,
            running_var,
            num_batches_tracked,
            head,
        }
    }

    /// Freezes every variable of `vs` outside `head.1` (the encoder and the statistics).
    pub fn freeze_encoder(vs: &nn::VarStore) {
        for (name, t) in vs.variables() {
            if !name.starts_with("head.1.") {
                let _ = t.set_requires_grad(false);
            }
        }
    }
}

impl ModuleT for LinearProbe {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        // The encoder is frozen and has no dropout or drop path: no graph needed through it.
        let feats = tch::no_grad(|| self.encoder.forward_features(xs, false));
        let normed = Tensor::batch_norm(
            &feats,
            None::<&Tensor>,
            None::<&Tensor>,
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            BN_MOMENTUM,
            checkpoint::LINPROBE_BN_EPS,
            false,
        );
        if train {
            tch::no_grad(|| {
                let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1.0);
            });
        }
        normed.apply(&self.head)
    }
}

/// The state dict with upstream's int64 `num_batches_tracked`.
fn probe_state_dict(vs: &nn::VarStore) -> checkpoint::StateDict {
    let mut sd = state_dict(vs);
    if let Some(t) = sd.get_mut("head.0.num_batches_tracked") {
        let n = t.to_f64_vec().first().copied().unwrap_or(0.0) as i64;
        if let Some(i) = TensorData::new(DType::I64, vec![], n.to_le_bytes().to_vec()) {
            *t = i;
        }
    }
    sd
}

/// `mae-train linprobe`.
pub fn linprobe(a: &LinprobeArgs) -> anyhow::Result<ExitCode> {
    let (dist, device) = Dist::init(&a.dist, device(a.device)?)?;
    let single = Dist::single();
    let precision = crate::precision::configure(a.amp.precision, device)?;
    let train = data::open(&a.data_path, "train")?;
    let val = data::open(&a.data_path, "val")?;
    if a.finetune.is_none() && a.resume.is_none() {
        eprintln!(
            "note: no --finetune checkpoint: probing a randomly initialised encoder (a baseline)"
        );
    }
    let resume = crate::run::read_resume(a.resume.as_deref())?;
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

    let order = crate::run::training_order(&train, a.train_samples, a.seed, &run)?;
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
        start_epoch = crate::run::resume(&vs, &mut opt, ck, path, &run)?;
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
        scaler: crate::precision::scaler_for(precision, &a.amp),
    };
    crate::run::load_scaler(&sched, a.resume.as_deref())?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use mae_models::VitConfig;

    fn tiny() -> VitConfig {
        let ModelConfig::Vit(mut c) = ModelConfig::preset("vit_tiny_patch4_28")
            .unwrap()
            .with_overrides(&Overrides {
                depth: Some(1),
                num_classes: Some(3),
                ..Default::default()
            })
            .unwrap()
        else {
            panic!("a vit preset")
        };
        c.global_pool = false;
        c
    }

    #[test]
    fn only_the_linear_head_trains_and_statistics_move_in_train_mode() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let model = LinearProbe::new(&vs.root(), &tiny());
        LinearProbe::freeze_encoder(&vs);
        let xs = Tensor::randn([4, 3, 28, 28], (tch::Kind::Float, tch::Device::Cpu));
        let enc_before = vs.variables()["blocks.0.attn.qkv.weight"].copy();
        let mean_before = model.running_mean.copy();
        let loss = model.forward_t(&xs, true).square().mean(None);
        loss.backward();
        let mut grads: Vec<String> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.grad().defined())
            .map(|(k, _)| k)
            .collect();
        grads.sort();
        assert_eq!(
            grads,
            vec!["head.1.bias".to_string(), "head.1.weight".to_string()]
        );
        assert!(!model.running_mean.allclose(&mean_before, 0.0, 0.0, false));
        assert_eq!(model.num_batches_tracked.double_value(&[]), 1.0);
        assert!(vs.variables()["blocks.0.attn.qkv.weight"].equal(&enc_before));
        // Evaluation mode uses the running statistics and leaves them alone.
        let m = model.running_mean.copy();
        let _ = model.forward_t(&xs, false);
        assert!(model.running_mean.equal(&m));
    }

    #[test]
    fn folded_checkpoint_head_gives_the_probe_outputs() {
        tch::manual_seed(1);
        let cfg = tiny();
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let model = LinearProbe::new(&vs.root(), &cfg);
        LinearProbe::freeze_encoder(&vs);
        // Move the statistics away from 0 / 1 with a few training batches.
        for _ in 0..3 {
            let xs = Tensor::randn([8, 3, 28, 28], (tch::Kind::Float, tch::Device::Cpu)) * 2.0;
            let _ = model.forward_t(&xs, true);
        }
        let xs = Tensor::randn([5, 3, 28, 28], (tch::Kind::Float, tch::Device::Cpu));
        let want = model.forward_t(&xs, false);
        let mut sd = probe_state_dict(&vs);
        assert_eq!(sd["head.0.num_batches_tracked"].dtype, DType::I64);
        assert!(checkpoint::fold_bn_head(&mut sd, checkpoint::LINPROBE_BN_EPS).unwrap());
        let vs2 = nn::VarStore::new(tch::Device::Cpu);
        let vit = VisionTransformer::new(&vs2.root(), &cfg, 0.0);
        let report = load_into(&vs2, &sd);
        assert!(report.is_exact(), "{report}");
        let got = tch::no_grad(|| vit.forward_t(&xs, false));
        let diff = (&got - &want).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "folded head differs by {diff}");
    }
}
