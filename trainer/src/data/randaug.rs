//! RandAugment (Cubuk et al., "RandAugment: Practical automated data augmentation with a reduced
//! search space", arXiv:1909.13719) as timm's `rand_augment_transform`, which upstream MAE
//! fine-tuning applies through `create_transform(auto_augment='rand-m9-mstd0.5-inc1')`.
//!
//! A policy string `rand-KEYVAL-KEYVAL…` sets: `m` magnitude (0–10, default 10), `n` ops per
//! image (default 2), `p` probability of each op (default 0.5), `mstd` standard deviation of
//! gaussian noise on the magnitude (> 100: uniform in [0, m]), `mmax` upper clip of the
//! magnitude (default 10) and `inc` (1: the ops whose severity increases with the magnitude).
//! Each image gets `n` ops drawn uniformly with replacement; each is applied with probability
//! `p` at a freshly drawn magnitude, and signed ops (rotation, shear, translation, the
//! increasing enhancements) take a random sign.

mod ops;

pub use ops::{
    affine, auto_contrast, brightness, color, contrast, equalize, invert, posterize, rotate,
    sharpness, shear_x, shear_y, solarize, solarize_add, translate_x_rel, translate_y_rel,
};

use std::str::FromStr;

use anyhow::{bail, Context};
use image::RgbImage;

use crate::rng::Rng;

/// timm's `_LEVEL_DENOM`: magnitudes are on a 0–10 scale.
const LEVEL_DENOM: f64 = 10.0;

/// The RandAugment operations, named as in timm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    PosterizeIncreasing,
    Solarize,
    SolarizeIncreasing,
    SolarizeAdd,
    Color,
    ColorIncreasing,
    Contrast,
    ContrastIncreasing,
    Brightness,
    BrightnessIncreasing,
    Sharpness,
    SharpnessIncreasing,
    ShearX,
    ShearY,
    TranslateXRel,
    TranslateYRel,
}

/// timm's `_RAND_TRANSFORMS` (`inc0`).
pub const RAND_TRANSFORMS: [Op; 15] = [
    Op::AutoContrast,
    Op::Equalize,
    Op::Invert,
    Op::Rotate,
    Op::Posterize,
    Op::Solarize,
    Op::SolarizeAdd,
    Op::Color,
    Op::Contrast,
    Op::Brightness,
    Op::Sharpness,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateXRel,
    Op::TranslateYRel,
];

/// timm's `_RAND_INCREASING_TRANSFORMS` (`inc1`).
pub const RAND_INCREASING_TRANSFORMS: [Op; 15] = [
    Op::AutoContrast,
    Op::Equalize,
    Op::Invert,
    Op::Rotate,
    Op::PosterizeIncreasing,
    Op::SolarizeIncreasing,
    Op::SolarizeAdd,
    Op::ColorIncreasing,
    Op::ContrastIncreasing,
    Op::BrightnessIncreasing,
    Op::SharpnessIncreasing,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateXRel,
    Op::TranslateYRel,
];

/// An operation with its argument, ready to apply.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    AutoContrast,
    Equalize,
    Invert,
    /// Degrees, counter-clockwise.
    Rotate(f64),
    /// Bits kept.
    Posterize(u32),
    /// Threshold (0–256).
    Solarize(u32),
    /// Amount added below 128.
    SolarizeAdd(u32),
    Color(f64),
    Contrast(f64),
    Brightness(f64),
    Sharpness(f64),
    ShearX(f64),
    ShearY(f64),
    TranslateXRel(f64),
    TranslateYRel(f64),
}

