//! `mae-train sweep` end to end on generated data: 2 sizes × 2 seeds × 2 inits (scratch and an
//! MAE pretraining checkpoint), interrupted after its first cell and resumed without running
//! that cell again; `sweep.csv`, `sweep.md` and `sweep.png` hold every cell. A sweep of both
//! kinds (fine-tuning and linear probing) from the same inits, run twice. Also the `eval`
//! refusal of a head trained for other classes.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{mae_train, tmp_dir};

const FINETUNE: &[&str] = &[
    "--data-path",
    "data",
    "--model",
    "vit_tiny_patch4_28",
    "--depth",
    "1",
    "--batch-size",
    "8",
    "--epochs",
    "2",
    "--warmup-epochs",
    "1",
    "--blr",
    "5e-3",
    "--aa",
    "none",
    "--num-workers",
    "1",
];

fn sweep_args() -> Vec<String> {
    let mut v: Vec<String> = [
        "sweep",
        "--train-samples",
        "16,all",
        "--seeds",
        "0,1",
        "--init",
        "scratch,mae=pt/checkpoint-0.safetensors",
        "--init-args",
        "scratch=--layer-decay 1.0",
        "--output-dir",
        "sw",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(FINETUNE.iter().map(|s| s.to_string()));
    v
}

fn setup(d: &Path) {
    let _ = std::fs::remove_dir_all(d);
    std::fs::create_dir_all(d).unwrap();
    mae_train(
        d,
        &[
            "synth",
            "--output",
            "data",
            "--per-class",
            "12",
            "--seed",
            "4",
        ],
    );
    mae_train(
        d,
        &[
            "pretrain",
            "--data-path",
            "data",
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
            "--num-workers",
            "1",
            "--output-dir",
            "pt",
        ],
    );
    assert!(d.join("pt/checkpoint-0.safetensors").exists());
}

#[test]
fn sweep_runs_every_cell_resumes_after_interruption_and_summarises() {
    let d = tmp_dir("sweep");
    setup(&d);
    let args = sweep_args();

    // --dry-run lists the 8 cells and their commands, and runs nothing.
    let mut dry: Vec<&str> = args.iter().map(String::as_str).collect();
    dry.insert(1, "--dry-run");
    let out = mae_train(&d, &dry);
    let cells = out.lines().filter(|l| l.starts_with("# init ")).count();
    assert_eq!(cells, 8, "{out}");
    assert!(
        out.contains("8 cells (2 sizes × 2 seeds × 2 inits)"),
        "{out}"
    );
    assert!(out.contains("--layer-decay 1.0"), "{out}");
    assert!(out.contains("--train-samples 16"), "{out}");
    assert!(
        out.contains("--finetune pt/checkpoint-0.safetensors"),
        "{out}"
    );
    assert!(!d.join("sw").exists(), "a dry run writes nothing");

    // The first run is stopped (the whole process group, as Ctrl-C would) once the first cell
    // has finished.
    let first = d.join("sw/cells/scratch/n16/seed0/cell.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mae-train"))
        .current_dir(&d)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !first.exists() {
        assert!(child.try_wait().unwrap().is_none(), "sweep ended early");
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "first cell never finished"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pgid = child.id().to_string();
    let killed = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .status()
        .unwrap();
    assert!(killed.success());
    let _ = child.wait();
    let first_row = std::fs::read_to_string(&first).unwrap();
    let first_mtime = std::fs::metadata(&first).unwrap().modified().unwrap();
    assert!(
        !d.join("sw/cells/mae/n16/seed0/cell.json").exists(),
        "stopped after one cell"
    );

    // Resumed: the finished cell is skipped, the rest run.
    let out = mae_train(&d, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.contains("[1/8] init scratch · 16 images · seed 0: done before, skipped"),
        "{out}"
    );
    assert_eq!(out.matches("done before, skipped").count(), 1, "{out}");
    assert_eq!(std::fs::read_to_string(&first).unwrap(), first_row);
    assert_eq!(
        std::fs::metadata(&first).unwrap().modified().unwrap(),
        first_mtime
    );

    // sweep.csv: one row per cell, with the columns the issue names.
    let csv = std::fs::read_to_string(d.join("sw/sweep.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "size,train_images,seed,init,best_epoch,val_auc,val_acc,test_auc,test_acc,train_seconds,kind"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 8, "{csv}");
    let n_all = rows.iter().find(|r| r[0] == "all").unwrap()[1];
    let n_all: usize = n_all.parse().unwrap();
    assert_eq!(n_all, 36, "12 per class × 3 classes in the training split");
    for size in ["16", "all"] {
        for seed in ["0", "1"] {
            for init in ["scratch", "mae"] {
                let r = rows
                    .iter()
                    .find(|r| r[0] == size && r[2] == seed && r[3] == init)
                    .unwrap_or_else(|| panic!("no row {size} {seed} {init}:\n{csv}"));
                let acc: f64 = r[8].parse().unwrap();
                assert!((0.0..=1.0).contains(&acc), "{r:?}");
                let auc: f64 = r[7].parse().unwrap();
                assert!((0.0..=1.0).contains(&auc), "{r:?}");
                let best: u64 = r[4].parse().unwrap();
                assert!(best < 2, "{r:?}");
                assert!(r[9].parse::<f64>().unwrap() > 0.0);
            }
        }
    }
    // Each cell trained on its size: the subset list of a 16-image cell has 16 names, and the
    // 16 images of a seed are the same for both inits.
    let subset = |init: &str, seed: u64| {
        std::fs::read_to_string(d.join(format!("sw/cells/{init}/n16/seed{seed}/train_subset.txt")))
            .unwrap()
    };
    assert_eq!(subset("scratch", 0).lines().count(), 16);
    assert_eq!(subset("scratch", 0), subset("mae", 0));
    assert_ne!(subset("scratch", 0), subset("scratch", 1));
    // The init's own flags reached its cells only.
    let args_of = |init: &str| {
        let t = std::fs::read_to_string(d.join(format!("sw/cells/{init}/n16/seed0/args.json")))
            .unwrap();
        serde_json::from_str::<serde_json::Value>(&t).unwrap()
    };
    assert_eq!(args_of("scratch")["layer_decay"], 1.0);
    assert_eq!(args_of("mae")["layer_decay"], 0.75);
    assert!(args_of("mae")["finetune"]
        .as_str()
        .unwrap()
        .ends_with("pt/checkpoint-0.safetensors"));

    // sweep.md: mean ± std per size and init; sweep.png: a real picture.
    let md = std::fs::read_to_string(d.join("sw/sweep.md")).unwrap();
    for needle in [
        "| scratch | 16 | 2 |",
        "| scratch | 36 (all) | 2 |",
        "| mae | 16 | 2 |",
        "| mae | 36 (all) | 2 |",
        " ± ",
    ] {
        assert!(md.contains(needle), "{needle:?} in\n{md}");
    }
    let png = image::open(d.join("sw/sweep.png")).unwrap();
    assert_eq!((png.width(), png.height()), (1200, 520));

    // Running it once more runs nothing.
    let out = mae_train(&d, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.matches("done before, skipped").count(), 8, "{out}");
}

#[test]
fn sweep_refuses_bad_flags_before_running_anything() {
    let d = tmp_dir("sweep-bad");
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    mae_train(&d, &["synth", "--output", "data", "--per-class", "4"]);
    let run = |extra: &[&str], tail: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mae-train"))
            .current_dir(&d)
            .args([
                "sweep",
                "--train-samples",
                "4",
                "--init",
                "scratch",
                "--output-dir",
                "sw",
            ])
            .args(extra)
            .arg("--")
            .args(tail)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&[], &["--data-path", "data", "--bogus-flag"]);
    assert!(err.contains("--bogus-flag"), "{err}");
    let err = run(&[], &["--data-path", "data", "--seed", "3"]);
    assert!(
        err.contains("--seed") && err.contains("set by the sweep"),
        "{err}"
    );
    let err = run(
        &["--init-args", "mae=--layer-decay 1"],
        &["--data-path", "data"],
    );
    assert!(err.contains("no init is named 'mae'"), "{err}");
    let err = run(&["--train-samples", "4000"], &["--data-path", "data"]);
    assert!(err.contains("more than the 12 training images"), "{err}");
    assert!(!d.join("sw").exists());
}

/// Shared flags of the two-kind sweep: both commands take every one of them.
const SHARED: &[&str] = &[
    "--data-path",
    "data",
    "--model",
    "vit_tiny_patch4_28",
    "--depth",
    "1",
    "--batch-size",
    "8",
    "--epochs",
    "2",
    "--warmup-epochs",
    "1",
    "--num-workers",
    "1",
];

#[test]
fn sweep_fine_tunes_and_linear_probes_from_the_same_inits() {
    let d = tmp_dir("sweep-kinds");
    setup(&d);
    let mut args: Vec<&str> = vec![
        "sweep",
        "--train-samples",
        "16",
        "--init",
        "scratch,mae=pt/checkpoint-0.safetensors",
        "--kinds",
        "finetune,linprobe",
        "--kind-args",
        "finetune=--aa none --blr 5e-3",
        "--kind-args",
        "linprobe=--epochs 1 --warmup-epochs 0 --blr 0.1",
        "--output-dir",
        "sw",
        "--",
    ];
    args.extend_from_slice(SHARED);

    // --dry-run lists the cells of both kinds.
    let mut dry = args.clone();
    dry.insert(1, "--dry-run");
    let out = mae_train(&d, &dry);
    assert!(
        out.contains("4 cells (1 sizes × 1 seeds × 2 inits × 2 kinds)"),
        "{out}"
    );
    for name in [
        "# init scratch · 16 images · seed 0",
        "# init scratch · linprobe · 16 images · seed 0",
        "# init mae · 16 images · seed 0",
        "# init mae · linprobe · 16 images · seed 0",
    ] {
        assert!(out.lines().any(|l| l == name), "{name:?} in\n{out}");
    }
    let lp_line = out
        .lines()
        .find(|l| l.contains(" linprobe ") && l.contains("cells/mae/linprobe/n16/seed0"))
        .unwrap_or_else(|| panic!("no linprobe command in\n{out}"));
    assert!(
        lp_line.contains("--blr 0.1") && !lp_line.contains("--aa") && !lp_line.contains("5e-3"),
        "{lp_line}"
    );
    assert!(!d.join("sw").exists(), "a dry run writes nothing");

    let out = mae_train(&d, &args);
    assert_eq!(out.matches(": training (").count(), 4, "{out}");
    let cell = |init: &str, kind: &str| {
        let k = if kind == "linprobe" { "linprobe/" } else { "" };
        d.join(format!("sw/cells/{init}/{k}n16/seed0"))
    };
    for init in ["scratch", "mae"] {
        for kind in ["finetune", "linprobe"] {
            let dir = cell(init, kind);
            for f in ["cell.json", "test.json", "checkpoint-best.safetensors"] {
                assert!(dir.join(f).is_file(), "{}/{f}", dir.display());
            }
        }
    }
    // Each kind ran its own command with its own recipe, on the same 16 images.
    let args_of = |init: &str, kind: &str| {
        let t = std::fs::read_to_string(cell(init, kind).join("args.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&t).unwrap()
    };
    let lp = args_of("mae", "linprobe");
    assert_eq!(
        (lp["epochs"].as_u64(), lp["blr"].as_f64()),
        (Some(1), Some(0.1))
    );
    assert!(lp.get("aa").is_none(), "{lp}");
    assert!(lp["finetune"]
        .as_str()
        .unwrap()
        .ends_with("pt/checkpoint-0.safetensors"));
    let ft = args_of("mae", "finetune");
    assert_eq!(
        (ft["epochs"].as_u64(), ft["blr"].as_f64()),
        (Some(2), Some(5e-3))
    );
    assert_eq!(ft["aa"], "none");
    let subset =
        |kind: &str| std::fs::read_to_string(cell("mae", kind).join("train_subset.txt")).unwrap();
    assert_eq!(subset("finetune"), subset("linprobe"));

    // sweep.csv: a row per cell with its kind; sweep.md: a table per kind.
    let csv = std::fs::read_to_string(d.join("sw/sweep.csv")).unwrap();
    let mut lines = csv.lines();
    assert!(
        lines.next().unwrap().ends_with(",train_seconds,kind"),
        "{csv}"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 4, "{csv}");
    for init in ["scratch", "mae"] {
        for kind in ["finetune", "linprobe"] {
            let r = rows
                .iter()
                .find(|r| r[3] == init && r[10] == kind)
                .unwrap_or_else(|| panic!("no row {init} {kind}:\n{csv}"));
            let acc: f64 = r[8].parse().unwrap();
            assert!((0.0..=1.0).contains(&acc), "{r:?}");
        }
    }
    let md = std::fs::read_to_string(d.join("sw/sweep.md")).unwrap();
    let (ft_at, lp_at) = (
        md.find("## Fine-tuning").unwrap(),
        md.find("## Linear probing").unwrap(),
    );
    for (at, init) in [
        (ft_at, "scratch"),
        (ft_at, "mae"),
        (lp_at, "scratch"),
        (lp_at, "mae"),
    ] {
        assert!(md[at..].contains(&format!("| {init} | 16 | 1 |")), "{md}");
    }
    let png = image::open(d.join("sw/sweep.png")).unwrap();
    assert_eq!((png.width(), png.height()), (1200, 520));

    // The same command again runs nothing new.
    let mtime = |init: &str, kind: &str| {
        std::fs::metadata(cell(init, kind).join("cell.json"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before = mtime("mae", "linprobe");
    let out = mae_train(&d, &args);
    assert_eq!(out.matches("done before, skipped").count(), 4, "{out}");
    assert!(!out.contains(": training ("), "{out}");
    assert_eq!(mtime("mae", "linprobe"), before);
}

#[test]
fn sweep_refuses_a_flag_a_kind_does_not_take_before_running_anything() {
    let d = tmp_dir("sweep-kinds-bad");
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    mae_train(&d, &["synth", "--output", "data", "--per-class", "4"]);
    let run = |extra: &[&str], tail: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mae-train"))
            .current_dir(&d)
            .args([
                "sweep",
                "--train-samples",
                "4",
                "--init",
                "scratch",
                "--kinds",
                "finetune,linprobe",
                "--output-dir",
                "sw",
            ])
            .args(extra)
            .args(["--", "--data-path", "data"])
            .args(tail)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // A shared fine-tune flag: named, with the kind that refuses it and where it belongs.
    let err = run(&[], &["--aa", "none"]);
    assert!(
        err.contains("--aa is not a flag of `mae-train linprobe`")
            && err.contains("--kind-args 'finetune=--aa none'"),
        "{err}"
    );
    // A kind's own flag its command does not take.
    let err = run(&["--kind-args", "linprobe=--layer-decay 1.0"], &[]);
    assert!(
        err.contains("linprobe flags are not valid") && err.contains("--layer-decay"),
        "{err}"
    );
    let err = run(&["--kind-args", "pretrain=--epochs 1"], &[]);
    assert!(err.contains("'pretrain' is not among --kinds"), "{err}");
    let err = run(&["--kind-args", "linprobe=--seed 1"], &[]);
    assert!(err.contains("--seed is set by the sweep"), "{err}");
    assert!(!d.join("sw").exists(), "nothing ran");
}

/// `--size-args` gives one size's cells of every kind their own flags, over the shared and
/// the kind's; a size not swept and a flag the sweep sets are refused before anything runs.
#[test]
fn sweep_size_args_reach_that_size_only() {
    let d = tmp_dir("sweep-size-args");
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    mae_train(&d, &["synth", "--output", "data", "--per-class", "12"]);
    let args = |size_args: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "sweep",
            "--dry-run",
            "--train-samples",
            "8,all",
            "--init",
            "scratch",
            "--kinds",
            "finetune,linprobe",
            "--kind-args",
            "linprobe=--epochs 5",
            "--output-dir",
            "sw",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(size_args.iter().map(|s| s.to_string()));
        v.extend(["--", "--data-path", "data", "--epochs", "3"].map(String::from));
        v
    };
    let a = args(&["--size-args", "all=--epochs 1 --warmup-epochs 0"]);
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    let out = mae_train(&d, &a);
    let line = |cell: &str| {
        out.lines()
            .find(|l| !l.starts_with('#') && l.contains(" --output-dir ") && l.contains(cell))
            .unwrap_or_else(|| panic!("no command for {cell} in\n{out}"))
            .to_string()
    };
    let ft8 = line("cells/scratch/n8/seed0");
    let lp8 = line("cells/scratch/linprobe/n8/seed0");
    let ft_all = line("cells/scratch/nall/seed0");
    let lp_all = line("cells/scratch/linprobe/nall/seed0");
    assert!(
        ft8.contains("--epochs 3") && !ft8.contains("--warmup-epochs"),
        "{ft8}"
    );
    assert!(
        lp8.contains("--epochs 5") && !lp8.contains("--epochs 3"),
        "{lp8}"
    );
    for l in [&ft_all, &lp_all] {
        assert!(
            l.contains("--epochs 1 --warmup-epochs 0")
                && !l.contains("--epochs 3")
                && !l.contains("--epochs 5"),
            "{l}"
        );
    }
    let refused = |size_args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mae-train"))
            .current_dir(&d)
            .args(args(size_args))
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused(&["--size-args", "100=--epochs 1"]);
    assert!(
        err.contains("'100' is not among --train-samples (8,all)"),
        "{err}"
    );
    let err = refused(&["--size-args", "all=--seed 2"]);
    assert!(err.contains("--seed is set by the sweep"), "{err}");
    let err = refused(&["--size-args", "all=--aa none"]);
    assert!(
        err.contains("linprobe flags are not valid") && err.contains("--aa"),
        "{err}"
    );
    assert!(!d.join("sw").exists(), "nothing ran");
}

/// The seed's step 5: an ImageNet-head checkpoint (1000 classes, official `.pth` layout) on a
/// data set of a few classes stops with a clear message and prints no metrics.
#[test]
fn eval_refuses_a_head_trained_for_other_classes() {
    let d = tmp_dir("eval-head");
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    mae_train(&d, &["synth", "--output", "eval_data", "--per-class", "4"]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = serde_json::json!({
        "img_size": 28, "patch_size": 4, "embed_dim": 192, "depth": 1, "num_heads": 3,
        "num_classes": 1000, "global_pool": true,
    });
    let mut py = Command::new(root.join("../.venv/bin/python"))
        .arg(root.join("../tests/fixtures/timm_reference.py"))
        .args(["save", "mae_finetuned_vit_base.pth"])
        .current_dir(&d)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut py.stdin.take().unwrap(), cfg.to_string().as_bytes()).unwrap();
    assert!(py.wait().unwrap().success());
    let eval = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mae-train"))
            .current_dir(&d)
            .args([
                "eval",
                "--resume",
                "mae_finetuned_vit_base.pth",
                "--data-path",
                "eval_data",
            ])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = eval(&["--model", "vit_tiny_patch4_28", "--depth", "1"]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("head has 1000 classes"), "{stderr}");
    assert!(
        stderr.contains("has 3 (circle, square, triangle)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("fine-tune") && stderr.contains("linear-probe"),
        "{stderr}"
    );
    assert!(
        !stdout.contains("acc1") && !stdout.to_lowercase().contains("auc"),
        "{stdout}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Without --model, the file's missing architecture is named.
    let (code, _, stderr) = eval(&[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("--model"), "{stderr}");
}
