//! DICOM images to 8-bit RGB, before the shared preprocessing.
//!
//! Grayscale (`MONOCHROME2`, and `MONOCHROME1`, which is inverted): stored values go through the
//! modality LUT (Rescale Slope/Intercept), then the first VOI window (Window Center/Width, the
//! linear function of PS3.3 C.11.2.1.2) when the file has one, else a min-max stretch, to 0..255,
//! replicated to three channels. Colour (`RGB`, `YBR_FULL`, 8-bit, either planar
//! configuration) is taken as is, converted from YCbCr when needed. The first frame of a
//! multi-frame file is used. Compressed transfer syntaxes are decoded by dicom-rs' pure-Rust
//! codecs (JPEG baseline/extended/lossless, RLE, deflate, and JPEG 2000 through OpenJPEG's Rust
//! port, whose decoder undoes the YBR_RCT/YBR_ICT colour transforms).

use std::io::Cursor;
use std::path::Path;

use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::OpenFileOptions;
use dicom_pixeldata::{
    ConvertOptions, ModalityLutOption, PixelDecoder, PlanarConfiguration, VoiLutFunction,
};
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
    // 8-bit JPEG (baseline, extended) through the same decoder as JPEG files, which follows
    // libjpeg's, as the readers clinics compare against do.
    if let Some(img) = jpeg_frame(&obj, w, h, spp) {
        if spp == 3 {
            return Ok(img.to_rgb8());
        }
        let rescale = pixels
            .rescale()
            .ok()
            .and_then(|r| r.first().copied())
            .unwrap_or(dicom_pixeldata::Rescale {
                slope: 1.0,
                intercept: 0.0,
            });
        let values: Vec<f64> = img
            .to_luma8()
            .as_raw()
            .iter()
            .map(|&v| f64::from(v) * rescale.slope + rescale.intercept)
            .collect();
        return grey_to_rgb(&pixels, &values, w, h, &photometric);
    }
    match spp {
        1 if photometric == "PALETTE COLOR" => {
            let index: Vec<f64> = pixels
                .to_vec_frame_with_options(
                    0,
                    &ConvertOptions::new().with_modality_lut(ModalityLutOption::None),
                )
                .map_err(|e| format!("cannot convert the pixel values: {e}"))?;
            if index.len() < n {
                return Err(format!("{} pixel values for a {w}×{h} image", index.len()));
            }
            let luts = [
                (
                    tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
                    tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
                ),
                (
                    tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
                    tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
                ),
                (
                    tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
                    tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
                ),
            ]
            .map(|(d, v)| palette_lut(&obj, d, v));
            let [r, g, b] = luts;
            let (r, g, b) = (r?, g?, b?);
            let rgb: Vec<u8> = index[..n]
                .iter()
                .flat_map(|&i| [r.get(i), g.get(i), b.get(i)])
                .collect();
            RgbImage::from_raw(w, h, rgb).ok_or_else(|| "bad image size".into())
        }
        1 => {
            // Modality LUT only: VOI is applied below, the same way for every file.
            let values: Vec<f64> = pixels
                .to_vec_frame_with_options(0, &ConvertOptions::new())
                .map_err(|e| format!("cannot convert the pixel values: {e}"))?;
            if values.len() < n {
                return Err(format!("{} pixel values for a {w}×{h} image", values.len()));
            }
            grey_to_rgb(&pixels, &values[..n], w, h, &photometric)
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
                // JPEG 2000's decoder undoes its reversible and irreversible colour transforms.
                "RGB" | "YBR_RCT" | "YBR_ICT" => {}
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

/// Grey values after the modality LUT → the first VOI window (as pydicom's `apply_voi_lut`),
/// with its VOI LUT function, or a min-max stretch without one → RGB.
fn grey_to_rgb(
    pixels: &dicom_pixeldata::DecodedPixelData<'_>,
    values: &[f64],
    w: u32,
    h: u32,
    photometric: &str,
) -> std::result::Result<RgbImage, String> {
    let window = pixels
        .window()
        .ok()
        .flatten()
        .and_then(|w| w.first().copied())
        .filter(|w| w.width > 0.0 && w.center.is_finite() && w.width.is_finite());
    let function = pixels
        .voi_lut_function()
        .ok()
        .flatten()
        .and_then(|f| f.first().copied())
        .unwrap_or_default();
    let mut gray = match window {
        Some(win) => voi(values, win.center, win.width, function),
        None => min_max(values),
    };
    match photometric {
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

/// The first frame of an 8-bit JPEG baseline or extended file, decoded by the `image` crate;
/// `None` for other syntaxes and for what that decoder does not take (12-bit, a frame split
/// over fragments of a multi-frame file), which dicom-rs' own codec then reads.
fn jpeg_frame(
    obj: &dicom_object::DefaultDicomObject,
    w: u32,
    h: u32,
    spp: u16,
) -> Option<image::DynamicImage> {
    let syntax = obj.meta().transfer_syntax().trim_end_matches('\0');
    if syntax != "1.2.840.10008.1.2.4.50" && syntax != "1.2.840.10008.1.2.4.51" {
        return None;
    }
    let pixel_data = obj.element(tags::PIXEL_DATA).ok()?;
    let fragments = pixel_data.value().fragments()?;
    let frames = obj
        .element(tags::NUMBER_OF_FRAMES)
        .ok()
        .and_then(|e| e.to_int::<u32>().ok())
        .unwrap_or(1);
    let bytes: Vec<u8> = if frames <= 1 {
        fragments.iter().flatten().copied().collect()
    } else if fragments.len() == frames as usize {
        fragments.first()?.clone()
    } else {
        return None;
    };
    let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg).ok()?;
    let channels = img.color().channel_count();
    (img.width() == w && img.height() == h && u16::from(channels) == spp).then_some(img)
}

/// One channel of a PALETTE COLOR lookup table (PS3.3 C.7.6.3.1.5-6), as 8-bit values.
struct PaletteLut {
    first: f64,
    entries: Vec<u8>,
}

impl PaletteLut {
    /// The entry of stored value `v`: values below the first mapped one take the first entry,
    /// values past the end the last (as pydicom's `apply_color_lut`).
    fn get(&self, v: f64) -> u8 {
        let i = (v - self.first).max(0.0) as usize;
        self.entries
            .get(i.min(self.entries.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    }
}

fn palette_lut(
    obj: &dicom_object::DefaultDicomObject,
    descriptor: dicom_object::Tag,
    data: dicom_object::Tag,
) -> std::result::Result<PaletteLut, String> {
    let desc: Vec<i64> = obj
        .element(descriptor)
        .map_err(|_| format!("PALETTE COLOR without the lookup table descriptor {descriptor}"))?
        .to_multi_int()
        .map_err(|e| format!("lookup table descriptor {descriptor}: {e}"))?;
    let [count, first, bits] = desc[..] else {
        return Err(format!(
            "lookup table descriptor {descriptor} has {} values, not 3",
            desc.len()
        ));
    };
    // A count of 0 means 65536 entries; the first mapped value may be written as unsigned.
    let count = if count == 0 { 65536 } else { count as usize };
    let words: Vec<u16> = obj
        .element(data)
        .map_err(|_| format!("PALETTE COLOR without the lookup table data {data}"))?
        .to_multi_int()
        .map_err(|e| format!("lookup table data {data}: {e}"))?;
    let entries: Vec<u8> = match bits {
        // 8-bit entries packed two to a word, or one per word.
        8 if words.len() * 2 == count => words.iter().flat_map(|w| w.to_le_bytes()).collect(),
        8 => words.iter().map(|&w| (w & 0xff) as u8).collect(),
        16 => words.iter().map(|&w| (w >> 8) as u8).collect(),
        other => return Err(format!("lookup table of {other}-bit entries")),
    };
    if entries.len() < count {
        return Err(format!(
            "lookup table data {data} holds {} entries, the descriptor says {count}",
            entries.len()
        ));
    }
    Ok(PaletteLut {
        first: first as f64,
        entries: entries[..count].to_vec(),
    })
}

/// A VOI LUT function (PS3.3 C.11.2.1.2 and C.11.2.1.3) of window `center`/`width` to 0..255.
fn voi(values: &[f64], center: f64, width: f64, function: VoiLutFunction) -> Vec<u8> {
    match function {
        VoiLutFunction::Linear if width >= 1.0 => apply_window(values, center, width),
        // LINEAR needs a width of at least 1; a narrower one is read as LINEAR_EXACT.
        VoiLutFunction::Linear | VoiLutFunction::LinearExact => values
            .iter()
            .map(|&x| {
                if x <= center - width / 2.0 {
                    0
                } else if x > center + width / 2.0 {
                    255
                } else {
                    (((x - center) / width + 0.5) * 255.0)
                        .round()
                        .clamp(0.0, 255.0) as u8
                }
            })
            .collect(),
        VoiLutFunction::Sigmoid => values
            .iter()
            .map(|&x| {
                let y = 255.0 / (1.0 + (-4.0 * (x - center) / width).exp());
                y.round().clamp(0.0, 255.0) as u8
            })
            .collect(),
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
    fn voi_lut_functions_follow_the_standard() {
        // LINEAR_EXACT: center 100, width 50 → 75 and below 0, above 125 255, 100 half-way.
        let v = voi(
            &[75.0, 100.0, 125.0, 126.0],
            100.0,
            50.0,
            VoiLutFunction::LinearExact,
        );
        assert_eq!(v, vec![0, 128, 255, 255]);
        // SIGMOID: 255 / (1 + exp(-4 (x - c) / w)): half at the center, symmetric around it.
        let s = voi(&[100.0, 125.0, 75.0], 100.0, 50.0, VoiLutFunction::Sigmoid);
        let y = |x: f64| (255.0 / (1.0 + (-4.0 * (x - 100.0) / 50.0f64).exp())).round() as u8;
        assert_eq!(s, vec![y(100.0), y(125.0), y(75.0)]);
        assert_eq!(u16::from(s[1]) + u16::from(s[2]), 255);
        // LINEAR with a width under 1 is taken as LINEAR_EXACT rather than dividing by zero.
        assert_eq!(
            voi(&[0.0, 2.0], 1.0, 0.5, VoiLutFunction::Linear),
            vec![0, 255]
        );
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
