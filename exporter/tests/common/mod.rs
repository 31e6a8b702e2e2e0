//! Shared helpers of the mae-export end-to-end tests: the seeded PyTorch references (made once
//! per test run), checkpoints in our format, the binary, ONNX Runtime through the venv, and a
//! tolerance check that names the worst element.
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use mae_models::checkpoint::{self, CheckpointKind, CheckpointMeta, ProbeRecord, Task};
use mae_models::probe::probe_batch;
use mae_models::{MaeConfig, ModelConfig, VitConfig};

/// logits of an fp32 export against PyTorch float32.
pub const TOL_FP32: f32 = 1e-4;
/// `--with-preprocessing` against normalising outside the graph.
pub const TOL_PREPROCESS: f32 = 1e-5;

/// Seed and batch of the probe inputs the references are computed on.
pub const PROBE_SEED: u64 = 7;
pub const BATCH: usize = 5;

/// The workspace's virtualenv Python.
pub fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let p = root.join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh to create the project virtualenv (torch, timm, onnx, \
         onnxruntime)",
        p.display()
    );
    p
}

fn fixture_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Runs a fixture script with JSON on stdin; returns its JSON output.
pub fn run_python(script: &str, args: &[&str], input: &serde_json::Value) -> serde_json::Value {
    let mut child = Command::new(python())
        .arg(fixture_script(script))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(input).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// One reference model.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: &'static str,
    pub cfg: VitConfig,
    pub seed: u64,
}

impl Case {
    fn json(&self, input: &Path) -> serde_json::Value {
        let c = &self.cfg;
        serde_json::json!({
            "name": self.name, "seed": self.seed, "img_size": c.img_size,
            "patch_size": c.patch_size, "embed_dim": c.embed_dim, "depth": c.depth,
            "num_heads": c.num_heads, "num_classes": c.num_classes, "global_pool": c.global_pool,
            "input": input, "batch": BATCH,
        })
    }
}

/// A tiny ViT config, upstream defaults otherwise.
pub fn tiny(
    img: usize,
    patch: usize,
    d: usize,
    heads: usize,
    classes: usize,
    gp: bool,
) -> VitConfig {
    VitConfig {
        img_size: img,
        patch_size: patch,
        in_chans: 3,
        num_classes: classes,
        embed_dim: d,
        depth: 2,
        num_heads: heads,
        mlp_ratio: 4.0,
        qkv_bias: true,
        global_pool: gp,
        layer_norm_eps: 1e-6,
    }
}

/// The reference cases: both heads, two input sizes, two patch sizes, several class counts, an
/// official-size model and a headless encoder.
pub fn cases() -> Vec<Case> {
    let mut official = VitConfig::preset("vit_tiny_patch4_28").unwrap();
    official.num_classes = 4;
    vec![
        Case {
            name: "gp28",
            cfg: tiny(28, 4, 32, 2, 3, true),
            seed: 1,
        },
        Case {
            name: "cls28",
            cfg: tiny(28, 4, 32, 2, 5, false),
            seed: 2,
        },
        Case {
            name: "gp32p8",
            cfg: tiny(32, 8, 48, 3, 2, true),
            seed: 3,
        },
        Case {
            name: "official",
            cfg: official,
            seed: 4,
        },
        Case {
            name: "encoder",
            cfg: tiny(28, 4, 32, 2, 0, false),
            seed: 5,
        },
    ]
}

/// PyTorch outputs of one case on the probe batch.
#[derive(Debug, Clone)]
pub struct Reference {
    pub case: Case,
    pub pth: PathBuf,
    pub logits: Vec<f32>,
    pub features: Vec<f32>,
}

/// Everything the generator made, in a folder that lives as long as the test process.
#[derive(Debug)]
pub struct Fixtures {
    pub dir: PathBuf,
    pub refs: BTreeMap<&'static str, Reference>,
    _tmp: tempfile::TempDir,
}

impl Fixtures {
    pub fn get(&self, name: &str) -> &Reference {
        &self.refs[name]
    }
}

/// The raw probe input file for an image size, written beside the fixtures.
pub fn probe_file(dir: &Path, size: usize) -> PathBuf {
    let p = dir.join(format!("probe_{size}.f32"));
    if !p.exists() {
        write_f32(&p, &probe_batch(PROBE_SEED, BATCH, 3, size));
    }
    p
}

pub fn write_f32(path: &Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

/// Makes the references once per test process (one Python start for all cases).
pub fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let cases = cases();
        let jobs: Vec<_> = cases
            .iter()
            .map(|c| c.json(&probe_file(&dir, c.cfg.img_size)))
            .collect();
        let out = run_python(
            "vit_reference.py",
            &["make", dir.to_str().unwrap()],
            &jobs.into(),
        );
        let floats = |v: &serde_json::Value| -> Vec<f32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        };
        let refs = cases
            .into_iter()
            .map(|c| {
                let r = &out[c.name];
                let reference = Reference {
                    pth: dir.join(format!("{}.pth", c.name)),
                    logits: floats(&r["logits"]),
                    features: floats(&r["features"]),
                    case: c.clone(),
                };
                (c.name, reference)
            })
            .collect();
        Fixtures {
            dir,
            refs,
            _tmp: tmp,
        }
    })
}

