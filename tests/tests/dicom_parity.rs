//! DICOM as clinics send it, against pydicom: `tests/fixtures/dicom_corpus.py` writes a seeded
//! corpus (uncompressed little and big endian, implicit VR, deflated, RLE, JPEG baseline,
//! JPEG 2000 lossless and lossy; MONOCHROME1/2, RGB, YBR_FULL, YBR_FULL_422, YBR_RCT, PALETTE
//! COLOR; 8 and 16 bits, signed and unsigned; rescale, windows and VOI LUT functions;
//! JPEG-LS lossless and near-lossless; multi-frame, every frame) with pydicom's reading of each
//! frame. The input layer must decode every
//! file to the same 8-bit RGB within one grey level, and refuse broken files with a message
//! naming the file once and the problem.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use mae_tests::{python, workspace_root};

/// Files pydicom reads that the input layer still refuses (cleanly), and why.
const KNOWN_REFUSALS: [(&str, &str); 0] = [];

fn corpus() -> (tempfile::TempDir, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(python())
        .arg(workspace_root().join("tests/fixtures/dicom_corpus.py"))
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "the DICOM corpus generator failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let manifest = std::fs::read_to_string(dir.path().join("manifest.json")).unwrap();
    (dir, serde_json::from_str(&manifest).unwrap())
}

