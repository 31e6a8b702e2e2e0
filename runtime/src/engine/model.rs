//! What `mae-run` reads from an ONNX file before running it: the graph's inputs, outputs and
//! opsets, the SHA-256 of the file, and the `metadata_props` that say how to preprocess an
//! image and how to label the output (DESIGN.md, "ONNX model").
//!
//! Metadata keys are `mae.<name>` (`mae.task`, `mae.class_names`, `mae.input_size`, `mae.mean`,
//! `mae.std`, `mae.crop_pct`, `mae.interpolation`, `mae.arch`, `mae.checkpoint_sha256`,
//! `mae.exporter_version`, `mae.metrics`; `mae.temperature` and `mae.threshold` after
//! calibration). The bare names (`task`, `input_size`, ..., `architecture`) are read too, as a
//! fallback, so that files written before the prefix was settled still load.

use mae_models::onnx_keys as keys;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use mae_models::checkpoint::Task;
use mae_models::preprocess::{Interpolation, PreprocessSpec, IMAGENET_MEAN, IMAGENET_STD};
use prost::Message;
use tract_onnx::pb;

/// Name of the input of the ONNX contract.
pub const INPUT_NAME: &str = "pixel_values";

/// One dimension of a declared input or output shape.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(i64),
    Param(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(v) => write!(f, "{v}"),
            Dim::Param(p) => f.write_str(if p.is_empty() { "?" } else { p }),
        }
    }
}

/// A graph input or output as declared in the file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IoInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<Dim>,
}

