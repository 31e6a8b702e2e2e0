//! `mae-export --onnx` end to end: tiny timm ViTs made by PyTorch are exported through the
//! binary, and the ONNX files are checked with onnx.checker (full), ONNX Runtime and tract
//! against PyTorch's outputs.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;
use mae_models::checkpoint::Task;
use mae_models::preprocess::{IMAGENET_MEAN, IMAGENET_STD};
use mae_models::probe::probe_batch;

fn probe(size: usize) -> Vec<f32> {
    probe_batch(PROBE_SEED, BATCH, 3, size)
}

/// Compares tract (batch 1 and 5) and ONNX Runtime (batch 1 and 5) logits with PyTorch's.
fn check_logits(
    what: &str,
    onnx: &Path,
    ort: &serde_json::Value,
    r: &Reference,
    output: &str,
    want: &[f32],
) {
    let s = r.case.cfg.img_size;
    let xs = probe(s);
    let got = tract_run(onnx, &[BATCH, 3, s, s], &xs);
    assert_close(
        &format!("{what}: tract batch {BATCH}"),
        &got[0],
        want,
        TOL_FP32,
    );
    let got = tract_run(onnx, &[1, 3, s, s], &first_images(&xs, 1));
    let n = want.len() / BATCH;
    assert_close(
        &format!("{what}: tract batch 1"),
        &got[0],
        &want[..n],
        TOL_FP32,
    );
    let runs = ort["runs"].as_array().unwrap();
    assert_close(
        &format!("{what}: ORT batch {BATCH}"),
        &floats(&runs[0][output]),
        want,
        TOL_FP32,
    );
    assert_close(
        &format!("{what}: ORT batch 1"),
        &floats(&runs[1][output]),
        &want[..n],
        TOL_FP32,
    );
}

fn ort_inputs(dir: &Path, s: usize) -> Vec<serde_json::Value> {
    let one = dir.join(format!("probe1_{s}.f32"));
    write_f32(&one, &first_images(&probe(s), 1));
    vec![
        ort_input(&probe_file(dir, s), &[BATCH, 3, s, s], "float32"),
        ort_input(&one, &[1, 3, s, s], "float32"),
    ]
}

