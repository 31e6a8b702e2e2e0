//! Reading `.pth` checkpoints written by the real `torch.save`.
//!
//! The fixtures are generated once per test run by `tests/fixtures/gen_pth.py` with the
//! project virtualenv's Python (created by `scripts/setup.sh`); each `NAME.pth` comes with a
//! `NAME.json` reference holding every tensor's dtype, shape and exact values.

#![allow(clippy::unwrap_used)]

use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use mae_models::checkpoint::pickle;
use mae_models::checkpoint::pth::{read_pth, read_pth_bytes, PthFile};
use mae_models::{DType, Error, TensorData};
use proptest::prelude::*;
use serde::Deserialize;

const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
const GENERATOR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gen_pth.py");

/// The fixture names `gen_pth.py` writes (besides `legacy`).
const FIXTURES: [&str; 7] = [
    "mae_pretrain",
    "mae_finetune",
    "fp16",
    "bf16",
    "views",
    "ints",
    "proto4",
];

/// Generates the fixtures once per test binary and returns their folder.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let python = Path::new(PYTHON);
        assert!(
            python.exists(),
            "the project virtualenv's Python ({PYTHON}) is missing, so the .pth fixtures cannot \
             be generated; run scripts/setup.sh to create the virtualenv"
        );
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pth-fixtures");
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

fn fixture(name: &str) -> PathBuf {
    fixtures().join(format!("{name}.pth"))
}

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

#[derive(Debug, Deserialize)]
struct Reference {
    legacy: bool,
    top_level_keys: Vec<String>,
    state_dict_key: Option<String>,
    epoch: Option<i64>,
    skipped: Vec<String>,
    tensors: Vec<RefTensor>,
}

#[derive(Debug, Deserialize)]
struct RefTensor {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    values: Vec<f64>,
    bits: Vec<u64>,
}

fn reference(name: &str) -> Reference {
    let text = std::fs::read_to_string(fixtures().join(format!("{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Asserts that `got` has the reference's dtype, shape and exactly its values, reporting the
/// worst element on mismatch.
fn assert_tensor_eq(file: &str, got: &TensorData, want: &RefTensor) {
    let name = &want.name;
    assert_eq!(
        got.dtype.to_string(),
        want.dtype,
        "{file}: dtype of '{name}'"
    );
    assert_eq!(got.shape, want.shape, "{file}: shape of '{name}'");
    let expected: Vec<f64> = want.bits.iter().map(|&b| f64::from_bits(b)).collect();
    // The decimal values are only a readable copy of the bit patterns.
    assert_eq!(expected.len(), want.values.len());
    for (e, v) in expected.iter().zip(&want.values) {
        assert!(
            (e - v).abs() <= 1e-12 * e.abs().max(1.0),
            "{file}: '{name}' bits vs values"
        );
    }
    let actual = got.to_f64_vec();
    assert_eq!(
        actual.len(),
        expected.len(),
        "{file}: '{name}' has {} values, expected {}",
        actual.len(),
        expected.len()
    );
    let mismatches: Vec<usize> = (0..actual.len())
        .filter(|&i| actual[i].to_bits() != expected[i].to_bits())
        .collect();
    if let Some(&worst) = mismatches.iter().max_by(|&&a, &&b| {
        (actual[a] - expected[a])
            .abs()
            .total_cmp(&(actual[b] - expected[b]).abs())
    }) {
        panic!(
            "{file}: '{name}' differs from the reference at {} of {} elements; worst at flat \
             index {worst}: got {}, expected {} (|diff| {})",
            mismatches.len(),
            actual.len(),
            actual[worst],
            expected[worst],
            (actual[worst] - expected[worst]).abs()
        );
    }
}

/// Asserts that the file read matches its reference in every respect.
fn assert_matches_reference(name: &str, got: &PthFile) {
    let want = reference(name);
    assert!(!want.legacy);
    assert_eq!(
        got.top_level_keys, want.top_level_keys,
        "{name}: top-level keys"
    );
    assert_eq!(
        got.state_dict_key, want.state_dict_key,
        "{name}: state dict key"
    );
    assert_eq!(got.epoch, want.epoch, "{name}: epoch");
    let got_names: Vec<&str> = got.names().collect();
    let want_names: Vec<&str> = want.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(got_names, want_names, "{name}: tensor names and order");
    for (t, w) in got.tensors.iter().map(|(_, t)| t).zip(&want.tensors) {
        assert_tensor_eq(name, t, w);
    }
    assert_eq!(
        got.skipped.len(),
        want.skipped.len(),
        "{name}: skipped {:?}",
        got.skipped
    );
    for (note, key) in got.skipped.iter().zip(&want.skipped) {
        assert!(
            note.starts_with(&format!("{key}:")),
            "{name}: note {note:?} for '{key}'"
        );
    }
}

fn shape_of<'a>(f: &'a PthFile, name: &str) -> &'a [usize] {
    &f.get(name)
        .unwrap_or_else(|| panic!("no tensor '{name}'"))
        .shape
}

/// The (name, contents) records of a zip archive.
type Entries = Vec<(String, Vec<u8>)>;

fn unzip(bytes: &[u8]) -> Entries {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).unwrap();
        let name = f.name().unwrap().into_owned();
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        out.push((name, data));
    }
    out
}

