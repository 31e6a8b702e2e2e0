//! Evaluation metrics, one implementation for `mae-train eval` and `mae-run eval`.
//!
//! Accuracy and ROC AUC follow MedMNIST's evaluator (`medmnist/evaluator.py`, `getACC` and
//! `getAUC`): binary tasks score the positive (last) class and predict it above a threshold
//! (0.5 unless calibrated); multi-class AUC is the macro average of one-vs-rest AUCs; multi-label
//! accuracy and AUC are the means over labels, each label thresholded on its own. AUC is the
//! Mann-Whitney statistic with average ranks for ties, which equals the area under the
//! trapezoidal ROC curve that `sklearn.metrics.roc_auc_score` computes. A class whose AUC is
//! undefined (all samples positive, or none) is left out of the macro average and shown as `-`
//! (scikit-learn raises an error there).

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::checkpoint::Task;
use crate::error::{Error, Result};

/// Options of [`evaluate_with`].
#[derive(Debug, Clone, PartialEq)]
pub struct EvalOptions {
    /// Decision threshold on the positive-class probability (binary) or on each label's
    /// probability (multi-label).
    pub threshold: f64,
    /// Class names for the table; `class 0`, `class 1`, ... when empty.
    pub class_names: Vec<String>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            class_names: Vec::new(),
        }
    }
}

/// Precision, recall and F1 of one class (one-vs-rest) or one label.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassMetrics {
    pub name: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Samples whose true label is this class (or that carry this label).
    pub support: u64,
    /// One-vs-rest ROC AUC; `None` when undefined (one kind of sample only).
    pub auc: Option<f64>,
}

/// Metrics of a set of predictions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    pub task: Task,
    pub samples: usize,
    pub num_classes: usize,
    /// Top-1 accuracy (multi-class, binary at the threshold); for multi-label, the mean over
    /// labels of each label's accuracy at the threshold (MedMNIST's ACC).
    pub acc1: f64,
    /// Top-5 accuracy, for multi-class tasks with more than 5 classes.
    pub acc5: Option<f64>,
    /// ROC AUC: of the positive class (binary), macro one-vs-rest (multi-class), macro over
    /// labels (multi-label). `None` when undefined for every class.
    pub auc: Option<f64>,
    /// Cross-entropy of the probabilities (binary cross-entropy per label for multi-label),
    /// probabilities clamped at 1e-12. A caller that has its own loss may replace it.
    pub loss: Option<f64>,
    pub threshold: f64,
    pub per_class: Vec<ClassMetrics>,
    /// `[true][predicted]` counts (multi-class and binary).
    pub confusion: Option<Vec<Vec<u64>>>,
}

/// Computes the metrics of `probs` (`[n, num_classes]`, row-major) against `labels` (one row per
/// sample: `[class]` for multi-class and binary, the 0/1 vector for multi-label).
pub fn evaluate(
    task: Task,
    probs: &[f32],
    num_classes: usize,
    labels: &[Vec<i64>],
) -> Result<Metrics> {
    evaluate_with(task, probs, num_classes, labels, &EvalOptions::default())
}

/// [`evaluate`] with a threshold and class names.
pub fn evaluate_with(
    task: Task,
    probs: &[f32],
    num_classes: usize,
    labels: &[Vec<i64>],
    opts: &EvalOptions,
) -> Result<Metrics> {
    let c = num_classes;
    let n = labels.len();
    let bad = |reason: String| Error::Config(format!("metrics: {reason}"));
    if c == 0 {
        return Err(bad("no classes".into()));
    }
    if probs.len() != n * c {
        return Err(bad(format!(
            "{} probabilities for {n} samples of {c} classes (expected {})",
            probs.len(),
            n * c
        )));
    }
    if task == Task::Binary && c > 2 {
        return Err(bad(format!("a binary task has 1 or 2 outputs, found {c}")));
    }
    let names: Vec<String> = (0..c.max(if task == Task::Binary { 2 } else { c }))
        .map(|i| {
            opts.class_names
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("class {i}"))
        })
        .collect();
    let rows = || probs.chunks_exact(c);
    match task {
        Task::MultiLabel => {
            for (i, l) in labels.iter().enumerate() {
                if l.len() != c || l.iter().any(|&v| v != 0 && v != 1) {
                    return Err(bad(format!(
                        "sample {i}: multi-label targets must be {c} values of 0 or 1, found {l:?}"
                    )));
                }
            }
            multi_label(probs, c, labels, opts.threshold, names)
        }
        Task::MultiClass | Task::Binary => {
            let k = if task == Task::Binary { 2 } else { c };
            let mut targets = Vec::with_capacity(n);
            for (i, l) in labels.iter().enumerate() {
                match l[..] {
                    [t] if (0..k as i64).contains(&t) => targets.push(t as usize),
                    _ => {
                        return Err(bad(format!(
                            "sample {i}: expected one class index in 0..{k}, found {l:?}"
                        )))
                    }
                }
            }
            let preds: Vec<usize> = if task == Task::Binary {
                rows()
                    .map(|r| usize::from(r[c - 1] as f64 > opts.threshold))
                    .collect()
            } else {
                rows().map(argmax).collect()
            };
            Ok(single_label(
                Outputs { task, probs, c },
                k,
                &targets,
                &preds,
                opts.threshold,
                names,
            ))
        }
    }
}

