//! Self-describing `.safetensors` checkpoints: tensors under upstream names, our metadata
//! document as JSON in the header.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, View};

use super::meta::{CheckpointMeta, FORMAT_VERSION, METADATA_KEY};
use crate::error::{Error, Result};
use crate::io::atomic_write;
use crate::tensor::StateDict;
use crate::tensor::{DType, TensorData};

struct Entry<'a>(&'a TensorData);

impl View for Entry<'_> {
    fn dtype(&self) -> Dtype {
        to_st(self.0.dtype)
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.0.data)
    }
    fn data_len(&self) -> usize {
        self.0.data.len()
    }
}

fn to_st(d: DType) -> Dtype {
    match d {
        DType::F64 => Dtype::F64,
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::Bf16 => Dtype::BF16,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::I16 => Dtype::I16,
        DType::I8 => Dtype::I8,
        DType::U8 => Dtype::U8,
        DType::Bool => Dtype::BOOL,
    }
}

fn from_st(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F64 => DType::F64,
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::Bf16,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I16 => DType::I16,
        Dtype::I8 => DType::I8,
        Dtype::U8 => DType::U8,
        Dtype::BOOL => DType::Bool,
        _ => return None,
    })
}

/// Serialises tensors and an optional metadata document to bytes.
pub fn to_bytes(
    path: &Path,
    tensors: &StateDict,
    meta: Option<&CheckpointMeta>,
) -> Result<Vec<u8>> {
    let mut info = HashMap::new();
    info.insert("format".to_string(), "pt".to_string());
    if let Some(m) = meta {
        let doc = serde_json::to_string(m)
            .map_err(|e| Error::format(path, format!("cannot encode metadata: {e}")))?;
        info.insert(METADATA_KEY.to_string(), doc);
    }
    let entries = tensors.iter().map(|(k, v)| (k.as_str(), Entry(v)));
    let mut bytes = safetensors::serialize(entries, Some(info))
        .map_err(|e| Error::format(path, format!("cannot encode safetensors: {e}")))?;
    sort_header(&mut bytes);
    Ok(bytes)
}

/// Rewrites the JSON header with its keys in sorted order. The safetensors writer takes the
/// metadata as a hash map, whose order changes from one process to the next; sorted, the same
/// weights and metadata always give the same bytes. The data section is not touched: the
/// re-encoded header has the same content, so the same length (left as it was otherwise).
fn sort_header(bytes: &mut [u8]) {
    let Some(len) = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .and_then(|n| usize::try_from(n).ok())
    else {
        return;
    };
    let Some(header) = bytes.get(8..8 + len) else {
        return;
    };
    let text = String::from_utf8_lossy(header);
    let trimmed = text.trim_end();
    // serde_json's map is ordered by key (no `preserve_order`), so this sorts every level.
    let Ok(value) = serde_json::from_str::<serde_json::Value>(trimmed) else {
        return;
    };
    let Ok(sorted) = serde_json::to_string(&value) else {
        return;
    };
    if sorted.len() == trimmed.len() {
        bytes[8..8 + sorted.len()].copy_from_slice(sorted.as_bytes());
    }
}

/// Writes a checkpoint atomically: a temporary file beside `path`, then a rename.
pub fn write(path: &Path, tensors: &StateDict, meta: Option<&CheckpointMeta>) -> Result<()> {
    let bytes = to_bytes(path, tensors, meta)?;
    atomic_write(path, &bytes)
}

/// Reads tensors and, when present, our metadata document.
pub fn read(path: &Path) -> Result<(StateDict, Option<CheckpointMeta>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    from_bytes(path, &bytes)
}

/// Parses a safetensors buffer; `path` only names the source in errors.
pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<(StateDict, Option<CheckpointMeta>)> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
    let mut tensors = StateDict::new();
    for (name, view) in st.tensors() {
        let dtype = from_st(view.dtype()).ok_or_else(|| {
            Error::format(
                path,
                format!("tensor '{name}' has unsupported dtype {:?}", view.dtype()),
            )
        })?;
        let t = TensorData::new(dtype, view.shape().to_vec(), view.data().to_vec())
            .ok_or_else(|| Error::format(path, format!("tensor '{name}' has inconsistent size")))?;
        tensors.insert(name, t);
    }
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
    let meta = match header.metadata().as_ref().and_then(|m| m.get(METADATA_KEY)) {
        None => None,
        Some(doc) => Some(parse_meta(path, doc)?),
    };
    Ok((tensors, meta))
}

