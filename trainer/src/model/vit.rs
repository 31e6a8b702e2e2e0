//! Vision Transformer (Dosovitskiy et al. 2020, arXiv:2010.11929) as fine-tuned by MAE
//! (He et al. 2021, arXiv:2111.06377): facebookresearch/mae `models_vit.py`, i.e. timm's
//! `VisionTransformer` with a global-pool head (`fc_norm`) or the class-token head (`norm`).

use mae_models::VitConfig;
use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Tensor};

use super::{layer_norm, linear, trunc_normal_};

/// `patch_embed`: a strided convolution cutting the image into patch tokens.
#[derive(Debug)]
pub struct PatchEmbed {
    pub proj: nn::Conv2D,
}

impl PatchEmbed {
    pub fn new(p: nn::Path, cfg: &VitConfig) -> Self {
        let (c, d, k) = (
            cfg.in_chans as i64,
            cfg.embed_dim as i64,
            cfg.patch_size as i64,
        );
        let conv = nn::ConvConfig {
            stride: k,
            ..Default::default()
        };
        let proj = nn::conv2d(&p / "proj", c, d, k, conv);
        // Upstream initialises the projection like a linear layer (xavier uniform on [d, c·k·k]).
        let fan = (c * k * k + d) as f64;
        let bound = (6.0 / fan).sqrt();
        tch::no_grad(|| {
            let _ = proj.ws.shallow_clone().uniform_(-bound, bound);
            if let Some(b) = &proj.bs {
                let _ = b.shallow_clone().zero_();
            }
        });
        Self { proj }
    }
}

impl Module for PatchEmbed {
    fn forward(&self, xs: &Tensor) -> Tensor {
        // [b, c, h, w] → [b, d, h/p, w/p] → [b, n, d]
        xs.apply(&self.proj).flatten(2, -1).transpose(1, 2)
    }
}

/// `attn`: multi-head self-attention through libtorch's fused scaled-dot-product kernels.
#[derive(Debug)]
pub struct Attention {
    pub qkv: nn::Linear,
    pub proj: nn::Linear,
    num_heads: i64,
}

impl Attention {
    fn new(p: nn::Path, d: i64, num_heads: i64, qkv_bias: bool) -> Self {
        let mut qkv = linear(&p / "qkv", d, 3 * d, 0.02);
        if !qkv_bias {
            qkv.bs = None;
        }
        Self {
            qkv,
            proj: linear(&p / "proj", d, d, 0.02),
            num_heads,
        }
    }
}

impl Attention {
    /// The evaluation pass with its attention probabilities `[b, h, n, n]` written out (the
    /// softmax of the scaled products that the fused kernel keeps inside), for explanations.
    pub fn forward_with_probs(&self, xs: &Tensor) -> (Tensor, Tensor) {
        let (b, n, d) = xs.size3().expect("attention input is [b, n, d]");
        let h = self.num_heads;
        // [b, n, 3·d] → [3, b, h, n, d/h]
        let qkv = xs
            .apply(&self.qkv)
            .reshape([b, n, 3, h, d / h])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let scale = ((d / h) as f64).powf(-0.5);
        let probs = (q.matmul(&k.transpose(-2, -1)) * scale).softmax(-1, Kind::Float); // [b, h, n, n]
        let ys = probs.matmul(&v); // [b, h, n, d/h]
        let ys = ys.transpose(1, 2).reshape([b, n, d]).apply(&self.proj);
        (ys, probs)
    }
}

impl Module for Attention {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let (b, n, d) = xs.size3().expect("attention input is [b, n, d]");
        let h = self.num_heads;
        // [b, n, 3·d] → [3, b, h, n, d/h]
        let qkv = xs
            .apply(&self.qkv)
            .reshape([b, n, 3, h, d / h])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let ys = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None::<f64>,
            false,
        );
        // [b, h, n, d/h] → [b, n, d]
        ys.transpose(1, 2).reshape([b, n, d]).apply(&self.proj)
    }
}

/// `mlp`: two linear layers around an exact (erf) GELU.
#[derive(Debug)]
pub struct Mlp {
    pub fc1: nn::Linear,
    pub fc2: nn::Linear,
}

impl Mlp {
    fn new(p: nn::Path, d: i64, hidden: i64) -> Self {
        Self {
            fc1: linear(&p / "fc1", d, hidden, 0.02),
            fc2: linear(&p / "fc2", hidden, d, 0.02),
        }
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.apply(&self.fc1).gelu("none").apply(&self.fc2)
    }
}

/// One pre-norm transformer block with stochastic depth.
#[derive(Debug)]
pub struct Block {
    pub norm1: nn::LayerNorm,
    pub attn: Attention,
    pub norm2: nn::LayerNorm,
    pub mlp: Mlp,
    drop_path: f64,
}

impl Block {
    /// A block of width `d`; shared with the MAE encoder and decoder.
    pub fn new(p: nn::Path, d: i64, heads: i64, hidden: i64, eps: f64, drop_path: f64) -> Self {
        Self {
            norm1: layer_norm(&p / "norm1", d, eps),
            attn: Attention::new(&p / "attn", d, heads, true),
            norm2: layer_norm(&p / "norm2", d, eps),
            mlp: Mlp::new(&p / "mlp", d, hidden),
            drop_path,
        }
    }
}

impl Block {
    /// The evaluation pass, with the attention probabilities `[b, h, n, n]`.
    pub fn forward_with_probs(&self, xs: &Tensor) -> (Tensor, Tensor) {
        let (ys, probs) = self.attn.forward_with_probs(&xs.apply(&self.norm1));
        let xs = xs + ys;
        let ys = xs.apply(&self.norm2).apply(&self.mlp);
        (&xs + ys, probs)
    }
}

