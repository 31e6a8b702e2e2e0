//! Linear layers on mae-run's packed kernels: one [`Product`] op, generic over its packed
//! weights, in place of tract's product and what follows it.
//!
//! - [`dense_products`]: each float32 product of an activation and constant weights, with the
//!   bias and exact GELU that follow folded in ([`DenseProduct`], on [`crate::kernels::f32`]).
//! - [`quant_products`]: each int8 layer, from its quantizer to its scaled float32 output, with
//!   the bias and GELU after it ([`QuantProduct`], on [`crate::kernels::i8`]): tract's numbers
//!   (exact integer sums, scaled as tract scales them).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::quant::QuantizeLinearU8;

use crate::accel::graph::{self, Epilogue, Replacement};
use crate::kernels::driver::Ending;
use crate::kernels::f32::{F32Tile, PackedWeights};
use crate::kernels::i8::{I8Tile, PackedI8};
use crate::kernels::quantize::ActivationQuant;
use crate::kernels::Strides;

/// Weights packed for one of the kernels, as the [`Product`] op needs them.
pub trait Packed: std::fmt::Debug + Clone + PartialEq + Send + Sync + 'static {
    /// The kernel's choice of tile.
    type Tile: std::fmt::Debug + Copy + PartialEq + Eq + Send + Sync + 'static;
    /// The op's name in tract's plans.
    const NAME: &'static str;
    /// `(k, n)`.
    fn extents(&self) -> (usize, usize);
    /// What the op's description says besides its extents and tile.
    fn detail(&self) -> Option<String>;
    /// The bias and GELU folded into the tiles.
    fn end(&mut self) -> &mut Ending;
    /// The product of `xs` from value `first` on (`m × k` at `a`) as a tensor of `shape`
    /// holding `m × n` at `c`; a dynamic quantization takes the range of all of `xs`.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        xs: &[f32],
        first: usize,
        m: usize,
        a: Strides,
        shape: &[usize],
        c: Strides,
        tile: Self::Tile,
    ) -> anyhow::Result<Tensor>;
}

impl Packed for PackedWeights {
    type Tile = F32Tile;
    const NAME: &'static str = "DenseProduct";

    fn extents(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    fn detail(&self) -> Option<String> {
        None
    }

    fn end(&mut self) -> &mut Ending {
        &mut self.end
    }

    fn run(
        &self,
        xs: &[f32],
        first: usize,
        m: usize,
        a: Strides,
        shape: &[usize],
        c: Strides,
        tile: F32Tile,
    ) -> anyhow::Result<Tensor> {
        let Some(xs) = xs.get(first..) else {
            anyhow::bail!("dense product: rows from value {first} of {}", xs.len())
        };
        crate::kernels::f32::product_tensor(xs, m, a, self, shape, c, tile)
    }
}

impl Packed for PackedI8 {
    type Tile = I8Tile;
    const NAME: &'static str = "QuantProduct";

    fn extents(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    fn detail(&self) -> Option<String> {
        Some(format!("{:?}", self.quant))
    }

    fn end(&mut self) -> &mut Ending {
        &mut self.end
    }

    fn run(
        &self,
        xs: &[f32],
        first: usize,
        m: usize,
        a: Strides,
        shape: &[usize],
        c: Strides,
        tile: I8Tile,
    ) -> anyhow::Result<Tensor> {
        crate::kernels::i8::quant_product_tensor(xs, first, m, a, self, shape, c, tile)
    }
}

/// A product of a float32 activation and constant packed weights (a linear layer), from the
/// activation to the float32 output, with what the weights fold in. Shapes are concrete: the
/// input holds `m × k` values at `a`'s strides, the output `m × n` at `c`'s.
#[derive(Debug, Clone)]
pub struct Product<W: Packed> {
    weights: Arc<W>,
    input_shape: TVec<usize>,
    output_shape: TVec<usize>,
    /// The output's axis of the weights' columns (`n`).
    n_axis: usize,
    /// The first input value of the rows multiplied (non-zero where the graph multiplies only
    /// later rows of what it quantized).
    first: usize,
    m: usize,
    a: Strides,
    c: Strides,
    tile: W::Tile,
}

/// A float32 linear layer on [`crate::kernels::f32`].
pub type DenseProduct = Product<PackedWeights>;
/// An int8 linear layer on [`crate::kernels::i8`].
pub type QuantProduct = Product<PackedI8>;

impl<W: Packed> PartialEq for Product<W> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights)
            && (
                &self.input_shape,
                &self.output_shape,
                self.n_axis,
                self.first,
                self.m,
                self.a,
                self.c,
                self.tile,
            ) == (
                &other.input_shape,
                &other.output_shape,
                other.n_axis,
                other.first,
                other.m,
                other.a,
                other.c,
                other.tile,
            )
    }
}

