//! Heatmaps against the reference libraries, on both engines: seeded timm ViTs (a global-pool
//! and a class-token head) exported by `mae-export --explain`, explained by `mae-run predict
//! --explain ... --heatmaps DIR`, and their `.npy` maps compared with
//! - attention rollout written in the fixture over timm's attention probabilities (1e-5),
//! - `pytorch_grad_cam.GradCAM` on `blocks[-1]` with the ViT reshape transform, after its own
//!   normalisation, at the patch grid and at its full resolution (1e-4),
//! - `captum.attr.Occlusion` of the softmax with the same window, stride and baseline (1e-5).
//!
//! The fixture is `tests/fixtures/explain_reference.py`.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use mae_models::checkpoint::{self, CheckpointKind, CheckpointMeta, Task};
use mae_models::{ModelConfig, VitConfig};
use mae_runtime::explain::heatmap::{normalise, resize};
use mae_tests::{python, workspace_root, TestCommand};

const TOL_ROLLOUT: f32 = 1e-5;
const TOL_GRADCAM: f32 = 1e-4;
const TOL_OCCLUSION: f32 = 1e-5;
/// Side of the images and the models' input, their patch grid, classes and images.
const SIZE: usize = 28;
const GRID: usize = 7;
const CLASSES: usize = 3;
const IMAGES: usize = 2;
/// Occlusion window and stride: 5 positions per side, the last window cut at the border.
const WINDOW: usize = 8;
const STRIDE: usize = 6;
const BASELINE: f32 = 0.5;

/// The models, images and reference maps, in a temporary folder kept for the test process.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    refs: serde_json::Value,
}

fn fixture() -> &'static Fixture {
    static F: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    F.get_or_init(make_fixture)
}

fn make_fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let vit = |global_pool: bool| VitConfig {
        img_size: SIZE,
        patch_size: SIZE / GRID,
        in_chans: 3,
        num_classes: CLASSES,
        embed_dim: 48,
        depth: 2,
        num_heads: 3,
        mlp_ratio: 4.0,
        qkv_bias: true,
        global_pool,
        layer_norm_eps: 1e-6,
    };
    let timm = |c: &VitConfig| {
        serde_json::json!({"img_size": c.img_size, "patch_size": c.patch_size,
                           "embed_dim": c.embed_dim, "depth": c.depth, "num_heads": c.num_heads,
                           "num_classes": c.num_classes, "global_pool": c.global_pool})
    };
    let models = [("gp", vit(true)), ("cls", vit(false))];
    let job = serde_json::json!({
        "models": {"gp": timm(&models[0].1), "cls": timm(&models[1].1)},
        "images": IMAGES, "size": SIZE,
        "occlusion": {"window": WINDOW, "stride": STRIDE, "baseline": BASELINE},
    });
    let mut child = Command::new(python())
        .arg(workspace_root().join("tests/fixtures/explain_reference.py"))
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input = serde_json::to_vec(&job).unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "explain_reference.py failed (needs grad-cam and captum from requirements.txt)"
    );
    let refs = serde_json::from_slice(&out.stdout).unwrap();
    // timm's weights as mae checkpoints (preprocessing without a resize: the images are at the
    // input size), exported by mae-export.
    for ((name, cfg), explain) in models.into_iter().zip(["rollout,gradcam", "rollout"]) {
        let tensors = checkpoint::load(&dir.join(format!("{name}.pth")))
            .unwrap()
            .tensors;
        let mut meta = CheckpointMeta::new(
            CheckpointKind::Classifier,
            "vit_tiny_patch4_28",
            ModelConfig::Vit(cfg),
            "explain tests",
        );
        meta.task = Some(Task::MultiClass);
        meta.class_names = vec!["a".into(), "b".into(), "c".into()];
        meta.preprocess.crop_pct = 1.0;
        let ck = dir.join(format!("{name}.safetensors"));
        checkpoint::safetensors::write(&ck, &tensors, Some(&meta)).unwrap();
        TestCommand::new("mae-export", &dir)
            .args(["--onnx", "--checkpoint", ck.to_str().unwrap()])
            .args(["--explain", explain, "--output", &format!("{name}.onnx")])
            .stdout();
    }
    Fixture {
        _tmp: tmp,
        dir,
        refs,
    }
}

