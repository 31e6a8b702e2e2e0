//! DICOM images to 8-bit RGB, before the shared preprocessing.
//!
//! Grayscale (`MONOCHROME2`, and `MONOCHROME1`, which is inverted): stored values go through the
//! modality LUT (Rescale Slope/Intercept), then the first VOI window (Window Center/Width, the
//! linear function of PS3.3 C.11.2.1.2) when the file has one, else a min-max stretch, to 0..255,
//! replicated to three channels. Colour (`RGB`, `YBR_FULL`, 8-bit, either planar
//! configuration) is taken as is, converted from YCbCr when needed. The first frame of a
//! multi-frame file is used. Compressed transfer syntaxes are decoded by dicom-rs' pure-Rust
//! codecs (JPEG baseline/lossless, RLE, deflate).

use std::io::Cursor;
use std::path::Path;

use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::OpenFileOptions;
use dicom_pixeldata::{ConvertOptions, PixelDecoder, PlanarConfiguration};
use image::RgbImage;

use crate::error::{Error, Result};

/// Whether `bytes` look like a DICOM file (the `DICM` magic after the 128-byte preamble).
pub fn is_dicom(bytes: &[u8]) -> bool {
    bytes.get(128..132) == Some(b"DICM")
}

/// Decodes a DICOM file's first frame as RGB; `name` names the source in errors, which read
/// `NAME: cannot read DICOM image: REASON`.
pub fn decode(bytes: &[u8], name: &Path) -> Result<RgbImage> {
    // dicom-rs decoders are not meant to panic on damaged files; should one, it is a damaged
    // file to the caller.
    std::panic::catch_unwind(|| decode_inner(bytes))
        .unwrap_or_else(|_| Err("the DICOM decoder failed on this file".into()))
        .map_err(|reason| Error::format(name, format!("cannot read DICOM image: {reason}")))
}

/// [`decode`] without its guard against a panicking decoder, so that fuzzing sees one.
#[doc(hidden)]
pub fn decode_unguarded(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    decode_inner(bytes)
}

fn decode_inner(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let body = if is_dicom(bytes) {
        &bytes[128..]
    } else {
        bytes
    };
    if body.get(..4) != Some(b"DICM") {
        return Err("not a DICOM file (no DICM magic)".into());
    }
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .from_reader(Cursor::new(&body[4..]))
        .or_else(|_| {
            OpenFileOptions::new()
                .read_preamble(ReadPreamble::Never)
                .from_reader(Cursor::new(body))
        })
        .map_err(|e| e.to_string())?;
    if obj.element_opt(tags::PIXEL_DATA).ok().flatten().is_none() {
        return Err("the file has no pixel data".into());
    }
    let pixels = obj
        .decode_pixel_data_frame(0)
        .map_err(|e| format!("cannot decode the pixel data: {e}"))?;
    let (w, h) = (pixels.columns(), pixels.rows());
    if w == 0 || h == 0 {
        return Err(format!("image size {w}×{h}"));
    }
    let n = w as usize * h as usize;
    let spp = pixels.samples_per_pixel();
    let photometric = pixels.photometric_interpretation().as_str().to_string();
    match spp {
        1 => {
            // Modality LUT only: VOI is applied below, the same way for every file.
            let values: Vec<f64> = pixels
                .to_vec_frame_with_options(0, &ConvertOptions::new())
                .map_err(|e| format!("cannot convert the pixel values: {e}"))?;
            if values.len() < n {
                return Err(format!("{} pixel values for a {w}×{h} image", values.len()));
            }
            let window = pixels
                .window()
                .ok()
                .flatten()
                .and_then(|w| w.first().copied())
                .filter(|w| w.width >= 1.0 && w.center.is_finite() && w.width.is_finite());
            let mut gray = match window {
                Some(win) => apply_window(&values[..n], win.center, win.width),
                None => min_max(&values[..n]),
            };
            match photometric.as_str() {
                "MONOCHROME1" => gray.iter_mut().for_each(|v| *v = 255 - *v),
                "MONOCHROME2" => {}
                other => {
                    return Err(format!(
                        "photometric interpretation {other} with 1 sample per pixel"
                    ))
                }
            }
            let rgb: Vec<u8> = gray.iter().flat_map(|&v| [v, v, v]).collect();
            RgbImage::from_raw(w, h, rgb).ok_or_else(|| "bad image size".into())
        }
        3 => {
            if pixels.bits_allocated() != 8 {
                return Err(format!(
                    "{}-bit colour images are not supported (8-bit only)",
                    pixels.bits_allocated()
                ));
            }
            let data = pixels.data();
            if data.len() < 3 * n {
                return Err(format!(
                    "{} bytes of pixel data for a {w}×{h} RGB image",
                    data.len()
                ));
            }
            let data = &data[..3 * n];
            let mut rgb: Vec<u8> = match pixels.planar_configuration() {
                PlanarConfiguration::Standard => data.to_vec(),
                PlanarConfiguration::PixelFirst => (0..n)
                    .flat_map(|i| [data[i], data[n + i], data[2 * n + i]])
                    .collect(),
            };
            match photometric.as_str() {
                "RGB" => {}
                "YBR_FULL" | "YBR_FULL_422" => ybr_to_rgb(&mut rgb),
                other => {
                    return Err(format!(
                        "photometric interpretation {other} is not supported"
                    ))
                }
            }
            RgbImage::from_raw(w, h, rgb).ok_or_else(|| "bad image size".into())
        }
        other => Err(format!("{other} samples per pixel are not supported")),
    }
}

