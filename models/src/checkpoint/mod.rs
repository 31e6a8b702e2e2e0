//! Checkpoint formats: PyTorch `.pth` (read) and self-describing `.safetensors` (read and write).

pub mod meta;
pub mod pickle;
pub mod pth;
pub mod safetensors;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

pub use meta::{CheckpointKind, CheckpointMeta, ProbeRecord, Task, FORMAT_VERSION, METADATA_KEY};
pub use pth::{read_pth, read_pth_bytes, PthFile};

use crate::error::{Error, Result};
use crate::tensor::TensorData;

/// Tensors by their dotted upstream names.
pub type StateDict = BTreeMap<String, TensorData>;

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
    let mut head = [0u8; 8];
    let n = std::fs::File::open(path)
        .and_then(|mut f| read_up_to(&mut f, &mut head))
        .map_err(|e| Error::io(path, e))?;
    if n == 0 {
        return Err(Error::format(path, "file is empty"));
    }
    if head[..n].starts_with(b"PK") || head[0] == 0x80 {
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
