//! `TensorProto` constructors: little-endian `raw_data`, as ONNX stores it.

use half::f16;
use mae_models::{DType, TensorData};
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::TensorProto;

fn dims_i64(dims: &[usize]) -> Vec<i64> {
    dims.iter().map(|&d| d as i64).collect()
}

fn proto(name: &str, dims: &[usize], data_type: DataType, raw_data: Vec<u8>) -> TensorProto {
    TensorProto {
        dims: dims_i64(dims),
        data_type: data_type as i32,
        name: name.to_string(),
        raw_data,
        ..Default::default()
    }
}

/// Float values stored as `float` (float32) or `float16`.
pub fn f32_tensor(name: &str, dims: &[usize], values: &[f32], float: DataType) -> TensorProto {
    let raw = match float {
        DataType::Float16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    let float = if float == DataType::Float16 {
        DataType::Float16
    } else {
        DataType::Float
    };
    proto(name, dims, float, raw)
}

pub fn i64_tensor(name: &str, dims: &[usize], values: &[i64]) -> TensorProto {
    let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    proto(name, dims, DataType::Int64, raw)
}

pub fn u8_tensor(name: &str, dims: &[usize], values: &[u8]) -> TensorProto {
    proto(name, dims, DataType::Uint8, values.to_vec())
}

pub fn i8_tensor(name: &str, dims: &[usize], values: &[i8]) -> TensorProto {
    proto(
        name,
        dims,
        DataType::Int8,
        values.iter().map(|&v| v as u8).collect(),
    )
}

/// A checkpoint tensor in the graph's float type; float32 data is copied as it is.
pub fn from_tensor_data(name: &str, t: &TensorData, float: DataType) -> TensorProto {
    if t.dtype == DType::F32 && float == DataType::Float {
        return proto(name, &t.shape, DataType::Float, t.data.clone());
    }
    f32_tensor(name, &t.shape, &t.to_f32_vec(), float)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn float16_halves_the_bytes() {
        let t = f32_tensor("a", &[2], &[1.0, -2.5], DataType::Float16);
        assert_eq!(t.raw_data.len(), 4);
        assert_eq!(t.data_type, DataType::Float16 as i32);
        let back = f16::from_le_bytes([t.raw_data[2], t.raw_data[3]]);
        assert_eq!(back.to_f32(), -2.5);
    }

    #[test]
    fn checkpoint_tensors_convert() {
        let td = TensorData::from_f32(vec![1, 2], &[0.5, 3.0]).unwrap();
        let t = from_tensor_data("w", &td, DataType::Float);
        assert_eq!(t.dims, vec![1, 2]);
        assert_eq!(t.raw_data, td.data);
    }
}
