//! What every inference backend offers ([`Backend`]) and what a batch gives back
//! ([`RawOutputs`]). The backends: tract (`tract.rs`) and ONNX Runtime (`ort.rs`).

use anyhow::bail;

/// The raw outputs of one batch.
#[derive(Debug, Clone, Default)]
pub struct RawOutputs {
    /// `[batch, classes]`, when the graph has a `logits` output.
    pub logits: Option<Vec<f32>>,
    /// `[batch, classes]`, when the graph has a `probabilities` output.
    pub probabilities: Option<Vec<f32>>,
    pub classes: usize,
    /// The graph's other outputs (explanation maps), batch first, in graph order.
    pub maps: Vec<OutputTensor>,
}

/// A float32 graph output besides the scores, batch first.
#[derive(Debug, Clone, Default)]
pub struct OutputTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl RawOutputs {
    /// From the `(values, last dimension)` of the logits and probabilities outputs, each
    /// present or not; the class count is the logits', else the probabilities', else 0.
    pub fn new(logits: Option<(Vec<f32>, usize)>, probs: Option<(Vec<f32>, usize)>) -> Self {
        let classes = logits.as_ref().or(probs.as_ref()).map_or(0, |(_, c)| *c);
        Self {
            logits: logits.map(|(v, _)| v),
            probabilities: probs.map(|(v, _)| v),
            classes,
            maps: Vec::new(),
        }
    }
}

/// An engine with a loaded model. `run` is used from one thread at a time; a backend with
/// lanes also runs from several threads at once through `run_shared`.
pub trait Backend: Send + Sync {
    /// `tract 0.23 (2 threads)`, `onnxruntime (CPUExecutionProvider, 2 threads)`.
    fn describe(&self) -> String;
    /// Runs `pixels` (`[batch, 3, s, s]`, normalised) through the graph.
    fn run(&mut self, pixels: &[f32], batch: usize) -> anyhow::Result<RawOutputs>;
    /// How many threads may each run images through `run_shared` on their own core at once
    /// (0: the backend runs one batch at a time, through `run`).
    fn lanes(&self) -> usize {
        0
    }
    /// Runs `pixels` as `run` does (`alone == false`), or on the calling thread alone, beside
    /// other such calls (`alone`); only for a backend with lanes.
    fn run_shared(
        &self,
        _pixels: &[f32],
        _batch: usize,
        _alone: bool,
    ) -> anyhow::Result<RawOutputs> {
        bail!("this backend runs one batch at a time")
    }
}

/// Finds the output index of each of `logits` and `probabilities` (the first output is taken
/// as logits when neither name is present).
pub(crate) fn output_roles(names: &[String]) -> (Option<usize>, Option<usize>) {
    let logits = names.iter().position(|n| n == "logits");
    let probs = names.iter().position(|n| n == "probabilities");
    if logits.is_none() && probs.is_none() {
        (Some(0), None)
    } else {
        (logits, probs)
    }
}
