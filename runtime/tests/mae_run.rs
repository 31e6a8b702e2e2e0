//! `mae-run` against PyTorch, through tract and ONNX Runtime: the same probabilities on the same
//! pixel tensors, the same predictions on image, DICOM and .npz inputs, and clean errors.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use mae_runtime::engine::model::MetaOverrides;
use mae_runtime::engine::settings::{BackendKind, Device, LoadOptions, Parallel, TractSettings};
use mae_runtime::engine::Engine;

const MODELS: [&str; 3] = ["multiclass", "binary", "multilabel"];
const BACKENDS: [BackendKind; 2] = [BackendKind::Tract, BackendKind::Ort];

fn options(kind: BackendKind) -> LoadOptions {
    LoadOptions {
        kind,
        device: Device::Cpu,
        threads: 2,
        parallel: Parallel::Auto,
        ort_lib: Some(ort_lib()),
        tract: TractSettings::default(),
    }
}

fn engine(model: &str, kind: BackendKind) -> Engine {
    engine_with(model, &options(kind))
}

fn engine_with(model: &str, opts: &LoadOptions) -> Engine {
    Engine::load(
        &fixtures().join(format!("{model}.onnx")),
        None,
        &MetaOverrides::default(),
        opts,
    )
    .unwrap_or_else(|e| panic!("{model} on {:?}: {e:#}", opts.kind))
}

/// `e`'s probabilities and logits on `model`'s reference tensor equal PyTorch's, at the
/// reference batch and (the same rows, the batch dimension being dynamic) at batch 1.
fn check_against_pytorch(e: &mut Engine, model: &str, what: &str) {
    let r = &reference()["tensor"][model];
    let x = read_f32(&fixtures().join(format!("tensor_{model}.f32")));
    let batch = r["batch"].as_u64().unwrap() as usize;
    let raw = e.run_raw(&x, batch).unwrap();
    let dp = assert_close(
        &format!("{what} probabilities"),
        raw.probabilities.as_ref().unwrap(),
        &floats(&r["probabilities"]),
        PROB_TOL,
    );
    let dl = assert_close(
        &format!("{what} logits"),
        raw.logits.as_ref().unwrap(),
        &floats(&r["logits"]),
        LOGIT_TOL,
    );
    eprintln!("{what}: max |Δp| {dp:.2e}, max |Δlogit| {dl:.2e}");
    let len = e.image_len();
    let one = e.probabilities(&x[..len], 1).unwrap();
    assert_close(
        &format!("{what} batch 1"),
        &one[0],
        &floats(&r["probabilities"])[..one[0].len()],
        PROB_TOL,
    );
}

#[test]
fn probabilities_match_pytorch_on_the_same_tensors() {
    // tract with each matrix product over 2 threads, and with the batch of 4 split over 3
    // single-threaded runs (2 + 1 + 1 images); ONNX Runtime.
    let configs = [
        (BackendKind::Tract, Parallel::Ops, 2),
        (BackendKind::Tract, Parallel::Images, 3),
        (BackendKind::Ort, Parallel::Auto, 2),
    ];
    for (kind, parallel, threads) in configs {
        for model in MODELS {
            let opts = LoadOptions {
                parallel,
                threads,
                ..options(kind)
            };
            let mut e = engine_with(model, &opts);
            assert!(
                kind != BackendKind::Tract
                    || e.describe_backend().contains(match parallel {
                        Parallel::Images => "parallel over images",
                        _ => "parallel over operators",
                    }),
                "{}",
                e.describe_backend()
            );
            let what = format!("{model} {kind:?} {parallel:?} {threads} threads");
            check_against_pytorch(&mut e, model, &what);
        }
    }
}

