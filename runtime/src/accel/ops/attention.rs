//! A ViT's attention, which tract splits into heads by a reshape, two moves and three gathers
//! (copies) before two batched products and a softmax, as one [`SelfAttention`] on
//! [`crate::kernels::attention`]: heads over the threads, reading `qkv` in place.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use crate::accel::graph::{self, Replacement};
use crate::kernels::f32::F32Tile;

/// One image's multi-head self-attention, in place of tract's split of the fused `qkv` product
/// into heads, its two batched products and its softmax. Input `[1, tokens, 3·heads·dim]`,
/// output `[tokens, heads, dim]` (or `[1, tokens, heads, dim]`), as the graph it replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfAttention {
    tokens: usize,
    heads: usize,
    dim: usize,
    /// The output is `[1, tokens, heads, dim]` (the same values).
    leading_one: bool,
    /// The scale of the queries, as its bits.
    scale_bits: u32,
    /// The softmax's outputs as a second output, of this shape (`[heads, tokens, tokens]`),
    /// where the graph reads them elsewhere too (attention rollout).
    probabilities: Option<TVec<usize>>,
    tile: F32Tile,
}

impl SelfAttention {
    fn output_shape(&self) -> TVec<usize> {
        let shape = tvec![self.tokens, self.heads, self.dim];
        if self.leading_one {
            std::iter::once(1).chain(shape).collect()
        } else {
            shape
        }
    }
}

impl Op for SelfAttention {
    fn name(&self) -> StaticName {
        "SelfAttention".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} tokens, {} heads × {}, scale {}{}",
            self.tokens,
            self.heads,
            self.dim,
            f32::from_bits(self.scale_bits),
            if self.probabilities.is_some() {
                ", probabilities out"
            } else {
                ""
            }
        )])
    }
    op_as_typed_op!();
}

impl EvalOp for SelfAttention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let qkv = args_1!(inputs);
        let (t, h, d) = (self.tokens, self.heads, self.dim);
        ensure!(
            qkv.shape() == [1, t, 3 * h * d],
            "SelfAttention: input of shape {:?}, planned for [1, {t}, {}]",
            qkv.shape(),
            3 * h * d
        );
        let ram = qkv.try_as_plain_ram()?;
        let mut out = Tensor::zero::<f32>(&self.output_shape())?;
        let mut probs = match &self.probabilities {
            Some(shape) => Some(Tensor::zero::<f32>(shape)?),
            None => None,
        };
        {
            let mut o = out.try_as_plain_ram_mut()?;
            let mut p = match probs.as_mut() {
                Some(p) => Some(p.try_as_plain_ram_mut()?),
                None => None,
            };
            let p = match p.as_mut() {
                Some(p) => Some(p.as_slice_mut::<f32>()?),
                None => None,
            };
            let scale = f32::from_bits(self.scale_bits);
            let (x, y) = (ram.as_slice::<f32>()?, o.as_slice_mut::<f32>()?);
            crate::kernels::attention::attention(x, t, h, d, scale, y, p, self.tile)?;
        }
        let mut outputs = tvec!(out.into_tvalue());
        outputs.extend(probs.map(Tensor::into_tvalue));
        Ok(outputs)
    }
}

impl TypedOp for SelfAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        graph::expect_f32(inputs, "SelfAttention")?;
        let mut facts = tvec!(f32::fact(&*self.output_shape()));
        facts.extend(self.probabilities.iter().map(|shape| f32::fact(&**shape)));
        Ok(facts)
    }
    as_op!();
}

/// An `EinSum` signature: where each axis lies (first input, second input, output), sorted.
type Signature = Vec<[Option<usize>; 3]>;

/// The signatures of attention's two products: the weighted values (`bmk,abkn->mbn`, and
/// `->ambn` keeping the unit axis `a`, as tract writes it when the product after it is
/// quantized) and the scores (`abmk,abnk->bmn`).
fn attention_signatures() -> [Signature; 3] {
    let sorted = |mut s: Signature| {
        s.sort();
        s
    };
    [
        sorted(vec![
            [None, Some(0), None],
            [None, Some(3), Some(2)],
            [Some(0), Some(1), Some(1)],
            [Some(1), None, Some(0)],
            [Some(2), Some(2), None],
        ]),
        sorted(vec![
            [None, Some(0), Some(0)],
            [None, Some(3), Some(3)],
            [Some(0), Some(1), Some(2)],
            [Some(1), None, Some(1)],
            [Some(2), Some(2), None],
        ]),
        sorted(vec![
            [None, Some(2), Some(2)],
            [Some(0), Some(0), None],
            [Some(1), Some(1), Some(0)],
            [Some(2), None, Some(1)],
            [Some(3), Some(3), None],
        ]),
    ]
}

