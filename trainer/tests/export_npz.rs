//! `mae-train export-npz`: a `.npz` written out as an ImageFolder tree reads back, through the
//! shared ImageFolder reader, as the same pixels and labels, for grayscale and RGB sets; a
//! failed export leaves nothing behind.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{mae_train, npz_split, write_npz};
use mae_models::input::ImageFolder;
use mae_models::npz::read_split;

/// Reads `root/split` as an ImageFolder and checks it against the `.npz` split: every image,
/// in the order of the file, with its label.
fn assert_round_trip(npz: &Path, root: &Path, split: &str, class_names: &[&str]) {
    let want = read_split(npz, split).unwrap();
    let tree = ImageFolder::open(&root.join(split)).unwrap();
    assert_eq!(tree.classes, class_names, "{split}");
    assert_eq!(tree.samples.len(), want.images.len(), "{split}");
    // Files are named by their index in the split; within a class they sort in that order.
    let mut got: Vec<(usize, usize, image::RgbImage)> = tree
        .samples
        .iter()
        .map(|(p, label)| {
            let stem = p.file_stem().unwrap().to_str().unwrap();
            (stem.parse().unwrap(), *label, tree.load(p).unwrap())
        })
        .collect();
    got.sort_by_key(|g| g.0);
    for (i, label, img) in got {
        assert_eq!(label as i64, want.labels[i][0], "{split}[{i}] label");
        assert!(img == want.images[i], "{split}[{i}]: pixels differ");
    }
}

#[test]
fn npz_exports_to_an_image_folder_that_reads_back_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let grey = d.join("grey.npz");
    write_npz(
        &grey,
        &[
            npz_split("train", 23, 28, 28, 1, 2, 1),
            npz_split("val", 7, 28, 28, 1, 2, 2),
            npz_split("test", 9, 28, 28, 1, 2, 3),
        ],
    );
    let out = mae_train(
        d,
        &["export-npz", "--data-path", "grey.npz", "--output", "grey"],
    );
    assert!(
        out.contains("wrote 39 images (23 train, 7 val, 9 test; classes 0, 1) of 28×28 grayscale"),
        "{out}"
    );
    for split in ["train", "val", "test"] {
        assert_round_trip(&grey, &d.join("grey"), split, &["0", "1"]);
    }
    // Grayscale stays one channel; names are six digits.
    let png = image::open(d.join("grey/train/1/000001.png")).unwrap();
    assert_eq!(png.color(), image::ColorType::L8);

    // RGB, eleven classes (default names sort in label order), chosen splits and names.
    let rgb = d.join("rgb.npz");
    write_npz(
        &rgb,
        &[
            npz_split("train", 30, 12, 10, 3, 11, 4),
            npz_split("val", 22, 12, 10, 3, 11, 5),
        ],
    );
    mae_train(
        d,
        &["export-npz", "--data-path", "rgb.npz", "--output", "rgb"],
    );
    let names: Vec<String> = (0..11).map(|i| format!("{i:02}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_round_trip(&rgb, &d.join("rgb"), "train", &names);
    assert_round_trip(&rgb, &d.join("rgb"), "val", &names);
    let png = image::open(d.join("rgb/val/03/000003.png")).unwrap();
    assert_eq!(png.color(), image::ColorType::Rgb8);
    mae_train(
        d,
        &[
            "export-npz",
            "--data-path",
            "grey.npz",
            "--output",
            "named",
            "--splits",
            "val",
            "--class-names",
            "normal,pneumonia",
        ],
    );
    assert_round_trip(&grey, &d.join("named"), "val", &["normal", "pneumonia"]);
    assert!(!d.join("named/train").exists());
}

#[test]
fn refused_exports_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_npz(&d.join("x.npz"), &[npz_split("train", 4, 8, 8, 1, 2, 1)]);
    let fail = |args: &[&str], says: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_mae-train"))
            .current_dir(d)
            .args(["export-npz", "--data-path", "x.npz", "--output", "out"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{err}");
        assert!(!d.join("out").exists());
        let left: Vec<_> = std::fs::read_dir(d).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "{left:?}");
    };
    fail(&["--class-names", "b,a"], "sorted order");
    fail(&["--class-names", "a"], "2 classes");
    fail(&["--splits", "val"], "no split 'val'");
}
