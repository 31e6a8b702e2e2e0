//! The evaluation preprocessing spec: what turns a decoded image into a model input.
//!
//! As upstream evaluates: resize the shorter side to `input_size / crop_pct` (bicubic), center
//! crop `input_size`, scale to [0, 1], normalise with `mean` and `std` per channel.

use serde::{Deserialize, Serialize};

/// ImageNet mean, used by facebookresearch/mae for every data set.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet standard deviation.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// Upstream's evaluation crop fraction (224 / 256).
pub const DEFAULT_CROP_PCT: f32 = 0.875;

/// Resampling filter of the resize step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Bicubic,
    Bilinear,
    Nearest,
}

impl Interpolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Interpolation::Bicubic => "bicubic",
            Interpolation::Bilinear => "bilinear",
            Interpolation::Nearest => "nearest",
        }
    }
}

/// Everything needed to preprocess an image identically in training and deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessSpec {
    pub input_size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub crop_pct: f32,
    pub interpolation: Interpolation,
}

impl PreprocessSpec {
    /// Upstream's evaluation transform at `input_size`.
    pub fn imagenet(input_size: usize) -> Self {
        Self {
            input_size,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            crop_pct: DEFAULT_CROP_PCT,
            interpolation: Interpolation::Bicubic,
        }
    }

    /// The size the shorter side is resized to before the center crop, `int(size / crop_pct)`
    /// as upstream computes it.
    pub fn resize_size(&self) -> usize {
        (self.input_size as f64 / self.crop_pct as f64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_matches_upstream() {
        assert_eq!(PreprocessSpec::imagenet(224).resize_size(), 256);
        assert_eq!(PreprocessSpec::imagenet(28).resize_size(), 32);
    }
}
