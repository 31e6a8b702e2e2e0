//! A loaded model: a backend plus what the metadata says about preprocessing and labels; turns
//! batches of images into probabilities and labelled predictions.
//!
//! - `model.rs`: the ONNX file and its metadata; `protoedit.rs` writes metadata into a copy;
//! - `settings.rs`: flags and environment as one set of load options;
//! - `backend.rs`: the trait of the backends, `tract.rs` and `ort.rs` (found by `ortlib.rs`).

pub mod backend;
pub mod model;
pub mod ort;
pub mod ortlib;
pub mod protoedit;
pub mod settings;
pub mod tract;

#[cfg(test)]
mod tests;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use mae_models::checkpoint::Task;
use mae_models::metrics::top_k;
use serde::Serialize;

use self::backend::{Backend, OutputTensor, RawOutputs};
use self::model::{MetaOverrides, ModelFile, ModelMeta};
use self::settings::{BackendKind, Device, LoadOptions, ModelArgs};
use crate::accel::Rewrites;

/// A model ready to run.
pub struct Engine {
    pub file: ModelFile,
    pub meta: ModelMeta,
    backend: Box<dyn Backend>,
    /// Time to read, check and load the model.
    pub load_time: Duration,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.file.path)
            .field("backend", &self.backend.describe())
            .finish()
    }
}

impl Engine {
    /// Reads `path`, checks its SHA-256 against `expect_sha256`, interprets its metadata and
    /// loads it into the backend.
    pub fn load(
        path: &Path,
        expect_sha256: Option<&str>,
        overrides: &MetaOverrides,
        opts: &LoadOptions,
    ) -> anyhow::Result<Self> {
        let start = Instant::now();
        if !path.exists() {
            bail!("model {} does not exist", path.display());
        }
        let file = ModelFile::read(path)?;
        if let Some(want) = expect_sha256 {
            if !want.trim().eq_ignore_ascii_case(&file.sha256) {
                bail!(
                    "{} has SHA-256 {}, not the expected {} (--expect-sha256): refusing to use it",
                    path.display(),
                    file.sha256,
                    want.trim()
                );
            }
        }
        let meta = ModelMeta::from_file(&file, overrides)?;
        let backend = load_backend(path, &meta, opts)?;
        Ok(Self {
            file,
            meta,
            backend,
            load_time: start.elapsed(),
        })
    }

    pub fn describe_backend(&self) -> String {
        self.backend.describe()
    }

    /// Floats in one image tensor.
    pub fn image_len(&self) -> usize {
        let s = self.meta.preprocess.input_size;
        3 * s * s
    }

    /// Fails unless `pixels` holds exactly `batch` images.
    fn check_pixels(&self, pixels: &[f32], batch: usize) -> anyhow::Result<()> {
        if pixels.len() != batch * self.image_len() {
            bail!(
                "{} input values for a batch of {batch} (expected {})",
                pixels.len(),
                batch * self.image_len()
            );
        }
        Ok(())
    }

    /// Raw outputs of one batch, split into the graph's fixed batch when it has one.
    pub fn run_raw(&mut self, pixels: &[f32], batch: usize) -> anyhow::Result<RawOutputs> {
        self.check_pixels(pixels, batch)?;
        match self.meta.fixed_batch {
            Some(fb) if fb != batch => {
                // Run one graph-sized batch at a time, padding the last one.
                let len = self.image_len();
                let mut out = RawOutputs::default();
                for chunk in pixels.chunks(fb * len) {
                    let n = chunk.len() / len;
                    let mut padded = chunk.to_vec();
                    padded.resize(fb * len, 0.0);
                    let r = self.backend.run(&padded, fb)?;
                    out.classes = r.classes;
                    let keep = n * r.classes;
                    if let Some(l) = r.logits {
                        out.logits.get_or_insert_with(Vec::new).extend(&l[..keep]);
                    }
                    if let Some(p) = r.probabilities {
                        out.probabilities
                            .get_or_insert_with(Vec::new)
                            .extend(&p[..keep]);
                    }
                    keep_maps(&mut out.maps, r.maps, n, fb);
                }
                Ok(out)
            }
            _ => self.backend.run(pixels, batch),
        }
    }

    /// Probabilities `[batch, classes]` of one batch of preprocessed images, calibrated when
    /// the model carries a temperature.
    pub fn probabilities(&mut self, pixels: &[f32], batch: usize) -> anyhow::Result<Vec<Vec<f32>>> {
        Ok(self.scores(pixels, batch)?.probabilities)
    }

    /// The graph's raw logits (when it has them) and the calibrated probabilities, row by row,
    /// of one batch of preprocessed images.
    pub fn scores(&mut self, pixels: &[f32], batch: usize) -> anyhow::Result<Scores> {
        let raw = self.run_raw(pixels, batch)?;
        self.scores_of(raw, batch)
    }

