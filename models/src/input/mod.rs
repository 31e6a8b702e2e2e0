//! The input layer of every tool: image files (PNG, JPEG, BMP, TIFF, PPM/PGM, WebP) and DICOM
//! decoded to the same 8-bit RGB image, and ImageFolder trees read by torchvision's rules, from
//! folders or in place from zip archives.
//! `mae-train`, `mae-export` and `mae-run` all read their inputs through here, so a file gives
//! the same pixels, and a tree the same samples and labels, in every tool.

pub mod archive;
pub mod dicom;
mod dicom_lengths;
pub mod folder;
mod image;

use std::path::Path;

use ::image::RgbImage;

pub use self::image::{check_size, MAX_PIXELS};
pub use archive::{is_zip, Archive};
pub use folder::{is_image_file, is_image_name, ImageFolder, EXTENSIONS};

use crate::error::{Error, Result};

/// Reads and decodes an image or DICOM file as 8-bit RGB (see [`decode`]); errors name the
/// file once.
pub fn load(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode(&bytes, path)
}

/// Decodes image or DICOM bytes as 8-bit RGB: the one decoder of every tool. DICOM is
/// recognised by its `DICM` magic or a `.dcm`/`.dicom` name, images (PNG, JPEG, BMP, TIFF,
/// PPM/PGM, WebP) by their content; grayscale is replicated to three channels, alpha dropped
/// and 16-bit samples scaled to 8 bits. `name` names the source in errors.
pub fn decode(bytes: &[u8], name: &Path) -> Result<RgbImage> {
    if dicom::is_dicom(bytes) || is_dicom_name(name) {
        dicom::decode(bytes, name)
    } else {
        self::image::decode(bytes, name)
    }
}

/// Whether the file name ends with `.dcm` or `.dicom`, in any case.
pub fn is_dicom_name(name: &Path) -> bool {
    name.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("dcm") || e.eq_ignore_ascii_case("dicom"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ::image::{DynamicImage, ImageFormat, Rgb};
    use std::io::Cursor;

    fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), format).unwrap();
        bytes
    }

    #[test]
    fn lossless_formats_decode_to_the_same_rgb() {
        let rgb = RgbImage::from_fn(7, 5, |x, y| Rgb([x as u8 * 30, y as u8 * 50, 200]));
        let img = DynamicImage::ImageRgb8(rgb.clone());
        for format in [
            ImageFormat::Png,
            ImageFormat::Bmp,
            ImageFormat::Tiff,
            ImageFormat::Pnm,
            ImageFormat::WebP,
        ] {
            let got = decode(&encode(&img, format), Path::new("x")).unwrap();
            assert_eq!(got, rgb, "{format:?}");
        }
        // Grey (PGM, 16-bit TIFF) is replicated to three channels; RGBA loses its alpha.
        let grey = DynamicImage::ImageLuma8(img.to_luma8());
        let want = grey.to_rgb8();
        assert_eq!(
            decode(&encode(&grey, ImageFormat::Pnm), Path::new("x.pgm")).unwrap(),
            want
        );
        let grey16 = DynamicImage::ImageLuma16(grey.to_luma16());
        assert_eq!(
            decode(&encode(&grey16, ImageFormat::Tiff), Path::new("x.tif")).unwrap(),
            want
        );
        let rgba = DynamicImage::ImageRgba8(img.to_rgba8());
        assert_eq!(
            decode(&encode(&rgba, ImageFormat::Png), Path::new("x.png")).unwrap(),
            rgb
        );
    }

    #[test]
    fn dicom_is_told_by_magic_or_name() {
        assert!(is_dicom_name(Path::new("a/B.DCM")));
        assert!(is_dicom_name(Path::new("b.dicom")));
        assert!(!is_dicom_name(Path::new("b.png")));
        let err = decode(b"garbage", Path::new("x.dcm")).unwrap_err();
        assert!(err.to_string().contains("cannot read DICOM image"), "{err}");
    }
}
