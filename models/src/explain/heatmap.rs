//! A map made visible: min-max normalised (as pytorch-grad-cam's `scale_cam_image`), resized
//! bilinearly with half-pixel centres (as OpenCV's `INTER_LINEAR`), coloured and blended over the
//! image the model saw; and the map itself as a `.npy` array. `mae-run` and `mae-train
//! visualize` draw with these, so a map looks the same from either tool.

use image::{Rgb, RgbImage};

use crate::{Error, Result};

/// Colour maps of `--colormap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Colormap {
    /// Blue, cyan, yellow, red (OpenCV's and matplotlib's `jet`).
    Jet,
    /// Dark blue, green, yellow (matplotlib's `viridis`, from 9 stops).
    Viridis,
    /// Black, purple, orange, pale yellow (matplotlib's `inferno`, from 9 stops).
    Inferno,
    /// Black to white.
    Gray,
}

const VIRIDIS: [[u8; 3]; 9] = [
    [68, 1, 84],
    [71, 44, 122],
    [59, 81, 139],
    [44, 113, 142],
    [33, 144, 141],
    [39, 173, 129],
    [92, 200, 99],
    [170, 220, 50],
    [253, 231, 37],
];

const INFERNO: [[u8; 3]; 9] = [
    [0, 0, 4],
    [31, 12, 72],
    [85, 15, 109],
    [136, 34, 106],
    [186, 54, 85],
    [227, 89, 51],
    [249, 140, 10],
    [249, 201, 50],
    [252, 255, 164],
];

impl Colormap {
    /// The colour of `v` in [0, 1].
    pub fn color(self, v: f32) -> [f32; 3] {
        let v = if v.is_finite() {
            v.clamp(0.0, 1.0)
        } else {
            0.0
        };
        match self {
            Colormap::Gray => [v * 255.0; 3],
            Colormap::Jet => {
                let ch = |x: f32| (1.5 - (4.0 * v - x).abs()).clamp(0.0, 1.0) * 255.0;
                [ch(3.0), ch(2.0), ch(1.0)]
            }
            Colormap::Viridis => stops(&VIRIDIS, v),
            Colormap::Inferno => stops(&INFERNO, v),
        }
    }
}

fn stops(table: &[[u8; 3]], v: f32) -> [f32; 3] {
    let x = v * (table.len() - 1) as f32;
    let i = (x.floor() as usize).min(table.len() - 2);
    let f = x - i as f32;
    let (a, b) = (table[i], table[i + 1]);
    [0, 1, 2].map(|k| a[k] as f32 * (1.0 - f) + b[k] as f32 * f)
}

/// `(x - min) / (max - min + 1e-7)`, pytorch-grad-cam's normalisation (a constant map is 0).
pub fn normalise(map: &[f32]) -> Vec<f32> {
    let min = map.iter().copied().fold(f32::INFINITY, f32::min);
    let shifted: Vec<f32> = map.iter().map(|v| v - min).collect();
    let max = shifted.iter().copied().fold(0.0, f32::max);
    shifted.iter().map(|v| v / (1e-7 + max)).collect()
}

/// Bilinear resize of a `[h, w]` map to `[oh, ow]` with half-pixel centres, clamped at the
/// borders.
pub fn resize(map: &[f32], (h, w): (usize, usize), (oh, ow): (usize, usize)) -> Vec<f32> {
    let taps = |n: usize, on: usize| -> Vec<(usize, usize, f32)> {
        let scale = n as f32 / on as f32;
        (0..on)
            .map(|o| {
                let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                let i = (src.floor() as usize).min(n - 1);
                let j = (i + 1).min(n - 1);
                (i, j, src - i as f32)
            })
            .collect()
    };
    let (rows, cols) = (taps(h, oh), taps(w, ow));
    let mut out = Vec::with_capacity(oh * ow);
    for &(y0, y1, fy) in &rows {
        for &(x0, x1, fx) in &cols {
            let at = |y: usize, x: usize| map[y * w + x];
            let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
            let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

/// How a heatmap is drawn.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    pub colormap: Colormap,
    /// Weight of the heatmap over the image, in [0, 1].
    pub opacity: f32,
    /// Side of the PNG at least this many pixels (the model's input, enlarged by a whole
    /// factor).
    pub min_side: usize,
}

/// The heatmap of `map` (`[h, w]`) over the normalised image `pixels` (`[3, s, s]`, undone with
/// `mean` and `std`), as an RGB image.
pub fn overlay(
    pixels: &[f32],
    s: usize,
    (mean, std): ([f32; 3], [f32; 3]),
    map: &[f32],
    grid: (usize, usize),
    style: &Style,
) -> Result<RgbImage> {
    if pixels.len() != 3 * s * s || map.len() != grid.0 * grid.1 || map.is_empty() {
        return Err(Error::Explain(format!(
            "heatmap: {} pixels for a {s}×{s} image and {} values for a {}×{} map",
            pixels.len(),
            map.len(),
            grid.0,
            grid.1
        )));
    }
    let k = style.min_side.div_ceil(s).max(1);
    let side = s * k;
    let heat = resize(&normalise(map), grid, (side, side));
    let a = style.opacity.clamp(0.0, 1.0);
    let mut img = RgbImage::new(side as u32, side as u32);
    for y in 0..side {
        for x in 0..side {
            let (sy, sx) = (y / k, x / k);
            let c = style.colormap.color(heat[y * side + x]);
            let px = [0, 1, 2].map(|ch| {
                let v = (pixels[ch * s * s + sy * s + sx] * std[ch] + mean[ch]) * 255.0;
                let v = v.clamp(0.0, 255.0) * (1.0 - a) + c[ch] * a;
                v.round().clamp(0.0, 255.0) as u8
            });
            img.put_pixel(x as u32, y as u32, Rgb(px));
        }
    }
    Ok(img)
}

/// PNG bytes of an image.
pub fn png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| Error::Explain(format!("cannot encode the heatmap as PNG: {e}")))?;
    Ok(out.into_inner())
}

