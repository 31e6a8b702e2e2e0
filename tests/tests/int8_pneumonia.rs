//! `mae-export --int8` on real images: a small ViT trained by `mae-train` on PneumoniaMNIST,
//! exported in fp32, dynamic int8 and static int8 (calibrated on 64 training X-rays), gives the
//! same top-1 class on at least 99% of 256 test X-rays and a test AUC within 0.005 of fp32's, in
//! ONNX Runtime and in tract, on every kernel path this CPU runs (`MAE_KERNELS`). Needs
//! `../shared/data/medmnist/pneumoniamnist.npz` (ignored without it).
#![allow(clippy::unwrap_used)]

use std::path::Path;

use mae_tests::{workspace_root, TestCommand};

/// `prediction` column of a `mae-run eval --predictions` CSV.
fn predictions(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == "prediction").unwrap();
    lines
        .map(|l| l.split(',').nth(col).unwrap().trim_matches('"').to_string())
        .collect()
}

#[test]
#[cfg_attr(
    not(has_shared_data),
    ignore = "needs ../shared/data/medmnist/pneumoniamnist.npz"
)]
fn int8_keeps_the_top1_class_on_real_xrays() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = workspace_root().join("../shared/data/medmnist/pneumoniamnist.npz");
    TestCommand::new("mae-train", dir)
        .args([
            "finetune",
            "--model",
            "vit_tiny_patch4_28",
            "--depth",
            "2",
            "--layer-decay",
            "1.0",
            "--epochs",
            "4",
            "--warmup-epochs",
            "1",
            "--train-samples",
            "1200",
            "--batch-size",
            "32",
            "--lr",
            "2e-3",
            "--aa",
            "none",
            "--reprob",
            "0",
            "--device",
            "cpu",
            "--output-dir",
            "run",
            "--data-path",
        ])
        .args([&data])
        .stdout();
    let calibrated = [
        "--int8",
        "--calibration-images",
        "64",
        "--calibration-data",
        data.to_str().unwrap(),
    ];
    for (extra, out) in [
        (&[][..], "f.onnx"),
        (&["--int8"][..], "q.onnx"),
        (&calibrated[..], "s.onnx"),
    ] {
        TestCommand::new("mae-export", dir)
            .args(["--onnx", "--checkpoint", "run/checkpoint-3.safetensors"])
            .args(extra)
            .args(["--output", out])
            .stdout();
    }
    let n = 256;
    // The predicted classes and the test AUC.
    let run = |model: &str, backend: &str| -> (Vec<String>, f64) {
        // `tract@avx2`: tract with MAE_KERNELS=avx2.
        let (backend, path) = backend.split_once('@').unwrap_or((backend, "auto"));
        let csv = format!("{model}-{backend}-{path}.csv");
        let json = format!("{model}-{backend}-{path}.json");
        let mut cmd = TestCommand::new("mae-run", dir);
        cmd.command().env("MAE_KERNELS", path);
        cmd.args(["eval", "--model", model, "--backend", backend])
            .args(["--split", "test", "--limit", "256", "--predictions", &csv])
            .args(["--format", "json", "--output", &json, "--data-path"])
            .args([&data])
            .stdout();
        let p = predictions(&dir.join(&csv));
        assert_eq!(p.len(), n, "{csv}");
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(&json)).unwrap()).unwrap();
        let auc = j["metrics"]["auc"].as_f64().unwrap();
        (p, auc)
    };
    let (fp32, fp32_auc) = run("f.onnx", "ort");
    // Agreement alone says little when a model gives every image one class; the AUC follows
    // the ranking of every image's probability.
    assert!(
        fp32_auc > 0.6,
        "the fp32 model ranks the X-rays no better than chance: AUC {fp32_auc}"
    );
    let paths = mae_runtime::kernels::select::Path::NAMED
        .into_iter()
        .filter(|p| p.available())
        .map(|p| format!("tract@{}", p.name()));
    let backends: Vec<String> = ["ort".to_string()].into_iter().chain(paths).collect();
    for (model, what) in [("q.onnx", "dynamic"), ("s.onnx", "static")] {
        for backend in &backends {
            let (q, auc) = run(model, backend);
            let same = fp32.iter().zip(&q).filter(|(a, b)| a == b).count();
            println!(
                "{what} int8 {backend}: top-1 agreement with fp32 {same}/{n}, AUC {auc:.5} \
                 against {fp32_auc:.5}"
            );
            assert!(
                same * 100 >= 99 * n,
                "{what} int8 {backend}: top-1 agrees on only {same} of {n} X-rays"
            );
            assert!(
                (auc - fp32_auc).abs() <= 0.005,
                "{what} int8 {backend}: AUC {auc} against fp32's {fp32_auc}"
            );
        }
    }
    let size = |f: &str| std::fs::metadata(dir.join(f)).unwrap().len();
    for q in ["q.onnx", "s.onnx"] {
        assert!(
            size(q) * 3 < size("f.onnx"),
            "{q}: int8 file is not smaller"
        );
    }
}
