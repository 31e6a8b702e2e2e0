//! `mae-train finetune` and `mae-train eval`: the MAE fine-tuning recipe
//! (facebookresearch/mae `main_finetune.py`, `engine_finetune.py`).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use mae_models::checkpoint::{self, CheckpointKind, CheckpointMeta, ProbeRecord, Task};
use mae_models::metrics::{self, EvalOptions, Metrics};
use mae_models::{ModelConfig, Overrides, VitConfig};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

use crate::cli::{DeviceArg, EvalArgs, FinetuneArgs};
use crate::data::loader::{Batch, Loader, LoaderConfig};
use crate::data::randaug;
use crate::data::transform::TrainAug;
use crate::data::{self, Dataset};
use crate::dist::Dist;
use crate::mixup::{mix, MixConfig};
use crate::model::load::{adapt_for_classifier, load_into, state_dict};
use crate::model::vit::VisionTransformer;
use crate::optim::{param_groups, scaled_lr, AdamW};
use crate::rng::Rng;
use crate::run::{epochs_to_run, save_checkpoint, train_epoch, RunDir, Schedule, TrainBatches};

/// Seed and size of the probe batch recorded in every classifier checkpoint.
pub const PROBE_SEED: u64 = 0;
pub const PROBE_BATCH: usize = 2;

/// The device a run uses.
pub fn device(arg: DeviceArg) -> anyhow::Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Auto => Ok(Device::cuda_if_available()),
        DeviceArg::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        DeviceArg::Cuda => bail!("--device cuda: libtorch sees no CUDA device on this machine"),
    }
}

/// Outputs of a model on a data set: probabilities, labels and the mean loss.
#[derive(Debug)]
pub struct Evaluation {
    pub metrics: Metrics,
    pub seconds: f64,
    /// Per-image probabilities, `[n, classes]` row-major, in data-set order.
    pub probs: Vec<f32>,
    /// Per-image labels, in data-set order.
    pub labels: Vec<Vec<i64>>,
}

pub(crate) fn targets(labels: &[Vec<i64>], task: Task, classes: usize, smoothing: f64) -> Tensor {
    let b = labels.len();
    let mut t = vec![0f32; b * classes];
    for (i, l) in labels.iter().enumerate() {
        match task {
            Task::MultiLabel => {
                for (j, &v) in l.iter().take(classes).enumerate() {
                    t[i * classes + j] = (v != 0) as u8 as f32;
                }
            }
            _ => {
                let off = smoothing as f32 / classes as f32;
                for j in 0..classes {
                    t[i * classes + j] = off;
                }
                let c = (l.first().copied().unwrap_or(0).max(0) as usize).min(classes - 1);
                t[i * classes + c] += 1.0 - smoothing as f32;
            }
        }
    }
    Tensor::from_slice(&t).reshape([b as i64, classes as i64])
}

/// Soft-target cross-entropy (multi-class, binary) or binary cross-entropy (multi-label).
pub(crate) fn loss_fn(logits: &Tensor, target: &Tensor, task: Task) -> Tensor {
    let logits = &logits.to_kind(Kind::Float);
    match task {
        Task::MultiLabel => logits.binary_cross_entropy_with_logits::<Tensor>(
            target,
            None,
            None,
            tch::Reduction::Mean,
        ),
        _ => per_sample_loss(logits, target, task).mean(Kind::Float),
    }
}

/// The loss of each row: soft-target cross-entropy, or BCE averaged over the labels.
fn per_sample_loss(logits: &Tensor, target: &Tensor, task: Task) -> Tensor {
    let logits = &logits.to_kind(Kind::Float);
    match task {
        Task::MultiLabel => logits
            .binary_cross_entropy_with_logits::<Tensor>(target, None, None, tch::Reduction::None)
            .mean_dim(-1, false, Kind::Float),
        _ => (-(target * logits.log_softmax(-1, Kind::Float))).sum_dim_intlist(
            -1,
            false,
            Kind::Float,
        ),
    }
}