    /// How many threads may each run images through [`Engine::scores_shared`] on their own
    /// core at once (0: the engine runs one batch at a time, through [`Engine::scores`]).
    pub fn lanes(&self) -> usize {
        self.backend.lanes()
    }

    /// [`Engine::scores`] from a shared engine with lanes: spread over its threads as
    /// `scores` does, or on the calling thread `alone`, beside other such calls.
    pub fn scores_shared(
        &self,
        pixels: &[f32],
        batch: usize,
        alone: bool,
    ) -> anyhow::Result<Scores> {
        self.check_pixels(pixels, batch)?;
        let raw = self.backend.run_shared(pixels, batch, alone)?;
        self.scores_of(raw, batch)
    }

    /// Rows of probabilities (calibrated) and logits from a batch's raw outputs.
    fn scores_of(&self, mut raw: RawOutputs, batch: usize) -> anyhow::Result<Scores> {
        let c = raw.classes;
        if c == 0 {
            bail!("the model returned no class scores");
        }
        let task = self.meta.task;
        let probs: Vec<f32> = match (&raw.logits, &raw.probabilities, self.meta.temperature) {
            (Some(l), _, Some(t)) => activate(l, c, task, t as f32),
            (_, Some(p), None) => p.clone(),
            (Some(l), None, None) => activate(l, c, task, 1.0),
            (None, Some(_), Some(_)) => {
                bail!("the model is calibrated (temperature) but has no 'logits' output")
            }
            (None, None, _) => bail!("the model has neither 'logits' nor 'probabilities'"),
        };
        if probs.len() != batch * c {
            bail!(
                "the model returned {} values for {batch} images of {c} classes",
                probs.len()
            );
        }
        if !self.meta.class_names.is_empty() && self.meta.class_names.len() != c {
            bail!(
                "the model has {} class names but {c} outputs",
                self.meta.class_names.len()
            );
        }
        let rows = |v: &[f32]| v.chunks(c).map(<[f32]>::to_vec).collect::<Vec<_>>();
        Ok(Scores {
            logits: raw.logits.as_deref().map(rows),
            probabilities: rows(&probs),
            maps: std::mem::take(&mut raw.maps),
        })
    }

    /// The labelled prediction for one row of probabilities.
    pub fn label(&self, probs: &[f32], k: usize) -> Prediction {
        label(&self.meta, probs, k)
    }
}

/// Appends the first `n` images' rows of each map of a padded batch of `fb` to `out`.
fn keep_maps(out: &mut Vec<OutputTensor>, maps: Vec<OutputTensor>, n: usize, fb: usize) {
    for m in maps {
        let per = m.values.len() / fb.max(1);
        match out.iter_mut().find(|o| o.name == m.name) {
            Some(o) => {
                o.values.extend(&m.values[..n * per]);
                if let Some(b) = o.shape.first_mut() {
                    *b += n;
                }
            }
            None => {
                let mut shape = m.shape;
                if let Some(b) = shape.first_mut() {
                    *b = n;
                }
                out.push(OutputTensor {
                    name: m.name,
                    shape,
                    values: m.values[..n * per].to_vec(),
                });
            }
        }
    }
}

/// The labelled prediction for one row of probabilities: the top `k` classes, and the
/// predicted class (argmax; binary: the positive class above the threshold) or labels
/// (multi-label: every label above the threshold).
pub fn label(meta: &ModelMeta, probs: &[f32], k: usize) -> Prediction {
    let threshold = meta.decision_threshold();
    let top: Vec<ClassProb> = top_k(probs, k.max(1))
        .into_iter()
        .map(|(i, p)| ClassProb {
            index: i,
            name: meta.class_name(i),
            probability: p,
        })
        .collect();
    let labels: Vec<usize> = match meta.task {
        Task::MultiClass => top.first().map(|t| t.index).into_iter().collect(),
        Task::Binary => {
            let pos = probs.len().saturating_sub(1);
            vec![usize::from(probs.get(pos).is_some_and(|&p| p as f64 > threshold)).min(pos)]
        }
        Task::MultiLabel => (0..probs.len())
            .filter(|&i| probs[i] as f64 > threshold)
            .collect(),
    };
    let (class, probability) = match labels.first() {
        Some(&i) if meta.task != Task::MultiLabel => {
            (Some(meta.class_name(i)), probs.get(i).copied())
        }
        _ => (None, None),
    };
    Prediction {
        class,
        probability,
        labels: labels.iter().map(|&i| meta.class_name(i)).collect(),
        top,
        probabilities: probs.to_vec(),
    }
}

