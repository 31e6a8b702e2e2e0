//! AdamW with parameter groups, the per-step learning-rate schedule and layer-wise lr decay,
//! as facebookresearch/mae (`util/lr_sched.py`, `util/lr_decay.py`) and PyTorch's AdamW.
//!
//! The optimizer is ours rather than libtorch's so that its state can be saved beside a
//! checkpoint and restored exactly on `--resume`.

use std::collections::BTreeMap;

use mae_models::checkpoint::StateDict;
use tch::{nn, Tensor};

use crate::model::load::{from_tensor, to_tensor};

/// Learning rate of step `epoch` (fractional: epoch + step / steps per epoch): linear warm-up
/// to `lr`, then a half-cycle cosine to `min_lr` at `epochs`.
pub fn lr_at(epoch: f64, lr: f64, min_lr: f64, warmup_epochs: f64, epochs: f64) -> f64 {
    if epoch < warmup_epochs {
        lr * epoch / warmup_epochs
    } else {
        let span = (epochs - warmup_epochs).max(f64::MIN_POSITIVE);
        let t = ((epoch - warmup_epochs) / span).min(1.0);
        min_lr + (lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// The absolute learning rate from the base rate and the effective batch size (linear scaling).
pub fn scaled_lr(blr: f64, effective_batch: usize) -> f64 {
    blr * effective_batch as f64 / 256.0
}

/// Layer of a ViT parameter for layer-wise decay: 0 for the embeddings, `i + 1` for block `i`,
/// `num_layers` (blocks + 1) for everything after the blocks.
pub fn vit_layer_id(name: &str, num_layers: usize) -> usize {
    if name == "cls_token" || name == "pos_embed" || name.starts_with("patch_embed") {
        0
    } else if let Some(rest) = name.strip_prefix("blocks.") {
        rest.split('.')
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .map_or(num_layers, |i| i + 1)
    } else {
        num_layers
    }
}

/// Hyper-parameters of one parameter group.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub name: String,
    pub lr_scale: f64,
    pub weight_decay: f64,
    pub params: Vec<String>,
}

/// The groups of upstream `param_groups_lrd`: per layer, decayed and not decayed (1-D tensors
/// and `no_decay` names are not decayed). With `layer_decay == 1` every scale is 1.
pub fn param_groups(
    names_and_dims: &[(String, usize)],
    depth: usize,
    weight_decay: f64,
    layer_decay: f64,
    no_decay: &[&str],
) -> Vec<Group> {
    let num_layers = depth + 1;
    let mut groups: BTreeMap<(usize, bool), Group> = BTreeMap::new();
    for (name, ndim) in names_and_dims {
        let decay = *ndim > 1 && !no_decay.contains(&name.as_str());
        let layer = vit_layer_id(name, num_layers);
        let g = groups.entry((layer, decay)).or_insert_with(|| Group {
            name: format!("layer_{layer}_{}", if decay { "decay" } else { "no_decay" }),
            lr_scale: layer_decay.powi((num_layers - layer) as i32),
            weight_decay: if decay { weight_decay } else { 0.0 },
            params: Vec::new(),
        });
        g.params.push(name.clone());
    }
    groups.into_values().collect()
}

struct Slot {
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    lr_scale: f64,
    weight_decay: f64,
}

/// PyTorch's AdamW (decoupled weight decay, bias-corrected moments).
pub struct AdamW {
    slots: BTreeMap<String, Slot>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub step: u64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AdamW({} tensors, step {})", self.slots.len(), self.step)
    }
}

impl AdamW {
    /// An optimizer over the trainable variables of `vs`, organised in `groups`.
    pub fn new(vs: &nn::VarStore, groups: &[Group], betas: (f64, f64)) -> Self {
        let vars = vs.variables();
        let mut slots = BTreeMap::new();
        for g in groups {
            for name in &g.params {
                let Some(p) = vars.get(name) else { continue };
                slots.insert(
                    name.clone(),
                    Slot {
                        param: p.shallow_clone(),
                        exp_avg: p.zeros_like(),
                        exp_avg_sq: p.zeros_like(),
                        lr_scale: g.lr_scale,
                        weight_decay: g.weight_decay,
                    },
                );
            }
        }
        Self {
            slots,
            beta1: betas.0,
            beta2: betas.1,
            eps: 1e-8,
            step: 0,
        }
    }

    /// Sets every gradient to zero.
    pub fn zero_grad(&mut self) {
        for s in self.slots.values_mut() {
            s.param.zero_grad();
        }
    }

    /// Scales the gradients so their global 2-norm is at most `max_norm`; returns the norm
    /// before clipping.
    pub fn clip_grad_norm(&self, max_norm: f64) -> f64 {
        clip_norm(self.slots.values().map(|s| &s.param), max_norm)
    }

    /// One update with base learning rate `lr` (each group applies its own scale).
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        tch::no_grad(|| {
            for s in self.slots.values_mut() {
                let g = s.param.grad();
                if !g.defined() {
                    continue;
                }
                let lr = lr * s.lr_scale;
                if s.weight_decay != 0.0 {
                    let _ = s.param.g_mul_scalar_(1.0 - lr * s.weight_decay);
                }
                let _ = s.exp_avg.g_mul_scalar_(b1);
                let _ = s.exp_avg.g_add_(&(&g * (1.0 - b1)));
                let _ = s.exp_avg_sq.g_mul_scalar_(b2);
                let _ = s.exp_avg_sq.g_add_(&(&g * &g * (1.0 - b2)));
                let denom = s.exp_avg_sq.sqrt() / bc2.sqrt() + self.eps;
                let update = &s.exp_avg / denom * (lr / bc1);
                let _ = s.param.g_sub_(&update);
            }
        });
    }

    /// The moments as checkpoint tensors (`exp_avg.NAME`, `exp_avg_sq.NAME`).
    pub fn state(&self) -> StateDict {
        let mut sd = StateDict::new();
        for (name, s) in &self.slots {
            sd.insert(format!("exp_avg.{name}"), from_tensor(&s.exp_avg));
            sd.insert(format!("exp_avg_sq.{name}"), from_tensor(&s.exp_avg_sq));
        }
        sd
    }

    /// Restores the moments saved by [`AdamW::state`]; fails naming the first tensor absent
    /// or of another shape.
    pub fn load_state(&mut self, sd: &StateDict, step: u64) -> Result<(), String> {
        tch::no_grad(|| {
            for (name, s) in self.slots.iter_mut() {
                for (key, dst) in [
                    (format!("exp_avg.{name}"), &s.exp_avg),
                    (format!("exp_avg_sq.{name}"), &s.exp_avg_sq),
                ] {
                    let src = sd.get(&key).ok_or_else(|| format!("missing {key}"))?;
                    dst.shallow_clone().copy_(&saved_like(&key, src, dst)?);
                }
            }
            Ok::<(), String>(())
        })?;
        self.step = step;
        Ok(())
    }
}

