//! The one decoder of every tool: DICOM (`dicom.rs`) or an image file (`image.rs`), told apart
//! by content and name.

use std::path::Path;

use image::RgbImage;

use crate::error::{Error, Result};
use crate::input::dicom;
use crate::input::image as picture;

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
        picture::decode(bytes, name)
    }
}

/// Whether the file name ends with `.dcm` or `.dicom`, in any case.
pub fn is_dicom_name(name: &Path) -> bool {
    name.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("dcm") || e.eq_ignore_ascii_case("dicom"))
}