/// The DICOM linear VOI function (PS3.3 C.11.2.1.2.1) to 0..255.
fn apply_window(values: &[f64], center: f64, width: f64) -> Vec<u8> {
    let (c, w) = (center - 0.5, width - 1.0);
    values
        .iter()
        .map(|&x| {
            if x <= c - w / 2.0 {
                0
            } else if x > c + w / 2.0 || w <= 0.0 {
                255
            } else {
                (((x - c) / w + 0.5) * 255.0).round().clamp(0.0, 255.0) as u8
            }
        })
        .collect()
}

/// Linear stretch of the value range to 0..255 (a constant image becomes black).
fn min_max(values: &[f64]) -> Vec<u8> {
    let (lo, hi) = values
        .iter()
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    if hi <= lo {
        return vec![0; values.len()];
    }
    values
        .iter()
        .map(|&v| ((v - lo) / (hi - lo) * 255.0).round().clamp(0.0, 255.0) as u8)
        .collect()
}

/// Full-range YCbCr (ITU-R BT.601, as DICOM's YBR_FULL) to RGB, in place.
fn ybr_to_rgb(px: &mut [u8]) {
    for p in px.chunks_exact_mut(3) {
        let (y, cb, cr) = (p[0] as f64, p[1] as f64 - 128.0, p[2] as f64 - 128.0);
        let r = y + 1.402 * cr;
        let g = y - 0.344136 * cb - 0.714136 * cr;
        let b = y + 1.772 * cb;
        p[0] = r.round().clamp(0.0, 255.0) as u8;
        p[1] = g.round().clamp(0.0, 255.0) as u8;
        p[2] = b.round().clamp(0.0, 255.0) as u8;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn window_follows_the_standard() {
        // Center 40, width 400: -160.5 and below → 0, 239.5 and above → 255.
        let v = apply_window(&[-1000.0, -160.0, 40.0, 239.0, 240.0, 3000.0], 40.0, 400.0);
        assert_eq!(v[0], 0);
        assert_eq!(v[5], 255);
        assert_eq!(v[4], 255);
        assert!((127..=128).contains(&v[2]), "{v:?}");
        assert!(v[1] <= 1 && v[3] >= 254, "{v:?}");
    }

    #[test]
    fn min_max_stretches() {
        assert_eq!(min_max(&[10.0, 20.0, 15.0]), vec![0, 255, 128]);
        assert_eq!(min_max(&[5.0, 5.0]), vec![0, 0]);
    }

    #[test]
    fn garbage_is_an_error_naming_the_file_once() {
        assert!(decode(b"nope", Path::new("x.dcm")).is_err());
        let mut fake = vec![0u8; 200];
        fake[128..132].copy_from_slice(b"DICM");
        let err = decode(&fake, Path::new("x.dcm")).unwrap_err().to_string();
        assert!(err.starts_with("x.dcm: cannot read DICOM image: "), "{err}");
        assert_eq!(err.matches("x.dcm").count(), 1, "{err}");
    }
}
