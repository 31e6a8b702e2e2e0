//! Checkpoint formats: PyTorch `.pth` (read) and self-describing `.safetensors` (read and write).

pub mod meta;
pub mod pickle;
pub mod pth;
pub mod safetensors;

use std::io::Read;
use std::path::{Path, PathBuf};

pub use meta::{
    CheckpointKind, CheckpointMeta, DataSummary, ProbeRecord, SplitSummary, Task, FORMAT_VERSION,
    METADATA_KEY,
};
pub use pth::{read_pth, read_pth_bytes, PthFile};

use crate::error::{Error, Result};
pub use crate::tensor::StateDict;
use crate::tensor::TensorData;

/// The container a checkpoint came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A `torch.save` zip archive.
    Pth,
    /// A safetensors file.
    Safetensors,
}

/// A checkpoint read from disk, whatever its container.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub source: Source,
    pub tensors: StateDict,
    /// Our metadata document, when the file carries one.
    pub meta: Option<CheckpointMeta>,
}

impl Checkpoint {
    /// (name, shape) pairs, for [`crate::report::LoadReport::compare`].
    pub fn shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.tensors
            .iter()
            .map(|(k, v)| (k.as_str(), v.shape.as_slice()))
    }
}

/// Reads a `.pth` or `.safetensors` checkpoint, telling them apart by their first bytes.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let mut head = [0u8; 9];
    let n = std::fs::File::open(path)
        .and_then(|mut f| read_up_to(&mut f, &mut head))
        .map_err(|e| Error::io(path, e))?;
    if n == 0 {
        return Err(Error::format(path, "file is empty"));
    }
    // safetensors: a little-endian u64 header length, then the JSON header. Its first byte may
    // be anything (0x80 included, which starts a pickle), so the '{' after it decides first.
    let safetensors_like = n == 9 && head[8] == b'{';
    if !safetensors_like && (head[..n].starts_with(b"PK") || head[0] == 0x80) {
        let pth = pth::read_pth(path)?;
        return Ok(Checkpoint {
            path: path.to_path_buf(),
            source: Source::Pth,
            tensors: pth.tensors.into_iter().collect(),
            meta: None,
        });
    }
    let (tensors, meta) = safetensors::read(path)?;
    Ok(Checkpoint {
        path: path.to_path_buf(),
        source: Source::Safetensors,
        tensors,
        meta,
    })
}

fn read_up_to(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Epsilon of the linear-probe BatchNorm (`BatchNorm1d(d, affine=False, eps=1e-6)` upstream).
pub const LINPROBE_BN_EPS: f64 = 1e-6;

/// Folds a linear-probe head — upstream `main_linprobe.py`'s `head = Sequential(BatchNorm1d(d,
/// affine=False), Linear(d, c))`, stored as `head.0.running_mean`, `head.0.running_var`,
/// `head.0.num_batches_tracked`, `head.1.weight`, `head.1.bias` — into the plain `head.weight`
/// and `head.bias` of a classifier, which computes the same function in evaluation mode:
/// `W' = W / sqrt(var + eps)` per input column, `b' = b - W' · mean`. Returns `Ok(false)` when
/// the state dict has no such head, and an error naming the tensor when its parts disagree.
pub fn fold_bn_head(sd: &mut StateDict, eps: f64) -> std::result::Result<bool, String> {
    let (Some(w), Some(mean), Some(var)) = (
        sd.get("head.1.weight"),
        sd.get("head.0.running_mean"),
        sd.get("head.0.running_var"),
    ) else {
        return Ok(false);
    };
    let [c, d] = w.shape[..] else {
        return Err(format!(
            "head.1.weight has shape {:?}, expected [classes, dim]",
            w.shape
        ));
    };
    for (name, t) in [("head.0.running_mean", mean), ("head.0.running_var", var)] {
        if t.shape != [d] {
            return Err(format!("{name} has shape {:?}, expected [{d}]", t.shape));
        }
    }
    let bias = match sd.get("head.1.bias") {
        Some(b) if b.shape == [c] => b.to_f64_vec(),
        Some(b) => {
            return Err(format!(
                "head.1.bias has shape {:?}, expected [{c}]",
                b.shape
            ))
        }
        None => vec![0.0; c],
    };
    let (w, mean, var) = (w.to_f64_vec(), mean.to_f64_vec(), var.to_f64_vec());
    let inv: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let mut w2 = vec![0f32; c * d];
    let mut b2 = vec![0f32; c];
    for k in 0..c {
        let mut shift = 0.0;
        for j in 0..d {
            let wk = w[k * d + j] * inv[j];
            w2[k * d + j] = wk as f32;
            shift += wk * mean[j];
        }
        b2[k] = (bias[k] - shift) as f32;
    }
    for k in [
        "head.0.running_mean",
        "head.0.running_var",
        "head.0.num_batches_tracked",
        "head.1.weight",
        "head.1.bias",
    ] {
        sd.remove(k);
    }
    let (Some(w2), Some(b2)) = (
        TensorData::from_f32(vec![c, d], &w2),
        TensorData::from_f32(vec![c], &b2),
    ) else {
        return Err("cannot build the folded head".into());
    };
    sd.insert("head.weight".into(), w2);
    sd.insert("head.bias".into(), b2);
    Ok(true)
}

#[cfg(test)]
mod detect_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A safetensors file whose header length starts with the byte 0x80 (a pickle's first byte)
    /// is still read as safetensors.
    #[test]
    fn header_length_starting_with_0x80_is_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let mut header = String::from(r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#);
        while header.len() < 0x180 {
            header.push(' ');
        }
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        assert_eq!(bytes[0], 0x80);
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&1.5f32.to_le_bytes());
        std::fs::write(&path, bytes).unwrap();
        let ck = load(&path).unwrap();
        assert_eq!(ck.source, Source::Safetensors);
        assert_eq!(ck.tensors["t"].to_f32_vec(), vec![1.5]);
    }
}

