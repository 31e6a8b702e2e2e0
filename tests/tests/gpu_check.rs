//! `scripts/gpu/check.sh --dry-run`: the GPU check's six steps on the CPU with tiny models,
//! against this profile's binaries, so the script is known to work before a GPU is lent. The
//! assertions are on the JSON it writes (every step present, sane values), never on speed.

use std::path::{Path, PathBuf};
use std::process::Command;

use mae_tests::{python, workspace_root};
use serde_json::Value;

/// target/<profile>, where this test's binaries are.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable inside target/<profile>/deps")
        .to_path_buf()
}

fn check_sh() -> Command {
    let mut cmd = Command::new(workspace_root().join("scripts/gpu/check.sh"));
    cmd.env("PYTHON", python()).env_remove("OUT");
    cmd
}

fn num(v: &Value, path: &str) -> f64 {
    let mut cur = v;
    for key in path.split('.') {
        cur = match (cur.is_array(), key.parse::<usize>()) {
            (true, Ok(i)) => &cur[i],
            _ => &cur[key],
        };
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number: {cur}"))
}

fn positive(v: &Value, path: &str) {
    let x = num(v, path);
    assert!(x.is_finite() && x > 0.0, "{path} = {x}, expected > 0");
}

#[test]
fn dry_run_writes_every_step_with_sane_values() {
    let out = tempfile::tempdir().expect("temporary folder");
    let run = check_sh()
        .arg("--dry-run")
        .arg("--bin")
        .arg(bin_dir())
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("cannot run scripts/gpu/check.sh");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let json_path = out.path().join("check.json");
    let json = std::fs::read_to_string(&json_path).unwrap_or_default();
    assert!(
        run.status.success(),
        "check.sh --dry-run failed ({}):\nstdout:\n{}\nstderr:\n{}\ncheck.json:\n{json}",
        run.status,
        text(&run.stdout),
        text(&run.stderr)
    );
    let r: Value = serde_json::from_str(&json).expect("check.json is JSON");
    assert_eq!(r["mode"], "dry-run");
    assert_eq!(r["complete"], true);
    let steps = r["steps"].as_array().expect("steps");
    let names: Vec<&str> = steps.iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "info",
            "finetune_throughput",
            "pretrain_throughput",
            "short_finetune",
            "launch_nccl",
            "mae_run_cuda"
        ]
    );
    for s in steps {
        assert_eq!(s["status"], "ok", "step {}: {s:#}", s["name"]);
        let secs = num(s, "seconds");
        assert!(secs <= num(s, "budget_s") + 5.0, "step over budget: {s:#}");
    }

    // 1. what libtorch sees, and PyTorch beside it.
    assert!(steps[0]["mae_train"]["cuda_available"].is_string());
    assert!(steps[0]["torch"]["torch"]
        .as_str()
        .is_some_and(|v| v.starts_with("2.")));

    // 2. and 3. throughput of mae-train and of each PyTorch mode, with their ratios.
    let ft = &steps[1];
    positive(ft, "trainer.images_per_s");
    for mode in ["eager-fp32", "eager-bf16", "compile-bf16"] {
        let m = &ft["torch"]["modes"][mode];
        assert_eq!(m["status"], "ok", "{mode}: {m}");
        positive(m, "images_per_s");
        positive(m, "loss");
        positive(ft, &format!("ratios.trainer_vs_{mode}"));
    }
    let cases = ft_cases(&steps[2]);
    assert_eq!(cases.len(), 2);
    for case in cases {
        positive(case, "trainer.images_per_s");
        for mode in ["eager-fp32", "eager-bf16"] {
            positive(&case["torch"]["modes"][mode], "images_per_s");
        }
        positive(case, "ratios.trainer_vs_eager-bf16");
    }

    // 4. a finite, falling loss and a test AUC in [0, 1] in both precisions.
    for precision in ["bf16", "fp16"] {
        let run = &steps[3]["runs"][precision];
        assert_eq!(run["status"], "ok", "{precision}: {run:#}");
        let losses: Vec<f64> = run["train_loss"]
            .as_array()
            .expect("train_loss")
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        assert_eq!(losses.len(), 2, "{precision}: {losses:?}");
        assert!(
            losses.iter().all(|l| l.is_finite()) && losses[1] < losses[0],
            "{precision}: {losses:?}"
        );
        let auc = num(run, "test.auc");
        assert!((0.0..=1.0).contains(&auc), "{precision}: test AUC {auc}");
    }

    // 5. the same run under `launch`, with its second epoch timed beside the plain run's.
    let launch = &steps[4];
    assert_eq!(launch["launch"]["dist_backend"], "gloo");
    positive(launch, "epoch1_s.plain");
    positive(launch, "epoch1_s.launch");
    positive(launch, "launch_vs_plain");

    // 6. exports, mae-run beside ORT's Python session, and fp32 parity with tract.
    let rt = &steps[5];
    assert!(
        rt["cuda_provider"]
            .as_str()
            .is_some_and(|s| s.starts_with("unsupported: no CUDA provider")
                || s.ends_with("(not used in the dry run)")),
        "{}",
        rt["cuda_provider"]
    );
    for precision in ["fp32", "fp16"] {
        positive(rt, &format!("exports.{precision}"));
        let b = &rt["bench"][precision];
        for side in ["mae_run", "ort_python"] {
            let batches = b[side]["batches"].as_array().expect("batches");
            assert_eq!(batches.len(), 2, "{precision} {side}: {b:#}");
            for x in batches {
                positive(x, "images_per_s");
            }
        }
        positive(b, "mae_run_vs_ort_python.1");
    }
    let parity = &rt["parity_fp32"];
    assert!(num(parity, "inputs") >= 1.0);
    assert!(num(parity, "max_abs_diff") <= 1e-3, "{parity}");

    let table = std::fs::read_to_string(out.path().join("check.md")).expect("check.md");
    for heading in ["## 2.", "## 3.", "## 4.", "## 5.", "## 6."] {
        assert!(
            table.contains(heading),
            "check.md has no {heading}:\n{table}"
        );
    }
}

fn ft_cases(step: &Value) -> &Vec<Value> {
    step["cases"].as_array().expect("cases")
}

#[test]
fn bad_arguments_are_refused_by_name() {
    let out = check_sh()
        .arg("--bogus")
        .output()
        .expect("cannot run check.sh");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown argument '--bogus'"));

    let dir = tempfile::tempdir().expect("temporary folder");
    let out = check_sh()
        .args(["--dry-run", "--bin"])
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path().join("out"))
        .output()
        .expect("cannot run check.sh");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mae-train is missing"), "{err}");
    assert!(!dir.path().join("out/check.json").exists());
}