#[test]
fn file_predictions_match_pytorch() {
    let files = reference()["files"]["multiclass"].as_object().unwrap();
    let inputs: Vec<PathBuf> = ["images", "dicom"]
        .iter()
        .map(|d| fixtures().join(d))
        .collect();
    for kind in BACKENDS {
        for model in MODELS {
            let mut e = engine(model, kind);
            let (rows, failures) =
                mae_runtime::cmd::predict::predict_all(&mut e, &inputs, "test", None, 3, 2, 2)
                    .unwrap();
            assert!(failures.is_empty(), "{failures:?}");
            assert_eq!(rows.len(), files.len());
            for row in rows {
                let rel = Path::new(&row.input)
                    .strip_prefix(fixtures())
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string();
                let want = floats(&reference()["files"][model][&rel]);
                let tol = if rel.ends_with(".jpg") {
                    JPEG_PROB_TOL
                } else {
                    PROB_TOL
                };
                let got = &row.prediction.probabilities;
                let d = assert_close(&format!("{model} {kind:?} {rel}"), got, &want, tol);
                if rel.ends_with(".jpg") {
                    eprintln!("{model} {kind:?} {rel}: max |Δp| {d:.2e} (JPEG decoder)");
                }
                if model != "multilabel" {
                    let argmax = mae_models::metrics::argmax(&want);
                    let top = &row.prediction.top[0];
                    assert_eq!(top.index, argmax, "{model} {kind:?} {rel}");
                }
            }
        }
    }
}

/// Every kernel path this CPU runs, forced by name (`MAE_KERNELS`), gives PyTorch's
/// probabilities and logits, at batch 4 and batch 1, with its products on that path's tiles.
#[test]
fn every_kernel_path_matches_pytorch() {
    use mae_runtime::kernels::select::Path;
    let paths: Vec<Path> = Path::NAMED.into_iter().filter(|p| p.available()).collect();
    eprintln!("paths this CPU runs: {paths:?}");
    for path in paths {
        for model in MODELS {
            let opts = LoadOptions {
                tract: TractSettings {
                    kernels: path,
                    ..TractSettings::default()
                },
                ..options(BackendKind::Tract)
            };
            let mut e = engine_with(model, &opts);
            let described = e.describe_backend();
            assert!(
                described.contains(&format!("MAE_KERNELS={} (forced)", path.name()))
                    && described.contains("linear products on mae-run's packed kernel"),
                "{described}"
            );
            check_against_pytorch(&mut e, model, &format!("{model} on {}", path.name()));
        }
    }
}

#[test]
fn kernel_paths_are_reported_and_a_bad_one_is_refused() {
    use mae_runtime::kernels::select::Path;
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("multiclass.onnx");
    let run = |path: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_mae-run"))
            .args(args)
            .current_dir(dir.path())
            .env("MAE_KERNELS", path)
            .output()
            .unwrap()
    };
    let info = ["info", "--model", p(&model)];
    let o = run("portable", &info);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("\ncpu        "), "{out}");
    assert!(
        out.contains("kernels    tract: MAE_KERNELS=portable (forced): float32 products and attention portable, int8 products portable"),
        "{out}"
    );
    let bench = [
        "bench",
        "--model",
        p(&model),
        "--batch-size",
        "1",
        "--iterations",
        "2",
        "--warmup",
        "0",
        "--format",
        "json",
    ];
    for path in Path::NAMED.into_iter().filter(|p| p.available()) {
        let o = run(path.name(), &bench);
        assert!(o.status.success(), "{}: {}", path.name(), stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["kernels"]["asked"], path.name());
        assert!(v["cpu"]["features"].is_array(), "{v}");
        let f32 = v["kernels"]["f32_products"].as_str().unwrap();
        assert!(
            path.name().contains(f32) || (path == Path::AvxVnni && f32 == "avx2"),
            "{v}"
        );
    }
    // A name that is no path, and (where this CPU lacks one) a path it cannot run.
    let o = run("avx1024", &bench);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("MAE_KERNELS=\"avx1024\""),
        "{}",
        stderr(&o)
    );
    for path in Path::NAMED.into_iter().filter(|p| !p.available()) {
        let o = run(path.name(), &bench);
        assert!(!o.status.success());
        assert!(stderr(&o).contains("this CPU lacks"), "{}", stderr(&o));
    }
}

