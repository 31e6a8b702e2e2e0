//! The parsers that read untrusted bytes, one entry per fuzz target (`fuzz/fuzz_targets/`).
//! Each reads the input the way the tools do and says whether it was accepted: an error is the
//! right answer to a bad input; a panic, a hang or an allocation beyond the input's means is a
//! bug.
//! `tests/tests/fuzz_replay.rs` replays the committed corpora and regressions through these
//! same functions on stable Rust.

use std::path::Path;

/// A target: reads its input and says whether it was accepted.
pub type Target = fn(&[u8]) -> bool;

/// The targets, by name (the folder names under `fuzz/corpus/`).
pub const TARGETS: [(&str, Target); 7] = [
    ("pth", pth),
    ("safetensors", safetensors),
    ("npz", npz),
    ("dicom", dicom),
    ("image", image),
    ("http", http),
    ("onnx_meta", onnx_meta),
];

/// A PyTorch `.pth` checkpoint: the zip container and the pickle machine.
pub fn pth(data: &[u8]) -> bool {
    mae_models::checkpoint::read_pth_bytes(data, Path::new("fuzz.pth")).is_ok()
}

/// A safetensors checkpoint with our metadata document.
pub fn safetensors(data: &[u8]) -> bool {
    mae_models::checkpoint::safetensors::from_bytes(Path::new("fuzz.safetensors"), data).is_ok()
}

/// A MedMNIST `.npz` file: the zip container, the `.npy` headers and the arrays.
pub fn npz(data: &[u8]) -> bool {
    mae_models::npz::read_bytes(data, Path::new("fuzz.npz")).is_ok_and(|s| !s.is_empty())
}

/// A DICOM file through the decoder (without the guard that turns a decoder panic into an
/// error, so that one shows here).
pub fn dicom(data: &[u8]) -> bool {
    mae_models::input::dicom::decode_unguarded(data).is_ok()
}

/// Any image file through the input layer, as the tools read files.
pub fn image(data: &[u8]) -> bool {
    mae_models::input::decode(data, Path::new("fuzz.bin")).is_ok()
}

/// A request body of `mae-run serve`: the first line is the Content-Type (a multipart form
/// for `/v1/predict`), the rest the body, read as `/v1/predict` uploads and as a `/v2` infer
/// request (JSON, or JSON then binary tensor data when the first line is a header length).
pub fn http(data: &[u8]) -> bool {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let head = String::from_utf8_lossy(&data[..split]);
    let body = data.get(split + 1..).unwrap_or(&[]);
    let uploads = mae_runtime::serve::v1::uploads(Some(head.trim()), body);
    let header_len = head.trim().parse::<usize>().ok();
    let infer = mae_runtime::serve::oip::parse_request(body, header_len);
    match head.trim() {
        h if h.starts_with("multipart/") => uploads.is_ok_and(|p| p.len() > 1),
        h if h.starts_with("image/") => uploads.is_ok(),
        _ => infer.is_ok(),
    }
}

/// An ONNX file's signature and `mae.*` metadata, as `mae-run info` and every command read it.
pub fn onnx_meta(data: &[u8]) -> bool {
    match mae_runtime::engine::model::ModelFile::from_bytes(Path::new("fuzz.onnx"), data) {
        Ok(file) => {
            // A model without mae metadata is still a model (its meta is refused or defaulted).
            let _ = mae_runtime::engine::model::ModelMeta::from_file(
                &file,
                &mae_runtime::engine::model::MetaOverrides::default(),
            );
            true
        }
        Err(_) => false,
    }
}
