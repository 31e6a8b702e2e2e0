//! The three binaries, end to end in temporary folders.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};

use mae_tests::{python, workspace_root, TestCommand};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn every_binary_answers_help_and_version() {
    let dir = tmp();
    for bin in ["mae-train", "mae-export", "mae-run"] {
        let help = TestCommand::new(bin, dir.path()).args(["--help"]).stdout();
        assert!(help.contains("Usage:"), "{bin}: {help}");
        let version = TestCommand::new(bin, dir.path())
            .args(["--version"])
            .stdout();
        assert!(version.starts_with(bin), "{bin}: {version}");
    }
}

/// Reads the dynamic section of an ELF file with binutils' readelf.
fn dynamic_section(path: &Path) -> String {
    let out = Command::new("readelf")
        .arg("-d")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "readelf failed on {}", path.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn mae_train_keeps_libtorch_cuda_and_runs_without_ld_library_path() {
    let dir = tmp();
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("mae-train");
    let dynamic = dynamic_section(&bin);
    assert!(
        dynamic.contains("[libtorch_cuda.so]"),
        "libtorch_cuda.so not linked:\n{dynamic}"
    );
    assert!(dynamic.contains("[libtorch_cpu.so]"), "{dynamic}");
    assert!(
        dynamic.contains("RUNPATH") && dynamic.contains("torch/lib"),
        "{dynamic}"
    );

    let info = TestCommand::new("mae-train", dir.path())
        .env_remove("LD_LIBRARY_PATH")
        .args(["info"])
        .stdout();
    assert!(info.contains("cuda available:"), "{info}");
    assert!(info.contains("cpu threads:"), "{info}");
}

#[test]
fn exporter_and_runtime_do_not_depend_on_libtorch() {
    for pkg in ["mae-exporter", "mae-runtime"] {
        let out = Command::new(env!("CARGO"))
            .current_dir(workspace_root())
            .args([
                "tree",
                "--offline",
                "-e",
                "normal,build",
                "--prefix",
                "none",
                "-p",
                pkg,
            ])
            .output()
            .unwrap();
        let tree = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "cargo tree -p {pkg} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(tree.contains(pkg), "{tree}");
        for banned in ["tch ", "torch-sys "] {
            assert!(!tree.contains(banned), "{pkg} depends on {banned}:\n{tree}");
        }
    }
}

#[test]
fn models_lists_the_zoo_and_rejects_bad_combinations() {
    let dir = tmp();
    let list = TestCommand::new("mae-train", dir.path())
        .args(["models"])
        .stdout();
    for name in [
        "vit_base_patch16",
        "vit_large_patch16",
        "vit_huge_patch14",
        "mae_vit_base_patch16",
        "mae_vit_large_patch16",
        "mae_vit_huge_patch14",
        "vit_tiny_patch4_28",
        "vit_small_patch8_64",
        "mae_vit_tiny_patch4_28",
    ] {
        assert!(
            list.lines()
                .any(|l| l.split_whitespace().next() == Some(name)),
            "{name} missing:\n{list}"
        );
    }
    let table = TestCommand::new("mae-train", dir.path())
        .args(["models", "--model", "vit_base_patch16", "--nb-classes", "2"])
        .stdout();
    assert!(
        table.contains("head.weight") && table.contains("[2, 768]"),
        "{table}"
    );
    let err = TestCommand::new("mae-train", dir.path())
        .args([
            "models",
            "--model",
            "vit_base_patch16",
            "--input-size",
            "30",
        ])
        .fails();
    assert!(err.contains("30×30") && err.contains("patch 16"), "{err}");
    let err = TestCommand::new("mae-train", dir.path())
        .args([
            "models",
            "--model",
            "mae_vit_base_patch16",
            "--patch-size",
            "16",
            "--input-size",
            "224",
            "--depth",
            "0",
        ])
        .fails();
    assert!(err.contains("depth"), "{err}");
}

/// Saves a seeded timm ViT as an official-style `{"model": state_dict}` file.
fn timm_checkpoint(dir: &Path, cfg: &str) -> std::path::PathBuf {
    let path = dir.join("official.pth");
    let script = workspace_root().join("tests/fixtures/timm_reference.py");
    let mut child = Command::new(python())
        .arg(script)
        .arg("save")
        .arg(&path)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(cfg.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    path
}

#[test]
fn inspect_reports_how_a_pytorch_checkpoint_loads() {
    let dir = tmp();
    let ck = timm_checkpoint(
        dir.path(),
        r#"{"img_size":28,"patch_size":4,"embed_dim":192,"depth":2,"num_heads":3,"num_classes":3}"#,
    );
    let args = [
        "inspect",
        ck.to_str().unwrap(),
        "--model",
        "vit_tiny_patch4_28",
        "--depth",
        "2",
    ];
    let same = TestCommand::new("mae-train", dir.path())
        .args(args)
        .args(["--nb-classes", "3"])
        .stdout();
    assert!(same.contains("<All keys matched successfully>"), "{same}");

    // Another class count: the head is reported as shape-mismatched and the command fails.
    let err = TestCommand::new("mae-train", dir.path())
        .args(args)
        .args(["--nb-classes", "5"])
        .fails();
    assert!(err.contains("shapes other than the model's"), "{err}");

    // The exporter reads the same file without libtorch.
    let out = TestCommand::new("mae-export", dir.path())
        .args([
            "--inspect",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--model",
            "vit_tiny_patch4_28",
        ])
        .stdout();
    assert!(
        out.contains("unexpected_keys=['blocks.1.") || out.contains("missing_keys=['blocks.2."),
        "{out}"
    );
}

#[test]
fn damaged_checkpoints_fail_cleanly_naming_the_file() {
    let dir = tmp();
    let cases: [(&str, &[u8]); 4] = [
        ("empty.pth", b""),
        ("random.pth", b"\x13\x37not a checkpoint at all, just bytes"),
        ("truncated.pth", b"PK\x03\x04\x14\x00\x00\x00"),
        ("header.safetensors", b"\xff\xff\xff\xff\xff\xff\xff\x7f{"),
    ];
    for (name, bytes) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let err = TestCommand::new("mae-train", dir.path())
            .args(["inspect", name])
            .fails();
        assert!(err.contains(name), "{name}: {err}");
        let err = TestCommand::new("mae-export", dir.path())
            .args([
                "--inspect",
                "--checkpoint",
                name,
                "--model",
                "vit_base_patch16",
            ])
            .fails();
        assert!(err.contains(name), "{name}: {err}");
    }
    let err = TestCommand::new("mae-train", dir.path())
        .args(["inspect", "absent.pth"])
        .fails();
    assert!(err.contains("absent.pth"), "{err}");
}

#[test]
fn synth_writes_an_imagefolder_tree() {
    let dir = tmp();
    let out = TestCommand::new("mae-train", dir.path())
        .args([
            "synth",
            "--output",
            "data",
            "--per-class",
            "8",
            "--size",
            "32",
        ])
        .stdout();
    assert!(out.contains("wrote 48 images"), "{out}");
    for split in ["train", "val", "test"] {
        for class in ["circle", "square", "triangle"] {
            let n = std::fs::read_dir(dir.path().join("data").join(split).join(class))
                .unwrap()
                .count();
            assert_eq!(n, if split == "train" { 8 } else { 4 }, "{split}/{class}");
        }
    }
}
