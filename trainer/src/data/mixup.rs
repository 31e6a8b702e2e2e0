//! Mixup (Zhang et al. 2017) and CutMix (Yun et al. 2019) in timm's batch mode, as the MAE
//! fine-tuning recipe uses them.

use tch::{Kind, Tensor};

use crate::rng::Rng;

/// A Gamma(shape, 1) sample (Marsaglia–Tsang, with the boost for shape < 1).
fn gamma(shape: f64, rng: &mut Rng) -> f64 {
    if shape < 1.0 {
        let u = rng.unit().max(1e-300);
        return gamma(shape + 1.0, rng) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = rng.normal();
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = rng.unit();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// A Beta(a, a) sample.
pub fn beta(a: f64, rng: &mut Rng) -> f64 {
    let x = gamma(a, rng);
    let y = gamma(a, rng);
    x / (x + y)
}

/// Mixup/CutMix settings (`--mixup`, `--cutmix`, `--mixup-prob`, `--mixup-switch-prob`).
#[derive(Debug, Clone, Copy)]
pub struct MixConfig {
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
    pub prob: f64,
    pub switch_prob: f64,
}

impl MixConfig {
    pub fn active(&self) -> bool {
        self.prob > 0.0 && (self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0)
    }
}

/// The CutMix box (y0, y1, x0, x1) for mixing weight `lam` on an `h × w` image, and the
/// weight corrected for the box's clipped area, as timm's `rand_bbox` + `cutmix_bbox_and_lam`.
pub fn cutmix_box(h: i64, w: i64, lam: f64, rng: &mut Rng) -> ((i64, i64, i64, i64), f64) {
    let ratio = (1.0 - lam).sqrt();
    let (ch, cw) = ((h as f64 * ratio) as i64, (w as f64 * ratio) as i64);
    let cy = rng.below(h as usize) as i64;
    let cx = rng.below(w as usize) as i64;
    let (y0, y1) = ((cy - ch / 2).clamp(0, h), (cy + ch / 2).clamp(0, h));
    let (x0, x1) = ((cx - cw / 2).clamp(0, w), (cx + cw / 2).clamp(0, w));
    let area = ((y1 - y0) * (x1 - x0)) as f64;
    ((y0, y1, x0, x1), 1.0 - area / (h * w) as f64)
}

/// Mixes a batch with its reverse (batch mode); `targets` are soft `[b, c]` rows.
/// Returns the mixed images and targets, and the weight of the original samples.
pub fn mix(xs: &Tensor, targets: &Tensor, cfg: &MixConfig, rng: &mut Rng) -> (Tensor, Tensor, f64) {
    if !cfg.active() || rng.unit() >= cfg.prob {
        return (xs.shallow_clone(), targets.shallow_clone(), 1.0);
    }
    let use_cutmix = match (cfg.mixup_alpha > 0.0, cfg.cutmix_alpha > 0.0) {
        (true, true) => rng.unit() < cfg.switch_prob,
        (false, true) => true,
        _ => false,
    };
    let flipped = xs.flip([0]);
    let (xs, lam) = if use_cutmix {
        let lam = beta(cfg.cutmix_alpha, rng);
        let (_, _, h, w) = xs.size4().expect("images are [b, c, h, w]");
        let ((y0, y1, x0, x1), lam) = cutmix_box(h, w, lam, rng);
        let out = xs.copy();
        if y1 > y0 && x1 > x0 {
            let src = flipped.narrow(2, y0, y1 - y0).narrow(3, x0, x1 - x0);
            out.narrow(2, y0, y1 - y0)
                .narrow(3, x0, x1 - x0)
                .copy_(&src);
        }
        (out, lam)
    } else {
        let lam = beta(cfg.mixup_alpha, rng);
        (xs * lam + flipped * (1.0 - lam), lam)
    };
    let t = targets * lam + targets.flip([0]) * (1.0 - lam);
    (xs, t.to_kind(Kind::Float), lam)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn beta_has_the_right_mean_and_spread() {
        let mut rng = Rng(9);
        let xs: Vec<f64> = (0..20000).map(|_| beta(0.8, &mut rng)).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        // Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        assert!((var - 1.0 / (4.0 * 2.6)).abs() < 0.005, "{var}");
        assert!(xs.iter().all(|x| (0.0..=1.0).contains(x)));
    }

    #[test]
    fn mixup_targets_are_convex_combinations() {
        let xs = Tensor::from_slice(&[0f32, 0., 0., 0., 1., 1., 1., 1.]).reshape([2, 1, 2, 2]);
        let t = Tensor::from_slice(&[1f32, 0., 0., 1.]).reshape([2, 2]);
        let cfg = MixConfig {
            mixup_alpha: 0.8,
            cutmix_alpha: 0.0,
            prob: 1.0,
            switch_prob: 0.5,
        };
        let (mx, mt, lam) = mix(&xs, &t, &cfg, &mut Rng(1));
        let expect_t =
            Tensor::from_slice(&[lam as f32, 1.0 - lam as f32, 1.0 - lam as f32, lam as f32])
                .reshape([2, 2]);
        assert!((mt - expect_t).abs().max().double_value(&[]) < 1e-6);
        // Sample 0 (all zeros) becomes (1 − lam) of sample 1 (all ones).
        assert!((mx.double_value(&[0, 0, 0, 0]) - (1.0 - lam)).abs() < 1e-6);
    }

    #[test]
    fn cutmix_weight_matches_the_pasted_area() {
        let xs = Tensor::zeros([2, 1, 8, 8], (Kind::Float, tch::Device::Cpu));
        let _ = xs.get(1).fill_(1.0);
        let t = Tensor::from_slice(&[1f32, 0., 0., 1.]).reshape([2, 2]);
        let cfg = MixConfig {
            mixup_alpha: 0.0,
            cutmix_alpha: 1.0,
            prob: 1.0,
            switch_prob: 0.5,
        };
        for seed in 0..20 {
            let (mx, mt, lam) = mix(&xs, &t, &cfg, &mut Rng(seed));
            // Sample 0 holds ones exactly where sample 1's box was pasted.
            let pasted = mx.get(0).sum(Kind::Float).double_value(&[]) / 64.0;
            assert!(
                (pasted - (1.0 - lam)).abs() < 1e-9,
                "seed {seed}: {pasted} vs {lam}"
            );
            assert!((mt.double_value(&[0, 0]) - lam).abs() < 1e-6);
        }
    }
}