impl IoInfo {
    fn from_proto(v: &pb::ValueInfoProto) -> Self {
        use pb::tensor_shape_proto::dimension::Value as D;
        use pb::type_proto::Value as T;
        let (dtype, shape) = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(T::TensorType(t)) => {
                let dtype = pb::tensor_proto::DataType::try_from(t.elem_type)
                    .map(|d| d.as_str_name().to_lowercase())
                    .unwrap_or_else(|_| format!("type {}", t.elem_type));
                let shape = t
                    .shape
                    .as_ref()
                    .map(|s| {
                        s.dim
                            .iter()
                            .map(|d| match &d.value {
                                Some(D::DimValue(v)) => Dim::Fixed(*v),
                                Some(D::DimParam(p)) => Dim::Param(p.clone()),
                                None => Dim::Param(String::new()),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                (dtype, shape)
            }
            _ => ("not a tensor".to_string(), Vec::new()),
        };
        Self {
            name: v.name.clone(),
            dtype,
            shape,
        }
    }

    /// `pixel_values: float [batch, 3, 224, 224]`.
    pub fn describe(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(Dim::to_string).collect();
        format!("{}: {} [{}]", self.name, self.dtype, dims.join(", "))
    }
}

/// The parts of an ONNX file that `mae-run` looks at, without its weights.
#[derive(Debug, Clone)]
pub struct ModelFile {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub ir_version: i64,
    /// `(domain, version)`, the default domain as `ai.onnx`.
    pub opsets: Vec<(String, i64)>,
    pub producer: String,
    pub inputs: Vec<IoInfo>,
    pub outputs: Vec<IoInfo>,
    pub props: BTreeMap<String, String>,
}

impl ModelFile {
    /// Reads and hashes `path`, and decodes its graph signature and metadata.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let mut file = std::fs::File::open(path)
            .with_context(|| format!("cannot open model {}", path.display()))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .with_context(|| format!("cannot read model {}", path.display()))?;
        Self::from_bytes(path, &bytes)
    }

    /// Hashes `bytes` (the file `path`) and decodes its graph signature and metadata.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> anyhow::Result<Self> {
        let sha256 = mae_models::digest::sha256_hex(bytes);
        let proto = pb::ModelProto::decode(bytes).map_err(|e| {
            anyhow::anyhow!(
                "{} is not an ONNX model (it does not decode as an ONNX ModelProto: {e})",
                path.display()
            )
        })?;
        let Some(graph) = proto.graph.as_ref() else {
            bail!("{} is not an ONNX model (it has no graph)", path.display());
        };
        if proto.opset_import.is_empty() || graph.node.is_empty() {
            bail!(
                "{} is not an ONNX model (no opset or no nodes)",
                path.display()
            );
        }
        // Graph inputs may list initializers too (old exporters); the real inputs are the rest.
        let inits: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        Ok(Self {
            path: path.to_path_buf(),
            sha256,
            size: bytes.len() as u64,
            ir_version: proto.ir_version,
            opsets: proto
                .opset_import
                .iter()
                .map(|o| {
                    let d = if o.domain.is_empty() {
                        "ai.onnx"
                    } else {
                        &o.domain
                    };
                    (d.to_string(), o.version)
                })
                .collect(),
            producer: format!("{} {}", proto.producer_name, proto.producer_version)
                .trim()
                .to_string(),
            inputs: graph
                .input
                .iter()
                .filter(|i| !inits.contains(i.name.as_str()))
                .map(IoInfo::from_proto)
                .collect(),
            outputs: graph.output.iter().map(IoInfo::from_proto).collect(),
            props: proto
                .metadata_props
                .iter()
                .map(|p| (p.key.clone(), p.value.clone()))
                .collect(),
        })
    }

    /// A metadata value by its key (`mae_models::onnx_keys::TASK`, or its bare name `task`):
    /// the `mae.` key or, failing that, the bare one, as other tools may write it.
    pub fn prop(&self, key: &str) -> Option<&str> {
        let bare = keys::bare(key);
        self.props
            .get(&format!("mae.{bare}"))
            .or_else(|| self.props.get(bare))
            .map(String::as_str)
    }
}

/// Command-line values for models without (or to override) our metadata.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MetaOverrides {
    /// Input size (H = W) for a model without `mae.input_size` metadata.
    #[arg(long, value_name = "N")]
    pub input_size: Option<usize>,
    /// Per-channel mean, `R,G,B` (default: the model's, else ImageNet's).
    #[arg(long, value_name = "R,G,B", value_delimiter = ',', num_args = 3)]
    pub mean: Option<Vec<f32>>,
    /// Per-channel standard deviation, `R,G,B` (default: the model's, else ImageNet's).
    #[arg(long, value_name = "R,G,B", value_delimiter = ',', num_args = 3)]
    pub std: Option<Vec<f32>>,
    /// Center-crop fraction (default: the model's, else 0.875).
    #[arg(long, value_name = "F")]
    pub crop_pct: Option<f32>,
    /// Resize filter (default: the model's, else bicubic).
    #[arg(long, value_enum)]
    pub interpolation: Option<InterpolationArg>,
    /// Task of a model without `mae.task` metadata (default multi-class).
    #[arg(long, value_enum)]
    pub task: Option<TaskArg>,
    /// Class names, comma-separated, for a model without `mae.class_names`.
    #[arg(long, value_name = "A,B,...", value_delimiter = ',')]
    pub class_names: Option<Vec<String>>,
    /// Ignore the calibration (`mae.temperature`, `mae.threshold`) stored in the model.
    #[arg(long)]
    pub no_calibration: bool,
}

/// `--interpolation` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InterpolationArg {
    Bicubic,
    Bilinear,
    Nearest,
}

/// `--task` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TaskArg {
    MultiClass,
    Binary,
    MultiLabel,
}

/// How to preprocess for, and label the outputs of, one model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelMeta {
    pub task: Task,
    pub class_names: Vec<String>,
    pub preprocess: PreprocessSpec,
    pub arch: Option<String>,
    pub sha256: String,
    pub checkpoint_sha256: Option<String>,
    pub exporter_version: Option<String>,
    /// `mae.precision`: `fp32`, `fp16` or `int8`, when recorded.
    pub precision: Option<String>,
    pub metrics: Option<serde_json::Value>,
    /// Logits are divided by it before the softmax/sigmoid (calibration).
    pub temperature: Option<f64>,
    /// Decision threshold on the positive class (binary) or each label (multi-label).
    pub threshold: Option<f64>,
    /// Name of the graph's image input.
    pub input_name: String,
    /// Names of the outputs, in graph order.
    pub output_names: Vec<String>,
    /// The batch size, when the graph fixes it (the contract wants it dynamic).
    pub fixed_batch: Option<usize>,
}

