//! Shared by the build scripts of `models`, `trainer` and `tests`: tells the tests whether the
//! shared PneumoniaMNIST file (`../shared/data/pneumoniamnist.npz` beside the checkout) is
//! present, through the `has_shared_data` cfg. Tests that read it are ignored, not passed,
//! without it.

use std::path::{Path, PathBuf};

/// Emits the cfg and what to watch: the file when it is there, else the nearest folder above
/// it that exists (a new file changes that folder), so a build without the file does not rerun
/// the script every time.
pub fn emit() {
    println!("cargo::rustc-check-cfg=cfg(has_shared_data)");
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let data = Path::new(&dir).join("../../shared/data/pneumoniamnist.npz");
    if data.exists() {
        println!("cargo::rerun-if-changed={}", data.display());
        println!("cargo::rustc-cfg=has_shared_data");
        return;
    }
    let mut watch: Option<PathBuf> = data.parent().map(Path::to_path_buf);
    while let Some(d) = watch.take() {
        if d.is_dir() {
            println!("cargo::rerun-if-changed={}", d.display());
            break;
        }
        watch = d.parent().map(Path::to_path_buf);
    }
}
