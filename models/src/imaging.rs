//! Evaluation preprocessing of images, shared by `mae-train eval` and `mae-run` so that training
//! and deployment see the same pixels (no train/serve skew).
//!
//! The reference is torchvision's evaluation transform on PIL images, as facebookresearch/mae
//! builds it: `Resize(int(size / crop_pct), interpolation=BICUBIC)`, `CenterCrop(size)`,
//! `ToTensor()`, `Normalize(mean, std)`. The resampler here is a port of Pillow's
//! `ImagingResample` (separable convolution, horizontal pass then vertical pass, the filter
//! stretched by the scale factor when downscaling, i.e. antialiased, 8-bit fixed-point
//! coefficients with 22 fractional bits and rounding to 8 bits between the passes), so on the
//! same decoded pixels it gives the same bytes as Pillow. Decoding is the input layer's
//! ([`crate::input::decode`]), which this module does not need: it starts from 8-bit RGB.

use std::ops::Range;

use image::{Rgb, RgbImage};

use crate::preprocess::{Interpolation, PreprocessSpec};

/// Output size of torchvision's `Resize(size)` with an int: the shorter side becomes `size`,
/// the longer `int(size * long / short)`. Returns `(width, height)`.
pub fn resized_dims(width: u32, height: u32, size: u32) -> (u32, u32) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    if short == 0 {
        return (width, height);
    }
    let new_long = ((size as u64 * long as u64) as f64 / short as f64) as u32;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// Resizes so that the shorter side is `size` (torchvision `Resize(size)`), with Pillow's
/// bicubic filter (a = -0.5, antialiased when downscaling).
pub fn resize_shorter_bicubic(img: &RgbImage, size: u32) -> RgbImage {
    resize_shorter(img, size, Interpolation::Bicubic)
}

/// Resizes so that the shorter side is `size` with the given filter, as Pillow does.
pub fn resize_shorter(img: &RgbImage, size: u32, interpolation: Interpolation) -> RgbImage {
    let (w, h) = resized_dims(img.width(), img.height(), size);
    resize_exact(img, w, h, interpolation)
}

/// Resizes to exactly `width`×`height` as Pillow's `Image.resize` does.
pub fn resize_exact(img: &RgbImage, width: u32, height: u32, filter: Interpolation) -> RgbImage {
    resize_window(img, (width, height), (0..width, 0..height), filter)
}

/// The pixels `cols`×`rows` of `img` resized to `out` = (width, height), computed without
/// making the rest of the resized image; identical to cropping [`resize_exact`]'s result.
/// This keeps the cost of a very elongated input bounded by the window, not the resized image.
fn resize_window(
    img: &RgbImage,
    out: (u32, u32),
    (cols, rows): (Range<u32>, Range<u32>),
    filter: Interpolation,
) -> RgbImage {
    let (ww, wh) = (cols.len() as u32, rows.len() as u32);
    if img.width() == 0 || img.height() == 0 || ww == 0 || wh == 0 {
        return RgbImage::new(ww, wh);
    }
    let kernel = match filter {
        Interpolation::Nearest => return resize_nearest(img, out, cols, rows),
        Interpolation::Bicubic => Kernel::Bicubic,
        Interpolation::Bilinear => Kernel::Bilinear,
    };
    // Pillow skips a pass whose size does not change; so do we (an identity pass would be
    // exact anyway, the kernel being 1 at 0 and 0 at the other integers).
    let horizontal = if out.0 != img.width() {
        Some(precompute_coeffs(
            img.width() as usize,
            out.0 as usize,
            cols.clone(),
            kernel,
        ))
    } else {
        None
    };
    let vertical = if out.1 != img.height() {
        Some(precompute_coeffs(
            img.height() as usize,
            out.1 as usize,
            rows.clone(),
            kernel,
        ))
    } else {
        None
    };
    // Input rows the vertical pass reads (all rows of the window when it is skipped).
    let (y0, y1) = match &vertical {
        Some(c) => c.input_span(),
        None => (rows.start as usize, rows.end as usize),
    };
    // [rows y0..y1, window columns, 3]
    let mid = match &horizontal {
        Some(c) => resample_horizontal(img, y0..y1, c),
        None => copy_block(img, &cols, &(y0 as u32..y1 as u32)).into_raw(),
    };
    let mid_w = ww as usize;
    let data = match &vertical {
        Some(c) => resample_vertical(&mid, mid_w, y0, c),
        None => mid,
    };
    RgbImage::from_raw(ww, wh, data).unwrap_or_else(|| RgbImage::new(ww, wh))
}

fn copy_block(img: &RgbImage, cols: &Range<u32>, rows: &Range<u32>) -> RgbImage {
    RgbImage::from_fn(cols.len() as u32, rows.len() as u32, |x, y| {
        *img.get_pixel(cols.start + x, rows.start + y)
    })
}

