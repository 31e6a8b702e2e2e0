//! DICOM images to 8-bit RGB, before the shared preprocessing.
//!
//! Grayscale (`MONOCHROME2`, and `MONOCHROME1`, which is inverted): stored values go through the
//! modality LUT (Rescale Slope/Intercept), then the first VOI window (Window Center/Width, with
//! the VOI LUT function of PS3.3 C.11.2.1.2-3) when the file has one, else a min-max stretch,
//! to 0..255, replicated to three channels. Colour (`RGB`, `YBR_FULL`, `YBR_FULL_422`,
//! `YBR_RCT`/`YBR_ICT`, `PALETTE COLOR`, either planar configuration) becomes RGB.
//!
//! Frames count from 0, as pydicom's `index`; a multi-frame file is read at its first frame
//! unless a frame is asked for ([`decode_frame`]). Compressed transfer syntaxes are decoded by
//! dicom-rs' codecs (JPEG baseline/lossless, RLE, deflate, JPEG 2000 through OpenJPEG's Rust
//! port, whose decoder undoes the YBR_RCT/YBR_ICT colour transforms, and JPEG-LS through
//! CharLS), 8-bit JPEG by the `image` crate, 12-bit JPEG (extended, process 4) by libjpeg-turbo
//! (`jpeg12.rs`), 32-bit RLE here.
//!
//! Before parsing, every declared element length is checked against the file's size
//! (`dicom_lengths`), so a small file cannot make the parser reserve gigabytes.
//!
//! A data set written in implicit VR under a meta group that declares an explicit VR
//! transfer syntax (pydicom's `SC_rgb_jpeg.dcm`) is read as implicit VR, with a warning, as
//! pydicom reads it; its pixel data are still decoded by the declared transfer syntax.

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
    decode_frame(bytes, name, 0)
}

/// Decodes frame `frame` (counted from 0, as pydicom's `index`) of a DICOM file as RGB.
pub fn decode_frame(bytes: &[u8], name: &Path, frame: u32) -> Result<RgbImage> {
    // dicom-rs decoders are not meant to panic on damaged files; should one, it is a damaged
    // file to the caller.
    std::panic::catch_unwind(|| decode_inner(bytes, frame, name))
        .unwrap_or_else(|_| Err("the DICOM decoder failed on this file".into()))
        .map_err(|reason| Error::format(name, format!("cannot read DICOM image: {reason}")))
}

/// The number of frames of a DICOM file (Number of Frames, 1 when absent), read from its
/// header without decoding the pixel data.
pub fn frame_count(bytes: &[u8], name: &Path) -> Result<u32> {
    read_header(bytes, name).map(|obj| frames_of(&obj))
}

/// A DICOM file's meta group and data set up to its pixel data, read as [`decode`] reads
/// them (declared lengths checked, a data set in the wrong VR taken as it is written): for
/// reading its attributes.
pub fn read_header(bytes: &[u8], name: &Path) -> Result<dicom_object::DefaultDicomObject> {
    std::panic::catch_unwind(|| open(bytes, None))
        .unwrap_or_else(|_| Err("the DICOM parser failed on this file".into()))
        .map_err(|reason| Error::format(name, format!("cannot read DICOM file: {reason}")))
}

/// [`decode`] without its guard against a panicking decoder, so that fuzzing sees one.
#[doc(hidden)]
pub fn decode_unguarded(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    decode_inner(bytes, 0, Path::new("input"))
}

fn frames_of(obj: &dicom_object::DefaultDicomObject) -> u32 {
    obj.element(tags::NUMBER_OF_FRAMES)
        .ok()
        .and_then(|e| e.to_int::<u32>().ok())
        .unwrap_or(1)
        .max(1)
}

/// The parsed file after the length check: up to its pixel data without `name`; whole with
/// it, and `name` in the warning about a data set in the wrong VR.
fn open(
    bytes: &[u8],
    name: Option<&Path>,
) -> std::result::Result<dicom_object::DefaultDicomObject, String> {
    let header_only = name.is_none();
    let body = if is_dicom(bytes) {
        &bytes[128..]
    } else {
        bytes
    };
    if body.get(..4) != Some(b"DICM") {
        return Err("not a DICOM file (no DICM magic)".into());
    }
    super::dicom_lengths::check(body)?;
    if let Some((ts, at)) = super::dicom_lengths::implicit_despite_meta(body) {
        if let Some(name) = name {
            tracing::warn!(
                "{}: the file meta information declares transfer syntax {ts} (explicit VR), \
                 but the data set is written in implicit VR; reading it as implicit VR",
                name.display()
            );
        }
        return open_implicit(body, at);
    }
    let options = || {
        let o = OpenFileOptions::new().read_preamble(ReadPreamble::Never);
        if header_only {
            o.read_until(tags::PIXEL_DATA)
        } else {
            o
        }
    };
    options()
        .from_reader(Cursor::new(&body[4..]))
        .or_else(|_| options().from_reader(Cursor::new(body)))
        .map_err(|e| e.to_string())
}

