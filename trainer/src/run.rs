//! The run machinery shared by every training command: output folder, JSON-lines log,
//! atomic checkpoints with optimizer state, resume.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use mae_models::checkpoint::{self, CheckpointMeta, StateDict};
use mae_models::{DType, TensorData};

use crate::optim::Optimizer;
use crate::precision::GradScaler;

/// The output folder of a run.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
    /// False on the ranks other than 0 of a distributed run: they write nothing.
    pub main: bool,
    /// Epoch checkpoints kept on disk (the newest; 0 keeps all).
    pub keep_checkpoints: usize,
}

impl RunDir {
    /// Creates the folder (and parents) if needed; the run keeps the newest
    /// `keep_checkpoints` epoch checkpoints (0: all).
    /// Only the `main` process of a distributed run writes.
    pub fn create(path: &Path, keep_checkpoints: usize, main: bool) -> anyhow::Result<Self> {
        if main {
            std::fs::create_dir_all(path)
                .with_context(|| format!("cannot create output folder {}", path.display()))?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            main,
            keep_checkpoints,
        })
    }

    /// Saves `checkpoint-{epoch}` (weights, metadata, optimizer state), then removes the epoch
    /// checkpoints older than the newest `keep_checkpoints`. Returns the saved path.
    pub fn save_epoch(
        &self,
        epoch: u64,
        weights: &StateDict,
        meta: &CheckpointMeta,
        opt: &dyn Optimizer,
        scaler: Option<&GradScaler>,
    ) -> anyhow::Result<PathBuf> {
        let path = self.file(&format!("checkpoint-{epoch}.safetensors"));
        if !self.main {
            return Ok(path);
        }
        save_checkpoint(&path, weights, meta, Some((opt, scaler)))?;
        if self.keep_checkpoints > 0 {
            for old in self.epoch_checkpoints()? {
                if old.0 + self.keep_checkpoints as u64 <= epoch {
                    for p in [optim_path(&old.1), old.1] {
                        match std::fs::remove_file(&p) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => {
                                return Err(e).with_context(|| {
                                    format!("cannot remove old checkpoint {}", p.display())
                                })
                            }
                        }
                    }
                }
            }
        }
        Ok(path)
    }

    /// The `checkpoint-{epoch}.safetensors` files of the folder, with their epochs.
    pub fn epoch_checkpoints(&self) -> anyhow::Result<Vec<(u64, PathBuf)>> {
        let entries = std::fs::read_dir(&self.path)
            .with_context(|| format!("cannot list {}", self.path.display()))?;
        let mut found = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_prefix("checkpoint-")
                .and_then(|r| r.strip_suffix(".safetensors"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                found.push((n, e.path()));
            }
        }
        found.sort();
        Ok(found)
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes a text file atomically.
    pub fn write(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let p = self.file(name);
        if self.main {
            mae_models::io::atomic_write(&p, text.as_bytes())?;
        }
        Ok(p)
    }

    /// Appends one JSON object as a line of `log.txt` (upstream's format).
    pub fn log(&self, entry: &serde_json::Value) -> anyhow::Result<()> {
        if !self.main {
            return Ok(());
        }
        let p = self.file("log.txt");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .with_context(|| format!("cannot open {}", p.display()))?;
        writeln!(f, "{entry}").with_context(|| format!("cannot write {}", p.display()))
    }

    /// Drops `log.txt` lines of epochs at or after `epoch` (a resumed run rewrites them).
    pub fn truncate_log(&self, epoch: u64) -> anyhow::Result<()> {
        if !self.main {
            return Ok(());
        }
        let p = self.file("log.txt");
        let Ok(text) = std::fs::read_to_string(&p) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("epoch").and_then(|e| e.as_u64()))
                    .is_some_and(|e| e < epoch)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        mae_models::io::atomic_write(&p, kept.as_bytes())?;
        Ok(())
    }
}

/// The optimizer file saved beside `ckpt` (`x.safetensors` → `x.optim.safetensors`).
pub fn optim_path(ckpt: &Path) -> PathBuf {
    let stem = ckpt
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    ckpt.with_file_name(format!("{stem}.optim.safetensors"))
}

/// Saves model weights with their metadata and, beside them, the optimizer state (with fp16's
/// loss-scaler state, when the run has one). The optimizer file is written first, so a
/// complete checkpoint always has its optimizer state.
pub fn save_checkpoint(
    path: &Path,
    weights: &StateDict,
    meta: &CheckpointMeta,
    opt: Option<(&dyn Optimizer, Option<&GradScaler>)>,
) -> anyhow::Result<()> {
    if let Some((opt, scaler)) = opt {
        let mut sd = opt.state();
        sd.extend(scaler.map(GradScaler::state).unwrap_or_default());
        let step = TensorData::new(
            DType::I64,
            vec![1],
            (opt.steps() as i64).to_le_bytes().to_vec(),
        )
        .expect("one int64");
        sd.insert("step".into(), step);
        checkpoint::safetensors::write(&optim_path(path), &sd, None)?;
    }
    checkpoint::safetensors::write(path, weights, Some(meta))?;
    Ok(())
}