fn probabilities(logits: &Tensor, task: Task) -> Tensor {
    match task {
        Task::MultiLabel => logits.sigmoid(),
        _ => logits.softmax(-1, Kind::Float),
    }
}

/// A batch as a `[b, 3, s, s]` tensor on `device`.
pub fn to_input(b: &Batch, size: usize, device: Device) -> Tensor {
    let n = b.labels.len() as i64;
    let s = size as i64;
    Tensor::from_slice(&b.pixels)
        .reshape([n, 3, s, s])
        .to_device(device)
}

/// Runs the model over `ds` with the evaluation transform and computes the metrics.
#[allow(clippy::too_many_arguments)] // the loader settings, the set and who evaluates it
pub fn evaluate(
    model: &dyn ModuleT,
    ds: &Arc<Dataset>,
    spec: &mae_models::preprocess::PreprocessSpec,
    device: Device,
    batch_size: usize,
    workers: usize,
    label: &str,
    dist: &crate::dist::Dist,
) -> anyhow::Result<Evaluation> {
    let start = Instant::now();
    let cfg = LoaderConfig {
        spec: spec.clone(),
        aug: None,
        reprob: 0.0,
        batch_size,
        drop_last: false,
        workers,
        seed: 0,
        epoch: 0,
    };
    // A sharded evaluation gives each rank its DistributedSampler share (padded by repeating
    // from the start); the gathered rows are put back in data-set order, duplicates dropped.
    let order = dist.shard(&(0..ds.len()).collect::<Vec<_>>());
    let loader = Loader::new(ds.clone(), order, cfg);
    let bar = progress(loader.len() as u64, label);
    let c = ds.num_outputs();
    let (mut probs, mut labels, mut losses, mut indices) =
        (Vec::new(), Vec::new(), Vec::<f32>::new(), Vec::new());
    tch::no_grad(|| -> anyhow::Result<()> {
        for b in loader {
            let b = b?;
            let xs = to_input(&b, spec.input_size, device);
            let logits =
                crate::precision::autocast(|| model.forward_t(&xs, false)).to_kind(Kind::Float);
            let t = targets(&b.labels, ds.task, c, 0.0).to_device(device);
            let l = per_sample_loss(&logits, &t, ds.task).to_device(Device::Cpu);
            losses.extend(Vec::<f32>::try_from(l)?);
            let p = probabilities(&logits, ds.task)
                .to_device(Device::Cpu)
                .flatten(0, -1);
            probs.extend(Vec::<f32>::try_from(p)?);
            labels.extend(b.labels);
            indices.extend(b.indices);
            bar.inc(1);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    if dist.is_distributed() {
        (probs, losses) = gather_rows(dist, &indices, &probs, &losses, c, ds.len(), device)?;
        labels = ds.items.iter().map(|it| it.labels.clone()).collect();
    }
    let loss_sum: f64 = losses.iter().map(|&v| f64::from(v)).sum();
    let n = labels.len().max(1);
    let opts = EvalOptions {
        threshold: 0.5,
        class_names: ds.class_names.clone(),
    };
    let mut metrics = metrics::evaluate_with(ds.task, &probs, c, &labels, &opts)?;
    metrics.loss = Some(loss_sum / n as f64);
    Ok(Evaluation {
        metrics,
        seconds: start.elapsed().as_secs_f64(),
        probs,
        labels,
    })
}

/// Gathers every rank's rows (`[index, loss, probabilities...]`) and returns the
/// probabilities and losses of the whole set in data-set order.
fn gather_rows(
    dist: &crate::dist::Dist,
    indices: &[usize],
    probs: &[f32],
    losses: &[f32],
    c: usize,
    n: usize,
    device: Device,
) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
    let w = c + 2;
    let mut rows = Vec::with_capacity(indices.len() * w);
    for (k, &i) in indices.iter().enumerate() {
        rows.push(i as f32);
        rows.push(losses[k]);
        rows.extend_from_slice(&probs[k * c..(k + 1) * c]);
    }
    let mine = Tensor::from_slice(&rows)
        .reshape([indices.len() as i64, w as i64])
        .to_device(device);
    let (mut all_probs, mut all_losses) = (vec![f32::NAN; n * c], vec![f32::NAN; n]);
    for t in dist.all_gather(&mine)? {
        let v = Vec::<f32>::try_from(t.to_device(Device::Cpu).flatten(0, -1))?;
        for row in v.chunks(w) {
            let i = row[0] as usize;
            if i < n {
                all_losses[i] = row[1];
                all_probs[i * c..(i + 1) * c].copy_from_slice(&row[2..]);
            }
        }
    }
    if all_losses.iter().any(|v| v.is_nan()) {
        bail!("sharded evaluation: some images were not evaluated by any rank");
    }
    Ok((all_probs, all_losses))
}

/// A progress bar with images/s and ETA (hidden on ranks other than 0).
pub fn progress(len: u64, label: &str) -> ProgressBar {
    if !crate::dist::is_main_process() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(
        "{prefix:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(label.to_string());
    bar
}

/// Records the model's outputs on the seeded probe batch, for the exporter's check.
pub fn probe(model: &dyn ModuleT, s: usize, device: Device) -> ProbeRecord {
    let xs = mae_models::probe::probe_batch(PROBE_SEED, PROBE_BATCH, 3, s);
    let xs = Tensor::from_slice(&xs).reshape([PROBE_BATCH as i64, 3, s as i64, s as i64]);
    let out = tch::no_grad(|| model.forward_t(&xs.to_device(device), false));
    let outputs =
        Vec::<f32>::try_from(out.to_device(Device::Cpu).flatten(0, -1)).unwrap_or_default();
    ProbeRecord {
        seed: PROBE_SEED,
        batch: PROBE_BATCH,
        outputs,
    }
}

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
    let precision = crate::precision::configure(a.amp.precision, device)?;
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
    let resume = crate::run::read_resume(a.resume.as_deref())?;
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

    let order = crate::run::training_order(&train, a.train_samples, a.seed, &run)?;
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
        start_epoch = crate::run::resume(&vs, &mut opt, ck, path, &run)?;
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
        crate::precision::name(precision)
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
        scaler: crate::precision::scaler_for(precision, &a.amp),
    };
    crate::run::load_scaler(&sched, a.resume.as_deref())?;
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

/// What the end of a classifier's epoch needs: the run, the model's description and the data.
pub(crate) struct ClassifierEpoch<'a> {
    pub run: &'a RunDir,
    pub arch: &'a str,
    pub cfg: &'a VitConfig,
    pub train: &'a Dataset,
    pub val: &'a Arc<Dataset>,
    pub spec: &'a mae_models::preprocess::PreprocessSpec,
    pub args: &'a serde_json::Value,
    pub n_parameters: i64,
    pub device: Device,
    pub batch_size: usize,
    pub workers: usize,
    /// Who evaluates: every rank the whole set, or (`--dist-eval`) a shard each.
    pub eval_dist: &'a Dist,
    /// When training started, for the elapsed time on each epoch line.
    pub started: Instant,
}

impl ClassifierEpoch<'_> {
    /// Evaluates `model` on the validation set, prints the epoch line, appends to `log.txt`
    /// (upstream keys), redraws the plots, and saves `checkpoint-{epoch}` (`weights`, the
    /// probe outputs, optimizer state), `checkpoint-best` when the validation score (AUC, else
    /// top-1) improved, and `metrics.json`.
    pub fn finish(
        &self,
        epoch: u64,
        stats: crate::run::EpochStats,
        model: &dyn ModuleT,
        best: &mut f64,
        weights: mae_models::checkpoint::StateDict,
        (opt, scaler): (
            &dyn crate::optim::Optimizer,
            Option<&crate::precision::GradScaler>,
        ),
    ) -> anyhow::Result<()> {
        let run = self.run;
        let (train_loss, lr) = (stats.loss, stats.lr);
        let ev = evaluate(
            model,
            self.val,
            self.spec,
            self.device,
            self.batch_size,
            self.workers,
            "val",
            self.eval_dist,
        )?;
        let m = &ev.metrics;
        let score = m.auc.unwrap_or(m.acc1);
        let is_best = score > *best;
        if is_best {
            *best = score;
        }
        println!(
            "epoch {epoch}: train_loss {train_loss:.4} lr {lr:.2e} | val loss {:.4} acc1 {:.2}% auc {} | {:.0}s",
            m.loss.unwrap_or(f64::NAN),
            m.acc1 * 100.0,
            m.auc.map_or("-".into(), |v| format!("{v:.4}")),
            self.started.elapsed().as_secs_f64()
        );
        let mut entry = serde_json::json!({
            "train_lr": lr, "train_loss": train_loss, "test_loss": m.loss,
            "test_acc1": m.acc1 * 100.0, "test_acc5": m.acc5.map(|v| v * 100.0),
            "test_auc": m.auc, "epoch": epoch, "n_parameters": self.n_parameters,
        });
        if let Some(o) = entry.as_object_mut() {
            o.retain(|_, v| !v.is_null());
        }
        run.log(&entry)?;
        if !run.main {
            return Ok(());
        }
        if let Err(e) = crate::plot::write_run_plots(&run.path) {
            eprintln!("warning: no plots this epoch: {e:#}");
        }
        let mut meta = CheckpointMeta::new(
            CheckpointKind::Classifier,
            self.arch,
            ModelConfig::Vit(self.cfg.clone()),
            concat!("mae-train ", env!("CARGO_PKG_VERSION")),
        );
        meta.task = Some(self.train.task);
        meta.class_names = self.train.class_names.clone();
        meta.preprocess = self.spec.clone();
        meta.epoch = Some(epoch);
        meta.args = self.args.clone();
        meta.metrics = m.summary();
        meta.metrics.insert("best".into(), *best);
        meta.probe = Some(probe(model, self.cfg.img_size, self.device));
        run.save_epoch(epoch, &weights, &meta, opt, scaler)?;
        if is_best {
            save_checkpoint(
                &run.file("checkpoint-best.safetensors"),
                &weights,
                &meta,
                None,
            )?;
        }
        run.write("metrics.json", &serde_json::to_string_pretty(m)?)?;
        Ok(())
    }
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
        "precision": a.amp.precision.map(crate::precision::name),
    })
}

