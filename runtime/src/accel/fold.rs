//! Constants of what a model computes from its integer weights alone, which tract leaves to
//! run on every pass when they are larger than its memory allowance for folding.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::source::TypedSource;

/// Is `node` a cast from an integer tensor that is a constant (a quantised weight)?
fn casts_integer_constant(model: &TypedModel, node: &TypedNode) -> bool {
    node.op_is::<tract_onnx::tract_core::ops::cast::Cast>()
        && node.inputs.len() == 1
        && model
            .outlet_fact(node.inputs[0])
            .is_ok_and(|f| f.konst.is_some() && f.datum_type.is_integer())
}

/// Makes constants of what a model computes from its integer weights alone: a cast of an
/// integer constant, and the operators after it while all their inputs are constants. Before
/// codegen, that is a dequantized float weight (times its scales); after, the column sums
/// that tract's integer products subtract. tract leaves both to run on every pass when they
/// are larger than its memory allowance for folding. Returns how many.
pub fn fold_weight_dequantization(model: &mut TypedModel) -> TractResult<usize> {
    let mut folded = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        if !casts_integer_constant(model, node) {
            continue;
        }
        let weight_len = model
            .outlet_fact(node.inputs[0])?
            .shape
            .volume()
            .to_usize()
            .ok();
        let Some(mut value) = eval_const(model, node, None)? else {
            continue;
        };
        // Walk forward while the next operator's inputs are all constants (or this chain).
        let mut last = id;
        while let Some(next) = model.single_succ(last)? {
            if next.op_is::<Const>() || next.op_is::<TypedSource>() {
                break;
            }
            let all_known = next
                .inputs
                .iter()
                .all(|o| o.node == last || model.outlet_fact(*o).is_ok_and(|f| f.konst.is_some()));
            if !all_known || next.outputs.len() != 1 {
                break;
            }
            match eval_const(model, next, Some((last, &value)))? {
                Some(v) => {
                    value = v;
                    last = next.id;
                }
                None => break,
            }
        }
        // A float weight, or something smaller than the weight (its column sums, which
        // tract's integer products subtract): never a wider copy of an integer weight.
        let smaller = weight_len.is_some_and(|n| value.len() < n);
        if !(value.datum_type().is_float() || smaller) {
            continue;
        }
        let name = model.node(last).name.clone();
        let mut patch = TypedModelPatch::default();
        let k = patch.add_const(format!("{name}.folded"), value.into_tensor())?;
        patch.shunt_outside(model, last.into(), k)?;
        patch.apply(model)?;
        folded += 1;
    }
    if folded > 0 {
        model.compact()?;
    }
    Ok(folded)
}

/// Evaluates `node` on constant inputs (`known` gives the value of one input's producer),
/// or `None` when it cannot be evaluated outside a plan.
fn eval_const(
    model: &TypedModel,
    node: &TypedNode,
    known: Option<(usize, &TValue)>,
) -> TractResult<Option<TValue>> {
    let mut inputs = TVec::new();
    for o in &node.inputs {
        let value = match known {
            Some((id, v)) if id == o.node => v.clone(),
            _ => match &model.outlet_fact(*o)?.konst {
                Some(k) => k.clone().into_tvalue(),
                None => return Ok(None),
            },
        };
        inputs.push(value);
    }
    Ok(node
        .op
        .eval_out_of_plan(inputs)?
        .and_then(|mut out| (out.len() == 1).then(|| out.remove(0))))
}
