//! The image operations of RandAugment on 8-bit RGB images, with the semantics of the PIL calls
//! that timm's `auto_augment.py` makes: lookup-table point ops (`ImageOps`), blends against a
//! degenerate image (`ImageEnhance`) and bicubic affine warps (`Image.transform`,
//! `Image.rotate`). Rounding follows PIL (truncation after float arithmetic of the same
//! precision) so that the outputs agree with PIL to the grey level; `tests/randaug.rs` checks it.

use image::{Rgb, RgbImage};

/// One lookup table per channel.
type Lut = [[u8; 256]; 3];

fn lut_from(f: impl Fn(u8) -> u8) -> Lut {
    let mut t = [0u8; 256];
    for (i, v) in t.iter_mut().enumerate() {
        *v = f(i as u8);
    }
    [t; 3]
}

fn identity_table() -> [u8; 256] {
    let mut t = [0u8; 256];
    for (i, v) in t.iter_mut().enumerate() {
        *v = i as u8;
    }
    t
}

fn apply_lut(img: &RgbImage, lut: &Lut) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        for (c, v) in p.0.iter_mut().enumerate() {
            *v = lut[c][*v as usize];
        }
    }
    out
}

/// Per-channel histograms, as `Image.histogram()` of an RGB image.
fn histograms(img: &RgbImage) -> [[u64; 256]; 3] {
    let mut h = [[0u64; 256]; 3];
    for p in img.pixels() {
        for c in 0..3 {
            h[c][p.0[c] as usize] += 1;
        }
    }
    h
}

/// `ImageOps.autocontrast(img)`: each channel stretched so its darkest value maps to 0 and its
/// lightest to 255 (no cutoff).
pub fn auto_contrast(img: &RgbImage) -> RgbImage {
    let hist = histograms(img);
    let mut lut = [[0u8; 256]; 3];
    for (table, h) in lut.iter_mut().zip(&hist) {
        let lo = h.iter().position(|&n| n > 0).unwrap_or(0);
        let hi = h.iter().rposition(|&n| n > 0).unwrap_or(0);
        if hi <= lo {
            *table = identity_table();
            continue;
        }
        let scale = 255.0 / (hi - lo) as f64;
        let offset = -(lo as f64) * scale;
        for (i, v) in table.iter_mut().enumerate() {
            // Python's int() truncates towards zero before the clamp.
            *v = ((i as f64 * scale + offset) as i64).clamp(0, 255) as u8;
        }
    }
    apply_lut(img, &lut)
}

/// `ImageOps.equalize(img)`: per-channel histogram equalisation.
pub fn equalize(img: &RgbImage) -> RgbImage {
    let hist = histograms(img);
    let mut lut = [[0u8; 256]; 3];
    for (table, h) in lut.iter_mut().zip(&hist) {
        let used: Vec<u64> = h.iter().copied().filter(|&n| n > 0).collect();
        let step = match used.last() {
            Some(last) if used.len() > 1 => (used.iter().sum::<u64>() - last) / 255,
            _ => 0,
        };
        if step == 0 {
            *table = identity_table();
            continue;
        }
        let mut n = step / 2;
        for (v, &count) in table.iter_mut().zip(h) {
            // PIL clips lookup values to 8 bits when it applies the table.
            *v = (n / step).min(255) as u8;
            n += count;
        }
    }
    apply_lut(img, &lut)
}

/// `ImageOps.invert(img)`.
pub fn invert(img: &RgbImage) -> RgbImage {
    apply_lut(img, &lut_from(|v| 255 - v))
}

/// timm's `posterize`: keeps the `bits` most significant bits (0–8) of every channel. Zero bits
/// (`PosterizeIncreasing` at magnitude 10) give black, as older Pillow did; Pillow 13 rejects 0.
pub fn posterize(img: &RgbImage, bits: u32) -> RgbImage {
    if bits >= 8 {
        return img.clone();
    }
    let mask = !((1u32 << (8 - bits)) - 1) as u8;
    apply_lut(img, &lut_from(|v| v & mask))
}

/// `ImageOps.solarize(img, thresh)`: inverts every value at or above `thresh` (0–256).
pub fn solarize(img: &RgbImage, thresh: u32) -> RgbImage {
    apply_lut(
        img,
        &lut_from(|v| if u32::from(v) < thresh { v } else { 255 - v }),
    )
}

