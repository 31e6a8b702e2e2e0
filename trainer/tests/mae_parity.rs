//! Parity of MAE pretraining with a PyTorch reference of the upstream model (timm blocks):
//! the same weights and masking noise give the same loss and predictions, and one AdamW step
//! (betas 0.9/0.95, no weight decay on 1-D tensors) changes the weights in the same way.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::assert_close;
use mae_models::checkpoint::{self, StateDict};
use mae_models::MaeConfig;
use mae_trainer::model::load::{interpolate_pos_embed, load_into, to_tensor};
use mae_trainer::model::mae::{sincos_2d, MaskedAutoencoderViT};
use mae_trainer::optim::{param_groups, AdamW};
use tch::{nn, Tensor};

/// Largest absolute difference allowed in fp32 between our outputs or weights and PyTorch's.
const TOL: f64 = 1e-5;

fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = common::tmp_dir("trainer-mae-parity");
        common::generate("gen_mae_reference.py", &out, &[]);
        out
    })
}

fn load(name: &str) -> StateDict {
    checkpoint::load(&fixtures().join(name)).unwrap().tensors
}

fn tiny(norm_pix_loss: bool) -> MaeConfig {
    MaeConfig {
        img_size: 16,
        patch_size: 4,
        in_chans: 3,
        embed_dim: 32,
        depth: 2,
        num_heads: 4,
        decoder_embed_dim: 16,
        decoder_depth: 1,
        decoder_num_heads: 2,
        mlp_ratio: 4.0,
        norm_pix_loss,
        layer_norm_eps: 1e-6,
    }
}

fn check(tag: &str, norm_pix: bool) {
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let model = MaskedAutoencoderViT::new(&vs.root(), &tiny(norm_pix));
    let report = load_into(&vs, &load(&format!("mae_{tag}.pth")));
    assert!(report.is_exact(), "{report}");
    let io = load(&format!("mae_{tag}_io.pth"));
    let out = model.forward_with_noise(&to_tensor(&io["imgs"]), &to_tensor(&io["noise"]), 0.75);
    assert_close(&out.mask, &to_tensor(&io["mask"]), 0.0, "mask");
    assert_close(&out.pred, &to_tensor(&io["pred"]), TOL, "pred");
    assert_close(&out.loss.reshape([1]), &to_tensor(&io["loss"]), TOL, "loss");

    let mut names: Vec<(String, usize)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(k, t)| (k, t.dim()))
        .collect();
    names.sort();
    assert!(
        !names.iter().any(|(n, _)| n.contains("pos_embed")),
        "position embeddings are fixed"
    );
    let groups = param_groups(&names, 2, 0.05, 1.0, &[]);
    let mut opt = AdamW::new(&vs, &groups, (0.9, 0.95));
    opt.zero_grad();
    out.loss.backward();
    opt.step(1e-2);
    let vars = vs.variables();
    for (name, t) in &load(&format!("mae_{tag}_after.pth")) {
        assert_close(&vars[name], &to_tensor(t), TOL, name);
    }
}

#[test]
fn pixel_loss_matches_pytorch() {
    check("pix", false);
}

#[test]
fn normalised_pixel_loss_matches_pytorch() {
    check("norm", true);
}

#[test]
fn sincos_embedding_matches_numpy() {
    let ours = Tensor::from_slice(&sincos_2d(16, 4)).reshape([17, 16]);
    assert_close(
        &ours,
        &to_tensor(&load("sincos.pth")["d16_g4"]),
        1e-6,
        "sincos",
    );
}

#[test]
fn pos_embed_interpolation_matches_upstream() {
    let io = load("pos_interp.pth");
    let pos = to_tensor(&io["pos"]);
    for g in [7, 20] {
        let ours = interpolate_pos_embed(&pos, g);
        assert_close(
            &ours,
            &to_tensor(&io[&format!("to{g}")]),
            1e-5,
            &format!("to {g}x{g}"),
        );
    }
}
