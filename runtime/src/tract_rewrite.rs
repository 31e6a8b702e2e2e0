//! Rewrites of a tract graph made when `mae-run` loads a model, for forms tract runs slowly.
//! The file on disk stays standard ONNX; these change only tract's plan. Each keeps tract's
//! numbers (bit for bit where the tests below say so) or the same sum in another order.
//! `MAE_TRACT_REWRITES=none` turns them off, for comparing.
//!
//! - **LayerNorm**: tract expands it into a sum, a scale, a subtraction and an `RmsNorm`, and
//!   lays a ViT's activations out feature-major (`[1, 768, 197]`), so the subtraction
//!   broadcasts over a middle axis, which tract runs element by element. [`fuse_layer_norms`]
//!   puts one [`LayerNormCore`] in their place.
//! - **Dynamic int8** (`DynamicQuantizeLinear` → `MatMulInteger`): tract runs the products on
//!   its int8 (VNNI) kernels, but sums every int8 weight's columns again on each pass (its
//!   memory allowance for folding is smaller than the weight), and finds each activation's
//!   range and rounds it element by element. [`fold_weight_dequantization`] makes the sums
//!   constants; [`DynamicQuantU8`] is the quantizer, vectorised.
//! - **Static int8** (QDQ, `mae-export --calibration-data`): tract keeps the float products,
//!   dequantizing and packing every weight on each pass. [`qdq_to_integer`] rewrites the file's
//!   products, before tract reads it, into the integer form above (`MatMulInteger` with the
//!   calibrated zero point, times the product of the scales); [`QuantU8`] is the quantizer.
//!   Weights dequantized in other forms are folded to float ([`fold_weight_dequantization`]).
//! - **Dequantized activations** (files from other quantizers): tract 0.23 gets attention's
//!   products wrong in a ViT quantized by ONNX Runtime; [`dequantize_activations_as_float`]
//!   writes the dequantization out as float arithmetic, which it gets right.
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::{OptBinByScalar, TypedBinOp};
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::math::{Mul, Sub};
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, RmsNorm};
use tract_onnx::tract_core::ops::quant::QuantizeLinearU8;
use tract_onnx::tract_core::ops::source::TypedSource;

/// Which rewrites the tract backend makes: all (the default) or none, for comparing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrites {
    All,
    None,
}

impl Rewrites {
    /// The environment variable that chooses: `all` (the default) or `none`.
    pub const ENV: &'static str = "MAE_TRACT_REWRITES";

    pub fn from_env() -> anyhow::Result<Self> {
        Self::parse(std::env::var(Self::ENV).ok().as_deref())
    }

    fn parse(value: Option<&str>) -> anyhow::Result<Self> {
        match value.map(str::trim).unwrap_or("") {
            "" | "all" => Ok(Self::All),
            "none" => Ok(Self::None),
            other => anyhow::bail!(
                "{}={other:?}: expected 'all' (rewrite the forms tract runs slowly) or 'none' \
                 (tract's own plan)",
                Self::ENV
            ),
        }
    }
}

/// What the rewrites changed in one plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rewritten {
    pub layer_norms: usize,
    pub folded_weights: usize,
    pub dynamic_quants: usize,
    pub quantizers: usize,
    /// Static QDQ products made integer products ([`qdq_to_integer`], before parsing).
    pub integer_products: usize,
}

