//! The input layer of every tool: image files (PNG, JPEG, BMP, TIFF, PPM/PGM, WebP) and DICOM
//! decoded to the same 8-bit RGB image, and ImageFolder trees read by torchvision's rules, from
//! folders or in place from zip archives.
//! `mae-train`, `mae-export` and `mae-run` all read their inputs through here, so a file gives
//! the same pixels, and a tree the same samples and labels, in every tool.

pub mod archive;
mod decode;
pub mod dicom;
mod dicom_lengths;
pub mod folder;
mod image;
mod jpeg12;
mod names;

pub use self::decode::{decode, is_dicom_name, load};
pub use self::image::{check_size, MAX_PIXELS};
pub use archive::{is_zip, Archive};
pub use folder::ImageFolder;
pub use names::{is_image_file, is_image_name, EXTENSIONS};

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ::image::{DynamicImage, ImageFormat, Rgb, RgbImage};
    use std::io::Cursor;
    use std::path::Path;

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
