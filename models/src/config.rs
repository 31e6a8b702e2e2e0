//! Vision Transformer and Masked Autoencoder architecture configs, with the upstream presets.
//!
//! ViT: Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words" (arXiv:2010.11929).
//! MAE: He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners" (arXiv:2111.06377).
//! Field names follow facebookresearch/mae (`models_vit.py`, `models_mae.py`), which are timm's.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A ViT classifier (or feature extractor when `num_classes == 0`), as `models_vit.VisionTransformer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    pub img_size: usize,
    pub patch_size: usize,
    pub in_chans: usize,
    /// Output classes; 0 means no head (the pooled embedding is the output).
    pub num_classes: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    pub qkv_bias: bool,
    /// Mean-pool the patch tokens through `fc_norm` (upstream default for fine-tuning);
    /// otherwise classify the class token after `norm`.
    pub global_pool: bool,
    pub layer_norm_eps: f64,
}

/// A Masked Autoencoder: a ViT encoder plus the lightweight decoder, as `models_mae.MaskedAutoencoderViT`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaeConfig {
    pub img_size: usize,
    pub patch_size: usize,
    pub in_chans: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub decoder_embed_dim: usize,
    pub decoder_depth: usize,
    pub decoder_num_heads: usize,
    pub mlp_ratio: f64,
    pub norm_pix_loss: bool,
    pub layer_norm_eps: f64,
}

/// Either architecture, as stored in checkpoint metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ModelConfig {
    Vit(VitConfig),
    Mae(MaeConfig),
}

/// Width, depth and heads of one encoder size.
#[derive(Debug, Clone, Copy)]
struct Size {
    name: &'static str,
    embed_dim: usize,
    depth: usize,
    num_heads: usize,
    /// Decoder (width, depth, heads) of the MAE variant.
    decoder: (usize, usize, usize),
}

const SIZES: [Size; 5] = [
    Size {
        name: "tiny",
        embed_dim: 192,
        depth: 12,
        num_heads: 3,
        decoder: (128, 2, 4),
    },
    Size {
        name: "small",
        embed_dim: 384,
        depth: 12,
        num_heads: 6,
        decoder: (256, 4, 8),
    },
    Size {
        name: "base",
        embed_dim: 768,
        depth: 12,
        num_heads: 12,
        decoder: (512, 8, 16),
    },
    Size {
        name: "large",
        embed_dim: 1024,
        depth: 24,
        num_heads: 16,
        decoder: (512, 8, 16),
    },
    Size {
        name: "huge",
        embed_dim: 1280,
        depth: 32,
        num_heads: 16,
        decoder: (512, 8, 16),
    },
];

/// (size, patch, image) of every preset; the name is `vit_{size}_patch{patch}` with a `_{image}`
/// suffix for the small-image variants, and `mae_` in front for the MAE form. Every size has
/// both upstream patch sizes at 224 (14, as the seed's `vit_base_patch14`, and 16).
const PRESETS: [(&str, usize, usize); 16] = [
    ("tiny", 16, 224),
    ("small", 16, 224),
    ("base", 16, 224),
    ("large", 16, 224),
    ("huge", 16, 224),
    ("tiny", 14, 224),
    ("small", 14, 224),
    ("base", 14, 224),
    ("large", 14, 224),
    ("huge", 14, 224),
    ("tiny", 4, 28),
    ("small", 4, 28),
    ("base", 4, 28),
    ("tiny", 8, 64),
    ("small", 8, 64),
    ("base", 8, 64),
];

fn preset_name(size: &str, patch: usize, img: usize) -> String {
    if img == 224 {
        format!("vit_{size}_patch{patch}")
    } else {
        format!("vit_{size}_patch{patch}_{img}")
    }
}

/// Names of every ViT preset (`vit_base_patch16`, `vit_tiny_patch4_28`, ...).
pub fn vit_presets() -> Vec<String> {
    PRESETS
        .iter()
        .map(|&(s, p, i)| preset_name(s, p, i))
        .collect()
}

/// Names of every MAE preset (`mae_vit_base_patch16`, ...).
pub fn mae_presets() -> Vec<String> {
    vit_presets()
        .into_iter()
        .map(|n| format!("mae_{n}"))
        .collect()
}