impl<W: Packed> Eq for Product<W> {}

impl<W: Packed> Op for Product<W> {
    fn name(&self) -> StaticName {
        W::NAME.into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        let (k, n) = self.weights.extents();
        let detail = self
            .weights
            .detail()
            .map_or(String::new(), |d| format!(", {d}"));
        let rows = match self.first {
            0 => String::new(),
            f => format!(" (rows from input value {f})"),
        };
        Ok(vec![format!(
            "{}×{k}×{n}{detail}, {:?} tile{rows}",
            self.m, self.tile
        )])
    }
    op_as_typed_op!();
}

impl<W: Packed> EvalOp for Product<W> {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        ensure!(
            x.shape() == &*self.input_shape,
            "{}: input of shape {:?}, planned for {:?}",
            W::NAME,
            x.shape(),
            self.input_shape
        );
        let ram = x.try_as_plain_ram()?;
        let xs = ram.as_slice::<f32>()?;
        let out = self.weights.run(
            xs,
            self.first,
            self.m,
            self.a,
            &self.output_shape,
            self.c,
            self.tile,
        )?;
        Ok(tvec!(out.into_tvalue()))
    }
}

impl<W: Packed> TypedOp for Product<W> {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        graph::expect_f32(inputs, W::NAME)?;
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }
    as_op!();
}

impl<W: Packed> Product<W> {
    /// The packed weights.
    pub fn weights(&self) -> &W {
        &self.weights
    }

    /// The product of `axes` on `weights`, input of shape `xs` and output `out_shape`.
    fn new(
        weights: W,
        axes: &ProductAxes,
        xs: &[usize],
        out_shape: &[usize],
        tile: W::Tile,
    ) -> Self {
        Self {
            weights: Arc::new(weights),
            input_shape: xs.into(),
            output_shape: out_shape.into(),
            n_axis: axes.n_out,
            first: 0,
            m: axes.m,
            a: axes.a,
            c: axes.c,
            tile,
        }
    }

    /// This product with the bias and GELU after node `last_product` folded in: the
    /// replacement from `input` to the last node folded.
    fn with_epilogue(
        mut self,
        model: &TypedModel,
        input: OutletId,
        last_product: usize,
    ) -> TractResult<Replacement> {
        let (_, n) = self.weights.extents();
        let tail = Epilogue::after(model, last_product, &self.output_shape, (self.n_axis, n))?;
        Arc::get_mut(&mut self.weights)
            .expect("not shared yet")
            .end()
            .fold(tail.bias.as_deref(), tail.gelu);
        Ok(Replacement::one(input, self, tail.last))
    }
}

/// A product's axes read as a plain `m × k` by `k × n` product: the activation's token axis
/// (`m`), its contracted axes (`k`, one stride once flattened) and the weight's output axis
/// (`n`), all other axes of length one.
struct ProductAxes {
    m: usize,
    k: usize,
    n: usize,
    /// The activation's strides (rows `m`, columns `k`), and the output's (rows `m`, columns `n`).
    a: Strides,
    c: Strides,
    /// The output's axis of `n`.
    n_out: usize,
    /// The weights' stride along `n`.
    wn: usize,
    /// `(dim, activation stride, weight stride)` of each contracted axis, in the activation's
    /// memory order.
    k_axes: Vec<(usize, usize, usize)>,
}

