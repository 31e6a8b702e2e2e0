//! A run's output folder: JSON-lines log, files written atomically, epoch checkpoints with
//! their optimizer (and loss-scaler) state, pruning, and `--resume`.

use crate::engine::precision::GradScaler;
use crate::engine::*;
use crate::optim::Optimizer;
use anyhow::Context;
use mae_models::checkpoint::{self, CheckpointMeta, StateDict};
use mae_models::{DType, TensorData};
use std::io::Write;
use std::path::{Path, PathBuf};

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