fn find_preset(name: &str) -> Option<(Size, usize, usize)> {
    PRESETS.iter().find_map(|&(s, p, i)| {
        (preset_name(s, p, i) == name).then(|| {
            let size = SIZES.iter().find(|z| z.name == s).copied();
            size.map(|z| (z, p, i))
        })?
    })
}

fn unknown(name: &str) -> Error {
    let mut known = vit_presets();
    known.extend(mae_presets());
    Error::UnknownModel {
        name: name.to_string(),
        known: known.join(", "),
    }
}

impl VitConfig {
    /// A preset by its upstream name, with 1000 classes and the global-pool head.
    pub fn preset(name: &str) -> Result<Self> {
        let (z, patch_size, img_size) = find_preset(name).ok_or_else(|| unknown(name))?;
        Ok(Self {
            img_size,
            patch_size,
            in_chans: 3,
            num_classes: 1000,
            embed_dim: z.embed_dim,
            depth: z.depth,
            num_heads: z.num_heads,
            mlp_ratio: 4.0,
            qkv_bias: true,
            global_pool: true,
            layer_norm_eps: 1e-6,
        })
    }

    pub fn vit_base_patch16() -> Self {
        Self::preset("vit_base_patch16").expect("built-in preset")
    }

    pub fn vit_large_patch16() -> Self {
        Self::preset("vit_large_patch16").expect("built-in preset")
    }

    pub fn vit_huge_patch14() -> Self {
        Self::preset("vit_huge_patch14").expect("built-in preset")
    }

    /// Tokens per image: the patch grid plus the class token.
    pub fn num_tokens(&self) -> usize {
        self.num_patches() + 1
    }

    /// Patches per image.
    pub fn num_patches(&self) -> usize {
        let g = self.img_size / self.patch_size;
        g * g
    }

    /// Hidden width of each MLP, `int(embed_dim * mlp_ratio)` as upstream.
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// Rejects inconsistent combinations, naming the values.
    pub fn validate(&self) -> Result<()> {
        check_encoder(
            self.img_size,
            self.patch_size,
            self.in_chans,
            self.embed_dim,
            self.depth,
            self.num_heads,
        )?;
        check_common(self.mlp_ratio, self.layer_norm_eps)
    }

    /// The parameter names and shapes this config implies, in upstream order.
    pub fn parameters(&self) -> Vec<ParamSpec> {
        let d = self.embed_dim;
        let mut ps = encoder_params(self.patch_size, self.in_chans, d, self.num_tokens());
        for i in 0..self.depth {
            ps.extend(block_params(
                &format!("blocks.{i}"),
                d,
                self.mlp_hidden(),
                self.qkv_bias,
            ));
        }
        let norm = if self.global_pool { "fc_norm" } else { "norm" };
        ps.extend(norm_params(norm, d));
        if self.num_classes > 0 {
            ps.push(ParamSpec::new("head.weight", [self.num_classes, d]));
            ps.push(ParamSpec::new("head.bias", [self.num_classes]));
        }
        ps
    }
}

impl MaeConfig {
    /// A preset by its upstream name (`mae_vit_base_patch16`, ...).
    pub fn preset(name: &str) -> Result<Self> {
        let vit_name = name.strip_prefix("mae_").ok_or_else(|| unknown(name))?;
        let (z, patch_size, img_size) = find_preset(vit_name).ok_or_else(|| unknown(name))?;
        let (decoder_embed_dim, decoder_depth, decoder_num_heads) = z.decoder;
        Ok(Self {
            img_size,
            patch_size,
            in_chans: 3,
            embed_dim: z.embed_dim,
            depth: z.depth,
            num_heads: z.num_heads,
            decoder_embed_dim,
            decoder_depth,
            decoder_num_heads,
            mlp_ratio: 4.0,
            norm_pix_loss: false,
            layer_norm_eps: 1e-6,
        })
    }

    pub fn mae_vit_base_patch16() -> Self {
        Self::preset("mae_vit_base_patch16").expect("built-in preset")
    }

    pub fn mae_vit_large_patch16() -> Self {
        Self::preset("mae_vit_large_patch16").expect("built-in preset")
    }

    pub fn mae_vit_huge_patch14() -> Self {
        Self::preset("mae_vit_huge_patch14").expect("built-in preset")
    }

    /// Patches per image.
    pub fn num_patches(&self) -> usize {
        let g = self.img_size / self.patch_size;
        g * g
    }