impl ProductAxes {
    /// Reads `op`'s axes, the activation being input `xi` (of shape `xs`) and the weights
    /// input `wi` (`ws`); `None` for any other product (several `m` or `n` axes, repeated
    /// axes, contracted axes that do not flatten to one stride).
    fn read(
        op: &EinSum,
        (xi, xs): (usize, &[usize]),
        (wi, ws): (usize, &[usize]),
        out_shape: &[usize],
    ) -> Option<Self> {
        use graph::{single, strides_of};
        let (x_str, o_str, w_str) = (strides_of(xs), strides_of(out_shape), strides_of(ws));
        let mut k_axes: Vec<(usize, usize, usize)> = vec![];
        let (mut m_axis, mut n_axis) = (None, None);
        for axis in op.axes.iter_all_axes() {
            let (x, wp, o) = (
                single(&axis.inputs[xi])?,
                single(&axis.inputs[wi])?,
                single(&axis.outputs[0])?,
            );
            let dim = x
                .map(|p| xs[p])
                .or(wp.map(|p| ws[p]))
                .or(o.map(|p| out_shape[p]))
                .unwrap_or(1);
            if dim == 1 {
                continue;
            }
            match (x, wp, o) {
                (Some(x), Some(wp), None) => k_axes.push((dim, x_str[x], w_str[wp])),
                (Some(x), None, Some(o)) if m_axis.is_none() => {
                    m_axis = Some((dim, x_str[x], o_str[o]))
                }
                (None, Some(wp), Some(o)) if n_axis.is_none() => {
                    n_axis = Some((dim, w_str[wp], o_str[o], o))
                }
                _ => return None,
            }
        }
        let (n, wn, cn, n_out) = n_axis?;
        let (m, am, cm) = m_axis.unwrap_or((1, 0, 0));
        // The contracted axes, flattened in the activation's memory order: one stride.
        k_axes.sort_by_key(|&(_, sx, _)| std::cmp::Reverse(sx));
        let k: usize = k_axes.iter().map(|a| a.0).product();
        let &(_, ak, _) = k_axes.last()?;
        if k_axes.windows(2).any(|p| p[0].1 != p[1].0 * p[1].1) {
            return None;
        }
        Some(Self {
            m,
            k,
            n,
            a: Strides { row: am, col: ak },
            c: Strides { row: cm, col: cn },
            n_out,
            wn,
            k_axes,
        })
    }

    /// Where weight `(kk, j)` lies in the weights' values, `kk` in the flattened order (its
    /// digits are the contracted axes' indices).
    fn weight_index(&self, kk: usize, j: usize) -> usize {
        let (mut rest, mut at) = (kk, j * self.wn);
        for &(dim, _, sw) in self.k_axes.iter().rev() {
            at += (rest % dim) * sw;
            rest /= dim;
        }
        at
    }
}

/// Reads a float32 `EinSum` of an activation and a constant weight as a plain product (see
/// [`ProductAxes`]). Returns the op to put in its place, without bias, or `None` for any other
/// product (symbolic shapes, quantized, or axes [`ProductAxes`] does not read).
fn match_dense(
    model: &TypedModel,
    node: &TypedNode,
    tile: F32Tile,
) -> TractResult<Option<(OutletId, DenseProduct)>> {
    let Some(op) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    if op.q_params.is_some() || op.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
        return Ok(None);
    }
    let facts = [
        model.outlet_fact(node.inputs[0])?,
        model.outlet_fact(node.inputs[1])?,
    ];
    let (xi, wi) = match (&facts[0].konst, &facts[1].konst) {
        (None, Some(_)) => (0, 1),
        (Some(_), None) => (1, 0),
        _ => return Ok(None),
    };
    let out_fact = model.outlet_fact(node.id.into())?;
    if facts
        .iter()
        .chain([&out_fact])
        .any(|f| f.datum_type != f32::datum_type())
    {
        return Ok(None);
    }
    let (Some(xs), Some(out_shape)) = (facts[xi].shape.as_concrete(), out_fact.shape.as_concrete())
    else {
        return Ok(None);
    };
    let Some(w) = facts[wi].konst.clone() else {
        return Ok(None);
    };
    let Some(axes) = ProductAxes::read(op, (xi, xs), (wi, w.shape()), out_shape) else {
        return Ok(None);
    };
    let wv = w.cast_to::<f32>()?;
    let wv = wv.try_as_plain_ram()?;
    let wv = wv.as_slice::<f32>()?;
    let packed = PackedWeights::new(axes.k, axes.n, |kk, j| wv[axes.weight_index(kk, j)]);
    let op = Product::new(packed, &axes, xs, out_shape, tile);
    Ok(Some((node.inputs[xi], op)))
}

/// Puts a [`DenseProduct`] in place of each float32 product of an activation and constant
/// weights in a decluttered model (before tract's codegen), with the constant it adds next
/// folded in as its bias; returns how many.
pub fn dense_products(model: &mut TypedModel, tile: F32Tile) -> TractResult<usize> {
    graph::replace_nodes(model, |model, node| {
        let Some((input, op)) = match_dense(model, node, tile)? else {
            return Ok(None);
        };
        op.with_epilogue(model, input, node.id).map(Some)
    })
}

