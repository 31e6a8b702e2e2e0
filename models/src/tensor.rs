//! A plain, framework-free tensor: dtype, shape and little-endian bytes.
//!
//! Every checkpoint reader produces these and every writer consumes them, so the trainer
//! (libtorch) and the exporter (ONNX) meet on one representation.

use std::fmt;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// Element types the checkpoint formats carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F64,
    F32,
    F16,
    Bf16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::Bf16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// Whether the type holds floating-point values.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::Bf16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::Bf16 => "bfloat16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        };
        f.write_str(s)
    }
}

/// A contiguous, row-major tensor stored as little-endian bytes.
#[derive(Clone, PartialEq)]
pub struct TensorData {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl fmt::Debug for TensorData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TensorData({}, {:?})", self.dtype, self.shape)
    }
}

impl TensorData {
    /// Builds a tensor, checking that the byte length matches dtype and shape.
    pub fn new(dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> Option<Self> {
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        (numel.checked_mul(dtype.size())? == data.len()).then_some(Self { dtype, shape, data })
    }

    /// A float32 tensor from values.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Option<Self> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::new(DType::F32, shape, data)
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Values converted to `f32` (integers and booleans by value).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.to_f64_vec().into_iter().map(|v| v as f32).collect()
    }

    /// Values converted to `f64`, which represents every supported dtype exactly except
    /// int64 values beyond 2^53.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        let b = &self.data;
        let n = self.dtype.size();
        let chunks = b.chunks_exact(n);
        match self.dtype {
            DType::F64 => chunks.map(|c| f64::from_le_bytes(arr(c))).collect(),
            DType::F32 => chunks.map(|c| f32::from_le_bytes(arr(c)) as f64).collect(),
            DType::F16 => chunks
                .map(|c| f16::from_le_bytes(arr(c)).to_f64())
                .collect(),
            DType::Bf16 => chunks
                .map(|c| bf16::from_le_bytes(arr(c)).to_f64())
                .collect(),
            DType::I64 => chunks.map(|c| i64::from_le_bytes(arr(c)) as f64).collect(),
            DType::I32 => chunks.map(|c| i32::from_le_bytes(arr(c)) as f64).collect(),
            DType::I16 => chunks.map(|c| i16::from_le_bytes(arr(c)) as f64).collect(),
            DType::I8 => b.iter().map(|&v| v as i8 as f64).collect(),
            DType::U8 => b.iter().map(|&v| v as f64).collect(),
            DType::Bool => b.iter().map(|&v| (v != 0) as u8 as f64).collect(),
        }
    }
}

fn arr<const N: usize>(c: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(c);
    a
}

/// Tensors by their dotted upstream names.
pub type StateDict = std::collections::BTreeMap<String, TensorData>;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn new_rejects_wrong_byte_length() {
        assert!(TensorData::new(DType::F32, vec![2, 3], vec![0; 24]).is_some());
        assert!(TensorData::new(DType::F32, vec![2, 3], vec![0; 23]).is_none());
        assert!(TensorData::new(DType::F32, vec![usize::MAX, 3], vec![]).is_none());
    }

    #[test]
    fn converts_half_types_exactly() {
        let h = [f16::from_f32(1.5), f16::from_f32(-0.25)];
        let data = h.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = TensorData::new(DType::F16, vec![2], data).unwrap();
        assert_eq!(t.to_f64_vec(), vec![1.5, -0.25]);
        let b = [bf16::from_f32(3.0)];
        let t = TensorData::new(DType::Bf16, vec![1], b[0].to_le_bytes().to_vec()).unwrap();
        assert_eq!(t.to_f32_vec(), vec![3.0]);
    }
}
