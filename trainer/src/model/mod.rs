//! Models on libtorch, one file per architecture; the struct tree is the checkpoint key tree.

pub mod load;
pub mod mae;
pub mod probe;
pub mod vit;

use tch::{nn, Tensor};

/// Fills `t` in place with a normal distribution truncated to ±2 (absolute), as timm's
/// `trunc_normal_(t, std=std)` does for the small standard deviations used here.
pub fn trunc_normal_(t: &Tensor, std: f64) {
    tch::no_grad(|| {
        let v = Tensor::randn_like(t).g_mul_scalar(std).clamp(-2.0, 2.0);
        t.shallow_clone().copy_(&v);
    });
}

/// A linear layer initialised as upstream fine-tuning does: trunc-normal weights, zero bias.
pub fn linear(p: nn::Path, i: i64, o: i64, std: f64) -> nn::Linear {
    let l = nn::linear(p, i, o, Default::default());
    trunc_normal_(&l.ws, std);
    if let Some(b) = &l.bs {
        let _ = tch::no_grad(|| b.shallow_clone().zero_());
    }
    l
}

/// LayerNorm over the last dimension with upstream's epsilon.
pub fn layer_norm(p: nn::Path, d: i64, eps: f64) -> nn::LayerNorm {
    let cfg = nn::LayerNormConfig {
        eps,
        ..Default::default()
    };
    nn::layer_norm(p, vec![d], cfg)
}