/// Pillow's nearest-neighbour resize (`ImagingScaleAffine`): the source coordinate starts at
/// half a step and is advanced by repeated addition, whose float rounding decides some ties, so
/// it is reproduced as is rather than computed as `(x + 0.5) * scale`.
fn resize_nearest(
    img: &RgbImage,
    (width, height): (u32, u32),
    cols: Range<u32>,
    rows: Range<u32>,
) -> RgbImage {
    let table = |in_size: u32, out_size: u32, range: Range<u32>| -> Vec<u32> {
        let step = in_size as f64 / out_size as f64;
        let mut pos = step * 0.5;
        let mut out = Vec::with_capacity(range.len());
        for i in 0..range.end {
            if i >= range.start {
                out.push((pos.max(0.0) as u32).min(in_size - 1));
            }
            pos += step;
        }
        out
    };
    let xs = table(img.width(), width, cols);
    let ys = table(img.height(), height, rows);
    RgbImage::from_fn(xs.len() as u32, ys.len() as u32, |x, y| {
        *img.get_pixel(xs[x as usize], ys[y as usize])
    })
}

#[derive(Debug, Clone, Copy)]
enum Kernel {
    Bicubic,
    Bilinear,
}

impl Kernel {
    fn support(self) -> f64 {
        match self {
            Kernel::Bicubic => 2.0,
            Kernel::Bilinear => 1.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Kernel::Bicubic => {
                // Keys' cubic with a = -0.5, as Pillow's `bicubic_filter`.
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Kernel::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fractional bits of Pillow's 8-bit fixed-point coefficients (`PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel of a window: the first input index, the window length and the
/// fixed-point weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    ksize: usize,
}

impl Coeffs {
    /// The input indices any output of the window reads.
    fn input_span(&self) -> (usize, usize) {
        let lo = self.bounds.iter().map(|&(s, _)| s).min().unwrap_or(0);
        let hi = self.bounds.iter().map(|&(s, n)| s + n).max().unwrap_or(lo);
        (lo, hi.max(lo))
    }
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the outputs `range`
/// of an `in_size` → `out_size` resampling.
fn precompute_coeffs(in_size: usize, out_size: usize, range: Range<u32>, kernel: Kernel) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = kernel.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(range.len());
    let mut weights = vec![0i32; range.len() * ksize];
    let mut k = vec![0f64; ksize];
    for (i, xx) in range.enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's `(int)` truncates toward zero; negative values are clamped to 0 right after.
        let xmin = ((center - support + 0.5) as i64).clamp(0, in_size as i64) as usize;
        let xmax = ((center + support + 0.5) as i64).clamp(0, in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin).min(ksize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = kernel.eval((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[i * ksize..i * ksize + n];
        for (dst, &w) in row.iter_mut().zip(&k[..n]) {
            let w = if ww != 0.0 { w / ww } else { w };
            let fixed = w * (1u64 << PRECISION_BITS) as f64;
            *dst = if w < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs {
        bounds,
        weights,
        ksize,
    }
}

/// Pillow's `clip8`: rounds the fixed-point accumulator (which started at one half) to a byte.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Horizontal pass over the input rows `rows`: `[rows, c.bounds.len(), 3]` bytes.
fn resample_horizontal(img: &RgbImage, rows: Range<usize>, c: &Coeffs) -> Vec<u8> {
    let in_w = img.width() as usize;
    let out_w = c.bounds.len();
    let src = img.as_raw();
    let mut out = vec![0u8; out_w * rows.len() * 3];
    for (oy, y) in rows.enumerate() {
        let row = &src[y * in_w * 3..(y + 1) * in_w * 3];
        for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
            let k = &c.weights[xx * c.ksize..xx * c.ksize + n];
            let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
            for (x, &w) in k.iter().enumerate() {
                let p = &row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                for ch in 0..3 {
                    acc[ch] += p[ch] as i64 * w as i64;
                }
            }
            let o = (oy * out_w + xx) * 3;
            for ch in 0..3 {
                out[o + ch] = clip8(acc[ch]);
            }
        }
    }
    out
}

/// Vertical pass over `src`, `[rows from y0, w, 3]` bytes: `[c.bounds.len(), w, 3]` bytes.
fn resample_vertical(src: &[u8], w: usize, y0: usize, c: &Coeffs) -> Vec<u8> {
    let mut out = vec![0u8; w * c.bounds.len() * 3];
    for (yy, &(ymin, n)) in c.bounds.iter().enumerate() {
        let k = &c.weights[yy * c.ksize..yy * c.ksize + n];
        for x in 0..w {
            let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
            for (y, &wt) in k.iter().enumerate() {
                let o = ((ymin - y0 + y) * w + x) * 3;
                for ch in 0..3 {
                    acc[ch] += src[o + ch] as i64 * wt as i64;
                }
            }
            let o = (yy * w + x) * 3;
            for ch in 0..3 {
                out[o + ch] = clip8(acc[ch]);
            }
        }
    }
    out
}

/// Python's `round` (half to even), which torchvision's `center_crop` uses for the offsets.
fn round_half_even(x: f64) -> i64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 {
        r as i64 - (r as i64).signum()
    } else {
        r as i64
    }
}

/// Where torchvision's `CenterCrop(size)` takes its window from a `w`×`h` image: the columns
/// and rows of the image it keeps, and where they land in the `size`×`size` output (the rest is
/// black padding, added when the image is smaller). Offsets are rounded half to even, as
/// Python's `round` does.
struct CropPlan {
    cols: Range<u32>,
    rows: Range<u32>,
    at: (u32, u32),
}

impl CropPlan {
    fn new(w: u32, h: u32, size: u32) -> Self {
        let (cols, x) = Self::axis(w, size);
        let (rows, y) = Self::axis(h, size);
        Self {
            cols,
            rows,
            at: (x, y),
        }
    }

    fn axis(len: u32, size: u32) -> (Range<u32>, u32) {
        let pad = size.saturating_sub(len) / 2;
        let offset = round_half_even((len.max(size) - size) as f64 / 2.0) as u32;
        // In padded coordinates the window is offset..offset + size; the image pad..pad + len.
        let lo = offset.max(pad);
        let hi = (offset + size).min(pad + len).max(lo);
        (lo - pad..hi - pad, lo - offset)
    }
}

/// torchvision's `CenterCrop(size)`: pads with black when the image is smaller, then takes the
/// central `size`×`size` window.
pub fn center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let plan = CropPlan::new(img.width(), img.height(), size);
    let window = copy_block(img, &plan.cols, &plan.rows);
    place_window(&window, size, plan.at)
}

/// A black `size`×`size` image with `window` pasted at (`x`, `y`).
fn place_window(window: &RgbImage, size: u32, (x, y): (u32, u32)) -> RgbImage {
    RgbImage::from_fn(size, size, |px, py| {
        match (px.checked_sub(x), py.checked_sub(y)) {
            (Some(ix), Some(iy)) if ix < window.width() && iy < window.height() => {
                *window.get_pixel(ix, iy)
            }
            _ => Rgb([0, 0, 0]),
        }
    })
}

/// `ToTensor` then `Normalize(mean, std)`: bytes scaled to [0, 1], then `(x - mean) / std` per
/// channel, in f32 as torch computes them. Layout `[3, h, w]`, row-major.
pub fn to_chw_normalized(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let plane = w * h;
    let mut xs = vec![0f32; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            xs[c * plane + i] = (p.0[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    xs
}

/// The whole evaluation transform: resize the shorter side to `spec.resize_size()` with
/// `spec.interpolation`, center crop `spec.input_size`, normalise. Returns `[3, s, s]`.
pub fn preprocess_eval(img: &RgbImage, spec: &PreprocessSpec) -> Vec<f32> {
    let size = spec.input_size as u32;
    let (rw, rh) = resized_dims(img.width(), img.height(), spec.resize_size() as u32);
    // Only the part of the resized image that the crop keeps is computed.
    let plan = CropPlan::new(rw, rh, size);
    let window = if (rw, rh) == img.dimensions() {
        copy_block(img, &plan.cols, &plan.rows)
    } else {
        resize_window(img, (rw, rh), (plan.cols, plan.rows), spec.interpolation)
    };
    let cropped = place_window(&window, size, plan.at);
    to_chw_normalized(&cropped, spec.mean, spec.std)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn output_sizes_follow_torchvision() {
        assert_eq!(resized_dims(28, 28, 32), (32, 32));
        assert_eq!(resized_dims(640, 480, 256), (341, 256));
        assert_eq!(resized_dims(480, 640, 256), (256, 341));
        assert_eq!(resized_dims(300, 299, 256), (256, 256));
    }

    #[test]
    fn python_round() {
        assert_eq!(round_half_even(0.5), 0);
        assert_eq!(round_half_even(1.5), 2);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(3.0), 3);
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(28, 32), (640, 256), (5, 3), (1, 7), (7, 1)] {
            let c = precompute_coeffs(i, o, 0..o as u32, Kernel::Bicubic);
            for (xx, &(_, n)) in c.bounds.iter().enumerate() {
                let s: i64 = c.weights[xx * c.ksize..xx * c.ksize + n]
                    .iter()
                    .map(|&w| w as i64)
                    .sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= n as i64, "{i}->{o}");
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, Rgb([200, 10, 77]));
        let out = resize_shorter_bicubic(&img, 50);
        assert_eq!(out.dimensions(), (80, 50));
        assert!(out.pixels().all(|p| p.0 == [200, 10, 77]));
    }

    #[test]
    fn crop_pads_small_images() {
        let img = RgbImage::from_pixel(2, 3, Rgb([9, 9, 9]));
        let out = center_crop(&img, 4);
        assert_eq!(out.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(out.get_pixel(1, 0).0, [9, 9, 9]);
        assert_eq!(out.get_pixel(3, 3).0, [0, 0, 0]);
    }

    #[test]
    fn degenerate_sizes_do_not_panic() {
        let img = RgbImage::new(0, 0);
        let spec = PreprocessSpec::imagenet(4);
        assert_eq!(preprocess_eval(&img, &spec).len(), 48);
        let img = RgbImage::new(1, 1000);
        assert_eq!(preprocess_eval(&img, &spec).len(), 48);
    }
}
