//! The whole toolchain on one checkpoint: `mae-train` fine-tunes and evaluates, `mae-export`
//! writes the ONNX model, `mae-run` evaluates it with tract and with ONNX Runtime, and both tools
//! must give the same predictions on the same images.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use mae_tests::TestCommand;

/// Probabilities of PyTorch (mae-train) and of the exported model may differ by this much.
const TOL: f32 = 1e-4;

/// One CSV row of a `--predictions` file: the predicted class and the probabilities.
#[derive(Debug)]
struct Row {
    prediction: String,
    probs: Vec<f32>,
}

/// Reads the `prediction` and `p<k>` columns of a predictions CSV (quoted fields hold no commas
/// here: class names are single words).
fn read_predictions(path: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let pred_col = header.iter().position(|h| *h == "prediction").unwrap();
    let prob_cols: Vec<usize> = (0..header.len())
        .filter(|&i| header[i].starts_with('p') && header[i][1..].parse::<usize>().is_ok())
        .collect();
    assert!(!prob_cols.is_empty(), "{}: no p<k> columns", path.display());
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), header.len(), "{}: row {l}", path.display());
            Row {
                prediction: f[pred_col].trim_matches('"').to_string(),
                probs: prob_cols.iter().map(|&i| f[i].parse().unwrap()).collect(),
            }
        })
        .collect()
}

fn compare(what: &str, train: &[Row], run: &[Row]) {
    assert_eq!(train.len(), run.len(), "{what}: row counts");
    let mut worst = 0f32;
    for (i, (a, b)) in train.iter().zip(run).enumerate() {
        assert_eq!(a.probs.len(), b.probs.len(), "{what}: row {i} width");
        for (x, y) in a.probs.iter().zip(&b.probs) {
            worst = worst.max((x - y).abs());
        }
        let margin = {
            let mut p = a.probs.clone();
            p.sort_by(|x, y| y.total_cmp(x));
            p[0] - p.get(1).copied().unwrap_or(0.0)
        };
        // A tie within the tolerance may break either way; anything clearer must agree.
        if margin > 2.0 * TOL {
            assert_eq!(
                a.prediction, b.prediction,
                "{what}: row {i}: mae-train {a:?} vs mae-run {b:?}"
            );
        }
    }
    assert!(
        worst <= TOL,
        "{what}: probabilities differ by up to {worst:.3e} (tolerance {TOL})"
    );
    println!(
        "{what}: {} rows, max |Δp| {worst:.2e}, predictions identical",
        train.len()
    );
}