#[test]
fn info_shows_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("binary.onnx");
    let o = mae_run(dir.path(), &["info", "--model", p(&model)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for needle in [
        "pixel_values: float [batch, 3, 28, 28]",
        "logits: float [batch, 2]",
        "probabilities: float [batch, 2]",
        "ai.onnx 17",
        "task       binary · 2 classes: normal, pneumonia",
        "resize 32 (bicubic), crop 28",
        "mae.arch = vit_test_tiny",
    ] {
        assert!(out.contains(needle), "'{needle}' missing from:\n{out}");
    }
    let o = mae_run(
        dir.path(),
        &["info", "--model", p(&model), "--format", "json"],
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(v["mae"]["preprocess"]["input_size"], 28);
    assert_eq!(v["metadata"]["mae.task"], "binary");
    assert!(v["cpu"]["features"].is_array(), "{v}");
    assert!(v["tract_kernels"]["f32_products"].is_string(), "{v}");
}

#[test]
fn predict_formats_and_provenance() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("multiclass.onnx");
    let sha = mae_runtime::inputs::sha256_hex(&std::fs::read(&model).unwrap());
    let images = fixtures().join("images");
    let dicom = fixtures().join("dicom/ct16.dcm");
    for backend in ["tract", "ort"] {
        let lib = ort_lib();
        let base = [
            "predict",
            "--model",
            p(&model),
            "--backend",
            backend,
            "--ort-lib",
            p(&lib),
            p(&images),
            p(&dicom),
        ];
        // CSV to a file, written atomically.
        let csv = dir.path().join(format!("{backend}.csv"));
        let mut args = base.to_vec();
        args.extend(["--format", "csv", "--output", p(&csv), "--top-k", "2"]);
        let o = mae_run(dir.path(), &args);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = std::fs::read_to_string(&csv).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "input,class,probability,p_cat,p_dog,p_bird,input_sha256,model_sha256,arch"
        );
        assert_eq!(lines.len(), 1 + 6);
        assert!(lines[1..]
            .iter()
            .all(|l| l.ends_with(&format!("{sha},vit_test_tiny"))));
        assert!(stderr(&o).contains("6 predicted, 0 failed"));
        // JSON lines on standard output.
        let mut args = base.to_vec();
        args.extend(["--format", "jsonl"]);
        let o = mae_run(dir.path(), &args);
        let rows: Vec<serde_json::Value> = stdout(&o)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 6);
        let ct = rows
            .iter()
            .find(|r| r["input"].as_str().unwrap().ends_with("ct16.dcm"))
            .unwrap();
        let want = floats(&reference()["files"]["multiclass"]["dicom/ct16.dcm"]);
        assert_close("ct16 jsonl", &floats(&ct["probabilities"]), &want, PROB_TOL);
        assert_eq!(ct["model_sha256"], sha.as_str());
        // JSON document.
        let mut args = base.to_vec();
        args.extend(["--format", "json"]);
        let o = mae_run(dir.path(), &args);
        let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(doc["model"]["sha256"], sha.as_str());
        assert_eq!(doc["predictions"].as_array().unwrap().len(), 6);
    }
}

#[test]
fn unreadable_inputs_are_counted_and_the_rest_predicted() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let bad_dcm = dir.path().join("broken.dcm");
    std::fs::write(&bad_dcm, b"garbage").unwrap();
    let missing = dir.path().join("missing.jpg");
    let good = fixtures().join("images/rgb.png");
    let model = fixtures().join("multiclass.onnx");
    let audit = dir.path().join("audit.jsonl");
    let o = mae_run(
        dir.path(),
        &[
            "predict",
            "--model",
            p(&model),
            p(&bad),
            p(&good),
            p(&missing),
            p(&bad_dcm),
            "--audit-log",
            p(&audit),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("1 predicted, 3 failed"), "{err}");
    for name in ["broken.png", "missing.jpg", "broken.dcm"] {
        // Named once: `failed: NAME: reason`, never `NAME: NAME: reason`.
        assert_eq!(
            err.matches(name).count(),
            1,
            "{name} not reported once:\n{err}"
        );
    }
    assert!(err.contains("broken.dcm: cannot read DICOM image"), "{err}");
    assert!(!err.contains("panicked"));
    assert!(stdout(&o).contains("rgb.png"));
    let log = std::fs::read_to_string(&audit).unwrap();
    let line: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(log.lines().count(), 1);
    assert!(line["input"].as_str().unwrap().ends_with("rgb.png"));
    assert_eq!(
        line["input_sha256"],
        mae_runtime::inputs::sha256_hex(&std::fs::read(&good).unwrap()).as_str()
    );
    assert!(line["time"].is_string() && line["model_sha256"].is_string());
}

