//! LayerNorm, which tract expands into a sum, a scale, a subtraction and an `RmsNorm` and runs
//! on a ViT's feature-major activations (`[1, 768, 197]`) element by element, as one
//! [`LayerNormCore`].

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, RmsNorm};

use crate::accel::graph::{self, Replacement};
use crate::kernels::layer_norm::layer_norm;
use crate::kernels::vector::Vector;

/// `(x - mean(x)) / sqrt(var(x) + eps)` over one axis, float32: a LayerNorm without its
/// scale and shift (tract folds those into the next product).
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct LayerNormCore {
    pub axis: usize,
    /// `eps`, as its bits (so the op can be compared and hashed).
    pub eps_bits: u32,
    pub vector: Vector,
}

impl LayerNormCore {
    fn eps(&self) -> f32 {
        f32::from_bits(self.eps_bits)
    }
}

impl Op for LayerNormCore {
    fn name(&self) -> StaticName {
        "LayerNormCore".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("axis: {}, eps: {}", self.axis, self.eps())])
    }
    op_as_typed_op!();
}

impl EvalOp for LayerNormCore {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let shape = x.shape().to_vec();
        ensure!(
            self.axis < shape.len(),
            "LayerNormCore: axis {} out of range",
            self.axis
        );
        // Read in place: the input is usually also the residual stream's.
        let ram = x.try_as_plain_ram()?;
        let xs = ram.as_slice::<f32>()?;
        let mut out = Tensor::zero::<f32>(&shape)?;
        let d = shape[self.axis];
        let inner: usize = shape[self.axis + 1..].iter().product();
        {
            let mut ram = out.try_as_plain_ram_mut()?;
            let ys = ram.as_slice_mut::<f32>()?;
            layer_norm(xs, ys, (d, inner), self.eps(), self.vector);
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for LayerNormCore {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        graph::expect_f32(inputs, "LayerNormCore")?;
        ensure!(
            self.axis < inputs[0].rank(),
            "LayerNormCore: axis out of range"
        );
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }
    as_op!();
}

/// Finds tract's LayerNorm expansion in an optimised model, `RmsNorm(x - sum(x) · 1/d)` over
/// one axis of a float32 `x`, and returns `(x, axis, eps)`.
fn match_layer_norm(model: &TypedModel, rms: &TypedNode) -> Option<(OutletId, usize, f32)> {
    let op = rms.op_as::<RmsNorm>()?;
    let eps = op.eps.cast_to_scalar::<f32>().ok()?;
    let sub = model.node(rms.inputs.first()?.node);
    if !graph::is_sub(sub) || sub.inputs.len() != 2 || sub.outputs[0].successors.len() != 1 {
        return None;
    }
    let (x, mean) = (sub.inputs[0], sub.inputs[1]);
    let fact = model.outlet_fact(x).ok()?;
    if fact.datum_type != f32::datum_type() {
        return None;
    }
    let d = fact.shape.get(op.axis)?.to_usize().ok()?;
    let scale = model.node(mean.node);
    if !graph::is_mul(scale) || (graph::const_scalar(model, scale)? * d as f32 - 1.0).abs() > 1e-5 {
        return None;
    }
    let sum = scale
        .inputs
        .iter()
        .map(|o| model.node(o.node))
        .find(|n| n.op_is::<Reduce>())?;
    let reduce = sum.op_as::<Reduce>()?;
    let sums_x = reduce.reducer == Reducer::Sum && *reduce.axes == [op.axis] && sum.inputs == [x];
    sums_x.then_some((x, op.axis, eps))
}

/// Replaces each LayerNorm expansion in an optimised model with one [`LayerNormCore`] on
/// `vector`; returns how many.
pub fn fuse_layer_norms(model: &mut TypedModel, vector: Vector) -> TractResult<usize> {
    graph::replace_nodes(model, |model, node| {
        Ok(match_layer_norm(model, node).map(|(input, axis, eps)| {
            let op = LayerNormCore {
                axis,
                eps_bits: eps.to_bits(),
                vector,
            };
            Replacement::one(input, op, node.id)
        }))
    })
}