/// Softmax (sigmoid for multi-label) of `logits / t`, row by row.
pub fn activate(logits: &[f32], c: usize, task: Task, t: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks(c) {
        if task == Task::MultiLabel {
            out.extend(row.iter().map(|&x| 1.0 / (1.0 + (-x / t).exp())));
        } else {
            let m = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x / t));
            let e: Vec<f32> = row.iter().map(|&x| (x / t - m).exp()).collect();
            let s: f32 = e.iter().sum();
            out.extend(e.iter().map(|v| v / s));
        }
    }
    out
}

/// The outputs of one batch, one row per image.
#[derive(Debug, Clone, Default)]
pub struct Scores {
    /// The graph's `logits` (before any calibration), when it has that output.
    pub logits: Option<Vec<Vec<f32>>>,
    /// Probabilities, calibrated when the model carries a temperature.
    pub probabilities: Vec<Vec<f32>>,
    /// The graph's further outputs (explanation maps), batch first.
    pub maps: Vec<OutputTensor>,
}

impl Scores {
    /// The rows of images `first..first + n` of a batch of `batch` images.
    pub fn rows(&self, first: usize, n: usize, batch: usize) -> Scores {
        let take = |v: &Vec<Vec<f32>>| v.iter().skip(first).take(n).cloned().collect();
        Scores {
            logits: self.logits.as_ref().map(take),
            probabilities: take(&self.probabilities),
            maps: self
                .maps
                .iter()
                .map(|m| {
                    let per = m.values.len() / batch.max(1);
                    let end = ((first + n) * per).min(m.values.len());
                    let mut shape = m.shape.clone();
                    if let Some(b) = shape.first_mut() {
                        *b = n;
                    }
                    OutputTensor {
                        name: m.name.clone(),
                        shape,
                        values: m.values[(first * per).min(end)..end].to_vec(),
                    }
                })
                .collect(),
        }
    }
}

/// One class and its probability.
#[derive(Debug, Clone, Serialize)]
pub struct ClassProb {
    pub index: usize,
    pub name: String,
    pub probability: f32,
}

/// The labelled output for one image.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    /// The predicted class (multi-class, binary).
    pub class: Option<String>,
    /// Its probability.
    pub probability: Option<f32>,
    /// Predicted labels: the class, or every label above the threshold (multi-label).
    pub labels: Vec<String>,
    /// The `k` most probable classes.
    pub top: Vec<ClassProb>,
    /// Every class's probability, in class order.
    pub probabilities: Vec<f32>,
}

/// Loads `path` into the chosen backend.
fn load_backend(
    path: &Path,
    meta: &ModelMeta,
    opts: &LoadOptions,
) -> anyhow::Result<Box<dyn Backend>> {
    match opts.kind {
        BackendKind::Tract => {
            match opts.device {
                Device::Cpu => {}
                Device::Auto => {
                    tracing::info!("tract runs on the CPU (use --backend ort for CUDA)")
                }
                Device::Cuda => {
                    bail!("the tract backend runs on the CPU only; use --backend ort --device cuda")
                }
            }
            if meta.precision.as_deref() == Some("int8") && opts.tract.rewrites == Rewrites::None {
                tracing::warn!(
                    "{}: int8 models run several times slower in tract's own graph ({}=none) \
                     than their float32 export",
                    path.display(),
                    Rewrites::ENV
                );
            }
            Ok(Box::new(tract::TractBackend::load(
                path,
                meta,
                opts.threads,
                opts.parallel,
                opts.tract,
            )?))
        }
        BackendKind::Ort => Ok(Box::new(ort::OrtBackend::load(path, meta, opts)?)),
    }
}

impl ModelArgs {
    /// Loads the model, reporting what was loaded on standard error.
    pub fn load(&self) -> anyhow::Result<Engine> {
        let engine = Engine::load(
            &self.model,
            self.expect_sha256.as_deref(),
            &self.overrides,
            &self.load_options()?,
        )?;
        tracing::info!(
            "loaded {} ({}) in {:.0} ms on {}",
            self.model.display(),
            &engine.file.sha256[..12],
            engine.load_time.as_secs_f64() * 1e3,
            engine.describe_backend()
        );
        Ok(engine)
    }
}

impl Engine {
    /// Says on standard error that a calibration stored in the model is in force.
    pub fn note_calibration(&self) {
        let m = &self.meta;
        if m.temperature.is_some() || m.threshold.is_some() {
            let mut parts = Vec::new();
            if let Some(t) = m.temperature {
                parts.push(format!("temperature {t:.4}"));
            }
            if let Some(t) = m.threshold {
                parts.push(format!("threshold {t:.4}"));
            }
            eprintln!(
                "mae-run: applying the model's calibration: {} (--no-calibration to ignore)",
                parts.join(", ")
            );
        }
    }
}

/// Runs `f` and returns its value with the time it took.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let v = f();
    (v, start.elapsed())
}
