//! The shared evaluation preprocessing against torchvision, and `.npz` reading against numpy.
//!
//! Fixtures are generated once per test run by `tests/fixtures/gen_imaging.py` with the project
//! virtualenv's Python (created by `scripts/setup.sh`): seeded images in PNG, JPEG, BMP and TIFF,
//! each with the tensor torchvision's evaluation transform makes of it on PIL, and small `.npz`
//! archives written by numpy.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use mae_models::imaging::preprocess_eval;
use mae_models::input::{decode, load};
use mae_models::npz::{read_split, splits};
use mae_models::preprocess::{Interpolation, PreprocessSpec};
use mae_models::Error;
use serde::Deserialize;

const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
const GENERATOR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gen_imaging.py");

/// Lossless inputs: our decoder and resampler reproduce PIL's bytes, so the only difference
/// left is float rounding in the normalisation (measured: 0, bit-identical).
const LOSSLESS_TOL: f32 = 1e-6;
/// JPEG inputs: the `image` crate's IDCT and chroma upsampling differ from libjpeg-turbo's by a
/// few levels on some pixels (measured: at most 0.070 after normalisation, i.e. 4/255/0.225,
/// on the colour JPEG; 0.018 on the grayscale one).
const JPEG_TOL: f32 = 0.1;
/// Mean absolute difference allowed for JPEG inputs (measured: 0.0073 colour, 0.0005 gray).
const JPEG_MEAN_TOL: f32 = 0.015;

fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let python = Path::new(PYTHON);
        assert!(
            python.exists(),
            "the project virtualenv's Python ({PYTHON}) is missing, so the image fixtures cannot \
             be generated; run scripts/setup.sh to create the virtualenv"
        );
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("imaging-fixtures");
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new(python)
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

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    file: String,
    size: usize,
    crop_pct: f32,
    interpolation: Interpolation,
    mean: [f32; 3],
    std: [f32; 3],
    format: String,
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Largest and mean absolute difference, and where the largest is.
fn diff(a: &[f32], b: &[f32]) -> (f32, f32, usize) {
    assert_eq!(a.len(), b.len());
    let mut worst = (0.0f32, 0usize);
    let mut sum = 0.0f64;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let d = (x - y).abs();
        sum += d as f64;
        if d > worst.0 || d.is_nan() {
            worst = (d, i);
        }
    }
    (worst.0, (sum / a.len().max(1) as f64) as f32, worst.1)
}

#[test]
fn preprocessing_matches_torchvision() {
    let dir = fixtures();
    let cases: Vec<Case> =
        serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for case in &cases {
        let spec = PreprocessSpec {
            input_size: case.size,
            mean: case.mean,
            std: case.std,
            crop_pct: case.crop_pct,
            interpolation: case.interpolation,
        };
        let img = load(&dir.join(&case.file)).unwrap();
        let ours = preprocess_eval(&img, &spec);
        let want = read_f32(&dir.join(format!("{}.f32", case.name)));
        let (max, mean, at) = diff(&ours, &want);
        let (tol, mean_tol) = if case.format == "JPEG" {
            (JPEG_TOL, JPEG_MEAN_TOL)
        } else {
            (LOSSLESS_TOL, LOSSLESS_TOL)
        };
        let s = case.size;
        let line = format!(
            "{:<20} max |diff| {max:.2e} (at c{} y{} x{}: ours {} torchvision {}), mean {mean:.2e}",
            case.name,
            at / (s * s),
            at / s % s,
            at % s,
            ours[at],
            want[at]
        );
        eprintln!("{line}");
        if max > tol || mean > mean_tol {
            failures.push(line);
        }
    }
    assert!(
        failures.is_empty(),
        "beyond tolerance:\n{}",
        failures.join("\n")
    );
}

#[test]
fn damaged_and_foreign_files_are_errors() {
    let dir = fixtures();
    let png = std::fs::read(dir.join("rgb_up.png")).unwrap();
    for cut in [8, 40, png.len() / 2, png.len() - 13] {
        let err = decode(&png[..cut], Path::new("cut.png")).unwrap_err();
        assert!(err.to_string().contains("cut.png"), "{err}");
    }
    let jpg = std::fs::read(dir.join("jpeg.jpg")).unwrap();
    // Flipped bytes in the entropy-coded data: an error or some image, never a panic.
    let mut bad = jpg.clone();
    for i in (600..bad.len() - 2).step_by(97) {
        bad[i] ^= 0x5a;
    }
    let _ = decode(&bad, Path::new("bad.jpg"));
    let err = load(&dir.join("missing.png")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("missing.png"));
    let err = load(&dir.join("cases.json")).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err}");
}

