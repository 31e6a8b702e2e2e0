//! The run machinery shared by every training command: output folder, JSON-lines log,
//! atomic checkpoints with optimizer state, resume.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use mae_models::checkpoint::{self, CheckpointMeta, StateDict};
use mae_models::{DType, TensorData};

use crate::optim::AdamW;

/// The output folder of a run.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    /// Creates the folder (and parents) if needed.
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create output folder {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes a text file atomically.
    pub fn write(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let p = self.file(name);
        mae_models::io::atomic_write(&p, text.as_bytes())?;
        Ok(p)
    }

    /// Appends one JSON object as a line of `log.txt` (upstream's format).
    pub fn log(&self, entry: &serde_json::Value) -> anyhow::Result<()> {
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

/// Saves model weights with their metadata and, beside them, the optimizer state. The
/// optimizer file is written first, so a complete checkpoint always has its optimizer state.
pub fn save_checkpoint(
    path: &Path,
    weights: &StateDict,
    meta: &CheckpointMeta,
    opt: Option<&AdamW>,
) -> anyhow::Result<()> {
    if let Some(opt) = opt {
        let mut sd = opt.state();
        let step = TensorData::new(
            DType::I64,
            vec![1],
            (opt.step as i64).to_le_bytes().to_vec(),
        )
        .expect("one int64");
        sd.insert("step".into(), step);
        checkpoint::safetensors::write(&optim_path(path), &sd, None)?;
    }
    checkpoint::safetensors::write(path, weights, Some(meta))?;
    Ok(())
}

/// Reads the optimizer state saved beside `ckpt`: moments and step count.
pub fn load_optim(ckpt: &Path) -> anyhow::Result<(StateDict, u64)> {
    let p = optim_path(ckpt);
    let (mut sd, _) = checkpoint::safetensors::read(&p)
        .with_context(|| format!("cannot resume: optimizer state {} unreadable", p.display()))?;
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
