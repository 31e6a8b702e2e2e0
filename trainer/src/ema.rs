//! Model EMA (timm's `ModelEmaV3`): an exponential moving average of the weights, updated after
//! every optimizer step. With it a fine-tuning run evaluates, selects and saves the averaged
//! weights, so the best checkpoint, `eval` and the exported model all see the average.
//!
//! [`Averaged`] wraps the run's optimizer: its `step` updates the averages after the inner
//! optimizer's, and its state (saved beside each epoch checkpoint) carries the training weights
//! as `ema_train.NAME`, because the checkpoint itself holds the averages. `--resume` therefore
//! restores both: the checkpoint's weights become the averages again and the saved training
//! weights the live ones, and a resumed run continues exactly as an uninterrupted one.

use crate::model::load::from_tensor;
use crate::optim::Optimizer;
use mae_models::checkpoint::StateDict;
use tch::Tensor;

/// The key prefix of the training weights in the optimizer state of an averaged run.
const TRAIN_PREFIX: &str = "ema_train.";

/// The decay of update `n` (1-based) for the configured `decay`: timm's warm-up,
/// `min(decay, (1 + n) / (10 + n))`, so the first updates follow the weights closely and a short
/// run is not dominated by its initial weights.
pub fn decay_at(decay: f64, n: u64) -> f64 {
    decay.min((1.0 + n as f64) / (10.0 + n as f64))
}

/// An optimizer, and when `decay` is set, the moving average of the weights it updates.
pub struct Averaged<O> {
    inner: O,
    decay: Option<f64>,
    /// (name, live variable, its average), sorted by name; empty without a decay.
    vars: Vec<(String, Tensor, Tensor)>,
    /// Whether the live variables hold the averages now (between two [`Averaged::swap`]s).
    swapped: bool,
}

impl<O> std::fmt::Debug for Averaged<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Averaged")
            .field("decay", &self.decay)
            .field("variables", &self.vars.len())
            .field("swapped", &self.swapped)
            .finish_non_exhaustive()
    }
}

impl<O: Optimizer> Averaged<O> {
    /// Wraps `inner`; with `decay` the averages start as a copy of `vs`'s variables.
    pub fn new(inner: O, vs: &tch::nn::VarStore, decay: Option<f64>) -> Self {
        let mut vars: Vec<(String, Tensor, Tensor)> = match decay {
            None => Vec::new(),
            Some(_) => vs
                .variables()
                .into_iter()
                .map(|(name, t)| {
                    let avg = tch::no_grad(|| t.detach().copy());
                    (name, t, avg)
                })
                .collect(),
        };
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Averaged {
            inner,
            decay,
            vars,
            swapped: false,
        }
    }

    /// Whether the weights are averaged.
    pub fn is_averaged(&self) -> bool {
        self.decay.is_some()
    }

    /// Exchanges the live weights and their averages: once before the model is evaluated and
    /// saved (so that the average is what they see), once after (to train on). A no-op without
    /// averaging.
    pub fn swap(&mut self) {
        tch::no_grad(|| {
            for (_, live, avg) in &mut self.vars {
                let held = live.copy();
                live.copy_(avg);
                avg.copy_(&held);
            }
        });
        if self.is_averaged() {
            self.swapped = !self.swapped;
        }
    }

    /// The averages (or, while swapped, the training weights) by name.
    #[cfg(test)]
    fn other(&self, name: &str) -> Option<&Tensor> {
        self.vars.iter().find(|v| v.0 == name).map(|v| &v.2)
    }

    fn update(&mut self) {
        let Some(decay) = self.decay else { return };
        let d = decay_at(decay, self.inner.steps());
        tch::no_grad(|| {
            for (_, live, avg) in &mut self.vars {
                let _ = avg.g_mul_scalar_(d);
                let _ = avg.g_add_(&(&*live * (1.0 - d)));
            }
        });
    }
}

