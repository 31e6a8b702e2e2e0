//! Tells the tests whether the shared PneumoniaMNIST file (`../shared/data/pneumoniamnist.npz`
//! beside the checkout) is present: tests that read it are ignored, not passed, without it.

use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(has_shared_data)");
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let data = Path::new(&dir).join("../../shared/data/pneumoniamnist.npz");
    println!("cargo::rerun-if-changed={}", data.display());
    println!("cargo::rerun-if-changed=build.rs");
    if data.exists() {
        println!("cargo::rustc-cfg=has_shared_data");
    }
}