/// The classifier an `eval` checkpoint holds: from its mae metadata, or, for a foreign file
/// such as an official fine-tuned `.pth`, from `--model` with the head's class count and the
/// pooling read off its tensors. Class names come from the metadata only.
fn eval_model(
    ck: &checkpoint::Checkpoint,
    a: &EvalArgs,
) -> anyhow::Result<(
    VitConfig,
    mae_models::preprocess::PreprocessSpec,
    Option<Vec<String>>,
)> {
    let path = a.resume.display();
    if let Some(meta) = &ck.meta {
        let ModelConfig::Vit(cfg) = &meta.config else {
            bail!("{path} is an MAE pretraining checkpoint, not a classifier; fine-tune or linear-probe it first");
        };
        return Ok((
            cfg.clone(),
            meta.preprocess.clone(),
            Some(meta.class_names.clone()),
        ));
    }
    let Some(model) = a.model.model.as_deref() else {
        bail!(
            "{path} records no architecture (not a mae checkpoint); name it with --model \
             (e.g. --model vit_base_patch16, see `mae-train models`)"
        );
    };
    let Some(head) = ck.tensors.get("head.weight") else {
        bail!(
            "{path} has no classification head (head.weight): it is a pretrained encoder, not a \
             classifier; fine-tune or linear-probe it first"
        );
    };
    let o = Overrides {
        img_size: a.model.input_size,
        patch_size: a.model.patch_size,
        num_classes: Some(head.shape.first().copied().unwrap_or(0)),
        depth: a.model.depth,
    };
    let ModelConfig::Vit(mut cfg) = ModelConfig::preset(model)?.with_overrides(&o)? else {
        bail!("--model {model} is an MAE model; evaluate a classifier with a vit_* model");
    };
    if let Some(n) = a.model.nb_classes {
        if n != cfg.num_classes {
            bail!(
                "--nb-classes {n}, but the head of {path} has {} classes",
                cfg.num_classes
            );
        }
    }
    cfg.global_pool = ck.tensors.contains_key("fc_norm.weight");
    let spec = mae_models::preprocess::PreprocessSpec::imagenet(cfg.img_size);
    Ok((cfg, spec, None))
}