impl Action {
    /// Applies the operation; geometric ops fill uncovered pixels with `fill`.
    pub fn apply(&self, img: &RgbImage, fill: [u8; 3]) -> RgbImage {
        match *self {
            Action::AutoContrast => auto_contrast(img),
            Action::Equalize => equalize(img),
            Action::Invert => invert(img),
            Action::Rotate(deg) => rotate(img, deg, fill),
            Action::Posterize(bits) => posterize(img, bits),
            Action::Solarize(thresh) => solarize(img, thresh),
            Action::SolarizeAdd(add) => solarize_add(img, add, 128),
            Action::Color(f) => color(img, f),
            Action::Contrast(f) => contrast(img, f),
            Action::Brightness(f) => brightness(img, f),
            Action::Sharpness(f) => sharpness(img, f),
            Action::ShearX(f) => shear_x(img, f, fill),
            Action::ShearY(f) => shear_y(img, f, fill),
            Action::TranslateXRel(p) => translate_x_rel(img, p, fill),
            Action::TranslateYRel(p) => translate_y_rel(img, p, fill),
        }
    }
}

/// `v` or `-v` with equal probability (timm's `_randomly_negate`).
fn randomly_negate(v: f64, rng: &mut Rng) -> f64 {
    if rng.unit() > 0.5 {
        -v
    } else {
        v
    }
}

impl Op {
    /// The operation's argument at magnitude `level` (timm's `LEVEL_TO_ARG`); draws the sign of
    /// signed operations from `rng`.
    pub fn action(self, level: f64, rng: &mut Rng) -> Action {
        let frac = level / LEVEL_DENOM;
        let enhance = || frac * 1.8 + 0.1;
        let enhance_increasing = |rng: &mut Rng| (1.0 + randomly_negate(frac * 0.9, rng)).max(0.1);
        let posterize = (frac * 4.0) as u32;
        let solarize = ((frac * 256.0) as u32).min(256);
        match self {
            Op::AutoContrast => Action::AutoContrast,
            Op::Equalize => Action::Equalize,
            Op::Invert => Action::Invert,
            Op::Rotate => Action::Rotate(randomly_negate(frac * 30.0, rng)),
            Op::Posterize => Action::Posterize(posterize),
            Op::PosterizeIncreasing => Action::Posterize(4 - posterize.min(4)),
            Op::Solarize => Action::Solarize(solarize),
            Op::SolarizeIncreasing => Action::Solarize(256 - solarize),
            Op::SolarizeAdd => Action::SolarizeAdd(((frac * 110.0) as u32).min(128)),
            Op::Color => Action::Color(enhance()),
            Op::ColorIncreasing => Action::Color(enhance_increasing(rng)),
            Op::Contrast => Action::Contrast(enhance()),
            Op::ContrastIncreasing => Action::Contrast(enhance_increasing(rng)),
            Op::Brightness => Action::Brightness(enhance()),
            Op::BrightnessIncreasing => Action::Brightness(enhance_increasing(rng)),
            Op::Sharpness => Action::Sharpness(enhance()),
            Op::SharpnessIncreasing => Action::Sharpness(enhance_increasing(rng)),
            Op::ShearX => Action::ShearX(randomly_negate(frac * 0.3, rng)),
            Op::ShearY => Action::ShearY(randomly_negate(frac * 0.3, rng)),
            Op::TranslateXRel => Action::TranslateXRel(randomly_negate(frac * 0.45, rng)),
            Op::TranslateYRel => Action::TranslateYRel(randomly_negate(frac * 0.45, rng)),
        }
    }
}

/// A parsed RandAugment policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RandAugment {
    /// Magnitude on the 0–10 scale.
    pub magnitude: f64,
    /// Operations drawn per image.
    pub num_layers: usize,
    /// Probability that a drawn operation is applied.
    pub prob: f64,
    /// Standard deviation of the magnitude noise; infinite: uniform in [0, magnitude].
    pub magnitude_std: f64,
    /// Upper clip of the drawn magnitude.
    pub magnitude_max: f64,
    /// Use the operations whose severity increases with the magnitude.
    pub increasing: bool,
}

impl Default for RandAugment {
    /// timm's defaults for a bare `rand`.
    fn default() -> Self {
        RandAugment {
            magnitude: LEVEL_DENOM,
            num_layers: 2,
            prob: 0.5,
            magnitude_std: 0.0,
            magnitude_max: LEVEL_DENOM,
            increasing: false,
        }
    }
}

