//! A small ONNX graph builder: initializers, constants, unique node names and value checking.
//!
//! Every node gets a readable name `scope/Op` (`blocks.3.attn/Softmax`), unique in the graph,
//! and its single output is named like the node, so the graph reads well in Netron. A node that
//! uses a value nobody defined is refused with the node's name, which is where a bug in an
//! emitter shows up first.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
use tract_onnx::pb::tensor_shape_proto::Dimension;
use tract_onnx::pb::type_proto::{Tensor as TensorType, Value as TypeValue};
use tract_onnx::pb::{
    AttributeProto, GraphProto, NodeProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

use super::tensor::{f32_tensor, i64_tensor};

/// Errors of graph construction, naming the node or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A node refers to a value that no input, initializer or earlier node defines.
    #[error("node '{node}' ({op}): input '{input}' is not defined")]
    UndefinedInput {
        node: String,
        op: String,
        input: String,
    },
    /// Two values would have the same name.
    #[error("value '{0}' is defined twice")]
    Duplicate(String),
    /// A graph output names a value nobody defined.
    #[error("graph output '{0}' is not defined")]
    UndefinedOutput(String),
    /// A tensor needed by a node is absent or has the wrong shape.
    #[error("node '{node}': {reason}")]
    Weight { node: String, reason: String },
}

/// One dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    /// A symbolic dimension, such as the batch.
    Param(&'static str),
}

/// Attribute constructors.
pub mod attr {
    use super::*;

    fn base(name: &str, t: AttributeType) -> AttributeProto {
        AttributeProto {
            name: name.to_string(),
            r#type: t as i32,
            ..Default::default()
        }
    }

    pub fn int(name: &str, v: i64) -> AttributeProto {
        AttributeProto {
            i: v,
            ..base(name, AttributeType::Int)
        }
    }

    pub fn ints(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            ints: v.to_vec(),
            ..base(name, AttributeType::Ints)
        }
    }

    pub fn float(name: &str, v: f32) -> AttributeProto {
        AttributeProto {
            f: v,
            ..base(name, AttributeType::Float)
        }
    }
}

/// The graph under construction.
#[derive(Debug)]
pub struct GraphBuilder {
    opset: i64,
    /// Element type of the float activations and weights (float32 or float16).
    float: DataType,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    defined: HashSet<String>,
    taken: HashMap<String, usize>,
}

impl GraphBuilder {
    pub fn new(opset: i64, float: DataType) -> Self {
        Self {
            opset,
            float,
            nodes: Vec::new(),
            initializers: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            defined: HashSet::new(),
            taken: HashMap::new(),
        }
    }

    pub fn opset(&self) -> i64 {
        self.opset
    }

    /// Element type of float activations.
    pub fn float(&self) -> DataType {
        self.float
    }

    /// A name not yet used for a value or node: `base`, else `base_1`, `base_2`, ...
    fn unique(&mut self, base: &str) -> String {
        let n = self.taken.entry(base.to_string()).or_insert(0);
        let mut name = if *n == 0 {
            base.to_string()
        } else {
            format!("{base}_{n}")
        };
        *n += 1;
        while self.defined.contains(&name) {
            name = format!("{base}_{n}");
            *n += 1;
        }
        name
    }

    fn define(&mut self, name: &str) -> Result<(), BuildError> {
        if !self.defined.insert(name.to_string()) {
            return Err(BuildError::Duplicate(name.to_string()));
        }
        Ok(())
    }

    /// Declares a graph input.
    pub fn input(
        &mut self,
        name: &str,
        elem: DataType,
        dims: &[Dim],
    ) -> Result<String, BuildError> {
        self.define(name)?;
        self.inputs.push(value_info(name, elem, dims));
        Ok(name.to_string())
    }

    /// Declares `value` as a graph output.
    pub fn output(&mut self, value: &str, elem: DataType, dims: &[Dim]) -> Result<(), BuildError> {
        if !self.defined.contains(value) {
            return Err(BuildError::UndefinedOutput(value.to_string()));
        }
        self.outputs.push(value_info(value, elem, dims));
        Ok(())
    }

    /// Adds an initializer under its own name (an upstream parameter name).
    pub fn initializer(&mut self, t: TensorProto) -> Result<String, BuildError> {
        let name = t.name.clone();
        self.define(&name)?;
        self.initializers.push(t);
        Ok(name)
    }

    /// A 1-D int64 constant (shapes, axes, indices), named after `scope`.
    pub fn const_i64(&mut self, scope: &str, values: &[i64]) -> Result<String, BuildError> {
        let name = self.unique(&format!("{scope}/const"));
        self.initializer(i64_tensor(&name, &[values.len()], values))
    }

