//! Occlusion sensitivity through an engine. The windows, their placement (as captum places
//! them) and the map are `mae_models::explain::occlusion`'s, shared with `mae-train visualize`;
//! it costs one pass of the model per window position, batched.

use super::Explanation;
use crate::engine::Engine;

use mae_models::explain::occlusion;
pub use mae_models::explain::occlusion::Occlusion;

/// Probabilities (one row per image) of `n` normalised images `[n, 3, s, s]`.
pub type RunBatch<'a> = occlusion::RunBatch<'a, anyhow::Error>;

/// The occlusion map `[classes, size, size]` of one normalised image `[3, size, size]` whose
/// unoccluded probabilities are `probs`, running `batch` occluded copies per pass through the
/// engine.
pub fn explain(
    engine: &mut Engine,
    image: &[f32],
    probs: &[f32],
    p: &Occlusion,
    batch: usize,
) -> anyhow::Result<Explanation> {
    let s = engine.meta.preprocess.input_size;
    explain_with(image, s, probs, p, batch, &mut |px, n| {
        engine.probabilities(px, n)
    })
}

/// [`explain`] through `run`, which gives the probabilities of `n` images (`[n, 3, s, s]`), for
/// an input of side `s`.
pub fn explain_with(
    image: &[f32],
    s: usize,
    probs: &[f32],
    p: &Occlusion,
    batch: usize,
    run: &mut RunBatch<'_>,
) -> anyhow::Result<Explanation> {
    occlusion::explain_with(image, s, probs, p, batch, run)
}