/// Reads the optimizer state saved beside `ckpt`: moments and step count (the loss scaler's
/// entries left out; [`load_scaler`] reads them).
pub fn load_optim(ckpt: &Path) -> anyhow::Result<(StateDict, u64)> {
    let p = optim_path(ckpt);
    let (mut sd, _) = checkpoint::safetensors::read(&p)
        .with_context(|| format!("cannot resume: optimizer state {} unreadable", p.display()))?;
    GradScaler::take_state(&mut sd);
    let step = sd
        .remove("step")
        .and_then(|t| {
            t.data
                .get(..8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        })
        .with_context(|| format!("{}: no step count", p.display()))?;
    Ok((sd, step.max(0) as u64))
}

/// Restores fp16's loss scaler from the optimizer state beside `ckpt` (`--resume`), so a resumed
/// run continues with the scale and growth count an uninterrupted one would have. A checkpoint
/// saved without a scaler (fp32 or bf16) leaves the scaler at its initial state, with a note.
pub fn load_scaler(sched: &Schedule, ckpt: Option<&Path>) -> anyhow::Result<()> {
    let (Some(scaler), Some(ckpt)) = (&sched.scaler, ckpt) else {
        return Ok(());
    };
    let p = optim_path(ckpt);
    let (mut sd, _) = checkpoint::safetensors::read(&p)
        .with_context(|| format!("cannot resume: optimizer state {} unreadable", p.display()))?;
    match GradScaler::take_state(&mut sd) {
        Some(saved) => {
            // The growth interval is this run's setting, not part of the saved state.
            let mut s = scaler.borrow_mut();
            let growth_interval = s.growth_interval;
            *s = saved;
            s.growth_interval = growth_interval;
        }
        None => println!(
            "note: {} holds no loss-scaler state (saved without fp16); the scale starts at {}",
            p.display(),
            scaler.borrow().scale
        ),
    }
    Ok(())
}

/// Reads the checkpoint of `--resume`, when given.
pub fn read_resume(path: Option<&Path>) -> anyhow::Result<Option<checkpoint::Checkpoint>> {
    path.map(|p| {
        checkpoint::load(p)
            .with_context(|| format!("cannot read --resume checkpoint {}", p.display()))
    })
    .transpose()
}

/// Restores weights and optimizer state from `ck` (read from `path`) and drops the log lines
/// of the epochs that will be rerun; returns the first epoch to train.
pub fn resume(
    vs: &tch::nn::VarStore,
    opt: &mut dyn Optimizer,
    ck: &checkpoint::Checkpoint,
    path: &Path,
    run: &RunDir,
) -> anyhow::Result<u64> {
    let report = crate::model::load::load_into(vs, &ck.tensors);
    if !report.is_exact() {
        anyhow::bail!(
            "{}: weights do not match the recorded architecture:\n{report}",
            path.display()
        );
    }
    let (moments, step) = load_optim(path)?;
    opt.load_state(&moments, step)
        .map_err(|e| anyhow::anyhow!("{}: optimizer state: {e}", path.display()))?;
    let start = ck.meta.as_ref().and_then(|m| m.epoch).map_or(0, |e| e + 1);
    run.truncate_log(start)?;
    println!(
        "Resume checkpoint {} (epoch {start}, step {step})",
        path.display()
    );
    Ok(start)
}

/// The learning-rate schedule and optimisation settings of a run.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub epochs: u64,
    pub accum_iter: usize,
    pub clip_grad: Option<f64>,
    /// fp16's loss scaler (kept across epochs).
    pub scaler: Option<std::cell::RefCell<GradScaler>>,
}

impl Schedule {
    /// A copy of the loss scaler's state, for a checkpoint.
    pub fn scaler_state(&self) -> Option<GradScaler> {
        self.scaler.as_ref().map(|s| s.borrow().clone())
    }
}

/// Mean training loss and last learning rate of an epoch.
#[derive(Debug, Clone, Copy)]
pub struct EpochStats {
    pub loss: f64,
    pub lr: f64,
}

