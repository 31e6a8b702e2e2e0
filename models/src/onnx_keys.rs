//! The keys of an exported model's `metadata_props`: written by `mae-export`, read by `mae-run`
//! (and by any client that wants to preprocess and label as they do). One definition of each.

/// Version of the key set.
pub const FORMAT_VERSION: &str = "mae.format_version";
/// What the graph outputs: `logits` (a classifier) or `features` (an encoder).
pub const OUTPUT: &str = "mae.output";
/// `multi-class`, `binary`, `multi-label` or `features`.
pub const TASK: &str = "mae.task";
/// The class names, a JSON list of strings.
pub const CLASS_NAMES: &str = "mae.class_names";
/// The graph input's name.
pub const INPUT_NAME: &str = "mae.input_name";
/// Side of the square input, in pixels.
pub const INPUT_SIZE: &str = "mae.input_size";
/// Normalisation mean per channel, a JSON list.
pub const MEAN: &str = "mae.mean";
/// Normalisation standard deviation per channel, a JSON list.
pub const STD: &str = "mae.std";
/// Centre-crop fraction of the evaluation resize.
pub const CROP_PCT: &str = "mae.crop_pct";
/// Resize interpolation (`bicubic`, `bilinear`).
pub const INTERPOLATION: &str = "mae.interpolation";
/// The architecture's preset name.
pub const ARCH: &str = "mae.arch";
/// The architecture config, as JSON.
pub const MODEL_CONFIG: &str = "mae.model_config";
/// `fp32`, `fp16` or `int8`.
pub const PRECISION: &str = "mae.precision";
/// The source checkpoint's file name.
pub const CHECKPOINT_FILE: &str = "mae.checkpoint_file";
/// SHA-256 of the source checkpoint.
pub const CHECKPOINT_SHA256: &str = "mae.checkpoint_sha256";
/// The program and version that wrote the model.
pub const EXPORTER_VERSION: &str = "mae.exporter_version";
/// Validation metrics of the source checkpoint, as JSON.
pub const METRICS: &str = "mae.metrics";
/// The source checkpoint's epoch (optional).
pub const EPOCH: &str = "mae.epoch";
/// Softmax/sigmoid temperature fitted by `mae-run calibrate` (optional).
pub const TEMPERATURE: &str = "mae.temperature";
/// Operating threshold chosen by `mae-run calibrate` (optional).
pub const THRESHOLD: &str = "mae.threshold";

/// What the model is for, as its exporter stated it (optional).
pub const INTENDED_USE: &str = "mae.intended_use";
/// The imaging modality the model was trained on (`chest X-ray`; optional).
pub const MODALITY: &str = "mae.modality";
/// The training and validation data summary, JSON of `checkpoint::DataSummary` (optional).
pub const DATA: &str = "mae.data";
/// Test-set metrics given to the exporter, JSON: `data`, `split`, `samples`, `acc1`, `auc`,
/// `loss` (optional).
pub const TEST_METRICS: &str = "mae.test_metrics";
/// The program and version that wrote the source checkpoint (optional).
pub const TRAINER_VERSION: &str = "mae.trainer_version";
/// How an int8 model was quantised, JSON: `method` (`dynamic` or `static`), `activations`,
/// `weights`, and for static models `calibration` (`data`, `images`, `split`) (optional).
pub const QUANTIZATION: &str = "mae.quantization";
/// The explanation outputs of the graph, JSON: by method (`rollout`, `gradcam`), the output's
/// name, its shape (`["batch", classes, gh, gw]`) and what it holds (optional: only models
/// exported with `--explain`).
pub const EXPLAIN: &str = "mae.explain";

/// Every key that every export carries, in the order they are written.
pub const REQUIRED: [&str; 17] = [
    FORMAT_VERSION,
    OUTPUT,
    TASK,
    CLASS_NAMES,
    INPUT_NAME,
    INPUT_SIZE,
    MEAN,
    STD,
    CROP_PCT,
    INTERPOLATION,
    ARCH,
    MODEL_CONFIG,
    PRECISION,
    CHECKPOINT_FILE,
    CHECKPOINT_SHA256,
    EXPORTER_VERSION,
    METRICS,
];

/// A key without its `mae.` prefix (`task`), as models written by other tools may spell it.
pub fn bare(key: &str) -> &str {
    key.strip_prefix("mae.").unwrap_or(key)
}