/// The values of a JSON array of numbers, nested at any depth, in order.
fn flat(v: &serde_json::Value) -> Vec<f32> {
    match v {
        serde_json::Value::Array(items) => items.iter().flat_map(flat).collect(),
        x => vec![x.as_f64().unwrap() as f32],
    }
}

/// A float32 `.npy` file's shape and values.
fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}", path.display());
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert!(header.contains("'descr': '<f4'"), "{header}");
    let shape = header.split("'shape': (").nth(1).unwrap();
    let shape: Vec<usize> = shape[..shape.find(')').unwrap()]
        .split(',')
        .filter(|d| !d.trim().is_empty())
        .map(|d| d.trim().parse().unwrap())
        .collect();
    let values: Vec<f32> = bytes[10 + len..]
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(values.len(), shape.iter().product::<usize>());
    (shape, values)
}

/// Asserts `|got - want| ≤ tol` element-wise, naming the worst element; returns the worst.
fn close(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let (mut worst, mut at) = (0f32, 0);
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let d = (a - b).abs();
        if d > worst || d.is_nan() {
            (worst, at) = (d, i);
        }
    }
    assert!(
        worst <= tol,
        "{what}: max |Δ| {worst:.3e} beyond {tol:.0e} at element {at}: {} vs {}",
        got[at],
        want[at]
    );
    worst
}

/// Runs `mae-run predict --explain method` over the images; returns the heatmap folder.
fn explain(f: &Fixture, model: &str, backend: &str, method: &str) -> PathBuf {
    let out = f.dir.join(format!("{model}-{backend}-{method}"));
    let images: Vec<String> = (0..IMAGES).map(|i| format!("img{i}.png")).collect();
    TestCommand::new("mae-run", &f.dir)
        .args(["predict", "--model", &format!("{model}.onnx")])
        .args(["--backend", backend, "--batch-size", "2"])
        .args(["--explain", method, "--heatmaps", out.to_str().unwrap()])
        .args(["--occlusion-window", &WINDOW.to_string()])
        .args(["--occlusion-stride", &STRIDE.to_string()])
        .args(["--occlusion-baseline", &BASELINE.to_string()])
        .args(&images)
        .stdout();
    out
}

#[test]
fn heatmaps_equal_the_reference_libraries_on_both_engines() {
    let f = fixture();
    let plane = SIZE * SIZE;
    let cells = GRID * GRID;
    for backend in ["tract", "ort"] {
        for model in ["gp", "cls"] {
            let r = &f.refs[model];
            let what = |m: &str, i: usize| format!("{backend} {model} {m} img{i}");

            let dir = explain(f, model, backend, "rollout");
            let want = flat(&r["rollout"]);
            for i in 0..IMAGES {
                let (shape, got) = read_npy(&dir.join(format!("img{i}.png.rollout.npy")));
                assert_eq!(shape, [GRID, GRID]);
                let w = &want[i * cells..(i + 1) * cells];
                let d = close(&what("rollout", i), &got, w, TOL_ROLLOUT);
                println!("{}: max |Δ| {d:.2e}", what("rollout", i));
                let png = image::open(dir.join(format!("img{i}.png.rollout.png"))).unwrap();
                assert_eq!((png.width(), png.height()), (224, 224));
            }

            let dir = explain(f, model, backend, "occlusion");
            // [C, N, S, S] in the reference, [C, S, S] per image here.
            let want = flat(&r["occlusion"]);
            for i in 0..IMAGES {
                let (shape, got) = read_npy(&dir.join(format!("img{i}.png.occlusion.npy")));
                assert_eq!(shape, [CLASSES, SIZE, SIZE]);
                let mut worst = 0f32;
                for c in 0..CLASSES {
                    let at = (c * IMAGES + i) * plane;
                    let w = &want[at..at + plane];
                    let g = &got[c * plane..(c + 1) * plane];
                    let what = format!("{} class {c}", what("occlusion", i));
                    worst = worst.max(close(&what, g, w, TOL_OCCLUSION));
                }
                let reach = got.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(
                    reach > 1e-4,
                    "{}: occlusion changed nothing",
                    what("occlusion", i)
                );
                println!(
                    "{}: max |Δ| {worst:.2e} (map reaches {reach:.2e})",
                    what("occlusion", i)
                );
            }

            if model != "gp" {
                continue;
            }
            let dir = explain(f, model, backend, "gradcam");
            let (low, full) = (flat(&r["gradcam_low"]), flat(&r["gradcam_full"]));
            for i in 0..IMAGES {
                let (shape, got) = read_npy(&dir.join(format!("img{i}.png.gradcam.npy")));
                assert_eq!(shape, [CLASSES, GRID, GRID]);
                let (mut worst_low, mut worst_full) = (0f32, 0f32);
                for c in 0..CLASSES {
                    let g = normalise(&got[c * cells..(c + 1) * cells]);
                    let at = (c * IMAGES + i) * cells;
                    let w = normalise(&low[at..at + cells]);
                    let name = format!("{} class {c} at the grid", what("gradcam", i));
                    worst_low = worst_low.max(close(&name, &g, &w, TOL_GRADCAM));
                    // GradCAM's own output: normalised, resized to the image, normalised again.
                    let g = normalise(&resize(&g, (GRID, GRID), (SIZE, SIZE)));
                    let at = (c * IMAGES + i) * plane;
                    let name = format!("{} class {c} at full size", what("gradcam", i));
                    let w = &full[at..at + plane];
                    worst_full = worst_full.max(close(&name, &g, w, TOL_GRADCAM));
                }
                println!(
                    "{}: max |Δ| {worst_low:.2e} at the grid, {worst_full:.2e} at full size",
                    what("gradcam", i)
                );
            }
        }
    }
}