/// The saved tensor `key` (`src`) on `like`'s device; fails naming the key when its shape is
/// not `like`'s.
pub(crate) fn saved_like(
    key: &str,
    src: &mae_models::TensorData,
    like: &Tensor,
) -> Result<Tensor, String> {
    let src = to_tensor(src);
    if src.size() != like.size() {
        return Err(format!(
            "{key} has shape {:?}, expected {:?}",
            src.size(),
            like.size()
        ));
    }
    Ok(src.to_device(like.device()))
}

/// What the epoch loop and the checkpoint writer need of an optimizer.
pub trait Optimizer {
    /// Sets every gradient to zero.
    fn zero_grad(&mut self);
    /// Scales the gradients so their global 2-norm is at most `max_norm`; returns the norm
    /// before clipping.
    fn clip_grad_norm(&self, max_norm: f64) -> f64;
    /// One update with base learning rate `lr`.
    fn step(&mut self, lr: f64);
    /// Updates taken so far.
    fn steps(&self) -> u64;
    /// The parameters it updates (their gradients are what data-parallel ranks average).
    fn params(&self) -> Vec<Tensor>;
    /// The state to save beside a checkpoint.
    fn state(&self) -> StateDict;
    /// Restores [`Optimizer::state`]; fails naming the first tensor absent or misshapen.
    fn load_state(&mut self, sd: &StateDict, step: u64) -> Result<(), String>;
}

impl Optimizer for AdamW {
    fn zero_grad(&mut self) {
        AdamW::zero_grad(self)
    }
    fn clip_grad_norm(&self, max_norm: f64) -> f64 {
        AdamW::clip_grad_norm(self, max_norm)
    }
    fn step(&mut self, lr: f64) {
        AdamW::step(self, lr)
    }
    fn steps(&self) -> u64 {
        self.step
    }
    fn params(&self) -> Vec<Tensor> {
        self.slots
            .values()
            .map(|s| s.param.shallow_clone())
            .collect()
    }
    fn state(&self) -> StateDict {
        AdamW::state(self)
    }
    fn load_state(&mut self, sd: &StateDict, step: u64) -> Result<(), String> {
        AdamW::load_state(self, sd, step)
    }
}