#[test]
fn every_encoding_decodes_as_pydicom_reads_it() {
    let (dir, manifest) = corpus();
    let cases = manifest["cases"].as_array().unwrap();
    assert!(cases.len() >= 20, "{} cases", cases.len());
    let mut failures = Vec::new();
    let mut frames_checked = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let path = dir.path().join(format!("{name}.dcm"));
        let bytes = std::fs::read(&path).unwrap();
        let frames = case["frames"].as_u64().unwrap() as u32;
        let known = KNOWN_REFUSALS.iter().find(|(n, _)| *n == name);
        for k in 0..case["frames_checked"].as_u64().unwrap() as u32 {
            let (reference, what) = if frames > 1 {
                (format!("{name}#{k}.rgb"), format!("{name}#{k}"))
            } else {
                (format!("{name}.rgb"), name.to_string())
            };
            let want = std::fs::read(dir.path().join(reference)).unwrap();
            let what = format!(
                "{what} ({}, {})",
                case["syntax"].as_str().unwrap(),
                case["photometric"].as_str().unwrap()
            );
            let got = if k == 0 {
                // The first frame, as every tool reads a file by default.
                mae_models::input::load(&path)
            } else {
                mae_models::input::dicom::decode_frame(&bytes, &path, k)
            };
            frames_checked += 1;
            if let Some(f) = compare(&what, case, known, got, &want) {
                failures.push(f);
            }
        }
        // One past the last frame is refused, naming the frame count.
        let past = mae_models::input::dicom::decode_frame(&bytes, &path, frames);
        match past {
            Err(e) if known.is_some() || e.to_string().contains(&format!("no frame {frames}")) => {}
            Err(e) => failures.push(format!("{name}: frame {frames} refused oddly: {e}")),
            Ok(_) => failures.push(format!("{name}: frame {frames} of {frames} decoded")),
        }
    }
    eprintln!("{frames_checked} frames of {} files compared", cases.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The decoded frame against pydicom's reading: `None` when it matches (or is a known refusal).
fn compare(
    what: &str,
    case: &serde_json::Value,
    known: Option<&(&str, &str)>,
    got: mae_models::Result<image::RgbImage>,
    want: &[u8],
) -> Option<String> {
    let name = case["name"].as_str().unwrap();
    match got {
        Err(e) if known.is_some() => {
            let e = e.to_string();
            eprintln!("{what}: refused, a known gap ({}): {e}", known.unwrap().1);
            assert_eq!(e.matches(&format!("{name}.dcm")).count(), 1, "{e}");
            None
        }
        Err(e) => Some(format!("{what}: refused: {e}")),
        Ok(_) if known.is_some() => {
            Some(format!("{what}: decodes now; take it off KNOWN_REFUSALS"))
        }
        Ok(img) => {
            let (w, h) = img.dimensions();
            let size = (
                case["columns"].as_u64().unwrap() as u32,
                case["rows"].as_u64().unwrap() as u32,
            );
            if (w, h) != size || img.as_raw().len() != want.len() {
                return Some(format!("{what}: {w}×{h}, pydicom {}×{}", size.0, size.1));
            }
            let diffs: Vec<i16> = img
                .as_raw()
                .iter()
                .zip(want)
                .map(|(&a, &b)| (i16::from(a) - i16::from(b)).abs())
                .collect();
            let worst = diffs.iter().copied().max().unwrap_or(0);
            let beyond_one = diffs.iter().filter(|&&d| d > 1).count() as f64 / diffs.len() as f64;
            eprintln!(
                "{what}: max |Δ| {worst}, {:.2}% of values off by more than 1",
                100.0 * beyond_one
            );
            // Within one grey level everywhere, but for lossy JPEG, whose decoders differ in
            // their inverse DCT's rounding (here zune-jpeg, through the image crate, against
            // Pillow's libjpeg; grey up to 2 levels on 1% of values), and for colour also
            // convert YCbCr to RGB with different fixed-point rounding and upsample subsampled
            // chroma with different filters: 4:4:4 up to 2 levels on 2%, 4:2:2 up to 3 on 15%.
            let lossy_jpeg = case["syntax"]
                .as_str()
                .unwrap()
                .starts_with("JPEG Baseline");
            let (max_allowed, share_allowed) = match case["photometric"].as_str() {
                Some("YBR_FULL_422") if lossy_jpeg => (3, 0.15),
                Some("YBR_FULL") if lossy_jpeg => (2, 0.02),
                _ if lossy_jpeg => (2, 0.01),
                _ => (1, 0.0),
            };
            (worst > max_allowed || beyond_one > share_allowed).then(|| {
                format!(
                    "{what}: max |Δ| {worst} grey levels, {:.2}% beyond 1",
                    100.0 * beyond_one
                )
            })
        }
    }
}

#[test]
fn files_pydicom_cannot_read_end_in_an_answer() {
    // Damaged files of the pydicom wheel (and any it cannot decode with the plugins at hand):
    // decoded or refused with the file named once, never a panic.
    let (dir, manifest) = corpus();
    let broken = manifest["broken"].as_array().unwrap();
    assert!(!broken.is_empty());
    for b in broken {
        let name = b["name"].as_str().unwrap();
        match mae_models::input::load(&dir.path().join(format!("{name}.dcm"))) {
            Ok(img) => eprintln!(
                "{name}: decoded ({}×{}); pydicom: {}",
                img.width(),
                img.height(),
                b["why"]
            ),
            Err(e) => {
                let e = e.to_string();
                eprintln!("{name}: refused: {e}");
                assert_eq!(e.matches(&format!("{name}.dcm")).count(), 1, "{e}");
            }
        }
    }
}

#[test]
fn broken_files_are_refused_with_the_file_and_the_problem() {
    let (dir, _) = corpus();
    let good = std::fs::read(dir.path().join("explicit-le.dcm")).unwrap();
    let find = |needle: &[u8]| {
        good.windows(needle.len())
            .position(|w| w == needle)
            .unwrap()
    };
    // (file, bytes, words the error must contain)
    let pixel_tag = find(&[0xE0, 0x7F, 0x10, 0x00]);
    let bits_tag = find(&[0x28, 0x00, 0x00, 0x01]);
    let syntax_tag = find(&[0x02, 0x00, 0x10, 0x00]);
    let mut no_bits = good.clone();
    no_bits[bits_tag..bits_tag + 4].copy_from_slice(&[0x28, 0x00, 0x99, 0x09]);
    let mut bad_vr = good.clone();
    bad_vr[bits_tag + 4..bits_tag + 6].copy_from_slice(b"Q!");
    let mut no_syntax = good.clone();
    no_syntax[syntax_tag..syntax_tag + 4].copy_from_slice(&[0x02, 0x00, 0x99, 0x00]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated-pixels.dcm", good[..good.len() - 200].to_vec()),
        ("no-pixels.dcm", good[..pixel_tag].to_vec()),
        ("no-bits-allocated.dcm", no_bits),
        ("bad-vr.dcm", bad_vr),
        ("no-transfer-syntax.dcm", no_syntax),
        ("header-only.dcm", good[..140].to_vec()),
    ];
    for (name, bytes) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let err = match mae_models::input::load(&path) {
            Ok(img) => panic!("{name} decoded as {}×{}", img.width(), img.height()),
            Err(e) => e.to_string(),
        };
        eprintln!("{name}: {err}");
        assert_eq!(err.matches(name).count(), 1, "{name}: {err}");
        assert!(err.contains("DICOM"), "{name}: {err}");
        assert!(
            err.len() > path.display().to_string().len() + 30,
            "{name}: a reason is given: {err}"
        );
    }
}
