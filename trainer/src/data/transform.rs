//! Image transforms. Evaluation uses the shared implementation of `mae_models::imaging`
//! (the same as `mae-run`); training adds upstream's RandomResizedCrop, horizontal flip and, for
//! fine-tuning, RandAugment (timm's order: crop, flip, RandAugment, normalise).

use image::imageops;
use image::RgbImage;
use mae_models::imaging;
use mae_models::preprocess::{Interpolation, PreprocessSpec};

use super::randaug::{fill_from_mean, RandAugment};
use crate::rng::Rng;

/// Training augmentation settings.
#[derive(Debug, Clone)]
pub struct TrainAug {
    /// Area fraction range of RandomResizedCrop (upstream: 0.08–1 fine-tuning, 0.2–1 pretraining).
    pub scale: (f64, f64),
    pub hflip: bool,
    /// RandAugment policy applied after the flip (upstream fine-tuning: `rand-m9-mstd0.5-inc1`).
    pub randaug: Option<RandAugment>,
}

/// The crop box (x, y, w, h) of torchvision's `RandomResizedCrop.get_params`.
pub fn rrc_box(w: u32, h: u32, scale: (f64, f64), rng: &mut Rng) -> (u32, u32, u32, u32) {
    let area = (w * h) as f64;
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.uniform(scale.0, scale.1);
        let aspect = rng.uniform(lo, hi).exp();
        let cw = (target * aspect).sqrt().round() as u32;
        let ch = (target / aspect).sqrt().round() as u32;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            let x = rng.below((w - cw + 1) as usize) as u32;
            let y = rng.below((h - ch + 1) as usize) as u32;
            return (x, y, cw, ch);
        }
    }
    // Fallback: the largest central crop within the ratio bounds.
    let ratio = w as f64 / h as f64;
    let (cw, ch) = if ratio < 3.0 / 4.0 {
        (w, (w as f64 / (3.0 / 4.0)).round() as u32)
    } else if ratio > 4.0 / 3.0 {
        ((h as f64 * (4.0 / 3.0)).round() as u32, h)
    } else {
        (w, h)
    };
    let (cw, ch) = (cw.min(w), ch.min(h));
    ((w - cw) / 2, (h - ch) / 2, cw, ch)
}

/// Training transform: random resized crop to `spec.input_size` (bicubic), optional flip,
/// optional RandAugment (filling with the normalisation mean, as timm), normalisation; returns
/// `[3, s, s]` values.
pub fn train_transform(
    img: &RgbImage,
    spec: &PreprocessSpec,
    aug: &TrainAug,
    rng: &mut Rng,
) -> Vec<f32> {
    let (x, y, w, h) = rrc_box(img.width(), img.height(), aug.scale, rng);
    let crop = imageops::crop_imm(img, x, y, w, h).to_image();
    let s = spec.input_size as u32;
    let mut out = imaging::resize_exact(&crop, s, s, Interpolation::Bicubic);
    if aug.hflip && rng.unit() < 0.5 {
        imageops::flip_horizontal_in_place(&mut out);
    }
    if let Some(ra) = &aug.randaug {
        out = ra.apply(&out, fill_from_mean(spec.mean), rng);
    }
    imaging::to_chw_normalized(&out, spec.mean, spec.std)
}

/// Evaluation transform, shared with `mae-run`.
pub fn eval_transform(img: &RgbImage, spec: &PreprocessSpec) -> Vec<f32> {
    imaging::preprocess_eval(img, spec)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn rrc_boxes_stay_inside_and_respect_scale() {
        let mut rng = Rng(3);
        for _ in 0..1000 {
            let (x, y, w, h) = rrc_box(64, 48, (0.08, 1.0), &mut rng);
            assert!(x + w <= 64 && y + h <= 48 && w > 0 && h > 0);
            let frac = (w * h) as f64 / (64.0 * 48.0);
            assert!(frac <= 1.0 + 1e-9, "{frac}");
        }
        // Scale (1, 1) on a square image is the whole image.
        assert_eq!(rrc_box(32, 32, (1.0, 1.0), &mut rng), (0, 0, 32, 32));
    }

    #[test]
    fn train_transform_has_model_input_shape() {
        let img = RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let spec = PreprocessSpec::imagenet(16);
        let mut aug = TrainAug {
            scale: (0.08, 1.0),
            hflip: true,
            randaug: None,
        };
        let v = train_transform(&img, &spec, &aug, &mut Rng(1));
        assert_eq!(v.len(), 3 * 16 * 16);
        assert!(v.iter().all(|x| x.is_finite()));
        // RandAugment changes some samples (a quarter get no op) and stays seeded.
        aug.randaug = Some("rand-m9-mstd0.5-inc1".parse().unwrap());
        let plain: Vec<Vec<f32>> = (0..8)
            .map(|s| {
                train_transform(
                    &img,
                    &spec,
                    &TrainAug {
                        randaug: None,
                        ..aug.clone()
                    },
                    &mut Rng(s),
                )
            })
            .collect();
        let augmented: Vec<Vec<f32>> = (0..8)
            .map(|s| train_transform(&img, &spec, &aug, &mut Rng(s)))
            .collect();
        assert!(plain.iter().zip(&augmented).any(|(p, a)| p != a));
        assert_eq!(
            augmented[3],
            train_transform(&img, &spec, &aug, &mut Rng(3))
        );
        assert!(augmented.iter().all(|v| v.len() == 3 * 16 * 16));
    }
}