/// Global 2-norm of the defined gradients of `params`, scaling them to `max_norm` when above.
fn clip_norm<'a>(params: impl Iterator<Item = &'a Tensor> + Clone, max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let norms: Vec<Tensor> = params
            .clone()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .map(|g| g.norm())
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        let coef = max_norm / (total + 1e-6);
        if coef < 1.0 {
            for p in params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(coef);
                }
            }
        }
        total
    })
}

/// LARS as upstream `util/lars.py` (used for linear probing): SGD with momentum whose update of
/// every tensor of more than one dimension gets weight decay and the layer-wise trust ratio
/// `trust_coefficient · ‖p‖ / ‖dp‖` (1 when either norm is zero); 1-D tensors (biases) are
/// updated by plain momentum SGD.
pub struct Lars {
    params: BTreeMap<String, (Tensor, Tensor)>,
    pub weight_decay: f64,
    pub momentum: f64,
    pub trust_coefficient: f64,
    pub step: u64,
}

impl std::fmt::Debug for Lars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lars({} tensors, step {})", self.params.len(), self.step)
    }
}

impl Lars {
    /// LARS over the named tensors, with upstream's momentum 0.9 and trust coefficient 0.001.
    pub fn new(params: Vec<(String, Tensor)>, weight_decay: f64) -> Self {
        let params = params
            .into_iter()
            .map(|(k, p)| {
                let mu = p.zeros_like();
                (k, (p, mu))
            })
            .collect();
        Self {
            params,
            weight_decay,
            momentum: 0.9,
            trust_coefficient: 0.001,
            step: 0,
        }
    }
}

impl Optimizer for Lars {
    fn zero_grad(&mut self) {
        for (p, _) in self.params.values_mut() {
            p.zero_grad();
        }
    }

    fn clip_grad_norm(&self, max_norm: f64) -> f64 {
        clip_norm(self.params.values().map(|(p, _)| p), max_norm)
    }

    fn params(&self) -> Vec<Tensor> {
        self.params
            .values()
            .map(|(p, _)| p.shallow_clone())
            .collect()
    }

    fn step(&mut self, lr: f64) {
        self.step += 1;
        tch::no_grad(|| {
            for (p, mu) in self.params.values_mut() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut dp = g.shallow_clone();
                if p.dim() > 1 {
                    dp = &dp + &*p * self.weight_decay;
                    let pn = p.norm().double_value(&[]);
                    let un = dp.norm().double_value(&[]);
                    let q = if pn > 0.0 && un > 0.0 {
                        self.trust_coefficient * pn / un
                    } else {
                        1.0
                    };
                    dp *= q;
                }
                let _ = mu.g_mul_scalar_(self.momentum);
                let _ = mu.g_add_(&dp);
                let _ = p.g_sub_(&(&*mu * lr));
            }
        });
    }

    fn steps(&self) -> u64 {
        self.step
    }

    fn state(&self) -> StateDict {
        self.params
            .iter()
            .map(|(k, (_, mu))| (format!("mu.{k}"), from_tensor(mu)))
            .collect()
    }

    fn load_state(&mut self, sd: &StateDict, step: u64) -> Result<(), String> {
        tch::no_grad(|| {
            for (name, (_, mu)) in self.params.iter_mut() {
                let key = format!("mu.{name}");
                let src = sd.get(&key).ok_or_else(|| format!("missing {key}"))?;
                mu.copy_(&saved_like(&key, src, mu)?);
            }
            Ok::<(), String>(())
        })?;
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_follows_the_cosine() {
        let f = |e| lr_at(e, 1e-3, 1e-6, 5.0, 50.0);
        assert_eq!(f(0.0), 0.0);
        assert!((f(2.5) - 5e-4).abs() < 1e-12);
        assert!((f(5.0) - 1e-3).abs() < 1e-12);
        assert!((f(27.5) - (1e-6 + (1e-3 - 1e-6) * 0.5)).abs() < 1e-12);
        assert!((f(50.0) - 1e-6).abs() < 1e-12);
        assert_eq!(scaled_lr(5e-4, 1024), 2e-3);
    }

    #[test]
    fn layer_ids_follow_upstream() {
        assert_eq!(vit_layer_id("cls_token", 13), 0);
        assert_eq!(vit_layer_id("patch_embed.proj.weight", 13), 0);
        assert_eq!(vit_layer_id("blocks.0.norm1.weight", 13), 1);
        assert_eq!(vit_layer_id("blocks.11.mlp.fc2.bias", 13), 12);
        assert_eq!(vit_layer_id("fc_norm.weight", 13), 13);
        assert_eq!(vit_layer_id("head.weight", 13), 13);
    }
}
