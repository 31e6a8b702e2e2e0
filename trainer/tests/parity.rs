//! Parity with PyTorch: the same weights give the same logits as timm's VisionTransformer
//! (both heads), one AdamW step with layer decay changes the weights as torch.optim.AdamW
//! does, and the layer-decay groups of ViT-B are upstream's.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::assert_close;
use mae_models::checkpoint::{self, StateDict};
use mae_models::VitConfig;
use mae_trainer::model::load::{load_into, to_tensor};
use mae_trainer::model::vit::VisionTransformer;
use mae_trainer::optim::{param_groups, AdamW};
use tch::nn::{self, ModuleT};
use tch::Kind;

/// Largest absolute difference allowed between our fp32 logits and PyTorch's.
const LOGITS_TOL: f64 = 1e-4;
/// Largest absolute difference allowed between weights after one optimizer step.
const STEP_TOL: f64 = 1e-5;

fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = common::tmp_dir("trainer-parity");
        common::generate("gen_reference.py", &out, &[]);
        out
    })
}

fn load(name: &str) -> StateDict {
    checkpoint::load(&fixtures().join(name)).unwrap().tensors
}

fn tiny(global_pool: bool) -> VitConfig {
    VitConfig {
        img_size: 16,
        patch_size: 4,
        in_chans: 3,
        num_classes: 3,
        embed_dim: 32,
        depth: 2,
        num_heads: 4,
        mlp_ratio: 4.0,
        qkv_bias: true,
        global_pool,
        layer_norm_eps: 1e-6,
    }
}

fn logits_match(tag: &str, global_pool: bool) {
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let model = VisionTransformer::new(&vs.root(), &tiny(global_pool), 0.0);
    let report = load_into(&vs, &load(&format!("vit_{tag}.pth")));
    assert!(report.is_exact(), "{report}");
    let io = load(&format!("vit_{tag}_io.pth"));
    let ys = tch::no_grad(|| model.forward_t(&to_tensor(&io["x"]), false));
    assert_close(&ys, &to_tensor(&io["logits"]), LOGITS_TOL, tag);
}

#[test]
fn global_pool_logits_match_timm() {
    logits_match("gap", true);
}

#[test]
fn class_token_logits_match_timm() {
    logits_match("cls", false);
}

#[test]
fn one_adamw_step_with_layer_decay_matches_pytorch() {
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let model = VisionTransformer::new(&vs.root(), &tiny(true), 0.0);
    assert!(load_into(&vs, &load("step_before.pth")).is_exact());
    let mut names: Vec<(String, usize)> = vs
        .variables()
        .into_iter()
        .map(|(k, t)| (k, t.dim()))
        .collect();
    names.sort();
    let groups = param_groups(&names, 2, 0.05, 0.75, &["cls_token", "pos_embed"]);
    let mut opt = AdamW::new(&vs, &groups, (0.9, 0.999));
    let io = load("step_io.pth");
    let lr = io["lr"].to_f64_vec()[0];
    let logits = model.forward_t(&to_tensor(&io["x"]), true);
    let loss = logits.cross_entropy_for_logits(&to_tensor(&io["y"]));
    opt.zero_grad();
    loss.backward();
    opt.step(lr);
    let after = load("step_after.pth");
    let vars = vs.variables();
    for (name, t) in &after {
        let ours = vars[name].to_kind(Kind::Float);
        assert_close(&ours, &to_tensor(t), STEP_TOL, name);
    }
    // The step moved the weights: this is not comparing a model with itself.
    let before = load("step_before.pth");
    let moved = (to_tensor(&before["head.weight"]) - vars["head.weight"].shallow_clone())
        .abs()
        .max()
        .double_value(&[]);
    assert!(moved > 1e-4, "head barely moved: {moved}");
}

#[test]
fn vit_base_layer_decay_groups_match_upstream() {
    let text = std::fs::read_to_string(fixtures().join("groups_vit_base.json")).unwrap();
    let upstream: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cfg = VitConfig::vit_base_patch16();
    let names: Vec<(String, usize)> = cfg
        .parameters()
        .into_iter()
        .map(|p| (p.name, p.shape.len()))
        .collect();
    let ours = param_groups(&names, cfg.depth, 0.05, 0.65, &["cls_token", "pos_embed"]);
    let upstream = upstream.as_object().unwrap();
    assert_eq!(ours.len(), upstream.len(), "number of groups");
    for g in &ours {
        let u = &upstream[&g.name];
        let scale = u["lr_scale"].as_f64().unwrap();
        assert!(
            (g.lr_scale - scale).abs() < 1e-12,
            "{}: scale {} vs {scale}",
            g.name,
            g.lr_scale
        );
        assert_eq!(
            g.weight_decay,
            u["weight_decay"].as_f64().unwrap(),
            "{}",
            g.name
        );
        let mut theirs: Vec<String> = serde_json::from_value(u["params"].clone()).unwrap();
        let mut mine = g.params.clone();
        theirs.sort();
        mine.sort();
        assert_eq!(mine, theirs, "{}", g.name);
    }
}