/// `mae-run predict DIR | head -1`: the reader closes the pipe before `mae-run` writes, and
/// `mae-run` ends quietly with status 0 as Unix tools do.
#[test]
fn a_closed_stdout_pipe_ends_predict_quietly() {
    use std::process::{Command, Stdio};
    let model = fixtures().join("multiclass.onnx");
    let images = fixtures().join("images");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mae-run"))
        .args(["predict", "--model", p(&model), p(&images)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Closing the read end before the model is loaded makes every write fail with EPIPE.
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "status {:?}:\n{err}", o.status);
    assert!(!err.contains("error") && !err.contains("panicked"), "{err}");

    // The same through a shell pipeline, whose status is mae-run's with pipefail.
    let script = format!(
        "set -o pipefail; '{}' predict --model '{}' '{}' | head -1",
        env!("CARGO_BIN_EXE_mae-run"),
        p(&model),
        p(&images)
    );
    let o = Command::new("bash").args(["-c", &script]).output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "status {:?}:\n{err}", o.status);
    assert!(!err.contains("error") && !err.contains("panicked"), "{err}");
    assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));
}

#[test]
fn eval_on_npz_matches_pytorch_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("binary.onnx");
    let data = fixtures().join("data.npz");
    let r = &reference()["npz"];
    for backend in ["tract", "ort"] {
        let lib = ort_lib();
        let preds = dir.path().join(format!("{backend}.csv"));
        let o = mae_run(
            dir.path(),
            &[
                "eval",
                "--model",
                p(&model),
                "--data-path",
                p(&data),
                "--backend",
                backend,
                "--ort-lib",
                p(&lib),
                "--format",
                "json",
                "--predictions",
                p(&preds),
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let acc = v["summary"]["acc1"].as_f64().unwrap();
        let auc = v["summary"]["auc"].as_f64().unwrap();
        assert!(
            (acc - r["acc1"].as_f64().unwrap()).abs() < 1e-9,
            "{backend} acc {acc}"
        );
        assert!(
            (auc - r["auc"].as_f64().unwrap()).abs() < 1e-9,
            "{backend} auc {auc}"
        );
        assert_eq!(v["metrics"]["samples"], 48);
        // Per-sample probabilities equal PyTorch's.
        let want = floats(&r["probabilities"]);
        let got: Vec<f32> = std::fs::read_to_string(&preds)
            .unwrap()
            .lines()
            .skip(1)
            .flat_map(|l| {
                let f: Vec<&str> = l.rsplitn(3, ',').collect();
                [f[1].parse::<f32>().unwrap(), f[0].parse::<f32>().unwrap()]
            })
            .collect();
        assert_close(
            &format!("{backend} eval probabilities"),
            &got,
            &want,
            PROB_TOL,
        );
    }
    // The table.
    let o = mae_run(
        dir.path(),
        &["eval", "--model", p(&model), "--data-path", p(&data)],
    );
    let out = stdout(&o);
    assert!(
        out.contains("acc@1") && out.contains("confusion matrix"),
        "{out}"
    );
    assert!(out.contains("pneumonia"), "{out}");
}

/// `eval --data-path TREE.zip` reads an ImageFolder tree in place from its zip (here inside one
/// top folder, as downloaded archives hold it) and gives what the unzipped tree gives.
#[test]
fn eval_reads_a_zipped_imagefolder_tree_as_the_tree() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("binary.onnx");
    let split = mae_models::npz::read_split(&fixtures().join("data.npz"), "test").unwrap();
    let root = dir.path().join("tree");
    let zipped = dir.path().join("tree.zip");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&zipped).unwrap());
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (i, (img, label)) in split.images.iter().zip(&split.labels).enumerate() {
        let class = ["normal", "pneumonia"][label[0] as usize];
        let rel = format!("test/{class}/{i:03}.png");
        let file = root.join(&rel);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        img.save(&file).unwrap();
        zip.start_file(format!("data/{rel}"), options).unwrap();
        zip.write_all(&std::fs::read(&file).unwrap()).unwrap();
    }
    zip.finish().unwrap();
    let eval = |data: &Path, preds: &Path| {
        let o = mae_run(
            dir.path(),
            &[
                "eval",
                "--model",
                p(&model),
                "--data-path",
                p(data),
                "--split",
                "test",
                "--format",
                "json",
                "--predictions",
                p(preds),
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        // Each prediction row from its input's file name on (the folder differs).
        let rows: Vec<String> = std::fs::read_to_string(preds)
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.rsplit_once('/').unwrap().1.to_string())
            .collect();
        (v["summary"].clone(), v["metrics"].clone(), rows)
    };
    let tree = eval(&root, &dir.path().join("tree.csv"));
    let from_zip = eval(&zipped, &dir.path().join("zip.csv"));
    assert_eq!(tree.2.len(), split.images.len());
    assert_eq!(tree, from_zip);
}