/// `mae-train eval`.
pub fn eval(a: &EvalArgs) -> anyhow::Result<ExitCode> {
    let (dist, device) = Dist::init(&a.dist, device(a.device)?)?;
    let single = Dist::single();
    crate::precision::configure(a.precision, device)?;
    let mut ck = checkpoint::load(&a.resume)
        .with_context(|| format!("cannot read checkpoint {}", a.resume.display()))?;
    // A linear-probe head is evaluated as the one linear layer it equals.
    checkpoint::fold_bn_head(&mut ck.tensors, checkpoint::LINPROBE_BN_EPS)
        .map_err(|e| anyhow::anyhow!("{}: linear-probe head: {e}", a.resume.display()))?;
    let (cfg, spec, class_names) = eval_model(&ck, a)?;
    let ds = data::open(&a.data_path, &a.split)?;
    if ds.num_outputs() != cfg.num_classes {
        bail!(
            "{}: the checkpoint's head has {} classes, but the data ({}) has {}{}; a head is only \
             meaningful on the classes it was trained for: fine-tune (`mae-train finetune \
             --finetune {}`) or linear-probe (`mae-train linprobe`) on this data first, then \
             evaluate that checkpoint",
            a.resume.display(),
            cfg.num_classes,
            ds.source,
            ds.num_outputs(),
            if ds.class_names.is_empty() {
                String::new()
            } else {
                format!(" ({})", ds.class_names.join(", "))
            },
            a.resume.display(),
        );
    }
    let cfg = &cfg;
    let vs = nn::VarStore::new(device);
    let model = VisionTransformer::new(&vs.root(), cfg, 0.0);
    let report = load_into(&vs, &ck.tensors);
    if !report.is_exact() {
        bail!(
            "{}: weights do not match the recorded architecture:\n{report}",
            a.resume.display()
        );
    }
    let mut ds = ds;
    if let Some(names) = class_names {
        ds.class_names = names;
    }
    let ds = Arc::new(ds);
    let ev = evaluate(
        &model,
        &ds,
        &spec,
        device,
        a.batch_size,
        a.num_workers,
        &a.split,
        if a.dist.dist_eval { &dist } else { &single },
    )?;
    if !dist.is_main() {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} on {} ({} images, {:.1}s)",
        a.resume.display(),
        ds.source,
        ds.len(),
        ev.seconds
    );
    println!("{}", ev.metrics);
    if let Some(out) = &a.output {
        mae_models::io::atomic_write(out, serde_json::to_string_pretty(&ev.metrics)?.as_bytes())?;
        println!("metrics written to {}", out.display());
    }
    if let Some(out) = &a.predictions {
        let csv = predictions_csv(&ev, ds.task, &ds.class_names);
        mae_models::io::atomic_write(out, csv.as_bytes())?;
        println!("predictions written to {}", out.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// One CSV row per image, in data-set order: `index,label,prediction,p0,p1,...`. The predicted
/// class is the arg-max (multi-class, binary) or every class at probability >= 0.5
/// (multi-label), by name; labels are class indices, space-separated.
pub fn predictions_csv(ev: &Evaluation, task: Task, class_names: &[String]) -> String {
    let c = class_names.len().max(1);
    let mut csv = mae_models::predictions::PredictionsCsv::new(c, false);
    for (i, (row, label)) in ev.probs.chunks(c).zip(&ev.labels).enumerate() {
        let name = |k: usize| class_names.get(k).cloned().unwrap_or_else(|| k.to_string());
        let predicted: Vec<String> = match task {
            Task::MultiLabel => (0..c).filter(|&k| row[k] >= 0.5).map(name).collect(),
            _ => {
                let best = (0..c)
                    .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                    .unwrap_or(0);
                vec![name(best)]
            }
        };
        csv.push(i, None, label, &predicted, row);
    }
    csv.into_string()
}
