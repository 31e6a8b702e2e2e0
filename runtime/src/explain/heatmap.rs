//! A map made visible: the drawing and the `.npy` are `mae_models::explain::heatmap`'s (shared
//! with `mae-train visualize`); writing them is here.

use std::path::Path;

use anyhow::Context;

pub use mae_models::explain::heatmap::*;

/// Writes `bytes` to `path` atomically (a temporary file, then a rename).
pub fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    mae_models::io::atomic_write(path, bytes)
        .with_context(|| format!("cannot write the heatmap {}", path.display()))
}