#[test]
fn train_export_run_give_the_same_predictions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("data");
    TestCommand::new("mae-train", dir)
        .args(["synth", "--per-class", "12", "--size", "28", "--output"])
        .args([&data])
        .stdout();
    TestCommand::new("mae-train", dir)
        .args([
            "finetune",
            "--model",
            "vit_tiny_patch4_28",
            "--depth",
            "2",
            "--epochs",
            "2",
            "--warmup-epochs",
            "1",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--smoothing",
            "0",
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
    let ck = dir.join("run/checkpoint-1.safetensors");
    assert!(ck.exists(), "no checkpoint at {}", ck.display());
    same_predictions(dir, &data, &ck, "finetune");
    model_card(dir, &ck);
    static_int8(dir, &data, &ck);
    quantized_by_onnx_runtime(dir, &data);

    // A linear probe (BatchNorm + linear head, folded on export and on evaluation).
    TestCommand::new("mae-train", dir)
        .args([
            "linprobe",
            "--model",
            "vit_tiny_patch4_28",
            "--depth",
            "2",
            "--epochs",
            "2",
            "--warmup-epochs",
            "1",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--output-dir",
            "lp",
            "--data-path",
        ])
        .args([&data])
        .stdout();
    same_predictions(
        dir,
        &data,
        &dir.join("lp/checkpoint-1.safetensors"),
        "linprobe",
    );
}

/// A file nobody here wrote: the float32 export quantized by ONNX Runtime's own
/// `quantize_static` (QDQ, per-channel int8 weights, uint8 activations, attention's products
/// included). The file records its inner values' shapes with a symbolic batch, and tract must
/// still load it for one image; its probabilities must follow ONNX Runtime's on the same file
/// within 1e-3 (measured: 1.2e-7; tract's own graph, `MAE_TRACT_REWRITES=none`, 1.4e-2).
fn quantized_by_onnx_runtime(dir: &Path, data: &Path) {
    let script = r#"
import sys
import numpy as np
from onnxruntime.quantization import (quantize_static, QuantFormat, QuantType,
                                      CalibrationDataReader)
rng = np.random.default_rng(0)
class Reader(CalibrationDataReader):
    def __init__(self):
        self.it = iter([{"pixel_values": rng.standard_normal((1, 3, 28, 28)).astype(np.float32)}
                        for _ in range(16)])
    def get_next(self):
        return next(self.it, None)
quantize_static(sys.argv[1], sys.argv[2], Reader(), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
import onnx
m = onnx.load(sys.argv[2])
print(sum(n.op_type == "DequantizeLinear" for n in m.graph.node), len(m.graph.value_info))
"#;
    let out = std::process::Command::new(mae_tests::python())
        .current_dir(dir)
        .args(["-c", script, "finetune.onnx", "ort-quantized.onnx"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "quantize_static: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts: Vec<usize> = stdout
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert!(
        counts[0] > 0 && counts[1] > 0,
        "quantize_static wrote {stdout}"
    );
    let rows = |backend: &str| -> Vec<Row> {
        let csv = format!("ort-quantized-{backend}.csv");
        TestCommand::new("mae-run", dir)
            .args([
                "eval",
                "--model",
                "ort-quantized.onnx",
                "--backend",
                backend,
            ])
            .args(["--split", "test", "--predictions", &csv, "--data-path"])
            .args([data])
            .stdout();
        read_predictions(&dir.join(csv))
    };
    let (tract, ort) = (rows("tract"), rows("ort"));
    assert_eq!(tract.len(), 12);
    let mut worst = 0f32;
    for (i, (a, b)) in tract.iter().zip(&ort).enumerate() {
        for (x, y) in a.probs.iter().zip(&b.probs) {
            worst = worst.max((x - y).abs());
        }
        let mut p = b.probs.clone();
        p.sort_by(|x, y| y.total_cmp(x));
        if p[0] - p[1] > 0.1 {
            assert_eq!(
                a.prediction, b.prediction,
                "row {i}: tract {a:?} vs ONNX Runtime {b:?}"
            );
        }
    }
    assert!(
        worst <= 1e-3,
        "tract and ONNX Runtime differ by up to {worst} on the same file"
    );
    println!("quantized by ONNX Runtime: 12 rows, max |Δp| tract vs ONNX Runtime {worst:.2e}");
}

/// Static int8 (`--int8 --calibration-data`): a standard QDQ graph that onnx's checker, ONNX
/// Runtime and tract accept, whose activation ranges come from the calibration images (more
/// images can only widen each range) and whose predictions follow the float32 model's.
fn static_int8(dir: &Path, data: &Path, ck: &Path) {
    let export = |out: &str, images: &str, split: &str| -> String {
        TestCommand::new("mae-export", dir)
            .args(["--onnx", "--int8", "--output", out, "--checkpoint"])
            .args([ck])
            .args(["--calibration-images", images, "--calibration-data"])
            .args([data.join(split)])
            .stdout()
    };
    let out = export("static.onnx", "64", "test");
    // 2 blocks × (qkv, proj, fc1, fc2) + head; the test split has 12 images.
    assert!(
        out.contains("calibrated 9 linear inputs on 12 of 12 images"),
        "{out}"
    );
    // A plain folder of images, without class folders.
    let out = export("static-plain.onnx", "64", "test/circle");
    assert!(out.contains("on 4 of 4 images"), "{out}");
    export("static-1.onnx", "1", "test");
    export("static-train.onnx", "9", "train");
    let refused = |extra: &[&str]| -> String {
        TestCommand::new("mae-export", dir)
            .args(["--onnx", "--output", "refused.onnx", "--checkpoint"])
            .args([ck])
            .args(extra)
            .fails()
    };
    let err = refused(&["--int8", "--calibration-data", "nowhere"]);
    assert!(err.contains("nowhere: no such file"), "{err}");
    let err = refused(&["--calibration-data", "test"]);
    assert!(err.contains("--int8"), "{err}");
    let err = refused(&["--int8", "--calibration-data", "finetune.onnx"]);
    assert!(
        err.contains("expected a MedMNIST .npz file or a folder"),
        "{err}"
    );
    assert!(!dir.join("refused.onnx").exists());

    let script = r#"
import json, sys
import numpy as np, onnx
from onnx import numpy_helper
def params(path):
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    ops = [n.op_type for n in m.graph.node]
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    scales = {k[:-len('.input_scale')]: float(v) for k, v in init.items() if k.endswith('.input_scale')}
    zeros = {k[:-len('.input_zero_point')]: int(v) for k, v in init.items() if k.endswith('.input_zero_point')}
    meta = {p.key: p.value for p in m.metadata_props}
    return dict(ops=ops, scales=scales, zeros=zeros,
                zero_dtypes=sorted({str(init[k + '.input_zero_point'].dtype) for k in zeros}),
                weight_dtypes=sorted({str(v.dtype) for k, v in init.items() if k.endswith('.weight_quantized')}),
                q=json.loads(meta['mae.quantization']))
print(json.dumps({p: params(p) for p in sys.argv[1:]}))
"#;
    let out = std::process::Command::new(mae_tests::python())
        .current_dir(dir)
        .args([
            "-c",
            script,
            "static.onnx",
            "static-1.onnx",
            "static-train.onnx",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let all = &j["static.onnx"];
    let ops: Vec<&str> = all["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    let count = |op: &str| ops.iter().filter(|o| **o == op).count();
    assert_eq!(count("QuantizeLinear"), 9, "{ops:?}");
    assert_eq!(
        count("DequantizeLinear"),
        18,
        "activations and weights: {ops:?}"
    );
    assert_eq!(count("DynamicQuantizeLinear") + count("MatMulInteger"), 0);
    assert_eq!(all["zero_dtypes"], serde_json::json!(["uint8"]));
    assert_eq!(all["weight_dtypes"], serde_json::json!(["int8"]));
    assert_eq!(all["q"]["method"], "static");
    assert_eq!(all["q"]["calibration"]["images"], 12);
    assert_eq!(all["q"]["calibration"]["data"], "test");
    // Ranges are min-max over the images: the 12-image ranges hold the 1-image ranges, so no
    // scale shrinks, and some grow; other images give other ranges.
    let scales = |f: &str| -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> = j[f]["scales"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, s)| (k.clone(), s.as_f64().unwrap()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let (s12, s1, strain) = (
        scales("static.onnx"),
        scales("static-1.onnx"),
        scales("static-train.onnx"),
    );
    assert_eq!(s12.len(), 9);
    let mut grew = 0;
    for ((layer, a), (_, b)) in s12.iter().zip(&s1) {
        assert!(*a > 0.0 && *b > 0.0, "{layer}: scales {a}, {b}");
        assert!(a >= b, "{layer}: 12 images give scale {a} < 1 image's {b}");
        grew += usize::from(a > b);
    }
    assert!(grew > 0, "one image and twelve gave the same ranges");
    assert_ne!(
        s12, strain,
        "the training images gave the test images' ranges"
    );
    assert!(
        j["static.onnx"]["zeros"]["blocks.0.mlp.fc2"]
            .as_i64()
            .unwrap()
            < 128,
        "fc2's input follows GELU (≥ −0.17): its zero point is near the bottom"
    );

    // Calibrated on the images it is then run on, nothing is clipped: the predictions follow
    // the float32 model's in both engines.
    let fp32 = read_predictions(&dir.join("finetune-run-ort.csv"));
    for backend in ["ort", "tract"] {
        let csv = format!("static-{backend}.csv");
        TestCommand::new("mae-run", dir)
            .args(["eval", "--model", "static.onnx", "--backend", backend])
            .args(["--split", "test", "--predictions", &csv, "--data-path"])
            .args([data])
            .stdout();
        let q = read_predictions(&dir.join(&csv));
        assert_eq!(q.len(), fp32.len());
        let same = q
            .iter()
            .zip(&fp32)
            .filter(|(a, b)| a.prediction == b.prediction)
            .count();
        let worst = q
            .iter()
            .zip(&fp32)
            .flat_map(|(a, b)| a.probs.iter().zip(&b.probs).map(|(x, y)| (x - y).abs()))
            .fold(0f32, f32::max);
        println!(
            "static int8 {backend}: {same}/{} agree, max |Δp| {worst:.3}",
            q.len()
        );
        assert!(
            same + 1 >= q.len(),
            "static int8 {backend}: {same}/{} agree",
            q.len()
        );
        assert!(worst < 0.1, "static int8 {backend}: max |Δp| {worst}");
    }
}

/// The model card, from `mae-export --card` and from `mae-run info --card`: the same fields,
/// filled from the checkpoint (data summary, validation metrics), the command line (intended
/// use, modality) and `mae-train eval`'s test metrics (written by `same_predictions`).
fn model_card(dir: &Path, ck: &Path) {
    let out = TestCommand::new("mae-export", dir)
        .args(["--onnx", "--output", "card.onnx", "--card", "card.md"])
        .args([
            "--intended-use",
            "Sorting synthetic shapes; a test of the card.",
        ])
        .args(["--modality", "synthetic drawings"])
        .args(["--test-metrics", "finetune-train.json", "--checkpoint"])
        .args([ck])
        .stdout();
    assert!(out.contains("wrote the model card card.md"), "{out}");
    let exported = std::fs::read_to_string(dir.join("card.md")).unwrap();
    let printed = TestCommand::new("mae-run", dir)
        .args(["info", "--model", "card.onnx", "--card"])
        .stdout();
    assert_eq!(exported, printed, "both tools write the same card");
    let test: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("finetune-train.json")).unwrap())
            .unwrap();
    let sha = mae_models::digest::sha256_file(&dir.join("card.onnx")).unwrap();
    for needle in [
        "## Model details".to_string(),
        "| architecture | vit_tiny_patch4_28 |".into(),
        "| classes | circle, square, triangle |".into(),
        "Sorting synthetic shapes; a test of the card.".into(),
        "| source | `data` |".into(),
        "| training images | 36 (the whole train split) |".into(),
        "circle: 12 (33.3%), square: 12 (33.3%), triangle: 12 (33.3%)".into(),
        "| validation images | 12 |".into(),
        "| `data` val (model selection) | 12 |".into(),
        // ACC as recorded: a fraction (mae-train eval --output).
        format!(
            "| `data` test | 12 | {:.4} |",
            test["acc1"].as_f64().unwrap()
        ),
        "Not calibrated".into(),
        "`pixel_values: float [batch, 3, 28, 28]`".into(),
        format!("| model SHA-256 | `{sha}` |"),
        format!("| trained with | mae-train {} |", env!("CARGO_PKG_VERSION")),
        "trained on synthetic drawings images only".into(),
    ] {
        assert!(
            exported.contains(&needle),
            "{needle} not in the card:\n{exported}"
        );
    }
    // Writing to a file instead of standard output.
    TestCommand::new("mae-run", dir)
        .args(["info", "--model", "card.onnx", "--card", "again.md"])
        .stdout();
    assert_eq!(
        std::fs::read_to_string(dir.join("again.md")).unwrap(),
        exported
    );
}

/// `mae-train eval`, `mae-export` and `mae-run eval` (tract and ONNX Runtime) on one checkpoint
/// agree on every test image.
fn same_predictions(dir: &Path, data: &Path, ck: &Path, tag: &str) {
    let onnx = format!("{tag}.onnx");

    TestCommand::new("mae-train", dir)
        .args([
            "eval",
            "--device",
            "cpu",
            "--split",
            "test",
            "--predictions",
            &format!("{tag}-train.csv"),
            "--output",
            &format!("{tag}-train.json"),
            "--resume",
        ])
        .args([ck])
        .args(["--data-path"])
        .args([data])
        .stdout();

    let export = TestCommand::new("mae-export", dir)
        .args(["--onnx", "--output", &onnx, "--checkpoint"])
        .args([ck])
        .stdout();
    // The trainer stored probe outputs, so the export's self-check compares against them.
    assert!(
        export.contains("vs the checkpoint's probe outputs"),
        "{export}"
    );

    let train = read_predictions(&dir.join(format!("{tag}-train.csv")));
    assert_eq!(
        train.len(),
        3 * 4,
        "synth holds out max(per_class / 4, 4) images per class"
    );
    let train_metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("{tag}-train.json"))).unwrap(),
    )
    .unwrap();
    for backend in ["tract", "ort"] {
        let csv = format!("{tag}-run-{backend}.csv");
        let json = format!("{tag}-run-{backend}.json");
        TestCommand::new("mae-run", dir)
            .args([
                "eval",
                "--model",
                &onnx,
                "--backend",
                backend,
                "--split",
                "test",
                "--format",
                "json",
                "--output",
                &json,
                "--predictions",
                &csv,
                "--data-path",
            ])
            .args([data])
            .stdout();
        compare(
            &format!("{tag} {backend}"),
            &train,
            &read_predictions(&dir.join(&csv)),
        );
        let run: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(&json)).unwrap()).unwrap();
        assert_eq!(
            run["metrics"]["acc1"], train_metrics["acc1"],
            "{backend}: top-1 accuracy of mae-run vs mae-train"
        );
        assert_eq!(
            run["metrics"]["confusion"], train_metrics["confusion"],
            "{backend}: confusion matrices"
        );
    }
}
