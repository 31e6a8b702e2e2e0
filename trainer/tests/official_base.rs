//! An official-layout MAE `mae_vit_base_patch16` pretrain checkpoint (written by PyTorch in the
//! test) fine-tunes at 224 with exactly the head and `fc_norm` missing, and at another input
//! size with `pos_embed` interpolated.
#![allow(clippy::unwrap_used)]

mod common;

use common::mae_train;

#[test]
fn official_mae_base_checkpoint_fine_tunes_at_224_and_at_112() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::generate("gen_mae_reference.py", d, &["--base"]);
    mae_train(
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
        "--keep-checkpoints",
        "1",
    ];

    let out = mae_train(d, &[&common[..], &["--output-dir", "ft224"]].concat());
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
    // A ViT-B checkpoint with its optimizer state is over 1 GB: free it before the next run.
    std::fs::remove_dir_all(d.join("ft224")).unwrap();

    let out = mae_train(
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