/// The inputs of the `EinSum` that tract makes of ONNX `MatMulInteger`, by position.
mod q_inputs {
    pub const A: usize = 0;
    pub const B: usize = 1;
    pub const A_ZERO: usize = 3;
    /// The bias, and the zero points of `b` and of the output: zeros in this form.
    pub const ZEROS: [usize; 3] = [2, 5, 7];
    /// The scales of `a`, `b` and the output: ones in this form.
    pub const UNIT_SCALES: [usize; 3] = [4, 6, 8];
    pub const COUNT: usize = 9;
}

/// The activation's quantizer before an integer product (input `q` of it): tract's
/// `DynamicQuantizeLinearU8`, or a `QuantizeLinear` with a constant scale and zero point.
/// Returns the float32 activation and how it is quantized.
fn match_quantizer(
    model: &TypedModel,
    node: &TypedNode,
) -> Option<(OutletId, ActivationQuant, usize, usize)> {
    use q_inputs::{A, A_ZERO};
    let i = &node.inputs;
    let (a, first) = rows_of(model, i[A]).unwrap_or((i[A], 0));
    let q = model.node(a.node);
    if graph::is_dynamic_quantizer(q) && a.slot == 0 && i[A_ZERO] == OutletId::new(q.id, 2) {
        return Some((q.inputs[0], ActivationQuant::Dynamic, q.id, first));
    }
    let ql = q
        .op_as::<ElementWiseOp>()
        .and_then(|e| e.0.downcast_ref::<QuantizeLinearU8>())?;
    let zero_point = ql.zero_point;
    if !graph::const_all(model, i[A_ZERO], zero_point as f32) {
        return None;
    }
    let quant = ActivationQuant::Static {
        inv_scale: ql.scale,
        zero_point,
    };
    Some((q.inputs[0], quant, q.id, first))
}

/// Where `outlet` is a `Slice` of concrete bounds of a tensor of rank 3 at most, along an axis
/// with only axes of length one before it (as tract makes of a layer whose later consumers
/// need only some tokens), so one block of the tensor's values: the sliced tensor and the
/// block's first value.
fn rows_of(model: &TypedModel, outlet: OutletId) -> Option<(OutletId, usize)> {
    use tract_onnx::tract_core::ops::array::Slice;
    let node = model.node(outlet.node);
    let slice = node.op_as::<Slice>()?;
    let whole = *node.inputs.first()?;
    let shape = model.outlet_fact(whole).ok()?.shape.as_concrete()?.to_vec();
    let start = slice.start.to_usize().ok()?;
    let axis = slice.axis;
    if axis >= shape.len() || shape[..axis].iter().any(|&d| d != 1) || shape.len() > 3 {
        return None;
    }
    let stride: usize = shape[axis + 1..].iter().product();
    Some((whole, start * stride))
}

/// The columns' scales a quantized layer's output is multiplied by (`scales`, the other input
/// of the product by them), for an output of rank `rank` with `n` columns on axis `n_out`:
/// constants for a static quantizer; for a dynamic one (`q`, its node), the weights' constant
/// scales times the input's scale, which are returned.
fn match_scales(
    model: &TypedModel,
    scales: OutletId,
    quant: ActivationQuant,
    q: usize,
    (rank, n_out, n): (usize, usize, usize),
) -> TractResult<Option<Vec<f32>>> {
    if let ActivationQuant::Static { .. } = quant {
        return match &model.outlet_fact(scales)?.konst {
            Some(k) => graph::along_n(k, rank, (n_out, n)),
            None => Ok(None),
        };
    }
    let s_fact = model.outlet_fact(scales)?;
    let shape_along_n = s_fact.shape.as_concrete().is_some_and(|s| {
        s.len() <= rank
            && s.iter()
                .enumerate()
                .all(|(a, &d)| d == 1 || (a + rank - s.len() == n_out && d == n))
    });
    let prod = model.node(graph::through_added_axes(model, scales).node);
    let [p, r] = prod.inputs[..] else {
        return Ok(None);
    };
    if !shape_along_n || !graph::is_generic_mul(prod) {
        return Ok(None);
    }
    let (kp, kr) = (
        model.outlet_fact(p)?.konst.clone(),
        model.outlet_fact(r)?.konst.clone(),
    );
    let (konst, other) = match (kp, kr) {
        (Some(k), None) => (k, r),
        (None, Some(k)) => (k, p),
        _ => return Ok(None),
    };
    let values = konst.cast_to::<f32>()?;
    let values = values.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let input_scale = OutletId::new(q, 1);
    let ok = graph::through_added_axes(model, other) == input_scale
        && konst.datum_type() == f32::datum_type()
        && (values.len() == 1 || values.len() == n);
    Ok(ok.then_some(values))
}