/// What the models offer is listed by `mae-run info`, and asking for what a model lacks, or for
/// impossible heatmap settings, fails with a message that says what to do.
#[test]
fn missing_outputs_and_bad_settings_fail_clearly() {
    let f = fixture();
    let info = TestCommand::new("mae-run", &f.dir)
        .args(["info", "--model", "gp.onnx"])
        .stdout();
    assert!(
        info.contains("output     rollout: float [batch, 7, 7]"),
        "{info}"
    );
    assert!(
        info.contains("output     gradcam: float [batch, 3, 7, 7]"),
        "{info}"
    );
    assert!(info.contains("mae.explain = {"), "{info}");

    let predict = |model: &str, extra: &[&str]| {
        let mut c = TestCommand::new("mae-run", &f.dir);
        c.args(["predict", "--model", model, "img0.png"])
            .args(extra);
        c
    };
    let err = predict("cls.onnx", &["--explain", "gradcam", "--heatmaps", "h"]).fails();
    assert!(
        err.contains("no 'gradcam' output")
            && err.contains("mae-export --onnx --explain gradcam")
            && err.contains("what it offers (rollout)"),
        "{err}"
    );
    assert!(!f.dir.join("h").exists(), "nothing is written on refusal");
    let err = predict("gp.onnx", &["--heatmaps", "h"]).fails();
    assert!(err.contains("--explain"), "{err}");
    let err = predict(
        "gp.onnx",
        &[
            "--explain",
            "rollout",
            "--heatmaps",
            "h",
            "--opacity",
            "1.5",
        ],
    )
    .fails();
    assert!(err.contains("--opacity 1.5"), "{err}");
    let err = predict(
        "gp.onnx",
        &[
            "--explain",
            "occlusion",
            "--heatmaps",
            "h",
            "--occlusion-window",
            "40",
        ],
    )
    .fails();
    assert!(err.contains("--occlusion-window 40"), "{err}");
    let help = TestCommand::new("mae-run", &f.dir)
        .args(["predict", "--help"])
        .stdout();
    assert!(help.contains("one pass of the model per window"), "{help}");
}

/// A `mae-run serve` child on a free loopback port, killed on drop.
struct Served {
    child: std::process::Child,
    addr: String,
}

impl Served {
    fn start(dir: &Path, model: &str) -> Served {
        use std::io::BufRead;
        let mut child = TestCommand::new("mae-run", dir)
            .args(["serve", "--model", model, "--listen", "127.0.0.1:0"])
            .command()
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("serve exited before listening")
                .unwrap();
            if let Some(rest) = line.split("://").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Served { child, addr }
    }

