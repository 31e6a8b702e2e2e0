//! What the rewrites of tract's graph share: reading a node's neighbours and constants,
//! recognising tract's operators, and putting new operators in place of matched nodes.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::{OptBinByScalar, TypedBinOp};
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::math::{Add, Mul, Sub};

/// Row-major strides of a concrete shape.
pub fn strides_of(shape: &[usize]) -> TVec<usize> {
    let mut s: TVec<usize> = tvec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The one position of an axis in an operand, if it has exactly one there.
pub fn single(positions: &[usize]) -> Option<Option<usize>> {
    match positions {
        [] => Some(None),
        [p] => Some(Some(*p)),
        _ => None,
    }
}

/// The one node reading `id`'s one output, if there is exactly one.
pub fn only_successor(model: &TypedModel, id: usize) -> Option<&TypedNode> {
    match &model.node(id).outputs[..] {
        [out] if out.successors.len() == 1 => Some(model.node(out.successors[0].node)),
        _ => None,
    }
}

/// Is `node` tract's exact (erf) GELU on float32?
pub fn is_gelu_exact(node: &TypedNode) -> bool {
    use tract_onnx::tract_core::ops::nn::GeluExact;
    node.op_as::<ElementWiseOp>()
        .is_some_and(|e| e.0.is::<GeluExact>() && e.1.is_none())
}

/// Is `node` tract's `DynamicQuantizeLinearU8` (ONNX `DynamicQuantizeLinear`), with its three
/// outputs? tract-onnx keeps the type private, so it is known by its name.
pub fn is_dynamic_quantizer(node: &TypedNode) -> bool {
    node.op().name() == "DynamicQuantizeLinearU8" && node.outputs.len() == 3
}

/// Is `node` an addition (tract's generic form)?
pub fn is_add(node: &TypedNode) -> bool {
    node.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Add>())
}

/// Is `node` a subtraction (tract's generic or by-scalar form)?
pub fn is_sub(node: &TypedNode) -> bool {
    node.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Sub>())
        || node
            .op_as::<OptBinByScalar>()
            .is_some_and(|b| b.binop.is::<Sub>())
}

/// Is `node` a multiplication in tract's generic form?
pub fn is_generic_mul(node: &TypedNode) -> bool {
    node.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Mul>())
}

/// Is `node` a multiplication (tract's generic or by-scalar form)?
pub fn is_mul(node: &TypedNode) -> bool {
    is_generic_mul(node)
        || node
            .op_as::<OptBinByScalar>()
            .is_some_and(|b| b.binop.is::<Mul>())
}

/// The constant scalar feeding `node` (of its two inputs), if any.
pub fn const_scalar(model: &TypedModel, node: &TypedNode) -> Option<f32> {
    node.inputs.iter().find_map(|o| {
        let k = model.outlet_fact(*o).ok()?.konst.clone()?;
        (k.len() == 1).then(|| k.cast_to_scalar::<f32>().ok())?
    })
}

/// Whether `outlet` is a constant whose values all equal `value` (as float32).
pub fn const_all(model: &TypedModel, outlet: OutletId, value: f32) -> bool {
    let Some(k) = model.outlet_fact(outlet).ok().and_then(|f| f.konst.clone()) else {
        return false;
    };
    k.cast_to::<f32>().is_ok_and(|v| {
        v.try_as_plain_ram()
            .and_then(|r| Ok(r.as_slice::<f32>()?.iter().all(|&x| x == value)))
            .unwrap_or(false)
    })
}

/// The node `outlet` comes from, past any axes added to it (`AddAxis`, as broadcasting writes
/// them).
pub fn through_added_axes(model: &TypedModel, mut outlet: OutletId) -> OutletId {
    use tract_onnx::tract_core::ops::change_axes::AxisOp;
    loop {
        let n = model.node(outlet.node);
        match (n.op_as::<AxisOp>(), &n.inputs[..]) {
            (Some(AxisOp::Add(_)), [input]) => outlet = *input,
            _ => return outlet,
        }
    }
}

/// The inputs of `node` other than `from`'s outputs, when there is exactly one.
pub fn other_input(node: &TypedNode, from: usize) -> Option<OutletId> {
    match node
        .inputs
        .iter()
        .filter(|i| i.node != from)
        .collect::<Vec<_>>()[..]
    {
        [other] => Some(*other),
        _ => None,
    }
}

/// The `n` values of a float32 constant of rank `rank` laid along axis `n_axis` (every other
/// axis of length one), or of a single value repeated; `None` for any other constant.
pub fn along_n(
    konst: &Tensor,
    rank: usize,
    (n_axis, n): (usize, usize),
) -> TractResult<Option<Vec<f32>>> {
    if konst.datum_type() != f32::datum_type() || konst.rank() > rank {
        return Ok(None);
    }
    // Right-aligned, as broadcasting reads it.
    let offset = rank - konst.rank();
    let along = konst
        .shape()
        .iter()
        .enumerate()
        .all(|(i, &d)| d == 1 || (i + offset == n_axis && d == n));
    if !along {
        return Ok(None);
    }
    let values = konst.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    Ok(Some(if values.len() == 1 {
        vec![values[0]; n]
    } else {
        values
    }))
}

