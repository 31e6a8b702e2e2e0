//! Data-parallel training on libtorch's c10d engine, CPU with Gloo over loopback: 2 ranks ×
//! batch 4 end where 1 process × batch 8 does, sharded evaluation is exact, a lost rank ends
//! the other with a clear error, and the launchers behave.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::mae_train;
use mae_models::checkpoint;

const BIN: &str = env!("CARGO_BIN_EXE_mae-train");

/// 42 train images (5 full batches of 8), 11 validation images (odd).
fn data(d: &Path) {
    let out = mae_train(
        d,
        &[
            "synth",
            "--output",
            "data",
            "--per-class",
            "14",
            "--size",
            "28",
        ],
    );
    assert!(out.contains("42 train, 12 val"), "{out}");
    let val = d.join("data/val/circle");
    let first = std::fs::read_dir(&val).unwrap().next().unwrap().unwrap();
    std::fs::remove_file(first.path()).unwrap();
}

const FINETUNE: &[&str] = &[
    "finetune",
    "--data-path",
    "data",
    "--model",
    "vit_tiny_patch4_28",
    "--depth",
    "2",
    "--epochs",
    "1",
    "--warmup-epochs",
    "0",
    "--blr",
    "5e-2",
    "--aa",
    "none",
    "--reprob",
    "0",
    "--mixup",
    "0",
    "--cutmix",
    "0",
    "--drop-path",
    "0",
    "--clip-grad",
    "1.0",
    "--num-workers",
    "1",
    "--seed",
    "5",
    "--device",
    "cpu",
];

const PRETRAIN: &[&str] = &[
    "pretrain",
    "--data-path",
    "data",
    "--model",
    "mae_vit_tiny_patch4_28",
    "--depth",
    "2",
    "--epochs",
    "1",
    "--warmup-epochs",
    "0",
    "--blr",
    "5e-3",
    "--num-workers",
    "1",
    "--seed",
    "5",
    "--device",
    "cpu",
];

fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    base.iter().chain(extra).copied().collect()
}

/// `args` with the value of `flag` replaced.
fn set<'a>(args: &[&'a str], flag: &str, value: &'a str) -> Vec<&'a str> {
    let mut v = args.to_vec();
    let i = v.iter().position(|w| *w == flag).unwrap();
    v[i + 1] = value;
    v
}

/// Asserts the two checkpoints hold the same tensors within `tol`; returns the largest
/// difference. The key part of each `attn.qkv.bias` is the exception: softmax does not depend
/// on it, so its true gradient is zero and what AdamW sees there is rounding noise, which its
/// normalisation scales up to steps of up to `lr`; it is checked against `10 × tol`.
fn same_weights(a: &Path, b: &Path, tol: f32) -> f32 {
    let a = checkpoint::load(a).unwrap();
    let b = checkpoint::load(b).unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
    let mut worst = 0f32;
    for (name, ta) in &a.tensors {
        let (va, vb) = (ta.to_f32_vec(), b.tensors[name].to_f32_vec());
        let third = va.len() / 3;
        for (i, (x, y)) in va.iter().zip(&vb).enumerate() {
            let w = (x - y).abs();
            if name.ends_with("attn.qkv.bias") && (third..2 * third).contains(&i) {
                assert!(w <= 10.0 * tol, "{name}[{i}] (key bias): differs by {w}");
            } else {
                assert!(w <= tol, "{name}[{i}]: differs by {w}");
                worst = worst.max(w);
            }
        }
    }
    worst
}

/// [`same_weights`] on the epoch-0 checkpoints of two runs of `d`.
fn same_epoch0(d: &Path, a: &str, b: &str, tol: f32) -> f32 {
    let ck = |run: &str| d.join(run).join("checkpoint-0.safetensors");
    same_weights(&ck(a), &ck(b), tol)
}

/// `mae-train launch --nproc-per-node n -- cmd...` in `d`; returns its standard output.
fn launch(d: &Path, n: usize, cmd: &[&str]) -> String {
    let n = n.to_string();
    mae_train(d, &with(&["launch", "--nproc-per-node", &n, "--"], cmd))
}

/// Asserts that training moved the weights away from `init` (so equality above means something).
fn trained(init: &Path, after: &Path) {
    let a = checkpoint::load(init).unwrap();
    let b = checkpoint::load(after).unwrap();
    let moved = a
        .tensors
        .iter()
        .filter(|(n, _)| n.starts_with("blocks"))
        .any(|(n, t)| {
            t.to_f32_vec()
                .iter()
                .zip(b.tensors[n].to_f32_vec())
                .any(|(x, y)| (x - y).abs() > 1e-4)
        });
    assert!(moved, "training left the weights unchanged");
}

