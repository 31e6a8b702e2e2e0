//! DICOM decoding, which lives in the shared input layer (`mae_models::input::dicom`) so that
//! `mae-train` reads DICOM files exactly as `mae-run` does.

use std::path::Path;

use image::RgbImage;

pub use mae_models::input::dicom::is_dicom;

/// Decodes a DICOM file's image as RGB; errors name `name` once.
pub fn decode(bytes: &[u8], name: &Path) -> anyhow::Result<RgbImage> {
    Ok(mae_models::input::dicom::decode(bytes, name)?)
}
