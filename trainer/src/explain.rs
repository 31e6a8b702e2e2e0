//! Heatmaps of a classifier in libtorch, for `mae-train visualize --explain`: the maps that
//! `mae-export --explain` writes into the graph and `mae-run predict --explain` reads, computed
//! here on their own, so that the two are a check on each other.
//!
//! - attention rollout (Abnar & Zuidema 2020, arXiv:2005.00928) from the attention
//!   probabilities of every block: heads fused by their mean, the identity added, rows
//!   renormalised, multiplied through the blocks; the row of the token that feeds the head
//!   (the class token, or the mean of the patch-token rows), over the patches;
//! - Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391) on the last block's patch tokens by
//!   autograd: channel weights the gradient's mean over the grid, the map `ReLU(Σ_d w_d x_d)`,
//!   per class, not normalised. Global-pool heads only: a class-token head's score has no
//!   gradient with respect to the patch tokens;
//! - occlusion sensitivity through `mae_models::explain::occlusion`, the windows and the map
//!   that `mae-run` uses, with this model's probabilities.

use anyhow::{bail, Context};
use mae_models::checkpoint::Task;
use mae_models::explain::occlusion::{self, Occlusion};
use mae_models::explain::{Explanation, Method, GRADCAM_NEEDS_GLOBAL_POOL};
use tch::nn::ModuleT;
use tch::{Kind, Tensor};

use crate::engine::evaluate::probabilities;
use crate::model::vit::VisionTransformer;

/// Occluded images per pass of the model.
const OCCLUSION_BATCH: usize = 32;

/// Side of the patch grid of `model`.
fn grid(model: &VisionTransformer) -> i64 {
    (model.cfg.img_size / model.cfg.patch_size) as i64
}

/// Refuses Grad-CAM for a class-token model, with what to use instead.
pub fn check(model: &VisionTransformer, method: Method) -> anyhow::Result<()> {
    if method == Method::Gradcam && !model.cfg.global_pool {
        bail!(
            "{GRADCAM_NEEDS_GLOBAL_POOL} Use --explain rollout instead (attention rollout from \
             the class token), or --explain occlusion"
        );
    }
    if method == Method::Gradcam && model.head.is_none() {
        bail!("gradcam needs a classification head; this model has none");
    }
    Ok(())
}

/// The rollout maps `[b, g, g]` of a batch `[b, 3, s, s]`.
pub fn rollout(model: &VisionTransformer, xs: &Tensor) -> Tensor {
    let (_, probs) = tch::no_grad(|| model.forward_blocks_with_probs(xs));
    let b = xs.size()[0];
    let t = probs[0].size()[2];
    let eye = Tensor::eye(t, (Kind::Float, xs.device()));
    // Â_l = mean_h A_l + I, rows renormalised: [b, t, t]; R = Â_L ⋯ Â_1.
    let mut r: Option<Tensor> = None;
    for p in &probs {
        let a = p.to_kind(Kind::Float).mean_dim(1, false, Kind::Float) + &eye;
        let a = &a / a.sum_dim_intlist(-1, true, Kind::Float);
        r = Some(match r {
            None => a,
            Some(r) => a.matmul(&r),
        });
    }
    let r = r.expect("a ViT has at least one block"); // [b, t, t]
    let row = if model.cfg.global_pool {
        r.narrow(1, 1, t - 1).mean_dim(1, false, Kind::Float)
    } else {
        r.select(1, 0)
    }; // [b, t]
    let g = grid(model);
    row.narrow(1, 1, t - 1).reshape([b, g, g])
}

/// The Grad-CAM maps `[b, classes, g, g]` of every class for a batch `[b, 3, s, s]`.
pub fn gradcam(model: &VisionTransformer, xs: &Tensor) -> anyhow::Result<Tensor> {
    check(model, Method::Gradcam)?;
    let (tokens, _) = tch::no_grad(|| model.forward_blocks_with_probs(xs));
    let tokens = tokens.to_kind(Kind::Float).detach().set_requires_grad(true);
    let logits = model.head_from_tokens(&tokens); // [b, c]
    let (b, t, _) = tokens
        .size3()
        .context("the last block's tokens are [b, t, d]")?;
    let classes = logits.size()[1];
    let acts = tokens.detach().narrow(1, 1, t - 1); // [b, n, d]
    let maps: Vec<Tensor> = (0..classes)
        .map(|c| {
            // The images of a batch are independent: the gradient of the summed score is each
            // image's own.
            let score = logits.select(1, c).sum(Kind::Float);
            let grad = Tensor::run_backward(&[score], &[&tokens], true, false);
            let w = grad[0].narrow(1, 1, t - 1).mean_dim(1, true, Kind::Float); // [b, 1, d]
            (&acts * w).sum_dim_intlist(-1, false, Kind::Float).relu() // [b, n]
        })
        .collect();
    let g = grid(model);
    Ok(Tensor::stack(&maps, 1).reshape([b, classes, g, g]))
}

/// The occlusion map `[classes, s, s]` of one normalised image `[3, s, s]`.
pub fn occlusion(
    model: &VisionTransformer,
    image: &[f32],
    task: Task,
    p: &Occlusion,
) -> anyhow::Result<Explanation> {
    let s = model.cfg.img_size as i64;
    let mut run = |pixels: &[f32], n: usize| -> anyhow::Result<Vec<Vec<f32>>> {
        let xs = Tensor::from_slice(pixels).reshape([n as i64, 3, s, s]);
        let probs = tch::no_grad(|| probabilities(&model.forward_t(&xs, false), task));
        Ok(Vec::<Vec<f32>>::try_from(&probs)?)
    };
    let probs = run(image, 1)?
        .pop()
        .context("the model gave no probabilities")?;
    occlusion::explain_with(image, s as usize, &probs, p, OCCLUSION_BATCH, &mut run)
}
