//! Writing ONNX: the protobuf messages (tract-onnx's generated `prost` types), a small graph
//! builder, one emitter per ViT block, explanation outputs, int8 quantisation and external data.

pub mod builder;
pub mod explain;
pub mod quant;
pub mod tensor;
pub mod vit;

use prost::Message;
use tract_onnx::pb::tensor_proto::DataLocation;
use tract_onnx::pb::{GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto};

/// Opsets `mae-export` writes.
pub const MIN_OPSET: i64 = 13;
pub const MAX_OPSET: i64 = 21;
pub const DEFAULT_OPSET: i64 = 17;

/// Protobuf refuses messages of 2 GiB or more; weights beyond this (2 GiB less a margin for the
/// graph itself) go to external data.
pub const MAX_INLINE_BYTES: usize = (1 << 31) - (1 << 26);
/// Initializers smaller than this stay inline even in an external-data model.
const EXTERNAL_MIN_BYTES: usize = 1024;
/// Offsets of external tensors are aligned, so that runtimes can map them.
const EXTERNAL_ALIGN: usize = 4096;

/// The IR version that introduced `opset` (the pairs of onnx's `VERSION_TABLE`).
pub fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=14 => 7,
        15..=18 => 8,
        19..=20 => 9,
        _ => 10,
    }
}

/// Wraps a graph into a model with its opset and metadata.
pub fn model(graph: GraphProto, opset: i64, props: Vec<(String, String)>, doc: &str) -> ModelProto {
    ModelProto {
        ir_version: ir_version(opset),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        producer_name: "mae-export".to_string(),
        producer_version: env!("CARGO_PKG_VERSION").to_string(),
        doc_string: doc.to_string(),
        graph: Some(graph),
        metadata_props: props
            .into_iter()
            .map(|(key, value)| StringStringEntryProto { key, value })
            .collect(),
        ..Default::default()
    }
}

/// Serialised protobuf bytes.
pub fn encode(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Total initializer bytes of a model.
pub fn weight_bytes(model: &ModelProto) -> usize {
    model
        .graph
        .as_ref()
        .map_or(0, |g| g.initializer.iter().map(|t| t.raw_data.len()).sum())
}

/// Moves the data of every initializer of at least 1 KiB out of `model` into chunks of one
/// external data file named `location` (relative to the `.onnx` file). Returns the chunks, in
/// file order, each preceded by the zero padding that aligns it.
pub fn externalize(model: &mut ModelProto, location: &str) -> Vec<(usize, Vec<u8>)> {
    let mut chunks = Vec::new();
    let Some(graph) = model.graph.as_mut() else {
        return chunks;
    };
    let mut offset = 0usize;
    for t in &mut graph.initializer {
        if t.raw_data.len() < EXTERNAL_MIN_BYTES {
            continue;
        }
        let pad = (EXTERNAL_ALIGN - offset % EXTERNAL_ALIGN) % EXTERNAL_ALIGN;
        offset += pad;
        let data = std::mem::take(&mut t.raw_data);
        let entry = |key: &str, value: String| StringStringEntryProto {
            key: key.to_string(),
            value,
        };
        t.data_location = Some(DataLocation::External as i32);
        t.external_data = vec![
            entry("location", location.to_string()),
            entry("offset", offset.to_string()),
            entry("length", data.len().to_string()),
        ];
        offset += data.len();
        chunks.push((pad, data));
    }
    chunks
}

/// A graph input or output as `mae-run info` prints it: `pixel_values: float [batch, 3, 224, 224]`.
pub fn describe_io(v: &tract_onnx::pb::ValueInfoProto) -> String {
    use tract_onnx::pb::tensor_shape_proto::dimension::Value as D;
    use tract_onnx::pb::type_proto::Value as T;
    let Some(T::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return format!("{}: not a tensor []", v.name);
    };
    let dtype = tract_onnx::pb::tensor_proto::DataType::try_from(t.elem_type).map_or_else(
        |_| format!("type {}", t.elem_type),
        |d| d.as_str_name().to_lowercase(),
    );
    let dims: Vec<String> = t.shape.as_ref().map_or_else(Vec::new, |s| {
        s.dim
            .iter()
            .map(|d| match &d.value {
                Some(D::DimValue(n)) => n.to_string(),
                Some(D::DimParam(p)) => p.clone(),
                None => String::new(),
            })
            .collect()
    });
    format!("{}: {dtype} [{}]", v.name, dims.join(", "))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::tensor::f32_tensor;
    use super::*;
    use tract_onnx::pb::tensor_proto::DataType;

    #[test]
    fn ir_versions_follow_onnx() {
        assert_eq!(ir_version(13), 7);
        assert_eq!(ir_version(17), 8);
        assert_eq!(ir_version(18), 8);
        assert_eq!(ir_version(20), 9);
        assert_eq!(ir_version(21), 10);
    }

    #[test]
    fn externalize_moves_large_tensors_aligned() {
        let big = vec![1.0f32; 300];
        let graph = GraphProto {
            initializer: vec![
                f32_tensor("a", &[300], &big, DataType::Float),
                f32_tensor("small", &[1], &[2.0], DataType::Float),
                f32_tensor("b", &[300], &big, DataType::Float),
            ],
            ..Default::default()
        };
        let mut m = model(graph, 17, vec![], "");
        let chunks = externalize(&mut m, "m.onnx.data");
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].0, 0);
        assert_eq!(chunks[1].0, 4096 - 1200);
        let g = m.graph.unwrap();
        assert!(g.initializer[0].raw_data.is_empty());
        assert_eq!(g.initializer[1].raw_data.len(), 4);
        let offset = &g.initializer[2].external_data[1];
        assert_eq!(
            (offset.key.as_str(), offset.value.as_str()),
            ("offset", "4096")
        );
    }
}