    /// The classifier that fine-tunes this encoder (`mae_vit_base_patch16` → `vit_base_patch16`).
    pub fn encoder(&self, num_classes: usize, global_pool: bool) -> VitConfig {
        VitConfig {
            img_size: self.img_size,
            patch_size: self.patch_size,
            in_chans: self.in_chans,
            num_classes,
            embed_dim: self.embed_dim,
            depth: self.depth,
            num_heads: self.num_heads,
            mlp_ratio: self.mlp_ratio,
            qkv_bias: true,
            global_pool,
            layer_norm_eps: self.layer_norm_eps,
        }
    }

    /// Rejects inconsistent combinations, naming the values.
    pub fn validate(&self) -> Result<()> {
        check_encoder(
            self.img_size,
            self.patch_size,
            self.in_chans,
            self.embed_dim,
            self.depth,
            self.num_heads,
        )?;
        check_heads(
            "decoder_embed_dim",
            self.decoder_embed_dim,
            "decoder_num_heads",
            self.decoder_num_heads,
        )?;
        if self.decoder_depth == 0 {
            return Err(Error::Config("decoder_depth must be at least 1".into()));
        }
        check_common(self.mlp_ratio, self.layer_norm_eps)
    }

    /// The parameter names and shapes this config implies, in upstream order.
    pub fn parameters(&self) -> Vec<ParamSpec> {
        let (d, dd) = (self.embed_dim, self.decoder_embed_dim);
        let hidden = |w: usize| (w as f64 * self.mlp_ratio) as usize;
        let tokens = self.num_patches() + 1;
        let mut ps = encoder_params(self.patch_size, self.in_chans, d, tokens);
        for i in 0..self.depth {
            ps.extend(block_params(&format!("blocks.{i}"), d, hidden(d), true));
        }
        ps.extend(norm_params("norm", d));
        ps.push(ParamSpec::new("mask_token", [1, 1, dd]));
        ps.push(ParamSpec::new("decoder_pos_embed", [1, tokens, dd]));
        ps.push(ParamSpec::new("decoder_embed.weight", [dd, d]));
        ps.push(ParamSpec::new("decoder_embed.bias", [dd]));
        for i in 0..self.decoder_depth {
            ps.extend(block_params(
                &format!("decoder_blocks.{i}"),
                dd,
                hidden(dd),
                true,
            ));
        }
        ps.extend(norm_params("decoder_norm", dd));
        let out = self.patch_size * self.patch_size * self.in_chans;
        ps.push(ParamSpec::new("decoder_pred.weight", [out, dd]));
        ps.push(ParamSpec::new("decoder_pred.bias", [out]));
        ps
    }
}

impl ModelConfig {
    /// A preset of either kind by name: `mae_…` names are MAE models, the rest classifiers.
    pub fn preset(name: &str) -> Result<Self> {
        if name.starts_with("mae_") {
            MaeConfig::preset(name).map(ModelConfig::Mae)
        } else {
            VitConfig::preset(name).map(ModelConfig::Vit)
        }
    }

    /// Applies user overrides, then validates the result.
    pub fn with_overrides(mut self, o: &Overrides) -> Result<Self> {
        match &mut self {
            ModelConfig::Vit(c) => {
                set(&mut c.img_size, o.img_size);
                set(&mut c.patch_size, o.patch_size);
                set(&mut c.num_classes, o.num_classes);
                set(&mut c.depth, o.depth);
            }
            ModelConfig::Mae(c) => {
                set(&mut c.img_size, o.img_size);
                set(&mut c.patch_size, o.patch_size);
                set(&mut c.depth, o.depth);
                if o.num_classes.is_some() {
                    return Err(Error::Config(
                        "an MAE pretraining model has no classes; --num-classes applies to vit_* models"
                            .into(),
                    ));
                }
            }
        }
        self.validate()?;
        Ok(self)
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            ModelConfig::Vit(c) => c.validate(),
            ModelConfig::Mae(c) => c.validate(),
        }
    }

    pub fn parameters(&self) -> Vec<ParamSpec> {
        match self {
            ModelConfig::Vit(c) => c.parameters(),
            ModelConfig::Mae(c) => c.parameters(),
        }
    }

    pub fn img_size(&self) -> usize {
        match self {
            ModelConfig::Vit(c) => c.img_size,
            ModelConfig::Mae(c) => c.img_size,
        }
    }
}