    /// One HTTP/1.1 request; returns the status and the body as JSON.
    fn post(&self, path: &str, content_type: &str, body: &[u8]) -> (u16, serde_json::Value) {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(&self.addr).unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&resp[..split]).to_lowercase();
        let status = head[9..12].parse().unwrap();
        let mut body = resp[split + 4..].to_vec();
        if head.contains("transfer-encoding: chunked") {
            let (mut out, mut rest) = (Vec::new(), &body[..]);
            while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
                let n =
                    usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap(), 16).unwrap();
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&rest[eol + 2..eol + 2 + n]);
                rest = &rest[eol + 4 + n..];
            }
            body = out;
        }
        (status, serde_json::from_slice(&body).unwrap())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The maps through `mae-run serve`: `/v2` infer answers `gradcam` and `rollout` when the
/// request names them in `outputs`, and `/v1/predict?explain=M` (occlusion included, with its
/// settings in the query) answers the same maps as `mae-run predict` and captum.
#[test]
fn serve_answers_the_maps() {
    let f = fixture();
    let s = Served::start(&f.dir, "gp.onnx");
    let png = std::fs::read(f.dir.join("img0.png")).unwrap();
    let npy = |method: &str| {
        let dir = explain(f, "gp", "tract", method);
        read_npy(&dir.join(format!("img0.png.{method}.npy")))
    };

    let mut spec = mae_models::preprocess::PreprocessSpec::imagenet(SIZE);
    spec.crop_pct = 1.0;
    let img = mae_models::input::load(&f.dir.join("img0.png")).unwrap();
    let pixels = mae_models::imaging::preprocess_eval(&img, &spec);
    let request = serde_json::json!({
        "inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, SIZE, SIZE],
                    "data": pixels}],
        "outputs": [{"name": "gradcam"}, {"name": "rollout"}],
    });
    let body = serde_json::to_vec(&request).unwrap();
    let (code, v) = s.post("/v2/models/gp/infer", "application/json", &body);
    assert_eq!(code, 200, "{v}");
    let outputs = v["outputs"].as_array().unwrap();
    assert_eq!(outputs[0]["name"], "gradcam");
    assert_eq!(
        outputs[0]["shape"],
        serde_json::json!([1, CLASSES, GRID, GRID])
    );
    assert_eq!(outputs[1]["shape"], serde_json::json!([1, GRID, GRID]));
    let (_, gradcam) = npy("gradcam");
    close("/v2 gradcam", &flat(&outputs[0]["data"]), &gradcam, 1e-5);
    let (_, rollout) = npy("rollout");
    close(
        "/v2 rollout",
        &flat(&outputs[1]["data"]),
        &rollout,
        TOL_ROLLOUT,
    );
    let unknown =
        serde_json::json!({"inputs": request["inputs"], "outputs": [{"name": "saliency"}]});
    let (code, v) = s.post(
        "/v2/models/gp/infer",
        "application/json",
        &serde_json::to_vec(&unknown).unwrap(),
    );
    assert_eq!(code, 400);
    assert!(v["error"].as_str().unwrap().contains("gradcam"), "{v}");

    let (code, v) = s.post("/v1/predict?explain=rollout", "image/png", &png);
    assert_eq!(code, 200, "{v}");
    let e = &v["predictions"][0]["explanation"];
    assert_eq!(e["method"], "rollout");
    assert_eq!(e["shape"], serde_json::json!([GRID, GRID]));
    close("/v1 rollout", &flat(&e["map"]), &rollout, TOL_ROLLOUT);

    let query = format!(
        "/v1/predict?explain=occlusion&occlusion_window={WINDOW}&occlusion_stride={STRIDE}\
         &occlusion_baseline={BASELINE}"
    );
    let (code, v) = s.post(&query, "image/png", &png);
    assert_eq!(code, 200, "{v}");
    let e = &v["predictions"][0]["explanation"];
    assert_eq!(e["shape"], serde_json::json!([CLASSES, SIZE, SIZE]));
    let got = flat(&e["map"]);
    let want = flat(&f.refs["gp"]["occlusion"]);
    let plane = SIZE * SIZE;
    for c in 0..CLASSES {
        let at = c * IMAGES * plane;
        let g = &got[c * plane..(c + 1) * plane];
        close(
            &format!("/v1 occlusion class {c} vs captum"),
            g,
            &want[at..at + plane],
            TOL_OCCLUSION,
        );
    }

    let (code, v) = s.post("/v1/predict?explain=saliency", "image/png", &png);
    assert_eq!(code, 400);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("unknown explanation 'saliency'"),
        "{v}"
    );
    let (code, v) = s.post(
        "/v1/predict?explain=occlusion&occlusion_window=99",
        "image/png",
        &png,
    );
    assert_eq!(code, 400);
    assert!(v["error"].as_str().unwrap().contains("99"), "{v}");
}