/// Drops whole residual branches per sample with probability `p` while training.
fn drop_path(xs: Tensor, p: f64, train: bool) -> Tensor {
    if !train || p == 0.0 {
        return xs;
    }
    let keep = 1.0 - p;
    let b = xs.size()[0];
    let mask = Tensor::empty([b, 1, 1], (xs.kind(), xs.device()))
        .bernoulli_float_(keep)
        .g_div_scalar(keep);
    xs * mask
}

impl ModuleT for Block {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let ys = xs.apply(&self.norm1).apply(&self.attn);
        let xs = xs + drop_path(ys, self.drop_path, train);
        let ys = xs.apply(&self.norm2).apply(&self.mlp);
        &xs + drop_path(ys, self.drop_path, train)
    }
}

/// The classifier: patch embedding, class token, position embedding, blocks and a head.
#[derive(Debug)]
pub struct VisionTransformer {
    pub cfg: VitConfig,
    pub patch_embed: PatchEmbed,
    pub cls_token: Tensor,
    pub pos_embed: Tensor,
    pub blocks: Vec<Block>,
    /// Class-token head only.
    pub norm: Option<nn::LayerNorm>,
    /// Global-pool head only.
    pub fc_norm: Option<nn::LayerNorm>,
    pub head: Option<nn::Linear>,
}

impl VisionTransformer {
    /// Builds the model under `p` with drop-path rates rising linearly to `drop_path_rate`.
    pub fn new(p: &nn::Path, cfg: &VitConfig, drop_path_rate: f64) -> Self {
        let d = cfg.embed_dim as i64;
        let eps = cfg.layer_norm_eps;
        let patch_embed = PatchEmbed::new(p / "patch_embed", cfg);
        let cls_token = p.zeros("cls_token", &[1, 1, d]);
        trunc_normal_(&cls_token, 1e-6);
        let pos_embed = p.zeros("pos_embed", &[1, cfg.num_tokens() as i64, d]);
        trunc_normal_(&pos_embed, 0.02);
        let depth = cfg.depth;
        let blocks = (0..depth)
            .map(|i| {
                let rate = if depth > 1 {
                    drop_path_rate * i as f64 / (depth - 1) as f64
                } else {
                    0.0
                };
                let (heads, hidden) = (cfg.num_heads as i64, cfg.mlp_hidden() as i64);
                Block::new(p / "blocks" / i, d, heads, hidden, eps, rate)
            })
            .collect();
        let (norm, fc_norm) = if cfg.global_pool {
            (None, Some(layer_norm(p / "fc_norm", d, eps)))
        } else {
            (Some(layer_norm(p / "norm", d, eps)), None)
        };
        let head =
            (cfg.num_classes > 0).then(|| linear(p / "head", d, cfg.num_classes as i64, 2e-5));
        Self {
            cfg: cfg.clone(),
            patch_embed,
            cls_token,
            pos_embed,
            blocks,
            norm,
            fc_norm,
            head,
        }
    }

    /// The pooled embedding `[b, d]` that the head classifies.
    pub fn forward_features(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut xs = self.embed(xs);
        for blk in &self.blocks {
            xs = blk.forward_t(&xs, train);
        }
        self.pool(&xs)
    }

    /// The tokens entering the first block: patches, class token and position `[b, n+1, d]`.
    fn embed(&self, xs: &Tensor) -> Tensor {
        let xs = xs.apply(&self.patch_embed); // [b, n, d]
        let b = xs.size()[0];
        let cls = self.cls_token.expand([b, -1, -1], false);
        Tensor::cat(&[cls, xs], 1) + &self.pos_embed // [b, n+1, d]
    }

    /// The embedding `[b, d]` of the last block's tokens `[b, n+1, d]`: the normalised mean of
    /// the patch tokens (global pool) or the normalised class token.
    fn pool(&self, xs: &Tensor) -> Tensor {
        match (&self.fc_norm, &self.norm) {
            (Some(fc_norm), _) => xs
                .narrow(1, 1, xs.size()[1] - 1)
                .mean_dim(1, false, None)
                .apply(fc_norm),
            (None, Some(norm)) => xs.apply(norm).select(1, 0),
            (None, None) => unreachable!("one of norm and fc_norm exists by construction"),
        }
    }

    /// The evaluation pass up to the last block, for explanations: its tokens `[b, n+1, d]`
    /// and each block's attention probabilities `[b, h, n+1, n+1]`, in block order.
    pub fn forward_blocks_with_probs(&self, xs: &Tensor) -> (Tensor, Vec<Tensor>) {
        let mut xs = self.embed(xs);
        let mut probs = Vec::with_capacity(self.blocks.len());
        for blk in &self.blocks {
            let (ys, p) = blk.forward_with_probs(&xs);
            xs = ys;
            probs.push(p);
        }
        (xs, probs)
    }

    /// The head's output for the last block's tokens `[b, n+1, d]`: logits `[b, classes]`
    /// (the embedding when the model has no head).
    pub fn head_from_tokens(&self, xs: &Tensor) -> Tensor {
        let feats = self.pool(xs);
        match &self.head {
            Some(h) => feats.apply(h),
            None => feats,
        }
    }
}

impl ModuleT for VisionTransformer {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let feats = self.forward_features(xs, train);
        match &self.head {
            Some(h) => feats.apply(h),
            None => feats,
        }
    }
}