impl ModelMeta {
    /// Interprets the metadata of `file`, with command-line overrides.
    pub fn from_file(file: &ModelFile, o: &MetaOverrides) -> anyhow::Result<Self> {
        let path = file.path.display();
        let Some(input) = file
            .inputs
            .iter()
            .find(|i| i.name == INPUT_NAME)
            .or(file.inputs.first())
        else {
            bail!("{path}: the graph has no input");
        };
        if input.dtype != "float" {
            bail!(
                "{path}: input {} must be float32 [batch, 3, H, W] (the mae-export contract)",
                input.describe()
            );
        }
        let json = |name: &str| -> anyhow::Result<Option<serde_json::Value>> {
            file.prop(name)
                .map(|v| {
                    serde_json::from_str(v).with_context(|| {
                        format!("{path}: metadata '{name}' is not valid JSON: {v:?}")
                    })
                })
                .transpose()
        };
        let num = |name: &str| -> anyhow::Result<Option<f64>> {
            file.prop(name)
                .map(|v| {
                    v.trim().parse::<f64>().with_context(|| {
                        format!("{path}: metadata '{name}' is not a number: {v:?}")
                    })
                })
                .transpose()
        };
        let triple = |name: &str| -> anyhow::Result<Option<[f32; 3]>> {
            json(name)?
                .map(|v| {
                    serde_json::from_value::<[f32; 3]>(v).with_context(|| {
                        format!("{path}: metadata '{name}' must be a JSON list of 3 numbers")
                    })
                })
                .transpose()
        };

        let input_size = match (o.input_size, num(keys::INPUT_SIZE)?) {
            (Some(s), _) => s,
            (None, Some(s)) if s >= 1.0 && s.fract() == 0.0 => s as usize,
            (None, Some(s)) => bail!("{path}: metadata 'mae.input_size' is {s}"),
            (None, None) => bail!(
                "{path} has no mae metadata (mae.input_size, mae.mean, ...): it was not written \
                 by mae-export; give --input-size (and --mean, --std, --crop-pct, \
                 --interpolation, --task, --class-names as needed; ImageNet preprocessing \
                 otherwise)"
            ),
        };
        if input_size == 0 || input_size > 8192 {
            bail!("{path}: input size {input_size} is out of range");
        }
        let mean = match &o.mean {
            Some(m) => [m[0], m[1], m[2]],
            None => triple(keys::MEAN)?.unwrap_or(IMAGENET_MEAN),
        };
        let std = match &o.std {
            Some(s) => [s[0], s[1], s[2]],
            None => triple(keys::STD)?.unwrap_or(IMAGENET_STD),
        };
        if std.iter().any(|&s| s.is_nan() || s <= 0.0) {
            bail!("{path}: std {std:?} must be positive");
        }
        let crop_pct = match (o.crop_pct, num(keys::CROP_PCT)?) {
            (Some(c), _) => c,
            (None, Some(c)) => c as f32,
            (None, None) => mae_models::preprocess::DEFAULT_CROP_PCT,
        };
        if !(crop_pct > 0.0 && crop_pct <= 4.0) {
            bail!("{path}: crop fraction {crop_pct} is out of range (0, 4]");
        }
        let interpolation = match (o.interpolation, file.prop(keys::INTERPOLATION)) {
            (Some(InterpolationArg::Bicubic), _) => Interpolation::Bicubic,
            (Some(InterpolationArg::Bilinear), _) => Interpolation::Bilinear,
            (Some(InterpolationArg::Nearest), _) => Interpolation::Nearest,
            (None, None) => Interpolation::Bicubic,
            (None, Some(v)) => match v.trim().to_lowercase().as_str() {
                "bicubic" => Interpolation::Bicubic,
                "bilinear" => Interpolation::Bilinear,
                "nearest" => Interpolation::Nearest,
                other => bail!("{path}: unknown interpolation '{other}' in metadata"),
            },
        };
        let task = match (o.task, file.prop(keys::TASK)) {
            (Some(TaskArg::MultiClass), _) => Task::MultiClass,
            (Some(TaskArg::Binary), _) => Task::Binary,
            (Some(TaskArg::MultiLabel), _) => Task::MultiLabel,
            (None, None) => Task::MultiClass,
            (None, Some(v)) => match v.trim() {
                "multi-class" => Task::MultiClass,
                "binary" => Task::Binary,
                "multi-label" => Task::MultiLabel,
                other => bail!(
                    "{path}: task '{other}' in metadata is not one of multi-class, binary, \
                     multi-label (a feature extractor cannot be used for predictions)"
                ),
            },
        };
        let class_names = match &o.class_names {
            Some(c) => c.clone(),
            None => match json(keys::CLASS_NAMES)? {
                Some(v) => serde_json::from_value::<Vec<String>>(v).with_context(|| {
                    format!("{path}: metadata 'mae.class_names' must be a JSON list of strings")
                })?,
                None => Vec::new(),
            },
        };
        let (temperature, threshold) = if o.no_calibration {
            (None, None)
        } else {
            (num(keys::TEMPERATURE)?, num(keys::THRESHOLD)?)
        };
        if let Some(t) = temperature {
            if !(t.is_finite() && t > 0.0) {
                bail!("{path}: temperature {t} must be positive");
            }
        }
        let fixed_batch = match input.shape.first() {
            Some(Dim::Fixed(b)) if *b > 0 => Some(*b as usize),
            _ => None,
        };
        if input.shape.len() == 4 {
            for (axis, want) in [(1, 3), (2, input_size as i64), (3, input_size as i64)] {
                if let Dim::Fixed(v) = input.shape[axis] {
                    if v != want {
                        bail!(
                            "{path}: input {} does not take [batch, 3, {input_size}, \
                             {input_size}] images",
                            input.describe()
                        );
                    }
                }
            }
        } else if !input.shape.is_empty() {
            bail!(
                "{path}: input {} is not 4-D [batch, 3, H, W]",
                input.describe()
            );
        }
        Ok(Self {
            task,
            class_names,
            preprocess: PreprocessSpec {
                input_size,
                mean,
                std,
                crop_pct,
                interpolation,
            },
            arch: file
                .prop(keys::ARCH)
                .or(file.prop("architecture"))
                .map(String::from),
            sha256: file.sha256.clone(),
            checkpoint_sha256: file.prop(keys::CHECKPOINT_SHA256).map(String::from),
            exporter_version: file.prop(keys::EXPORTER_VERSION).map(String::from),
            precision: file.prop(keys::PRECISION).map(String::from),
            metrics: json(keys::METRICS).ok().flatten(),
            temperature,
            threshold,
            input_name: input.name.clone(),
            output_names: file.outputs.iter().map(|o| o.name.clone()).collect(),
            fixed_batch,
        })
    }

    /// The decision threshold in force (0.5 unless calibrated).
    pub fn decision_threshold(&self) -> f64 {
        self.threshold.unwrap_or(0.5)
    }

    /// Name of class `i` (`class i` when the model has no names).
    pub fn class_name(&self, i: usize) -> String {
        self.class_names
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("class {i}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_print() {
        assert_eq!(Dim::Fixed(3).to_string(), "3");
        assert_eq!(Dim::Param("batch".into()).to_string(), "batch");
        assert_eq!(Dim::Param(String::new()).to_string(), "?");
    }
}