#[test]
fn two_ranks_of_batch_4_match_one_process_of_batch_8() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    data(d);

    // Fine-tuning: 5 steps.
    mae_train(
        d,
        &with(FINETUNE, &["--batch-size", "8", "--output-dir", "one"]),
    );
    let out = launch(
        d,
        2,
        &with(FINETUNE, &["--batch-size", "4", "--output-dir", "two"]),
    );
    assert!(
        out.contains("distributed: 2 processes, backend gloo"),
        "{out}"
    );
    assert!(out.contains("effective batch size: 8"), "{out}");
    let w = same_epoch0(d, "one", "two", 1e-5);
    println!("fine-tuning, 5 steps: max |Δw| {w:e}");
    // Only rank 0 wrote: one log line, one checkpoint.
    let log = std::fs::read_to_string(d.join("two/log.txt")).unwrap();
    assert_eq!(log.lines().count(), 1, "{log}");

    // One process through `launch` joins a process group of one and trains the same.
    let out = launch(
        d,
        1,
        &with(FINETUNE, &["--batch-size", "8", "--output-dir", "solo"]),
    );
    assert!(
        out.contains("distributed: 1 processes, backend gloo"),
        "{out}"
    );
    same_epoch0(d, "one", "solo", 1e-6);

    // Gradient accumulation: 2 ranks × batch 2 × 2 micro-batches, all-reduced on the step.
    launch(
        d,
        2,
        &with(
            FINETUNE,
            &[
                "--batch-size",
                "2",
                "--accum-iter",
                "2",
                "--output-dir",
                "acc",
            ],
        ),
    );
    let w = same_epoch0(d, "one", "acc", 1e-5);
    println!("fine-tuning, 2 ranks × 2 × accum 2: max |Δw| {w:e}");

    // A one-process checkpoint resumes on two ranks.
    let out = launch(
        d,
        2,
        &with(
            &set(FINETUNE, "--epochs", "2"),
            &[
                "--batch-size",
                "4",
                "--output-dir",
                "one",
                "--resume",
                "one/checkpoint-0.safetensors",
            ],
        ),
    );
    assert!(out.contains("Resume checkpoint"), "{out}");
    assert!(d.join("one/checkpoint-1.safetensors").exists());

    // The same from a zero-step run, to know the weights did move.
    mae_train(
        d,
        &with(
            &set(FINETUNE, "--blr", "0"),
            &["--batch-size", "8", "--output-dir", "zero"],
        ),
    );
    trained(
        &d.join("zero/checkpoint-0.safetensors"),
        &d.join("two/checkpoint-0.safetensors"),
    );

    // Pretraining: 5 steps; masks are drawn per image, so both runs mask alike.
    mae_train(
        d,
        &with(PRETRAIN, &["--batch-size", "8", "--output-dir", "pt-one"]),
    );
    launch(
        d,
        2,
        &with(PRETRAIN, &["--batch-size", "4", "--output-dir", "pt-two"]),
    );
    let w = same_epoch0(d, "pt-one", "pt-two", 1e-5);
    println!("pretraining, 5 steps: max |Δw| {w:e}");

    // Sharded evaluation over 2 ranks of the 11 validation images: the metrics of one process.
    let ck = "one/checkpoint-0.safetensors";
    let eval = [
        "eval",
        "--resume",
        ck,
        "--data-path",
        "data",
        "--split",
        "val",
        "--batch-size",
        "4",
        "--device",
        "cpu",
    ];
    mae_train(d, &with(&eval, &["--output", "m1.json"]));
    launch(d, 2, &with(&eval, &["--output", "m2.json", "--dist-eval"]));
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join(f)).unwrap()).unwrap()
    };
    let (m1, m2) = (read("m1.json"), read("m2.json"));
    for key in ["samples", "acc1", "auc", "confusion", "per_class"] {
        assert!(!m1[key].is_null(), "{key} missing: {m1}");
        assert_eq!(m1[key], m2[key], "{key}: {m1} vs {m2}");
    }
    assert_eq!(m1["samples"].as_u64(), Some(11), "{m1}");
    let (l1, l2) = (m1["loss"].as_f64().unwrap(), m2["loss"].as_f64().unwrap());
    assert!((l1 - l2).abs() <= 1e-6, "loss {l1} vs {l2}");
}

