//! Helpers shared by the trainer's integration tests.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use tch::Tensor;

/// Runs `mae-train` in `dir`, asserts success and returns its standard output.
pub fn mae_train(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mae-train"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success(),
        "mae-train {args:?} failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs the committed generator `tests/fixtures/SCRIPT` with the project venv's Python into
/// `out` (created), with `extra` arguments after the folder.
pub fn generate(script: &str, out: &Path, extra: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("../.venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup.sh first",
        python.display()
    );
    std::fs::create_dir_all(out).unwrap();
    let ok = Command::new(python)
        .arg(root.join("tests/fixtures").join(script))
        .arg(out)
        .args(extra)
        .status()
        .unwrap()
        .success();
    assert!(ok, "{script} failed");
}

/// A folder of this test binary's temporary space.
pub fn tmp_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// Asserts `a ≈ b` elementwise, naming the worst element on failure.
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    assert_eq!(a.size(), b.size(), "{what}: shapes");
    let diff = (a - b).abs().flatten(0, -1);
    let (worst, idx) = diff.max_dim(0, false);
    let worst = worst.double_value(&[]);
    assert!(
        worst <= tol,
        "{what}: max |diff| {worst:e} at flat index {} exceeds {tol:e}",
        idx.int64_value(&[])
    );
}

/// The largest |a − b| over every tensor of two checkpoints with the same names (NaN when any
/// difference is NaN).
pub fn max_weight_diff(a: &Path, b: &Path) -> f32 {
    let a = mae_models::checkpoint::load(a).unwrap();
    let b = mae_models::checkpoint::load(b).unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len(), "tensor counts");
    let mut worst = 0f32;
    for (name, ta) in &a.tensors {
        for (x, y) in ta.to_f32_vec().iter().zip(b.tensors[name].to_f32_vec()) {
            let d = (x - y).abs();
            if d.is_nan() {
                return f32::NAN;
            }
            worst = worst.max(d);
        }
    }
    worst
}
