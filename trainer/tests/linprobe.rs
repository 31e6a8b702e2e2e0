//! Linear probing against upstream: the same frozen encoder, BatchNorm head and three LARS
//! steps as `main_linprobe.py` + `util/lars.py` (the committed generator) give the same head,
//! running statistics and evaluation logits; the checkpoint folds into a plain classifier.
#![allow(clippy::unwrap_used)]

mod common;

use common::assert_close;
use mae_models::checkpoint::{self, StateDict};
use mae_models::VitConfig;
use mae_trainer::model::load::{load_into, to_tensor};
use mae_trainer::model::probe::LinearProbe;
use mae_trainer::model::vit::VisionTransformer;
use mae_trainer::optim::{Lars, Optimizer};
use tch::nn::{self, ModuleT};
use tch::Kind;

/// Largest absolute difference allowed after three steps, and for the logits.
const TOL: f64 = 1e-5;

fn tiny() -> VitConfig {
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
        global_pool: false,
        layer_norm_eps: 1e-6,
    }
}

#[test]
fn three_lars_steps_match_upstream_linear_probing() {
    let dir = common::tmp_dir("linprobe-parity");
    common::generate("gen_linprobe_reference.py", &dir, &[]);
    let load = |n: &str| -> StateDict { checkpoint::load(&dir.join(n)).unwrap().tensors };

    let vs = nn::VarStore::new(tch::Device::Cpu);
    let model = LinearProbe::new(&vs.root(), &tiny());
    let report = load_into(&vs, &load("lp_before.pth"));
    assert!(report.is_exact(), "{report}");
    LinearProbe::freeze_encoder(&vs);
    let head: Vec<(String, tch::Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(k, _)| k.starts_with("head.1."))
        .collect();
    let io = load("lp_io.pth");
    let mut opt = Lars::new(head, io["wd"].to_f64_vec()[0]);
    let lr = io["lr"].to_f64_vec()[0];
    let (xs, ys) = (to_tensor(&io["x"]), to_tensor(&io["y"]));
    for i in 0..3 {
        opt.zero_grad();
        let logits = model.forward_t(&xs.get(i), true);
        logits.cross_entropy_for_logits(&ys.get(i)).backward();
        opt.step(lr);
    }
    let after = load("lp_after.pth");
    let vars = vs.variables();
    for (name, t) in &after {
        assert_close(
            &vars[name].to_kind(Kind::Float),
            &to_tensor(t).to_kind(Kind::Float),
            TOL,
            name,
        );
    }
    let before = load("lp_before.pth");
    let moved = (to_tensor(&before["head.1.weight"]) - vars["head.1.weight"].shallow_clone())
        .abs()
        .max()
        .double_value(&[]);
    assert!(moved > 1e-4, "the head barely moved: {moved}");
    let enc = (to_tensor(&before["blocks.0.mlp.fc1.weight"])
        - vars["blocks.0.mlp.fc1.weight"].shallow_clone())
    .abs()
    .max()
    .double_value(&[]);
    assert_eq!(enc, 0.0, "the encoder is frozen");

    // Evaluation mode, then the same logits from the folded plain classifier.
    let ev = load("lp_eval.pth");
    let xe = to_tensor(&ev["x"]);
    let ours = tch::no_grad(|| model.forward_t(&xe, false));
    assert_close(&ours, &to_tensor(&ev["logits"]), 1e-4, "probe logits");
    let mut sd = after.clone();
    assert!(checkpoint::fold_bn_head(&mut sd, checkpoint::LINPROBE_BN_EPS).unwrap());
    let vs2 = nn::VarStore::new(tch::Device::Cpu);
    let vit = VisionTransformer::new(&vs2.root(), &tiny(), 0.0);
    assert!(load_into(&vs2, &sd).is_exact());
    let folded = tch::no_grad(|| vit.forward_t(&xe, false));
    assert_close(&folded, &to_tensor(&ev["logits"]), 1e-4, "folded logits");
}
