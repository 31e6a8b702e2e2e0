//! `mae-train finetune` and `eval` end to end on generated data: a run stopped midway and
//! resumed ends with the same weights as an uninterrupted run, writes its log, checkpoints
//! and metrics, and `eval` reproduces the recorded metrics.
#![allow(clippy::unwrap_used)]

mod common;

use common::{mae_train, npz_split, write_npz};

use std::path::Path;
use std::process::Command;

use mae_models::checkpoint;

const TRAIN: &[&str] = &[
    "finetune",
    "--data-path",
    "data",
    "--model",
    "vit_tiny_patch4_28",
    "--depth",
    "1",
    "--batch-size",
    "16",
    "--epochs",
    "4",
    "--warmup-epochs",
    "1",
    "--blr",
    "5e-3",
    "--num-workers",
    "2",
    "--seed",
    "3",
];

/// Trains 4 epochs straight, and again as 2 + a resume of 2; asserts both end with the same
/// weights, that old epoch checkpoints were pruned, that the log is complete, and that `eval`
/// reproduces the recorded metrics.
/// Returns the final checkpoint's metadata.
fn stop_resume_eval(d: &Path, args: &[&str]) -> mae_models::checkpoint::CheckpointMeta {
    let full: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--output-dir", "full"])
        .collect();
    mae_train(d, &full);
    // Only the newest two epoch checkpoints (default --keep-checkpoints 2) stay, with their
    // optimizer state; checkpoint-best stays too.
    for (epoch, kept) in [(0, false), (1, false), (2, true), (3, true)] {
        for file in [
            format!("full/checkpoint-{epoch}.safetensors"),
            format!("full/checkpoint-{epoch}.optim.safetensors"),
        ] {
            assert_eq!(d.join(&file).exists(), kept, "{file}");
        }
    }
    assert!(d.join("full/checkpoint-best.safetensors").exists());

    let part: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--output-dir", "part", "--stop-after", "2"])
        .collect();
    mae_train(d, &part);
    assert!(d.join("part/checkpoint-1.safetensors").exists());
    assert!(!d.join("part/checkpoint-2.safetensors").exists());
    let resumed: Vec<&str> = args
        .iter()
        .copied()
        .chain([
            "--output-dir",
            "part",
            "--resume",
            "part/checkpoint-1.safetensors",
        ])
        .collect();
    let out = mae_train(d, &resumed);
    assert!(out.contains("Resume checkpoint"), "{out}");

    let a = checkpoint::load(&d.join("full/checkpoint-3.safetensors")).unwrap();
    let b = checkpoint::load(&d.join("part/checkpoint-3.safetensors")).unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, ta) in &a.tensors {
        let (va, vb) = (ta.to_f32_vec(), b.tensors[name].to_f32_vec());
        let worst = va
            .iter()
            .zip(&vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-6, "{name}: resumed run differs by {worst}");
    }

    // One log line per epoch with upstream keys, in order, after the resume too.
    let log = std::fs::read_to_string(d.join("part/log.txt")).unwrap();
    let epochs: Vec<u64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| {
            for k in [
                "train_lr",
                "train_loss",
                "test_acc1",
                "test_loss",
                "n_parameters",
                "test_auc",
            ] {
                assert!(v.get(k).is_some(), "log line lacks {k}: {v}");
            }
            v["epoch"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(epochs, vec![0, 1, 2, 3]);

    // eval on the validation split reproduces the metrics stored at the last epoch.
    let data = args[args.iter().position(|a| *a == "--data-path").unwrap() + 1];
    let out = mae_train(
        d,
        &[
            "eval",
            "--resume",
            "part/checkpoint-3.safetensors",
            "--data-path",
            data,
            "--split",
            "val",
            "--output",
            "eval.json",
        ],
    );
    let ev: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("eval.json")).unwrap()).unwrap();
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("part/metrics.json")).unwrap())
            .unwrap();
    for k in ["acc1", "auc", "loss"] {
        let (x, y) = (ev[k].as_f64().unwrap(), recorded[k].as_f64().unwrap());
        assert!((x - y).abs() < 1e-6, "{k}: eval {x} vs recorded {y}\n{out}");
    }
    b.meta.unwrap()
}