/// timm's `solarize_add`: adds `add` (saturating) to every value below `thresh`.
pub fn solarize_add(img: &RgbImage, add: u32, thresh: u32) -> RgbImage {
    apply_lut(
        img,
        &lut_from(|v| {
            if u32::from(v) < thresh {
                (u32::from(v) + add).min(255) as u8
            } else {
                v
            }
        }),
    )
}

/// The luma of `Image.convert("L")`: ITU-R 601-2 weights in 16-bit fixed point, rounded.
fn luma(p: &Rgb<u8>) -> u8 {
    let [r, g, b] = p.0.map(u32::from);
    ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
}

/// `Image.blend(degenerate, img, factor)`: `degenerate + factor · (img − degenerate)` in single
/// precision, clipped to [0, 255] and truncated, as PIL computes it.
fn blend(img: &RgbImage, factor: f64, degenerate: impl Fn(u32, u32, usize) -> u8) -> RgbImage {
    let alpha = factor as f32;
    let mut out = img.clone();
    for (x, y, p) in out.enumerate_pixels_mut() {
        for (c, v) in p.0.iter_mut().enumerate() {
            let d = degenerate(x, y, c);
            let t = f32::from(d) + alpha * (i32::from(*v) - i32::from(d)) as f32;
            *v = if t <= 0.0 {
                0
            } else if t >= 255.0 {
                255
            } else {
                t as u8
            };
        }
    }
    out
}

/// `ImageEnhance.Color(img).enhance(factor)`: blends with the greyscale image.
pub fn color(img: &RgbImage, factor: f64) -> RgbImage {
    blend(img, factor, |x, y, _| luma(img.get_pixel(x, y)))
}

/// `ImageEnhance.Contrast(img).enhance(factor)`: blends with the mean grey level.
pub fn contrast(img: &RgbImage, factor: f64) -> RgbImage {
    let sum: u64 = img.pixels().map(|p| u64::from(luma(p))).sum();
    let n = (u64::from(img.width()) * u64::from(img.height())).max(1);
    let mean = (sum as f64 / n as f64 + 0.5) as u8;
    blend(img, factor, |_, _, _| mean)
}

/// `ImageEnhance.Brightness(img).enhance(factor)`: blends with black.
pub fn brightness(img: &RgbImage, factor: f64) -> RgbImage {
    blend(img, factor, |_, _, _| 0)
}

/// `ImageEnhance.Sharpness(img).enhance(factor)`: blends with `ImageFilter.SMOOTH`.
pub fn sharpness(img: &RgbImage, factor: f64) -> RgbImage {
    let smooth = smooth(img);
    blend(img, factor, |x, y, c| smooth.get_pixel(x, y).0[c])
}

/// `img.filter(ImageFilter.SMOOTH)`: the 3×3 kernel [1 1 1; 1 5 1; 1 1 1] / 13 in single
/// precision with rounding; PIL leaves the one-pixel border unfiltered.
fn smooth(img: &RgbImage) -> RgbImage {
    let (w, h) = img.dimensions();
    let mut out = img.clone();
    if w < 3 || h < 3 {
        return out;
    }
    let side = (1.0f64 / 13.0) as f32;
    let centre = (5.0f64 / 13.0) as f32;
    let at = |x: u32, y: u32, c: usize| f32::from(img.get_pixel(x, y).0[c]);
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let mut px = [0u8; 3];
            for (c, v) in px.iter_mut().enumerate() {
                // Rows in PIL's order (below, centre, above), each a left-to-right sum.
                let row = |yy: u32, k: f32| {
                    at(x - 1, yy, c) * side + at(x, yy, c) * k + at(x + 1, yy, c) * side
                };
                let mut ss = 0.5f32;
                ss += row(y + 1, side);
                ss += row(y, centre);
                ss += row(y - 1, side);
                *v = ss.clamp(0.0, 255.0) as u8;
            }
            out.put_pixel(x, y, Rgb(px));
        }
    }
    out
}

/// One step of PIL's cubic convolution (the a = −1 kernel of `Geometry.c`), in its operation
/// order so that rounding matches.
fn cubic(v1: f64, v2: f64, v3: f64, v4: f64, d: f64) -> f64 {
    let p1 = v2;
    let p2 = -v1 + v3;
    let p3 = 2.0 * (v1 - v2) + v3 - v4;
    let p4 = -v1 + v2 - v3 + v4;
    p1 + d * (p2 + d * (p3 + d * p4))
}

