//! The shared input layer end to end: an ImageFolder tree with every image format, DICOM, odd
//! class names, mixed-case extensions and a stray file is read by `mae-train` and `mae-run` with
//! exactly the samples and labels of `torchvision.datasets.ImageFolder`; a DICOM-only tree
//! trains and evaluates, its multi-frame files row by row; closed output pipes end the tools
//! quietly.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;

use mae_tests::{python, workspace_root, TestCommand};

/// Probabilities of PyTorch (mae-train) and of the exported model may differ by this much.
const TOL: f32 = 1e-4;

/// Writes the tree of `tests/fixtures/imagefolder_tree.py` under `dir/data` and returns it with
/// torchvision's reference samples.
fn tree(dir: &Path, extra: &[&str]) -> (PathBuf, serde_json::Value) {
    let data = dir.join("data");
    let script = workspace_root().join("tests/fixtures/imagefolder_tree.py");
    let out = std::process::Command::new(python())
        .arg(&script)
        .arg(&data)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let reference =
        serde_json::from_slice(&std::fs::read(data.join("torchvision.json")).unwrap()).unwrap();
    (data, reference)
}

/// One row of a predictions CSV: input (when present), label and probabilities.
#[derive(Debug)]
struct Row {
    input: Option<String>,
    label: String,
    probs: Vec<f32>,
}

fn read_predictions(path: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let label = col("label").unwrap();
    let input = col("input");
    let probs: Vec<usize> = (0..header.len())
        .filter(|&i| header[i].starts_with('p') && header[i][1..].parse::<usize>().is_ok())
        .collect();
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), header.len(), "{}: row {l}", path.display());
            Row {
                input: input.map(|i| f[i].trim_matches('"').to_string()),
                label: f[label].to_string(),
                probs: probs.iter().map(|&i| f[i].parse().unwrap()).collect(),
            }
        })
        .collect()
}

/// torchvision's `(path relative to the split folder, label)` samples of `split`.
fn torchvision_samples(reference: &serde_json::Value, split: &str) -> Vec<(String, String)> {
    reference[split]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s[0].as_str().unwrap().to_string(),
                s[1].as_i64().unwrap().to_string(),
            )
        })
        .collect()
}

fn finetune(dir: &Path, data: &Path) -> (PathBuf, String) {
    let (_, stderr) = TestCommand::new("mae-train", dir)
        .args([
            "finetune",
            "--model",
            "vit_tiny_patch4_28",
            "--depth",
            "2",
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--output-dir",
            "run",
            "--data-path",
        ])
        .args([data])
        .stdout_stderr();
    let ck = dir.join("run/checkpoint-0.safetensors");
    assert!(ck.exists(), "no checkpoint at {}", ck.display());
    (ck, stderr)
}

/// `mae-train eval` and `mae-run eval` (tract) on the test split; returns both prediction
/// files' rows and both tools' standard error.
fn eval_both(dir: &Path, data: &Path, ck: &Path) -> (Vec<Row>, Vec<Row>, String, String) {
    let (_, train_err) = TestCommand::new("mae-train", dir)
        .args([
            "eval",
            "--device",
            "cpu",
            "--split",
            "test",
            "--predictions",
            "train.csv",
            "--resume",
        ])
        .args([ck])
        .args(["--data-path"])
        .args([data])
        .stdout_stderr();
    TestCommand::new("mae-export", dir)
        .args(["--onnx", "--output", "model.onnx", "--checkpoint"])
        .args([ck])
        .stdout();
    let (_, run_err) = TestCommand::new("mae-run", dir)
        .args([
            "eval",
            "--model",
            "model.onnx",
            "--split",
            "test",
            "--predictions",
            "run.csv",
            "--data-path",
        ])
        .args([data])
        .env_remove("ORT_DYLIB_PATH")
        .stdout_stderr();
    (
        read_predictions(&dir.join("train.csv")),
        read_predictions(&dir.join("run.csv")),
        train_err,
        run_err,
    )
}

