//! Which file names are inputs: torchvision's image extensions and DICOM's.

use std::path::Path;

/// torchvision's `IMG_EXTENSIONS`, then DICOM.
pub const EXTENSIONS: [&str; 10] = [
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".dcm",
];

/// Whether a file name ends with one of [`EXTENSIONS`], ignoring case (torchvision's
/// `has_file_allowed_extension`).
pub fn is_image_name(name: &str) -> bool {
    let lower = name.to_lowercase();
    EXTENSIONS.iter().any(|e| lower.ends_with(e))
}

/// Whether `path`'s file name is that of an image or DICOM file.
pub fn is_image_file(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| is_image_name(&n.to_string_lossy()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_are_torchvisions_in_any_case() {
        for n in [
            "a.jpg", "a.JPEG", "a.Png", "a.ppm", "a.BMP", "a.pgm", "a.tif", "a.TIFF", "a.webp",
            "a.DcM", ".png",
        ] {
            assert!(is_image_name(n), "{n}");
        }
        for n in ["a.txt", "a.gif", "png", "a.png.bak", "a.dicom", "a.npz"] {
            assert!(!is_image_name(n), "{n}");
        }
    }
}
