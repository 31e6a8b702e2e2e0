//! The self-check after writing: the written file is loaded with tract, run on the seeded probe
//! batch, and its outputs are checked for shape and sanity and, where the checkpoint recorded
//! them, against the reference outputs of the weights it came from.

use std::fmt;
use std::path::Path;

use anyhow::{bail, ensure, Context};
use mae_models::checkpoint::{ProbeRecord, Task};
use mae_models::probe::probe_batch;
use tract_onnx::prelude::*;

use crate::onnx::vit::Precision;

/// A named tolerance: `|got − want| ≤ atol + rtol·|want|` element-wise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub atol: f32,
    pub rtol: f32,
}

impl Tolerance {
    /// float32 graphs against the framework that trained them.
    pub const FP32: Tolerance = Tolerance {
        atol: 1e-4,
        rtol: 1e-3,
    };
    /// float16 weights and compute.
    pub const FP16: Tolerance = Tolerance {
        atol: 2e-2,
        rtol: 2e-2,
    };
    /// int8 linear layers: a coarse guard against a broken graph, not an accuracy claim.
    pub const INT8: Tolerance = Tolerance {
        atol: 0.25,
        rtol: 0.25,
    };

    pub fn for_precision(p: Precision) -> Self {
        match p {
            Precision::Fp32 => Self::FP32,
            Precision::Fp16 => Self::FP16,
            Precision::Int8 => Self::INT8,
        }
    }
}

impl fmt::Display for Tolerance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "atol {:e} + rtol {:e}", self.atol, self.rtol)
    }
}

/// The outcome of comparing two equally long vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub max_abs: f32,
    /// Index, value and reference of the element furthest beyond its tolerance (or, when all
    /// are within, of the largest difference).
    pub worst: (usize, f32, f32),
    pub within: bool,
}

/// Compares `got` with `want` under `tol`; NaN anywhere counts as out of tolerance.
pub fn compare(got: &[f32], want: &[f32], tol: Tolerance) -> Comparison {
    let mut max_abs = 0f32;
    let mut worst = (0, f32::NAN, f32::NAN);
    let mut worst_excess = f32::NEG_INFINITY;
    let mut within = got.len() == want.len();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        let excess = if d.is_nan() {
            f32::INFINITY
        } else {
            d - (tol.atol + tol.rtol * w.abs())
        };
        if excess > 0.0 {
            within = false;
        }
        if excess > worst_excess {
            worst_excess = excess;
            worst = (i, g, w);
        }
        max_abs = max_abs.max(if d.is_nan() { f32::INFINITY } else { d });
    }
    Comparison {
        max_abs,
        worst,
        within,
    }
}

/// What the self-check runs and expects.
#[derive(Debug, Clone)]
pub struct CheckSpec<'a> {
    pub img_size: usize,
    pub in_chans: usize,
    /// `Some` for classifiers; the width of `features` otherwise.
    pub task: Option<Task>,
    pub width: usize,
    /// The input is `image` uint8 NHWC rather than `pixel_values`.
    pub preprocessing: bool,
    pub precision: Precision,
    pub probe: Option<&'a ProbeRecord>,
    /// The explanation outputs after the others: name and values per image.
    pub explain: Vec<(&'static str, usize)>,
}

/// What the self-check saw.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub seed: u64,
    pub batch: usize,
    /// Against the checkpoint's probe record, when it has one that applies.
    pub vs_probe: Option<(Comparison, Tolerance)>,
    /// Why there was no comparison.
    pub note: Option<String>,
}

/// Seed and batch of the probe when the checkpoint records none.
pub const DEFAULT_PROBE: (u64, usize) = (0, 2);

