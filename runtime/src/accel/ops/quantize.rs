//! tract's uint8 quantizers, which take the range and round element by element, as operators
//! the compiler vectorises, with tract's numbers: [`DynamicQuantU8`] (ONNX
//! `DynamicQuantizeLinear`) and [`QuantU8`] (`QuantizeLinear` with a constant scale).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::quant::QuantizeLinearU8;

use crate::accel::graph::{self, Replacement};
use crate::kernels::quantize::{dynamic_range, quantize, Scaled};
use crate::kernels::vector::Vector;

/// `xs` quantised to uint8 (shape `shape`) on `vector`: `scaled(x)` rounded half to even, plus
/// the zero point, saturated.
fn quantize_u8(
    xs: &[f32],
    shape: &[usize],
    zero_point: u8,
    scaled: Scaled,
    vector: Vector,
) -> TractResult<Tensor> {
    let mut y = Tensor::zero::<u8>(shape)?;
    {
        let mut out = y.try_as_plain_ram_mut()?;
        quantize(xs, out.as_slice_mut::<u8>()?, zero_point, scaled, vector);
    }
    Ok(y)
}

/// ONNX `DynamicQuantizeLinear` to uint8, as tract computes it (the range widened to hold
/// zero, `x / scale` rounded half to even), written so the compiler vectorises it: tract's own
/// takes the range and rounds element by element.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct DynamicQuantU8 {
    pub vector: Vector,
}

impl Op for DynamicQuantU8 {
    fn name(&self) -> StaticName {
        "DynamicQuantU8".into()
    }
    op_as_typed_op!();
}

impl EvalOp for DynamicQuantU8 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let ram = x.try_as_plain_ram()?;
        let xs = ram.as_slice::<f32>()?;
        let (scale, zp) = dynamic_range(xs, self.vector);
        // A range of zero (all zeros) leaves every value at the zero point.
        let y = if scale > 0.0 {
            quantize_u8(xs, x.shape(), zp, Scaled::Over(scale), self.vector)?
        } else {
            Tensor::from_shape(x.shape(), &vec![zp; xs.len()])?
        };
        Ok(tvec!(
            y.into_tvalue(),
            tensor0(scale).into_tvalue(),
            tensor0(zp).into_tvalue()
        ))
    }
}

impl TypedOp for DynamicQuantU8 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        graph::expect_f32(inputs, "DynamicQuantU8")?;
        Ok(tvec!(
            u8::fact(inputs[0].shape.clone()),
            f32::fact([0usize; 0]),
            u8::fact([0usize; 0])
        ))
    }
    as_op!();
}

/// Replaces each of tract's `DynamicQuantizeLinearU8` on a float32 input with a
/// [`DynamicQuantU8`] on `vector`; returns how many.
pub fn fuse_dynamic_quant(model: &mut TypedModel, vector: Vector) -> TractResult<usize> {
    graph::replace_nodes(model, |model, node| {
        if !graph::is_dynamic_quantizer(node) {
            return Ok(None);
        }
        Ok(graph::f32_input(model, node)?
            .map(|input| Replacement::one(input, DynamicQuantU8 { vector }, node.id)))
    })
}

/// ONNX `QuantizeLinear` to uint8 of a float32 tensor, as tract computes it (times the
/// reciprocal of the scale, rounded half to even, plus the zero point, saturated), written so
/// the compiler vectorises it.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct QuantU8 {
    /// `1 / scale`, as its bits.
    pub inv_scale_bits: u32,
    pub zero_point: u8,
    pub vector: Vector,
}

impl Op for QuantU8 {
    fn name(&self) -> StaticName {
        "QuantU8".into()
    }
    op_as_typed_op!();
}

impl EvalOp for QuantU8 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let ram = x.try_as_plain_ram()?;
        let xs = ram.as_slice::<f32>()?;
        let inv = f32::from_bits(self.inv_scale_bits);
        let y = quantize_u8(
            xs,
            x.shape(),
            self.zero_point,
            Scaled::Times(inv),
            self.vector,
        )?;
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for QuantU8 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        graph::expect_f32(inputs, "QuantU8")?;
        Ok(tvec!(u8::fact(inputs[0].shape.clone())))
    }
    as_op!();
}

/// Replaces each of tract's float32 → uint8 `QuantizeLinear` left in an optimised model with
/// a [`QuantU8`] on `vector`; returns how many.
pub fn fuse_quantize(model: &mut TypedModel, vector: Vector) -> TractResult<usize> {
    graph::replace_nodes(model, |model, node| {
        let Some(q) = node
            .op_as::<ElementWiseOp>()
            .and_then(|e| e.0.downcast_ref::<QuantizeLinearU8>())
        else {
            return Ok(None);
        };
        let op = QuantU8 {
            inv_scale_bits: q.scale.to_bits(),
            zero_point: q.zero_point,
            vector,
        };
        Ok(graph::f32_input(model, node)?.map(|input| Replacement::one(input, op, node.id)))
    })
}