/// A model's outputs over a set: its task and the probabilities, row-major `[n, c]`.
struct Outputs<'a> {
    task: Task,
    probs: &'a [f32],
    c: usize,
}

fn single_label(
    out: Outputs<'_>,
    k: usize,
    targets: &[usize],
    preds: &[usize],
    threshold: f64,
    names: Vec<String>,
) -> Metrics {
    let Outputs { task, probs, c } = out;
    let n = targets.len();
    let mut confusion = vec![vec![0u64; k]; k];
    for (&t, &p) in targets.iter().zip(preds) {
        confusion[t][p] += 1;
    }
    let correct = targets.iter().zip(preds).filter(|(t, p)| t == p).count();
    let acc5 = (task == Task::MultiClass && c > 5).then(|| {
        let hits = probs
            .chunks_exact(c)
            .zip(targets)
            .filter(|(row, &t)| top_k(row, 5).iter().any(|&(i, _)| i == t))
            .count();
        ratio(hits as u64, n as u64)
    });
    // Score of class j for sample i: its probability; a one-output binary model gives the
    // positive class only.
    let score = |i: usize, j: usize| -> f64 {
        if c == 1 {
            let p = probs[i] as f64;
            if j == 1 {
                p
            } else {
                1.0 - p
            }
        } else {
            probs[i * c + j] as f64
        }
    };
    let per_class: Vec<ClassMetrics> = (0..k)
        .map(|j| {
            let tp = confusion[j][j];
            let predicted: u64 = (0..k).map(|t| confusion[t][j]).sum();
            let support: u64 = confusion[j].iter().sum();
            let scores: Vec<f64> = (0..n).map(|i| score(i, j)).collect();
            let positive: Vec<bool> = targets.iter().map(|&t| t == j).collect();
            class_metrics(
                names[j].clone(),
                tp,
                predicted,
                support,
                auc(&scores, &positive),
            )
        })
        .collect();
    let auc = if task == Task::Binary {
        per_class[1].auc
    } else {
        mean(per_class.iter().filter_map(|m| m.auc))
    };
    let loss = mean((0..n).map(|i| -(score(i, targets[i]).max(1e-12)).ln()));
    Metrics {
        task,
        samples: n,
        num_classes: c,
        acc1: ratio(correct as u64, n as u64),
        acc5,
        auc,
        loss,
        threshold,
        per_class,
        confusion: Some(confusion),
    }
}

fn multi_label(
    probs: &[f32],
    c: usize,
    labels: &[Vec<i64>],
    threshold: f64,
    names: Vec<String>,
) -> Result<Metrics> {
    let n = labels.len();
    let mut accs = Vec::with_capacity(c);
    let mut per_class = Vec::with_capacity(c);
    let mut bce = 0.0;
    for (j, name) in names.into_iter().enumerate() {
        let scores: Vec<f64> = (0..n).map(|i| probs[i * c + j] as f64).collect();
        let positive: Vec<bool> = labels.iter().map(|l| l[j] == 1).collect();
        let (mut tp, mut predicted, mut support, mut correct) = (0u64, 0u64, 0u64, 0u64);
        for (&s, &y) in scores.iter().zip(&positive) {
            let p = s > threshold;
            tp += u64::from(p && y);
            predicted += u64::from(p);
            support += u64::from(y);
            correct += u64::from(p == y);
            let q = if y { s } else { 1.0 - s };
            bce -= q.max(1e-12).ln();
        }
        accs.push(ratio(correct, n as u64));
        per_class.push(class_metrics(
            name,
            tp,
            predicted,
            support,
            auc(&scores, &positive),
        ));
    }
    Ok(Metrics {
        task: Task::MultiLabel,
        samples: n,
        num_classes: c,
        acc1: mean(accs.iter().copied()).unwrap_or(0.0),
        acc5: None,
        auc: mean(per_class.iter().filter_map(|m| m.auc)),
        loss: (n > 0).then(|| bce / (n * c) as f64),
        threshold,
        per_class,
        confusion: None,
    })
}