/// Row by row, the same probabilities: both tools read the same images in the same order.
fn same_rows(train: &[Row], run: &[Row]) {
    assert_eq!(train.len(), run.len(), "row counts");
    let mut worst = 0f32;
    for (i, (a, b)) in train.iter().zip(run).enumerate() {
        assert_eq!(a.label, b.label, "row {i}: labels");
        for (x, y) in a.probs.iter().zip(&b.probs) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(worst <= TOL, "probabilities differ by up to {worst:.3e}");
}

#[test]
fn imagefolder_trees_read_as_torchvision_reads_them_in_both_tools() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (data, reference) = tree(dir, &[]);
    let classes = &reference["test"]["classes"];
    assert_eq!(
        classes,
        &serde_json::json!(["10_x", "2_y", "Normal", "abnormal"])
    );
    let want = torchvision_samples(&reference, "test");
    assert_eq!(want.len(), 4 * 18, "18 images per class in the test split");

    let (ck, train_log) = finetune(dir, &data);
    let stray = "skipped 1 file with other extensions: Normal/notes.txt";
    assert!(train_log.contains(stray), "{train_log}");
    let (train, run, train_err, run_err) = eval_both(dir, &data, &ck);
    assert!(train_err.contains(stray), "{train_err}");
    assert!(run_err.contains(stray), "{run_err}");

    // mae-run names its inputs: exactly torchvision's samples, in order, with its labels.
    let split = data.join("test");
    let got: Vec<(String, String)> = run
        .iter()
        .map(|r| {
            let input = r.input.clone().unwrap();
            let rel = Path::new(&input)
                .strip_prefix(&split)
                .or_else(|_| Path::new(&input).strip_prefix(Path::new("data/test")))
                .unwrap_or_else(|_| panic!("{input} outside {}", split.display()))
                .display()
                .to_string();
            (rel, r.label.clone())
        })
        .collect();
    assert_eq!(got, want);
    // mae-train: the same labels in the same order and the same images (probabilities).
    let labels: Vec<&String> = train.iter().map(|r| &r.label).collect();
    assert_eq!(labels, want.iter().map(|w| &w.1).collect::<Vec<_>>());
    same_rows(&train, &run);

    // A class folder the model does not know is refused, by name.
    let renamed = dir.join("renamed");
    std::fs::create_dir_all(renamed.join("test")).unwrap();
    for class in ["10_x", "Normal"] {
        std::fs::create_dir_all(renamed.join("test").join(class)).unwrap();
        std::fs::copy(
            split.join(class).join("a.PNG"),
            renamed.join("test").join(class).join("a.PNG"),
        )
        .unwrap();
    }
    std::fs::create_dir_all(renamed.join("test/2_z")).unwrap();
    std::fs::copy(split.join("2_y/a.PNG"), renamed.join("test/2_z/a.PNG")).unwrap();
    let err = TestCommand::new("mae-run", dir)
        .args(["eval", "--model", "model.onnx", "--data-path"])
        .args([&renamed])
        .fails();
    assert!(
        err.contains("class folder '2_z' is not among the model's classes"),
        "{err}"
    );
    // A known subset of the classes keeps the model's labels.
    std::fs::remove_dir_all(renamed.join("test/2_z")).unwrap();
    TestCommand::new("mae-run", dir)
        .args([
            "eval",
            "--model",
            "model.onnx",
            "--predictions",
            "subset.csv",
            "--data-path",
        ])
        .args([&renamed])
        .stdout();
    let subset: Vec<String> = read_predictions(&dir.join("subset.csv"))
        .into_iter()
        .map(|r| r.label)
        .collect();
    assert_eq!(subset, ["0", "2"], "10_x is class 0, Normal class 2");
}

#[test]
fn a_dicom_imagefolder_trains_and_evaluates_in_both_tools() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (data, reference) = tree(dir, &["--dicom-only"]);
    let want = torchvision_samples(&reference, "test");
    assert!(want.iter().all(|(p, _)| p.to_lowercase().ends_with(".dcm")));
    let (ck, _) = finetune(dir, &data);
    let (train, run, _, _) = eval_both(dir, &data, &ck);
    assert_eq!(run.len(), want.len());
    same_rows(&train, &run);
    multi_frame_rows(dir, &dir.join("model.onnx"));
}