/// Parses the `--aa` flag: a RandAugment policy, or `none` (or empty) for no augmentation.
pub fn parse_aa(flag: &str) -> anyhow::Result<Option<RandAugment>> {
    let flag = flag.trim();
    if flag.is_empty() || flag.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    flag.parse().map(Some)
}

impl FromStr for RandAugment {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let mut sections = s.split('-');
        if sections.next() != Some("rand") {
            bail!(
                "policy `{s}` is not supported: only RandAugment policies (`rand-…`, e.g. \
                 `rand-m9-mstd0.5-inc1`) are implemented"
            );
        }
        let mut ra = RandAugment::default();
        for section in sections {
            let split = section
                .find(|c: char| c.is_ascii_digit())
                .with_context(|| format!("section `{section}` of policy `{s}` has no value"))?;
            let (key, val) = section.split_at(split);
            let bad = || format!("bad value `{val}` for key `{key}` in policy `{s}`");
            match key {
                "m" => ra.magnitude = val.parse::<u32>().with_context(bad)?.into(),
                "n" => ra.num_layers = val.parse().with_context(bad)?,
                "p" => {
                    ra.prob = val.parse().with_context(bad)?;
                    if !(0.0..=1.0).contains(&ra.prob) {
                        bail!("{}: a probability lies in [0, 1]", bad());
                    }
                }
                "mstd" => {
                    let std: f64 = val.parse().with_context(bad)?;
                    ra.magnitude_std = if std > 100.0 { f64::INFINITY } else { std };
                }
                "mmax" => ra.magnitude_max = val.parse::<u32>().with_context(bad)?.into(),
                "inc" => ra.increasing = val.parse::<u32>().with_context(bad)? != 0,
                _ => bail!(
                    "unknown key `{key}` in section `{section}` of RandAugment policy `{s}` \
                     (known: m, n, p, mstd, mmax, inc)"
                ),
            }
        }
        Ok(ra)
    }
}

/// A normal deviate by the Box–Muller transform.
fn gauss(rng: &mut Rng, mean: f64, std: f64) -> f64 {
    let u1 = 1.0 - rng.unit(); // (0, 1]: ln stays finite
    let u2 = rng.unit();
    mean + std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

impl RandAugment {
    /// The operation set the policy draws from.
    pub fn ops(&self) -> &'static [Op] {
        if self.increasing {
            &RAND_INCREASING_TRANSFORMS
        } else {
            &RAND_TRANSFORMS
        }
    }

    /// Draws the operations applied to one image, in order (those that lose their coin flip
    /// are left out).
    pub fn sample(&self, rng: &mut Rng) -> Vec<Action> {
        let ops = self.ops();
        let mut actions = Vec::with_capacity(self.num_layers);
        for _ in 0..self.num_layers {
            let op = ops[rng.below(ops.len())];
            if self.prob < 1.0 && rng.unit() > self.prob {
                continue;
            }
            let drawn = if self.magnitude_std.is_infinite() {
                rng.uniform(0.0, self.magnitude)
            } else if self.magnitude_std > 0.0 {
                gauss(rng, self.magnitude, self.magnitude_std)
            } else {
                self.magnitude
            };
            let level = drawn.min(self.magnitude_max).max(0.0);
            actions.push(op.action(level, rng));
        }
        actions
    }

    /// Augments one image; geometric ops fill with `fill` (timm: the normalisation mean).
    pub fn apply(&self, img: &RgbImage, fill: [u8; 3], rng: &mut Rng) -> RgbImage {
        let mut out = img.clone();
        for action in self.sample(rng) {
            out = action.apply(&out, fill);
        }
        out
    }
}

