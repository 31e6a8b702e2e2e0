//! Links libtorch so that `mae-train` uses CUDA where present and finds libtorch on its own.
//!
//! tch's own build links `torch_cuda`, but the default `--as-needed` linker mode drops it because
//! no symbol of ours refers to it directly; without it libtorch never registers its CUDA backend.
//! We therefore relink it with `--no-as-needed`, and record the library folder as a run path so
//! the binaries start without `LD_LIBRARY_PATH` (which, when set, still takes precedence).

use std::env;
use std::path::{Path, PathBuf};

const EXPECTED_TORCH: &str = "2.11.0";

#[path = "../build-support/shared_data.rs"]
mod shared_data;

fn main() {
    shared_data::emit();
    println!("cargo:rerun-if-changed=../build-support/shared_data.rs");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let Some(root) = env::var_os("LIBTORCH").map(PathBuf::from) else {
        println!(
            "cargo:warning=LIBTORCH is not set; run scripts/setup.sh (it creates .venv/libtorch)"
        );
        return;
    };
    let root = root.canonicalize().unwrap_or(root);
    check_version(&root);
    let lib = root.join("lib");
    if lib.join("libtorch_cuda.so").exists() {
        println!(
            "cargo:rustc-link-arg=-Wl,--no-as-needed,-L{},-ltorch_cuda,--as-needed",
            lib.display()
        );
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    build_shims(&root);
}

/// Fails the build early with a clear message when the libtorch found is not the one tch expects.
fn check_version(root: &std::path::Path) {
    let Ok(text) = std::fs::read_to_string(root.join("version.py")) else {
        return; // a plain libtorch folder has no version.py; tch checks `build-version` itself
    };
    let found = text
        .lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string());
    if let Some(found) = found {
        let base = found.split('+').next().unwrap_or(&found);
        if base != EXPECTED_TORCH {
            panic!(
                "libtorch at {} is torch {found}, but tch 0.24 needs {EXPECTED_TORCH}; \
                 rerun scripts/setup.sh",
                root.display()
            );
        }
    }
}

/// Compiles the C++ shims against the wheel's headers: autocast (`csrc/autocast.cpp`) and c10d
/// (`csrc/dist.cpp`) with Gloo always (its own headers come from Debian's libgloo-dev), NCCL when
/// libtorch_cuda and the CUDA/NCCL headers of the wheel's dependencies are present.
fn build_shims(root: &Path) {
    println!("cargo:rerun-if-changed=csrc/dist.cpp");
    println!("cargo:rerun-if-changed=csrc/autocast.cpp");
    let inc = root.join("include");
    let mut b = cc::Build::new();
    b.cpp(true)
        .file("csrc/dist.cpp")
        .file("csrc/autocast.cpp")
        .include(&inc)
        .include(inc.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None);
    if !Path::new("/usr/include/gloo/config.h").exists() {
        panic!(
            "Gloo headers not found (/usr/include/gloo): install Debian's libgloo-dev \
             (scripts/setup.sh does)"
        );
    }
    let nvidia = root.join("../nvidia");
    let cuda_inc = nvidia.join("cu13/include");
    let nccl_inc = nvidia.join("nccl/include");
    let with_nccl = root.join("lib/libtorch_cuda.so").exists()
        && cuda_inc.join("crt/host_config.h").exists()
        && cuda_inc.join("nv/target").exists()
        && nccl_inc.join("nccl.h").exists();
    if with_nccl {
        b.include(&cuda_inc)
            .include(&nccl_inc)
            .define("USE_C10D_NCCL", None)
            .define("MAE_WITH_NCCL", None);
    } else {
        println!("cargo:warning=mae-train's distributed shim is built without NCCL (Gloo only)");
    }
    b.compile("mae_dist");
}