fn rezip(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in entries {
        w.start_file(name.as_str(), options).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn entry<'a>(entries: &'a [(String, Vec<u8>)], suffix: &str) -> &'a [u8] {
    &entries.iter().find(|(n, _)| n.ends_with(suffix)).unwrap().1
}

fn err_text(r: Result<PthFile, Error>) -> String {
    match r {
        Ok(f) => panic!("expected an error, read {} tensors", f.tensors.len()),
        Err(e) => e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures written by torch.save.

#[test]
fn every_fixture_matches_its_reference() {
    for name in FIXTURES {
        let got = read_pth(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_matches_reference(name, &got);
    }
}

#[test]
fn mae_pretrain_training_checkpoint() {
    let f = read_pth(&fixture("mae_pretrain")).unwrap();
    assert_eq!(
        f.top_level_keys,
        ["model", "optimizer", "epoch", "scaler", "args"]
    );
    assert_eq!(f.state_dict_key.as_deref(), Some("model"));
    assert_eq!(f.epoch, Some(3));
    assert!(f.skipped.is_empty(), "{:?}", f.skipped);
    // MaskedAutoencoderViT layout: D=16, depth 2, Dd=8, decoder depth 1, img 8, patch 4.
    assert_eq!(f.tensors.len(), 4 + 2 + 2 * 12 + 2 + 2 + 12 + 2 + 2);
    assert_eq!(shape_of(&f, "cls_token"), [1, 1, 16]);
    assert_eq!(shape_of(&f, "pos_embed"), [1, 5, 16]);
    assert_eq!(shape_of(&f, "mask_token"), [1, 1, 8]);
    assert_eq!(shape_of(&f, "decoder_pos_embed"), [1, 5, 8]);
    assert_eq!(shape_of(&f, "patch_embed.proj.weight"), [16, 3, 4, 4]);
    assert_eq!(shape_of(&f, "blocks.1.attn.qkv.weight"), [48, 16]);
    assert_eq!(shape_of(&f, "blocks.1.mlp.fc1.weight"), [64, 16]);
    assert_eq!(shape_of(&f, "blocks.1.mlp.fc2.weight"), [16, 64]);
    assert_eq!(shape_of(&f, "decoder_embed.weight"), [8, 16]);
    assert_eq!(shape_of(&f, "decoder_blocks.0.attn.proj.weight"), [8, 8]);
    assert_eq!(shape_of(&f, "decoder_pred.weight"), [48, 8]);
    assert_eq!(shape_of(&f, "norm.weight"), [16]);
    assert!(f.tensors.iter().all(|(_, t)| t.dtype == DType::F32));
    // Optimizer tensors are not state-dict tensors.
    assert!(f.get("exp_avg").is_none());
}

#[test]
fn mae_finetune_checkpoint_has_classifier_head() {
    let f = read_pth(&fixture("mae_finetune")).unwrap();
    assert_eq!(f.top_level_keys, ["model"]);
    assert_eq!(f.epoch, None);
    assert_eq!(shape_of(&f, "head.weight"), [5, 16]);
    assert_eq!(shape_of(&f, "head.bias"), [5]);
    assert_eq!(shape_of(&f, "fc_norm.weight"), [16]);
    assert!(f.get("norm.weight").is_none());
}

#[test]
fn half_precision_state_dicts() {
    let f = read_pth(&fixture("fp16")).unwrap();
    assert_eq!(
        f.state_dict_key, None,
        "a bare state dict is its own state dict"
    );
    assert!(f.tensors.iter().all(|(_, t)| t.dtype == DType::F16));
    let f = read_pth(&fixture("bf16")).unwrap();
    assert_eq!(f.state_dict_key.as_deref(), Some("state_dict"));
    assert_eq!(f.epoch, Some(9));
    assert!(f.tensors.iter().all(|(_, t)| t.dtype == DType::Bf16));
}

#[test]
fn views_offsets_and_shared_storages() {
    let f = read_pth(&fixture("views")).unwrap();
    assert_eq!(f.epoch, Some(12));
    let base: Vec<f64> = (0..24).map(|i| i as f64 * 0.5 - 3.0).collect();
    let at = |r: usize, c: usize| base[r * 6 + c];
    assert_eq!(f.get("base").unwrap().to_f64_vec(), base);
    let t = f.get("transposed").unwrap();
    assert_eq!(t.shape, [6, 4]);
    let want: Vec<f64> = (0..6)
        .flat_map(|c| (0..4).map(move |r| (r, c)))
        .map(|(r, c)| at(r, c))
        .collect();
    assert_eq!(t.to_f64_vec(), want);
    let want: Vec<f64> = (1..3)
        .flat_map(|r| (2..5).map(move |c| (r, c)))
        .map(|(r, c)| at(r, c))
        .collect();
    assert_eq!(f.get("slice").unwrap().to_f64_vec(), want);
    let want: Vec<f64> = (0..4).map(|r| at(r, 1)).collect();
    assert_eq!(f.get("column").unwrap().to_f64_vec(), want);
    assert_eq!(
        f.get("every_other").unwrap().to_f64_vec(),
        [at(0, 0), at(0, 3), at(2, 0), at(2, 3)]
    );
    let a = f.get("shared_a").unwrap().to_f64_vec();
    let b = f.get("shared_b").unwrap().to_f64_vec();
    assert_eq!((a.len(), b.len()), (5, 5));
    assert_ne!(a, b);
    let e = f.get("expanded").unwrap().to_f64_vec();
    assert_eq!(e.len(), 12);
    assert!(e.chunks(3).all(|row| row == &e[..3]));
    assert_eq!(f.get("scalar").unwrap().shape, Vec::<usize>::new());
    assert_eq!(f.get("scalar").unwrap().to_f64_vec(), [2.5]);
    assert_eq!(f.get("empty").unwrap().shape, [0, 3]);
    assert_eq!(shape_of(&f, "param"), [3, 2]);
    assert_eq!(f.skipped.len(), 3, "{:?}", f.skipped);
    assert!(f.skipped[0].contains("str"), "{:?}", f.skipped);
}

#[test]
fn integer_and_bool_tensors() {
    let f = read_pth(&fixture("ints")).unwrap();
    assert_eq!(f.epoch, Some(5));
    assert_eq!(f.state_dict_key, None);
    assert_eq!(
        f.skipped.len(),
        1,
        "the epoch entry is skipped: {:?}",
        f.skipped
    );
    let i64s = f.get("i64").unwrap();
    assert_eq!(i64s.dtype, DType::I64);
    let v: Vec<i64> = i64s
        .data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(v, [0, 1, -1, (1 << 40) + 3, -(1 << 35), 1 << 53]);
    assert_eq!(f.get("u8").unwrap().dtype, DType::U8);
    assert_eq!(f.get("i32").unwrap().dtype, DType::I32);
    assert_eq!(f.get("i16").unwrap().dtype, DType::I16);
    assert_eq!(f.get("i8").unwrap().dtype, DType::I8);
    assert_eq!(f.get("f64").unwrap().dtype, DType::F64);
    let flags = f.get("flags").unwrap();
    assert_eq!(flags.dtype, DType::Bool);
    assert_eq!(flags.data, [1, 0, 1, 1]);
    assert_eq!(shape_of(&f, "u8_t"), [3, 4]);
}

#[test]
fn bytes_and_file_readers_agree_and_top_folder_is_arbitrary() {
    let bytes = fixture_bytes("views");
    let from_file = read_pth(&fixture("views")).unwrap();
    let from_bytes = read_pth_bytes(&bytes, Path::new("views.pth")).unwrap();
    assert_eq!(from_file, from_bytes);
    // torch names the top folder after the file; any name (or a BytesIO's "archive") works.
    let renamed: Vec<(String, Vec<u8>)> = unzip(&bytes)
        .into_iter()
        .map(|(n, d)| (n.replacen("views/", "archive/", 1), d))
        .collect();
    assert!(renamed[0].0.starts_with("archive/"));
    let from_renamed = read_pth_bytes(&rezip(&renamed), Path::new("renamed.pth")).unwrap();
    assert_eq!(from_renamed, from_file);
}

// ---------------------------------------------------------------------------------------------
// Files that cannot be read.

#[test]
fn legacy_file_asks_to_resave() {
    let path = fixture("legacy");
    assert!(reference("legacy").legacy);
    let e = err_text(read_pth(&path));
    assert!(e.contains("legacy.pth"), "{e}");
    assert!(
        e.contains("legacy") && e.contains("re-save") && e.contains("torch>=1.6"),
        "{e}"
    );
    assert!(e.contains("torch.save"), "{e}");
}

#[test]
fn empty_truncated_and_random_files_fail_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pth");
    std::fs::write(&empty, b"").unwrap();
    let e = err_text(read_pth(&empty));
    assert!(e.contains("empty.pth") && e.contains("empty"), "{e}");

    let missing = dir.path().join("absent.pth");
    assert!(matches!(read_pth(&missing), Err(Error::Io { .. })));

    let bytes = fixture_bytes("mae_pretrain");
    let cut_path = dir.path().join("cut.pth");
    for cut in [
        1,
        3,
        4,
        30,
        100,
        1000,
        bytes.len() / 2,
        bytes.len() - 100,
        bytes.len() - 22,
        bytes.len() - 1,
    ] {
        std::fs::write(&cut_path, &bytes[..cut]).unwrap();
        let e = err_text(read_pth(&cut_path));
        assert!(e.contains("cut.pth"), "cut at {cut}: {e}");
    }

    let random_path = dir.path().join("random.pth");
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for len in [1usize, 2, 7, 64, 4096] {
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(&random_path, &data).unwrap();
        let e = err_text(read_pth(&random_path));
        assert!(e.contains("random.pth"), "{len} random bytes: {e}");
        // Random bytes behind a zip signature too.
        let mut zipish = b"PK\x03\x04".to_vec();
        zipish.extend(&data);
        let e = err_text(read_pth_bytes(&zipish, Path::new("zipish.pth")));
        assert!(e.contains("zipish.pth"), "{e}");
    }
}

#[test]
fn zip_without_data_pkl_is_missing() {
    let entries = vec![
        ("archive/version".to_owned(), b"3\n".to_vec()),
        ("archive/data/0".to_owned(), vec![0; 16]),
    ];
    let r = read_pth_bytes(&rezip(&entries), Path::new("nopkl.pth"));
    match r {
        Err(e @ Error::Missing { .. }) => {
            let e = e.to_string();
            assert!(e.contains("nopkl.pth") && e.contains("data.pkl"), "{e}");
        }
        other => panic!("expected Error::Missing, got {other:?}"),
    }
}

#[test]
fn missing_or_short_storage_records_fail() {
    let entries = unzip(&fixture_bytes("views"));
    // Without its storage record.
    let without: Vec<_> = entries
        .iter()
        .filter(|(n, _)| !n.ends_with("/data/0"))
        .cloned()
        .collect();
    let r = read_pth_bytes(&rezip(&without), Path::new("nostorage.pth"));
    match r {
        Err(e @ Error::Missing { .. }) => {
            let e = e.to_string();
            assert!(
                e.contains("nostorage.pth") && e.contains("views/data/0"),
                "{e}"
            );
        }
        other => panic!("expected Error::Missing, got {other:?}"),
    }
    // With a storage record too short for its declared element count.
    let short: Vec<_> = entries
        .iter()
        .map(|(n, d)| {
            let d = if n.ends_with("/data/0") {
                d[..d.len() - 4].to_vec()
            } else {
                d.clone()
            };
            (n.clone(), d)
        })
        .collect();
    let r = read_pth_bytes(&rezip(&short), Path::new("short.pth"));
    match r {
        Err(e @ Error::Format { .. }) => {
            let e = e.to_string();
            assert!(
                e.contains("short.pth") && e.contains("views/data/0") && e.contains("bytes"),
                "{e}"
            );
        }
        other => panic!("expected Error::Format, got {other:?}"),
    }
}

#[test]
fn big_endian_byteorder_is_refused() {
    let entries: Vec<_> = unzip(&fixture_bytes("views"))
        .into_iter()
        .map(|(n, d)| {
            if n.ends_with("/byteorder") {
                (n, b"big".to_vec())
            } else {
                (n, d)
            }
        })
        .collect();
    let e = err_text(read_pth_bytes(&rezip(&entries), Path::new("big.pth")));
    assert!(e.contains("big.pth") && e.contains("little"), "{e}");
}

/// A minimal assembler for hand-made `data.pkl` streams.
struct Pickle(Vec<u8>);

impl Pickle {
    fn new() -> Pickle {
        Pickle(vec![0x80, 2])
    }
    fn raw(mut self, b: &[u8]) -> Pickle {
        self.0.extend_from_slice(b);
        self
    }
    fn s(mut self, s: &str) -> Pickle {
        self.0.push(b'X');
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
        self
    }
    fn int(mut self, v: i32) -> Pickle {
        self.0.push(b'J');
        self.0.extend(v.to_le_bytes());
        self
    }
    fn global(mut self, module: &str, name: &str) -> Pickle {
        self.0.push(b'c');
        self.0.extend(format!("{module}\n{name}\n").as_bytes());
        self
    }
    fn ints(mut self, v: &[i32]) -> Pickle {
        self.0.push(b'(');
        for &x in v {
            self = self.int(x);
        }
        self.0.push(b't');
        self
    }
    /// `_rebuild_tensor_v2(storage('0', FloatStorage, numel), offset, size, stride, False, OrderedDict())`
    fn tensor(self, numel: i32, offset: i32, size: &[i32], stride: &[i32]) -> Pickle {
        self.global("torch._utils", "_rebuild_tensor_v2")
            .raw(b"(")
            .raw(b"(")
            .s("storage")
            .global("torch", "FloatStorage")
            .s("0")
            .s("cpu")
            .int(numel)
            .raw(b"tQ")
            .int(offset)
            .ints(size)
            .ints(stride)
            .raw(&[0x89])
            .global("collections", "OrderedDict")
            .raw(b")R")
            .raw(b"tR")
    }
    /// `{name: tensor}`
    fn state_dict(name: &str, numel: i32, offset: i32, size: &[i32], stride: &[i32]) -> Vec<u8> {
        let mut p = Pickle::new()
            .raw(b"}")
            .s(name)
            .tensor(numel, offset, size, stride)
            .raw(b"s.");
        std::mem::take(&mut p.0)
    }
}

fn archive_with(pkl: Vec<u8>, storage: Vec<u8>) -> Vec<u8> {
    rezip(&[
        ("archive/data.pkl".to_owned(), pkl),
        ("archive/byteorder".to_owned(), b"little".to_vec()),
        ("archive/data/0".to_owned(), storage),
    ])
}

#[test]
fn hand_made_archive_reads() {
    let storage: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let pkl = Pickle::state_dict("w", 6, 1, &[2, 2], &[1, 2]);
    let f = read_pth_bytes(&archive_with(pkl, storage), Path::new("hand.pth")).unwrap();
    assert_eq!(f.get("w").unwrap().to_f64_vec(), [1.0, 3.0, 2.0, 4.0]);
}

#[test]
fn views_beyond_their_storage_fail() {
    let storage: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    /// (what is wrong, storage numel, offset, size, stride)
    type Case<'a> = (&'a str, i32, i32, &'a [i32], &'a [i32]);
    let cases: [Case; 7] = [
        ("size", 6, 0, &[7], &[1]),
        ("offset", 6, 5, &[2], &[1]),
        ("stride", 6, 0, &[2, 2], &[5, 1]),
        ("numel", 7, 0, &[6], &[1]),
        ("negative", 6, 0, &[-1], &[1]),
        ("overflow", 6, 0, &[2, 2], &[i32::MAX, i32::MAX]),
        // A stride-0 broadcast of one element to 4 TiB is refused before allocating.
        ("expansion", 1, 0, &[1 << 20, 1 << 20], &[0, 0]),
    ];
    for (what, numel, offset, size, stride) in cases {
        let pkl = Pickle::state_dict("blocks.0.w", numel, offset, size, stride);
        let r = read_pth_bytes(
            &archive_with(pkl, storage.clone()),
            Path::new("bad_view.pth"),
        );
        match r {
            Err(e @ Error::Format { .. }) => {
                let e = e.to_string();
                assert!(e.contains("bad_view.pth"), "{what}: {e}");
                assert!(
                    e.contains("blocks.0.w") || e.contains("data/0"),
                    "{what}: {e}"
                );
            }
            other => panic!("{what}: expected Error::Format, got {other:?}"),
        }
    }
}

#[test]
fn top_level_that_is_not_a_checkpoint_dict_fails() {
    let storage = vec![0u8; 4];
    // A list at the top level.
    let e = err_text(read_pth_bytes(
        &archive_with(b"\x80\x02]q\x00.".to_vec(), storage.clone()),
        Path::new("list.pth"),
    ));
    assert!(e.contains("list.pth") && e.contains("list"), "{e}");
    // A dict with neither tensors nor a state dict.
    let pkl = Pickle::new().raw(b"}").s("epoch").int(1).raw(b"s.").0;
    match read_pth_bytes(
        &archive_with(pkl, storage.clone()),
        Path::new("nomodel.pth"),
    ) {
        Err(e @ Error::Missing { .. }) => assert!(e.to_string().contains("epoch"), "{e}"),
        other => panic!("expected Error::Missing, got {other:?}"),
    }
    // A pickled module.
    let pkl = Pickle::new()
        .global("models_mae", "MaskedAutoencoderViT")
        .raw(b")\x81}b.")
        .0;
    let e = err_text(read_pth_bytes(
        &archive_with(pkl, storage),
        Path::new("module.pth"),
    ));
    assert!(
        e.contains("MaskedAutoencoderViT") && e.contains("state_dict"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Damaged files never panic.

fn mutate(
    mut data: Vec<u8>,
    edits: &[(prop::sample::Index, u8)],
    cut: Option<prop::sample::Index>,
) -> Vec<u8> {
    if data.is_empty() {
        return data;
    }
    for (i, b) in edits {
        let i = i.index(data.len());
        data[i] = *b;
    }
    if let Some(c) = cut {
        data.truncate(c.index(data.len()));
    }
    data
}

fn fuzz_config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(fuzz_config(1500))]

    /// Random byte edits anywhere in a real archive give Ok or Err, never a panic.
    #[test]
    fn mutated_archives_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in prop::option::weighted(0.2, any::<prop::sample::Index>()),
    ) {
        static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
        let bytes = BYTES.get_or_init(|| fixture_bytes("views"));
        let data = mutate(bytes.clone(), &edits, cut);
        let _ = read_pth_bytes(&data, Path::new("mutated.pth"));
    }
}

proptest! {
    #![proptest_config(fuzz_config(3000))]

    /// Random edits of the pickle stream of a real training checkpoint (optimizer state,
    /// argparse args, scaler…), re-zipped with intact storages, give Ok or Err, never a panic.
    #[test]
    fn mutated_pickles_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in prop::option::weighted(0.1, any::<prop::sample::Index>()),
        which in prop::sample::select(vec![0usize, 1, 1, 1]),
    ) {
        static ENTRIES: OnceLock<Vec<Entries>> = OnceLock::new();
        let all = ENTRIES.get_or_init(|| {
            vec![unzip(&fixture_bytes("mae_pretrain")), unzip(&fixture_bytes("views"))]
        });
        let entries = &all[which];
        let pkl = mutate(entry(entries, "/data.pkl").to_vec(), &edits, cut);
        if pickle::unpickle(&pkl).is_err() {
            // read_pth_bytes would stop at the same place.
            return Ok(());
        }
        let mut entries = entries.clone();
        for (n, d) in &mut entries {
            if n.ends_with("/data.pkl") {
                *d = pkl.clone();
            }
        }
        let _ = read_pth_bytes(&rezip(&entries), Path::new("mutated_pickle.pth"));
    }
}
