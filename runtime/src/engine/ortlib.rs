//! Finding `libonnxruntime.so` for the ONNX Runtime backend, which loads it at run time (so
//! that `mae-run` starts, and runs tract, on machines without it).
//!
//! Order: `--ort-lib`, then `ORT_DYLIB_PATH`, then beside the executable (`.`, `lib/`,
//! `../lib/`), then the project virtualenv's `onnxruntime` package (a `.venv` in the
//! executable's folder or any folder above it, or above the current folder), then the system
//! library folders and `LD_LIBRARY_PATH`.

use std::path::{Path, PathBuf};

use anyhow::bail;

/// The library file names tried in a folder, best first.
fn candidates_in(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.join("libonnxruntime.so")];
    // Versioned names (`libonnxruntime.so.1.32.0`) when there is no plain link.
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut versioned: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so.") && !n.ends_with(".py"))
            })
            .collect();
        versioned.sort();
        versioned.reverse();
        out.extend(versioned);
    }
    out
}

/// `onnxruntime/capi` folders of the virtualenvs at or above `start`.
fn venv_dirs(start: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in start.ancestors() {
        let lib = dir.join(".venv/lib");
        let Ok(entries) = std::fs::read_dir(&lib) else {
            continue;
        };
        let mut pythons: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("python3"))
            })
            .collect();
        pythons.sort();
        for py in pythons {
            out.push(py.join("site-packages/onnxruntime/capi"));
        }
    }
    out
}

/// Every place searched, in order (without `--ort-lib` and `ORT_DYLIB_PATH`).
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    if let Some(d) = &exe_dir {
        dirs.push(d.clone());
        dirs.push(d.join("lib"));
        dirs.push(d.join("../lib"));
        dirs.extend(venv_dirs(d));
    }
    if let Ok(cwd) = std::env::current_dir() {
        dirs.extend(venv_dirs(&cwd));
    }
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&paths));
    }
    for d in [
        "/usr/local/lib",
        "/usr/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/opt/onnxruntime/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

/// The library to load: `explicit` (`--ort-lib`), else `ORT_DYLIB_PATH`, else the first found
/// in [`search_dirs`].
pub fn find(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!(
                "--ort-lib {}: no such file (it should name libonnxruntime.so)",
                p.display()
            );
        }
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!(
                "ORT_DYLIB_PATH={}: no such file (it should name libonnxruntime.so)",
                p.display()
            );
        }
        return Ok(p);
    }
    let dirs = search_dirs();
    for d in &dirs {
        if let Some(p) = candidates_in(d).into_iter().find(|p| p.is_file()) {
            return Ok(p);
        }
    }
    let listed: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    bail!(
        "libonnxruntime.so not found: pass --ort-lib FILE or set ORT_DYLIB_PATH (pip's \
         onnxruntime package has it in onnxruntime/capi/; scripts/setup.sh installs it in \
         .venv), or use --backend tract. Searched: {}",
        listed.join(", ")
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn finds_versioned_names_and_venvs() {
        let dir = tempfile::tempdir().unwrap();
        let capi = dir
            .path()
            .join(".venv/lib/python3.12/site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        std::fs::write(capi.join("libonnxruntime.so.1.32.0"), b"").unwrap();
        let nested = dir.path().join("target/debug");
        std::fs::create_dir_all(&nested).unwrap();
        let dirs = venv_dirs(&nested);
        assert_eq!(dirs, vec![capi.clone()]);
        let found: Vec<PathBuf> = candidates_in(&capi)
            .into_iter()
            .filter(|p| p.is_file())
            .collect();
        assert_eq!(found, vec![capi.join("libonnxruntime.so.1.32.0")]);
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let err = find(Some(Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
        assert!(err.to_string().contains("--ort-lib"), "{err}");
    }
}
