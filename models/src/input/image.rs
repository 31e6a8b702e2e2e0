//! Image files (PNG, JPEG, BMP, TIFF, PPM/PGM, WebP) decoded to 8-bit RGB by the `image` crate,
//! with the size of an image checked from its header before it is decoded. Lossless formats
//! decode to the same pixels as Pillow; JPEG may differ by a grey level or two (a different
//! IDCT than libjpeg-turbo). DICOM is `dicom.rs`'s; [`super::decode`] tells them apart.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

use crate::error::{Error, Result};

/// Decodes image bytes (PNG, JPEG, BMP, TIFF, PPM/PGM or WebP, recognised by content) as 8-bit
/// RGB; `name` names the source in errors. Grayscale is replicated to three channels, alpha is
/// dropped (as Pillow's `convert("RGB")` does) and 16-bit samples are scaled to 8 bits.
pub(crate) fn decode(bytes: &[u8], name: &Path) -> Result<RgbImage> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(name, e))?;
    if reader.format().is_none() {
        return Err(Error::format(
            name,
            "not an image in a supported format (PNG, JPEG, BMP, TIFF, PPM/PGM, WebP, DICOM)",
        ));
    }
    let mut reader = reader;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits.clone());
    let decode = || -> Result<DynamicImage> {
        let fail = |e: image::ImageError| Error::format(name, format!("cannot decode image: {e}"));
        let decoder = reader.into_decoder().map_err(fail)?;
        // A few hundred bytes can declare a gigapixel image: the size is checked from the
        // header, before decoding.
        let (w, h) = decoder.dimensions();
        check_size(w, h).map_err(|e| Error::format(name, e))?;
        limits.reserve(decoder.total_bytes()).map_err(fail)?;
        DynamicImage::from_decoder(decoder).map_err(fail)
    };
    // Decoders are meant not to panic on damaged input; should one do so anyway, it is a
    // damaged file to the caller, not a crash of the program.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode))
        .map_err(|_| Error::format(name, "the image decoder failed on this file"))??;
    Ok(to_rgb8(decoded))
}

/// The most pixels an input image may have: 2²⁶ (about 67 megapixels, 8192×8192), far above
/// any radiograph, and small enough that decoding one cannot exhaust an edge machine.
pub const MAX_PIXELS: u64 = 1 << 26;

/// The most a decoder may allocate for one image (16-bit RGBA at [`MAX_PIXELS`]).
const MAX_DECODE_BYTES: u64 = 8 * MAX_PIXELS;

/// Refuses an image of more than [`MAX_PIXELS`] pixels, by its declared size.
pub fn check_size(width: u32, height: u32) -> std::result::Result<(), String> {
    let n = u64::from(width) * u64::from(height);
    if n > MAX_PIXELS {
        return Err(format!(
            "an image of {width}×{height} pixels is over the limit of {MAX_PIXELS} pixels"
        ));
    }
    Ok(())
}

fn to_rgb8(img: DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn images_over_the_pixel_limit_are_refused_by_their_declared_size() {
        assert!(super::check_size(8192, 8192).is_ok());
        let e = super::check_size(8193, 8192).unwrap_err();
        assert!(e.contains("8193×8192") && e.contains("67108864"), "{e}");
        // A PPM header declaring 10000×10000 pixels, and no data.
        let ppm = b"P6\n10000 10000\n255\n".to_vec();
        let e = super::decode(&ppm, std::path::Path::new("bomb.ppm"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("bomb.ppm: ") && e.contains("over the limit"),
            "{e}"
        );
    }

    #[test]
    fn garbage_is_a_format_error() {
        let err = decode(b"not an image", Path::new("x.png")).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err}");
        assert!(err.to_string().contains("x.png"));
        let mut png = Vec::new();
        RgbImage::new(4, 4)
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        png.truncate(png.len() / 2);
        let err = decode(&png, Path::new("half.png")).unwrap_err();
        assert!(err.to_string().contains("half.png"), "{err}");
    }
}
