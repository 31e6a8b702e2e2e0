//! `.pth` files as `torch.save` writes them under every name: the zip layout of a checkpoint
//! depends on the length of its file name (the archive's inner folder is named after it and
//! records are padded to 64-byte alignment), so every stem length from 1 to 100 is read, saved
//! by path (inner folder `<stem>/`) and through a file object (`archive/`), plus zip64 forms.
//! The files come from `tests/fixtures/gen_pth_names.py` (the project virtualenv's torch).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use mae_models::checkpoint::pth::{read_pth, read_pth_bytes};
use serde::Deserialize;

const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
const GENERATOR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/gen_pth_names.py"
);

#[derive(Debug, Deserialize)]
struct Entry {
    path: String,
    epoch: i64,
    folder: String,
    tensors: Vec<RefTensor>,
}

#[derive(Debug, Deserialize)]
struct RefTensor {
    name: String,
    shape: Vec<usize>,
    bits: Vec<u32>,
}

fn generate() -> (PathBuf, Vec<Entry>) {
    assert!(
        Path::new(PYTHON).exists(),
        "the project virtualenv's Python ({PYTHON}) is missing; run scripts/setup.sh"
    );
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pth-names");
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(PYTHON)
        .arg(GENERATOR)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{GENERATOR} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let index = std::fs::read_to_string(dir.join("index.json")).unwrap();
    (dir, serde_json::from_str(&index).unwrap())
}

#[test]
fn torch_save_files_of_every_name_length_read_value_by_value() {
    let (dir, entries) = generate();
    let mut stems = std::collections::BTreeSet::new();
    let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
    for e in &entries {
        let path = dir.join(&e.path);
        let kind = e.path.split('/').next().unwrap();
        *kinds.entry(kind).or_default() += 1;
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        stems.insert(stem.len());
        let from_file = read_pth(&path).unwrap_or_else(|err| panic!("{}: {err}", e.path));
        let bytes = std::fs::read(&path).unwrap();
        let from_bytes = read_pth_bytes(&bytes, &path).unwrap();
        assert_eq!(from_file, from_bytes, "{}: file and byte readers", e.path);
        assert_eq!(from_file.epoch, Some(e.epoch), "{}: epoch", e.path);
        assert_eq!(from_file.state_dict_key.as_deref(), Some("model"));
        let names: Vec<&str> = from_file.names().collect();
        let want: Vec<&str> = e.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, want, "{}: tensor names", e.path);
        for t in &e.tensors {
            let got = from_file.get(&t.name).unwrap();
            assert_eq!(got.shape, t.shape, "{}: shape of {}", e.path, t.name);
            let got_bits: Vec<u32> = got.to_f32_vec().iter().map(|v| v.to_bits()).collect();
            assert_eq!(got_bits, t.bits, "{}: values of {}", e.path, t.name);
        }
    }
    // Every stem length, both inner-folder forms, and the zip64 forms were exercised.
    assert!(
        (1..=100).all(|n| stems.contains(&n)),
        "stem lengths {stems:?}"
    );
    assert!(kinds["path"] >= 100 && kinds["file"] >= 100, "{kinds:?}");
    assert!(kinds["zip64"] >= 6 && kinds["zip64end"] >= 6, "{kinds:?}");
    assert!(entries.iter().any(|e| e.folder == "archive"));
    assert!(
        entries
            .iter()
            .any(|e| e.path == "path/mae_pretrain_vit_base.pth"
                && e.folder == "mae_pretrain_vit_base")
    );
}
