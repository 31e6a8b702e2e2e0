//! `mae_models::metrics` against scikit-learn: accuracy, top-5, ROC AUC (macro one-vs-rest,
//! binary, multi-label, with tied scores), log loss, per-class precision / recall / F1 /
//! support / AUC and the confusion matrix, on seeded predictions made by
//! `tests/fixtures/gen_metrics.py` with the project virtualenv's Python.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use mae_models::checkpoint::Task;
use mae_models::metrics::evaluate;
use serde::Deserialize;

const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
const GENERATOR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gen_metrics.py");

/// Sums of the same terms in another order; log loss also renormalises float32 rows.
const TOL: f64 = 1e-9;
const LOSS_TOL: f64 = 1e-6;

#[derive(Debug, Deserialize)]
struct Case {
    task: String,
    classes: usize,
    probs: Vec<f32>,
    labels: Vec<Vec<i64>>,
    expected: Expected,
}

#[derive(Debug, Deserialize)]
struct Expected {
    acc1: f64,
    acc5: Option<f64>,
    auc: f64,
    loss: f64,
    confusion: Option<Vec<Vec<u64>>>,
    per_class: Vec<PerClass>,
}

#[derive(Debug, Deserialize)]
struct PerClass {
    precision: f64,
    recall: f64,
    f1: f64,
    support: u64,
    auc: f64,
}

fn close(what: &str, ours: f64, theirs: f64, tol: f64) {
    assert!(
        (ours - theirs).abs() <= tol,
        "{what}: ours {ours}, scikit-learn {theirs}"
    );
}

#[test]
fn metrics_match_scikit_learn() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("metrics-fixtures");
    let out = Command::new(PYTHON)
        .arg(GENERATOR)
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {PYTHON} (run scripts/setup.sh): {e}"));
    assert!(
        out.status.success(),
        "{GENERATOR} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    assert_eq!(cases.len(), 4);
    for (k, case) in cases.iter().enumerate() {
        let task = match case.task.as_str() {
            "multi-class" => Task::MultiClass,
            "binary" => Task::Binary,
            _ => Task::MultiLabel,
        };
        let m = evaluate(task, &case.probs, case.classes, &case.labels).unwrap();
        let e = &case.expected;
        let name = |s: &str| format!("case {k} ({}, {} classes): {s}", case.task, case.classes);
        close(&name("acc1"), m.acc1, e.acc1, TOL);
        close(&name("auc"), m.auc.unwrap(), e.auc, TOL);
        close(&name("loss"), m.loss.unwrap(), e.loss, LOSS_TOL);
        assert_eq!(m.acc5.is_some(), e.acc5.is_some(), "{}", name("acc5"));
        if let (Some(a), Some(b)) = (m.acc5, e.acc5) {
            close(&name("acc5"), a, b, TOL);
        }
        assert_eq!(m.confusion, e.confusion, "{}", name("confusion"));
        assert_eq!(m.per_class.len(), e.per_class.len());
        for (j, (ours, theirs)) in m.per_class.iter().zip(&e.per_class).enumerate() {
            let what = |s: &str| name(&format!("class {j} {s}"));
            close(&what("precision"), ours.precision, theirs.precision, TOL);
            close(&what("recall"), ours.recall, theirs.recall, TOL);
            close(&what("f1"), ours.f1, theirs.f1, TOL);
            close(&what("auc"), ours.auc.unwrap(), theirs.auc, TOL);
            assert_eq!(ours.support, theirs.support, "{}", what("support"));
        }
    }
}