#[derive(Debug, Deserialize)]
struct NpzRef {
    train_images: Vec<Vec<Vec<u8>>>,
    test_images: Vec<Vec<Vec<Vec<u8>>>>,
}

#[test]
fn npz_written_by_numpy() {
    let dir = fixtures();
    let reference: NpzRef =
        serde_json::from_slice(&std::fs::read(dir.join("npz_cases.json")).unwrap()).unwrap();
    let path = dir.join("npz_small.npz");
    assert_eq!(splits(&path).unwrap(), ["train", "test", "val"]);

    // Deflated, grayscale [N, H, W] with uint8 labels [N, 1].
    let train = read_split(&path, "train").unwrap();
    assert_eq!(train.images.len(), 5);
    assert_eq!(
        train.labels,
        vec![vec![0], vec![1], vec![2], vec![1], vec![0]]
    );
    for (img, want) in train.images.iter().zip(&reference.train_images) {
        assert_eq!(img.dimensions(), (7, 6));
        for (y, row) in want.iter().enumerate() {
            for (x, &v) in row.iter().enumerate() {
                assert_eq!(img.get_pixel(x as u32, y as u32).0, [v, v, v]);
            }
        }
    }
    // RGB [N, H, W, 3] with int64 multi-label rows.
    let test = read_split(&path, "test").unwrap();
    assert_eq!(
        test.labels,
        vec![vec![1, 0, 1], vec![0, 0, 0], vec![1, 1, 1]]
    );
    for (img, want) in test.images.iter().zip(&reference.test_images) {
        assert_eq!(img.dimensions(), (5, 4));
        for (y, row) in want.iter().enumerate() {
            for (x, px) in row.iter().enumerate() {
                assert_eq!(&img.get_pixel(x as u32, y as u32).0[..], &px[..]);
            }
        }
    }
    assert_eq!(
        read_split(&path, "val").unwrap().labels,
        vec![vec![7], vec![3]]
    );

    // Stored entries, int64 labels of shape [N].
    let stored = dir.join("npz_stored.npz");
    let s = read_split(&stored, "test").unwrap();
    assert_eq!(s.images, train.images);
    assert_eq!(s.labels, vec![vec![3], vec![1], vec![4], vec![1], vec![5]]);
}

#[test]
fn npz_errors_name_the_file_and_the_array() {
    let dir = fixtures();
    let stored = dir.join("npz_stored.npz");
    let cases = [
        ("nope", "nope_images"),
        ("bad", "uint8"),
        ("shape", "[N, H, W]"),
        ("count", "2 images but 'count_labels' 3 labels"),
    ];
    for (split, needle) in cases {
        let err = read_split(&stored, split).unwrap_err().to_string();
        assert!(err.contains("npz_stored.npz"), "{err}");
        assert!(err.contains(needle), "{split}: {err}");
    }
    let err = read_split(&dir.join("cases.json"), "test").unwrap_err();
    assert!(err.to_string().contains("not a .npz"), "{err}");

    // Every truncation of a real archive is an error, never a panic.
    let bytes = std::fs::read(dir.join("npz_small.npz")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for cut in (0..bytes.len()).step_by(bytes.len() / 40 + 1) {
        let p = tmp.path().join("cut.npz");
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert!(read_split(&p, "train").is_err());
    }
    // Damaged bytes inside: an error or some data, never a panic.
    for i in (30..bytes.len()).step_by(53) {
        let mut b = bytes.clone();
        b[i] ^= 0xff;
        let p = tmp.path().join("flip.npz");
        std::fs::write(&p, &b).unwrap();
        let _ = read_split(&p, "train");
    }
}

#[test]
#[cfg_attr(
    not(has_shared_data),
    ignore = "needs ../shared/data/medmnist/pneumoniamnist.npz"
)]
fn pneumoniamnist() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/medmnist/pneumoniamnist.npz");
    assert_eq!(splits(&path).unwrap(), ["train", "val", "test"]);
    let test = read_split(&path, "test").unwrap();
    assert_eq!(test.images.len(), 624);
    assert_eq!(test.images[0].dimensions(), (28, 28));
    let positives = test.labels.iter().filter(|l| l[..] == [1]).count();
    assert_eq!((positives, test.labels.len() - positives), (390, 234));
    let val = read_split(&path, "val").unwrap();
    assert_eq!(val.labels.len(), 524);
    let x = preprocess_eval(&test.images[0], &PreprocessSpec::imagenet(28));
    assert_eq!(x.len(), 3 * 28 * 28);
}
