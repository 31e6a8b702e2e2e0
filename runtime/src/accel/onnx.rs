//! Rewrites of the ONNX protobuf, made before tract reads the file: the forms of quantized
//! graphs that tract runs slowly or wrongly, written as forms it runs fast and right.

use tract_onnx::pb;

/// The values of a float32 initializer.
fn initializer_floats(t: &pb::TensorProto) -> Option<Vec<f32>> {
    if t.data_type != pb::tensor_proto::DataType::Float as i32 || !t.external_data.is_empty() {
        return None;
    }
    if !t.raw_data.is_empty() {
        let chunks = t.raw_data.chunks_exact(4);
        if !chunks.remainder().is_empty() {
            return None;
        }
        return Some(
            chunks
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        );
    }
    Some(t.float_data.clone())
}

/// The values of an int8 or uint8 initializer, as `i32`.
fn initializer_bytes(t: &pb::TensorProto) -> Option<Vec<i32>> {
    use pb::tensor_proto::DataType;
    let signed = t.data_type == DataType::Int8 as i32;
    if !(signed || t.data_type == DataType::Uint8 as i32) || !t.external_data.is_empty() {
        return None;
    }
    if !t.raw_data.is_empty() {
        let v = t.raw_data.iter();
        return Some(if signed {
            v.map(|b| *b as i8 as i32).collect()
        } else {
            v.map(|b| *b as i32).collect()
        });
    }
    Some(t.int32_data.clone())
}

/// Rewrites each float product of static QDQ int8 (`MatMul` of a uint8 activation through
/// `DequantizeLinear` and an int8 weight through a per-column `DequantizeLinear`, as
/// `mae-export --calibration-data` writes it) into the integer form tract has fast kernels
/// for: `MatMulInteger` of the uint8 activation and the int8 weight, cast to float32, times
/// the product of the scales (the same sum of products, in integers). Returns how many.
pub fn qdq_to_integer(graph: &mut pb::GraphProto) -> usize {
    use pb::tensor_proto::DataType;
    use std::collections::HashMap;
    let init: HashMap<&str, &pb::TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let producer: HashMap<&str, &pb::NodeProto> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();
    let dequantize = |name: &str| {
        producer.get(name).copied().filter(|n| {
            n.op_type == "DequantizeLinear" && n.domain.is_empty() && n.input.len() == 3
        })
    };
    // (index of the MatMul, its replacement nodes, new initializers)
    let mut edits: Vec<(usize, Vec<pb::NodeProto>, Vec<pb::TensorProto>)> = Vec::new();
    for (i, m) in graph.node.iter().enumerate() {
        if m.op_type != "MatMul" || !m.domain.is_empty() || m.input.len() != 2 {
            continue;
        }
        let (Some(da), Some(db)) = (dequantize(&m.input[0]), dequantize(&m.input[1])) else {
            continue;
        };
        // The activation: uint8, one scale and zero point.
        let (Some(sa), Some(za)) = (
            init.get(da.input[1].as_str()),
            init.get(da.input[2].as_str()),
        ) else {
            continue;
        };
        let Some(sa) = initializer_floats(sa).filter(|v| v.len() == 1) else {
            continue;
        };
        if za.data_type != DataType::Uint8 as i32 || !za.dims.is_empty() {
            continue;
        }
        // The weight: an int8 `[k, n]` initializer, a scale per column (axis 1).
        let (Some(wq), Some(ws), Some(wz)) = (
            init.get(db.input[0].as_str()),
            init.get(db.input[1].as_str()),
            init.get(db.input[2].as_str()),
        ) else {
            continue;
        };
        let axis = db
            .attribute
            .iter()
            .find(|a| a.name == "axis")
            .map_or(1, |a| a.i);
        if wq.data_type != DataType::Int8 as i32 || wq.dims.len() != 2 || axis != 1 {
            continue;
        }
        let n = wq.dims[1] as usize;
        let Some(ws) = initializer_floats(ws).filter(|v| v.len() == n || v.len() == 1) else {
            continue;
        };
        let Some(zeros) = initializer_bytes(wz) else {
            continue;
        };
        if wz.data_type != DataType::Int8 as i32 || zeros.iter().any(|z| *z != 0) {
            continue;
        }
        let out = &m.output[0];
        let scale: Vec<f32> = (0..n)
            .map(|j| sa[0] * ws[if ws.len() == 1 { 0 } else { j }])
            .collect();
        let scale_name = format!("{out}.integer_scale");
        let zero_name = format!("{out}.weight_zero");
        let (acc, accf) = (format!("{out}.integer"), format!("{out}.integer_float"));
        let node = |op: &str, inputs: &[&str], output: &str, attribute: Vec<pb::AttributeProto>| {
            pb::NodeProto {
                op_type: op.into(),
                name: format!("{}.{}", m.name, op),
                input: inputs.iter().map(|s| s.to_string()).collect(),
                output: vec![output.to_string()],
                attribute,
                ..Default::default()
            }
        };
        let to = pb::AttributeProto {
            name: "to".into(),
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            i: DataType::Float as i64,
            ..Default::default()
        };
        let nodes = vec![
            // A scalar zero point: with one per column tract would also sum each activation row.
            node(
                "MatMulInteger",
                &[&da.input[0], &db.input[0], &da.input[2], &zero_name],
                &acc,
                vec![],
            ),
            node("Cast", &[&acc], &accf, vec![to]),
            node("Mul", &[&accf, &scale_name], out, vec![]),
        ];
        let inits = vec![
            pb::TensorProto {
                name: scale_name,
                dims: vec![n as i64],
                data_type: DataType::Float as i32,
                float_data: scale,
                ..Default::default()
            },
            pb::TensorProto {
                name: zero_name,
                dims: vec![],
                data_type: DataType::Int8 as i32,
                int32_data: vec![0],
                ..Default::default()
            },
        ];
        edits.push((i, nodes, inits));
    }
    let count = edits.len();
    for (i, nodes, inits) in edits.into_iter().rev() {
        graph.node.splice(i..=i, nodes);
        graph.initializer.extend(inits);
    }
    count
}