fn class_metrics(
    name: String,
    tp: u64,
    predicted: u64,
    support: u64,
    auc: Option<f64>,
) -> ClassMetrics {
    // As scikit-learn with zero_division=0: an empty denominator gives 0.
    let precision = ratio(tp, predicted);
    let recall = ratio(tp, support);
    let f1 = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    ClassMetrics {
        name,
        precision,
        recall,
        f1,
        support,
        auc,
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, k) = xs.fold((0.0, 0usize), |(s, k), x| (s + x, k + 1));
    (k > 0).then(|| s / k as f64)
}

/// Index of the largest value (the first one on ties; NaN never wins).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] || row[best].is_nan() && !v.is_nan() {
            best = i;
        }
    }
    best
}

/// The `k` largest values of `row` with their indices, largest first (ties: lower index first;
/// NaN last).
pub fn top_k(row: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
    idx.sort_by(|a, b| {
        b.1.partial_cmp(&a.1)
            .unwrap_or_else(|| a.1.is_nan().cmp(&b.1.is_nan()))
            .then(a.0.cmp(&b.0))
    });
    idx.truncate(k);
    idx
}

/// ROC AUC of `scores` for the `positive` samples: the Mann-Whitney U statistic with average
/// ranks for ties, divided by (positives × negatives). `None` when either class is empty.
pub fn auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 || scores.len() != positive.len() {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        // Ranks i+1 ..= j+1 share their average.
        let avg = (i + j + 2) as f64 / 2.0;
        rank_sum_pos += avg * order[i..=j].iter().filter(|&&k| positive[k]).count() as f64;
        i = j + 1;
    }
    let (p, q) = (n_pos as f64, n_neg as f64);
    Some((rank_sum_pos - p * (p + 1.0) / 2.0) / (p * q))
}