/// Loads `path` with tract and runs the probe batch through it.
pub fn self_check(path: &Path, spec: &CheckSpec<'_>) -> anyhow::Result<CheckReport> {
    let (seed, batch) = spec
        .probe
        .map_or(DEFAULT_PROBE, |p| (p.seed, p.batch.max(1)));
    let (s, c) = (spec.img_size, spec.in_chans);
    let values = probe_batch(seed, batch, c, s);
    let input: Tensor = if spec.preprocessing {
        // The probe's [-2, 2) mapped onto pixel values, laid out NHWC.
        let mut px = vec![0u8; values.len()];
        for (i, v) in values.iter().enumerate() {
            let (b, ch, y, x) = (i / (c * s * s), i / (s * s) % c, i / s % s, i % s);
            px[((b * s + y) * s + x) * c + ch] = ((v + 2.0) * 64.0).clamp(0.0, 255.0) as u8;
        }
        Tensor::from_shape(&[batch, s, s, c], &px)?
    } else {
        Tensor::from_shape(&[batch, c, s, s], &values)?
    };
    let outputs = run_tract(path, input)?;

    let width = spec.width;
    let first = outputs.first().context("the model has no output")?;
    ensure!(
        first.len() == batch * width,
        "tract: first output has {} values, expected batch {batch} × {width}",
        first.len()
    );
    if let Some(i) = first.iter().position(|v| !v.is_finite()) {
        bail!(
            "tract: output element {i} is {} on the probe batch",
            first[i]
        );
    }
    if let Some(task) = spec.task {
        let probs = outputs
            .get(1)
            .context("the model has no probabilities output")?;
        check_probabilities(probs, batch, width, task)?;
    }
    let first_map = if spec.task.is_some() { 2 } else { 1 };
    for (k, (name, per_image)) in spec.explain.iter().enumerate() {
        let map = outputs
            .get(first_map + k)
            .with_context(|| format!("the model has no '{name}' output"))?;
        ensure!(
            map.len() == batch * per_image,
            "tract: '{name}' has {} values, expected batch {batch} × {per_image}",
            map.len()
        );
        if let Some(i) = map.iter().position(|v| !v.is_finite() || *v < 0.0) {
            bail!(
                "tract: '{name}' element {i} is {} on the probe batch (maps are finite and \
                 non-negative)",
                map[i]
            );
        }
    }

    let mut report = CheckReport {
        seed,
        batch,
        vs_probe: None,
        note: None,
    };
    match spec.probe {
        None => {
            report.note = Some("the checkpoint records no probe outputs to compare with".into())
        }
        Some(_) if spec.preprocessing => {
            report.note = Some("probe outputs apply to pixel_values, not to uint8 images".into())
        }
        Some(_) if spec.task.is_none() => {
            report.note = Some("probe outputs are logits; this export outputs features".into())
        }
        Some(p) => {
            ensure!(
                p.outputs.len() == batch * width,
                "the checkpoint's probe record has {} values, expected batch {batch} × {width} \
                 classes",
                p.outputs.len()
            );
            let tol = Tolerance::for_precision(spec.precision);
            report.vs_probe = Some((compare(first, &p.outputs, tol), tol));
        }
    }
    Ok(report)
}

fn check_probabilities(probs: &[f32], batch: usize, c: usize, task: Task) -> anyhow::Result<()> {
    ensure!(
        probs.len() == batch * c,
        "tract: probabilities have {} values, expected {batch} × {c}",
        probs.len()
    );
    if let Some(i) = probs
        .iter()
        .position(|p| !(0.0..=1.0).contains(p) || !p.is_finite())
    {
        bail!("tract: probability {i} is {}, outside [0, 1]", probs[i]);
    }
    if task != Task::MultiLabel {
        for (b, row) in probs.chunks(c).enumerate() {
            let sum: f32 = row.iter().sum();
            ensure!(
                (sum - 1.0).abs() < 1e-3,
                "tract: probabilities of probe image {b} sum to {sum}, not 1"
            );
        }
    }
    Ok(())
}

/// Runs an ONNX file with tract on one input; returns every output as float32.
pub fn run_tract(path: &Path, input: Tensor) -> anyhow::Result<Vec<Vec<f32>>> {
    let model = tract_onnx::onnx()
        .model_for_path(path)
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .with_context(|| format!("tract cannot load {}", path.display()))?;
    let outputs = model
        .run(tvec!(input.into()))
        .with_context(|| format!("tract cannot run {}", path.display()))?;
    outputs
        .iter()
        .map(|o| {
            let t = o.cast_to::<f32>()?;
            Ok(t.try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
        })
        .collect::<TractResult<Vec<_>>>()
        .context("tract: cannot read the outputs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_reports_the_worst_element() {
        let c = compare(&[1.0, 2.0, 3.5], &[1.0, 2.00001, 3.0], Tolerance::FP32);
        assert!(!c.within);
        assert_eq!(c.worst.0, 2);
        assert_eq!(c.max_abs, 0.5);
        let c = compare(&[1.0, 2.0], &[1.00005, 2.0], Tolerance::FP32);
        assert!(c.within);
        let c = compare(&[f32::NAN], &[0.0], Tolerance::FP16);
        assert!(!c.within);
        assert!(!compare(&[1.0], &[1.0, 2.0], Tolerance::FP32).within);
    }
}