/// `mae-run predict` rows of one JSON-lines output: (input, probabilities), and its failures.
fn predict_jsonl(dir: &Path, args: &[&str]) -> (Vec<(String, Vec<f64>)>, Vec<String>) {
    let mut cmd = TestCommand::new("mae-run", dir);
    cmd.args(["predict", "--model", "model.onnx", "--format", "jsonl"])
        .args(args)
        .env_remove("ORT_DYLIB_PATH");
    let o = cmd.command().output().unwrap();
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let input = v["input"].as_str().unwrap().to_string();
        match v["error"].as_str() {
            Some(e) => errors.push(format!("{input}: {e}")),
            None => rows.push((
                input,
                v["probabilities"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_f64().unwrap())
                    .collect(),
            )),
        }
    }
    assert_eq!(o.status.success(), errors.is_empty(), "{args:?}: {o:?}");
    (rows, errors)
}

/// A three-frame DICOM file (written by pydicom, each frame different) through `mae-run predict`:
/// the first frame by default, `--frame N`, `FILE#N` and a row per frame with `--frame all`,
/// the same pixels each way; a frame past the end is a failure that says so.
fn multi_frame_rows(dir: &Path, model: &Path) {
    assert!(model.exists());
    let script = r#"
import sys, numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
ds = Dataset(); ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"; ds.SOPInstanceUID = generate_uid()
ds.Rows = ds.Columns = 28; ds.SamplesPerPixel = 1; ds.PhotometricInterpretation = "MONOCHROME2"
ds.BitsAllocated = ds.BitsStored = 8; ds.HighBit = 7; ds.PixelRepresentation = 0
ds.NumberOfFrames = 3
y, x = np.mgrid[0:28, 0:28]
frames = np.stack([x * 9, y * 9, (x * y) % 251]).astype(np.uint8)
frames[0, :4, :4] = 255; frames[0, -4:, -4:] = 0
ds.PixelData = frames.tobytes()
ds.file_meta = FileMetaDataset(); ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
ds.save_as(sys.argv[1], enforce_file_format=True)
"#;
    let o = std::process::Command::new(python())
        .args(["-c", script])
        .arg(dir.join("mf.dcm"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (first, _) = predict_jsonl(dir, &["mf.dcm"]);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].0, "mf.dcm");
    let (all, _) = predict_jsonl(dir, &["mf.dcm", "--frame", "all"]);
    let names: Vec<&str> = all.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(names, ["mf.dcm#0", "mf.dcm#1", "mf.dcm#2"]);
    // A row's last bits may depend on the size of the batch it ran in (tract optimises a plan
    // per batch size), so rows from different runs agree within 1e-6, while the frames' rows
    // differ far more.
    let same = |a: &(String, Vec<f64>), b: &(String, Vec<f64>)| {
        a.0 == b.0
            && a.1.len() == b.1.len()
            && a.1.iter().zip(&b.1).all(|(x, y)| (x - y).abs() <= 1e-6)
    };
    assert!(
        same(&(all[0].0.clone(), first[0].1.clone()), &all[0]),
        "frame 0 is the default: {first:?} vs {all:?}"
    );
    assert!(
        all[1].1 != all[0].1 && all[2].1 != all[1].1,
        "the frames differ, so must their rows: {all:?}"
    );
    assert!(
        all[1]
            .1
            .iter()
            .zip(&all[0].1)
            .any(|(x, y)| (x - y).abs() > 1e-5)
            && all[2]
                .1
                .iter()
                .zip(&all[1].1)
                .any(|(x, y)| (x - y).abs() > 1e-5),
        "the frames' rows differ by more than the tolerance: {all:?}"
    );
    let (named, _) = predict_jsonl(dir, &["mf.dcm#2"]);
    assert!(
        named.len() == 1 && same(&named[0], &all[2]),
        "{named:?} vs {all:?}"
    );
    let (one, _) = predict_jsonl(dir, &["mf.dcm", "--frame", "1"]);
    assert!(
        one.len() == 1 && same(&one[0], &all[1]),
        "{one:?} vs {all:?}"
    );
    let (none, errors) = predict_jsonl(dir, &["mf.dcm", "--frame", "7"]);
    assert!(none.is_empty());
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].contains("no frame 7 in a file of 3 frames"),
        "{errors:?}"
    );
}

/// `mae-train models | head -1`: a closed standard output ends the trainer quietly, status 0.
#[test]
fn a_closed_stdout_pipe_ends_the_trainer_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = TestCommand::new("mae-train", tmp.path());
    let mut child = cmd
        .args(["models"])
        .command()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "status {:?}:\n{err}", o.status);
    assert!(err.is_empty(), "{err}");
}