/// PIL's bicubic sample at continuous input coordinates (pixel centres at +0.5): `None` outside
/// the image, otherwise the 4×4 neighbourhood with clamped edges, clipped and truncated.
fn bicubic_sample(img: &RgbImage, xin: f64, yin: f64) -> Option<Rgb<u8>> {
    let (w, h) = img.dimensions();
    if !(xin >= 0.0 && xin < f64::from(w) && yin >= 0.0 && yin < f64::from(h)) {
        return None;
    }
    let (xs, ys) = (xin - 0.5, yin - 0.5);
    let (fx, fy) = (xs.floor(), ys.floor());
    let (dx, dy) = (xs - fx, ys - fy);
    let clip = |v: f64, n: u32| (v.max(0.0) as u32).min(n - 1);
    let cols = [-1.0, 0.0, 1.0, 2.0].map(|k| clip(fx + k, w));
    let rows = [-1.0, 0.0, 1.0, 2.0].map(|k| clip(fy + k, h));
    let mut px = [0u8; 3];
    for (c, out) in px.iter_mut().enumerate() {
        let line = |y: u32| {
            let v = cols.map(|x| f64::from(img.get_pixel(x, y).0[c]));
            cubic(v[0], v[1], v[2], v[3], dx)
        };
        let v = cubic(
            line(rows[0]),
            line(rows[1]),
            line(rows[2]),
            line(rows[3]),
            dy,
        );
        *out = if v <= 0.0 {
            0
        } else if v >= 255.0 {
            255
        } else {
            v as u8
        };
    }
    Some(Rgb(px))
}

/// `img.transform(img.size, Image.AFFINE, m, resample=BICUBIC, fillcolor=fill)`: output pixel
/// (x, y) takes the input at (m0·x′ + m1·y′ + m2, m3·x′ + m4·y′ + m5), x′ = x + ½, y′ = y + ½;
/// samples outside the input take `fill`.
pub fn affine(img: &RgbImage, m: [f64; 6], fill: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    let mut out = RgbImage::from_pixel(w, h, Rgb(fill));
    for (x, y, p) in out.enumerate_pixels_mut() {
        let (xo, yo) = (f64::from(x) + 0.5, f64::from(y) + 0.5);
        let xin = m[0] * xo + m[1] * yo + m[2];
        let yin = m[3] * xo + m[4] * yo + m[5];
        if let Some(v) = bicubic_sample(img, xin, yin) {
            *p = v;
        }
    }
    out
}

/// Python's `round(v, 15)`, which PIL applies to the rotation matrix.
fn round15(v: f64) -> f64 {
    (v * 1e15).round() / 1e15
}

/// `img.rotate(degrees, resample=BICUBIC, fillcolor=fill)`: counter-clockwise about the image
/// centre, same size. Multiples of 90° land on pixel centres, where the bicubic sample is exact,
/// so PIL's transpose shortcuts need no special case.
pub fn rotate(img: &RgbImage, degrees: f64, fill: [u8; 3]) -> RgbImage {
    let angle = degrees.rem_euclid(360.0);
    if angle == 0.0 {
        return img.clone();
    }
    let t = -angle.to_radians();
    let (cos, sin) = (round15(t.cos()), round15(t.sin()));
    let (cx, cy) = (f64::from(img.width()) / 2.0, f64::from(img.height()) / 2.0);
    let mut m = [cos, sin, 0.0, -sin, cos, 0.0];
    m[2] = m[0] * -cx + m[1] * -cy + cx;
    m[5] = m[3] * -cx + m[4] * -cy + cy;
    affine(img, m, fill)
}

/// timm's `shear_x`: x_in = x + factor · y.
pub fn shear_x(img: &RgbImage, factor: f64, fill: [u8; 3]) -> RgbImage {
    affine(img, [1.0, factor, 0.0, 0.0, 1.0, 0.0], fill)
}

/// timm's `shear_y`: y_in = factor · x + y.
pub fn shear_y(img: &RgbImage, factor: f64, fill: [u8; 3]) -> RgbImage {
    affine(img, [1.0, 0.0, 0.0, factor, 1.0, 0.0], fill)
}

/// timm's `translate_x_rel`: samples `pct` of the width to the right (the content moves left
/// for positive `pct`).
pub fn translate_x_rel(img: &RgbImage, pct: f64, fill: [u8; 3]) -> RgbImage {
    let pixels = pct * f64::from(img.width());
    affine(img, [1.0, 0.0, pixels, 0.0, 1.0, 0.0], fill)
}

/// timm's `translate_y_rel`: as [`translate_x_rel`] along the height.
pub fn translate_y_rel(img: &RgbImage, pct: f64, fill: [u8; 3]) -> RgbImage {
    let pixels = pct * f64::from(img.height());
    affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, pixels], fill)
}
