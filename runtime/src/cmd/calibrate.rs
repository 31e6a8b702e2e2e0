//! `mae-run calibrate`: temperature scaling (Guo et al. 2017) fitted on validation data, and
//! for binary tasks an operating threshold (Youden's J, or a chosen sensitivity), written as
//! `mae.temperature` / `mae.threshold` into a copy of the model.

use mae_models::onnx_keys as keys;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use mae_models::checkpoint::Task;

use crate::engine::activate;
use crate::engine::settings::ModelArgs;
use crate::inputs;
use crate::inputs::labelled_items;

/// Arguments of `mae-run calibrate`.
#[derive(Debug, clap::Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Validation data: a MedMNIST .npz file, or a folder with one subfolder per class.
    #[arg(long, value_name = "DIR|FILE.npz")]
    pub data_path: PathBuf,
    /// Split of a .npz file.
    #[arg(long, default_value = "val")]
    pub split: String,
    /// The calibrated copy of the model (default: MODEL.calibrated.onnx beside it).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Binary tasks: pick the highest threshold reaching this sensitivity instead of the one
    /// maximising Youden's J.
    #[arg(long, value_name = "S")]
    pub sensitivity: Option<f64>,
    /// Images per inference batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

/// Mean negative log-likelihood of `labels` under `activate(logits / t)`.
pub fn nll(logits: &[f32], c: usize, labels: &[Vec<i64>], task: Task, t: f64) -> f64 {
    let p = activate(logits, c, task, t as f32);
    let n = labels.len().max(1) as f64;
    let mut s = 0.0;
    for (row, l) in p.chunks(c).zip(labels) {
        if task == Task::MultiLabel {
            for (j, &q) in row.iter().enumerate() {
                let y = l.get(j).copied().unwrap_or(0) == 1;
                let q = if y { q as f64 } else { 1.0 - q as f64 };
                s -= q.max(1e-12).ln() / c as f64;
            }
        } else {
            let k = l.first().copied().unwrap_or(0).clamp(0, c as i64 - 1) as usize;
            s -= (row[k] as f64).max(1e-12).ln();
        }
    }
    s / n
}

/// The temperature minimising [`nll`], by golden-section search on log T in [1/20, 20].
pub fn fit_temperature(logits: &[f32], c: usize, labels: &[Vec<i64>], task: Task) -> f64 {
    let f = |x: f64| nll(logits, c, labels, task, x.exp());
    let (mut a, mut b) = ((0.05f64).ln(), (20.0f64).ln());
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let (mut x1, mut x2) = (b - g * (b - a), a + g * (b - a));
    let (mut f1, mut f2) = (f(x1), f(x2));
    for _ in 0..60 {
        if f1 < f2 {
            b = x2;
            x2 = x1;
            f2 = f1;
            x1 = b - g * (b - a);
            f1 = f(x1);
        } else {
            a = x1;
            x1 = x2;
            f1 = f2;
            x2 = a + g * (b - a);
            f2 = f(x2);
        }
    }
    ((a + b) / 2.0).exp()
}

/// Sensitivity and specificity when predicting positive above `t`.
fn rates(scores: &[f64], positive: &[bool], t: f64) -> (f64, f64) {
    let (mut tp, mut p, mut tn, mut n) = (0.0, 0.0, 0.0, 0.0);
    for (&s, &y) in scores.iter().zip(positive) {
        if y {
            p += 1.0;
            tp += f64::from(u8::from(s > t));
        } else {
            n += 1.0;
            tn += f64::from(u8::from(s <= t));
        }
    }
    (tp / f64::max(p, 1.0), tn / f64::max(n, 1.0))
}