    /// A 0-D int64 constant (a `Gather` index that drops the axis).
    pub fn scalar_i64(&mut self, scope: &str, value: i64) -> Result<String, BuildError> {
        let name = self.unique(&format!("{scope}/const"));
        self.initializer(i64_tensor(&name, &[], &[value]))
    }

    /// A float constant in the graph's float type.
    pub fn const_float(
        &mut self,
        scope: &str,
        dims: &[usize],
        values: &[f32],
    ) -> Result<String, BuildError> {
        let float = self.float;
        self.const_float_as(scope, dims, values, float)
    }

    /// A float constant of a given float type (float32 parts of a float16 graph).
    pub fn const_float_as(
        &mut self,
        scope: &str,
        dims: &[usize],
        values: &[f32],
        float: DataType,
    ) -> Result<String, BuildError> {
        let name = self.unique(&format!("{scope}/const"));
        self.initializer(f32_tensor(&name, dims, values, float))
    }

    /// Adds a node with one output, named `scope/op`, and returns the output's name.
    pub fn node(
        &mut self,
        scope: &str,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
    ) -> Result<String, BuildError> {
        let name = self.unique(&format!("{scope}/{op}"));
        self.push(name.clone(), op, inputs, attrs, vec![name.clone()])?;
        Ok(name)
    }

    /// Adds a node whose one output has a chosen name (a graph output such as `logits`).
    pub fn node_to(
        &mut self,
        scope: &str,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        output: &str,
    ) -> Result<String, BuildError> {
        let name = self.unique(&format!("{scope}/{op}"));
        self.push(name, op, inputs, attrs, vec![output.to_string()])?;
        Ok(output.to_string())
    }

    /// Adds a node with `n` outputs, named `scope/op:0`, `scope/op:1`, ...
    pub fn node_multi(
        &mut self,
        scope: &str,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        n: usize,
    ) -> Result<Vec<String>, BuildError> {
        let name = self.unique(&format!("{scope}/{op}"));
        let outputs: Vec<String> = (0..n).map(|i| format!("{name}:{i}")).collect();
        self.push(name, op, inputs, attrs, outputs.clone())?;
        Ok(outputs)
    }

    fn push(
        &mut self,
        name: String,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        outputs: Vec<String>,
    ) -> Result<(), BuildError> {
        // An empty name is an omitted optional input, which ONNX allows.
        if let Some(missing) = inputs
            .iter()
            .find(|i| !i.is_empty() && !self.defined.contains(**i))
        {
            return Err(BuildError::UndefinedInput {
                node: name,
                op: op.to_string(),
                input: missing.to_string(),
            });
        }
        for o in &outputs {
            self.define(o)?;
        }
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs,
            name,
            op_type: op.to_string(),
            attribute: attrs,
            ..Default::default()
        });
        Ok(())
    }

    pub fn finish(self, name: &str) -> GraphProto {
        GraphProto {
            node: self.nodes,
            name: name.to_string(),
            initializer: self.initializers,
            input: self.inputs,
            output: self.outputs,
            ..Default::default()
        }
    }
}

fn value_info(name: &str, elem: DataType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => DimValue::DimValue(*n as i64),
                Dim::Param(p) => DimValue::DimParam(p.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(TypeValue::TensorType(TensorType {
                elem_type: elem as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_are_unique_and_readable() {
        let mut g = GraphBuilder::new(17, DataType::Float);
        let x = g
            .input("x", DataType::Float, &[Dim::Param("batch")])
            .unwrap();
        let a = g.node("blocks.0.attn", "Softmax", &[&x], vec![]).unwrap();
        let b = g.node("blocks.0.attn", "Softmax", &[&a], vec![]).unwrap();
        assert_eq!(a, "blocks.0.attn/Softmax");
        assert_eq!(b, "blocks.0.attn/Softmax_1");
        let c = g.const_i64("s", &[1, 2]).unwrap();
        let d = g.const_i64("s", &[3]).unwrap();
        assert_ne!(c, d);
    }

    #[test]
    fn undefined_inputs_name_the_node() {
        let mut g = GraphBuilder::new(17, DataType::Float);
        let err = g
            .node("blocks.1.mlp", "Erf", &["nowhere"], vec![])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("blocks.1.mlp/Erf") && err.contains("nowhere"),
            "{err}"
        );
        assert!(g.output("nowhere", DataType::Float, &[]).is_err());
    }

    #[test]
    fn duplicate_initializers_are_refused() {
        let mut g = GraphBuilder::new(17, DataType::Float);
        let t = f32_tensor("w", &[1], &[1.0], DataType::Float);
        g.initializer(t.clone()).unwrap();
        let err = g.initializer(t).unwrap_err().to_string();
        assert!(err.contains("'w'"), "{err}");
    }
}