/// Reads tract's decluttered form of a quantized linear layer, from its integer product
/// (`node`, an `EinSum` on int32 of uint8 activations and constant int8 weights with zero
/// points, as ONNX `MatMulInteger` becomes): before it, the activation's quantizer
/// ([`match_quantizer`]); after it, a cast to float32 and a product by the columns' scales
/// ([`match_scales`]). Returns the float32 activation, the op to put in place of the scaled
/// product and that product's node; `None` for any other form.
fn match_quant(
    model: &TypedModel,
    node: &TypedNode,
    tile: I8Tile,
) -> TractResult<Option<(OutletId, QuantProduct, usize)>> {
    use q_inputs::{B, COUNT, UNIT_SCALES, ZEROS};
    use tract_onnx::tract_core::ops::cast::Cast;
    let Some(op) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    // No bias, unit scales, zero `b` and output zero points, constant int8 weights.
    let i = &node.inputs;
    if op.operating_dt != i32::datum_type() || i.len() != COUNT {
        return Ok(None);
    }
    let unit = UNIT_SCALES
        .iter()
        .all(|&s| graph::const_all(model, i[s], 1.0));
    let zero = ZEROS.iter().all(|&s| graph::const_all(model, i[s], 0.0));
    let out_fact = model.outlet_fact(node.id.into())?;
    let Some(w) = model.outlet_fact(i[B])?.konst.clone() else {
        return Ok(None);
    };
    if !unit
        || !zero
        || w.datum_type() != i8::datum_type()
        || out_fact.datum_type != i32::datum_type()
    {
        return Ok(None);
    }
    let Some((x, quant, q, first)) = match_quantizer(model, node) else {
        return Ok(None);
    };
    let x_fact = model.outlet_fact(x)?;
    // The product's own input: the quantized tensor, or the rows of it that it multiplies.
    let a_fact = model.outlet_fact(i[q_inputs::A])?;
    let (Some(whole), Some(xs), Some(out_shape)) = (
        x_fact.shape.as_concrete(),
        a_fact.shape.as_concrete(),
        out_fact.shape.as_concrete(),
    ) else {
        return Ok(None);
    };
    if x_fact.datum_type != f32::datum_type() || model.node(q).inputs.len() != 1 {
        return Ok(None);
    }
    let Some(axes) = ProductAxes::read(op, (0, xs), (1, w.shape()), out_shape) else {
        return Ok(None);
    };
    // The cast to float32, then the product by the columns' scales.
    let Some(cast) = graph::only_successor(model, node.id)
        .filter(|c| c.op_as::<Cast>().is_some_and(|c| c.to == f32::datum_type()))
    else {
        return Ok(None);
    };
    let Some(mul) = graph::only_successor(model, cast.id).filter(|m| graph::is_generic_mul(m))
    else {
        return Ok(None);
    };
    if model.outlet_fact(mul.id.into())?.shape.as_concrete() != Some(out_shape) {
        return Ok(None);
    }
    let Some(scales) = graph::other_input(mul, cast.id) else {
        return Ok(None);
    };
    let shape = (out_shape.len(), axes.n_out, axes.n);
    let Some(scales) = match_scales(model, scales, quant, q, shape)? else {
        return Ok(None);
    };
    let wv = w.try_as_plain_ram()?;
    let wv = wv.as_slice::<i8>()?;
    let packed = PackedI8::new(
        axes.k,
        axes.n,
        |kk, j| wv[axes.weight_index(kk, j)],
        &scales,
        quant,
    )?
    .prepare(tile);
    let mut op = Product::new(packed, &axes, whole, out_shape, tile);
    op.first = first;
    Ok(Some((x, op, mul.id)))
}

/// Puts a [`QuantProduct`] in place of each quantized linear layer in a decluttered model
/// (before tract's codegen), from its quantizer to its scaled output, with the constant it
/// adds next and an exact GELU after that folded in; returns how many.
pub fn quant_products(model: &mut TypedModel, tile: I8Tile) -> TractResult<usize> {
    graph::replace_nodes(model, |model, node| {
        let Some((input, op, scaled)) = match_quant(model, node, tile)? else {
            return Ok(None);
        };
        op.with_epilogue(model, input, scaled).map(Some)
    })
}
