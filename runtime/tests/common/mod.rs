//! Fixtures and helpers shared by the `mae-run` tests.
//!
//! The fixtures (tiny ONNX models, images, DICOM files, an .npz file and PyTorch references) are
//! made once per test binary by `tests/fixtures/gen_models.py` with the project virtualenv's
//! Python (created by `scripts/setup.sh`).

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Probabilities of tract and ONNX Runtime against PyTorch on the same pixel tensors
/// (the acceptance bound of issue 6).
pub const PROB_TOL: f32 = 1e-4;
/// Logits against PyTorch: the heads of the test models are scaled up (logits up to ~30), so
/// float32 rounding differences are larger in absolute terms.
pub const LOGIT_TOL: f32 = 1e-3;
/// Probabilities for JPEG inputs, whose decoding differs from PIL's by a few grey levels.
pub const JPEG_PROB_TOL: f32 = 0.05;

pub const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
const GENERATOR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gen_models.py");

/// The fixture folder, generated on first use.
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        assert!(
            Path::new(PYTHON).exists(),
            "the project virtualenv's Python ({PYTHON}) is missing, so the ONNX fixtures cannot \
             be generated; run scripts/setup.sh to create the virtualenv"
        );
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("runtime-fixtures-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new(PYTHON)
            .arg(GENERATOR)
            .arg(&dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {PYTHON} {GENERATOR}: {e}"));
        assert!(
            out.status.success(),
            "{GENERATOR} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

/// The parsed `reference.json`.
pub fn reference() -> &'static serde_json::Value {
    static REF: OnceLock<serde_json::Value> = OnceLock::new();
    REF.get_or_init(|| {
        serde_json::from_slice(&std::fs::read(fixtures().join("reference.json")).unwrap()).unwrap()
    })
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Asserts `|a - b| <= tol` everywhere, naming the worst element; returns the largest
/// difference.
pub fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) -> f32 {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let (mut worst, mut at) = (0f32, 0);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let d = (x - y).abs();
        if d > worst || d.is_nan() {
            worst = d;
            at = i;
        }
    }
    assert!(
        worst <= tol,
        "{what}: max |diff| {worst:e} > {tol:e} at {at} ({} vs {})",
        a[at],
        b[at]
    );
    worst
}

/// libonnxruntime.so of the project virtualenv.
pub fn ort_lib() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/lib");
    let found = std::fs::read_dir(&root).ok().and_then(|d| {
        d.filter_map(|e| e.ok())
            .map(|e| e.path().join("site-packages/onnxruntime/capi"))
            .filter_map(|capi| std::fs::read_dir(&capi).ok())
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so"))
            })
    });
    found.unwrap_or_else(|| {
        panic!(
            "libonnxruntime.so is not in the project virtualenv ({}); run scripts/setup.sh",
            root.display()
        )
    })
}

/// `mae-run` with `args`, run in `dir`.
pub fn mae_run(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mae-run"))
        .args(args)
        .current_dir(dir)
        .env_remove("ORT_DYLIB_PATH")
        .output()
        .unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a clean failure: non-zero exit, no panic, a message containing `needle`.
pub fn assert_fails_with(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success:\n{err}");
    assert!(!err.contains("panicked"), "panic:\n{err}");
    assert!(err.contains(needle), "expected '{needle}' in:\n{err}");
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}