/// A float32 `.npy` (format 1.0, C order) of `values` with `shape`.
pub fn npy(shape: &[usize], values: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header + newline, padded to 64 bytes.
    let used = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - used % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * values.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// A file-name stem for an input (`scans/a b.png` → `scans_a_b.png`), at most 120 characters.
pub fn stem(input: &str) -> String {
    let s: String = input
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches(['.', '_']).to_string();
    let n = s.chars().count();
    let s: String = s.chars().skip(n.saturating_sub(120)).collect();
    if s.is_empty() {
        "input".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn normalisation_and_resize_follow_the_references() {
        let n = normalise(&[2.0, 4.0, 6.0]);
        assert!(
            (n[0] - 0.0).abs() < 1e-6 && (n[2] - 1.0).abs() < 1e-6 && (n[1] - 0.5).abs() < 1e-6
        );
        assert_eq!(normalise(&[3.0, 3.0]), vec![0.0, 0.0]);
        // 2 → 4 with half-pixel centres: 0, 0.25, 0.75, 1 of the way (OpenCV's INTER_LINEAR).
        let r = resize(&[0.0, 1.0], (1, 2), (1, 4));
        assert_eq!(r, vec![0.0, 0.25, 0.75, 1.0]);
        let same = resize(&[1.0, 2.0, 3.0, 4.0], (2, 2), (2, 2));
        assert_eq!(same, vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn colours_span_their_maps() {
        assert_eq!(Colormap::Jet.color(0.0), [0.0, 0.0, 127.5]);
        assert_eq!(Colormap::Jet.color(1.0), [127.5, 0.0, 0.0]);
        assert_eq!(Colormap::Gray.color(0.5), [127.5; 3]);
        assert_eq!(Colormap::Viridis.color(1.0), [253.0, 231.0, 37.0]);
        assert_eq!(Colormap::Inferno.color(0.0), [0.0, 0.0, 4.0]);
        assert_eq!(Colormap::Jet.color(f32::NAN), Colormap::Jet.color(0.0));
    }

    #[test]
    fn npy_header_is_what_numpy_writes() {
        let b = npy(&[2, 3], &[0.0; 6]);
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let len = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + len) % 64, 0);
        let header = std::str::from_utf8(&b[10..10 + len]).unwrap();
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
        assert!(header.ends_with('\n'));
        assert_eq!(b.len(), 10 + len + 24);
        assert!(std::str::from_utf8(&npy(&[5], &[0.0; 5])[10..])
            .unwrap_or("")
            .contains("(5,)"));
    }

    #[test]
    fn overlay_blends_and_enlarges() {
        let s = 2;
        let pixels = vec![0.0; 12]; // the mean colour everywhere
        let style = Style {
            colormap: Colormap::Gray,
            opacity: 1.0,
            min_side: 4,
        };
        let mean = [0.5; 3];
        let img = overlay(&pixels, s, (mean, [0.25; 3]), &[0.0, 1.0], (1, 2), &style).unwrap();
        assert_eq!(img.dimensions(), (4, 4));
        assert_eq!(img.get_pixel(0, 0), &Rgb([0, 0, 0]));
        assert_eq!(img.get_pixel(3, 3), &Rgb([255, 255, 255]));
        let clear = Style {
            opacity: 0.0,
            ..style
        };
        let img = overlay(&pixels, s, (mean, [0.25; 3]), &[0.0, 1.0], (1, 2), &clear).unwrap();
        assert_eq!(img.get_pixel(1, 1), &Rgb([128, 128, 128]));
        assert!(overlay(&pixels, 3, (mean, [0.25; 3]), &[0.0], (1, 1), &style).is_err());
        assert_eq!(stem("scans/a b.png"), "scans_a_b.png");
        assert_eq!(stem("/"), "input");
    }
}
