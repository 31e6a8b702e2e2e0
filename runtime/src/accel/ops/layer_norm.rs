//! LayerNorm, which tract expands into a sum, a scale, a subtraction and an `RmsNorm` and runs
//! on a ViT's feature-major activations (`[1, 768, 197]`) element by element, as one
//! [`LayerNormCore`].

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, RmsNorm};

use crate::accel::graph::{self, Replacement};

/// `(x - mean(x)) / sqrt(var(x) + eps)` over one axis, float32: a LayerNorm without its
/// scale and shift (tract folds those into the next product).
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct LayerNormCore {
    pub axis: usize,
    /// `eps`, as its bits (so the op can be compared and hashed).
    pub eps_bits: u32,
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
            layer_norm_core(xs, ram.as_slice_mut::<f32>()?, d, inner, self.eps());
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

/// Normalises `xs` (blocks of `d × inner`, the normalised axis of length `d` with stride
/// `inner`) into `ys`: two passes for the mean and the variance, one to write.
pub(crate) fn layer_norm_core(xs: &[f32], ys: &mut [f32], d: usize, inner: usize, eps: f32) {
    if d == 0 || inner == 0 {
        return;
    }
    let block = d * inner;
    if inner == 1 {
        for (x, y) in xs.chunks_exact(d).zip(ys.chunks_exact_mut(d)) {
            let mean = lane_sum(x, |v| v) / d as f32;
            let var = lane_sum(x, |v| (v - mean) * (v - mean)) / d as f32;
            let r = 1.0 / (var + eps).sqrt();
            for (o, v) in y.iter_mut().zip(x) {
                *o = (v - mean) * r;
            }
        }
        return;
    }
    let mut mean = vec![0f32; inner];
    let mut scale = vec![0f32; inner];
    for (x, y) in xs.chunks_exact(block).zip(ys.chunks_exact_mut(block)) {
        mean.fill(0.0);
        for row in x.chunks_exact(inner) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v;
            }
        }
        mean.iter_mut().for_each(|m| *m /= d as f32);
        scale.fill(0.0);
        for row in x.chunks_exact(inner) {
            for ((s, v), m) in scale.iter_mut().zip(row).zip(&mean) {
                *s += (v - m) * (v - m);
            }
        }
        scale
            .iter_mut()
            .for_each(|s| *s = 1.0 / (*s / d as f32 + eps).sqrt());
        for (row, out) in x.chunks_exact(inner).zip(y.chunks_exact_mut(inner)) {
            for (((o, v), m), s) in out.iter_mut().zip(row).zip(&mean).zip(&scale) {
                *o = (v - m) * s;
            }
        }
    }
}

/// `Σ f(x)` in 16 lanes (so that the compiler vectorises it), then across them.
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += f(c[i]);
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&v| f(v)).sum::<f32>()
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

/// Replaces each LayerNorm expansion in an optimised model with one [`LayerNormCore`];
/// returns how many.
pub fn fuse_layer_norms(model: &mut TypedModel) -> TractResult<usize> {
    graph::replace_nodes(model, |model, node| {
        Ok(match_layer_norm(model, node).map(|(input, axis, eps)| {
            let op = LayerNormCore {
                axis,
                eps_bits: eps.to_bits(),
            };
            Replacement::one(input, op, node.id)
        }))
    })
}
