//! `--data-path DATA.zip`: an ImageFolder tree read in place from a zip archive gives the
//! data sets of the unzipped tree, so a fine-tune on the zip ends with the weights of the same
//! run on the folder; `eval`, `linprobe` and `pretrain` read the zip too, and `pretrain` takes
//! every image of an archive without splits.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::Path;

use common::{mae_train, max_weight_diff};
use mae_trainer::data;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

/// Zips every file under `root` (sorted), each named `top` + its path below `root`.
fn zip_tree(root: &Path, zip_path: &Path, top: &str) {
    let mut files = Vec::new();
    data::collect_images(root, &mut files).unwrap();
    files.sort();
    let mut zip = ZipWriter::new(std::fs::File::create(zip_path).unwrap());
    let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    for f in files {
        let name = f.strip_prefix(root).unwrap().to_str().unwrap();
        zip.start_file(format!("{top}{name}"), opts).unwrap();
        zip.write_all(&std::fs::read(&f).unwrap()).unwrap();
    }
    zip.finish().unwrap();
}

const FINETUNE: &[&str] = &[
    "finetune",
    "--model",
    "vit_tiny_patch4_28",
    "--depth",
    "1",
    "--batch-size",
    "16",
    "--epochs",
    "2",
    "--warmup-epochs",
    "1",
    "--num-workers",
    "2",
    "--seed",
    "5",
    "--device",
    "cpu",
];

#[test]
fn a_zipped_tree_trains_as_the_folder_does() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    mae_train(
        d,
        &[
            "synth",
            "--output",
            "data",
            "--per-class",
            "8",
            "--size",
            "28",
        ],
    );
    zip_tree(&d.join("data"), &d.join("data.zip"), "data/");

    // The data sets: same classes, items, labels and pixels, named below the archive.
    for split in ["train", "val", "test"] {
        let folder = data::open(&d.join("data"), split).unwrap();
        let zipped = data::open(&d.join("data.zip"), split).unwrap();
        assert_eq!(zipped.class_names, folder.class_names);
        assert_eq!(zipped.task, folder.task);
        assert_eq!(zipped.len(), folder.len());
        for (z, f) in zipped.items.iter().zip(&folder.items) {
            assert_eq!(z.labels, f.labels);
            let below = |n: &str, root: &str| n.split_once(root).unwrap().1.to_string();
            assert_eq!(below(&z.name, "data.zip/data/"), below(&f.name, "/data/"));
            assert!(z.image().unwrap() == f.image().unwrap(), "{}", z.name);
        }
    }

    // One seeded fine-tune on each: the same weights.
    for (data_path, out) in [("data", "ft-folder"), ("data.zip", "ft-zip")] {
        let mut args = FINETUNE.to_vec();
        args.extend(["--data-path", data_path, "--output-dir", out]);
        mae_train(d, &args);
    }
    let diff = max_weight_diff(
        &d.join("ft-folder/checkpoint-1.safetensors"),
        &d.join("ft-zip/checkpoint-1.safetensors"),
    );
    assert_eq!(diff, 0.0, "fine-tunes on the folder and on its zip differ");

    let out = mae_train(
        d,
        &[
            "eval",
            "--resume",
            "ft-zip/checkpoint-1.safetensors",
            "--data-path",
            "data.zip",
            "--split",
            "test",
            "--device",
            "cpu",
        ],
    );
    assert!(out.contains("acc@1") && out.contains("12 samples"), "{out}");
    mae_train(
        d,
        &[
            "linprobe",
            "--data-path",
            "data.zip",
            "--model",
            "vit_tiny_patch4_28",
            "--depth",
            "1",
            "--finetune",
            "ft-zip/checkpoint-1.safetensors",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--device",
            "cpu",
            "--output-dir",
            "lp",
        ],
    );
    assert!(d.join("lp/checkpoint-0.safetensors").exists());

    // Pretraining: the train split of a tree, or every image of an archive without splits.
    let train = data::open(&d.join("data.zip"), "train").unwrap();
    let pretrain_set = mae_trainer::cmd::pretrain::open_unlabeled(&d.join("data.zip")).unwrap();
    assert_eq!(pretrain_set.len(), train.len());
    zip_tree(&d.join("data/val"), &d.join("flat.zip"), "");
    let flat = mae_trainer::cmd::pretrain::open_unlabeled(&d.join("flat.zip")).unwrap();
    assert_eq!(
        flat.len(),
        data::open(&d.join("data"), "val").unwrap().len()
    );
    mae_train(
        d,
        &[
            "pretrain",
            "--data-path",
            "flat.zip",
            "--model",
            "mae_vit_tiny_patch4_28",
            "--depth",
            "1",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "--device",
            "cpu",
            "--output-dir",
            "pt",
        ],
    );
    assert!(d.join("pt/checkpoint-0.safetensors").exists());
}

#[test]
fn a_damaged_zip_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    mae_train(
        d,
        &[
            "synth",
            "--output",
            "data",
            "--per-class",
            "4",
            "--size",
            "16",
        ],
    );
    zip_tree(&d.join("data"), &d.join("data.zip"), "");
    let bytes = std::fs::read(d.join("data.zip")).unwrap();
    std::fs::write(d.join("cut.zip"), &bytes[..bytes.len() / 2]).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mae-train"))
        .current_dir(d)
        .args(FINETUNE)
        .args(["--data-path", "cut.zip", "--output-dir", "x"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cut.zip") && !err.contains("panicked"),
        "{err}"
    );
}
