//! An official-layout MAE `mae_vit_base_patch16` pretrain checkpoint (written by PyTorch in the
//! test) fine-tunes at 224 with exactly the head and `fc_norm` missing, and at another input
//! size with `pos_embed` interpolated.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn run(dir: &Path, args: &[&str]) -> String {
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

#[test]
fn official_mae_base_checkpoint_fine_tunes_at_224_and_at_112() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("../.venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup.sh first",
        python.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ok = Command::new(&python)
        .arg(root.join("tests/fixtures/gen_mae_reference.py"))
        .arg(d)
        .arg("--base")
        .status()
        .unwrap()
        .success();
    assert!(ok, "reference generator failed");
    run(
        d,
        &[
            "synth",
            "--output",
            "data",
            "--per-class",
            "4",
            "--size",
            "28",
        ],
    );
    let ckpt = "mae_pretrain_vit_base_layout.pth";
    let common = [
        "finetune",
        "--data-path",
        "data",
        "--model",
        "vit_base_patch16",
        "--finetune",
        ckpt,
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--train-samples",
        "2",
        "--num-workers",
        "1",
    ];

    let out = run(d, &[&common[..], &["--output-dir", "ft224"]].concat());
    assert!(out.contains("dropped 104 MAE decoder tensors"), "{out}");
    assert!(
        out.contains("missing_keys=['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']"),
        "{out}"
    );
    assert!(
        out.contains("unexpected_keys=['norm.bias', 'norm.weight']"),
        "{out}"
    );
    assert!(!out.contains("position interpolate"), "{out}");

    let out = run(
        d,
        &[
            &common[..],
            &["--output-dir", "ft112", "--input-size", "112"],
        ]
        .concat(),
    );
    assert!(
        out.contains("position interpolate from 14x14 to 7x7"),
        "{out}"
    );
    assert!(
        out.contains("missing_keys=['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']"),
        "{out}"
    );
    assert!(d.join("ft112/checkpoint-0.safetensors").exists());
}
