//! `mae-train pretrain` end to end: a tiny run on generated images, stopped and resumed,
//! then fine-tuned and linearly probed from its checkpoint; `visualize` writes a PNG of the
//! expected size.
#![allow(clippy::unwrap_used)]

mod common;

use common::mae_train;

use mae_models::checkpoint;

const PRETRAIN: &[&str] = &[
    "pretrain",
    "--data-path",
    "data",
    "--model",
    "mae_vit_tiny_patch4_28",
    "--depth",
    "1",
    "--batch-size",
    "16",
    "--epochs",
    "3",
    "--warmup-epochs",
    "1",
    "--num-workers",
    "2",
    "--norm-pix-loss",
    "--vis-every",
    "1",
];

#[test]
fn pretrain_resume_visualize_and_finetune_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mae_train(
        d,
        &[
            "synth",
            "--output",
            "data",
            "--per-class",
            "16",
            "--size",
            "28",
        ],
    );

    let full: Vec<&str> = PRETRAIN
        .iter()
        .copied()
        .chain(["--output-dir", "full"])
        .collect();
    mae_train(d, &full);
    let part: Vec<&str> = PRETRAIN
        .iter()
        .copied()
        .chain(["--output-dir", "part", "--stop-after", "1"])
        .collect();
    mae_train(d, &part);
    let resumed: Vec<&str> = PRETRAIN
        .iter()
        .copied()
        .chain([
            "--output-dir",
            "part",
            "--resume",
            "part/checkpoint-0.safetensors",
        ])
        .collect();
    assert!(mae_train(d, &resumed).contains("Resume checkpoint"));

    let a = checkpoint::load(&d.join("full/checkpoint-2.safetensors")).unwrap();
    let b = checkpoint::load(&d.join("part/checkpoint-2.safetensors")).unwrap();
    for (name, ta) in &a.tensors {
        let (va, vb) = (ta.to_f32_vec(), b.tensors[name].to_f32_vec());
        let worst = va
            .iter()
            .zip(&vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-6, "{name}: resumed run differs by {worst}");
    }
    let meta = b.meta.unwrap();
    assert_eq!(meta.kind, checkpoint::CheckpointKind::MaePretrain);
    assert!(b.tensors.contains_key("decoder_pred.weight") && b.tensors.contains_key("mask_token"));
    let log = std::fs::read_to_string(d.join("part/log.txt")).unwrap();
    assert_eq!(log.lines().count(), 3);

    // Progress grids, and a grid for one image on demand: 4 panels of 28·4 px plus 3 gaps,
    // under a caption row (24 px) with text in it.
    let grid = image::open(d.join("part/vis/epoch-0002.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(grid.width(), 4 * 112 + 3 * 4);
    let dark = (0..grid.width())
        .flat_map(|x| (0..24).map(move |y| (x, y)))
        .filter(|&(x, y)| grid.get_pixel(x, y).0.iter().all(|&c| c < 100))
        .count();
    assert!(dark > 50, "caption row: {dark} dark pixels");
    let out = mae_train(
        d,
        &[
            "visualize",
            "--checkpoint",
            "part/checkpoint-2.safetensors",
            "--image",
            "data/val/circle/0000.png",
            "-o",
            "v.png",
        ],
    );
    assert!(out.contains("v.png"), "{out}");
    let v = image::open(d.join("v.png")).unwrap();
    assert_eq!((v.width(), v.height()), (4 * 112 + 3 * 4, 24 + 112));

    // Fine-tuning from our pretrain checkpoint: decoder dropped, head and fc_norm missing.
    let out = mae_train(
        d,
        &[
            "finetune",
            "--data-path",
            "data",
            "--model",
            "vit_tiny_patch4_28",
            "--depth",
            "1",
            "--finetune",
            "part/checkpoint-2.safetensors",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--output-dir",
            "ft",
        ],
    );
    assert!(out.contains("dropped") && out.contains("decoder"), "{out}");
    assert!(
        out.contains("missing_keys=['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']"),
        "{out}"
    );
    assert!(d.join("ft/checkpoint-0.safetensors").exists());

    // Linear probing from the same checkpoint: stopped and resumed equals one run; the
    // checkpoint keeps upstream's head.0 / head.1 names and `eval` reads it.
    let lp = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "linprobe",
            "--data-path",
            "data",
            "--model",
            "vit_tiny_patch4_28",
            "--depth",
            "1",
            "--finetune",
            "part/checkpoint-2.safetensors",
            "--epochs",
            "3",
            "--warmup-epochs",
            "1",
            "--batch-size",
            "16",
            "--device",
            "cpu",
            "--output-dir",
            out,
        ];
        args.extend_from_slice(extra);
        mae_train(d, &args)
    };
    let out = lp("lp-full", &[]);
    assert!(
        out.contains("missing_keys=['head.0.num_batches_tracked', 'head.0.running_mean', 'head.0.running_var', 'head.1.bias', 'head.1.weight']"),
        "{out}"
    );
    lp("lp-part", &["--stop-after", "2"]);
    let resumed = lp("lp-part", &["--resume", "lp-part/checkpoint-1.safetensors"]);
    assert!(resumed.contains("Resume checkpoint"), "{resumed}");
    let a = checkpoint::load(&d.join("lp-full/checkpoint-2.safetensors")).unwrap();
    let b = checkpoint::load(&d.join("lp-part/checkpoint-2.safetensors")).unwrap();
    for name in [
        "head.1.weight",
        "head.1.bias",
        "head.0.running_mean",
        "head.0.running_var",
    ] {
        let (va, vb) = (a.tensors[name].to_f32_vec(), b.tensors[name].to_f32_vec());
        let worst = va
            .iter()
            .zip(&vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-6,
            "{name}: resumed linear probe differs by {worst}"
        );
    }
    let enc_a = a.tensors["blocks.0.attn.qkv.weight"].to_f32_vec();
    let pre = checkpoint::load(&d.join("part/checkpoint-2.safetensors")).unwrap();
    assert_eq!(
        enc_a,
        pre.tensors["blocks.0.attn.qkv.weight"].to_f32_vec(),
        "the encoder stays frozen"
    );
    let ev = mae_train(
        d,
        &[
            "eval",
            "--resume",
            "lp-full/checkpoint-2.safetensors",
            "--data-path",
            "data",
            "--split",
            "val",
            "--device",
            "cpu",
            "--output",
            "lp-val.json",
        ],
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("lp-val.json")).unwrap()).unwrap();
    let logged = a.meta.unwrap().metrics["acc1"];
    assert_eq!(
        m["acc1"].as_f64().unwrap(),
        logged,
        "eval of the folded head reproduces the accuracy logged in training\n{ev}"
    );
}