impl<O: Optimizer> Optimizer for Averaged<O> {
    fn zero_grad(&mut self) {
        self.inner.zero_grad()
    }
    fn clip_grad_norm(&self, max_norm: f64) -> f64 {
        self.inner.clip_grad_norm(max_norm)
    }
    fn step(&mut self, lr: f64) {
        debug_assert!(!self.swapped, "a step on the averaged weights");
        self.inner.step(lr);
        self.update();
    }
    fn steps(&self) -> u64 {
        self.inner.steps()
    }
    fn params(&self) -> Vec<Tensor> {
        self.inner.params()
    }
    fn state(&self) -> StateDict {
        let mut sd = self.inner.state();
        for (name, live, avg) in &self.vars {
            let train = if self.swapped { avg } else { live };
            sd.insert(format!("{TRAIN_PREFIX}{name}"), from_tensor(train));
        }
        sd
    }
    /// Restores the inner optimizer and, when averaging, takes the weights loaded into the
    /// model (the checkpoint's, i.e. the averages) as the averages and the saved training
    /// weights as the live ones.
    fn load_state(&mut self, sd: &StateDict, step: u64) -> Result<(), String> {
        self.inner.load_state(sd, step)?;
        if !self.is_averaged() {
            return Ok(());
        }
        if self.swapped {
            return Err("the weights are swapped with their averages".into());
        }
        tch::no_grad(|| {
            for (name, live, avg) in &mut self.vars {
                let key = format!("{TRAIN_PREFIX}{name}");
                let src = sd.get(&key).ok_or_else(|| {
                    format!(
                        "missing {key}: the checkpoint was saved without --model-ema, so it \
                         holds no training weights to continue from"
                    )
                })?;
                let src = crate::optim::saved_like(&key, src, live)?;
                avg.copy_(live);
                live.copy_(&src);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::optim::AdamW;
    use tch::nn::VarStore;
    use tch::{Device, Kind};

    fn store() -> (VarStore, Tensor) {
        let vs = VarStore::new(Device::Cpu);
        let w = vs
            .root()
            .var_copy("w", &Tensor::from_slice(&[1.0f32, -2.0, 3.0]));
        (vs, w)
    }

    fn adamw(vs: &VarStore) -> AdamW {
        let groups = crate::optim::param_groups(&[("w".into(), 1)], 0, 0.0, 1.0, &[]);
        AdamW::new(vs, &groups, (0.9, 0.999))
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.to_kind(Kind::Float)).unwrap()
    }

    /// One step on the loss sum(w * g): the gradient is g.
    fn step(opt: &mut dyn Optimizer, w: &Tensor, g: &[f32]) {
        opt.zero_grad();
        (w * Tensor::from_slice(g)).sum(Kind::Float).backward();
        opt.step(0.1);
    }

    #[test]
    fn the_warm_up_follows_timm() {
        assert_eq!(decay_at(0.9998, 0), 0.1);
        assert!((decay_at(0.9998, 10) - 11.0 / 20.0).abs() < 1e-12);
        assert_eq!(decay_at(0.9, 1000), 0.9);
    }

    #[test]
    fn the_average_is_the_recurrence_over_every_step() {
        let (vs, w) = store();
        let mut opt = Averaged::new(adamw(&vs), &vs, Some(0.5));
        let mut expect = values(&w);
        for (n, g) in [[1.0f32, 0.5, -1.0], [0.2, -0.3, 0.4], [2.0, 1.0, 0.0]]
            .iter()
            .enumerate()
        {
            step(&mut opt, &w, g);
            let d = decay_at(0.5, n as u64 + 1) as f32;
            let now = values(&w);
            for (e, x) in expect.iter_mut().zip(&now) {
                *e = *e * d + x * (1.0 - d);
            }
            let avg = values(opt.other("w").unwrap());
            for (a, e) in avg.iter().zip(&expect) {
                assert!(
                    (a - e).abs() < 1e-6,
                    "step {n}: average {avg:?}, expected {expect:?}"
                );
            }
        }
        assert_ne!(values(&w), expect, "the live weights are not the averages");
        // Swapped, the model holds the averages and the state the training weights.
        let live = values(&w);
        opt.swap();
        assert_eq!(values(&w), values(&Tensor::from_slice(&expect)));
        let saved = crate::model::load::to_tensor(&opt.state()["ema_train.w"]);
        assert_eq!(values(&saved), live);
        opt.swap();
        assert_eq!(values(&w), live);
    }

    #[test]
    fn a_resumed_average_continues_as_an_uninterrupted_one() {
        let grads = [
            [1.0f32, 0.5, -1.0],
            [0.2, -0.3, 0.4],
            [2.0, 1.0, 0.0],
            [-1.0, 0.1, 0.3],
        ];
        // Uninterrupted: four steps.
        let (vs, w) = store();
        let mut opt = Averaged::new(adamw(&vs), &vs, Some(0.8));
        for g in &grads {
            step(&mut opt, &w, g);
        }
        opt.swap();
        let (whole_avg, whole_live) = (values(&w), values(opt.other("w").unwrap()));
        // Two steps, saved as a run saves (averages in the weights, the state beside them),
        // then restored into a fresh store and two more steps.
        let (vs, w) = store();
        let mut opt = Averaged::new(adamw(&vs), &vs, Some(0.8));
        for g in &grads[..2] {
            step(&mut opt, &w, g);
        }
        opt.swap();
        let weights = crate::model::load::state_dict(&vs);
        let state = opt.state();
        let steps = opt.steps();
        let (vs2, w2) = store();
        let loaded = crate::model::load::load_into(&vs2, &weights);
        assert!(loaded.is_exact());
        let mut opt2 = Averaged::new(adamw(&vs2), &vs2, Some(0.8));
        opt2.load_state(&state, steps).unwrap();
        for g in &grads[2..] {
            step(&mut opt2, &w2, g);
        }
        opt2.swap();
        assert_eq!(values(&w2), whole_avg);
        assert_eq!(values(opt2.other("w").unwrap()), whole_live);
    }

    #[test]
    fn resuming_a_run_saved_without_averages_says_so() {
        let (vs, _) = store();
        let plain = adamw(&vs);
        let state = plain.state();
        let mut opt = Averaged::new(adamw(&vs), &vs, Some(0.9));
        let err = opt.load_state(&state, 3).unwrap_err();
        assert!(err.contains("without --model-ema"), "{err}");
        // Without averaging the wrapper is the optimizer alone.
        let mut off = Averaged::new(adamw(&vs), &vs, None);
        off.load_state(&state, 3).unwrap();
        assert!(off.state().keys().all(|k| !k.starts_with(TRAIN_PREFIX)));
    }
}