/// One training epoch: per-step schedule, gradient accumulation, clipping, the optimizer, progress
/// bar; `loss_of(batch, step)` computes a batch's loss. A non-finite loss stops the run.
pub fn train_epoch(
    loader: crate::data::loader::Loader,
    epoch: u64,
    sched: &Schedule,
    opt: &mut dyn Optimizer,
    dist: &crate::dist::Dist,
    mut loss_of: impl FnMut(&crate::data::loader::Batch, usize) -> tch::Tensor,
) -> anyhow::Result<EpochStats> {
    let steps = loader.len().max(1);
    let accum = sched.accum_iter.max(1);
    let bar = crate::finetune::progress(loader.len() as u64, &format!("epoch {epoch}"));
    let (mut loss_sum, mut seen, mut lr) = (0.0, 0usize, 0.0);
    opt.zero_grad();
    for (it, b) in loader.enumerate() {
        let b = b?;
        if it % accum == 0 {
            let e = epoch as f64 + it as f64 / steps as f64;
            lr = crate::optim::lr_at(
                e,
                sched.lr,
                sched.min_lr,
                sched.warmup_epochs,
                sched.epochs as f64,
            );
        }
        let loss = crate::precision::autocast(|| loss_of(&b, it));
        let lv = loss.double_value(&[]);
        if !lv.is_finite() {
            bar.abandon();
            anyhow::bail!(
                "loss is {lv} at epoch {epoch}, step {it}; stopping training (the last saved checkpoint is intact)"
            );
        }
        let scale = sched.scaler.as_ref().map_or(1.0, |s| s.borrow().scale);
        (loss * (scale / accum as f64)).backward();
        if (it + 1) % accum == 0 {
            // Data-parallel ranks average their gradients on the stepping micro-batch only.
            let params = opt.params();
            dist.average_gradients(&params)?;
            // fp16: unscaled gradients, or a skipped step when they overflowed.
            let finite = sched
                .scaler
                .as_ref()
                .is_none_or(|s| s.borrow_mut().unscale(&params));
            if finite {
                if let Some(max) = sched.clip_grad {
                    opt.clip_grad_norm(max);
                }
                opt.step(lr);
            }
            opt.zero_grad();
        }
        loss_sum += lv * b.labels.len() as f64;
        seen += b.labels.len();
        bar.set_message(format!("loss {:.4} lr {lr:.2e}", loss_sum / seen as f64));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let totals = dist.sum(&[loss_sum, seen as f64])?;
    Ok(EpochStats {
        loss: totals[0] / totals[1].max(1.0),
        lr,
    })
}

/// The training images of a run: all of `train`, or with `--train-samples N` a seeded,
/// class-stratified subset, listed in the run's `train_subset.txt`.
pub fn training_order(
    train: &crate::data::Dataset,
    train_samples: Option<usize>,
    seed: u64,
    run: &RunDir,
) -> anyhow::Result<Vec<usize>> {
    let Some(n) = train_samples else {
        return Ok((0..train.len()).collect());
    };
    let order = crate::data::stratified_subset(train, n, seed);
    let list: String = order
        .iter()
        .map(|&i| format!("{}\n", train.items[i].name))
        .collect();
    run.write("train_subset.txt", &list)?;
    Ok(order)
}

/// The epochs this invocation trains: from `start` up to `epochs`, or only `stop_after` of them.
/// Fails when one batch is larger than the `n_train` training images (an epoch of no steps).
pub fn epochs_to_run(
    n_train: usize,
    batch_size: usize,
    start: u64,
    epochs: u64,
    stop_after: Option<u64>,
) -> anyhow::Result<std::ops::Range<u64>> {
    if n_train / batch_size.max(1) == 0 {
        anyhow::bail!("batch size {batch_size} is larger than the {n_train} training images");
    }
    let last = stop_after.map_or(epochs, |n| (start + n).min(epochs));
    Ok(start..last)
}

/// How a run makes its training batches: everything but the epoch.
#[derive(Debug, Clone)]
pub struct TrainBatches {
    pub spec: mae_models::preprocess::PreprocessSpec,
    pub aug: crate::data::transform::TrainAug,
    /// Random erasing probability.
    pub reprob: f64,
    pub batch_size: usize,
    pub workers: usize,
    pub seed: u64,
}

impl TrainBatches {
    /// The loader of `epoch` over `order` (full batches only): libtorch's generator and the
    /// shuffle are reseeded from (seed, epoch), so a resumed run draws what an uninterrupted one
    /// does. A data-parallel rank takes its DistributedSampler share of the shuffled order.
    pub fn epoch(
        &self,
        ds: &std::sync::Arc<crate::data::Dataset>,
        order: &[usize],
        epoch: u64,
        dist: &crate::dist::Dist,
    ) -> crate::data::loader::Loader {
        tch::manual_seed((self.seed ^ (epoch << 32)) as i64);
        let mut order = order.to_vec();
        crate::rng::Rng::derive(&[self.seed, epoch, 1]).shuffle(&mut order);
        let order = dist.shard(&order);
        let cfg = crate::data::loader::LoaderConfig {
            spec: self.spec.clone(),
            aug: Some(self.aug.clone()),
            reprob: self.reprob,
            batch_size: self.batch_size,
            drop_last: true,
            workers: self.workers,
            seed: self.seed,
            epoch,
        };
        crate::data::loader::Loader::new(ds.clone(), order, cfg)
    }
}
