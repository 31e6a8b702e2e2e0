//! Masked Autoencoder (He et al. 2021, arXiv:2111.06377), as facebookresearch/mae
//! `models_mae.MaskedAutoencoderViT`: a ViT encoder over the visible patches, a light decoder
//! that reconstructs every patch, and an MSE loss on the masked patches.

use mae_models::MaeConfig;
use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Tensor};

use super::layer_norm;
use super::vit::{Block, PatchEmbed};

/// Fixed 2-D sine-cosine position embeddings `[1 + g·g, d]` (a zero row for the class
/// token first), as upstream `get_2d_sincos_pos_embed(d, g, cls_token=True)`.
pub fn sincos_2d(d: usize, g: usize) -> Vec<f32> {
    let half = d / 2;
    let quarter = half / 2;
    let omega: Vec<f64> = (0..quarter)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / (half as f64 / 2.0)))
        .collect();
    let mut out = vec![0f32; (g * g + 1) * d];
    for i in 0..g {
        for j in 0..g {
            let row = &mut out[(1 + i * g + j) * d..(2 + i * g + j) * d];
            // Upstream meshes (w, h): the first half encodes the column, the second the row.
            for (k, w) in omega.iter().enumerate() {
                row[k] = (j as f64 * w).sin() as f32;
                row[quarter + k] = (j as f64 * w).cos() as f32;
                row[half + k] = (i as f64 * w).sin() as f32;
                row[half + quarter + k] = (i as f64 * w).cos() as f32;
            }
        }
    }
    out
}

/// `[n, 3, h, w]` images → `[n, L, p·p·3]` patches, as upstream `patchify`.
pub fn patchify(imgs: &Tensor, p: i64) -> Tensor {
    let (n, c, h, w) = imgs.size4().expect("images are [n, c, h, w]");
    let (gh, gw) = (h / p, w / p);
    imgs.reshape([n, c, gh, p, gw, p])
        .permute([0, 2, 4, 3, 5, 1]) // nchpwq → nhwpqc
        .reshape([n, gh * gw, p * p * c])
}

/// The inverse of [`patchify`] for square images.
pub fn unpatchify(xs: &Tensor, p: i64, c: i64) -> Tensor {
    let (n, l, _) = xs.size3().expect("patches are [n, L, p·p·c]");
    let g = (l as f64).sqrt() as i64;
    xs.reshape([n, g, g, p, p, c])
        .permute([0, 5, 1, 3, 2, 4]) // nhwpqc → nchpwq
        .reshape([n, c, g * p, g * p])
}

/// Random masking by per-sample noise argsort: keeps `int(L·(1 − ratio))` patches.
/// Returns (kept tokens `[n, keep, d]`, mask `[n, L]` with 1 = removed, ids_restore `[n, L]`).
pub fn random_masking(xs: &Tensor, noise: &Tensor, ratio: f64) -> (Tensor, Tensor, Tensor) {
    let (n, l, d) = xs.size3().expect("tokens are [n, L, d]");
    let keep = (l as f64 * (1.0 - ratio)) as i64;
    let ids_shuffle = noise.argsort(1, false);
    let ids_restore = ids_shuffle.argsort(1, false);
    let ids_keep = ids_shuffle.narrow(1, 0, keep);
    let kept = xs.gather(1, &ids_keep.unsqueeze(-1).repeat([1, 1, d]), false);
    let mask = Tensor::ones([n, l], (Kind::Float, xs.device()));
    let _ = mask.narrow(1, 0, keep).fill_(0.0);
    let mask = mask.gather(1, &ids_restore, false);
    (kept, mask, ids_restore)
}

/// Per-patch normalised targets (`--norm-pix-loss`): each patch minus its mean, divided by
/// its (unbiased) standard deviation.
pub fn norm_pix(target: &Tensor) -> Tensor {
    let mean = target.mean_dim(-1, true, Kind::Float);
    let var = target.var_dim(-1, true, true);
    (target - mean) / (var + 1e-6).sqrt()
}