/// `mae-train visualize --explain` computes the maps in libtorch (rollout from the attention
/// probabilities, Grad-CAM by autograd, occlusion through the shared windows): the same maps,
/// for the same checkpoints, as `mae-run predict --explain` reads from the graphs that
/// `mae-export --explain` wrote; a class-token checkpoint is refused Grad-CAM as the exporter
/// refuses it.
#[test]
fn train_visualize_maps_equal_mae_run_maps() {
    const TOL_VISUALIZE: f32 = 1e-4;
    let f = fixture();
    for (model, methods) in [
        ("gp", &["rollout", "gradcam", "occlusion"][..]),
        ("cls", &["rollout", "occlusion"][..]),
    ] {
        for method in methods {
            let run = explain(f, model, "tract", method);
            for i in 0..IMAGES {
                let out = f.dir.join(format!("{model}-train-img{i}.{method}.png"));
                let said = TestCommand::new("mae-train", &f.dir)
                    .args(["visualize", "--checkpoint", &format!("{model}.safetensors")])
                    .args(["--image", &format!("img{i}.png"), "--explain", method])
                    .args(["--occlusion-window", &WINDOW.to_string()])
                    .args(["--occlusion-stride", &STRIDE.to_string()])
                    .args(["--occlusion-baseline", &BASELINE.to_string()])
                    .args(["--output", out.to_str().unwrap()])
                    .stdout();
                assert!(said.contains(&format!("{method} of")), "{said}");
                let (shape, got) = read_npy(&out.with_extension("npy"));
                let (want_shape, want) = read_npy(&run.join(format!("img{i}.png.{method}.npy")));
                assert_eq!(shape, want_shape, "{model} {method} img{i}");
                let what = format!("mae-train visualize vs mae-run: {model} {method} img{i}");
                let d = close(&what, &got, &want, TOL_VISUALIZE);
                println!("{what}: max |Δ| {d:.2e}");
                let png = image::open(&out).unwrap();
                assert_eq!((png.width(), png.height()), (224, 224));
                let drawn = image::open(run.join(format!("img{i}.png.{method}.png"))).unwrap();
                let differ = png
                    .to_rgb8()
                    .pixels()
                    .zip(drawn.to_rgb8().pixels())
                    .filter(|(a, b)| a.0.iter().zip(b.0).any(|(x, y)| x.abs_diff(y) > 1))
                    .count();
                assert!(
                    differ * 100 < 224 * 224,
                    "{what}: {differ} pixels of the PNGs differ"
                );
            }
        }
    }
    let err = TestCommand::new("mae-train", &f.dir)
        .args(["visualize", "--checkpoint", "cls.safetensors"])
        .args(["--image", "img0.png", "--explain", "gradcam"])
        .fails();
    assert!(
        err.contains("global-pool head") && err.contains("--explain rollout"),
        "{err}"
    );
    let err = TestCommand::new("mae-train", &f.dir)
        .args(["visualize", "--checkpoint", "gp.safetensors"])
        .args(["--image", "img0.png", "--explain", "occlusion"])
        .args(["--occlusion-window", "99"])
        .fails();
    assert!(err.contains("--occlusion-window 99"), "{err}");
}

/// Spearman's rank correlation of two maps (ranks of ties averaged).
fn spearman(a: &[f32], b: &[f32]) -> f64 {
    fn ranks(v: &[f32]) -> Vec<f64> {
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < order.len() {
            let mut j = i;
            while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
                j += 1;
            }
            for &k in &order[i..=j] {
                r[k] = (i + j) as f64 / 2.0;
            }
            i = j + 1;
        }
        r
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    if va == 0.0 || vb == 0.0 {
        return 0.0;
    }
    cov / (va * vb).sqrt()
}