/// Finds tract's decluttered form of a ViT's attention, ending at the product of the
/// attention weights and the values (`node`): `qkv` reshaped to `[1, T, 3, H, D]`, moved to
/// `[3, 1, H, T, D]`, the queries (gathered, times a scalar), keys and values gathered, the
/// scores' product, the softmax over the keys, the product with the values, `[T, H, D]`.
/// Where the graph reads the softmax's outputs elsewhere too (attention rollout), the op gives
/// them as a second output, of the softmax's shape (`[heads, tokens, tokens]`).
/// Returns `qkv`'s outlet, the op to put in place of `node`, and the softmax's outlet where
/// the op gives its outputs.
fn match_attention(
    model: &TypedModel,
    node: &TypedNode,
    tile: F32Tile,
) -> Option<(OutletId, SelfAttention, Option<OutletId>)> {
    use tract_onnx::tract_core::ops::array::Gather;
    use tract_onnx::tract_core::ops::change_axes::AxisOp;
    use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};
    let [weighted, weighted_4d, scores] = attention_signatures();
    let signature = graph::einsum_signature(node)?;
    if signature != weighted && signature != weighted_4d {
        return None;
    }
    let softmax = model.node(node.inputs[0].node);
    let sm = softmax.op_as::<Softmax>()?;
    if *sm.axes != [2] || sm.kind != SoftmaxKind::Softmax || sm.quant_output_dt.is_some() {
        return None;
    }
    let qk = model.node(softmax.inputs[0].node);
    if graph::einsum_signature(qk)? != scores {
        return None;
    }
    // The queries times a scalar; the gathers of queries, keys and values from one tensor.
    let mul = model.node(qk.inputs[0].node);
    if !graph::is_generic_mul(mul) {
        return None;
    }
    let scale = graph::const_scalar(model, mul)?;
    let gathered = |outlet: OutletId, index: i64| -> Option<OutletId> {
        let g = model.node(outlet.node);
        let op = g.op_as::<Gather>()?;
        let k = model.outlet_fact(*g.inputs.get(1)?).ok()?.konst.clone()?;
        let at = (k.len() == 1).then(|| k.cast_to_scalar::<i64>().ok())??;
        (op.axis == 0 && at == index).then_some(g.inputs[0])
    };
    let q_in = mul.inputs.iter().find_map(|o| gathered(*o, 0))?;
    let k_in = gathered(qk.inputs[1], 1)?;
    let v_in = gathered(node.inputs[1], 2)?;
    if q_in != k_in || k_in != v_in {
        return None;
    }
    // [1, T, 3HD] → reshape [1, T, 3, H, D] → move(2, 0) → move(2, 3) = [3, 1, H, T, D].
    let axis_op = |outlet: OutletId| {
        let n = model.node(outlet.node);
        n.op_as::<AxisOp>().map(|op| (op.clone(), n.inputs[0]))
    };
    let (AxisOp::Move(2, 3), moved) = axis_op(q_in)? else {
        return None;
    };
    let (AxisOp::Move(2, 0), reshaped) = axis_op(moved)? else {
        return None;
    };
    let (AxisOp::Reshape(2, from, to), qkv) = axis_op(reshaped)? else {
        return None;
    };
    let shape = model.outlet_fact(qkv).ok()?.shape.as_concrete()?.to_vec();
    let to: Vec<usize> = to
        .iter()
        .map(|d| d.to_usize().ok())
        .collect::<Option<_>>()?;
    let [1, tokens, width] = shape[..] else {
        return None;
    };
    let [3, heads, dim] = to[..] else { return None };
    if from.len() != 1 || width != 3 * heads * dim {
        return None;
    }
    let out = model.outlet_fact(node.id.into()).ok()?;
    let out_shape = out.shape.as_concrete()?;
    let leading_one = match out_shape {
        [t, h, d] if [*t, *h, *d] == [tokens, heads, dim] => false,
        [1, t, h, d] if [*t, *h, *d] == [tokens, heads, dim] => true,
        _ => return None,
    };
    if out.datum_type != f32::datum_type() {
        return None;
    }
    let probs = OutletId::from(softmax.id);
    let read_elsewhere = model
        .outlet_successors(probs)
        .iter()
        .any(|i| i.node != node.id)
        || model.output_outlets().ok()?.contains(&probs);
    let probabilities = if read_elsewhere {
        let shape = model.outlet_fact(probs).ok()?.shape.as_concrete()?.to_vec();
        if shape[..] != [heads, tokens, tokens] {
            return None;
        }
        Some(shape.into())
    } else {
        None
    };
    let op = SelfAttention {
        tokens,
        heads,
        dim,
        leading_one,
        scale_bits: scale.to_bits(),
        probabilities,
        tile,
    };
    Some((qkv, op, read_elsewhere.then_some(probs)))
}

/// Puts a [`SelfAttention`] in place of each ViT attention in a decluttered model (before
/// tract's codegen); returns how many.
pub fn fuse_attention(model: &mut TypedModel, tile: F32Tile) -> TractResult<usize> {
    graph::replace_nodes(model, |model, node| {
        Ok(
            match_attention(model, node, tile).map(|(input, op, probs)| {
                let mut r = Replacement::one(input, op, node.id);
                r.also.extend(probs.map(|p| (p, 1)));
                r
            }),
        )
    })
}
