//! `mae-train pretrain` end to end: a tiny run on generated images, stopped and resumed,
//! then fine-tuned and linearly probed from its checkpoint; `visualize` writes a PNG of the
//! expected size; `pretrain --init` continues pretraining from a checkpoint on other images.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

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

/// A tiny pretraining run on CPU from `data` into `out`; `extra` holds (flag, value) pairs,
/// replacing the shared flag's value where it has one.
fn tiny_pretrain(data: &str, out: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "pretrain",
        "--model",
        "mae_vit_tiny_patch4_28",
        "--depth",
        "1",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--num-workers",
        "2",
        "--norm-pix-loss",
        "--device",
        "cpu",
        "--data-path",
        data,
        "--output-dir",
        out,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for pair in extra.chunks(2) {
        match args.iter().position(|a| a == pair[0]) {
            Some(i) => args[i + 1] = pair[1].to_string(),
            None => args.extend(pair.iter().map(|s| s.to_string())),
        }
    }
    args
}

/// The `train_loss` of the first line of a run's `log.txt`, and that line's epoch.
fn first_logged(d: &Path, run: &str) -> (f64, u64) {
    let log = std::fs::read_to_string(d.join(run).join("log.txt")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    (
        first["train_loss"].as_f64().unwrap(),
        first["epoch"].as_u64().unwrap(),
    )
}

/// Runs `mae-train` expecting a refusal; returns its standard error.
fn refused(d: &Path, args: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mae-train"))
        .current_dir(d)
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && !err.contains("panicked"),
        "{args:?}: {err}"
    );
    err
}

#[test]
fn pretrain_init_continues_from_a_checkpoint_on_other_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (out, seed) in [("src-data", "0"), ("target-data", "1")] {
        mae_train(
            d,
            &[
                "synth",
                "--output",
                out,
                "--per-class",
                "16",
                "--size",
                "28",
                "--seed",
                seed,
            ],
        );
    }
    let run = |args: Vec<String>| {
        let v: Vec<&str> = args.iter().map(String::as_str).collect();
        mae_train(d, &v)
    };
    run(tiny_pretrain("src-data", "src", &["--lr", "2e-3"]));
    let ck = "src/checkpoint-0.safetensors";

    // With a zero learning rate the first epoch's loss is that of the starting weights, and
    // the weights saved after it are those the run started from.
    let out = run(tiny_pretrain(
        "target-data",
        "init",
        &["--init", ck, "--lr", "0"],
    ));
    assert!(out.contains("<All keys matched successfully>"), "{out}");
    run(tiny_pretrain("target-data", "fresh", &["--lr", "0"]));
    let src = checkpoint::load(&d.join(ck)).unwrap();
    let init = checkpoint::load(&d.join("init/checkpoint-0.safetensors")).unwrap();
    assert_eq!(src.tensors.len(), init.tensors.len());
    for (name, t) in &src.tensors {
        assert_eq!(
            t.to_f32_vec(),
            init.tensors[name].to_f32_vec(),
            "{name}: the run did not start from the --init weights"
        );
    }
    let (init_loss, epoch) = first_logged(d, "init");
    let (fresh_loss, _) = first_logged(d, "fresh");
    assert_eq!(epoch, 0, "--init starts at epoch 0");
    assert!(
        init_loss < fresh_loss,
        "pretrained start {init_loss} is not below a fresh start {fresh_loss}"
    );
    let args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("init/args.json")).unwrap()).unwrap();
    assert_eq!(args["init"], ck);
    assert_eq!(
        args["init_sha256"],
        mae_models::digest::sha256_file(&d.join(ck))
            .unwrap()
            .as_str()
    );

    // Another input size: both position embeddings are resized to the new grid.
    let out = run(tiny_pretrain(
        "target-data",
        "init32",
        &["--init", ck, "--input-size", "32"],
    ));
    for key in ["pos_embed", "decoder_pos_embed"] {
        assert!(
            out.contains(&format!("{key}: position interpolate from 7x7 to 8x8")),
            "{out}"
        );
    }

    // Refused: with --resume, another depth, a classifier.
    let err = refused(
        d,
        &tiny_pretrain(
            "target-data",
            "bad",
            &["--init", ck, "--resume", "init/checkpoint-0.safetensors"],
        ),
    );
    assert!(err.contains("cannot be combined with --resume"), "{err}");
    let err = refused(
        d,
        &tiny_pretrain("target-data", "bad", &["--init", ck, "--depth", "2"]),
    );
    assert!(
        err.contains("depth 1 in the checkpoint, 2 in the model"),
        "{err}"
    );
    mae_train(
        d,
        &[
            "finetune",
            "--data-path",
            "src-data",
            "--model",
            "vit_tiny_patch4_28",
            "--depth",
            "1",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--device",
            "cpu",
            "--output-dir",
            "ft",
        ],
    );
    let err = refused(
        d,
        &tiny_pretrain(
            "target-data",
            "bad",
            &["--init", "ft/checkpoint-0.safetensors"],
        ),
    );
    assert!(err.contains("a classifier checkpoint"), "{err}");
}
