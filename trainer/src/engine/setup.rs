//! The setup every training command shares, built once: processes and device, autocast, the
//! checkpoint to resume, the architecture (the resumed run's, or a preset with overrides), the
//! run folder with `args.json`, the learning-rate schedule and the restored optimizer state.
//! A command adds only what is its own: the model head, the loss, the optimiser and the
//! augmentation.

use std::path::PathBuf;

use anyhow::bail;
use mae_models::checkpoint::Checkpoint;
use mae_models::{ModelConfig, Overrides};
use serde::Serialize;
use tch::Device;

use crate::cli::{Autocast, DistArgs, OptimArgs, PrecisionArgs, RunArgs, TrainArchArgs};
use crate::engine::dist::Dist;
use crate::engine::precision;
use crate::engine::{device, load_scaler, read_resume, resume, RunDir, Schedule};
use crate::optim::{scaled_lr, Optimizer};

/// A training command's shared state, from its argument groups.
#[derive(Debug)]
pub struct Setup {
    /// This process's place in the run (a single process when not distributed).
    pub dist: Dist,
    single: Dist,
    pub device: Device,
    pub autocast: Autocast,
    /// The `--resume` checkpoint and its path.
    pub resume: Option<(Checkpoint, PathBuf)>,
    run_args: RunArgs,
}

impl Setup {
    /// Joins the run's processes, picks the device and autocast, and reads `--resume`.
    pub fn new(run: &RunArgs, dist: &DistArgs, amp: &PrecisionArgs) -> anyhow::Result<Self> {
        let (d, device) = Dist::init(dist, device(run.device)?)?;
        let autocast = precision::configure(amp.precision, device)?;
        let resume = match &run.resume {
            Some(p) => read_resume(Some(p))?.map(|ck| (ck, p.clone())),
            None => None,
        };
        Ok(Self {
            dist: d,
            single: Dist::single(),
            device,
            autocast,
            resume,
            run_args: run.clone(),
        })
    }

    /// The processes evaluation runs on: all of them with `--dist-eval`, else this one.
    pub fn eval_dist(&self, dist_eval: bool) -> &Dist {
        if dist_eval {
            &self.dist
        } else {
            &self.single
        }
    }

    /// The architecture: the one the resumed checkpoint records, or `arch`'s preset with its
    /// size and depth overrides and `extra` (the classes, ...).
    pub fn config(&self, arch: &TrainArchArgs, extra: Overrides) -> anyhow::Result<ModelConfig> {
        if let Some((ck, path)) = &self.resume {
            return match &ck.meta {
                Some(meta) => Ok(meta.config.clone()),
                None => bail!(
                    "--resume {}: the checkpoint records no mae metadata (not a run of \
                     mae-train); start a new run from it with --finetune",
                    path.display()
                ),
            };
        }
        let o = Overrides {
            img_size: arch.input_size,
            depth: arch.depth,
            ..extra
        };
        Ok(ModelConfig::preset(&arch.model)?.with_overrides(&o)?)
    }

    /// Creates the run folder and writes the command's arguments to `args.json`; returns the
    /// folder and the arguments as recorded (they go into every checkpoint's metadata too).
    pub fn open_run(
        &self,
        command: &str,
        args: &impl Serialize,
    ) -> anyhow::Result<(RunDir, serde_json::Value)> {
        self.open_run_recording(command, args, serde_json::Map::new())
    }

    /// [`Setup::open_run`], with `record` (keys of [`crate::cli::RECORD_ONLY_KEYS`], such as
    /// the SHA-256 of a checkpoint the run starts from) added to `args.json`.
    pub fn open_run_recording(
        &self,
        command: &str,
        args: &impl Serialize,
        record: serde_json::Map<String, serde_json::Value>,
    ) -> anyhow::Result<(RunDir, serde_json::Value)> {
        let run = RunDir::create(
            &self.run_args.output_dir,
            self.run_args.keep_checkpoints,
            self.dist.is_main(),
        )?;
        let mut json = serde_json::to_value(args)?;
        if let Some(map) = json.as_object_mut() {
            map.insert("command".into(), command.into());
            map.extend(record);
        }
        run.write("args.json", &serde_json::to_string_pretty(&json)?)?;
        Ok((run, json))
    }

    /// The learning-rate schedule of `optim` (the absolute rate from the base rate and the
    /// effective batch unless `--lr` is given), with fp16's loss scaler restored on resume.
    /// Prints upstream's lr banner.
    pub fn schedule(
        &self,
        optim: &OptimArgs,
        amp: &PrecisionArgs,
        clip_grad: Option<f64>,
    ) -> anyhow::Result<Schedule> {
        let eff_batch = optim.batch_size * optim.accum_iter * self.dist.world;
        let lr = optim.lr.unwrap_or_else(|| scaled_lr(optim.blr, eff_batch));
        let sched = Schedule {
            lr,
            min_lr: optim.min_lr,
            warmup_epochs: optim.warmup_epochs,
            epochs: optim.epochs,
            accum_iter: optim.accum_iter,
            clip_grad,
            scaler: precision::scaler_for(self.autocast, amp),
        };
        load_scaler(&sched, self.resume.as_ref().map(|(_, p)| p.as_path()))?;
        println!(
            "base lr: {:.2e}, actual lr: {lr:.2e}, effective batch size: {eff_batch}, precision {}",
            lr * 256.0 / eff_batch as f64,
            precision::name(self.autocast)
        );
        Ok(sched)
    }

    /// Restores the weights and optimizer state of `--resume`, if any; returns the first epoch
    /// to train and the best validation score so far.
    pub fn restore(
        &self,
        vs: &tch::nn::VarStore,
        opt: &mut dyn Optimizer,
        run: &RunDir,
    ) -> anyhow::Result<(u64, f64)> {
        let Some((ck, path)) = &self.resume else {
            return Ok((0, f64::NEG_INFINITY));
        };
        let start = resume(vs, opt, ck, path, run)?;
        let best = ck
            .meta
            .as_ref()
            .and_then(|m| m.metrics.get("best").copied())
            .unwrap_or(f64::NEG_INFINITY);
        Ok((start, best))
    }

    /// The epochs this invocation trains (see [`crate::engine::epochs_to_run`]).
    pub fn epochs(
        &self,
        train_images: usize,
        optim: &OptimArgs,
        start: u64,
    ) -> anyhow::Result<std::ops::Range<u64>> {
        crate::engine::epochs_to_run(
            train_images,
            optim.batch_size,
            start,
            optim.epochs,
            self.run_args.stop_after,
        )
    }
}
