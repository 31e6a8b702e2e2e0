//! The metadata document that makes a checkpoint self-describing (stored as JSON in the
//! safetensors header under [`METADATA_KEY`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::preprocess::PreprocessSpec;

/// Version of the metadata document; readers refuse newer versions.
pub const FORMAT_VERSION: u32 = 1;
/// Key of the document in the safetensors `__metadata__` map.
pub const METADATA_KEY: &str = "mae";

/// What a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointKind {
    /// Encoder and decoder of MAE pretraining.
    MaePretrain,
    /// A ViT with a classification head.
    Classifier,
}

/// The prediction task of a classifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// One label of C, softmax.
    MultiClass,
    /// One label of 2, softmax over two logits.
    Binary,
    /// Any subset of C labels, sigmoid per label.
    MultiLabel,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::MultiClass => "multi-class",
            Task::Binary => "binary",
            Task::MultiLabel => "multi-label",
        }
    }
}

/// Logits of the model on the seeded probe batch ([`crate::probe::probe_batch`]), recorded at
/// save time so that an exported graph can be checked against the weights it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeRecord {
    pub seed: u64,
    pub batch: usize,
    /// Row-major `[batch, outputs]`.
    pub outputs: Vec<f32>,
}

/// The self-describing document of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format_version: u32,
    pub kind: CheckpointKind,
    /// Preset the architecture started from (`vit_base_patch16`); `config` is authoritative.
    pub arch: String,
    pub config: ModelConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,
    #[serde(default)]
    pub class_names: Vec<String>,
    pub preprocess: PreprocessSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// The training arguments, as the trainer recorded them.
    #[serde(default)]
    pub args: serde_json::Value,
    /// Validation metrics at this epoch (`acc1`, `auc`, `loss`, ...).
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeRecord>,
    /// What the model was trained and validated on (classifiers written by `mae-train`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataSummary>,
    /// Program and version that wrote the file.
    pub writer: String,
}

/// The data a classifier was trained and validated on, for its model card.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DataSummary {
    /// The data set's file or folder name (`pneumoniamnist.npz`).
    pub source: String,
    /// The class (or label) names, in output order.
    #[serde(default)]
    pub class_names: Vec<String>,
    /// The training images used: all of the train split, or a `--train-samples` subset.
    pub train: SplitSummary,
    /// Images in the whole train split (before any subset).
    pub train_split_images: usize,
    /// `--train-samples`, when a subset was drawn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_samples: Option<usize>,
    pub val: SplitSummary,
}

/// The size of a split and its images per class (positives per label, multi-label).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SplitSummary {
    pub images: usize,
    pub per_class: Vec<usize>,
}

impl CheckpointMeta {
    /// A document for `config` with upstream preprocessing and nothing else filled in.
    pub fn new(kind: CheckpointKind, arch: &str, config: ModelConfig, writer: &str) -> Self {
        let preprocess = PreprocessSpec::imagenet(config.img_size());
        Self {
            format_version: FORMAT_VERSION,
            kind,
            arch: arch.to_string(),
            config,
            task: None,
            class_names: Vec::new(),
            preprocess,
            epoch: None,
            args: serde_json::Value::Null,
            metrics: BTreeMap::new(),
            probe: None,
            data: None,
            writer: writer.to_string(),
        }
    }
}