fn parse_meta(path: &Path, doc: &str) -> Result<CheckpointMeta> {
    let v: serde_json::Value = serde_json::from_str(doc)
        .map_err(|e| Error::format(path, format!("metadata '{METADATA_KEY}' is not JSON: {e}")))?;
    let version = v
        .get("format_version")
        .and_then(|x| x.as_u64())
        .unwrap_or(0);
    if version > FORMAT_VERSION as u64 {
        return Err(Error::format(
            path,
            format!(
                "metadata format_version {version} is newer than this program reads \
                 ({FORMAT_VERSION}); upgrade mae"
            ),
        ));
    }
    serde_json::from_value(v)
        .map_err(|e| Error::format(path, format!("metadata '{METADATA_KEY}' is invalid: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::checkpoint::meta::{CheckpointKind, Task};
    use crate::config::{ModelConfig, VitConfig};

    fn sample() -> (StateDict, CheckpointMeta) {
        let mut sd = StateDict::new();
        sd.insert(
            "head.weight".into(),
            TensorData::from_f32(vec![2, 3], &[1., 2., 3., 4., 5., 6.]).unwrap(),
        );
        sd.insert(
            "head.bias".into(),
            TensorData::new(DType::I64, vec![1], 7i64.to_le_bytes().to_vec()).unwrap(),
        );
        let cfg = ModelConfig::Vit(VitConfig::preset("vit_tiny_patch4_28").unwrap());
        let mut meta = CheckpointMeta::new(
            CheckpointKind::Classifier,
            "vit_tiny_patch4_28",
            cfg,
            "test",
        );
        meta.task = Some(Task::Binary);
        meta.class_names = vec!["normal".into(), "pneumonia".into()];
        meta.metrics.insert("auc".into(), 0.93);
        (sd, meta)
    }

    #[test]
    fn round_trips_tensors_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.safetensors");
        let (sd, meta) = sample();
        write(&p, &sd, Some(&meta)).unwrap();
        let (sd2, meta2) = read(&p).unwrap();
        assert_eq!(sd2, sd);
        assert_eq!(meta2.unwrap(), meta);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn foreign_safetensors_have_no_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("plain.safetensors");
        let (sd, _) = sample();
        write(&p, &sd, None).unwrap();
        let (_, meta) = read(&p).unwrap();
        assert!(meta.is_none());
    }

    #[test]
    fn newer_format_version_is_refused() {
        let (sd, mut meta) = sample();
        meta.format_version = FORMAT_VERSION + 1;
        let p = Path::new("new.safetensors");
        let bytes = to_bytes(p, &sd, Some(&meta)).unwrap();
        let err = from_bytes(p, &bytes).unwrap_err().to_string();
        assert!(
            err.contains("new.safetensors") && err.contains("newer"),
            "{err}"
        );
    }

    #[test]
    fn damaged_files_give_errors_not_panics() {
        let (sd, meta) = sample();
        let p = Path::new("x.safetensors");
        let bytes = to_bytes(p, &sd, Some(&meta)).unwrap();
        for cut in [0, 1, 7, 8, 20, bytes.len() / 2, bytes.len() - 1] {
            let err = from_bytes(p, &bytes[..cut]).unwrap_err().to_string();
            assert!(err.starts_with("x.safetensors"), "{err}");
        }
        let mut rng = 0x9e3779b97f4a7c15u64;
        for _ in 0..2000 {
            let mut b = bytes.clone();
            for _ in 0..3 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let i = (rng as usize) % b.len();
                b[i] = (rng >> 32) as u8;
            }
            let _ = from_bytes(p, &b);
        }
    }

    #[test]
    fn the_same_checkpoint_always_has_the_same_bytes() {
        let mut sd = StateDict::new();
        for name in ["b", "a", "c.weight", "c.bias"] {
            sd.insert(
                name.into(),
                TensorData::from_f32(vec![2], &[1.0, 2.0]).unwrap(),
            );
        }
        let meta = CheckpointMeta::new(
            crate::checkpoint::CheckpointKind::Classifier,
            "vit_tiny_patch4_28",
            crate::ModelConfig::preset("vit_tiny_patch4_28").unwrap(),
            "test",
        );
        let p = Path::new("x.safetensors");
        let first = to_bytes(p, &sd, Some(&meta)).unwrap();
        // A fresh hash-map seed on every call: the order would differ without the sorting.
        for _ in 0..16 {
            assert_eq!(to_bytes(p, &sd, Some(&meta)).unwrap(), first);
        }
        let len = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&first[8..8 + len]).unwrap();
        assert!(
            header.starts_with("{\"__metadata__\":{\"format\":\"pt\",\"mae\":"),
            "{header}"
        );
        let (back, m) = from_bytes(p, &first).unwrap();
        assert_eq!(back, sd);
        assert_eq!(m.unwrap().arch, "vit_tiny_patch4_28");
    }
}