impl Metrics {
    /// The headline numbers by name (`acc1`, `acc5`, `auc`, `loss`, `macro_f1`), as stored in
    /// checkpoints and in the ONNX `mae.metrics` property.
    pub fn summary(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        m.insert("acc1".to_string(), self.acc1);
        if let Some(v) = self.acc5 {
            m.insert("acc5".to_string(), v);
        }
        if let Some(v) = self.auc {
            m.insert("auc".to_string(), v);
        }
        if let Some(v) = self.loss {
            m.insert("loss".to_string(), v);
        }
        if let Some(v) = mean(self.per_class.iter().map(|c| c.f1)) {
            m.insert("macro_f1".to_string(), v);
        }
        m
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"))
}

impl fmt::Display for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "task {} · {} samples · {} classes",
            self.task.as_str(),
            self.samples,
            self.num_classes
        )?;
        let acc_name = if self.task == Task::MultiLabel {
            "acc"
        } else {
            "acc@1"
        };
        write!(f, "{acc_name} {:.4}", self.acc1)?;
        if let Some(a) = self.acc5 {
            write!(f, "  acc@5 {a:.4}")?;
        }
        write!(f, "  auc {}  loss {}", opt(self.auc), opt(self.loss))?;
        if self.task != Task::MultiClass {
            write!(f, "  threshold {}", self.threshold)?;
        }
        writeln!(f)?;
        let w = self
            .per_class
            .iter()
            .map(|c| c.name.chars().count())
            .max()
            .unwrap_or(0)
            .max(9);
        writeln!(
            f,
            "{:<w$}  {:>9}  {:>7}  {:>7}  {:>7}  {:>7}",
            "class", "precision", "recall", "f1", "support", "auc"
        )?;
        for c in &self.per_class {
            writeln!(
                f,
                "{:<w$}  {:>9.4}  {:>7.4}  {:>7.4}  {:>7}  {:>7}",
                c.name,
                c.precision,
                c.recall,
                c.f1,
                c.support,
                opt(c.auc)
            )?;
        }
        let k = self.per_class.len().max(1) as f64;
        let avg = |g: fn(&ClassMetrics) -> f64| self.per_class.iter().map(g).sum::<f64>() / k;
        writeln!(
            f,
            "{:<w$}  {:>9.4}  {:>7.4}  {:>7.4}  {:>7}  {:>7}",
            "macro avg",
            avg(|c| c.precision),
            avg(|c| c.recall),
            avg(|c| c.f1),
            self.per_class.iter().map(|c| c.support).sum::<u64>(),
            opt(self.auc)
        )?;
        if let Some(cm) = &self.confusion {
            writeln!(f, "confusion matrix (rows: true class, columns: predicted)")?;
            let cw = cm
                .iter()
                .flatten()
                .map(|v| v.to_string().len())
                .max()
                .unwrap_or(1)
                .max(5);
            write!(f, "{:<w$}", "")?;
            for j in 0..cm.len() {
                write!(f, "  {:>cw$}", j)?;
            }
            writeln!(f)?;
            for (c, row) in self.per_class.iter().zip(cm) {
                write!(f, "{:<w$}", c.name)?;
                for v in row {
                    write!(f, "  {v:>cw$}")?;
                }
                writeln!(f)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    #[test]
    fn auc_by_hand() {
        // Pairs (pos, neg): (0.8,0.1) (0.8,0.4) (0.35,0.1) (0.35,0.4) → 1 + 1 + 1 + 0 = 3/4.
        let s = [0.1, 0.4, 0.35, 0.8];
        let y = [false, false, true, true];
        close(auc(&s, &y).unwrap(), 0.75);
        // Ties count one half: pos 0.5 vs neg 0.5 → 0.5; pos 0.5 vs neg 0.2 → 1.
        let s = [0.5, 0.5, 0.2];
        let y = [true, false, false];
        close(auc(&s, &y).unwrap(), 0.75);
        assert_eq!(auc(&[0.1, 0.2], &[true, true]), None);
    }

    /// Brute-force pair counting agrees with the rank formula.
    #[test]
    fn auc_matches_pair_counting() {
        let mut x = 12345u64;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as f64 / (1u64 << 31) as f64
        };
        for _ in 0..20 {
            let n = 30;
            let s: Vec<f64> = (0..n).map(|_| (next() * 8.0).floor() / 8.0).collect();
            let y: Vec<bool> = (0..n).map(|_| next() > 0.6).collect();
            let (mut num, mut den) = (0.0, 0.0);
            for i in 0..n {
                for j in 0..n {
                    if y[i] && !y[j] {
                        den += 1.0;
                        num += if s[i] > s[j] {
                            1.0
                        } else if s[i] == s[j] {
                            0.5
                        } else {
                            0.0
                        };
                    }
                }
            }
            match auc(&s, &y) {
                Some(a) => close(a, num / den),
                None => assert_eq!(den, 0.0),
            }
        }
    }

    #[test]
    fn multi_class_small_case() {
        // 4 samples, 3 classes.
        let probs = [
            0.7, 0.2, 0.1, // pred 0, true 0
            0.1, 0.6, 0.3, // pred 1, true 2
            0.2, 0.3, 0.5, // pred 2, true 2
            0.3, 0.4, 0.3, // pred 1, true 1
        ];
        let labels = vec![vec![0], vec![2], vec![2], vec![1]];
        let m = evaluate(Task::MultiClass, &probs, 3, &labels).unwrap();
        close(m.acc1, 0.75);
        assert_eq!(m.acc5, None);
        assert_eq!(
            m.confusion.as_ref().unwrap(),
            &vec![vec![1, 0, 0], vec![0, 1, 0], vec![0, 1, 1]]
        );
        // Class 1: predicted twice, one right; support 1.
        close(m.per_class[1].precision, 0.5);
        close(m.per_class[1].recall, 1.0);
        close(m.per_class[1].f1, 2.0 / 3.0);
        // Class 2: scores [0.1, 0.3, 0.5, 0.3], positives samples 1 and 2.
        // pos 0.3 vs negs 0.1 (1), 0.3 (0.5); pos 0.5 vs both (2) → 3.5 / 4.
        close(m.per_class[2].auc.unwrap(), 0.875);
        // Class 0: pos score 0.7 beats all → 1. Class 1: pos 0.4 vs 0.2, 0.6, 0.3 → 2/3.
        close(m.auc.unwrap(), (1.0 + 2.0 / 3.0 + 0.875) / 3.0);
        let ce = -((0.7f32 as f64).ln()
            + (0.3f32 as f64).ln()
            + (0.5f32 as f64).ln()
            + (0.4f32 as f64).ln())
            / 4.0;
        close(m.loss.unwrap(), ce);
        let table = m.to_string();
        assert!(table.contains("acc@1 0.7500"), "{table}");
        assert!(table.contains("confusion matrix"), "{table}");
    }

    #[test]
    fn top5_and_binary() {
        let c = 7;
        let mut probs = vec![0.0f32; 2 * c];
        // Sample 0: true class 6 ranked 5th; sample 1: true class 0 ranked last.
        probs[..c].copy_from_slice(&[0.3, 0.2, 0.15, 0.14, 0.01, 0.0, 0.1]);
        probs[c..].copy_from_slice(&[0.0, 0.2, 0.15, 0.14, 0.11, 0.1, 0.3]);
        let m = evaluate(Task::MultiClass, &probs, c, &[vec![6], vec![0]]).unwrap();
        close(m.acc1, 0.0);
        close(m.acc5.unwrap(), 0.5);

        let probs = [0.9, 0.1, 0.4, 0.6, 0.2, 0.8, 0.7, 0.3];
        let labels = vec![vec![0], vec![1], vec![0], vec![1]];
        let m = evaluate(Task::Binary, &probs, 2, &labels).unwrap();
        // Positive probabilities 0.1, 0.6, 0.8, 0.3 → predictions 0, 1, 1, 0.
        close(m.acc1, 0.5);
        // Positive scores: pos [0.6, 0.3], neg [0.1, 0.8] → (1 + 0 + 1 + 0) / 4.
        close(m.auc.unwrap(), 0.5);
        let opts = EvalOptions {
            threshold: 0.25,
            class_names: vec!["normal".into(), "pneumonia".into()],
        };
        let m = evaluate_with(Task::Binary, &probs, 2, &labels, &opts).unwrap();
        // At 0.25: predictions 0, 1, 1, 1.
        close(m.acc1, 0.75);
        assert_eq!(m.per_class[1].name, "pneumonia");
    }

    #[test]
    fn multi_label_as_medmnist() {
        let probs = [0.9, 0.2, 0.6, 0.7, 0.1, 0.4];
        let labels = vec![vec![1, 0], vec![0, 1], vec![0, 1]];
        let m = evaluate(Task::MultiLabel, &probs, 2, &labels).unwrap();
        // Label 0: preds [1, 1, 0] vs [1, 0, 0] → 2/3; label 1: [0, 1, 0] vs [0, 1, 1] → 2/3.
        close(m.acc1, 2.0 / 3.0);
        // Label 0: pos 0.9 vs 0.6, 0.1 → 1. Label 1: pos 0.7, 0.4 vs neg 0.2 → 1.
        close(m.auc.unwrap(), 1.0);
        assert!(m.confusion.is_none());
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(evaluate(Task::MultiClass, &[0.5, 0.5], 2, &[vec![2]]).is_err());
        assert!(evaluate(Task::MultiClass, &[0.5], 2, &[vec![0]]).is_err());
        assert!(evaluate(Task::MultiLabel, &[0.5, 0.5], 2, &[vec![1]]).is_err());
        assert!(evaluate(Task::Binary, &[0.2; 3], 3, &[vec![1]]).is_err());
        let m = evaluate(Task::MultiClass, &[], 3, &[]).unwrap();
        assert_eq!(m.samples, 0);
        assert_eq!(m.auc, None);
    }

    #[test]
    fn ranking_helpers() {
        assert_eq!(argmax(&[0.1, 0.5, 0.5]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.2]), 1);
        assert_eq!(top_k(&[0.1, 0.5, 0.3], 2), vec![(1, 0.5), (2, 0.3)]);
        assert_eq!(top_k(&[f32::NAN, 0.5], 2)[0], (1, 0.5));
    }
}