/// Rewrites each `DequantizeLinear` of a value the graph computes (an activation, not an
/// initializer) with one scale and zero point as its float32 arithmetic: `Cast`, minus the
/// zero point, times the scale. On a ViT quantized by ONNX Runtime's `quantize_static`, tract
/// 0.23 computes attention's products (`MatMul`s of two dequantized activations) wrongly:
/// PneumoniaMNIST test AUC 0.59 against ONNX Runtime's 0.88 on the same file, 0.88 with this
/// rewrite (a lone `MatMul` of two dequantized inputs comes out right either way; the tests
/// check this form's numbers). Returns how many.
pub fn dequantize_activations_as_float(graph: &mut pb::GraphProto) -> usize {
    use pb::tensor_proto::DataType;
    let mut zero_points = Vec::new();
    let mut nodes = Vec::with_capacity(graph.node.len());
    for n in std::mem::take(&mut graph.node) {
        let init = |name: &str| graph.initializer.iter().find(|t| t.name == name);
        let scalar_zero = n
            .input
            .get(2)
            .and_then(|z| init(z))
            .filter(|t| t.dims.is_empty());
        let zero = scalar_zero
            .and_then(initializer_bytes)
            .and_then(|v| v.first().copied());
        let scalar_scale = n.input.get(1).and_then(|s| init(s)).is_some_and(|t| {
            t.dims.is_empty() && initializer_floats(t).is_some_and(|v| v.len() == 1)
        });
        let applies = n.op_type == "DequantizeLinear"
            && n.domain.is_empty()
            && init(&n.input[0]).is_none()
            && scalar_scale;
        let (true, Some(zero)) = (applies, zero) else {
            nodes.push(n);
            continue;
        };
        let out = &n.output[0];
        let (cast, centred, zero_name) = (
            format!("{out}.as_float"),
            format!("{out}.centred"),
            format!("{out}.zero_point_float"),
        );
        let to = pb::AttributeProto {
            name: "to".into(),
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            i: DataType::Float as i64,
            ..Default::default()
        };
        let node = |op: &str, inputs: [&str; 2], output: &str, attribute| pb::NodeProto {
            op_type: op.into(),
            name: format!("{}.{op}", n.name),
            input: inputs
                .iter()
                .filter(|i| !i.is_empty())
                .map(|i| i.to_string())
                .collect(),
            output: vec![output.to_string()],
            attribute,
            ..Default::default()
        };
        nodes.push(node("Cast", [&n.input[0], ""], &cast, vec![to]));
        nodes.push(node("Sub", [&cast, &zero_name], &centred, vec![]));
        nodes.push(node("Mul", [&centred, &n.input[1]], out, vec![]));
        zero_points.push(pb::TensorProto {
            name: zero_name,
            dims: vec![],
            data_type: DataType::Float as i32,
            float_data: vec![zero as f32],
            ..Default::default()
        });
    }
    graph.node = nodes;
    let count = zero_points.len();
    graph.initializer.extend(zero_points);
    count
}
