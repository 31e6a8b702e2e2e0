//! Random erasing (Zhong et al. 2017) in pixel mode, as the MAE fine-tuning recipe uses it.

use crate::rng::Rng;

/// Random erasing in pixel mode on one normalised `[3, s, s]` image: with probability `prob`,
/// a box of 2–33 % of the area and aspect 0.3–3.3 is filled with standard-normal noise.
pub fn random_erase(px: &mut [f32], s: usize, prob: f64, rng: &mut Rng) {
    if prob <= 0.0 || rng.unit() >= prob {
        return;
    }
    let area = (s * s) as f64;
    let (lo, hi) = ((0.3f64).ln(), (1.0 / 0.3f64).ln());
    for _ in 0..10 {
        let target = area * rng.uniform(0.02, 1.0 / 3.0);
        let aspect = rng.uniform(lo, hi).exp();
        let h = (target * aspect).sqrt().round() as usize;
        let w = (target / aspect).sqrt().round() as usize;
        if h == 0 || w == 0 || h >= s || w >= s {
            continue;
        }
        let y0 = rng.below(s - h + 1);
        let x0 = rng.below(s - w + 1);
        for c in 0..3 {
            for y in y0..y0 + h {
                for x in x0..x0 + w {
                    px[c * s * s + y * s + x] = rng.normal() as f32;
                }
            }
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn random_erasing_fills_one_box_or_nothing() {
        let s = 16;
        let mut rng = Rng(4);
        let mut erased = 0;
        for _ in 0..200 {
            let mut px = vec![7f32; 3 * s * s];
            random_erase(&mut px, s, 0.25, &mut rng);
            let changed = px.iter().filter(|&&v| v != 7.0).count();
            if changed > 0 {
                erased += 1;
                assert!(
                    changed % 3 == 0 && changed <= 3 * s * s / 3 + 3 * s,
                    "{changed}"
                );
            }
        }
        assert!(
            (30..=70).contains(&erased),
            "{erased} of 200 erased at p = 0.25"
        );
    }
}