/// The fill colour timm derives from the normalisation mean: `round(255 · mean)` per channel.
pub fn fill_from_mean(mean: [f32; 3]) -> [u8; 3] {
    mean.map(|m| (255.0 * f64::from(m)).round_ties_even().clamp(0.0, 255.0) as u8)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use image::{imageops, Rgb};

    /// A non-square test image with every channel varying differently.
    fn test_image(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([
                (x * 7 + y * 3) as u8,
                (40 + (x * y) % 150) as u8,
                (200 - (x + 2 * y) % 180) as u8,
            ])
        })
    }

    const FILL: [u8; 3] = [124, 116, 104];

    fn upstream() -> RandAugment {
        "rand-m9-mstd0.5-inc1".parse().unwrap()
    }

    #[test]
    fn parses_timm_policy_strings() {
        assert_eq!(
            upstream(),
            RandAugment {
                magnitude: 9.0,
                num_layers: 2,
                prob: 0.5,
                magnitude_std: 0.5,
                magnitude_max: 10.0,
                increasing: true,
            }
        );
        let ra: RandAugment = "rand-m7-n3-p0.8-mmax12".parse().unwrap();
        assert_eq!(
            (ra.magnitude, ra.num_layers, ra.prob, ra.magnitude_max),
            (7.0, 3, 0.8, 12.0)
        );
        assert!(!ra.increasing);
        assert_eq!(ra.ops(), &RAND_TRANSFORMS);
        assert_eq!(upstream().ops(), &RAND_INCREASING_TRANSFORMS);
        assert_eq!(
            "rand".parse::<RandAugment>().unwrap(),
            RandAugment::default()
        );
        assert!("rand-mstd101"
            .parse::<RandAugment>()
            .unwrap()
            .magnitude_std
            .is_infinite());
        assert_eq!(parse_aa("none").unwrap(), None);
        assert_eq!(parse_aa("").unwrap(), None);
        assert_eq!(parse_aa("rand-m9-mstd0.5-inc1").unwrap(), Some(upstream()));
    }

    #[test]
    fn parser_errors_name_the_problem() {
        let err = |s: &str| format!("{:#}", s.parse::<RandAugment>().unwrap_err());
        let e = err("rand-m9-x3");
        assert!(e.contains("unknown key `x`"), "{e}");
        let e = err("rand-m9-w0");
        assert!(e.contains("unknown key `w`"), "{e}");
        let e = err("rand-m9-tweights");
        assert!(e.contains("`tweights`") && e.contains("no value"), "{e}");
        let e = err("rand-m9.5");
        assert!(e.contains("bad value `9.5` for key `m`"), "{e}");
        let e = err("rand-p1.5");
        assert!(e.contains("key `p`"), "{e}");
        for policy in ["v0", "original", "augmix-m5-w4", "rand_m9"] {
            let e = err(policy);
            assert!(e.contains("only RandAugment"), "{policy}: {e}");
        }
    }

    /// Every action, at arguments the policy can produce.
    fn all_actions() -> Vec<Action> {
        vec![
            Action::AutoContrast,
            Action::Equalize,
            Action::Invert,
            Action::Rotate(-27.0),
            Action::Posterize(1),
            Action::Solarize(26),
            Action::SolarizeAdd(99),
            Action::Color(1.81),
            Action::Contrast(0.19),
            Action::Brightness(1.5),
            Action::Sharpness(1.9),
            Action::ShearX(0.27),
            Action::ShearY(-0.27),
            Action::TranslateXRel(0.405),
            Action::TranslateYRel(-0.405),
        ]
    }

    #[test]
    fn every_op_keeps_the_size_and_changes_the_image() {
        let img = test_image(23, 17);
        for a in all_actions() {
            let out = a.apply(&img, FILL);
            assert_eq!(out.dimensions(), (23, 17), "{a:?}");
            assert_ne!(out, img, "{a:?} left the image unchanged");
        }
    }

    #[test]
    fn magnitude_zero_is_identity_for_increasing_ops() {
        let img = test_image(19, 13);
        let mut rng = Rng(11);
        for op in RAND_INCREASING_TRANSFORMS {
            if matches!(
                op,
                Op::AutoContrast | Op::Equalize | Op::Invert | Op::PosterizeIncreasing
            ) {
                continue; // no magnitude, or (posterize) strongest at 0 bits, not at level 0
            }
            for _ in 0..4 {
                let a = op.action(0.0, &mut rng);
                assert_eq!(a.apply(&img, FILL), img, "{op:?} at level 0 ({a:?})");
            }
        }
        assert_eq!(
            Op::PosterizeIncreasing.action(0.0, &mut rng),
            Action::Posterize(4)
        );
        assert_eq!(
            Op::PosterizeIncreasing.action(10.0, &mut rng),
            Action::Posterize(0)
        );
        // The non-increasing enhancements are neutral at level 5 (factor 1.0).
        for op in [Op::Color, Op::Contrast, Op::Brightness, Op::Sharpness] {
            assert_eq!(op.action(5.0, &mut rng).apply(&img, FILL), img, "{op:?}");
        }
    }

    #[test]
    fn level_to_argument_matches_timm_at_magnitude_9() {
        let mut rng = Rng(2);
        assert_eq!(
            Op::SolarizeIncreasing.action(9.0, &mut rng),
            Action::Solarize(26)
        );
        assert_eq!(Op::Solarize.action(9.0, &mut rng), Action::Solarize(230));
        assert_eq!(
            Op::SolarizeAdd.action(9.0, &mut rng),
            Action::SolarizeAdd(99)
        );
        assert_eq!(
            Op::PosterizeIncreasing.action(9.0, &mut rng),
            Action::Posterize(1)
        );
        assert_eq!(Op::Posterize.action(9.0, &mut rng), Action::Posterize(3));
        for _ in 0..20 {
            match Op::Rotate.action(9.0, &mut rng) {
                Action::Rotate(d) => assert!((d.abs() - 27.0).abs() < 1e-12, "{d}"),
                a => panic!("{a:?}"),
            }
            match Op::ContrastIncreasing.action(9.0, &mut rng) {
                Action::Contrast(f) => {
                    assert!((f - 1.81).abs() < 1e-12 || (f - 0.19).abs() < 1e-12, "{f}")
                }
                a => panic!("{a:?}"),
            }
        }
    }

    #[test]
    fn invert_twice_is_identity() {
        let img = test_image(16, 9);
        assert_eq!(invert(&invert(&img)), img);
    }

    #[test]
    fn point_ops_have_known_values() {
        let img = RgbImage::from_fn(4, 1, |x, _| Rgb([50 + 10 * x as u8, 200, 7 * x as u8]));
        // Channel 0 spans 50..80 and stretches to 0..255; channel 1 is constant and stays.
        let ac = auto_contrast(&img);
        assert_eq!(ac.get_pixel(0, 0).0, [0, 200, 0]);
        assert_eq!(ac.get_pixel(3, 0).0, [255, 200, 255]);
        assert_eq!(posterize(&img, 1).get_pixel(3, 0).0, [0, 128, 0]);
        assert!(posterize(&img, 0).pixels().all(|p| p.0 == [0, 0, 0]));
        assert_eq!(solarize(&img, 60).get_pixel(1, 0).0, [195, 55, 7]);
        assert_eq!(
            solarize_add(&img, 99, 128).get_pixel(3, 0).0,
            [179, 200, 120]
        );
        assert_eq!(brightness(&img, 0.0).get_pixel(2, 0).0, [0, 0, 0]);
        // Equalising a uniform spread of values leaves them spread over the full range.
        let ramp = RgbImage::from_fn(256, 1, |x, _| Rgb([x as u8 / 2, x as u8, 0]));
        let eq = equalize(&ramp);
        assert_eq!(eq.get_pixel(255, 0).0[1], 255);
        assert_eq!(eq.get_pixel(0, 0).0[1], 0);
        assert_eq!(eq.get_pixel(255, 0).0[2], 0);
    }

    #[test]
    fn geometry_follows_pil_orientation() {
        let img = test_image(12, 12);
        // PIL rotates counter-clockwise; 90° lands on pixel centres, so it is exact.
        assert_eq!(rotate(&img, 90.0, FILL), imageops::rotate270(&img));
        assert_eq!(rotate(&img, -90.0, FILL), imageops::rotate90(&img));
        assert_eq!(rotate(&img, 180.0, FILL), imageops::rotate180(&img));
        // A quarter of the width to the right: out(x) = in(x + 3), the last 3 columns filled.
        let t = translate_x_rel(&img, 0.25, FILL);
        for y in 0..12 {
            for x in 0..12 {
                let want = if x + 3 < 12 {
                    *img.get_pixel(x + 3, y)
                } else {
                    Rgb(FILL)
                };
                assert_eq!(*t.get_pixel(x, y), want, "({x}, {y})");
            }
        }
        let t = translate_y_rel(&img, -0.25, FILL);
        assert_eq!(*t.get_pixel(5, 0), Rgb(FILL));
        assert_eq!(t.get_pixel(5, 3), img.get_pixel(5, 0));
    }

    #[test]
    fn policy_statistics_match_timm() {
        let ra = upstream();
        let mut rng = Rng(7);
        let draws = 40_000;
        let mut by_count = [0usize; 3];
        let mut rotations = Vec::new();
        let mut positive = 0usize;
        let mut kinds = std::collections::HashMap::new();
        for _ in 0..draws {
            let actions = ra.sample(&mut rng);
            by_count[actions.len()] += 1;
            for a in actions {
                *kinds.entry(std::mem::discriminant(&a)).or_insert(0usize) += 1;
                if let Action::Rotate(d) = a {
                    rotations.push(d.abs() / 3.0); // degrees → level
                    positive += usize::from(d > 0.0);
                }
            }
        }
        let frac = |n: usize| n as f64 / draws as f64;
        // Two layers, each applied with probability 0.5.
        assert!((frac(by_count[0]) - 0.25).abs() < 0.01, "{by_count:?}");
        assert!((frac(by_count[1]) - 0.50).abs() < 0.01, "{by_count:?}");
        assert!((frac(by_count[2]) - 0.25).abs() < 0.01, "{by_count:?}");
        // Ops uniform over 15 kinds (the enhancements map to one action kind each).
        let applied: usize = kinds.values().sum();
        assert_eq!(kinds.len(), 15);
        for (k, n) in &kinds {
            let p = *n as f64 / applied as f64;
            assert!((p - 1.0 / 15.0).abs() < 0.008, "{k:?}: {p}");
        }
        // Magnitude ~ N(9, 0.5) clipped to [0, 10]; random sign.
        let n = rotations.len() as f64;
        let mean = rotations.iter().sum::<f64>() / n;
        let std = (rotations.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!((mean - 9.0).abs() < 0.03, "mean level {mean}");
        assert!((std - 0.5).abs() < 0.03, "level std {std}");
        assert!(rotations.iter().all(|&l| (0.0..=10.0 + 1e-12).contains(&l)));
        assert!(
            (positive as f64 / n - 0.5).abs() < 0.05,
            "{positive} of {n}"
        );
    }

    #[test]
    fn magnitude_is_clipped_to_mmax() {
        let ra: RandAugment = "rand-m10-mstd3-p1".parse().unwrap();
        let mut rng = Rng(9);
        let mut top = 0.0f64;
        for _ in 0..5000 {
            for a in ra.sample(&mut rng) {
                if let Action::ShearX(f) | Action::ShearY(f) = a {
                    top = top.max(f.abs());
                }
            }
        }
        assert!(top <= 0.3 + 1e-12 && top > 0.299, "{top}");
        // p1: every draw applies both layers.
        assert_eq!(ra.sample(&mut rng).len(), 2);
    }

    #[test]
    fn augmentation_is_deterministic_per_seed() {
        let img = test_image(32, 24);
        let ra = upstream();
        let runs: Vec<RgbImage> = (0..3).map(|_| ra.apply(&img, FILL, &mut Rng(42))).collect();
        assert_eq!(runs[0], runs[1]);
        assert_eq!(runs[1], runs[2]);
        let others: Vec<RgbImage> = (0..8).map(|s| ra.apply(&img, FILL, &mut Rng(s))).collect();
        assert!(others.iter().any(|o| *o != others[0]));
    }

    #[test]
    fn fill_is_the_rounded_imagenet_mean() {
        assert_eq!(fill_from_mean([0.485, 0.456, 0.406]), [124, 116, 104]);
    }
}