#[test]
fn predict_on_npz_splits() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("binary.onnx");
    let data = fixtures().join("data.npz");
    let o = mae_run(
        dir.path(),
        &[
            "predict",
            "--model",
            p(&model),
            p(&data),
            "--split",
            "val",
            "--format",
            "jsonl",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 40);
    assert!(lines[0].contains("data.npz:val[0]"));
}

#[test]
fn calibrate_writes_temperature_and_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("binary.onnx");
    let data = fixtures().join("data.npz");
    let out = dir.path().join("calibrated.onnx");
    let o = mae_run(
        dir.path(),
        &[
            "calibrate",
            "--model",
            p(&model),
            "--data-path",
            p(&data),
            "--output",
            p(&out),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let report = stdout(&o);
    assert!(
        report.contains("temperature") && report.contains("Youden"),
        "{report}"
    );
    let file = mae_runtime::engine::model::ModelFile::read(&out).unwrap();
    let t: f64 = file.prop("temperature").unwrap().parse().unwrap();
    let thr: f64 = file.prop("threshold").unwrap().parse().unwrap();
    assert!(t > 0.0 && (0.0..=1.0).contains(&thr), "{t} {thr}");
    assert_eq!(file.prop("task"), Some("binary"));
    // predict applies it, and says so; both backends agree.
    let mut results = Vec::new();
    for backend in ["tract", "ort"] {
        let lib = ort_lib();
        let o = mae_run(
            dir.path(),
            &[
                "predict",
                "--model",
                p(&out),
                "--backend",
                backend,
                "--ort-lib",
                p(&lib),
                p(&fixtures().join("images/rgb.png")),
                "--format",
                "json",
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains("applying the model's calibration"));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        results.push(floats(&v["predictions"][0]["probabilities"]));
        assert!((v["model"]["temperature"].as_f64().unwrap() - t).abs() < 1e-12);
    }
    assert_close(
        "calibrated tract vs ort",
        &results[0],
        &results[1],
        PROB_TOL,
    );
    // The calibrated probabilities are softmax(logits / T) of the original logits.
    let mut e = engine("binary", BackendKind::Tract);
    let img = mae_models::input::load(&fixtures().join("images/rgb.png")).unwrap();
    let x = mae_models::imaging::preprocess_eval(&img, &e.meta.preprocess);
    let raw = e.run_raw(&x, 1).unwrap();
    let want = mae_runtime::engine::activate(
        raw.logits.as_ref().unwrap(),
        2,
        mae_models::checkpoint::Task::Binary,
        t as f32,
    );
    assert_close("temperature applied", &results[0], &want, PROB_TOL);
}

#[test]
fn models_without_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let img = fixtures().join("images/rgb.png");
    let o = mae_run(
        dir.path(),
        &[
            "predict",
            "--model",
            p(&fixtures().join("nometa.onnx")),
            p(&img),
        ],
    );
    assert_fails_with(&o, "--input-size");
    let o = mae_run(
        dir.path(),
        &[
            "predict",
            "--model",
            p(&fixtures().join("nometa.onnx")),
            p(&img),
            "--input-size",
            "32",
            "--class-names",
            "cat,dog,bird",
            "--format",
            "jsonl",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let want = floats(&reference()["files"]["multiclass"]["images/rgb.png"]);
    assert_close("nometa", &floats(&v["probabilities"]), &want, PROB_TOL);
    // Keys without the `mae.` prefix are read too.
    let o = mae_run(
        dir.path(),
        &[
            "predict",
            "--model",
            p(&fixtures().join("barekeys.onnx")),
            p(&img),
            "--format",
            "jsonl",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_close("barekeys", &floats(&v["probabilities"]), &want, PROB_TOL);
    assert!(v["class"].is_string());
}

#[test]
fn bad_invocations_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let img = fixtures().join("images/rgb.png");
    let model = fixtures().join("multiclass.onnx");
    let not_onnx = dir.path().join("model.onnx");
    std::fs::write(&not_onnx, b"this is not a protobuf \xff\xff\xff\xff").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["predict", "--model", "nope.onnx", p(&img)],
            "does not exist",
        ),
        (
            vec!["predict", "--model", p(&not_onnx), p(&img)],
            "not an ONNX model",
        ),
        (
            vec!["predict", "--model", p(&img), p(&img)],
            "not an ONNX model",
        ),
        (
            vec![
                "predict",
                "--model",
                p(&model),
                "--expect-sha256",
                "00",
                p(&img),
            ],
            "not the expected",
        ),
        (
            vec![
                "predict",
                "--model",
                p(&model),
                "--backend",
                "ort",
                "--ort-lib",
                "/nonexistent/libonnxruntime.so",
                p(&img),
            ],
            "libonnxruntime.so",
        ),
        (
            vec!["predict", "--model", p(&model), "--device", "cuda", p(&img)],
            "--backend ort --device cuda",
        ),
        (vec!["info", "--model", p(&not_onnx)], "not an ONNX model"),
        (
            vec!["eval", "--model", p(&model), "--data-path", p(&img)],
            "not a .npz",
        ),
    ];
    for (args, needle) in cases {
        let o = mae_run(dir.path(), &args);
        assert_fails_with(&o, needle);
    }
    // A wrong file given as ORT_DYLIB_PATH.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mae-run"))
        .args(["predict", "--model", p(&model), "--backend", "ort", p(&img)])
        .env("ORT_DYLIB_PATH", p(&img))
        .output()
        .unwrap();
    assert_fails_with(&o, "ONNX Runtime");
}

#[test]
fn cuda_requested_without_a_gpu_is_an_error_and_auto_falls_back() {
    if std::path::Path::new("/dev/nvidia0").exists() {
        eprintln!("a GPU is present: see the ignored CUDA test instead");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = fixtures().join("images/rgb.png");
    let model = fixtures().join("multiclass.onnx");
    let lib = ort_lib();
    let base = [
        "predict",
        "--model",
        p(&model),
        "--backend",
        "ort",
        "--ort-lib",
        p(&lib),
        p(&img),
    ];
    let mut args = base.to_vec();
    args.extend(["--device", "cuda"]);
    assert_fails_with(&mae_run(dir.path(), &args), "CUDA");
    let mut args = base.to_vec();
    args.extend(["--device", "auto"]);
    let o = mae_run(dir.path(), &args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("running on the CPU"), "{}", stderr(&o));
}

#[test]
fn onnx_runtime_is_found_in_the_project_virtualenv() {
    // Run from the workspace: the .venv above the current folder is searched.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let model = fixtures().join("multiclass.onnx");
    let img = fixtures().join("images/rgb.png");
    let o = mae_run(
        root,
        &["predict", "--model", p(&model), "--backend", "ort", p(&img)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn bench_reports_figures() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("multiclass.onnx");
    let o = mae_run(
        dir.path(),
        &[
            "bench",
            "--model",
            p(&model),
            "--batch-size",
            "1,4",
            "--iterations",
            "5",
            "--warmup",
            "1",
            "--format",
            "json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["batches"].as_array().unwrap().len(), 2);
    assert!(v["batches"][1]["images_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);
    assert!(v["load_ms"].as_f64().unwrap() > 0.0);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_matches_cpu() {
    let lib = std::env::var_os("MAE_ORT_GPU_LIB")
        .map(PathBuf::from)
        .unwrap_or_else(ort_lib);
    for model in MODELS {
        let mut e = Engine::load(
            &fixtures().join(format!("{model}.onnx")),
            None,
            &MetaOverrides::default(),
            &LoadOptions {
                kind: BackendKind::Ort,
                device: Device::Cuda,
                threads: 2,
                parallel: Parallel::Auto,
                ort_lib: Some(lib.clone()),
                tract: TractSettings::default(),
            },
        )
        .unwrap();
        let r = &reference()["tensor"][model];
        let x = read_f32(&fixtures().join(format!("tensor_{model}.f32")));
        let raw = e.run_raw(&x, 4).unwrap();
        assert_close(
            &format!("{model} CUDA"),
            raw.probabilities.as_ref().unwrap(),
            &floats(&r["probabilities"]),
            1e-3,
        );
    }
}

// ---- serve ---------------------------------------------------------------------------------

mod http {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    /// A `mae-run serve` child on a free loopback port, killed on drop.
    pub struct Served {
        pub child: Child,
        pub addr: String,
        /// The line that names the address.
        pub banner: String,
    }

    impl Served {
        pub fn start(args: &[&str]) -> Served {
            let mut child = Command::new(env!("CARGO_BIN_EXE_mae-run"))
                .arg("serve")
                .args(args)
                .args(["--listen", "127.0.0.1:0"])
                .stderr(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
            let (addr, banner) = loop {
                let line = lines
                    .next()
                    .expect("serve exited before listening")
                    .unwrap();
                if let Some(rest) = line.split("http://").nth(1) {
                    break (rest.split_whitespace().next().unwrap().to_string(), line);
                }
            };
            // Keep draining stderr so the child never blocks on it.
            std::thread::spawn(move || for _ in lines {});
            Served {
                child,
                addr,
                banner,
            }
        }
    }

    impl Drop for Served {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// One HTTP/1.1 request; returns (status, body).
    /// `n` clients each POSTing `png` to `/v1/predict` at once; each thread yields its status.
    pub fn post_concurrently(
        addr: &str,
        png: &[u8],
        n: usize,
    ) -> Vec<std::thread::JoinHandle<u16>> {
        (0..n)
            .map(|_| {
                let (addr, png) = (addr.to_string(), png.to_vec());
                std::thread::spawn(move || {
                    request(&addr, "POST", "/v1/predict", "image/png", &png).0
                })
            })
            .collect()
    }

    pub fn request(
        addr: &str,
        method: &str,
        path: &str,
        ctype: &str,
        body: &[u8],
    ) -> (u16, Vec<u8>) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {ctype}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        // The server may answer (413) before reading everything.
        let _ = s.write_all(body);
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        let text = String::from_utf8_lossy(&resp);
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
        let split = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(resp.len(), |i| i + 4);
        let mut body = resp[split..].to_vec();
        if text
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        (status, body)
    }

    fn dechunk(mut b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
                return out;
            };
            let n =
                usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
            b = &b[eol + 2 + n + 2..];
        }
    }
}

fn json_of(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

#[test]
fn serve_answers_concurrent_clients_and_reports_errors_with_a_worker_per_thread() {
    serve_answers_concurrent_clients_and_reports_errors(&["--threads", "2"], "2 model workers");
}

#[test]
fn serve_answers_concurrent_clients_and_reports_errors_in_batches() {
    let ops = ["--threads", "2", "--parallel", "ops"];
    serve_answers_concurrent_clients_and_reports_errors(&ops, "max batch 8");
    serve_answers_concurrent_clients_and_reports_errors(&["--threads", "1"], "max batch 8");
}

/// 8 clients at once, several images, bad requests and the metrics, against a server started
/// with `extra`, whose start-up line says `running` (how it runs the model).
fn serve_answers_concurrent_clients_and_reports_errors(extra: &[&str], running: &str) {
    let model = fixtures().join("multiclass.onnx");
    let mut args = vec!["--model", p(&model), "--max-body-bytes", "200000"];
    args.extend(extra);
    let s = http::Served::start(&args);
    assert!(s.banner.contains(running), "{}", s.banner);
    let addr = s.addr.clone();
    let (code, body) = http::request(&addr, "GET", "/healthz", "text/plain", b"");
    assert_eq!(code, 200);
    assert_eq!(json_of(&body)["status"], "ok");
    let (code, body) = http::request(&addr, "GET", "/v1/model", "text/plain", b"");
    assert_eq!(code, 200);
    let doc = json_of(&body);
    assert_eq!(doc["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(doc["class_names"][2], "bird");

    let files = [
        "images/rgb.png",
        "images/small.bmp",
        "dicom/ct16.dcm",
        "dicom/rgb.dcm",
    ];
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                for i in 0..4 {
                    let f = files[(t + i) % files.len()];
                    let bytes = std::fs::read(fixtures().join(f)).unwrap();
                    let (code, body) = http::request(
                        &addr,
                        "POST",
                        "/v1/predict",
                        "application/octet-stream",
                        &bytes,
                    );
                    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
                    let v = json_of(&body);
                    let want = floats(&reference()["files"]["multiclass"][f]);
                    assert_close(
                        f,
                        &floats(&v["predictions"][0]["probabilities"]),
                        &want,
                        PROB_TOL,
                    );
                    assert_eq!(v["model"]["arch"], "vit_test_tiny");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }

    // Several images as multipart.
    let mut body = Vec::new();
    for f in ["images/rgb.png", "dicom/rgb.dcm"] {
        body.extend_from_slice(
            format!(
                "--BOUND\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{f}\"\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend(std::fs::read(fixtures().join(f)).unwrap());
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--BOUND--\r\n");
    let (code, resp) = http::request(
        &addr,
        "POST",
        "/v1/predict?top_k=3",
        "multipart/form-data; boundary=BOUND",
        &body,
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&resp));
    let v = json_of(&resp);
    assert_eq!(v["predictions"].as_array().unwrap().len(), 2);
    assert_eq!(v["predictions"][1]["name"], "dicom/rgb.dcm");
    assert_eq!(v["predictions"][0]["top"].as_array().unwrap().len(), 3);

    // Garbage → 400 with a message; too large → 413; unknown → 404.
    let (code, resp) = http::request(&addr, "POST", "/v1/predict", "image/png", b"garbage bytes");
    assert_eq!(code, 400);
    assert!(json_of(&resp)["error"].as_str().unwrap().contains("image"));
    let (code, _) = http::request(
        &addr,
        "POST",
        "/v1/predict",
        "image/png",
        &vec![0u8; 300_000],
    );
    assert_eq!(code, 413);
    let (code, _) = http::request(&addr, "GET", "/nope", "text/plain", b"");
    assert_eq!(code, 404);

    // /metrics is Prometheus text.
    let (code, body) = http::request(&addr, "GET", "/metrics", "text/plain", b"");
    assert_eq!(code, 200);
    let text = String::from_utf8(body).unwrap();
    let mut samples = 0;
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# ") {
            assert!(
                rest.starts_with("HELP ") || rest.starts_with("TYPE "),
                "{line}"
            );
            continue;
        }
        let (name, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
        let bare = name.split('{').next().unwrap();
        assert!(
            bare.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        if let Some(labels) = name.strip_prefix(bare) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "{line}"
            );
        }
        samples += 1;
    }
    assert!(samples > 10);
    assert!(
        text.contains("mae_requests_total{route=\"/v1/predict\",code=\"200\"} 33"),
        "{text}"
    );
    assert!(
        text.contains("mae_requests_total{route=\"/v1/predict\",code=\"413\"} 1"),
        "{text}"
    );
    assert!(text.contains("mae_images_total 34"), "{text}");
}

#[test]
fn serve_saturation_gives_503() {
    let model = fixtures().join("multiclass.onnx");
    let s = http::Served::start(&[
        "--model",
        p(&model),
        "--queue-size",
        "1",
        "--max-batch",
        "1",
        "--workers",
        "12",
        "--debug-delay-ms",
        "400",
    ]);
    let bytes = std::fs::read(fixtures().join("images/rgb.png")).unwrap();
    let handles = http::post_concurrently(&s.addr, &bytes, 10);
    let codes: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(codes.iter().all(|&c| c == 200 || c == 503), "{codes:?}");
    assert!(codes.contains(&503), "{codes:?}");
    assert!(codes.contains(&200), "{codes:?}");
}

#[test]
fn serve_sigterm_loses_no_accepted_request() {
    let model = fixtures().join("multiclass.onnx");
    let mut s = http::Served::start(&[
        "--model",
        p(&model),
        "--max-batch",
        "2",
        "--debug-delay-ms",
        "300",
    ]);
    let bytes = std::fs::read(fixtures().join("images/rgb.png")).unwrap();
    let handles = http::post_concurrently(&s.addr, &bytes, 6);
    std::thread::sleep(std::time::Duration::from_millis(150));
    let pid = s.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let codes: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(codes, vec![200; 6]);
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