/// What one forward pass returns.
#[derive(Debug)]
pub struct MaeOutput {
    pub loss: Tensor,
    /// `[n, L, p·p·3]` predictions (normalised-pixel space with `norm_pix_loss`).
    pub pred: Tensor,
    /// `[n, L]`, 1 for masked patches.
    pub mask: Tensor,
}

/// The full model with the upstream parameter names.
#[derive(Debug)]
pub struct MaskedAutoencoderViT {
    pub cfg: MaeConfig,
    pub patch_embed: PatchEmbed,
    pub cls_token: Tensor,
    pub pos_embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: nn::LayerNorm,
    pub decoder_embed: nn::Linear,
    pub mask_token: Tensor,
    pub decoder_pos_embed: Tensor,
    pub decoder_blocks: Vec<Block>,
    pub decoder_norm: nn::LayerNorm,
    pub decoder_pred: nn::Linear,
}

fn xavier_linear(p: nn::Path, i: i64, o: i64) -> nn::Linear {
    let l = nn::linear(p, i, o, Default::default());
    let bound = (6.0 / (i + o) as f64).sqrt();
    tch::no_grad(|| {
        let _ = l.ws.shallow_clone().uniform_(-bound, bound);
        if let Some(b) = &l.bs {
            let _ = b.shallow_clone().zero_();
        }
    });
    l
}

fn fixed_pos(p: &nn::Path, name: &str, d: usize, g: usize) -> Tensor {
    let v = sincos_2d(d, g);
    let t = Tensor::from_slice(&v).reshape([1, (g * g + 1) as i64, d as i64]);
    // Stored in the checkpoint as upstream does, but never trained.
    p.var_copy(name, &t).set_requires_grad(false)
}