/// User overrides of a preset (command-line flags).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub img_size: Option<usize>,
    pub patch_size: Option<usize>,
    pub num_classes: Option<usize>,
    pub depth: Option<usize>,
}

fn set(field: &mut usize, value: Option<usize>) {
    if let Some(v) = value {
        *field = v;
    }
}

/// One named parameter and its shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ParamSpec {
    pub fn new<const N: usize>(name: impl Into<String>, shape: [usize; N]) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Total number of elements over a parameter table.
pub fn count_params(ps: &[ParamSpec]) -> usize {
    ps.iter().map(ParamSpec::numel).sum()
}

fn encoder_params(patch: usize, in_chans: usize, d: usize, tokens: usize) -> Vec<ParamSpec> {
    vec![
        ParamSpec::new("cls_token", [1, 1, d]),
        ParamSpec::new("pos_embed", [1, tokens, d]),
        ParamSpec::new("patch_embed.proj.weight", [d, in_chans, patch, patch]),
        ParamSpec::new("patch_embed.proj.bias", [d]),
    ]
}

fn norm_params(prefix: &str, d: usize) -> [ParamSpec; 2] {
    [
        ParamSpec::new(format!("{prefix}.weight"), [d]),
        ParamSpec::new(format!("{prefix}.bias"), [d]),
    ]
}

fn block_params(prefix: &str, d: usize, hidden: usize, qkv_bias: bool) -> Vec<ParamSpec> {
    let mut ps = norm_params(&format!("{prefix}.norm1"), d).to_vec();
    ps.push(ParamSpec::new(
        format!("{prefix}.attn.qkv.weight"),
        [3 * d, d],
    ));
    if qkv_bias {
        ps.push(ParamSpec::new(format!("{prefix}.attn.qkv.bias"), [3 * d]));
    }
    ps.push(ParamSpec::new(format!("{prefix}.attn.proj.weight"), [d, d]));
    ps.push(ParamSpec::new(format!("{prefix}.attn.proj.bias"), [d]));
    ps.extend(norm_params(&format!("{prefix}.norm2"), d));
    ps.push(ParamSpec::new(
        format!("{prefix}.mlp.fc1.weight"),
        [hidden, d],
    ));
    ps.push(ParamSpec::new(format!("{prefix}.mlp.fc1.bias"), [hidden]));
    ps.push(ParamSpec::new(
        format!("{prefix}.mlp.fc2.weight"),
        [d, hidden],
    ));
    ps.push(ParamSpec::new(format!("{prefix}.mlp.fc2.bias"), [d]));
    ps
}

fn check_heads(dim_name: &str, dim: usize, heads_name: &str, heads: usize) -> Result<()> {
    if dim == 0 || heads == 0 || !dim.is_multiple_of(heads) {
        return Err(Error::Config(format!(
            "{heads_name} {heads} does not divide {dim_name} {dim}"
        )));
    }
    Ok(())
}

fn check_encoder(
    img: usize,
    patch: usize,
    in_chans: usize,
    d: usize,
    depth: usize,
    heads: usize,
) -> Result<()> {
    if patch == 0 || img == 0 || !img.is_multiple_of(patch) {
        return Err(Error::Config(format!(
            "image {img}×{img} is not a multiple of patch {patch}"
        )));
    }
    if in_chans == 0 {
        return Err(Error::Config("in_chans must be at least 1".into()));
    }
    if depth == 0 {
        return Err(Error::Config("depth must be at least 1".into()));
    }
    check_heads("embed_dim", d, "num_heads", heads)
}