/// The meta group as written and the data set from `at` read as implicit VR little endian.
fn open_implicit(
    body: &[u8],
    at: usize,
) -> std::result::Result<dicom_object::DefaultDicomObject, String> {
    let meta = dicom_object::FileMetaTable::from_reader(Cursor::new(body))
        .map_err(|e| format!("cannot read the file meta information: {e}"))?;
    let implicit = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let data = body.get(at..).unwrap_or_default();
    let obj = dicom_object::InMemDicomObject::read_dataset_with_ts(Cursor::new(data), &implicit)
        .map_err(|e| format!("cannot read the data set as implicit VR: {e}"))?;
    Ok(obj.with_exact_meta(meta))
}

fn decode_inner(bytes: &[u8], frame: u32, name: &Path) -> std::result::Result<RgbImage, String> {
    let obj = open(bytes, Some(name))?;
    if obj.element_opt(tags::PIXEL_DATA).ok().flatten().is_none() {
        return Err("the file has no pixel data".into());
    }
    let int = |tag| obj.element(tag).ok().and_then(|e| e.to_int::<u32>().ok());
    if let (Some(rows), Some(columns)) = (int(tags::ROWS), int(tags::COLUMNS)) {
        super::image::check_size(columns, rows)?;
    }
    let frames = frames_of(&obj);
    if frame >= frames {
        return Err(format!(
            "no frame {frame} in a file of {frames} frame{} (frames count from 0)",
            if frames == 1 { "" } else { "s" }
        ));
    }
    if let Some(img) = native_ybr_422(&obj, frame)? {
        return Ok(img);
    }
    if let Some(img) = rle_32(&obj, frame)? {
        return Ok(img);
    }
    if jpeg_precision(&obj, frame) == Some(12) {
        return jpeg_12(&obj, frame);
    }
    let pixels = obj
        .decode_pixel_data_frame(frame)
        .map_err(|e| format!("cannot decode the pixel data: {e}"))?;
    // Native big-endian 32-bit data reaches us in the file's word order.
    let big_endian = obj.meta().transfer_syntax().trim_end_matches('\0') == "1.2.840.10008.1.2.2";
    let (w, h) = (pixels.columns(), pixels.rows());
    if w == 0 || h == 0 {
        return Err(format!("image size {w}×{h}"));
    }
    // dicom-rs builds its lookup tables from Bits Stored, and asserts it is 1 to 32.
    let (allocated, stored) = (pixels.bits_allocated(), pixels.bits_stored());
    if stored == 0 || stored > allocated.max(1) || allocated > 32 {
        return Err(format!(
            "Bits Stored {stored} with Bits Allocated {allocated} (Bits Stored must be 1 to \
             Bits Allocated, at most 32)"
        ));
    }
    let n = w as usize * h as usize;
    let spp = pixels.samples_per_pixel();
    let photometric = pixels.photometric_interpretation().as_str().to_string();
    // 8-bit JPEG (baseline, extended) through the same decoder as JPEG files, which follows
    // libjpeg's, as the readers clinics compare against do.
    // The photometric interpretation the file states (dicom-rs reports RGB for the YCbCr JPEG
    // it converted).
    let stated = stated_photometric(&obj).unwrap_or_else(|| photometric.clone());
    if let Some(bytes) = jpeg_bytes(&obj, frame).filter(|_| stated == "RGB" && spp == 3) {
        // An RGB-labelled JPEG holds RGB components, whatever its markers leave open (as
        // pydicom reads it): decoded without a colour transform.
        if let Some(img) = jpeg_rgb_components(&bytes, w, h) {
            return Ok(img);
        }
    }
    if let Some(img) = jpeg_frame(&obj, frame, w, h, spp).filter(|_| stated != "RGB") {
        if spp == 3 {
            return Ok(img.to_rgb8());
        }
        let rescale = first_rescale(&pixels);
        let modality_lut = sequence_lut(&obj, tags::MODALITY_LUT_SEQUENCE)?;
        let values: Vec<f64> = img
            .to_luma8()
            .as_raw()
            .iter()
            .map(|&v| match &modality_lut {
                Some(lut) => lut.get(f64::from(v)),
                None => f64::from(v) * rescale.slope + rescale.intercept,
            })
            .collect();
        return grey_to_rgb(&obj, &values, w, h, &photometric);
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
            let modality_lut = sequence_lut(&obj, tags::MODALITY_LUT_SEQUENCE)?;
            let values: Vec<f64> = match (pixels.bits_allocated(), &modality_lut) {
                (1 | 32, _) => unpacked_grey(&pixels, n, big_endian)?,
                (_, Some(lut)) => pixels
                    .to_vec_frame_with_options::<f64>(
                        0,
                        &ConvertOptions::new().with_modality_lut(ModalityLutOption::None),
                    )
                    .map_err(|e| format!("cannot convert the pixel values: {e}"))?
                    .into_iter()
                    .map(|v| lut.get(v))
                    .collect(),
                (_, None) => pixels
                    .to_vec_frame_with_options(0, &ConvertOptions::new())
                    .map_err(|e| format!("cannot convert the pixel values: {e}"))?,
            };
            if values.len() < n {
                return Err(format!("{} pixel values for a {w}×{h} image", values.len()));
            }
            grey_to_rgb(&obj, &values[..n], w, h, &photometric)
        }
        3 => {
            // Colour of more than 8 bits keeps the top 8 of its stored bits.
            let wide: Vec<u8>;
            let data = match pixels.bits_allocated() {
                8 => pixels.data(),
                16 => {
                    let shift = pixels.bits_stored().saturating_sub(8).min(8);
                    wide = pixels
                        .data()
                        .chunks_exact(2)
                        .map(|b| (u16::from_ne_bytes([b[0], b[1]]) >> shift) as u8)
                        .collect();
                    &wide
                }
                other => {
                    return Err(format!(
                        "{other}-bit colour images are not supported (8 or 16 bits)"
                    ))
                }
            };
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

/// Stored values of 1-bit (packed, first pixel in the lowest bit) and 32-bit frames, through
/// the Rescale Slope/Intercept, which dicom-rs does not convert itself.
fn unpacked_grey(
    pixels: &dicom_pixeldata::DecodedPixelData<'_>,
    n: usize,
    big_endian: bool,
) -> std::result::Result<Vec<f64>, String> {
    let data = pixels.data();
    let raw: Vec<f64> = match pixels.bits_allocated() {
        // dicom-rs hands a 1-bit frame over one value a byte, or still packed.
        1 if data.len() >= n => data[..n].iter().map(|&v| f64::from(v & 1)).collect(),
        1 => {
            if data.len() * 8 < n {
                return Err(format!(
                    "{} bytes of 1-bit pixel data for {n} pixels",
                    data.len()
                ));
            }
            (0..n)
                .map(|i| f64::from((data[i / 8] >> (i % 8)) & 1))
                .collect()
        }
        _ => {
            if data.len() < 4 * n {
                return Err(format!(
                    "{} bytes of 32-bit pixel data for {n} pixels",
                    data.len()
                ));
            }
            let signed = matches!(
                pixels.pixel_representation(),
                dicom_pixeldata::PixelRepresentation::Signed
            );
            data.chunks_exact(4)
                .take(n)
                .map(|b| {
                    // Big-endian OW data arrives as 16-bit words already swapped to little
                    // endian, the high word first.
                    let b = if big_endian {
                        [b[2], b[3], b[0], b[1]]
                    } else {
                        [b[0], b[1], b[2], b[3]]
                    };
                    if signed {
                        f64::from(i32::from_le_bytes(b))
                    } else {
                        f64::from(u32::from_le_bytes(b))
                    }
                })
                .collect()
        }
    };
    let r = first_rescale(pixels);
    Ok(raw.iter().map(|&v| v * r.slope + r.intercept).collect())
}

/// The frame's Rescale Slope and Intercept (identity when absent).
fn first_rescale(pixels: &dicom_pixeldata::DecodedPixelData<'_>) -> dicom_pixeldata::Rescale {
    pixels
        .rescale()
        .ok()
        .and_then(|r| r.first().copied())
        .unwrap_or(dicom_pixeldata::Rescale {
            slope: 1.0,
            intercept: 0.0,
        })
}

/// A frame of an RLE Lossless file of 32-bit samples (PS3.5 G), which dicom-rs does not
/// decode: grey through the rescale and VOI, colour by the top 8 of the stored bits. `None`
/// for any other file.
fn rle_32(
    obj: &dicom_object::DefaultDicomObject,
    frame: u32,
) -> std::result::Result<Option<RgbImage>, String> {
    let int = |tag| obj.element(tag).ok().and_then(|e| e.to_int::<i64>().ok());
    let syntax = obj.meta().transfer_syntax().trim_end_matches('\0');
    if syntax != "1.2.840.10008.1.2.5" || int(tags::BITS_ALLOCATED) != Some(32) {
        return Ok(None);
    }
    let (Some(w), Some(h)) = (int(tags::COLUMNS), int(tags::ROWS)) else {
        return Err("no Rows or Columns".into());
    };
    let (w, h) = (
        u32::try_from(w).map_err(|_| "bad Columns")?,
        u32::try_from(h).map_err(|_| "bad Rows")?,
    );
    let spp = int(tags::SAMPLES_PER_PIXEL).unwrap_or(1).clamp(1, 3) as usize;
    let n = w as usize * h as usize;
    // RLE Lossless encodes each frame in one fragment (PS3.5 G.1).
    let frame = obj
        .element(tags::PIXEL_DATA)
        .ok()
        .and_then(|e| {
            e.value()
                .fragments()
                .and_then(|f| f.get(frame as usize).cloned())
        })
        .ok_or(format!(
            "RLE pixel data without a fragment for frame {frame}"
        ))?;
    let header = |k: usize| -> Option<usize> {
        let b = frame.get(4 * k..4 * k + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let segments = header(0).ok_or("RLE frame shorter than its header")?;
    if segments != 4 * spp {
        return Err(format!(
            "RLE frame of {segments} segments for {spp} 32-bit samples"
        ));
    }
    let mut values = vec![0u32; n * spp];
    for seg in 0..segments {
        let start = header(1 + seg).ok_or("RLE header")?;
        let end = if seg + 1 < segments {
            header(2 + seg).ok_or("RLE header")?
        } else {
            frame.len()
        };
        let data = frame
            .get(start..end.min(frame.len()))
            .ok_or("RLE segment out of the frame")?;
        let bytes = unpack_bits(data, n)?;
        let (sample, k) = (seg / 4, seg % 4);
        for (i, b) in bytes.iter().enumerate() {
            values[i * spp + sample] |= u32::from(*b) << (8 * (3 - k));
        }
    }
    if spp == 3 {
        let shift = int(tags::BITS_STORED).unwrap_or(32).clamp(8, 32) as u32 - 8;
        let px: Vec<u8> = values.iter().map(|&v| (v >> shift) as u8).collect();
        return Ok(RgbImage::from_raw(w, h, px));
    }
    let signed = int(tags::PIXEL_REPRESENTATION) == Some(1);
    let (slope, intercept) = rescale_of(obj);
    let grey: Vec<f64> = values
        .iter()
        .map(|&v| if signed { f64::from(v as i32) } else { f64::from(v) } * slope + intercept)
        .collect();
    let photometric = stated_photometric(obj).unwrap_or_default();
    grey_to_rgb(obj, &grey, w, h, &photometric).map(Some)
}

/// A frame of a 12-bit JPEG Extended (process 4) file, decoded by libjpeg-turbo
/// ([`super::jpeg12`]): grey samples through the modality LUT (or Rescale Slope/Intercept)
/// and the VOI as every grey file; colour keeps the top 8 of its 12 bits.
fn jpeg_12(
    obj: &dicom_object::DefaultDicomObject,
    frame: u32,
) -> std::result::Result<RgbImage, String> {
    let int = |tag| obj.element(tag).ok().and_then(|e| e.to_int::<i64>().ok());
    let bytes = jpeg_bytes(obj, frame).ok_or(
        "a 12-bit JPEG frame split over several fragments of a multi-frame file is not supported",
    )?;
    let spp = int(tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    let f = super::jpeg12::decode(&bytes, spp == 1)?;
    let (w, h) = (f.width, f.height);
    if (int(tags::COLUMNS), int(tags::ROWS)) != (Some(i64::from(w)), Some(i64::from(h))) {
        return Err(format!(
            "the 12-bit JPEG stream is {w}×{h}, the file's Columns × Rows {:?}×{:?}",
            int(tags::COLUMNS),
            int(tags::ROWS)
        ));
    }
    if f.components == 3 {
        let px: Vec<u8> = f.samples.iter().map(|&v| (v >> 4) as u8).collect();
        return RgbImage::from_raw(w, h, px).ok_or_else(|| "bad image size".into());
    }
    let signed = int(tags::PIXEL_REPRESENTATION) == Some(1);
    let stored = int(tags::BITS_STORED).unwrap_or(12).clamp(1, 12) as u32;
    let modality_lut = sequence_lut(obj, tags::MODALITY_LUT_SEQUENCE)?;
    let (slope, intercept) = rescale_of(obj);
    let values: Vec<f64> = f
        .samples
        .iter()
        .map(|&v| {
            let v = i64::from(v) & ((1 << stored) - 1);
            let v = if signed && v >= 1 << (stored - 1) {
                v - (1 << stored)
            } else {
                v
            } as f64;
            match &modality_lut {
                Some(lut) => lut.get(v),
                None => v * slope + intercept,
            }
        })
        .collect();
    let photometric = stated_photometric(obj).unwrap_or_default();
    grey_to_rgb(obj, &values, w, h, &photometric)
}

/// The Photometric Interpretation the file states, trimmed.
fn stated_photometric(obj: &dicom_object::DefaultDicomObject) -> Option<String> {
    obj.element(tags::PHOTOMETRIC_INTERPRETATION)
        .ok()
        .and_then(|e| e.to_str().ok().map(|s| s.trim().to_string()))
}

/// Rescale Slope and Intercept, 1 and 0 where the file has none, for the decoders here that
/// dicom-rs does not convert for.
fn rescale_of(obj: &dicom_object::DefaultDicomObject) -> (f64, f64) {
    let float = |tag| obj.element(tag).ok().and_then(|e| e.to_float64().ok());
    (
        float(tags::RESCALE_SLOPE).unwrap_or(1.0),
        float(tags::RESCALE_INTERCEPT).unwrap_or(0.0),
    )
}

/// One RLE segment (PackBits) into `n` bytes.
fn unpack_bits(data: &[u8], n: usize) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(n);
    let mut i = 0;
    while out.len() < n && i < data.len() {
        let c = data[i] as i8;
        i += 1;
        if c >= 0 {
            let len = c as usize + 1;
            let run = data
                .get(i..i + len)
                .ok_or("RLE literal run past the segment")?;
            out.extend_from_slice(run);
            i += len;
        } else if c != -128 {
            let b = *data.get(i).ok_or("RLE replicate run past the segment")?;
            out.extend(std::iter::repeat_n(b, (1 - i32::from(c)) as usize));
            i += 1;
        }
    }
    if out.len() < n {
        return Err(format!("RLE segment holds {} of {n} bytes", out.len()));
    }
    out.truncate(n);
    Ok(out)
}

/// An uncompressed YBR_FULL_422 frame (each pair of pixels stored as Y₁ Y₂ Cb Cr), which
/// dicom-rs sizes as three samples a pixel; `None` for any other file.
fn native_ybr_422(
    obj: &dicom_object::DefaultDicomObject,
    frame: u32,
) -> std::result::Result<Option<RgbImage>, String> {
    let text = |tag| {
        obj.element(tag)
            .ok()
            .and_then(|e| e.to_str().ok().map(|s| s.trim().to_string()))
    };
    let int = |tag| obj.element(tag).ok().and_then(|e| e.to_int::<u32>().ok());
    if text(tags::PHOTOMETRIC_INTERPRETATION).as_deref() != Some("YBR_FULL_422") {
        return Ok(None);
    }
    let syntax = obj.meta().transfer_syntax().trim_end_matches('\0');
    let native = matches!(
        syntax,
        "1.2.840.10008.1.2"
            | "1.2.840.10008.1.2.1"
            | "1.2.840.10008.1.2.2"
            | "1.2.840.10008.1.2.1.99"
    );
    if !native || int(tags::BITS_ALLOCATED) != Some(8) {
        return Ok(None);
    }
    let (Some(w), Some(h)) = (int(tags::COLUMNS), int(tags::ROWS)) else {
        return Err("no Rows or Columns".into());
    };
    let n = w as usize * h as usize;
    let bytes = obj
        .element(tags::PIXEL_DATA)
        .map_err(|_| "the file has no pixel data".to_string())?
        .to_bytes()
        .map_err(|e| format!("pixel data: {e}"))?;
    let start = 2 * n * frame as usize;
    if w % 2 != 0 || bytes.len() < start + 2 * n {
        return Err(format!(
            "{} bytes of YBR_FULL_422 pixel data for frame {frame} of a {w}×{h} image",
            bytes.len()
        ));
    }
    let mut px = Vec::with_capacity(3 * n);
    for q in bytes[start..start + 2 * n].chunks_exact(4) {
        px.extend_from_slice(&[q[0], q[2], q[3], q[1], q[2], q[3]]);
    }
    ybr_to_rgb(&mut px);
    Ok(RgbImage::from_raw(w, h, px))
}

/// Grey values after the modality LUT → the first VOI window (as pydicom's `apply_voi_lut`),
/// with its VOI LUT function, or a min-max stretch without one → RGB.
fn grey_to_rgb(
    obj: &dicom_object::DefaultDicomObject,
    values: &[f64],
    w: u32,
    h: u32,
    photometric: &str,
) -> std::result::Result<RgbImage, String> {
    let numbers = |tag| -> Vec<f64> {
        obj.element(tag)
            .ok()
            .and_then(|e| e.to_multi_float64().ok())
            .unwrap_or_default()
    };
    let (centers, widths) = (numbers(tags::WINDOW_CENTER), numbers(tags::WINDOW_WIDTH));
    let window = centers
        .first()
        .zip(widths.first())
        .filter(|(c, w)| **w > 0.0 && c.is_finite() && w.is_finite());
    let function = obj
        .element(tags::VOILUT_FUNCTION)
        .ok()
        .and_then(|e| e.to_str().ok().map(|s| s.trim().to_string()))
        .map_or(VoiLutFunction::Linear, |f| match f.split('\\').next() {
            Some("LINEAR_EXACT") => VoiLutFunction::LinearExact,
            Some("SIGMOID") => VoiLutFunction::Sigmoid,
            _ => VoiLutFunction::Linear,
        });
    // A VOI LUT Sequence comes before a window, as in pydicom's `apply_voi_lut`.
    let mut gray = match (sequence_lut(obj, tags::VOILUT_SEQUENCE)?, window) {
        (Some(lut), _) => {
            let top = f64::from((1u32 << lut.bits.clamp(1, 16)) - 1);
            values
                .iter()
                .map(|&v| (lut.get(v) / top * 255.0).round().clamp(0.0, 255.0) as u8)
                .collect()
        }
        (None, Some((&c, &w))) => voi(values, c, w, function),
        (None, None) => min_max(values),
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

/// A frame of an 8-bit JPEG baseline or extended file, decoded by the `image` crate; `None`
/// for other syntaxes and for what that decoder does not take (12-bit, a frame split over
/// fragments of a multi-frame file), which dicom-rs' own codec then reads.
fn jpeg_frame(
    obj: &dicom_object::DefaultDicomObject,
    frame: u32,
    w: u32,
    h: u32,
    spp: u16,
) -> Option<image::DynamicImage> {
    let bytes = jpeg_bytes(obj, frame)?;
    let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg).ok()?;
    let channels = img.color().channel_count();
    (img.width() == w && img.height() == h && u16::from(channels) == spp).then_some(img)
}

/// A three-component JPEG's samples as they are stored (no YCbCr conversion): `None` unless
/// it decodes to `w`×`h`×3.
fn jpeg_rgb_components(bytes: &[u8], w: u32, h: u32) -> Option<RgbImage> {
    use zune_core::bytestream::ZCursor;
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::DecoderOptions;
    use zune_jpeg::JpegDecoder;
    // Markers that already say RGB (Adobe transform 0, components named R, G, B) decode as
    // RGB; any other stream is asked for its stored components, which are the RGB ones.
    let says_rgb =
        adobe_transform(bytes) == Some(0) || component_ids(bytes) == Some([b'R', b'G', b'B']);
    let out = if says_rgb {
        ColorSpace::RGB
    } else {
        ColorSpace::YCbCr
    };
    let options = DecoderOptions::default().jpeg_set_out_colorspace(out);
    let mut d = JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    let px = d.decode().ok()?;
    let (dw, dh) = d.dimensions()?;
    ((dw as u32, dh as u32) == (w, h) && px.len() == 3 * w as usize * h as usize)
        .then(|| RgbImage::from_raw(w, h, px))
        .flatten()
}

/// The segments of a JPEG stream before its first scan: (marker, payload).
fn jpeg_segments(b: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut i = 2;
    std::iter::from_fn(move || {
        if i + 4 > b.len() || b[i] != 0xFF || b[i + 1] == 0xDA {
            return None;
        }
        let marker = b[i + 1];
        let len = usize::from(u16::from_be_bytes([b[i + 2], b[i + 3]]));
        let payload = b.get(i + 4..(i + 2 + len).min(b.len()))?;
        i += 2 + len.max(2);
        Some((marker, payload))
    })
}

/// The transform flag of an Adobe APP14 segment (0: none, 1: YCbCr), if the stream has one.
fn adobe_transform(b: &[u8]) -> Option<u8> {
    jpeg_segments(b)
        .find(|(m, p)| *m == 0xEE && p.starts_with(b"Adobe"))
        .and_then(|(_, p)| p.get(11).copied())
}

/// The sample precision of a JPEG baseline or extended frame, from its SOF segment.
fn jpeg_precision(obj: &dicom_object::DefaultDicomObject, frame: u32) -> Option<u8> {
    let bytes = jpeg_bytes(obj, frame)?;
    let (_, p) = jpeg_segments(&bytes).find(|(m, _)| matches!(m, 0xC0..=0xC3))?;
    p.first().copied()
}

/// The identifiers of a three-component frame.
fn component_ids(b: &[u8]) -> Option<[u8; 3]> {
    let (_, p) = jpeg_segments(b)
        .find(|(m, _)| matches!(m, 0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF))?;
    if p.get(5) != Some(&3) {
        return None;
    }
    Some([*p.get(6)?, *p.get(9)?, *p.get(12)?])
}

/// A frame's JPEG stream of a JPEG baseline or extended file.
fn jpeg_bytes(obj: &dicom_object::DefaultDicomObject, frame: u32) -> Option<Vec<u8>> {
    let syntax = obj.meta().transfer_syntax().trim_end_matches('\0');
    if syntax != "1.2.840.10008.1.2.4.50" && syntax != "1.2.840.10008.1.2.4.51" {
        return None;
    }
    let pixel_data = obj.element(tags::PIXEL_DATA).ok()?;
    let fragments = pixel_data.value().fragments()?;
    let frames = frames_of(obj);
    let bytes = if frames <= 1 {
        fragments.iter().flatten().copied().collect()
    } else if fragments.len() == frames as usize {
        fragments.get(frame as usize)?.clone()
    } else {
        return None;
    };
    Some(without_short_adobe(bytes))
}

/// The stream without an Adobe APP14 segment too short to hold its colour transform (as in
/// pydicom's `SC_rgb_jpeg.dcm`): libjpeg, and so pydicom, ignore such a segment, while
/// zune-jpeg refuses the stream for it.
fn without_short_adobe(bytes: Vec<u8>) -> Vec<u8> {
    let mut i = 2;
    while i + 4 <= bytes.len() && bytes[i] == 0xFF && bytes[i + 1] != 0xDA {
        let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
        let payload = bytes.get(i + 4..i + 2 + len.max(2)).unwrap_or_default();
        if bytes[i + 1] == 0xEE && payload.starts_with(b"Adobe") && payload.len() < 12 {
            let mut out = bytes[..i].to_vec();
            out.extend_from_slice(bytes.get(i + 2 + len..).unwrap_or_default());
            return out;
        }
        i += 2 + len.max(2);
    }
    bytes
}

/// The LUT of the first item of a Modality LUT Sequence or VOI LUT Sequence (PS3.3 C.11.1,
/// C.11.2): `None` when the file has no such sequence.
struct SequenceLut {
    first: f64,
    entries: Vec<f64>,
    bits: u32,
}

impl SequenceLut {
    /// The entry of value `v`: values below the first mapped one take the first entry, values
    /// past the end the last (as pydicom's `apply_modality_lut` and `apply_voi`).
    fn get(&self, v: f64) -> f64 {
        let i = if v < self.first {
            0
        } else {
            (v - self.first) as usize
        };
        self.entries[i.min(self.entries.len() - 1)]
    }
}

fn sequence_lut(
    obj: &dicom_object::InMemDicomObject,
    sequence: dicom_object::Tag,
) -> std::result::Result<Option<SequenceLut>, String> {
    let Some(item) = obj
        .element_opt(sequence)
        .ok()
        .flatten()
        .and_then(|e| e.items().and_then(|items| items.first()))
    else {
        return Ok(None);
    };
    let what = format!("the LUT Descriptor of {sequence}");
    let (count, first, bits) = lut_descriptor(item, tags::LUT_DESCRIPTOR, &what)?;
    let words: Vec<i64> = item
        .element(tags::LUT_DATA)
        .map_err(|_| format!("LUT sequence {sequence} without LUT Data"))?
        .to_multi_int()
        .map_err(|e| format!("LUT Data of {sequence}: {e}"))?;
    let entries: Vec<f64> = if bits == 8 && words.len() * 2 == count {
        // 8-bit entries packed two to a word.
        words
            .iter()
            .flat_map(|&w| (w as u16).to_le_bytes())
            .map(f64::from)
            .collect()
    } else {
        words.iter().map(|&w| w as f64).collect()
    };
    if entries.len() < count || count == 0 {
        return Err(format!(
            "LUT Data of {sequence} holds {} entries, its descriptor says {count}",
            entries.len()
        ));
    }
    Ok(Some(SequenceLut {
        first: first as f64,
        entries: entries[..count].to_vec(),
        bits: bits.clamp(1, 16) as u32,
    }))
}

/// A LUT descriptor (PS3.3 C.11.1.1.1): entries (0 means 65536), first mapped value, bits.
fn lut_descriptor(
    obj: &dicom_object::InMemDicomObject,
    tag: dicom_object::Tag,
    what: &str,
) -> std::result::Result<(usize, i64, i64), String> {
    let desc: Vec<i64> = obj
        .element(tag)
        .map_err(|_| format!("{what} is missing"))?
        .to_multi_int()
        .map_err(|e| format!("{what}: {e}"))?;
    let [count, first, bits] = desc[..] else {
        return Err(format!("{what} has {} values, not 3", desc.len()));
    };
    let count = if count == 0 { 65536 } else { count as usize };
    Ok((count, first, bits))
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
    let what = format!("the PALETTE COLOR lookup table descriptor {descriptor}");
    let (count, first, bits) = lut_descriptor(obj, descriptor, &what)?;
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

    /// A 2×2 MONOCHROME2 image written in implicit VR under a meta group that declares
    /// `ts`.
    fn implicit_file(ts: &str) -> Vec<u8> {
        let meta = dicom_object::FileMetaTableBuilder::new()
            .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.7")
            .media_storage_sop_instance_uid("1.2.3.4")
            .transfer_syntax(ts)
            .build()
            .unwrap();
        let mut out = vec![0u8; 128];
        out.extend(b"DICM");
        meta.write(&mut out).unwrap();
        let mut el = |group: u16, element: u16, value: &[u8]| {
            out.extend(group.to_le_bytes());
            out.extend(element.to_le_bytes());
            out.extend((value.len() as u32).to_le_bytes());
            out.extend(value);
        };
        el(0x0008, 0x0016, b"1.2.840.10008.5.1.4.1.1.7\0");
        el(0x0028, 0x0002, &1u16.to_le_bytes());
        el(0x0028, 0x0004, b"MONOCHROME2 ");
        el(0x0028, 0x0010, &2u16.to_le_bytes());
        el(0x0028, 0x0011, &2u16.to_le_bytes());
        el(0x0028, 0x0100, &8u16.to_le_bytes());
        el(0x0028, 0x0101, &8u16.to_le_bytes());
        el(0x0028, 0x0102, &7u16.to_le_bytes());
        el(0x0028, 0x0103, &0u16.to_le_bytes());
        el(0x7FE0, 0x0010, &[0, 50, 100, 200]);
        out
    }

    #[test]
    fn a_short_adobe_segment_is_dropped() {
        let soi = [0xFF, 0xD8];
        let short = [
            0xFF, 0xEE, 0x00, 0x0C, b'A', b'd', b'o', b'b', b'e', 0, 0, 0, 0, 0,
        ];
        let full = [
            0xFF, 0xEE, 0x00, 0x0E, b'A', b'd', b'o', b'b', b'e', 0, 100, 0, 0, 0, 0, 1,
        ];
        let dqt = [0xFF, 0xDB, 0x00, 0x03, 7];
        let stream = |app: &[u8]| [&soi[..], app, &dqt[..]].concat();
        assert_eq!(without_short_adobe(stream(&short)), stream(&[]));
        assert_eq!(without_short_adobe(stream(&full)), stream(&full));
        // Truncated or odd streams come back as they were.
        assert_eq!(
            without_short_adobe(vec![0xFF, 0xD8, 0xFF]),
            [0xFF, 0xD8, 0xFF]
        );
    }

    #[test]
    fn an_implicit_data_set_under_an_explicit_meta_is_read_as_implicit() {
        let name = Path::new("wrong-vr.dcm");
        let file = implicit_file("1.2.840.10008.1.2.1");
        let body = &file[128..];
        let (ts, _) = super::super::dicom_lengths::implicit_despite_meta(body).unwrap();
        assert_eq!(ts, "1.2.840.10008.1.2.1");
        let img = decode(&file, name).unwrap();
        assert_eq!(img.dimensions(), (2, 2));
        // Min-max stretch of 0, 50, 100, 200.
        let grey: Vec<u8> = img.pixels().map(|p| p[0]).collect();
        assert_eq!(grey, [0, 64, 128, 255]);
        assert_eq!(frame_count(&file, name).unwrap(), 1);
        // Declared as implicit VR, the same bytes are simply a good file.
        let honest = implicit_file("1.2.840.10008.1.2");
        assert!(super::super::dicom_lengths::implicit_despite_meta(&honest[128..]).is_none());
        assert_eq!(decode(&honest, name).unwrap(), img);
    }

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
