//! The `metadata_props` of an exported model: what `mae-run` (or any client) needs to
//! preprocess an image and label the output, and where the model came from.
//!
//! Every value is a string; lists and maps are JSON. Every key is `mae.<name>`, so ours never
//! collide with a consumer's own. The keys, version [`FORMAT_VERSION`]:
//!
//! | key | value |
//! |---|---|
//! | `mae.format_version` | `"1"`: version of this key set |
//! | `mae.output` | `logits` (outputs `logits` and `probabilities`) or `features` (output `features`) |
//! | `mae.task` | `multi-class`, `binary` or `multi-label` (`probabilities` is a softmax, or a sigmoid for multi-label); `features` for a feature extractor |
//! | `mae.class_names` | JSON list of strings, one per logit (`[]` for a feature extractor) |
//! | `mae.input_name` | `pixel_values` (float32 `[batch, 3, H, W]`, normalised) or `image` (uint8 `[batch, H, W, 3]`, RGB, normalised inside the graph) |
//! | `mae.input_size` | H = W, in pixels, e.g. `224` |
//! | `mae.mean`, `mae.std` | JSON lists of 3 numbers, per RGB channel, applied to pixels scaled to [0, 1] |
//! | `mae.crop_pct` | the center-crop fraction: resize the shorter side to `int(input_size / crop_pct)`, then crop `input_size` |
//! | `mae.interpolation` | resize filter: `bicubic`, `bilinear` or `nearest` |
//! | `mae.arch` | preset the model started from, e.g. `vit_base_patch16` |
//! | `mae.model_config` | JSON of the exported encoder's config (`VitConfig` fields) |
//! | `mae.precision` | `fp32`, `fp16` or `int8` |
//! | `mae.checkpoint_file` | file name of the source checkpoint |
//! | `mae.checkpoint_sha256` | SHA-256 of the source checkpoint file, lowercase hex |
//! | `mae.exporter_version` | `mae-export X.Y.Z` |
//! | `mae.metrics` | JSON object of the validation metrics stored in the checkpoint (`{}` if none) |
//! | `mae.epoch` | training epoch of the checkpoint; present only when the checkpoint records it |
//! | `mae.trainer_version` | the program that wrote the checkpoint (`mae-train X.Y.Z`), when recorded |
//! | `mae.data` | JSON of the training/validation data summary, when the checkpoint records it |
//! | `mae.intended_use` | `--intended-use TEXT`, when given |
//! | `mae.modality` | `--modality TEXT`, when given |
//! | `mae.test_metrics` | JSON of `--test-metrics FILE`'s data, split, samples, ACC, AUC and loss, when given |
//! | `mae.explain` | models exported with `--explain`: JSON of each method (`rollout`, `gradcam`) with its `output` name, `shape` and what it holds |
//! | `mae.quantization` | int8 models: JSON of the `method` (`dynamic`, or `static` with its `calibration` data and image count), `activations` and `weights` |

use std::collections::BTreeMap;

use mae_models::checkpoint::Task;
use mae_models::onnx_keys as keys;
use mae_models::preprocess::PreprocessSpec;
use mae_models::VitConfig;

use crate::onnx::vit::Precision;

/// Version of the metadata key set.
pub const FORMAT_VERSION: &str = "1";

/// Every key that every export carries (`mae.epoch` is optional and not listed).
pub const KEYS: [&str; 17] = keys::REQUIRED;

/// What the metadata is made from.
#[derive(Debug, Clone)]
pub struct ModelInfo<'a> {
    /// `None` for a feature extractor.
    pub task: Option<Task>,
    pub class_names: &'a [String],
    pub input_name: &'a str,
    pub preprocess: &'a PreprocessSpec,
    pub architecture: &'a str,
    pub config: &'a VitConfig,
    pub precision: Precision,
    pub checkpoint_file: &'a str,
    pub checkpoint_sha256: &'a str,
    pub metrics: &'a BTreeMap<String, f64>,
    pub epoch: Option<u64>,
    /// The optional keys for the model card, `(key, value)`, written after the others.
    pub card: Vec<(&'static str, String)>,
}

