//! The end of a classifier's epoch (fine-tuning and linear probing alike): validation, the
//! log line, plots, checkpoints with the probe record, metrics.

use crate::data::Dataset;
use crate::engine::dist::Dist;
use crate::engine::*;
use crate::engine::{save_checkpoint, RunDir};
use mae_models::checkpoint::{
    CheckpointKind, CheckpointMeta, DataSummary, ProbeRecord, SplitSummary, Task,
};
use mae_models::{ModelConfig, VitConfig};
use std::sync::Arc;
use std::time::Instant;
use tch::nn::ModuleT;
use tch::{Device, Tensor};

/// Seed and size of the probe batch recorded in every classifier checkpoint.
pub const PROBE_SEED: u64 = 0;

pub const PROBE_BATCH: usize = 2;

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
    /// The data summary every checkpoint records (for the model card).
    pub data: &'a DataSummary,
}

/// The summary of a classifier's data: the training images used (`order`), the whole train
/// split's size, `--train-samples`, and the validation set, each with its images per class.
pub fn data_summary(
    source: &std::path::Path,
    train: &Dataset,
    order: &[usize],
    val: &Dataset,
    train_samples: Option<usize>,
) -> DataSummary {
    let split = |ds: &Dataset, idx: &mut dyn Iterator<Item = usize>| {
        let c = ds.num_outputs();
        let mut per_class = vec![0usize; c];
        let mut images = 0;
        for i in idx {
            images += 1;
            let labels = &ds.items[i].labels;
            if ds.task == Task::MultiLabel {
                for (j, &l) in labels.iter().enumerate().take(c) {
                    per_class[j] += usize::from(l != 0);
                }
            } else if let Some(n) = per_class.get_mut(ds.items[i].class()) {
                *n += 1;
            }
        }
        SplitSummary { images, per_class }
    };
    DataSummary {
        source: source.file_name().map_or_else(
            || source.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        class_names: train.class_names.clone(),
        train: split(train, &mut order.iter().copied()),
        train_split_images: train.len(),
        train_samples,
        val: split(val, &mut (0..val.len())),
    }
}

impl ClassifierEpoch<'_> {
    /// Evaluates `model` on the validation set, prints the epoch line, appends to `log.txt`
    /// (upstream keys), redraws the plots, and saves `checkpoint-{epoch}` (`weights`, the
    /// probe outputs, optimizer state), `checkpoint-best` when the validation score (AUC, else
    /// top-1) improved, and `metrics.json`.
    pub fn finish(
        &self,
        epoch: u64,
        stats: crate::engine::EpochStats,
        model: &dyn ModuleT,
        best: &mut f64,
        weights: mae_models::checkpoint::StateDict,
        (opt, scaler): (
            &dyn crate::optim::Optimizer,
            Option<&crate::engine::precision::GradScaler>,
        ),
    ) -> anyhow::Result<()> {
        let run = self.run;
        let (train_loss, lr) = (stats.loss, stats.lr);
        let plan = EvalPlan {
            spec: self.spec,
            device: self.device,
            batch_size: self.batch_size,
            workers: self.workers,
            dist: self.eval_dist,
        };
        let ev = evaluate(model, self.val, &plan, "val")?;
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
        meta.data = Some(self.data.clone());
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
