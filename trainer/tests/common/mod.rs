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

/// One split of a generated `.npz`: uint8 images of `shape` (`[N, H, W]` or `[N, H, W, 3]`)
/// and one uint8 label per image.
pub struct NpzSplitData<'a> {
    pub name: &'a str,
    pub shape: Vec<usize>,
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

/// A `.npy` array of uint8 as numpy writes it (version 1.0, header padded to 64 bytes).
fn npy_u8(shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// Writes a MedMNIST-style `.npz` (deflated, as `numpy.savez_compressed`) of `splits`.
pub fn write_npz(path: &Path, splits: &[NpzSplitData]) {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for s in splits {
        assert_eq!(s.images.len(), s.shape.iter().product::<usize>());
        assert_eq!(s.labels.len(), s.shape[0]);
        zip.start_file(format!("{}_images.npy", s.name), opts)
            .unwrap();
        zip.write_all(&npy_u8(&s.shape, &s.images)).unwrap();
        zip.start_file(format!("{}_labels.npy", s.name), opts)
            .unwrap();
        zip.write_all(&npy_u8(&[s.labels.len(), 1], &s.labels))
            .unwrap();
    }
    zip.finish().unwrap();
}

/// A seeded split of `n` images of `h`×`w` (`c` channels: 1 or 3) with labels cycling
/// through `k` classes.
pub fn npz_split<'a>(
    name: &'a str,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    k: u8,
    seed: u64,
) -> NpzSplitData<'a> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 24) as u8
    };
    let mut shape = vec![n, h, w];
    if c == 3 {
        shape.push(3);
    }
    NpzSplitData {
        name,
        images: (0..n * h * w * c).map(|_| next()).collect(),
        labels: (0..n).map(|i| (i % k as usize) as u8).collect(),
        shape,
    }
}