fn check_common(mlp_ratio: f64, eps: f64) -> Result<()> {
    if !(mlp_ratio.is_finite() && mlp_ratio > 0.0) {
        return Err(Error::Config(format!(
            "mlp_ratio {mlp_ratio} must be positive"
        )));
    }
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::Config(format!(
            "layer_norm_eps {eps} must be positive"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn vit_base_has_upstream_parameter_count() {
        // timm's vit_base_patch16_224 has 86,567,656 parameters with a 1000-class head.
        let cfg = VitConfig::vit_base_patch16();
        assert_eq!(count_params(&cfg.parameters()), 86_567_656);
        let cfg = VitConfig::vit_large_patch16();
        assert_eq!(count_params(&cfg.parameters()), 304_326_632);
        let cfg = VitConfig::vit_huge_patch14();
        assert_eq!(count_params(&cfg.parameters()), 632_045_800);
    }

    #[test]
    fn mae_base_has_upstream_parameter_count() {
        // models_mae.mae_vit_base_patch16_dec512d8b: 111,907,840 entries in its state dict
        // (pos_embed and decoder_pos_embed included, as they are stored there).
        let cfg = MaeConfig::mae_vit_base_patch16();
        assert_eq!(cfg.decoder_embed_dim, 512);
        assert_eq!(cfg.decoder_depth, 8);
        assert_eq!(cfg.decoder_num_heads, 16);
        assert_eq!(count_params(&cfg.parameters()), 111_907_840);
    }

    #[test]
    fn names_follow_upstream() {
        let names: Vec<_> = VitConfig::vit_base_patch16()
            .parameters()
            .into_iter()
            .map(|p| p.name)
            .collect();
        for n in [
            "cls_token",
            "pos_embed",
            "patch_embed.proj.weight",
            "blocks.11.attn.qkv.bias",
            "blocks.0.mlp.fc2.weight",
            "fc_norm.weight",
            "head.bias",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing");
        }
        assert!(!names.iter().any(|x| x == "norm.weight"));
        let mut cls = VitConfig::vit_base_patch16();
        cls.global_pool = false;
        assert!(cls.parameters().iter().any(|p| p.name == "norm.weight"));
    }

    #[test]
    fn every_preset_is_valid_and_small_images_fit() {
        for n in vit_presets().iter().chain(mae_presets().iter()) {
            let cfg = ModelConfig::preset(n).unwrap();
            cfg.validate().unwrap();
        }
        assert_eq!(
            VitConfig::preset("vit_tiny_patch4_28")
                .unwrap()
                .num_patches(),
            49
        );
        assert_eq!(
            VitConfig::preset("vit_small_patch8_64")
                .unwrap()
                .num_patches(),
            64
        );
    }

    #[test]
    fn every_size_to_base_has_a_64_pixel_preset_and_its_mae_form() {
        for size in ["tiny", "small", "base"] {
            let vit = VitConfig::preset(&format!("vit_{size}_patch8_64")).unwrap();
            let mae = MaeConfig::preset(&format!("mae_vit_{size}_patch8_64")).unwrap();
            assert_eq!((vit.img_size, vit.patch_size), (64, 8), "{size}");
            assert_eq!((mae.img_size, mae.patch_size), (64, 8), "{size}");
            assert_eq!(mae.encoder(2, true).embed_dim, vit.embed_dim, "{size}");
        }
    }

    #[test]
    fn rejects_bad_combinations_naming_values() {
        let err = ModelConfig::preset("vit_base_patch16")
            .unwrap()
            .with_overrides(&Overrides {
                img_size: Some(30),
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("30×30") && err.contains("patch 16"), "{err}");
        let mut c = VitConfig::vit_base_patch16();
        c.num_heads = 7;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("num_heads 7") && err.contains("embed_dim 768"),
            "{err}"
        );
        let err = ModelConfig::preset("vit_gigantic").unwrap_err().to_string();
        assert!(
            err.contains("vit_gigantic") && err.contains("vit_base_patch16"),
            "{err}"
        );
    }

    #[test]
    fn overrides_change_shapes() {
        let o = Overrides {
            img_size: Some(448),
            num_classes: Some(2),
            ..Default::default()
        };
        let cfg = ModelConfig::preset("vit_base_patch16")
            .unwrap()
            .with_overrides(&o)
            .unwrap();
        let ps = cfg.parameters();
        let pos = ps.iter().find(|p| p.name == "pos_embed").unwrap();
        assert_eq!(pos.shape, vec![1, 28 * 28 + 1, 768]);
        let head = ps.iter().find(|p| p.name == "head.weight").unwrap();
        assert_eq!(head.shape, vec![2, 768]);
    }

    #[test]
    fn config_round_trips_through_json() {
        let cfg = ModelConfig::Mae(MaeConfig::mae_vit_large_patch16());
        let s = serde_json::to_string(&cfg).unwrap();
        assert!(s.contains("\"type\":\"mae\""));
        assert_eq!(serde_json::from_str::<ModelConfig>(&s).unwrap(), cfg);
    }
}