#[test]
fn imagefolder_run_stops_resumes_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mae_train_synth(d);
    let meta = stop_resume_eval(d, TRAIN);
    // The model learned something: validation loss fell below its first-epoch value.
    let log = std::fs::read_to_string(d.join("part/log.txt")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["test_loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let best_later = losses[1..].iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        best_later < losses[0],
        "validation loss never improved: {losses:?}"
    );
    assert_eq!(meta.class_names, vec!["circle", "square", "triangle"]);
    assert!(meta.probe.is_some());
}

/// With --model-ema the checkpoints hold the moving average, the optimizer state beside them
/// the training weights, which are those of the same run without it (the average never feeds
/// back into training); a stopped and resumed run saves the same average as an uninterrupted
/// one, and `eval` reproduces the metrics of the average.
#[test]
fn model_ema_run_saves_the_average_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mae_train_synth(d);
    let ema: Vec<&str> = TRAIN
        .iter()
        .copied()
        .chain(["--model-ema", "--model-ema-decay", "0.9"])
        .collect();
    stop_resume_eval(d, &ema);
    let plain: Vec<&str> = TRAIN
        .iter()
        .copied()
        .chain(["--output-dir", "plain"])
        .collect();
    mae_train(d, &plain);
    let averaged = checkpoint::load(&d.join("full/checkpoint-3.safetensors")).unwrap();
    let trained = checkpoint::load(&d.join("plain/checkpoint-3.safetensors")).unwrap();
    let (state, _) =
        checkpoint::safetensors::read(&d.join("full/checkpoint-3.optim.safetensors")).unwrap();
    let mut differs = 0f32;
    for (name, t) in &trained.tensors {
        let train = state[&format!("ema_train.{name}")].to_f32_vec();
        let worst = t
            .to_f32_vec()
            .iter()
            .zip(&train)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-6, "{name}: training weights differ by {worst}");
        let avg = averaged.tensors[name].to_f32_vec();
        differs = t
            .to_f32_vec()
            .iter()
            .zip(&avg)
            .map(|(x, y)| (x - y).abs())
            .fold(differs, f32::max);
    }
    // The last steps of the cosine schedule move the weights little, so the average lies close
    // to them, but well beyond the 1e-6 to which the training weights agree.
    assert!(
        differs > 1e-5,
        "the saved weights are not an average ({differs})"
    );
    // Resuming a run saved without the average is refused, naming the reason.
    let resumed: Vec<&str> = ema
        .iter()
        .copied()
        .chain([
            "--output-dir",
            "plain",
            "--resume",
            "plain/checkpoint-2.safetensors",
        ])
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_mae-train"))
        .args(&resumed)
        .current_dir(d)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("without --model-ema"), "{err}");
    // A decay outside [0, 1) is refused before anything runs.
    let out = Command::new(env!("CARGO_BIN_EXE_mae-train"))
        .args(TRAIN)
        .args([
            "--model-ema",
            "--model-ema-decay",
            "1.5",
            "--output-dir",
            "bad",
        ])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside [0, 1)"));
}

#[test]
#[cfg_attr(
    not(has_shared_data),
    ignore = "needs ../shared/data/medmnist/pneumoniamnist.npz"
)]
fn pneumoniamnist_run_stops_resumes_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let npz =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/medmnist/pneumoniamnist.npz");
    let npz = npz.to_str().unwrap();
    let args = [
        "finetune",
        "--data-path",
        npz,
        "--model",
        "vit_tiny_patch4_28",
        "--depth",
        "1",
        "--batch-size",
        "32",
        "--epochs",
        "4",
        "--warmup-epochs",
        "1",
        "--blr",
        "5e-3",
        "--num-workers",
        "2",
        "--seed",
        "1",
        "--train-samples",
        "256",
    ];
    let meta = stop_resume_eval(d, &args);
    assert_eq!(meta.task, Some(mae_models::checkpoint::Task::Binary));
    // The stratified subset is recorded.
    let subset = std::fs::read_to_string(d.join("full/train_subset.txt")).unwrap();
    assert_eq!(subset.lines().count(), 256);
}