fn softmax_rows(logits: &[f32], c: usize) -> Vec<f32> {
    logits
        .chunks(c)
        .flat_map(|row| {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = row.iter().map(|v| (v - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.into_iter().map(move |v| v / s)
        })
        .collect()
}

#[test]
fn our_checkpoints_match_pytorch_in_tract_and_onnx_runtime() {
    let f = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // (case, task, extra flags, file)
    let exports: [(&str, Task, &[&str], &str); 5] = [
        ("gp28", Task::MultiClass, &[], "gp28.onnx"),
        ("cls28", Task::MultiLabel, &[], "cls28.onnx"),
        ("gp32p8", Task::Binary, &[], "gp32p8.onnx"),
        (
            "gp28",
            Task::MultiClass,
            &["--opset", "13"],
            "gp28_opset13.onnx",
        ),
        (
            "cls28",
            Task::MultiLabel,
            &["--opset", "21"],
            "cls28_opset21.onnx",
        ),
    ];
    let mut jobs = Vec::new();
    for (name, task, flags, file) in exports {
        let r = f.get(name);
        let ck = dir.join(format!("{name}.safetensors"));
        our_checkpoint(r, &ck, task, 0.0);
        let mut args = vec![
            "--onnx",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--output",
            file,
        ];
        args.extend_from_slice(flags);
        let stdout = export_ok(dir, &args);
        assert!(
            stdout.contains("max |Δ| vs the checkpoint's probe outputs"),
            "{stdout}"
        );
        jobs.push((dir.join(file), ort_inputs(dir, r.case.cfg.img_size)));
    }
    let reports = ort_check(&jobs);
    for ((name, task, _, file), ort) in exports.iter().zip(&reports) {
        let r = f.get(name);
        let onnx = dir.join(file);
        check_logits(file, &onnx, ort, r, "logits", &r.logits);
        let c = r.case.cfg.num_classes;
        let probs = floats(&ort["runs"][0]["probabilities"]);
        let want: Vec<f32> = if *task == Task::MultiLabel {
            r.logits.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect()
        } else {
            for row in probs.chunks(c) {
                let sum: f32 = row.iter().sum();
                assert!(
                    (sum - 1.0).abs() < 1e-5,
                    "{file}: probabilities sum to {sum}"
                );
            }
            softmax_rows(&r.logits, c)
        };
        assert_close(&format!("{file}: probabilities"), &probs, &want, TOL_FP32);
    }
}

#[test]
fn official_pth_exports_with_model_flag() {
    let f = fixtures();
    let r = f.get("official");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pth = r.pth.to_str().unwrap();
    let stdout = export_ok(
        dir,
        &[
            "--onnx",
            "--checkpoint",
            pth,
            "--model",
            "vit_tiny_patch4_28",
            "--class-names",
            "cat,dog,bird,fish",
        ],
    );
    assert!(stdout.contains("4 classes, global-pool head"), "{stdout}");
    assert!(stdout.contains("no probe outputs"), "{stdout}");
    let onnx = dir.join("model.onnx");
    let reports = ort_check(&[(onnx.clone(), ort_inputs(dir, 28))]);
    check_logits("official", &onnx, &reports[0], r, "logits", &r.logits);
    let meta = &reports[0]["metadata"];
    assert_eq!(meta["mae.class_names"], r#"["cat","dog","bird","fish"]"#);
    assert_eq!(meta["mae.task"], "multi-class");
    assert_eq!(meta["mae.arch"], "vit_tiny_patch4_28");
    assert_eq!(meta["mae.crop_pct"], "0.875");
    assert_eq!(meta["mae.interpolation"], "bicubic");
    let mean: Vec<f32> = serde_json::from_str(meta["mae.mean"].as_str().unwrap()).unwrap();
    let std: Vec<f32> = serde_json::from_str(meta["mae.std"].as_str().unwrap()).unwrap();
    assert_eq!(mean, IMAGENET_MEAN);
    assert_eq!(std, IMAGENET_STD);
    assert_eq!(meta["mae.metrics"], "{}");
    assert!(meta.get("epoch").is_none());
}

#[test]
fn metadata_contract_is_pinned() {
    let f = fixtures();
    let r = f.get("gp28");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ck = dir.join("best.safetensors");
    our_checkpoint(r, &ck, Task::MultiClass, 0.0);
    export_ok(
        dir,
        &[
            "--onnx",
            "--checkpoint",
            "best.safetensors",
            "--output",
            "m.onnx",
        ],
    );
    let rep = &ort_check(&[(dir.join("m.onnx"), ort_inputs(dir, 28))])[0];

    assert_eq!(rep["opset"], 17);
    assert_eq!(rep["ir_version"], 8);
    let float = 1;
    assert_eq!(
        rep["inputs"],
        serde_json::json!([{"name": "pixel_values", "elem_type": float, "shape": ["batch", 3, 28, 28]}])
    );
    assert_eq!(
        rep["outputs"],
        serde_json::json!([
            {"name": "logits", "elem_type": float, "shape": ["batch", 3]},
            {"name": "probabilities", "elem_type": float, "shape": ["batch", 3]},
        ])
    );
    let meta = rep["metadata"].as_object().unwrap();
    let mut keys: Vec<&str> = meta.keys().map(String::as_str).collect();
    keys.sort();
    let mut want: Vec<&str> = mae_exporter::metadata::KEYS.to_vec();
    // Optional keys this checkpoint has the facts for: its epoch and its writer.
    want.extend(["mae.epoch", "mae.trainer_version"]);
    want.sort();
    assert_eq!(keys, want);
    let writer = mae_models::checkpoint::load(&ck)
        .unwrap()
        .meta
        .unwrap()
        .writer;
    assert_eq!(meta["mae.trainer_version"], writer.as_str());
    let sha = mae_exporter::sha256_file(&ck).unwrap();
    let cfg = serde_json::to_string(&r.case.cfg).unwrap();
    let expected = [
        ("mae.format_version", "1"),
        ("mae.output", "logits"),
        ("mae.task", "multi-class"),
        ("mae.class_names", r#"["label 0","label 1","label 2"]"#),
        ("mae.input_name", "pixel_values"),
        ("mae.input_size", "28"),
        ("mae.mean", "[0.485,0.456,0.406]"),
        ("mae.std", "[0.229,0.224,0.225]"),
        ("mae.crop_pct", "0.875"),
        ("mae.interpolation", "bicubic"),
        ("mae.arch", "vit_tiny_patch4_28"),
        ("mae.model_config", cfg.as_str()),
        ("mae.precision", "fp32"),
        ("mae.checkpoint_file", "best.safetensors"),
        ("mae.checkpoint_sha256", sha.as_str()),
        (
            "mae.exporter_version",
            concat!("mae-export ", env!("CARGO_PKG_VERSION")),
        ),
        ("mae.metrics", r#"{"acc1":87.5,"loss":0.25}"#),
        ("mae.epoch", "12"),
    ];
    for (k, v) in expected {
        assert_eq!(meta[k], v, "metadata key {k}");
    }
    assert_eq!(sha.len(), 64);
}

#[test]
fn preprocessing_and_features_exports() {
    let f = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r = f.get("gp28");
    let ck = dir.join("gp28.safetensors");
    our_checkpoint(r, &ck, Task::MultiClass, 0.0);
    let ck = ck.to_str().unwrap();
    export_ok(
        dir,
        &["--onnx", "--checkpoint", ck, "--output", "plain.onnx"],
    );
    export_ok(
        dir,
        &[
            "--onnx",
            "--checkpoint",
            ck,
            "--output",
            "pre.onnx",
            "--with-preprocessing",
        ],
    );

    // Raw uint8 pixels through the graph's normalisation equal normalising outside it.
    let s = 28;
    let pixels: Vec<u8> = probe(s).iter().map(|v| ((v + 2.0) * 63.9) as u8).collect();
    let mut normalised = vec![0f32; pixels.len()];
    for (i, px) in pixels.iter().enumerate() {
        // pixels are NHWC; pixel_values NCHW.
        let (b, y, x, c) = (i / (s * s * 3), i / (s * 3) % s, i / 3 % s, i % 3);
        normalised[((b * 3 + c) * s + y) * s + x] =
            (*px as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
    }
    let want = tract_run(&dir.join("plain.onnx"), &[BATCH, 3, s, s], &normalised);
    let got = tract_run_u8(&dir.join("pre.onnx"), &[BATCH, s, s, 3], &pixels);
    assert_close(
        "with-preprocessing (tract)",
        &got[0],
        &want[0],
        TOL_PREPROCESS,
    );
    let raw = dir.join("pixels.u8");
    std::fs::write(&raw, &pixels).unwrap();

    // A pretrain checkpoint exports its encoder's class-token embedding with --features.
    let enc = f.get("encoder");
    let pre = dir.join("pretrain.safetensors");
    pretrain_checkpoint(enc, &pre);
    let pre = pre.to_str().unwrap();
    let stdout = export_ok(
        dir,
        &[
            "--onnx",
            "--checkpoint",
            pre,
            "--features",
            "--output",
            "f.onnx",
        ],
    );
    assert!(
        stdout.contains("not exported: 1 tensors (mask_token)"),
        "{stdout}"
    );
    // A classifier exports the head's input.
    export_ok(
        dir,
        &[
            "--onnx",
            "--checkpoint",
            ck,
            "--features",
            "--output",
            "gpf.onnx",
        ],
    );

    let jobs = [
        (
            dir.join("pre.onnx"),
            vec![ort_input(&raw, &[BATCH, s, s, 3], "uint8")],
        ),
        (dir.join("f.onnx"), ort_inputs(dir, s)),
        (dir.join("gpf.onnx"), ort_inputs(dir, s)),
    ];
    let reps = ort_check(&jobs);
    assert_close(
        "with-preprocessing (ORT)",
        &floats(&reps[0]["runs"][0]["logits"]),
        &want[0],
        1e-4,
    );
    assert_eq!(reps[0]["inputs"][0]["name"], "image");
    assert_eq!(reps[0]["inputs"][0]["elem_type"], 2, "uint8");
    assert_eq!(reps[0]["metadata"]["mae.input_name"], "image");
    check_logits(
        "features (pretrain)",
        &dir.join("f.onnx"),
        &reps[1],
        enc,
        "features",
        &enc.features,
    );
    check_logits(
        "features (classifier)",
        &dir.join("gpf.onnx"),
        &reps[2],
        r,
        "features",
        &r.features,
    );
    assert_eq!(reps[1]["metadata"]["mae.output"], "features");
    assert_eq!(
        reps[1]["outputs"][0]["shape"],
        serde_json::json!(["batch", 32])
    );
}

/// Every failure names the file at fault and leaves the output folder as it was.
#[test]
fn bad_inputs_fail_cleanly_and_write_nothing() {
    let f = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r = f.get("gp28");
    std::fs::copy(&r.pth, dir.join("tiny.pth")).unwrap();
    std::fs::copy(&f.get("official").pth, dir.join("official.pth")).unwrap();
    let bytes = std::fs::read(&r.pth).unwrap();
    std::fs::write(dir.join("truncated.pth"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(dir.join("garbage.safetensors"), b"not a checkpoint at all").unwrap();
    let ck = checkpoint_without_meta(r, &dir.join("foreign.safetensors"));
    our_checkpoint(
        r,
        &dir.join("wrong_probe.safetensors"),
        Task::MultiClass,
        0.05,
    );
    pretrain_checkpoint(f.get("encoder"), &dir.join("pretrain.safetensors"));
    let before = listing(dir);

    let cases: [(&[&str], &[&str]); 9] = [
        (&["--checkpoint", "missing.pth"], &["missing.pth"]),
        (
            &[
                "--checkpoint",
                "truncated.pth",
                "--model",
                "vit_tiny_patch4_28",
            ],
            &["truncated.pth"],
        ),
        (
            &["--checkpoint", "garbage.safetensors"],
            &["garbage.safetensors"],
        ),
        (&["--checkpoint", &ck], &["foreign.safetensors", "--model"]),
        (
            &["--checkpoint", "tiny.pth", "--model", "vit_base_patch16"],
            &["tiny.pth", "vit_base_patch16", "size mismatch"],
        ),
        (
            &["--checkpoint", "tiny.pth", "--model", "vit_gigantic"],
            &["vit_gigantic", "vit_base_patch16"],
        ),
        (
            &[
                "--checkpoint",
                "official.pth",
                "--model",
                "vit_tiny_patch4_28",
                "--class-names",
                "a,b",
            ],
            &["--class-names gives 2 names", "official.pth has 4 classes"],
        ),
        (
            &["--checkpoint", "pretrain.safetensors"],
            &["pretrain.safetensors", "--features"],
        ),
        (
            &["--checkpoint", "wrong_probe.safetensors"],
            &["probe outputs", "nothing was written"],
        ),
    ];
    for (args, needles) in cases {
        let mut full = vec!["--onnx", "--output", "out.onnx"];
        full.extend_from_slice(args);
        let stderr = export_fails(dir, &full);
        for n in needles {
            assert!(
                stderr.contains(n),
                "mae-export {args:?}: stderr lacks {n:?}:\n{stderr}"
            );
        }
        assert_eq!(
            listing(dir),
            before,
            "mae-export {args:?} left files behind"
        );
    }
}

/// A safetensors file with the right tensors and no metadata (a foreign checkpoint).
fn checkpoint_without_meta(r: &Reference, path: &Path) -> String {
    let ck = mae_models::checkpoint::load(&r.pth).unwrap();
    mae_models::checkpoint::safetensors::write(path, &ck.tensors, None).unwrap();
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// Largest difference relative to the largest reference magnitude.
fn max_rel(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    d / scale
}

fn argmax_rows(xs: &[f32], c: usize) -> Vec<usize> {
    xs.chunks(c)
        .map(|row| (0..c).fold(0, |best, i| if row[i] > row[best] { i } else { best }))
        .collect()
}

fn agreement(a: &[usize], b: &[usize]) -> f32 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f32 / a.len() as f32
}

#[test]
fn fp16_and_int8_exports_run_in_tract_and_onnx_runtime() {
    let f = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r = f.get("official");
    let ck = dir.join("official.safetensors");
    our_checkpoint(r, &ck, Task::MultiClass, 0.0);
    let ck = ck.to_str().unwrap();
    let stdout = export_ok(
        dir,
        &["--onnx", "--checkpoint", ck, "--fp16", "--output", "h.onnx"],
    );
    assert!(
        stdout.contains("max |Δ| vs the checkpoint's probe outputs"),
        "{stdout}"
    );
    // int8 on the 2-block model: tract's int8 path is slow in 256-image batches.
    let small = dir.join("gp28.safetensors");
    our_checkpoint(f.get("gp28"), &small, Task::MultiClass, 0.0);
    let small = small.to_str().unwrap();
    export_ok(
        dir,
        &["--onnx", "--checkpoint", small, "--output", "f.onnx"],
    );
    export_ok(
        dir,
        &[
            "--onnx",
            "--checkpoint",
            small,
            "--int8",
            "--output",
            "q.onnx",
        ],
    );

    // 256 generated images for the int8 top-1 agreement.
    let (n, s, c) = (256, 28, 3);
    let many = probe_batch(11, n, 3, s);
    let many_file = dir.join("many.f32");
    write_f32(&many_file, &many);
    let many_input = ort_input(&many_file, &[n, 3, s, s], "float32");
    let reps = ort_check(&[
        (dir.join("h.onnx"), ort_inputs(dir, s)),
        (dir.join("f.onnx"), vec![many_input.clone()]),
        (dir.join("q.onnx"), vec![many_input]),
    ]);

    // float16: within 1e-2 of PyTorch float32, relative to the largest logit; float32 I/O.
    let h = &reps[0];
    assert_eq!(h["metadata"]["mae.precision"], "fp16");
    assert_eq!(h["inputs"][0]["elem_type"], 1);
    assert_eq!(h["outputs"][0]["elem_type"], 1);
    let tract_h = tract_run(&dir.join("h.onnx"), &[BATCH, 3, s, s], &probe(s));
    for (what, got) in [
        ("tract", &tract_h[0]),
        ("ORT", &floats(&h["runs"][0]["logits"])),
    ] {
        let rel = max_rel(got, &r.logits);
        eprintln!("fp16 {what}: max |Δ| / max |logit| = {rel:.2e}");
        assert!(
            rel <= 1e-2,
            "fp16 {what}: relative difference {rel:e} > 1e-2"
        );
    }

    // int8 against the float32 export (itself equal to PyTorch): logits within 5% of the largest
    // logit, the two runtimes agreeing with each other, and mostly the same top-1. This random
    // 2-block model on noise images has near-ties (top-2 margins of 1e-4), so top-1 agreement
    // here is a guard against a broken graph, not the accuracy of a trained model.
    assert_eq!(reps[2]["metadata"]["mae.precision"], "int8");
    let fp32 = floats(&reps[1]["runs"][0]["logits"]);
    let q_ort = floats(&reps[2]["runs"][0]["logits"]);
    let q_tract = tract_run(&dir.join("q.onnx"), &[n, 3, s, s], &many).remove(0);
    let rel = max_rel(&q_ort, &q_tract);
    eprintln!("int8 ORT vs tract: max |Δ| / max |logit| = {rel:.2e}");
    assert!(rel <= 1e-2, "int8: ORT and tract differ by {rel:e}");
    let top_f = argmax_rows(&fp32, c);
    for (what, q) in [("ORT", &q_ort), ("tract", &q_tract)] {
        let rel = max_rel(q, &fp32);
        let a = agreement(&top_f, &argmax_rows(q, c));
        eprintln!(
            "int8 {what}: max |Δ| / max |logit| = {rel:.2e}, top-1 agreement {:.1}% of {n}",
            a * 100.0
        );
        assert!(
            rel <= 5e-2,
            "int8 {what}: relative difference {rel:e} > 5e-2"
        );
        assert!(a >= 0.95, "int8 {what}: top-1 agreement {a} < 0.95");
    }
}

#[test]
fn external_data_is_written_beside_the_model() {
    let f = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r = f.get("cls28");
    our_checkpoint(r, &dir.join("c.safetensors"), Task::MultiLabel, 0.0);
    our_checkpoint(r, &dir.join("bad.safetensors"), Task::MultiLabel, 0.05);
    let before = listing(dir);
    let common = [
        "--onnx",
        "--external-data",
        "--output",
        "ext.onnx",
        "--checkpoint",
    ];
    let stderr = export_fails(dir, &[&common[..], &["bad.safetensors"]].concat());
    assert!(stderr.contains("nothing was written"), "{stderr}");
    assert_eq!(
        listing(dir),
        before,
        "a failed external-data export left files behind"
    );

    let stdout = export_ok(dir, &[&common[..], &["c.safetensors"]].concat());
    assert!(stdout.contains("weights in ext.onnx.data"), "{stdout}");
    let onnx = dir.join("ext.onnx");
    export_ok(
        dir,
        &[
            "--onnx",
            "--output",
            "inline.onnx",
            "--checkpoint",
            "c.safetensors",
        ],
    );
    let size = |name: &str| std::fs::metadata(dir.join(name)).unwrap().len();
    let (ext, data, inline) = (size("ext.onnx"), size("ext.onnx.data"), size("inline.onnx"));
    assert!(
        ext < inline / 2,
        "weights stayed inline: {ext} vs {inline} bytes"
    );
    assert!(ext + data > inline, "external data is only {data} bytes");
    let reps = ort_check(&[(onnx.clone(), ort_inputs(dir, 28))]);
    check_logits("external data", &onnx, &reps[0], r, "logits", &r.logits);
}

/// `--explain rollout,gradcam` adds two outputs after the plain ones, named with their shapes in
/// `mae.explain`, and leaves the plain graph's nodes, outputs and scores as they were; a model
/// exported without it is the plain graph. A class-token model is refused Grad-CAM (its score
/// has no gradient at the patch tokens) and pointed to rollout; occlusion is no graph output.
#[test]
fn explanation_outputs_extend_the_plain_graph() {
    use prost::Message;
    let f = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    our_checkpoint(
        f.get("gp28"),
        &dir.join("gp.safetensors"),
        Task::MultiClass,
        0.0,
    );
    let base = ["--onnx", "--checkpoint", "gp.safetensors", "--output"];
    export_ok(dir, &[&base[..], &["plain.onnx"]].concat());
    export_ok(
        dir,
        &[
            &base[..],
            &["explained.onnx", "--explain", "rollout,gradcam"],
        ]
        .concat(),
    );
    let reps = ort_check(&[
        (dir.join("plain.onnx"), ort_inputs(dir, 28)),
        (dir.join("explained.onnx"), ort_inputs(dir, 28)),
    ]);
    let float = 1;
    let plain_outputs = serde_json::json!([
        {"name": "logits", "elem_type": float, "shape": ["batch", 3]},
        {"name": "probabilities", "elem_type": float, "shape": ["batch", 3]},
    ]);
    assert_eq!(reps[0]["outputs"], plain_outputs);
    assert!(reps[0]["metadata"].get("mae.explain").is_none());
    let mut outputs = plain_outputs.as_array().unwrap().clone();
    outputs
        .push(serde_json::json!({"name": "rollout", "elem_type": float, "shape": ["batch", 7, 7]}));
    outputs.push(
        serde_json::json!({"name": "gradcam", "elem_type": float, "shape": ["batch", 3, 7, 7]}),
    );
    assert_eq!(reps[1]["outputs"], serde_json::Value::from(outputs));
    let explain: serde_json::Value =
        serde_json::from_str(reps[1]["metadata"]["mae.explain"].as_str().unwrap()).unwrap();
    assert_eq!(explain["rollout"]["output"], "rollout");
    assert_eq!(
        explain["rollout"]["shape"],
        serde_json::json!(["batch", 7, 7])
    );
    assert_eq!(explain["rollout"]["row"], "mean of the patch-token rows");
    assert_eq!(
        explain["gradcam"]["shape"],
        serde_json::json!(["batch", 3, 7, 7])
    );
    assert_eq!(explain["gradcam"]["layer"], "blocks.1");
    // The same scores; rollout's row over every token sums to 1, so its patch part is below.
    let runs = |i: usize| reps[i]["runs"].as_array().unwrap().clone();
    for (p, e) in runs(0).iter().zip(&runs(1)) {
        assert_close(
            "explained logits",
            &floats(&e["logits"]),
            &floats(&p["logits"]),
            1e-5,
        );
        let rollout = floats(&e["rollout"]);
        for row in rollout.chunks(49) {
            let s: f32 = row.iter().sum();
            assert!(s > 0.5 && s < 1.0, "rollout over the patches sums to {s}");
            assert!(row.iter().all(|v| *v >= 0.0));
        }
        assert!(floats(&e["gradcam"]).iter().all(|v| *v >= 0.0));
        assert!(floats(&e["gradcam"]).iter().any(|v| *v > 0.0));
    }
    // The plain graph's nodes come first, unchanged.
    let nodes = |name: &str| -> Vec<tract_onnx::pb::NodeProto> {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let m = tract_onnx::pb::ModelProto::decode(bytes.as_slice()).unwrap();
        m.graph.unwrap().node
    };
    let (plain, explained) = (nodes("plain.onnx"), nodes("explained.onnx"));
    assert!(explained.len() > plain.len());
    assert_eq!(&explained[..plain.len()], &plain[..]);

    our_checkpoint(
        f.get("cls28"),
        &dir.join("cls.safetensors"),
        Task::MultiClass,
        0.0,
    );
    let cls = [
        "--onnx",
        "--checkpoint",
        "cls.safetensors",
        "--output",
        "cls.onnx",
    ];
    let err = export_fails(dir, &[&cls[..], &["--explain", "gradcam"]].concat());
    assert!(
        err.contains("class token") && err.contains("no gradient") && err.contains("rollout"),
        "{err}"
    );
    assert!(!dir.join("cls.onnx").exists());
    let err = export_fails(dir, &[&cls[..], &["--explain", "occlusion"]].concat());
    assert!(err.contains("mae-run predict --explain occlusion"), "{err}");
    let err = export_fails(dir, &[&cls[..], &["--explain", "saliency"]].concat());
    assert!(err.contains("unknown explanation 'saliency'"), "{err}");
    export_ok(dir, &[&cls[..], &["--explain", "rollout"]].concat());
    let rep = &ort_check(&[(dir.join("cls.onnx"), ort_inputs(dir, 28))])[0];
    let explain: serde_json::Value =
        serde_json::from_str(rep["metadata"]["mae.explain"].as_str().unwrap()).unwrap();
    assert_eq!(explain["rollout"]["row"], "class token row");
    assert!(explain.get("gradcam").is_none());
}
