//! One training epoch, the same for every training command: the per-step schedule, precision,
//! gradient accumulation and synchronisation, clipping, the optimizer step; and how a run
//! makes its batches.

use crate::engine::precision::GradScaler;
use crate::engine::*;
use crate::optim::Optimizer;

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
    dist: &crate::engine::dist::Dist,
    mut loss_of: impl FnMut(&crate::data::loader::Batch, usize) -> tch::Tensor,
) -> anyhow::Result<EpochStats> {
    let steps = loader.len().max(1);
    let accum = sched.accum_iter.max(1);
    let bar = crate::engine::progress(loader.len() as u64, &format!("epoch {epoch}"));
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
        let loss = crate::engine::precision::autocast(|| loss_of(&b, it));
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
        dist: &crate::engine::dist::Dist,
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