fn spawn_rank(d: &Path, rank: usize, port: u16, args: &[&str]) -> Child {
    Command::new(BIN)
        .current_dir(d)
        .args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn stderr_of(c: Child) -> (std::process::ExitStatus, String) {
    let out = c.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_killed_rank_ends_the_other_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    data(d);
    let port = free_port();
    let args = with(
        &set(FINETUNE, "--epochs", "500"),
        &[
            "--batch-size",
            "4",
            "--output-dir",
            "run",
            "--dist-timeout",
            "60",
        ],
    );
    let mut r0 = spawn_rank(d, 0, port, &args);
    let mut r1 = spawn_rank(d, 1, port, &args);
    // Both are training once rank 0 has logged an epoch.
    let start = Instant::now();
    while !d.join("run/log.txt").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no epoch logged"
        );
        assert!(r0.try_wait().unwrap().is_none(), "rank 0 ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    r1.kill().unwrap();
    r1.wait().unwrap();
    let killed = Instant::now();
    let (status, err) = stderr_of(r0);
    let took = killed.elapsed();
    println!(
        "rank 0 exited {:.1}s after rank 1 was killed: {err}",
        took.as_secs_f64()
    );
    assert!(!status.success());
    assert!(took < Duration::from_secs(120), "took {took:?}");
    assert!(
        err.contains("rank 0 of 2") && err.contains("failed"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn ranks_with_different_models_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    data(d);
    let port = free_port();
    let a0 = with(FINETUNE, &["--batch-size", "4", "--output-dir", "run"]);
    let a1 = set(&a0, "--depth", "3");
    let r0 = spawn_rank(d, 0, port, &a0);
    let r1 = spawn_rank(d, 1, port, &a1);
    for (rank, c) in [(0, r0), (1, r1)] {
        let (status, err) = stderr_of(c);
        assert!(!status.success(), "rank {rank} succeeded");
        assert!(err.contains("differs between ranks"), "rank {rank}: {err}");
    }
}

#[test]
fn launch_fails_on_a_bad_command() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .current_dir(d)
            .args(args)
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (status, err) = run(&["launch", "--nproc-per-node", "2", "--", "synth"]);
    assert!(!status.success());
    assert!(err.contains("cannot launch 'synth'"), "{err}");
    let (status, err) = run(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--",
        "finetune",
        "--data-path",
        "absent",
    ]);
    assert!(!status.success());
    assert!(err.contains("absent") && err.contains("rank"), "{err}");
    let (status, _) = run(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--",
        "finetune",
        "--bogus",
    ]);
    assert!(!status.success());
}

#[test]
fn slurm_dry_run_writes_a_batch_script() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = mae_train(
        d,
        &[
            "slurm",
            "--nodes",
            "4",
            "--gpus-per-node",
            "8",
            "--partition",
            "gpu",
            "--timeout",
            "600",
            "--job-dir",
            "job",
            "--dry-run",
            "--",
            "pretrain",
            "--data-path",
            "/data/chest x-rays",
            "--model",
            "mae_vit_large_patch16",
        ],
    );
    assert!(out.contains("submit.sbatch"), "{out}");
    let script = std::fs::read_to_string(d.join("job/submit.sbatch")).unwrap();
    let directive = |k: &str| -> String {
        script
            .lines()
            .find_map(|l| l.strip_prefix(&format!("#SBATCH --{k}=")))
            .unwrap_or_else(|| panic!("no --{k} in\n{script}"))
            .to_string()
    };
    assert!(script.starts_with("#!/bin/bash\n"));
    assert_eq!(directive("nodes"), "4");
    assert_eq!(directive("ntasks-per-node"), "8");
    assert_eq!(directive("gpus-per-node"), "8");
    assert_eq!(directive("partition"), "gpu");
    assert_eq!(directive("time"), "600");
    let srun = script.lines().find(|l| l.starts_with("srun ")).unwrap();
    let job = d.join("job").canonicalize().unwrap();
    // The script names the executable as the running process sees it (links resolved).
    let bin = std::path::Path::new(BIN).canonicalize().unwrap();
    assert!(srun.contains(&*bin.to_string_lossy()), "{srun}");
    assert!(
        srun.contains("pretrain --data-path '/data/chest x-rays' --model mae_vit_large_patch16"),
        "{srun}"
    );
    assert!(
        srun.ends_with(&format!("--output-dir {}", job.display())),
        "{srun}"
    );
    assert!(script.contains("MASTER_PORT"), "{script}");
}