/// Writes a reference as our self-describing classifier checkpoint, with a probe record made by
/// PyTorch (offset by `probe_offset`, to make a deliberately wrong one).
pub fn our_checkpoint(r: &Reference, path: &Path, task: Task, probe_offset: f32) -> CheckpointMeta {
    let ck = checkpoint::load(&r.pth).unwrap();
    let mut meta = CheckpointMeta::new(
        CheckpointKind::Classifier,
        "vit_tiny_patch4_28",
        ModelConfig::Vit(r.case.cfg.clone()),
        "mae-exporter tests",
    );
    meta.task = Some(task);
    meta.class_names = (0..r.case.cfg.num_classes)
        .map(|i| format!("label {i}"))
        .collect();
    meta.epoch = Some(12);
    meta.metrics = BTreeMap::from([("acc1".to_string(), 87.5), ("loss".to_string(), 0.25)]);
    meta.probe = Some(ProbeRecord {
        seed: PROBE_SEED,
        batch: BATCH,
        outputs: r.logits.iter().map(|v| v + probe_offset).collect(),
    });
    checkpoint::safetensors::write(path, &ck.tensors, Some(&meta)).unwrap();
    meta
}

/// Writes the `encoder` reference as an MAE pretraining checkpoint (with a stand-in decoder
/// tensor, which the export must leave out).
pub fn pretrain_checkpoint(r: &Reference, path: &Path) {
    let mut ck = checkpoint::load(&r.pth).unwrap();
    let c = &r.case.cfg;
    let mae = MaeConfig {
        img_size: c.img_size,
        patch_size: c.patch_size,
        in_chans: 3,
        embed_dim: c.embed_dim,
        depth: c.depth,
        num_heads: c.num_heads,
        decoder_embed_dim: 16,
        decoder_depth: 1,
        decoder_num_heads: 2,
        mlp_ratio: 4.0,
        norm_pix_loss: false,
        layer_norm_eps: 1e-6,
    };
    ck.tensors.insert(
        "mask_token".into(),
        mae_models::TensorData::from_f32(vec![1, 1, 16], &[0.5; 16]).unwrap(),
    );
    let meta = CheckpointMeta::new(
        CheckpointKind::MaePretrain,
        "mae_vit_tiny_patch4_28",
        ModelConfig::Mae(mae),
        "mae-exporter tests",
    );
    checkpoint::safetensors::write(path, &ck.tensors, Some(&meta)).unwrap();
}

/// Runs `mae-export` in `dir`.
pub fn mae_export(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mae-export"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

/// Runs `mae-export`, asserting success; returns stdout.
pub fn export_ok(dir: &Path, args: &[&str]) -> String {
    let out = mae_export(dir, args);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success(),
        "mae-export {args:?} failed:\nstdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs `mae-export`, asserting a clean failure (no panic); returns stderr.
pub fn export_fails(dir: &Path, args: &[&str]) -> String {
    let out = mae_export(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "mae-export {args:?} unexpectedly succeeded"
    );
    assert_ne!(
        out.status.code(),
        Some(101),
        "mae-export panicked:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "mae-export panicked:\n{stderr}"
    );
    stderr
}

/// Asserts `got ≈ want` element-wise within `atol`, naming the worst element on failure.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: {} values, expected {}",
        got.len(),
        want.len()
    );
    let (mut worst, mut max) = (0, 0f32);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        if d.is_nan() || d > max {
            worst = i;
            max = if d.is_nan() { f32::INFINITY } else { d };
        }
    }
    assert!(
        max <= atol,
        "{what}: max |Δ| {max:e} > {atol:e} at element {worst}: got {} want {}",
        got[worst],
        want[worst]
    );
    eprintln!("{what}: max |Δ| {max:.2e} (tolerance {atol:e})");
}

/// Runs an ONNX file with tract (as `mae-run` does) on float32 `[b, 3, s, s]` input.
pub fn tract_run(path: &Path, shape: &[usize], values: &[f32]) -> Vec<Vec<f32>> {
    let t = tract_onnx::prelude::Tensor::from_shape(shape, values).unwrap();
    mae_exporter::check::run_tract(path, t).unwrap()
}

pub fn tract_run_u8(path: &Path, shape: &[usize], values: &[u8]) -> Vec<Vec<f32>> {
    let t = tract_onnx::prelude::Tensor::from_shape(shape, values).unwrap();
    mae_exporter::check::run_tract(path, t).unwrap()
}

/// One input of an ONNX Runtime job.
pub fn ort_input(path: &Path, shape: &[usize], dtype: &str) -> serde_json::Value {
    serde_json::json!({"path": path, "shape": shape, "dtype": dtype})
}

/// Checks models with onnx.checker (full) and runs them with ONNX Runtime; one entry per job.
pub fn ort_check(jobs: &[(PathBuf, Vec<serde_json::Value>)]) -> Vec<serde_json::Value> {
    let jobs: Vec<_> = jobs
        .iter()
        .map(|(p, inputs)| serde_json::json!({"onnx": p, "inputs": inputs}))
        .collect();
    let out = run_python("onnx_check.py", &[], &jobs.into());
    let entries = out.as_array().unwrap().clone();
    for e in &entries {
        assert_eq!(
            e["checker"], "ok",
            "onnx.checker.check_model(full_check=True) failed"
        );
    }
    entries
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// The files in `dir`, sorted, hidden ones included.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The first `n` images of a `[BATCH, ...]` buffer.
pub fn first_images(values: &[f32], n: usize) -> Vec<f32> {
    values[..values.len() / BATCH * n].to_vec()
}