/// The operating threshold on positive-class scores: maximal Youden's J (sensitivity +
/// specificity - 1), or the highest threshold whose sensitivity reaches `sensitivity`.
/// Candidates are midpoints between consecutive distinct scores.
pub fn choose_threshold(scores: &[f64], positive: &[bool], sensitivity: Option<f64>) -> f64 {
    let mut s: Vec<f64> = scores.iter().copied().filter(|v| v.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    s.dedup();
    let mut candidates: Vec<f64> = s.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    if let Some(&lo) = s.first() {
        candidates.insert(0, lo - 1e-6);
    }
    if candidates.is_empty() {
        return 0.5;
    }
    match sensitivity {
        Some(target) => candidates
            .iter()
            .rev()
            .copied()
            .find(|&t| rates(scores, positive, t).0 >= target)
            .unwrap_or(candidates[0]),
        None => {
            let mut best = (f64::NEG_INFINITY, 0.5);
            for &t in &candidates {
                let (se, sp) = rates(scores, positive, t);
                if se + sp - 1.0 > best.0 {
                    best = (se + sp - 1.0, t);
                }
            }
            best.1
        }
    }
}

/// Expected calibration error of the top-1 probability (15 equal-width bins).
pub fn ece(probs: &[f32], c: usize, labels: &[Vec<i64>]) -> f64 {
    let bins = 15;
    let mut acc = vec![(0.0f64, 0.0f64, 0usize); bins];
    for (row, l) in probs.chunks(c).zip(labels) {
        let k = mae_models::metrics::argmax(row);
        let conf = row[k] as f64;
        let hit = l.first().is_some_and(|&y| y == k as i64);
        let b = ((conf * bins as f64) as usize).min(bins - 1);
        acc[b].0 += conf;
        acc[b].1 += f64::from(u8::from(hit));
        acc[b].2 += 1;
    }
    let n = labels.len().max(1) as f64;
    acc.iter()
        .filter(|b| b.2 > 0)
        .map(|b| (b.0 - b.1).abs() / n)
        .sum()
}

/// Runs `mae-run calibrate`.
pub fn run(mut args: CalibrateArgs) -> anyhow::Result<ExitCode> {
    // Fit from the raw logits, whatever calibration the file has now.
    args.model.overrides.no_calibration = true;
    let mut engine = args.model.load()?;
    let items = labelled_items(&args.data_path, &args.split, &engine.meta.class_names)?;
    if items.is_empty() {
        bail!("{}: no samples", args.data_path.display());
    }
    let task = engine.meta.task;
    let (mut logits, mut labels, mut c) = (Vec::new(), Vec::new(), 0);
    let rx = inputs::pipeline(items, engine.meta.preprocess.clone(), args.batch_size, 1);
    let mut failed = 0;
    for batch in rx {
        failed += batch.failures.len();
        if batch.items.is_empty() {
            continue;
        }
        let raw = engine.run_raw(&batch.pixels, batch.items.len())?;
        let l = raw
            .logits
            .context("the model has no 'logits' output, which temperature scaling needs")?;
        c = raw.classes;
        logits.extend(l);
        labels.extend(batch.items.into_iter().map(|i| i.label.unwrap_or_default()));
    }
    if labels.is_empty() || c == 0 {
        bail!("no validation sample could be scored");
    }
    let t = fit_temperature(&logits, c, &labels, task);
    let before = nll(&logits, c, &labels, task, 1.0);
    let after = nll(&logits, c, &labels, task, t);
    let p1 = activate(&logits, c, task, 1.0);
    let pt = activate(&logits, c, task, t as f32);
    let mut props = vec![(keys::TEMPERATURE.to_string(), format!("{t:.6}"))];
    let mut report = format!(
        "calibration on {} ({}), {} samples{}\n\
         temperature {t:.4}: NLL {before:.4} → {after:.4}",
        args.data_path.display(),
        args.split,
        labels.len(),
        if failed > 0 {
            format!(" ({failed} unreadable, skipped)")
        } else {
            String::new()
        },
    );
    if task != Task::MultiLabel {
        report += &format!(
            ", ECE {:.4} → {:.4}",
            ece(&p1, c, &labels),
            ece(&pt, c, &labels)
        );
    }
    report.push('\n');
    if task == Task::Binary {
        let scores: Vec<f64> = pt.chunks(c).map(|r| r[c - 1] as f64).collect();
        let positive: Vec<bool> = labels.iter().map(|l| l.first() == Some(&1)).collect();
        let thr = choose_threshold(&scores, &positive, args.sensitivity);
        let (se, sp) = rates(&scores, &positive, thr);
        report += &format!(
            "threshold {thr:.4} ({}): sensitivity {se:.4}, specificity {sp:.4}\n",
            match args.sensitivity {
                Some(s) => format!("sensitivity ≥ {s}"),
                None => "Youden's J".to_string(),
            }
        );
        props.push((keys::THRESHOLD.to_string(), format!("{thr:.6}")));
    }
    let out = args.output.clone().unwrap_or_else(|| {
        let stem = args
            .model
            .model
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned());
        args.model
            .model
            .with_file_name(format!("{stem}.calibrated.onnx"))
    });
    let bytes = std::fs::read(&args.model.model)
        .with_context(|| format!("cannot read {}", args.model.model.display()))?;
    let edited = crate::engine::protoedit::set_metadata(&bytes, &props)?;
    mae_models::io::atomic_write(&out, &edited)?;
    report += &format!("wrote {}\n", out.display());
    print!("{report}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_recovers_the_scale() {
        // Logits drawn from a model whose true temperature is 2: labels follow softmax(z / 2).
        let mut x = 7u64;
        let mut rnd = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        let c = 3;
        let (mut logits, mut labels) = (Vec::new(), Vec::new());
        for _ in 0..3000 {
            let z: Vec<f32> = (0..c).map(|_| (rnd() * 8.0 - 4.0) as f32).collect();
            let p = activate(&z, c, Task::MultiClass, 2.0);
            let u = rnd() as f32;
            let k = if u < p[0] {
                0
            } else if u < p[0] + p[1] {
                1
            } else {
                2
            };
            logits.extend(z);
            labels.push(vec![k]);
        }
        let t = fit_temperature(&logits, c, &labels, Task::MultiClass);
        assert!((t - 2.0).abs() < 0.25, "{t}");
    }

    #[test]
    fn youden_and_sensitivity() {
        let scores = [0.1, 0.2, 0.3, 0.6, 0.7, 0.9];
        let positive = [false, false, true, false, true, true];
        let t = choose_threshold(&scores, &positive, None);
        // Best J: threshold between 0.2 and 0.3 (se 1, sp 2/3) → J = 2/3.
        assert!((t - 0.25).abs() < 1e-9, "{t}");
        let t = choose_threshold(&scores, &positive, Some(0.6));
        // Highest threshold with sensitivity ≥ 0.6: between 0.6 and 0.7 gives 2/3.
        assert!((t - 0.65).abs() < 1e-9, "{t}");
    }
}