/// The trust checks of Adebayo et al. (2018) on a small ViT trained (by the fixture
/// `explain_trust.py`) to name the colour of one 7×7 square at a random place in 28×28 noise:
/// - pointing game: the maximum of the true class's map must fall on the square (2 pixels of
///   tolerance; a grid map points at its cell's centre) more often than the image's centre
///   does, for Grad-CAM and occlusion;
/// - model randomisation (cascading, from the top): re-initialising the head, then the blocks
///   from the top down, must take each method's maps further from the trained model's
///   (Spearman rank correlation, mean over the images), the fully randomised model's furthest.
///
/// Rollout's pointing figure is reported, not asserted: it reads neither the class nor the
/// head (its correlation after the head alone is re-initialised is 1, which is asserted).
#[test]
fn trust_checks_on_a_trained_model() {
    const TEST: usize = 48;
    const OBJECT: usize = 7;
    const TOLERANCE: usize = 2;
    /// Slack on "falls": a step may sit this much above the one before it (noise of 48 maps).
    const SLACK: f64 = 0.05;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let job = serde_json::json!({"size": SIZE, "patch": 4, "embed_dim": 48, "depth": 2,
                                 "heads": 3, "train": 480, "test": TEST, "epochs": 6,
                                 "object": OBJECT});
    let mut child = Command::new(python())
        .arg(workspace_root().join("tests/fixtures/explain_trust.py"))
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input = serde_json::to_vec(&job).unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "explain_trust.py failed");
    let facts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let accuracy = facts["test_accuracy"].as_f64().unwrap();
    assert!(
        accuracy >= 0.9,
        "the model did not learn the task: test accuracy {accuracy}"
    );
    let labels: Vec<usize> = serde_json::from_value(facts["labels"].clone()).unwrap();
    let boxes: Vec<[usize; 4]> = serde_json::from_value(facts["boxes"].clone()).unwrap();
    let cascade: Vec<String> = serde_json::from_value(facts["cascade"].clone()).unwrap();
    assert_eq!((labels.len(), boxes.len(), cascade.len()), (TEST, TEST, 3));

    let models = ["trained", "random0", "random1", "random2"];
    let cfg = VitConfig {
        img_size: SIZE,
        patch_size: 4,
        in_chans: 3,
        num_classes: 3,
        embed_dim: 48,
        depth: 2,
        num_heads: 3,
        mlp_ratio: 4.0,
        qkv_bias: true,
        global_pool: true,
        layer_norm_eps: 1e-6,
    };
    for name in models {
        let tensors = checkpoint::load(&dir.join(format!("{name}.pth")))
            .unwrap()
            .tensors;
        let mut meta = CheckpointMeta::new(
            CheckpointKind::Classifier,
            "vit_tiny_patch4_28",
            ModelConfig::Vit(cfg.clone()),
            "explain tests",
        );
        meta.task = Some(Task::MultiClass);
        meta.class_names = vec!["red".into(), "green".into(), "blue".into()];
        meta.preprocess.crop_pct = 1.0;
        let ck = dir.join(format!("{name}.safetensors"));
        checkpoint::safetensors::write(&ck, &tensors, Some(&meta)).unwrap();
        TestCommand::new("mae-export", dir)
            .args(["--onnx", "--checkpoint", ck.to_str().unwrap()])
            .args([
                "--explain",
                "rollout,gradcam",
                "--output",
                &format!("{name}.onnx"),
            ])
            .stdout();
    }
    let images: Vec<String> = (0..TEST).map(|i| format!("test{i}.png")).collect();
    // maps[model][method][image]: the true class's map and its side.
    let methods = ["rollout", "gradcam", "occlusion"];
    let mut maps = vec![vec![Vec::new(); methods.len()]; models.len()];
    for (mi, name) in models.iter().enumerate() {
        for (ki, method) in methods.iter().enumerate() {
            let heat = dir.join(format!("{name}-{method}"));
            // Windows larger than the object, so that some hide all of it: 7 × 7 positions.
            TestCommand::new("mae-run", dir)
                .args(["predict", "--model", &format!("{name}.onnx")])
                .args(["--batch-size", "48"])
                .args(["--explain", method, "--heatmaps", heat.to_str().unwrap()])
                .args(["--occlusion-window", "10", "--occlusion-stride", "3"])
                .args(&images)
                .stdout();
            for (i, image) in images.iter().enumerate() {
                let (shape, values) = read_npy(&heat.join(format!("{image}.{method}.npy")));
                let side = shape[shape.len() - 1];
                let per = side * side;
                let map = if shape.len() == 3 {
                    values[labels[i] * per..(labels[i] + 1) * per].to_vec()
                } else {
                    values
                };
                maps[mi][ki].push((map, side));
            }
        }
    }

    let inside = |(y, x): (usize, usize), b: &[usize; 4]| {
        y + TOLERANCE >= b[0]
            && y < b[2] + TOLERANCE
            && x + TOLERANCE >= b[1]
            && x < b[3] + TOLERANCE
    };
    let centre = boxes
        .iter()
        .filter(|b| inside((SIZE / 2, SIZE / 2), b))
        .count();
    let centre_rate = centre as f64 / TEST as f64;
    let train_accuracy = facts["train_accuracy"].as_f64().unwrap();
    println!(
        "trust checks: ViT depth 2, width 48, patch 4, 28×28 input; train accuracy \
         {train_accuracy:.3}, test accuracy {accuracy:.3} on {TEST} images"
    );
    println!(
        "{:<10} {:>9} {:>8}  rank correlation with the trained map after re-initialising",
        "method", "pointing", "centre"
    );
    let mut failures = Vec::new();
    for (ki, method) in methods.iter().enumerate() {
        let hits = maps[0][ki]
            .iter()
            .zip(&boxes)
            .filter(|((map, side), b)| {
                let at = (0..map.len()).fold(0, |m, i| if map[i] > map[m] { i } else { m });
                let cell = SIZE / side;
                inside(
                    ((at / side) * cell + cell / 2, (at % side) * cell + cell / 2),
                    b,
                )
            })
            .count();
        let rate = hits as f64 / TEST as f64;
        // corr[k]: after step k of the cascade (head, then the blocks from the top).
        let corr: Vec<f64> = (1..models.len())
            .map(|mi| {
                let pairs = maps[0][ki].iter().zip(&maps[mi][ki]);
                pairs.map(|((a, _), (b, _))| spearman(a, b)).sum::<f64>() / TEST as f64
            })
            .collect();
        let steps: Vec<String> = cascade
            .iter()
            .zip(&corr)
            .map(|(s, c)| format!("{s} {c:+.2}"))
            .collect();
        println!(
            "{method:<10} {rate:>9.2} {centre_rate:>8.2}  {}",
            steps.join(", then ")
        );

        if *method != "rollout" && rate <= centre_rate + 0.1 {
            failures.push(format!(
                "{method} points at the object in {rate:.2} of the images, the centre in \
                 {centre_rate:.2}"
            ));
        }
        let last = corr[corr.len() - 1];
        if last >= 0.5 {
            failures.push(format!(
                "{method}: the fully randomised model's maps still correlate {last:.2}"
            ));
        }
        if corr.iter().any(|&c| last > c + SLACK) {
            failures.push(format!(
                "{method}: the fully randomised model is not the furthest: {corr:.2?}"
            ));
        }
        if corr.windows(2).any(|w| w[1] > w[0] + SLACK) {
            failures.push(format!(
                "{method}: the correlations rise as more is randomised: {corr:.2?}"
            ));
        }
        if *method == "rollout" {
            // Rollout reads no head: the first step leaves it unchanged, each block moves it.
            if corr[0] < 0.99 || !(corr[1] < corr[0] - SLACK && corr[2] < corr[1] - SLACK) {
                failures.push(format!(
                    "rollout: expected 1 after the head, then a fall per block: {corr:.2?}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The DICOM node's Secondary Capture shows the model's Grad-CAM beside the image: an image
/// sent to `mae-run serve --dicom-listen` comes back with, right of the source, the same
/// overlay `mae-run predict --explain gradcam --heatmaps` draws for it (scaled to the source's
/// height). `--dicom-heatmap gradcam` with a model that has no Grad-CAM output does not start.
#[test]
fn the_dicom_secondary_capture_shows_the_heatmap() {
    use std::io::BufRead;
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // The first test image as a DICOM Secondary Capture (8-bit RGB), written by pydicom; and,
    // later, a Secondary Capture's pixels back out as a PNG.
    let script = r#"
import sys
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
if sys.argv[1] == "write":
    a = np.array(Image.open(sys.argv[2]).convert("RGB"))
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.77.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.77.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.77.3"
    ds.PatientID = "MAE-0002"
    ds.PatientName = "Test^Heatmap"
    ds.Modality = "OT"
    ds.Rows, ds.Columns = a.shape[:2]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = a.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(sys.argv[3], enforce_file_format=True)
else:
    for path in sys.argv[2:]:
        ds = pydicom.dcmread(path)
        if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7":
            Image.fromarray(ds.pixel_array).save(path + ".png")
            print(path + ".png")
"#;
    let py = |args: &[&str]| {
        let out = Command::new(python())
            .arg("-c")
            .arg(script)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let sc = d.join("source.dcm");
    py(&[
        "write",
        f.dir.join("img0.png").to_str().unwrap(),
        sc.to_str().unwrap(),
    ]);

    // The reference overlay, from mae-run predict.
    let heat = d.join("heat");
    TestCommand::new("mae-run", d)
        .args([
            "predict",
            "--model",
            f.dir.join("gp.onnx").to_str().unwrap(),
        ])
        .args(["--explain", "gradcam", "--heatmaps", heat.to_str().unwrap()])
        .args([sc.to_str().unwrap()])
        .stdout();
    let png = std::fs::read_dir(&heat)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "png"))
        .unwrap();
    let want = image::open(&png).unwrap().to_rgb8();

    let serve = |model: &str, extra: &[&str]| {
        TestCommand::new("mae-run", d)
            .args(["serve", "--model", f.dir.join(model).to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0", "--dicom-listen", "127.0.0.1:0"])
            .args(["--dicom-spool", d.join("spool").to_str().unwrap()])
            .args(["--results-dir", d.join("results").to_str().unwrap()])
            .args(extra)
            .command()
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Asked for by name, a missing output is refused before anything listens.
    let refused = serve("cls.onnx", &["--dicom-heatmap", "gradcam"])
        .wait_with_output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains("--dicom-heatmap") && err.contains("no 'gradcam' output"),
        "{err}"
    );

    let mut child = serve("gp.onnx", &[]);
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut early = Vec::new();
    let port = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            panic!("serve exited before its DICOM node listened");
        };
        early.push(line.clone());
        if let Some(rest) = line.split("DICOM node listening on ").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .to_string();
        }
    };
    let log = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    TestCommand::new("mae-run", d)
        .args(["dicom-send", "--to", &format!("MAE@127.0.0.1:{port}")])
        .args([sc.to_str().unwrap()])
        .stdout();
    let results = d.join("results");
    let start = std::time::Instant::now();
    let files = loop {
        let files: Vec<String> = std::fs::read_dir(&results)
            .map(|r| r.map(|e| e.unwrap().path().display().to_string()).collect())
            .unwrap_or_default();
        let files: Vec<String> = files.into_iter().filter(|f| f.ends_with(".dcm")).collect();
        if files.len() == 2 || start.elapsed().as_secs() > 60 {
            break files;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    early.extend(log.join().unwrap());
    let log = early.join("\n");
    assert_eq!(
        files.len(),
        2,
        "an SR and a Secondary Capture; serve's log:\n{log}"
    );
    assert!(
        log.contains("Secondary Captures with the model's gradcam map"),
        "{log}"
    );
    let mut args = vec!["read"];
    args.extend(files.iter().map(String::as_str));
    let out = py(&args);
    let got = image::open(out.trim()).unwrap().to_rgb8();

    // The source, 28 pixels wide, is enlarged 19 times (to at least 512); the overlay stands
    // right of it at its height, under the band of text.
    let side = (SIZE * 19) as u32;
    assert_eq!(
        got.width(),
        2 * side,
        "the source and the heatmap side by side"
    );
    let band = got.height() - side;
    let scaled = image::imageops::resize(&want, side, side, image::imageops::FilterType::Triangle);
    let mut worst = 0u8;
    for y in 0..side {
        for x in 0..side {
            let (a, b) = (
                got.get_pixel(side + x, band + y).0,
                scaled.get_pixel(x, y).0,
            );
            for c in 0..3 {
                worst = worst.max(a[c].abs_diff(b[c]));
            }
        }
    }
    assert_eq!(
        worst, 0,
        "the Secondary Capture's heatmap differs from predict's"
    );
    // And the source itself, untouched, on the left.
    let source = image::open(f.dir.join("img0.png")).unwrap().to_rgb8();
    assert_eq!(
        got.get_pixel(19 * 3 + 5, band + 19 * 4 + 5),
        source.get_pixel(3, 4)
    );
}
