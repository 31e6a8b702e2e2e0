//! The linear-probing model of upstream `main_linprobe.py`: a frozen encoder, a non-affine
//! BatchNorm and a linear classifier (`head.0`, `head.1`).

use crate::model::load::state_dict;
use crate::model::trunc_normal_;
use crate::model::vit::VisionTransformer;
use mae_models::checkpoint;
use mae_models::{DType, TensorData};
use tch::nn::{self, ModuleT};
use tch::Tensor;

/// Momentum of the BatchNorm running statistics (PyTorch's default).
const BN_MOMENTUM: f64 = 0.1;

/// A frozen encoder, a non-affine BatchNorm and a linear classifier.
#[derive(Debug)]
pub struct LinearProbe {
    pub encoder: VisionTransformer,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    pub head: nn::Linear,
}

impl LinearProbe {
    /// Builds the probe under `p` for `cfg` (its `num_classes` sizes the head); only the head's
    /// linear layer is trainable.
    pub fn new(p: &nn::Path, cfg: &mae_models::VitConfig) -> Self {
        let mut enc_cfg = cfg.clone();
        enc_cfg.num_classes = 0;
        let encoder = VisionTransformer::new(p, &enc_cfg, 0.0);
        let d = cfg.embed_dim as i64;
        let bn = p / "head" / "0";
        let running_mean = bn.zeros_no_train("running_mean", &[d]);
        let running_var = bn.ones_no_train("running_var", &[d]);
        let num_batches_tracked = bn.zeros_no_train("num_batches_tracked", &[]);
        let head = nn::linear(
            p / "head" / "1",
            d,
            cfg.num_classes as i64,
            Default::default(),
        );
        trunc_normal_(&head.ws, 0.01);
        if let Some(b) = &head.bs {
            let _ = tch::no_grad(|| b.shallow_clone().zero_());
        }
        Self {
            encoder,
            running_mean,
            running_var,
            num_batches_tracked,
            head,
        }
    }

    /// Freezes every variable of `vs` outside `head.1` (the encoder and the statistics).
    pub fn freeze_encoder(vs: &nn::VarStore) {
        for (name, t) in vs.variables() {
            if !name.starts_with("head.1.") {
                let _ = t.set_requires_grad(false);
            }
        }
    }
}

impl ModuleT for LinearProbe {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        // The encoder is frozen and has no dropout or drop path: no graph needed through it.
        let feats = tch::no_grad(|| self.encoder.forward_features(xs, false));
        let normed = Tensor::batch_norm(
            &feats,
            None::<&Tensor>,
            None::<&Tensor>,
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            BN_MOMENTUM,
            checkpoint::LINPROBE_BN_EPS,
            false,
        );
        if train {
            tch::no_grad(|| {
                let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1.0);
            });
        }
        normed.apply(&self.head)
    }
}

/// The state dict with upstream's int64 `num_batches_tracked`.
pub fn probe_state_dict(vs: &nn::VarStore) -> checkpoint::StateDict {
    let mut sd = state_dict(vs);
    if let Some(t) = sd.get_mut("head.0.num_batches_tracked") {
        let n = t.to_f64_vec().first().copied().unwrap_or(0.0) as i64;
        if let Some(i) = TensorData::new(DType::I64, vec![], n.to_le_bytes().to_vec()) {
            *t = i;
        }
    }
    sd
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::model::load::load_into;
    use mae_models::VitConfig;
    use mae_models::{ModelConfig, Overrides};

    fn tiny() -> VitConfig {
        let ModelConfig::Vit(mut c) = ModelConfig::preset("vit_tiny_patch4_28")
            .unwrap()
            .with_overrides(&Overrides {
                depth: Some(1),
                num_classes: Some(3),
                ..Default::default()
            })
            .unwrap()
        else {
            panic!("a vit preset")
        };
        c.global_pool = false;
        c
    }

    #[test]
    fn only_the_linear_head_trains_and_statistics_move_in_train_mode() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let model = LinearProbe::new(&vs.root(), &tiny());
        LinearProbe::freeze_encoder(&vs);
        let xs = Tensor::randn([4, 3, 28, 28], (tch::Kind::Float, tch::Device::Cpu));
        let enc_before = vs.variables()["blocks.0.attn.qkv.weight"].copy();
        let mean_before = model.running_mean.copy();
        let loss = model.forward_t(&xs, true).square().mean(None);
        loss.backward();
        let mut grads: Vec<String> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.grad().defined())
            .map(|(k, _)| k)
            .collect();
        grads.sort();
        assert_eq!(
            grads,
            vec!["head.1.bias".to_string(), "head.1.weight".to_string()]
        );
        assert!(!model.running_mean.allclose(&mean_before, 0.0, 0.0, false));
        assert_eq!(model.num_batches_tracked.double_value(&[]), 1.0);
        assert!(vs.variables()["blocks.0.attn.qkv.weight"].equal(&enc_before));
        // Evaluation mode uses the running statistics and leaves them alone.
        let m = model.running_mean.copy();
        let _ = model.forward_t(&xs, false);
        assert!(model.running_mean.equal(&m));
    }

    #[test]
    fn folded_checkpoint_head_gives_the_probe_outputs() {
        tch::manual_seed(1);
        let cfg = tiny();
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let model = LinearProbe::new(&vs.root(), &cfg);
        LinearProbe::freeze_encoder(&vs);
        // Move the statistics away from 0 / 1 with a few training batches.
        for _ in 0..3 {
            let xs = Tensor::randn([8, 3, 28, 28], (tch::Kind::Float, tch::Device::Cpu)) * 2.0;
            let _ = model.forward_t(&xs, true);
        }
        let xs = Tensor::randn([5, 3, 28, 28], (tch::Kind::Float, tch::Device::Cpu));
        let want = model.forward_t(&xs, false);
        let mut sd = probe_state_dict(&vs);
        assert_eq!(sd["head.0.num_batches_tracked"].dtype, DType::I64);
        assert!(checkpoint::fold_bn_head(&mut sd, checkpoint::LINPROBE_BN_EPS).unwrap());
        let vs2 = nn::VarStore::new(tch::Device::Cpu);
        let vit = VisionTransformer::new(&vs2.root(), &cfg, 0.0);
        let report = load_into(&vs2, &sd);
        assert!(report.is_exact(), "{report}");
        let got = tch::no_grad(|| vit.forward_t(&xs, false));
        let diff = (&got - &want).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "folded head differs by {diff}");
    }
}