/// The bias a product's only successor adds, if it is an addition of a constant laid along
/// the product's `n` axis (or a scalar), of the product's shape (`output_shape`, its `n`
/// columns on axis `n_axis`): `(the addition, bias)`.
fn match_bias(
    model: &TypedModel,
    node: &TypedNode,
    output_shape: &[usize],
    (n_axis, n): (usize, usize),
) -> TractResult<Option<(usize, Vec<f32>)>> {
    let Some(add) = only_successor(model, node.id).filter(|a| is_add(a)) else {
        return Ok(None);
    };
    let Some(other) = other_input(add, node.id) else {
        return Ok(None);
    };
    let Some(konst) = model.outlet_fact(other)?.konst.clone() else {
        return Ok(None);
    };
    let out = model.outlet_fact(add.id.into())?;
    if out.shape.as_concrete() != Some(output_shape) {
        return Ok(None);
    }
    Ok(along_n(&konst, output_shape.len(), (n_axis, n))?.map(|bias| (add.id, bias)))
}

/// What a product's tile stores fold in after the product: the addition of a constant bias,
/// then an exact GELU (the MLP's activation).
#[derive(Debug)]
pub struct Epilogue {
    /// The last node folded in (the product's own node when none is).
    pub last: usize,
    pub bias: Option<Vec<f32>>,
    pub gelu: bool,
}

impl Epilogue {
    /// The bias and GELU that follow node `product` (of output `output_shape`, its `n` columns
    /// on axis `n_axis`), each only when it is the one successor of the node before.
    pub fn after(
        model: &TypedModel,
        product: usize,
        output_shape: &[usize],
        n: (usize, usize),
    ) -> TractResult<Self> {
        let mut tail = Epilogue {
            last: product,
            bias: None,
            gelu: false,
        };
        if let Some((add, bias)) = match_bias(model, model.node(product), output_shape, n)? {
            tail.bias = Some(bias);
            tail.last = add;
        }
        if let Some(gelu) = only_successor(model, tail.last).filter(|n| is_gelu_exact(n)) {
            tail.gelu = true;
            tail.last = gelu.id;
        }
        Ok(tail)
    }
}

/// Where each axis of a two-input float32 `EinSum` lies (first input, second input, output),
/// sorted.
pub fn einsum_signature(node: &TypedNode) -> Option<Vec<[Option<usize>; 3]>> {
    use tract_onnx::tract_core::ops::einsum::EinSum;
    let op = node.op_as::<EinSum>()?;
    if op.q_params.is_some() || op.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
        return None;
    }
    let mut sig = op
        .axes
        .iter_all_axes()
        .map(|a| {
            Some([
                single(&a.inputs[0])?,
                single(&a.inputs[1])?,
                single(&a.outputs[0])?,
            ])
        })
        .collect::<Option<Vec<_>>>()?;
    sig.sort();
    Some(sig)
}

/// One replacement in a model: `ops` wired in a chain on `input`, whose last outputs take the
/// place of node `replaced`'s, slot by slot.
#[derive(Debug)]
pub struct Replacement {
    pub input: OutletId,
    pub ops: Vec<Box<dyn TypedOp>>,
    pub replaced: usize,
    /// Further outlets of the model that the last op's outputs replace: (outlet, output slot).
    pub also: Vec<(OutletId, usize)>,
}

impl Replacement {
    /// `op` alone on `input`, in place of node `replaced`.
    pub fn one(input: OutletId, op: impl TypedOp, replaced: usize) -> Self {
        Self {
            input,
            ops: vec![Box::new(op)],
            replaced,
            also: Vec::new(),
        }
    }
}

/// Makes the replacement `find` gives for each node of a model (in evaluation order), then
/// drops what no longer feeds the outputs; returns how many.
pub fn replace_nodes(
    model: &mut TypedModel,
    find: impl Fn(&TypedModel, &TypedNode) -> TractResult<Option<Replacement>>,
) -> TractResult<usize> {
    let mut count = 0;
    for id in model.eval_order()? {
        let Some(r) = find(model, model.node(id))? else {
            continue;
        };
        let name = model.node(r.replaced).name.clone();
        let mut patch = TypedModelPatch::default();
        let mut wires = tvec![patch.tap_model(model, r.input)?];
        for (k, op) in r.ops.into_iter().enumerate() {
            wires = patch.wire_node(format!("{name}.rewritten.{k}"), op, &wires)?;
        }
        let replaced = model.node(r.replaced).outputs.len();
        for (slot, wire) in wires.iter().enumerate().take(replaced) {
            patch.shunt_outside(model, OutletId::new(r.replaced, slot), *wire)?;
        }
        for (outlet, slot) in r.also {
            patch.shunt_outside(model, outlet, wires[slot])?;
        }
        patch.apply(model)?;
        count += 1;
    }
    if count > 0 {
        model.compact()?;
    }
    Ok(count)
}

/// Checks that an operator's one input is float32.
pub fn expect_f32(inputs: &[&TypedFact], op: &str) -> TractResult<()> {
    ensure!(
        inputs.len() == 1 && inputs[0].datum_type == f32::datum_type(),
        "{op} takes one float32 input"
    );
    Ok(())
}

/// The float32 input of a one-input node.
pub fn f32_input(model: &TypedModel, node: &TypedNode) -> TractResult<Option<OutletId>> {
    Ok(match node.inputs[..] {
        [x] if model.outlet_fact(x)?.datum_type == f32::datum_type() => Some(x),
        _ => None,
    })
}