#[test]
fn a_28_pixel_npz_trains_and_evaluates_at_input_size_64() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_npz(
        &d.join("small.npz"),
        &[
            npz_split("train", 32, 28, 28, 1, 2, 1),
            npz_split("val", 8, 28, 28, 1, 2, 2),
            npz_split("test", 8, 28, 28, 1, 2, 3),
        ],
    );
    let out = mae_train(
        d,
        &[
            "finetune",
            "--data-path",
            "small.npz",
            "--model",
            "vit_tiny_patch4_28",
            "--input-size",
            "64",
            "--depth",
            "1",
            "--batch-size",
            "16",
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "--device",
            "cpu",
            "--output-dir",
            "run",
        ],
    );
    assert!(out.contains("32 train / 8 val images"), "{out}");
    let ck = d.join("run/checkpoint-0.safetensors");
    let meta = checkpoint::load(&ck).unwrap().meta.unwrap();
    assert_eq!(
        (meta.config.img_size(), meta.preprocess.input_size),
        (64, 64)
    );
    // The 28×28 images are resized to 64 for evaluation, as in training.
    let out = mae_train(
        d,
        &[
            "eval",
            "--resume",
            ck.to_str().unwrap(),
            "--data-path",
            "small.npz",
            "--device",
            "cpu",
        ],
    );
    assert!(out.contains("8 samples"), "{out}");
}

fn mae_train_synth(d: &Path) {
    mae_train(
        d,
        &[
            "synth",
            "--output",
            "data",
            "--per-class",
            "32",
            "--size",
            "28",
        ],
    );
}