impl Rewritten {
    /// For the backend's description: what was rewritten, or that nothing was.
    pub fn describe(&self, rewrites: Rewrites) -> String {
        if rewrites == Rewrites::None {
            return format!("tract's own graph ({}=none)", Rewrites::ENV);
        }
        let parts: Vec<String> = [
            (self.layer_norms, "LayerNorms fused"),
            (self.folded_weights, "int8 weights made float at load"),
            (self.dynamic_quants, "dynamic quantizers vectorised"),
            (self.quantizers, "quantizers vectorised"),
            (self.integer_products, "QDQ products made integer"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        if parts.is_empty() {
            "no graph rewrites".into()
        } else {
            parts.join(", ")
        }
    }
}

/// Reads an ONNX file for tract (without its inner shape hints): with [`Rewrites::All`], its
/// static QDQ products made integer ([`qdq_to_integer`]); returns how many were.
pub fn parse(path: &std::path::Path, rewrites: Rewrites) -> TractResult<(InferenceModel, usize)> {
    // The shapes a file records for its inner values are hints, and may name the batch where
    // `mae-run` plans for one image (ONNX Runtime's quantizer writes them so): tract infers
    // them from the input instead.
    let onnx = tract_onnx::onnx().with_ignore_value_info(true);
    if rewrites == Rewrites::None {
        return Ok((onnx.model_for_path(path)?, 0));
    }
    let mut proto = onnx.proto_model_for_path(path)?;
    let integer = proto.graph.as_mut().map_or(0, qdq_to_integer);
    if let Some(graph) = proto.graph.as_mut() {
        dequantize_activations_as_float(graph);
    }
    // As `model_for_path` does: external data is read relative to the file's folder.
    let dir = path.parent().and_then(|d| d.to_str());
    let parsed = onnx.parse(&proto, dir)?;
    ensure!(
        parsed.unresolved_inputs.is_empty(),
        "could not resolve inputs {:?}",
        parsed.unresolved_inputs
    );
    Ok((parsed.model, integer))
}

/// Makes the model tract runs from a typed model: `rewrites` before and after tract's own
/// optimisation.
pub fn optimize(model: TypedModel, rewrites: Rewrites) -> TractResult<(TypedModel, Rewritten)> {
    let mut done = Rewritten::default();
    if rewrites == Rewrites::None {
        return Ok((model.into_optimized()?, done));
    }
    let mut model = model.into_decluttered()?;
    done.folded_weights = fold_weight_dequantization(&mut model)?;
    // Folded weights may declutter further; otherwise the graph is decluttered already.
    if done.folded_weights > 0 {
        model.declutter()?;
    }
    model.optimize()?;
    // Codegen makes more: the column sums of integer weights.
    done.folded_weights += fold_weight_dequantization(&mut model)?;
    done.layer_norms = fuse_layer_norms(&mut model)?;
    done.dynamic_quants = fuse_dynamic_quant(&mut model)?;
    done.quantizers = fuse_quantize(&mut model)?;
    Ok((model, done))
}

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
        expect_f32(inputs, "LayerNormCore")?;
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
fn layer_norm_core(xs: &[f32], ys: &mut [f32], d: usize, inner: usize, eps: f32) {
    if d == 0 || inner == 0 {
        return;
    }
    let block = d * inner;
    if inner == 1 {
        for (x, y) in xs.chunks_exact(d).zip(ys.chunks_exact_mut(d)) {
            let mean = x.iter().sum::<f32>() / d as f32;
            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
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

/// The constant scalar feeding `node` (of its two inputs), if any.
fn const_scalar(model: &TypedModel, node: &TypedNode) -> Option<f32> {
    node.inputs.iter().find_map(|o| {
        let k = model.outlet_fact(*o).ok()?.konst.clone()?;
        (k.len() == 1).then(|| k.cast_to_scalar::<f32>().ok())?
    })
}

/// Is `node` a subtraction (tract's generic or by-scalar form)?
fn is_sub(node: &TypedNode) -> bool {
    node.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Sub>())
        || node
            .op_as::<OptBinByScalar>()
            .is_some_and(|b| b.binop.is::<Sub>())
}

/// Is `node` a multiplication (tract's generic or by-scalar form)?
fn is_mul(node: &TypedNode) -> bool {
    node.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Mul>())
        || node
            .op_as::<OptBinByScalar>()
            .is_some_and(|b| b.binop.is::<Mul>())
}

/// Finds tract's LayerNorm expansion in an optimised model, `RmsNorm(x - sum(x) · 1/d)` over
/// one axis of a float32 `x`, and returns `(x, RmsNorm's node, axis, eps)`.
fn match_layer_norm(model: &TypedModel, rms: &TypedNode) -> Option<(OutletId, usize, f32)> {
    let op = rms.op_as::<RmsNorm>()?;
    let eps = op.eps.cast_to_scalar::<f32>().ok()?;
    let sub = model.node(rms.inputs.first()?.node);
    if !is_sub(sub) || sub.inputs.len() != 2 || sub.outputs[0].successors.len() != 1 {
        return None;
    }
    let (x, mean) = (sub.inputs[0], sub.inputs[1]);
    let fact = model.outlet_fact(x).ok()?;
    if fact.datum_type != f32::datum_type() {
        return None;
    }
    let d = fact.shape.get(op.axis)?.to_usize().ok()?;
    let scale = model.node(mean.node);
    if !is_mul(scale) || (const_scalar(model, scale)? * d as f32 - 1.0).abs() > 1e-5 {
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

/// One replacement in an optimised model: `ops` wired in a chain on `input`, whose last
/// outputs take the place of node `replaced`'s, slot by slot.
struct Replacement {
    input: OutletId,
    ops: Vec<Box<dyn TypedOp>>,
    replaced: usize,
}

/// Makes the replacement `find` gives for each node of an optimised model (in evaluation
/// order), then drops what no longer feeds the outputs; returns how many.
fn replace_nodes(
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
        for (slot, wire) in wires.iter().enumerate() {
            patch.shunt_outside(model, OutletId::new(r.replaced, slot), *wire)?;
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
fn expect_f32(inputs: &[&TypedFact], op: &str) -> TractResult<()> {
    ensure!(
        inputs.len() == 1 && inputs[0].datum_type == f32::datum_type(),
        "{op} takes one float32 input"
    );
    Ok(())
}

/// The float32 input of a one-input node.
fn f32_input(model: &TypedModel, node: &TypedNode) -> TractResult<Option<OutletId>> {
    Ok(match node.inputs[..] {
        [x] if model.outlet_fact(x)?.datum_type == f32::datum_type() => Some(x),
        _ => None,
    })
}

/// Replaces each LayerNorm expansion in an optimised model with one [`LayerNormCore`];
/// returns how many.
pub fn fuse_layer_norms(model: &mut TypedModel) -> TractResult<usize> {
    replace_nodes(model, |model, node| {
        Ok(
            match_layer_norm(model, node).map(|(input, axis, eps)| Replacement {
                input,
                ops: vec![Box::new(LayerNormCore {
                    axis,
                    eps_bits: eps.to_bits(),
                })],
                replaced: node.id,
            }),
        )
    })
}

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

/// `v` clamped to `[lo, hi]` (both within ±2²²) and rounded to the nearest integer, ties to
/// even: adding 1.5 · 2²³ rounds the sum to an integer held in its low mantissa bits. Safe code
/// that the compiler vectorises, where `round_ties_even` is a call per element and a
/// saturating float-to-integer cast is not vectorised.
#[inline(always)]
fn round_clamped(v: f32, lo: f32, hi: f32) -> i32 {
    const ROUND: f32 = 12_582_912.0;
    (v.clamp(lo, hi) + ROUND).to_bits() as i32 - 0x4B40_0000
}

/// `xs` quantised to uint8 (shape `shape`): `scaled(x)` rounded half to even, plus the zero
/// point, saturated.
fn quantize_u8(
    xs: &[f32],
    shape: &[usize],
    zero_point: u8,
    scaled: impl Fn(f32) -> f32,
) -> TractResult<Tensor> {
    let z = zero_point as f32;
    let (lo, hi) = (-z - 1.0, 256.0 - z);
    let mut y = Tensor::zero::<u8>(shape)?;
    {
        let mut out = y.try_as_plain_ram_mut()?;
        for (y, x) in out.as_slice_mut::<u8>()?.iter_mut().zip(xs) {
            *y = (round_clamped(scaled(*x), lo, hi) + zero_point as i32).clamp(0, 255) as u8;
        }
    }
    Ok(y)
}

/// ONNX `DynamicQuantizeLinear` to uint8, as tract computes it (the range widened to hold
/// zero, `x / scale` rounded half to even), written so the compiler vectorises it: tract's own
/// takes the range and rounds element by element.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct DynamicQuantU8;

/// `(scale, zero point)` of `xs`'s range widened to hold zero, as ONNX defines them.
fn dynamic_range(xs: &[f32]) -> (f32, u8) {
    const LANES: usize = 16;
    let (mut lo, mut hi) = ([0f32; LANES], [0f32; LANES]);
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
            hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
        }
    }
    let min = lo
        .iter()
        .chain(rest)
        .fold(0f32, |a, &v| if v < a { v } else { a });
    let max = hi
        .iter()
        .chain(rest)
        .fold(0f32, |a, &v| if v > a { v } else { a });
    let scale = (max - min) / 255.0;
    let zero_point = (-min / scale).round_ties_even().clamp(0.0, 255.0);
    // A range of zero gives a NaN zero point, which tract (and `as`) make 0.
    (
        scale,
        if zero_point.is_nan() {
            0
        } else {
            zero_point as u8
        },
    )
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
        let (scale, zp) = dynamic_range(xs);
        // A range of zero (all zeros) leaves every value at the zero point.
        let y = if scale > 0.0 {
            quantize_u8(xs, x.shape(), zp, |x| x / scale)?
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
        expect_f32(inputs, "DynamicQuantU8")?;
        Ok(tvec!(
            u8::fact(inputs[0].shape.clone()),
            f32::fact([0usize; 0]),
            u8::fact([0usize; 0])
        ))
    }
    as_op!();
}

/// Replaces each of tract's `DynamicQuantizeLinearU8` on a float32 input with a
/// [`DynamicQuantU8`]; returns how many.
pub fn fuse_dynamic_quant(model: &mut TypedModel) -> TractResult<usize> {
    replace_nodes(model, |model, node| {
        if node.op().name() != "DynamicQuantizeLinearU8" || node.outputs.len() != 3 {
            return Ok(None);
        }
        Ok(f32_input(model, node)?.map(|input| Replacement {
            input,
            ops: vec![Box::new(DynamicQuantU8)],
            replaced: node.id,
        }))
    })
}

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

/// ONNX `QuantizeLinear` to uint8 of a float32 tensor, as tract computes it (times the
/// reciprocal of the scale, rounded half to even, plus the zero point, saturated), written so
/// the compiler vectorises it.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct QuantU8 {
    /// `1 / scale`, as its bits.
    pub inv_scale_bits: u32,
    pub zero_point: u8,
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
        let y = quantize_u8(xs, x.shape(), self.zero_point, |x| x * inv)?;
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for QuantU8 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        expect_f32(inputs, "QuantU8")?;
        Ok(tvec!(u8::fact(inputs[0].shape.clone())))
    }
    as_op!();
}

/// Replaces each of tract's float32 → uint8 `QuantizeLinear` left in an optimised model with
/// a [`QuantU8`]; returns how many.
pub fn fuse_quantize(model: &mut TypedModel) -> TractResult<usize> {
    replace_nodes(model, |model, node| {
        let Some(q) = node
            .op_as::<ElementWiseOp>()
            .and_then(|e| e.0.downcast_ref::<QuantizeLinearU8>())
        else {
            return Ok(None);
        };
        Ok(f32_input(model, node)?.map(|input| Replacement {
            input,
            ops: vec![Box::new(QuantU8 {
                inv_scale_bits: q.scale.to_bits(),
                zero_point: q.zero_point,
            })],
            replaced: node.id,
        }))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::testgraph::{
        float, float_init, floats, init, int, int_init, model_bytes, node, value,
    };
    use tract_onnx::pb;
    use tract_onnx::pb::tensor_proto::DataType;

    /// LayerNorm without scale and shift, in f64, over an axis of length `d` with stride `inner`.
    fn direct(x: &[f32], d: usize, inner: usize, eps: f64) -> Vec<f32> {
        let mut y = vec![0f32; x.len()];
        for (o, block) in x.chunks(d * inner).enumerate() {
            for i in 0..inner {
                let v: Vec<f64> = (0..d).map(|k| block[k * inner + i] as f64).collect();
                let mean = v.iter().sum::<f64>() / d as f64;
                let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / d as f64;
                for (k, a) in v.iter().enumerate() {
                    y[o * d * inner + k * inner + i] = ((a - mean) / (var + eps).sqrt()) as f32;
                }
            }
        }
        y
    }

    #[test]
    fn the_layer_norm_kernel_matches_a_direct_computation() {
        // Strided (tract's feature-major ViT layout), contiguous, and one of each size 1.
        for (outer, d, inner) in [(1, 768, 197), (2, 12, 7), (3, 16, 1), (2, 1, 5), (1, 5, 1)] {
            let x: Vec<f32> = floats(7, outer * d * inner)
                .iter()
                .map(|v| v * 3.0 + 0.5)
                .collect();
            let mut y = vec![f32::NAN; x.len()];
            layer_norm_core(&x, &mut y, d, inner, 1e-6);
            let want = direct(&x, d, inner, 1e-6);
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 2e-5,
                    "{outer}x{d}x{inner} [{i}]: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn rewrite_choice_values() {
        assert_eq!(Rewrites::parse(None).unwrap(), Rewrites::All);
        assert_eq!(Rewrites::parse(Some(" all")).unwrap(), Rewrites::All);
        assert_eq!(Rewrites::parse(Some("none")).unwrap(), Rewrites::None);
        let err = Rewrites::parse(Some("some")).unwrap_err().to_string();
        assert!(err.contains(Rewrites::ENV) && err.contains("none"), "{err}");
    }

    fn typed(bytes: &[u8]) -> TypedModel {
        tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .unwrap()
            .into_typed()
            .unwrap()
    }

    fn run(model: TypedModel, x: &Tensor) -> Vec<f32> {
        let out = model
            .into_runnable()
            .unwrap()
            .run(tvec!(x.clone().into()))
            .unwrap();
        let ram = out[0].try_as_plain_ram().unwrap();
        ram.as_slice::<f32>().unwrap().to_vec()
    }

    fn count<O: Op>(model: &TypedModel) -> usize {
        model.nodes().iter().filter(|n| n.op_is::<O>()).count()
    }

    fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            assert!(
                p.is_finite() && (p - q).abs() <= tol * (1.0 + q.abs()),
                "{what}[{i}]: {p} vs {q}"
            );
        }
    }

    /// Two pre-norm halves of a transformer block on `[batch, 9, 16]`: `LayerNorm`, a product,
    /// a residual, `LayerNorm`, a product.
    fn two_layer_norms(batch: Option<i64>) -> Vec<u8> {
        let ln = |x: &str, g: &str, b: &str, out: &str| {
            node(
                "LayerNormalization",
                &[x, g, b],
                out,
                vec![int("axis", -1), float("epsilon", 1e-6)],
            )
        };
        let graph = pb::GraphProto {
            name: "norms".into(),
            node: vec![
                ln("x", "g1", "b1", "h1"),
                node("MatMul", &["h1", "w1"], "a", vec![]),
                node("Add", &["x", "a"], "r", vec![]),
                ln("r", "g2", "b2", "h2"),
                node("MatMul", &["h2", "w2"], "y", vec![]),
            ],
            initializer: vec![
                init("g1", &[16], 1),
                init("b1", &[16], 2),
                init("w1", &[16, 16], 3),
                init("g2", &[16], 4),
                init("b2", &[16], 5),
                init("w2", &[16, 24], 6),
            ],
            input: vec![value("x", &[batch, Some(9), Some(16)])],
            output: vec![value("y", &[batch, Some(9), Some(24)])],
            ..Default::default()
        };
        model_bytes(graph, 17)
    }

    #[test]
    fn layer_norms_are_fused_and_keep_the_outputs() {
        for (batch, n) in [(Some(1), 1), (Some(3), 3), (None, 2)] {
            let bytes = two_layer_norms(batch);
            let mut model = tract_onnx::onnx().model_for_read(&mut &bytes[..]).unwrap();
            if batch.is_none() {
                let b = model.sym("batch");
                let shape: TVec<TDim> = tvec![b.into(), 9.into(), 16.into()];
                model
                    .set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape))
                    .unwrap();
            }
            let model = model.into_typed().unwrap();
            let (ours, done) = optimize(model.clone(), Rewrites::All).unwrap();
            let (theirs, none) = optimize(model, Rewrites::None).unwrap();
            let what = format!("batch {batch:?}");
            assert_eq!(done.layer_norms, 2, "{what}: {done:?}");
            assert_eq!(none, Rewritten::default(), "{what}");
            assert_eq!(count::<LayerNormCore>(&ours), 2, "{what}");
            assert_eq!(count::<RmsNorm>(&ours), 0, "{what}: {ours}");
            assert!(
                count::<RmsNorm>(&theirs) > 0,
                "{what}: tract's own form changed"
            );
            let x: Tensor = tract_ndarray::Array3::from_shape_vec(
                (n, 9, 16),
                floats(11, n * 9 * 16)
                    .iter()
                    .map(|v| v * 4.0 - 1.0)
                    .collect(),
            )
            .unwrap()
            .into();
            let (a, b) = (run(ours, &x), run(theirs, &x));
            assert_close(&what, &a, &b, 1e-5);
            assert!(a.iter().any(|v| v.abs() > 0.1), "{what}: outputs near zero");
        }
    }

    /// An int8 weight `wq` `[k, n]` with a scale per column `ws` and zero points `wz` of 0 (one
    /// per column, or one), as `mae-export` writes them.
    fn int8_weight(k: i64, n: i64, per_column_zero: bool) -> Vec<pb::TensorProto> {
        let scales: Vec<f32> = (0..n).map(|j| 0.01 + 0.001 * (j % 7) as f32).collect();
        let weights: Vec<i32> = floats(21, (k * n) as usize)
            .iter()
            .map(|v| (v * 127.0) as i32)
            .collect();
        let zeros: &[i64] = if per_column_zero { &[n] } else { &[] };
        vec![
            int_init("wq", &[k, n], DataType::Int8, weights),
            float_init("ws", &[n], scales),
            int_init(
                "wz",
                zeros,
                DataType::Int8,
                vec![0; zeros.iter().product::<i64>() as usize],
            ),
        ]
    }

    /// `model` optimised with the rewrites (and what they did), and without.
    fn both_ways(model: TypedModel) -> (TypedModel, Rewritten, TypedModel) {
        let (ours, done) = optimize(model.clone(), Rewrites::All).unwrap();
        let (theirs, _) = optimize(model, Rewrites::None).unwrap();
        (ours, done, theirs)
    }

    /// Static int8 as `mae-export` writes it: `x` through QuantizeLinear → DequantizeLinear,
    /// times an int8 weight `[k, n]` with per-column scales through DequantizeLinear. Its
    /// float32 form (`k · n · 4` bytes) is larger than what tract folds by itself.
    fn static_int8(k: i64, n: i64) -> Vec<u8> {
        let graph = pb::GraphProto {
            name: "qdq".into(),
            node: vec![
                node("QuantizeLinear", &["x", "xs", "xz"], "xq", vec![]),
                node("DequantizeLinear", &["xq", "xs", "xz"], "xd", vec![]),
                node(
                    "DequantizeLinear",
                    &["wq", "ws", "wz"],
                    "wd",
                    vec![int("axis", 1)],
                ),
                node("MatMul", &["xd", "wd"], "y", vec![]),
            ],
            initializer: vec![
                float_init("xs", &[], vec![0.02]),
                int_init("xz", &[], DataType::Uint8, vec![120]),
            ]
            .into_iter()
            .chain(int8_weight(k, n, true))
            .collect(),
            input: vec![value("x", &[Some(1), Some(4), Some(k)])],
            output: vec![value("y", &[Some(1), Some(4), Some(n)])],
            ..Default::default()
        };
        model_bytes(graph, 17)
    }

    #[test]
    fn static_int8_weights_are_folded_and_quantizers_vectorised() {
        let (k, n) = (1024, 1040);
        let (ours, done, theirs) = both_ways(typed(&static_int8(k, n)));
        assert_eq!(done.folded_weights, 1, "{done:?}");
        assert_eq!(done.quantizers, 1, "{done:?}");
        assert_eq!(count::<QuantU8>(&ours), 1);
        // No integer constant is left in our plan; tract's own keeps the int8 weight.
        let int_consts = |m: &TypedModel| {
            m.nodes()
                .iter()
                .filter(|n| n.op_is::<Const>() && n.outputs[0].fact.datum_type.is_integer())
                .filter(|n| n.outputs[0].fact.shape.volume().to_usize().unwrap_or(0) > 1)
                .count()
        };
        assert_eq!(int_consts(&ours), 0, "{ours}");
        assert!(int_consts(&theirs) > 0, "tract's own form changed");
        // Inputs on both sides of the quantisation grid's range, so that clamping happens.
        let x: Tensor = tract_ndarray::Array3::from_shape_vec(
            (1, 4, k as usize),
            floats(5, 4 * k as usize).iter().map(|v| v * 3.0).collect(),
        )
        .unwrap()
        .into();
        let (a, b) = (run(ours, &x), run(theirs, &x));
        assert_close("static int8", &a, &b, 1e-4);
    }
    /// Dynamic int8 as `mae-export` writes it: `DynamicQuantizeLinear`, `MatMulInteger` with an
    /// int8 weight `[k, n]` (zero points 0), cast, times the two scales.
    fn dynamic_int8(k: i64, n: i64) -> Vec<u8> {
        let mut quantize = node("DynamicQuantizeLinear", &["x"], "xq", vec![]);
        quantize.output = vec!["xq".into(), "xs".into(), "xz".into()];
        let to = vec![int("to", DataType::Float as i64)];
        let graph = pb::GraphProto {
            name: "dynamic".into(),
            node: vec![
                quantize,
                node("MatMulInteger", &["xq", "wq", "xz", "wz"], "acc", vec![]),
                node("Cast", &["acc"], "accf", to),
                node("Mul", &["xs", "ws"], "scale", vec![]),
                node("Mul", &["accf", "scale"], "y", vec![]),
            ],
            initializer: int8_weight(k, n, false),
            input: vec![value("x", &[Some(1), Some(5), Some(k)])],
            output: vec![value("y", &[Some(1), Some(5), Some(n)])],
            ..Default::default()
        };
        model_bytes(graph, 17)
    }

    #[test]
    fn dynamic_int8_runs_tracts_numbers_with_its_weight_sums_folded() {
        // Weights of 1024 × 2048: tract would sum their 8 MiB int32 copy on every pass.
        let (k, n) = (1024, 2048);
        let (ours, done, theirs) = both_ways(typed(&dynamic_int8(k, n)));
        assert_eq!(done.dynamic_quants, 1, "{done:?}");
        assert_eq!(done.folded_weights, 1, "{done:?}");
        let reduces = |m: &TypedModel| count::<Reduce>(m);
        assert_eq!(reduces(&ours), 0, "{ours}");
        assert!(reduces(&theirs) > 0, "tract's own form changed");
        // A range that does not hold zero on one side, values exactly on the grid's half
        // steps, and all zeros.
        let xs = [
            floats(3, 5 * k as usize)
                .iter()
                .map(|v| v * 2.0 + 0.5)
                .collect::<Vec<f32>>(),
            (0..5 * k).map(|i| (i % 256) as f32 * 0.5).collect(),
            vec![0.0; 5 * k as usize],
        ];
        for (case, x) in xs.into_iter().enumerate() {
            let x: Tensor = tract_ndarray::Array3::from_shape_vec((1, 5, k as usize), x)
                .unwrap()
                .into();
            let (a, b) = (run(ours.clone(), &x), run(theirs.clone(), &x));
            assert_eq!(a, b, "case {case}: not tract's numbers");
        }
    }

    #[test]
    fn the_dynamic_range_holds_zero() {
        assert_eq!(dynamic_range(&[]), (0.0, 0));
        let (s, z) = dynamic_range(&[0.0, 2.0, -3.0, -2.5, 1.34, 0.5]);
        assert!((s - 5.0 / 255.0).abs() < 1e-9 && z == 153, "{s} {z}");
        let (s, z) = dynamic_range(&[1.0, 2.1, 4.0]);
        assert!((s - 4.0 / 255.0).abs() < 1e-9 && z == 0, "{s} {z}");
        // Past the 16-wide lanes: the minimum in the remainder.
        let mut v = vec![3.0f32; 37];
        v[36] = -1.0;
        let (s, z) = dynamic_range(&v);
        assert!((s - 4.0 / 255.0).abs() < 1e-9 && z == 64, "{s} {z}");
    }
    /// `static_int8`'s file through [`parse`]'s rewrite, and tract's own reading of it.
    fn integer_and_own(bytes: &[u8]) -> (usize, TypedModel, Rewritten, TypedModel) {
        use prost::Message;
        let mut proto = pb::ModelProto::decode(bytes).unwrap();
        let integer = qdq_to_integer(proto.graph.as_mut().unwrap());
        let model = tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .unwrap()
            .into_typed()
            .unwrap();
        let (ours, done) = optimize(model, Rewrites::All).unwrap();
        let (theirs, _) = optimize(typed(bytes), Rewrites::None).unwrap();
        (integer, ours, done, theirs)
    }

    #[test]
    fn static_int8_products_become_integer_products() {
        let (k, n) = (256, 96);
        let (integer, ours, done, theirs) = integer_and_own(&static_int8(k, n));
        assert_eq!(integer, 1);
        assert_eq!(done.quantizers, 1, "{done:?}");
        assert_eq!(count::<QuantU8>(&ours), 1);
        // The weight stays int8: no float32 constant of its size.
        let float_weights = ours
            .nodes()
            .iter()
            .filter(|node| node.op_is::<Const>())
            .filter(|node| {
                let f = &node.outputs[0].fact;
                f.datum_type == f32::datum_type()
                    && f.shape.volume().to_usize().unwrap_or(0) >= (k * n) as usize
            })
            .count();
        assert_eq!(float_weights, 0, "{ours}");
        let x: Tensor = tract_ndarray::Array3::from_shape_vec(
            (1, 4, k as usize),
            floats(5, 4 * k as usize).iter().map(|v| v * 3.0).collect(),
        )
        .unwrap()
        .into();
        let (a, b) = (run(ours, &x), run(theirs, &x));
        // The same sum of products, in integers instead of float32.
        assert_close("integer products", &a, &b, 1e-4);
        assert!(a.iter().any(|v| v.abs() > 0.1), "outputs near zero");
    }

    #[test]
    fn products_that_are_not_static_int8_are_left_alone() {
        use prost::Message;
        let bytes = static_int8(64, 32);
        let mut proto = pb::ModelProto::decode(&bytes[..]).unwrap();
        let graph = proto.graph.as_mut().unwrap();
        // A weight zero point other than 0, then a float weight: no integer form is written.
        let mut other = graph.clone();
        let wz = graph
            .initializer
            .iter_mut()
            .find(|t| t.name == "wz")
            .unwrap();
        wz.int32_data[3] = 1;
        assert_eq!(qdq_to_integer(graph), 0);
        other.initializer.retain(|t| t.name != "wq");
        other.initializer.push(init("wq", &[64, 32], 9));
        assert_eq!(qdq_to_integer(&mut other), 0);
        // Two-layer float graphs have no QDQ at all.
        let mut plain = pb::ModelProto::decode(&two_layer_norms(Some(1))[..]).unwrap();
        assert_eq!(qdq_to_integer(plain.graph.as_mut().unwrap()), 0);
    }
    #[test]
    fn the_quantizer_gives_tracts_numbers() {
        use tract_onnx::tract_core::ops::quant::quantize_linear_f32_u8;
        // Half steps (ties), both ends of the range and past them, and values between.
        let xs: Vec<f32> = (-700..700)
            .map(|i| i as f32 * 0.25)
            .chain(floats(4, 4000).iter().map(|v| v * 300.0))
            .collect();
        for (inv, zp) in [(1.0f32, 128u8), (2.0, 0), (0.37, 255), (41.5, 3)] {
            let op = QuantU8 {
                inv_scale_bits: inv.to_bits(),
                zero_point: zp,
            };
            let x = tract_ndarray::Array1::from(xs.clone())
                .into_tensor()
                .into_tvalue();
            let y = op.eval(&EvalContext::out_of_plan(), tvec!(x)).unwrap();
            let ram = y[0].try_as_plain_ram().unwrap();
            let want: Vec<u8> = xs
                .iter()
                .map(|x| quantize_linear_f32_u8(*x, inv, zp as i32))
                .collect();
            assert_eq!(
                ram.as_slice::<u8>().unwrap(),
                &want[..],
                "1/scale {inv}, zero {zp}"
            );
        }
    }
    /// `MatMul` of two activations, each through QuantizeLinear → DequantizeLinear (uint8,
    /// scales powers of two, so that `x / scale` is exact), as ONNX Runtime's quantizer writes
    /// attention's products: `a` `[1, 4, 6]` times `b` `[1, 6, 5]`.
    fn quantized_activations() -> Vec<u8> {
        let graph = pb::GraphProto {
            name: "two activations".into(),
            node: vec![
                node("QuantizeLinear", &["a", "sa", "za"], "aq", vec![]),
                node("DequantizeLinear", &["aq", "sa", "za"], "ad", vec![]),
                node("QuantizeLinear", &["b", "sb", "zb"], "bq", vec![]),
                node("DequantizeLinear", &["bq", "sb", "zb"], "bd", vec![]),
                node("MatMul", &["ad", "bd"], "y", vec![]),
            ],
            initializer: vec![
                float_init("sa", &[], vec![0.0625]),
                int_init("za", &[], DataType::Uint8, vec![100]),
                float_init("sb", &[], vec![0.03125]),
                int_init("zb", &[], DataType::Uint8, vec![140]),
            ],
            input: vec![
                value("a", &[Some(1), Some(4), Some(6)]),
                value("b", &[Some(1), Some(6), Some(5)]),
            ],
            output: vec![value("y", &[Some(1), Some(4), Some(5)])],
            ..Default::default()
        };
        model_bytes(graph, 17)
    }

    #[test]
    fn dequantized_activations_multiply_as_onnx_says() {
        use prost::Message;
        let bytes = quantized_activations();
        let mut proto = pb::ModelProto::decode(&bytes[..]).unwrap();
        assert_eq!(
            dequantize_activations_as_float(proto.graph.as_mut().unwrap()),
            2
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("two.onnx");
        std::fs::write(&path, &bytes).unwrap();
        let (model, integer) = parse(&path, Rewrites::All).unwrap();
        assert_eq!(integer, 0);
        let (model, _) = optimize(model.into_typed().unwrap(), Rewrites::All).unwrap();
        let a: Vec<f32> = floats(31, 24).iter().map(|v| v * 12.0).collect();
        let b: Vec<f32> = floats(32, 30).iter().map(|v| v * 5.0).collect();
        let out = model
            .into_runnable()
            .unwrap()
            .run(tvec!(
                tract_ndarray::Array3::from_shape_vec((1, 4, 6), a.clone())
                    .unwrap()
                    .into_tensor()
                    .into(),
                tract_ndarray::Array3::from_shape_vec((1, 6, 5), b.clone())
                    .unwrap()
                    .into_tensor()
                    .into()
            ))
            .unwrap();
        let got = out[0]
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec();
        // ONNX: q = saturate(round_half_even(x / scale) + zero), x' = (q - zero) · scale.
        let fake = |x: f32, s: f32, z: f32| ((x / s).round_ties_even() + z).clamp(0.0, 255.0) - z;
        let (ad, bd): (Vec<f64>, Vec<f64>) = (
            a.iter()
                .map(|x| (fake(*x, 0.0625, 100.0) * 0.0625) as f64)
                .collect(),
            b.iter()
                .map(|x| (fake(*x, 0.03125, 140.0) * 0.03125) as f64)
                .collect(),
        );
        assert!(
            ad.contains(&((255.0 - 100.0) * 0.0625)),
            "no clamping at the top"
        );
        for i in 0..4 {
            for j in 0..5 {
                let want: f64 = (0..6).map(|k| ad[i * 6 + k] * bd[k * 5 + j]).sum();
                let g = got[i * 5 + j] as f64;
                assert!(
                    (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "y[{i}][{j}]: {g} vs {want}"
                );
            }
        }
    }
}
