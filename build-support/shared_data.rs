//! Shared by the build scripts of `models`, `trainer` and `tests`: tells the tests whether the
//! shared PneumoniaMNIST file (the official MedMNIST v2 one,
//! `../shared/data/medmnist/pneumoniamnist.npz` beside the checkout) is present, through the
//! `has_shared_data` cfg. Tests that read it are ignored, not passed, without it.

use std::path::Path;

/// Emits the cfg and what to watch: the file when it is there, else the nearest of
/// `shared/data/medmnist/`, `shared/data/` and `shared/` that exists (a new file changes that
/// folder), so a build without the file does not rerun the script every time. The folder
/// holding the checkout is never watched: it may be `/tmp` or a CI runner's work folder, which
/// change all the time and would rebuild the workspace on every cargo command. A checkout that
/// gains `../shared` later picks it up after `MAE_SHARED_DATA_RECHECK` changes (or `cargo
/// clean`).
pub fn emit() {
    println!("cargo::rustc-check-cfg=cfg(has_shared_data)");
    println!("cargo::rerun-if-env-changed=MAE_SHARED_DATA_RECHECK");
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let shared = Path::new(&dir).join("../../shared");
    let data = shared.join("data/medmnist/pneumoniamnist.npz");
    if data.exists() {
        println!("cargo::rerun-if-changed={}", data.display());
        println!("cargo::rustc-cfg=has_shared_data");
        return;
    }
    for folder in [shared.join("data/medmnist"), shared.join("data"), shared] {
        if folder.is_dir() {
            println!("cargo::rerun-if-changed={}", folder.display());
            return;
        }
    }
}