impl MaskedAutoencoderViT {
    /// Builds the model with upstream initialisation.
    pub fn new(p: &nn::Path, cfg: &MaeConfig) -> Self {
        let (d, dd) = (cfg.embed_dim as i64, cfg.decoder_embed_dim as i64);
        let g = cfg.img_size / cfg.patch_size;
        let eps = cfg.layer_norm_eps;
        let hidden = |w: i64| (w as f64 * cfg.mlp_ratio) as i64;
        let vit_like = cfg.encoder(0, false);
        let patch_embed = PatchEmbed::new(p / "patch_embed", &vit_like);
        let cls_token = p.var(
            "cls_token",
            &[1, 1, d],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let pos_embed = fixed_pos(p, "pos_embed", cfg.embed_dim, g);
        let blocks = (0..cfg.depth)
            .map(|i| {
                Block::new(
                    p / "blocks" / i,
                    d,
                    cfg.num_heads as i64,
                    hidden(d),
                    eps,
                    0.0,
                )
            })
            .collect::<Vec<_>>();
        let norm = layer_norm(p / "norm", d, eps);
        let decoder_embed = xavier_linear(p / "decoder_embed", d, dd);
        let mask_token = p.var(
            "mask_token",
            &[1, 1, dd],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let decoder_pos_embed = fixed_pos(p, "decoder_pos_embed", cfg.decoder_embed_dim, g);
        let decoder_blocks = (0..cfg.decoder_depth)
            .map(|i| {
                Block::new(
                    p / "decoder_blocks" / i,
                    dd,
                    cfg.decoder_num_heads as i64,
                    hidden(dd),
                    eps,
                    0.0,
                )
            })
            .collect::<Vec<_>>();
        let decoder_norm = layer_norm(p / "decoder_norm", dd, eps);
        let out = (cfg.patch_size * cfg.patch_size * cfg.in_chans) as i64;
        let decoder_pred = xavier_linear(p / "decoder_pred", dd, out);
        // Upstream re-initialises every Linear of the blocks with xavier-uniform as well.
        for b in blocks.iter().chain(decoder_blocks.iter()) {
            for l in [&b.attn.qkv, &b.attn.proj, &b.mlp.fc1, &b.mlp.fc2] {
                let (o, i) = (l.ws.size()[0], l.ws.size()[1]);
                let bound = (6.0 / (i + o) as f64).sqrt();
                tch::no_grad(|| {
                    let _ = l.ws.shallow_clone().uniform_(-bound, bound);
                });
            }
        }
        Self {
            cfg: cfg.clone(),
            patch_embed,
            cls_token,
            pos_embed,
            blocks,
            norm,
            decoder_embed,
            mask_token,
            decoder_pos_embed,
            decoder_blocks,
            decoder_norm,
            decoder_pred,
        }
    }

    /// Encodes the visible patches chosen by `noise` (`[n, L]`).
    pub fn forward_encoder(
        &self,
        imgs: &Tensor,
        noise: &Tensor,
        ratio: f64,
    ) -> (Tensor, Tensor, Tensor) {
        let l = self.pos_embed.size()[1] - 1;
        let xs = imgs.apply(&self.patch_embed) + self.pos_embed.narrow(1, 1, l);
        let (xs, mask, ids_restore) = random_masking(&xs, noise, ratio);
        let n = xs.size()[0];
        let cls = (&self.cls_token + self.pos_embed.narrow(1, 0, 1)).expand([n, -1, -1], false);
        let mut xs = Tensor::cat(&[cls, xs], 1);
        for b in &self.blocks {
            xs = b.forward_t(&xs, false);
        }
        (xs.apply(&self.norm), mask, ids_restore)
    }

    /// Decodes the encoded visible tokens into a prediction for every patch `[n, L, p·p·3]`.
    pub fn forward_decoder(&self, xs: &Tensor, ids_restore: &Tensor) -> Tensor {
        let xs = xs.apply(&self.decoder_embed);
        let (n, t, dd) = xs.size3().expect("[n, 1 + keep, dd]");
        let l = ids_restore.size()[1];
        let masks = self.mask_token.repeat([n, l + 1 - t, 1]);
        let rest = Tensor::cat(&[xs.narrow(1, 1, t - 1), masks], 1);
        let rest = rest.gather(1, &ids_restore.unsqueeze(-1).repeat([1, 1, dd]), false);
        let mut xs = Tensor::cat(&[xs.narrow(1, 0, 1), rest], 1) + &self.decoder_pos_embed;
        for b in &self.decoder_blocks {
            xs = b.forward_t(&xs, false);
        }
        let xs = xs.apply(&self.decoder_norm).apply(&self.decoder_pred);
        xs.narrow(1, 1, l)
    }

    /// Mean squared error over the masked patches.
    pub fn forward_loss(&self, imgs: &Tensor, pred: &Tensor, mask: &Tensor) -> Tensor {
        let mut target = patchify(imgs, self.cfg.patch_size as i64);
        if self.cfg.norm_pix_loss {
            target = norm_pix(&target);
        }
        let per_patch = (pred - target).square().mean_dim(-1, false, Kind::Float);
        (per_patch * mask).sum(Kind::Float) / mask.sum(Kind::Float)
    }

    /// A full pass with the given masking noise.
    pub fn forward_with_noise(&self, imgs: &Tensor, noise: &Tensor, ratio: f64) -> MaeOutput {
        let (latent, mask, ids_restore) = self.forward_encoder(imgs, noise, ratio);
        let pred = self.forward_decoder(&latent, &ids_restore);
        let loss = self.forward_loss(imgs, &pred, &mask);
        MaeOutput { loss, pred, mask }
    }

    /// A full pass with fresh uniform masking noise.
    pub fn forward(&self, imgs: &Tensor, ratio: f64) -> MaeOutput {
        let n = imgs.size()[0];
        let l = self.pos_embed.size()[1] - 1;
        let noise = Tensor::rand([n, l], (Kind::Float, imgs.device()));
        self.forward_with_noise(imgs, &noise, ratio)
    }
}

impl Module for MaskedAutoencoderViT {
    fn forward(&self, imgs: &Tensor) -> Tensor {
        MaskedAutoencoderViT::forward(self, imgs, 0.75).loss
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn masking_keeps_the_right_count_and_restores_order() {
        tch::manual_seed(0);
        let (n, l, d) = (3, 49, 8);
        let xs = Tensor::randn([n, l, d], (Kind::Float, tch::Device::Cpu));
        for ratio in [0.0, 0.5, 0.75, 0.9] {
            let noise = Tensor::rand([n, l], (Kind::Float, tch::Device::Cpu));
            let (kept, mask, ids_restore) = random_masking(&xs, &noise, ratio);
            let keep = (l as f64 * (1.0 - ratio)) as i64;
            assert_eq!(kept.size(), vec![n, keep, d]);
            // Each sample keeps exactly `keep` patches.
            let removed = mask.sum_dim_intlist(1, false, Kind::Float);
            for i in 0..n {
                assert_eq!(removed.double_value(&[i]), (l - keep) as f64);
            }
            // ids_restore inverts the shuffle.
            let ids_shuffle = noise.argsort(1, false);
            let back = ids_shuffle.gather(1, &ids_restore, false);
            let arange = Tensor::arange(l, (Kind::Int64, tch::Device::Cpu)).expand([n, l], false);
            assert!(back.equal(&arange));
            // The kept tokens are the ones of lowest noise, which the mask marks 0.
            let lowest = ids_shuffle.narrow(1, 0, keep);
            let m = mask.gather(1, &lowest, false);
            assert_eq!(m.sum(Kind::Float).double_value(&[]), 0.0);
        }
    }

    #[test]
    fn patchify_round_trips() {
        let imgs = Tensor::randn([2, 3, 32, 32], (Kind::Float, tch::Device::Cpu));
        let ps = patchify(&imgs, 8);
        assert_eq!(ps.size(), vec![2, 16, 192]);
        assert!(unpatchify(&ps, 8, 3).equal(&imgs));
        // Patch 1 is the second patch of the first row, pixel (0, 8) channels first in last dim.
        let v = ps.double_value(&[0, 1, 0]);
        assert_eq!(v, imgs.double_value(&[0, 0, 0, 8]));
        assert_eq!(
            ps.double_value(&[0, 1, 1]),
            imgs.double_value(&[0, 1, 0, 8])
        );
    }

    #[test]
    fn norm_pix_targets_have_zero_mean_unit_variance() {
        let t = Tensor::randn([2, 5, 48], (Kind::Float, tch::Device::Cpu)) * 3.0 + 1.0;
        let z = norm_pix(&t);
        let mean = z
            .mean_dim(-1, false, Kind::Float)
            .abs()
            .max()
            .double_value(&[]);
        let var = z.var_dim(-1, true, false);
        assert!(mean < 1e-5, "{mean}");
        assert!((var - 1.0).abs().max().double_value(&[]) < 1e-3);
    }

    #[test]
    fn sincos_has_upstream_layout() {
        let (d, g) = (8, 3);
        let e = sincos_2d(d, g);
        assert_eq!(e.len(), (g * g + 1) * d);
        assert!(e[..d].iter().all(|&v| v == 0.0), "class-token row is zero");
        // Position (row 1, col 2): first half encodes the column, second the row; omega_0 = 1.
        let row = &e[(1 + g + 2) * d..(2 + g + 2) * d];
        assert!((row[0] - 2f32.sin()).abs() < 1e-6);
        assert!((row[2] - 2f32.cos()).abs() < 1e-6);
        assert!((row[4] - 1f32.sin()).abs() < 1e-6);
        assert!((row[6] - 1f32.cos()).abs() < 1e-6);
    }
}