#[test]
fn bad_inputs_fail_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mae_train_synth(d);
    // A corrupt image is reported by its path.
    std::fs::write(
        d.join("data/train/circle/0000.png"),
        b"\x89PNG\r\n\x1a\nbroken",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mae-train"))
        .current_dir(d)
        .args(TRAIN)
        .args(["--output-dir", "bad"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("circle/0000.png") && !err.contains("panicked"),
        "{err}"
    );

    // A resume file that is not a checkpoint.
    std::fs::write(d.join("junk.safetensors"), b"junk").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mae-train"))
        .current_dir(d)
        .args(TRAIN)
        .args(["--output-dir", "bad2", "--resume", "junk.safetensors"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("junk.safetensors") && !err.contains("panicked"),
        "{err}"
    );
}

/// One epoch of [`TRAIN`] without RandAugment into `out`, with `extra` flags.
fn one_epoch(d: &Path, out: &str, extra: &[&str]) -> String {
    let mut v = TRAIN.to_vec();
    let i = v.iter().position(|w| *w == "--epochs").unwrap();
    v[i + 1] = "1";
    v.extend(["--output-dir", out, "--aa", "none"]);
    v.extend_from_slice(extra);
    mae_train(d, &v)
}

fn epoch0(d: &Path, run: &str) -> std::path::PathBuf {
    d.join(run).join("checkpoint-0.safetensors")
}

/// `--balance-classes`: weights n / (classes × n_class) of the training images; on a balanced
/// set every weight is 1 and training ends exactly where the unweighted loss takes it.
#[test]
fn balanced_class_weights() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mae_train_synth(d);
    let out = one_epoch(d, "bal", &["--balance-classes"]);
    assert!(
        out.contains("class weights: [1.000, 1.000, 1.000]"),
        "{out}"
    );
    one_epoch(d, "plain", &[]);
    let worst = common::max_weight_diff(&epoch0(d, "bal"), &epoch0(d, "plain"));
    assert!(worst <= 1e-6, "weighted run differs by {worst}");

    // 32 circles, 32 squares, 8 triangles: 72 / (3 × n).
    let tri = d.join("data/train/triangle");
    let mut files: Vec<_> = std::fs::read_dir(&tri)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in &files[8..] {
        std::fs::remove_file(f).unwrap();
    }
    let out = one_epoch(d, "imb", &["--balance-classes"]);
    assert!(
        out.contains("class weights: [0.750, 0.750, 3.000]"),
        "{out}"
    );
}

/// `--precision bf16|fp16` on the CPU: autocast is in effect (the weights differ from an fp32
/// run's) and training stays close to fp32; fp16 runs with its loss scaler; pretraining too.
#[test]
fn reduced_precision_runs_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mae_train_synth(d);
    let run = |out: &str, p: &str| one_epoch(d, out, &["--precision", p]);
    assert!(run("fp32", "fp32").contains("precision fp32"));
    for p in ["bf16", "fp16"] {
        let out = run(p, p);
        assert!(out.contains(&format!("precision {p}")), "{out}");
        let worst = common::max_weight_diff(&epoch0(d, "fp32"), &epoch0(d, p));
        assert!(worst.is_finite(), "{p}: weights not finite");
        println!("{p}: max |w - w_fp32| after one epoch {worst:e}");
        assert!(
            worst > 0.0,
            "{p}: identical to fp32, autocast not in effect"
        );
        assert!(worst < 1e-2, "{p}: differs from fp32 by {worst}");
    }
    let out = mae_train(
        d,
        &[
            "pretrain",
            "--data-path",
            "data",
            "--model",
            "mae_vit_tiny_patch4_28",
            "--depth",
            "1",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--precision",
            "bf16",
            "--output-dir",
            "pt",
        ],
    );
    let loss: f64 = out
        .lines()
        .find_map(|l| l.split("train_loss ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{out}");
}

/// fp16 resume is exact: the loss scaler's state (scale, good-step count, skipped steps) is
/// saved with the optimizer state and restored, so 2 epochs and a resume of 2 end with exactly
/// the weights of 4 straight epochs. A resume from the same files without the scaler's entries
/// (a negative control) ends elsewhere, so the state is what makes the difference.
#[test]
fn fp16_resume_restores_the_loss_scaler_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mae_train_synth(d);
    let fp16 = |out: &str, extra: &[&str]| {
        let mut v = TRAIN.to_vec();
        v.extend(["--aa", "none", "--precision", "fp16"]);
        v.extend(["--loss-scale-growth-interval", "2", "--output-dir", out]);
        v.extend_from_slice(extra);
        mae_train(d, &v)
    };
    fp16("full", &[]);
    fp16("part", &["--stop-after", "2"]);
    // The scaler's state was saved, and it moved away from its start (it doubles every second
    // good step and halves on overflow).
    let (mut optim, _) =
        checkpoint::safetensors::read(&d.join("part/checkpoint-1.optim.safetensors")).unwrap();
    let int = |t: &mae_models::TensorData| i64::from_le_bytes(t.data[..8].try_into().unwrap());
    let scale = f64::from_bits(int(&optim["scaler.scale_bits"]) as u64);
    let skipped = int(&optim["scaler.skipped"]);
    println!("loss scale after 2 epochs: {scale}, skipped steps: {skipped}");
    assert!(scale != 65536.0 || skipped > 0, "the scaler never changed");

    // The negative control: the same checkpoint without the scaler's entries.
    std::fs::create_dir_all(d.join("ctrl")).unwrap();
    std::fs::copy(
        d.join("part/checkpoint-1.safetensors"),
        d.join("ctrl/checkpoint-1.safetensors"),
    )
    .unwrap();
    optim.retain(|k, _| !k.starts_with("scaler."));
    checkpoint::safetensors::write(&d.join("ctrl/checkpoint-1.optim.safetensors"), &optim, None)
        .unwrap();

    let out = fp16("part", &["--resume", "part/checkpoint-1.safetensors"]);
    assert!(!out.contains("holds no loss-scaler state"), "{out}");
    let out = fp16("ctrl", &["--resume", "ctrl/checkpoint-1.safetensors"]);
    assert!(out.contains("holds no loss-scaler state"), "{out}");

    let full = d.join("full/checkpoint-3.safetensors");
    let worst = common::max_weight_diff(&full, &d.join("part/checkpoint-3.safetensors"));
    assert_eq!(worst, 0.0, "resumed fp16 run differs from the straight one");
    let worst = common::max_weight_diff(&full, &d.join("ctrl/checkpoint-3.safetensors"));
    println!("without the scaler state the resumed run ends {worst:e} away");
    assert!(
        worst > 0.0,
        "the scaler state made no difference: the test cannot tell"
    );
}

#[test]
fn bench_reports_each_step_as_json() {
    let d = tempfile::tempdir().unwrap();
    let out = mae_train(
        d.path(),
        &[
            "bench",
            "--model",
            "vit_tiny_patch4_28",
            "--depth",
            "1",
            "--batch-size",
            "4",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--device",
            "cpu",
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let steps: Vec<f64> = v["step_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(steps.len(), 3);
    assert!(steps.iter().all(|&t| t > 0.0));
    let mean = steps.iter().sum::<f64>() / 3.0;
    assert!((v["mean_ms"].as_f64().unwrap() - mean).abs() < 1e-6);
    assert!(v["min_ms"].as_f64().unwrap() <= v["median_ms"].as_f64().unwrap());
    assert_eq!(v["precision"], "fp32");
    assert_eq!(v["batch_size"], 4);
}