/// `(key, value)` pairs in the order of [`KEYS`], then `mae.epoch` when known.
pub fn props(info: &ModelInfo<'_>) -> Vec<(String, String)> {
    let json = |v: serde_json::Value| v.to_string();
    let p = info.preprocess;
    let precision = match info.precision {
        Precision::Fp32 => "fp32",
        Precision::Fp16 => "fp16",
        Precision::Int8 => "int8",
    };
    let (output, task) = match info.task {
        Some(t) => ("logits", t.as_str()),
        None => ("features", "features"),
    };
    // Serialised from the struct so the fields keep their declaration order.
    let config = serde_json::to_string(info.config).unwrap_or_else(|_| "null".into());
    let mut v = vec![
        (keys::FORMAT_VERSION, FORMAT_VERSION.to_string()),
        (keys::OUTPUT, output.to_string()),
        (keys::TASK, task.to_string()),
        (keys::CLASS_NAMES, json(serde_json::json!(info.class_names))),
        (keys::INPUT_NAME, info.input_name.to_string()),
        (keys::INPUT_SIZE, p.input_size.to_string()),
        (keys::MEAN, f32_list(&p.mean)),
        (keys::STD, f32_list(&p.std)),
        (keys::CROP_PCT, p.crop_pct.to_string()),
        (keys::INTERPOLATION, p.interpolation.as_str().to_string()),
        (keys::ARCH, info.architecture.to_string()),
        (keys::MODEL_CONFIG, config),
        (keys::PRECISION, precision.to_string()),
        (keys::CHECKPOINT_FILE, info.checkpoint_file.to_string()),
        (keys::CHECKPOINT_SHA256, info.checkpoint_sha256.to_string()),
        (
            keys::EXPORTER_VERSION,
            format!("mae-export {}", env!("CARGO_PKG_VERSION")),
        ),
        (keys::METRICS, json(serde_json::json!(info.metrics))),
    ];
    if let Some(e) = info.epoch {
        v.push((keys::EPOCH, e.to_string()));
    }
    v.extend(info.card.iter().cloned());
    v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// A JSON list of float32 values in their shortest form (`0.485`, not the float64 widening
/// `0.48500001430511475`).
fn f32_list(values: &[f32]) -> String {
    let items: Vec<String> = values
        .iter()
        .map(|v| {
            if v.is_finite() {
                v.to_string()
            } else {
                "null".into()
            }
        })
        .collect();
    format!("[{}]", items.join(","))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_key_is_written_in_order() {
        let cfg = VitConfig::preset("vit_tiny_patch4_28").unwrap();
        let spec = PreprocessSpec::imagenet(28);
        let names = vec!["a".to_string(), "b\"c".to_string()];
        let metrics = BTreeMap::from([("acc1".to_string(), 91.5)]);
        let info = ModelInfo {
            task: Some(Task::MultiLabel),
            class_names: &names,
            input_name: "pixel_values",
            preprocess: &spec,
            architecture: "vit_tiny_patch4_28",
            config: &cfg,
            precision: Precision::Fp32,
            checkpoint_file: "c.safetensors",
            checkpoint_sha256: "00",
            metrics: &metrics,
            epoch: Some(3),
            card: Vec::new(),
        };
        let p = props(&info);
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(&keys[..KEYS.len()], &KEYS[..]);
        assert_eq!(keys.last(), Some(&"mae.epoch"));
        let get = |k: &str| p.iter().find(|(key, _)| key == k).unwrap().1.clone();
        let back: Vec<String> = serde_json::from_str(&get("mae.class_names")).unwrap();
        assert_eq!(back, names);
        assert_eq!(get("mae.mean"), "[0.485,0.456,0.406]");
        assert_eq!(get("mae.crop_pct"), "0.875");
        assert_eq!(get("mae.metrics"), r#"{"acc1":91.5}"#);
        assert_eq!(get("mae.task"), "multi-label");
    }
}
