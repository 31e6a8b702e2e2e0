//! Evaluation of a classifier on a data set (sharded and gathered when data-parallel), and the
//! targets, losses and probabilities of the three tasks.

use crate::data::loader::{Batch, Loader, LoaderConfig};
use crate::data::Dataset;
use crate::engine::*;
use anyhow::bail;
use mae_models::checkpoint::Task;
use mae_models::metrics::{self, EvalOptions, Metrics};
use std::sync::Arc;
use std::time::Instant;
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

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
pub(crate) fn per_sample_loss(logits: &Tensor, target: &Tensor, task: Task) -> Tensor {
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

pub(crate) fn probabilities(logits: &Tensor, task: Task) -> Tensor {
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

/// How an evaluation reads its set: the transform, the batches, the device and who evaluates
/// (every rank the whole set, or with `--dist-eval` a shard each).
#[derive(Debug, Clone, Copy)]
pub struct EvalPlan<'a> {
    pub spec: &'a mae_models::preprocess::PreprocessSpec,
    pub device: Device,
    pub batch_size: usize,
    pub workers: usize,
    pub dist: &'a crate::engine::dist::Dist,
}

/// Runs the model over `ds` with the evaluation transform and computes the metrics; `label`
/// names the set on the progress bar.
pub fn evaluate(
    model: &dyn ModuleT,
    ds: &Arc<Dataset>,
    plan: &EvalPlan<'_>,
    label: &str,
) -> anyhow::Result<Evaluation> {
    let EvalPlan {
        spec,
        device,
        batch_size,
        workers,
        dist,
    } = *plan;
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
            let logits = crate::engine::precision::autocast(|| model.forward_t(&xs, false))
                .to_kind(Kind::Float);
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
pub(crate) fn gather_rows(
    dist: &crate::engine::dist::Dist,
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