#[cfg(test)]
mod fold_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn folded_head_computes_batchnorm_then_linear() {
        let (c, d) = (3, 4);
        let w: Vec<f32> = (0..c * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let b = [0.1f32, -0.2, 0.3];
        let mean = [0.5f32, -1.0, 2.0, 0.0];
        let var = [1.0f32, 4.0, 0.25, 9.0];
        let mut sd = StateDict::new();
        sd.insert(
            "head.1.weight".into(),
            TensorData::from_f32(vec![c, d], &w).unwrap(),
        );
        sd.insert(
            "head.1.bias".into(),
            TensorData::from_f32(vec![c], &b).unwrap(),
        );
        sd.insert(
            "head.0.running_mean".into(),
            TensorData::from_f32(vec![d], &mean).unwrap(),
        );
        sd.insert(
            "head.0.running_var".into(),
            TensorData::from_f32(vec![d], &var).unwrap(),
        );
        assert!(fold_bn_head(&mut sd, 1e-6).unwrap());
        assert!(!sd.contains_key("head.1.weight") && !sd.contains_key("head.0.running_var"));
        let w2 = sd["head.weight"].to_f32_vec();
        let b2 = sd["head.bias"].to_f32_vec();
        let x = [0.3f32, -2.0, 1.5, 4.0];
        for k in 0..c {
            let mut want = b[k] as f64;
            let mut got = b2[k] as f64;
            for j in 0..d {
                let xn = (x[j] - mean[j]) as f64 / (var[j] as f64 + 1e-6).sqrt();
                want += w[k * d + j] as f64 * xn;
                got += w2[k * d + j] as f64 * x[j] as f64;
            }
            assert!((got - want).abs() < 1e-5, "class {k}: {got} vs {want}");
        }
        // Nothing to fold the second time.
        assert!(!fold_bn_head(&mut sd, 1e-6).unwrap());
    }

    #[test]
    fn inconsistent_heads_are_refused_by_name() {
        let mut sd = StateDict::new();
        sd.insert(
            "head.1.weight".into(),
            TensorData::from_f32(vec![2, 3], &[0.0; 6]).unwrap(),
        );
        sd.insert(
            "head.0.running_mean".into(),
            TensorData::from_f32(vec![4], &[0.0; 4]).unwrap(),
        );
        sd.insert(
            "head.0.running_var".into(),
            TensorData::from_f32(vec![3], &[1.0; 3]).unwrap(),
        );
        let e = fold_bn_head(&mut sd, 1e-6).unwrap_err();
        assert!(e.contains("head.0.running_mean"), "{e}");
    }
}
