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
//! - **Float linear layers** (CPUs with AVX-512F): tract's f32 kernel reaches about half of
//!   ONNX Runtime's speed on an Intel Xeon (Ice Lake) on ViT-B's products
//!   (`runtime/examples/tract_matmul.rs`). [`dense_products`] puts a [`DenseProduct`] in place of
//!   each product of an activation and constant weights, on `crate::dense`'s weights packed at
//!   load, with the bias and an exact GELU that follow folded in. [`patch_products`] does the
//!   same for the patch embedding's convolution (stride = kernel), which tract runs through an
//!   im2col and its own kernel: one [`PatchProduct`] copies each patch into a row and multiplies.
//! - **Attention** (same CPUs): tract splits the `qkv` product into heads by a reshape, two
//!   moves and three gathers (copies), then runs two batched products and a softmax;
//!   [`fuse_attention`] makes it one [`SelfAttention`], heads over the threads, reading `qkv` in
//!   place. Plans of a concrete shape only (the one-image plan); `MAE_TRACT_REWRITES=no-products`
//!   keeps tract's products and attention with the other rewrites.
//! - **Int8 linear layers** (CPUs with AVX-512 VNNI): tract's int8 products, with the
//!   quantizer before them and the scaling after, took as long as the float ones.
//!   [`quant_products`] puts one [`QuantProduct`] from the float activation to the float output
//!   of each dynamic or static int8 layer, on `crate::qdense`'s int8 weights packed at load:
//!   tract's numbers (exact integer sums, scaled as tract scales them), with the bias and an
//!   exact GELU that follow folded in. Same conditions as above.
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

/// Which rewrites the tract backend makes: all (the default), all but the products of the
/// linear layers (tract's own kernels then run them), or none, for comparing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrites {
    All,
    NoProducts,
    None,
}

impl Rewrites {
    /// The environment variable that chooses: `all` (the default), `no-products` or `none`.
    pub const ENV: &'static str = "MAE_TRACT_REWRITES";

    pub fn from_env() -> anyhow::Result<Self> {
        Self::parse(std::env::var(Self::ENV).ok().as_deref())
    }

    fn parse(value: Option<&str>) -> anyhow::Result<Self> {
        match value.map(str::trim).unwrap_or("") {
            "" | "all" => Ok(Self::All),
            "no-products" => Ok(Self::NoProducts),
            "none" => Ok(Self::None),
            other => anyhow::bail!(
                "{}={other:?}: expected 'all' (rewrite the forms tract runs slowly), \
                 'no-products' (all but the linear layers' products) or 'none' (tract's own plan)",
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
    /// Float products with constant weights run on [`DenseProduct`] (biases folded in), and
    /// patch embeddings on [`PatchProduct`].
    pub dense_products: usize,
    /// Attentions run as one [`SelfAttention`].
    pub attentions: usize,
    /// Quantized linear layers run on [`QuantProduct`] (quantizer, scales and bias folded in).
    pub quant_products: usize,
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
            (
                self.dense_products,
                "linear products on mae-run's packed kernel",
            ),
            (self.attentions, "attentions fused"),
            (
                self.quant_products,
                "int8 products on mae-run's packed kernel",
            ),
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
    if rewrites == Rewrites::All && crate::dense::avx512() {
        let tile = crate::dense::Tile::native();
        done.attentions = fuse_attention(&mut model, tile)?;
        done.dense_products = dense_products(&mut model, tile)?;
        done.dense_products += patch_products(&mut model, tile)?;
    }
    if rewrites == Rewrites::All && crate::qdense::vnni() {
        done.quant_products = quant_products(&mut model, crate::qdense::QuantTile::Vnni)?;
    }
    model.optimize()?;
    // Codegen makes more: the column sums of integer weights.
    done.folded_weights += fold_weight_dequantization(&mut model)?;
    done.layer_norms = fuse_layer_norms(&mut model)?;
    done.dynamic_quants = fuse_dynamic_quant(&mut model)?;
    done.quantizers = fuse_quantize(&mut model)?;
    Ok((model, done))
}

/// A float32 product of an activation and constant weights (a linear layer), with its bias
/// folded in, on [`crate::dense`]'s packed weights and tiles. Shapes are concrete: the input
/// holds `m × k` values at `a`'s strides, the output `m × n` at `c`'s.
#[derive(Debug, Clone)]
pub struct DenseProduct {
    weights: Arc<crate::dense::PackedWeights>,
    input_shape: TVec<usize>,
    output_shape: TVec<usize>,
    /// The output's axis of the weights' columns (`n`).
    n_axis: usize,
    m: usize,
    a: crate::dense::Strides,
    c: crate::dense::Strides,
    tile: crate::dense::Tile,
}

impl PartialEq for DenseProduct {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights)
            && (
                &self.input_shape,
                &self.output_shape,
                self.n_axis,
                self.m,
                self.a,
                self.c,
                self.tile,
            ) == (
                &other.input_shape,
                &other.output_shape,
                other.n_axis,
                other.m,
                other.a,
                other.c,
                other.tile,
            )
    }
}

impl Eq for DenseProduct {}

impl Op for DenseProduct {
    fn name(&self) -> StaticName {
        "DenseProduct".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        let w = &self.weights;
        Ok(vec![format!(
            "{}×{}×{}, {:?} tile",
            self.m, w.k, w.n, self.tile
        )])
    }
    op_as_typed_op!();
}

impl EvalOp for DenseProduct {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        ensure!(
            x.shape() == &*self.input_shape,
            "DenseProduct: input of shape {:?}, planned for {:?}",
            x.shape(),
            self.input_shape
        );
        let ram = x.try_as_plain_ram()?;
        let xs = ram.as_slice::<f32>()?;
        let (m, w) = (self.m, &self.weights);
        let out =
            crate::dense::product_tensor(xs, m, self.a, w, &self.output_shape, self.c, self.tile)?;
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for DenseProduct {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        expect_f32(inputs, "DenseProduct")?;
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }
    as_op!();
}

/// Row-major strides of a concrete shape.
fn strides_of(shape: &[usize]) -> TVec<usize> {
    let mut s: TVec<usize> = tvec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The one position of an axis in an operand, if it has exactly one there.
fn single(positions: &[usize]) -> Option<Option<usize>> {
    match positions {
        [] => Some(None),
        [p] => Some(Some(*p)),
        _ => None,
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
    a: crate::dense::Strides,
    c: crate::dense::Strides,
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
        op: &tract_onnx::tract_core::ops::einsum::EinSum,
        (xi, xs): (usize, &[usize]),
        (wi, ws): (usize, &[usize]),
        out_shape: &[usize],
    ) -> Option<Self> {
        use crate::dense::Strides;
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
    tile: crate::dense::Tile,
) -> TractResult<Option<(OutletId, DenseProduct)>> {
    use crate::dense::PackedWeights;
    use tract_onnx::tract_core::ops::einsum::EinSum;
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
    let w = facts[wi].konst.clone().expect("checked above");
    let Some(axes) = ProductAxes::read(op, (xi, xs), (wi, w.shape()), out_shape) else {
        return Ok(None);
    };
    let wv = w.cast_to::<f32>()?;
    let wv = wv.try_as_plain_ram()?;
    let wv = wv.as_slice::<f32>()?;
    let packed = PackedWeights::new(axes.k, axes.n, |kk, j| wv[axes.weight_index(kk, j)]);
    Ok(Some((
        node.inputs[xi],
        DenseProduct {
            weights: Arc::new(packed),
            input_shape: xs.into(),
            output_shape: out_shape.into(),
            n_axis: axes.n_out,
            m: axes.m,
            a: axes.a,
            c: axes.c,
            tile,
        },
    )))
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
    use tract_onnx::tract_core::ops::math::Add;
    let Some(add) = only_successor(model, node.id) else {
        return Ok(None);
    };
    if !add.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Add>()) {
        return Ok(None);
    }
    let [other] = add
        .inputs
        .iter()
        .filter(|i| i.node != node.id)
        .collect::<Vec<_>>()[..]
    else {
        return Ok(None);
    };
    let other = *other;
    let Some(konst) = model.outlet_fact(other)?.konst.clone() else {
        return Ok(None);
    };
    let out = model.outlet_fact(add.id.into())?;
    if out.shape.as_concrete() != Some(output_shape) {
        return Ok(None);
    }
    Ok(along_n(&konst, output_shape.len(), (n_axis, n))?.map(|bias| (add.id, bias)))
}

/// The `n` values of a float32 constant of rank `rank` laid along axis `n_axis` (every other
/// axis of length one), or of a single value repeated; `None` for any other constant.
fn along_n(
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

/// The one node reading `id`'s one output, if there is exactly one.
fn only_successor(model: &TypedModel, id: usize) -> Option<&TypedNode> {
    match &model.node(id).outputs[..] {
        [out] if out.successors.len() == 1 => Some(model.node(out.successors[0].node)),
        _ => None,
    }
}

/// Is `node` tract's exact (erf) GELU on float32?
fn is_gelu_exact(node: &TypedNode) -> bool {
    use tract_onnx::tract_core::ops::nn::GeluExact;
    node.op_as::<ElementWiseOp>()
        .is_some_and(|e| e.0.is::<GeluExact>() && e.1.is_none())
}

/// What a product's tile stores fold in after the product: the addition of a constant bias,
/// then an exact GELU (the MLP's activation).
struct Epilogue {
    /// The last node folded in (the product's own node when none is).
    last: usize,
    bias: Option<Vec<f32>>,
    gelu: bool,
}

impl Epilogue {
    /// The bias and GELU that follow node `product` (of output `output_shape`, its `n` columns
    /// on axis `n_axis`), each only when it is the one successor of the node before.
    fn after(
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

/// Puts a [`DenseProduct`] in place of each float32 product of an activation and constant
/// weights in a decluttered model (before tract's codegen), with the constant it adds next
/// folded in as its bias; returns how many.
pub fn dense_products(model: &mut TypedModel, tile: crate::dense::Tile) -> TractResult<usize> {
    replace_nodes(model, |model, node| {
        let Some((input, mut op)) = match_dense(model, node, tile)? else {
            return Ok(None);
        };
        let tail = Epilogue::after(model, node.id, &op.output_shape, (op.n_axis, op.weights.n))?;
        let weights = Arc::get_mut(&mut op.weights).expect("not shared yet");
        if let Some(bias) = &tail.bias {
            weights.add_bias(bias);
        }
        weights.gelu = tail.gelu;
        Ok(Some(Replacement {
            input,
            ops: vec![Box::new(op)],
            replaced: tail.last,
        }))
    })
}

/// A ViT's patch embedding: a float32 convolution whose stride is its kernel (no padding,
/// dilation or groups, NCHW), as one product of each image's patches, `[patches, c·kh·kw]`,
/// and the kernel's `[c·kh·kw, out]`, on [`crate::dense`]'s packed weights with the bias folded
/// in. Shapes are concrete.
#[derive(Debug, Clone)]
pub struct PatchProduct {
    weights: Arc<crate::dense::PackedWeights>,
    /// `[batch, channels, height, width]`.
    input_shape: TVec<usize>,
    /// `[batch, out, height / kh, width / kw]`.
    output_shape: TVec<usize>,
    /// `(kh, kw)`.
    kernel: (usize, usize),
    tile: crate::dense::Tile,
}

impl PartialEq for PatchProduct {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights)
            && (
                &self.input_shape,
                &self.output_shape,
                self.kernel,
                self.tile,
            ) == (
                &other.input_shape,
                &other.output_shape,
                other.kernel,
                other.tile,
            )
    }
}

impl Eq for PatchProduct {}

impl Op for PatchProduct {
    fn name(&self) -> StaticName {
        "PatchProduct".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        let w = &self.weights;
        Ok(vec![format!(
            "{}×{} patches, {}×{}, {:?} tile",
            self.kernel.0, self.kernel.1, w.k, w.n, self.tile
        )])
    }
    op_as_typed_op!();
}

thread_local! {
    /// One image's patches, row by row, kept for the next call on this thread.
    static PATCHES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl EvalOp for PatchProduct {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        ensure!(
            x.shape() == &*self.input_shape,
            "PatchProduct: input of shape {:?}, planned for {:?}",
            x.shape(),
            self.input_shape
        );
        let ram = x.try_as_plain_ram()?;
        let xs = ram.as_slice::<f32>()?;
        let [batch, channels, height, width] = self.input_shape[..] else {
            bail!("PatchProduct: input of rank {}", self.input_shape.len());
        };
        let [_, n, rows, cols] = self.output_shape[..] else {
            bail!("PatchProduct: output of rank {}", self.output_shape.len());
        };
        let (kh, kw) = self.kernel;
        let (patches, k) = (rows * cols, channels * kh * kw);
        ensure!(
            self.weights.k == k && self.weights.n == n,
            "PatchProduct: weights of another shape"
        );
        let mut out = Tensor::zero::<f32>(&self.output_shape)?;
        {
            let mut out_ram = out.try_as_plain_ram_mut()?;
            let ys = out_ram.as_slice_mut::<f32>()?;
            PATCHES.with_borrow_mut(|a| -> TractResult<()> {
                a.resize(patches * k, 0.0);
                for (image, y) in xs
                    .chunks_exact(channels * height * width)
                    .zip(ys.chunks_exact_mut(n * patches))
                    .take(batch)
                {
                    // Row `r · cols + c` holds patch (r, c): channel by channel, each kernel
                    // row's `kw` pixels, in the kernel's own order (OIHW).
                    for (p, row) in a.chunks_exact_mut(k).enumerate() {
                        let (r, c) = (p / cols, p % cols);
                        for (ch, dst) in row.chunks_exact_mut(kh * kw).enumerate() {
                            for (i, line) in dst.chunks_exact_mut(kw).enumerate() {
                                let at = (ch * height + r * kh + i) * width + c * kw;
                                line.copy_from_slice(&image[at..at + kw]);
                            }
                        }
                    }
                    // Output channel j of patch p lies at j · patches + p.
                    crate::dense::product(
                        a,
                        patches,
                        crate::dense::Strides { row: k, col: 1 },
                        &self.weights,
                        y,
                        crate::dense::Strides {
                            row: 1,
                            col: patches,
                        },
                        self.tile,
                    )
                    .map_err(|e| anyhow!("PatchProduct: {e:#}"))?;
                }
                Ok(())
            })?;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for PatchProduct {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        expect_f32(inputs, "PatchProduct")?;
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }
    as_op!();
}

/// The [`PatchProduct`] for `node` when it is a patch embedding's convolution of a concrete
/// float32 input with constant weights and bias; its input.
fn match_patch_product(
    model: &TypedModel,
    node: &TypedNode,
    tile: crate::dense::Tile,
) -> TractResult<Option<(OutletId, PatchProduct)>> {
    use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
    use tract_onnx::tract_core::ops::nn::DataFormat;
    let Some(conv) = node.op_as::<Conv>() else {
        return Ok(None);
    };
    let spec = &conv.pool_spec;
    let kernel = &spec.kernel_shape;
    let unpadded = match &spec.padding {
        PaddingSpec::Valid => true,
        PaddingSpec::Explicit(before, after) | PaddingSpec::ExplicitOnnxPool(before, after, _) => {
            before.iter().chain(after).all(|&p| p == 0)
        }
        _ => false,
    };
    if conv.q_params.is_some()
        || conv.group != 1
        || conv.kernel_fmt != KernelFormat::OIHW
        || spec.data_format != DataFormat::NCHW
        || kernel.len() != 2
        || spec.strides.as_deref() != Some(&kernel[..])
        || spec
            .dilations
            .as_ref()
            .is_some_and(|d| d.iter().any(|&v| v != 1))
        || !unpadded
        || node.inputs.len() != 3
    {
        return Ok(None);
    }
    let facts = model.node_input_facts(node.id)?;
    let (Some(weights), Some(bias)) = (&facts[1].konst, &facts[2].konst) else {
        return Ok(None);
    };
    if facts[0].datum_type != f32::datum_type() || weights.datum_type() != f32::datum_type() {
        return Ok(None);
    }
    let (Some(input_shape), Some(output_shape)) = (
        facts[0].shape.as_concrete().map(TVec::from),
        node.outputs[0].fact.shape.as_concrete().map(TVec::from),
    ) else {
        return Ok(None);
    };
    let (kh, kw) = (kernel[0], kernel[1]);
    let [_, channels, height, width] = input_shape[..] else {
        return Ok(None);
    };
    let n = spec.output_channels;
    // An empty kernel first: the output's extent below divides by it.
    if kh == 0
        || kw == 0
        || weights.shape() != [n, channels, kh, kw]
        || output_shape[..] != [input_shape[0], n, height / kh, width / kw]
    {
        return Ok(None);
    }
    let wv = weights.try_as_plain_ram()?;
    let wv = wv.as_slice::<f32>()?;
    let k = channels * kh * kw;
    // Row kk of the product's weights is kernel element kk of every output channel.
    // The bias: one value per output channel, or one for all of them.
    let Some(bias) = along_n(bias, 1, (0, n))? else {
        return Ok(None);
    };
    let mut packed = crate::dense::PackedWeights::new(k, n, |kk, j| wv[j * k + kk]);
    packed.add_bias(&bias);
    Ok(Some((
        node.inputs[0],
        PatchProduct {
            weights: Arc::new(packed),
            input_shape,
            output_shape,
            kernel: (kh, kw),
            tile,
        },
    )))
}

/// Puts a [`PatchProduct`] in place of each patch embedding's convolution; returns how many.
pub fn patch_products(model: &mut TypedModel, tile: crate::dense::Tile) -> TractResult<usize> {
    replace_nodes(model, |model, node| {
        Ok(
            match_patch_product(model, node, tile)?.map(|(input, op)| Replacement {
                input,
                ops: vec![Box::new(op)],
                replaced: node.id,
            }),
        )
    })
}

/// An int8 product of a quantized activation and constant int8 weights (a quantized linear
/// layer), from the float32 activation to the float32 output, with its bias and GELU folded
/// in, on [`crate::qdense`]'s packed weights and tiles. Shapes are concrete: the input holds
/// `m × k` values at `a`'s strides, the output `m × n` at `c`'s.
#[derive(Debug, Clone)]
pub struct QuantProduct {
    weights: Arc<crate::qdense::PackedI8>,
    input_shape: TVec<usize>,
    output_shape: TVec<usize>,
    /// The output's axis of the weights' columns (`n`).
    n_axis: usize,
    m: usize,
    a: crate::dense::Strides,
    c: crate::dense::Strides,
    tile: crate::qdense::QuantTile,
}

impl PartialEq for QuantProduct {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights)
            && (
                &self.input_shape,
                &self.output_shape,
                self.n_axis,
                self.m,
                self.a,
                self.c,
                self.tile,
            ) == (
                &other.input_shape,
                &other.output_shape,
                other.n_axis,
                other.m,
                other.a,
                other.c,
                other.tile,
            )
    }
}

impl Eq for QuantProduct {}

impl Op for QuantProduct {
    fn name(&self) -> StaticName {
        "QuantProduct".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        let w = &self.weights;
        Ok(vec![format!(
            "{}×{}×{}, {:?}, {:?} tile",
            self.m, w.k, w.n, w.quant, self.tile
        )])
    }
    op_as_typed_op!();
}

impl EvalOp for QuantProduct {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        ensure!(
            x.shape() == &*self.input_shape,
            "QuantProduct: input of shape {:?}, planned for {:?}",
            x.shape(),
            self.input_shape
        );
        let ram = x.try_as_plain_ram()?;
        let xs = ram.as_slice::<f32>()?;
        let (m, w) = (self.m, &self.weights);
        let out = crate::qdense::quant_product_tensor(
            xs,
            m,
            self.a,
            w,
            &self.output_shape,
            self.c,
            self.tile,
        )?;
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for QuantProduct {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        expect_f32(inputs, "QuantProduct")?;
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }
    as_op!();
}

/// Whether `outlet` is a constant whose values all equal `value` (as float32).
fn const_all(model: &TypedModel, outlet: OutletId, value: f32) -> bool {
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
fn through_added_axes(model: &TypedModel, mut outlet: OutletId) -> OutletId {
    use tract_onnx::tract_core::ops::change_axes::AxisOp;
    loop {
        let n = model.node(outlet.node);
        match (n.op_as::<AxisOp>(), &n.inputs[..]) {
            (Some(AxisOp::Add(_)), [input]) => outlet = *input,
            _ => return outlet,
        }
    }
}

/// Reads tract's decluttered form of a quantized linear layer, from its integer product
/// (`node`, an `EinSum` on int32 of uint8 activations and constant int8 weights with zero
/// points, as ONNX `MatMulInteger` becomes): before it, the activation's quantizer (tract's
/// `DynamicQuantizeLinearU8`, or a `QuantizeLinear` with a constant scale and zero point); after
/// it, a cast to float32 and a product by the columns' scales (for a dynamic quantizer, the
/// weights' scales times the input's). Returns the float32 activation, the op to put in place
/// of the scaled product and that product's node; `None` for any other form.
fn match_quant(
    model: &TypedModel,
    node: &TypedNode,
    tile: crate::qdense::QuantTile,
) -> TractResult<Option<(OutletId, QuantProduct, usize)>> {
    use crate::qdense::{ActivationQuant, PackedI8};
    use tract_onnx::tract_core::ops::cast::Cast;
    use tract_onnx::tract_core::ops::einsum::EinSum;
    let Some(op) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    // (a, b, bias, a0, a_scale, b0, b_scale, c0, c_scale): no bias, unit scales, zero `b0`
    // and `c0`, constant int8 weights.
    let i = &node.inputs;
    if op.operating_dt != i32::datum_type() || i.len() != 9 {
        return Ok(None);
    }
    let unit = [4, 6, 8].iter().all(|&s| const_all(model, i[s], 1.0));
    let zero = [2, 5, 7].iter().all(|&s| const_all(model, i[s], 0.0));
    let out_fact = model.outlet_fact(node.id.into())?;
    let w_fact = model.outlet_fact(i[1])?;
    let Some(w) = w_fact.konst.clone() else {
        return Ok(None);
    };
    if !unit
        || !zero
        || w.datum_type() != i8::datum_type()
        || out_fact.datum_type != i32::datum_type()
    {
        return Ok(None);
    }
    // The quantizer.
    let q = model.node(i[0].node);
    let (x, quant) = if q.op().name() == "DynamicQuantizeLinearU8"
        && q.outputs.len() == 3
        && i[0].slot == 0
        && i[3] == OutletId::new(q.id, 2)
    {
        (q.inputs[0], ActivationQuant::Dynamic)
    } else if let Some(ql) = q
        .op_as::<ElementWiseOp>()
        .and_then(|e| e.0.downcast_ref::<QuantizeLinearU8>())
    {
        let zero_point = ql.zero_point;
        if !const_all(model, i[3], zero_point as f32) {
            return Ok(None);
        }
        let quant = ActivationQuant::Static {
            inv_scale: ql.scale,
            zero_point,
        };
        (q.inputs[0], quant)
    } else {
        return Ok(None);
    };
    let x_fact = model.outlet_fact(x)?;
    let (Some(xs), Some(out_shape)) = (x_fact.shape.as_concrete(), out_fact.shape.as_concrete())
    else {
        return Ok(None);
    };
    if x_fact.datum_type != f32::datum_type() || q.inputs.len() != 1 {
        return Ok(None);
    }
    let Some(axes) = ProductAxes::read(op, (0, xs), (1, w.shape()), out_shape) else {
        return Ok(None);
    };
    // The cast to float32, then the product by the columns' scales.
    let Some(cast) = only_successor(model, node.id)
        .filter(|c| c.op_as::<Cast>().is_some_and(|c| c.to == f32::datum_type()))
    else {
        return Ok(None);
    };
    let Some(mul) = only_successor(model, cast.id)
        .filter(|m| m.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Mul>()))
    else {
        return Ok(None);
    };
    if model.outlet_fact(mul.id.into())?.shape.as_concrete() != Some(out_shape) {
        return Ok(None);
    }
    let [scales] = mul
        .inputs
        .iter()
        .filter(|o| o.node != cast.id)
        .collect::<Vec<_>>()[..]
    else {
        return Ok(None);
    };
    let rank = out_shape.len();
    let n = (axes.n_out, axes.n);
    let scales = match quant {
        ActivationQuant::Static { .. } => match &model.outlet_fact(*scales)?.konst {
            Some(k) => along_n(k, rank, n)?,
            None => None,
        },
        ActivationQuant::Dynamic => {
            // The weights' scales (a constant along `n`) times the input's scale.
            let s_fact = model.outlet_fact(*scales)?;
            let shape_along_n = s_fact.shape.as_concrete().is_some_and(|s| {
                s.len() <= rank
                    && s.iter()
                        .enumerate()
                        .all(|(a, &d)| d == 1 || (a + rank - s.len() == axes.n_out && d == axes.n))
            });
            let prod = model.node(through_added_axes(model, *scales).node);
            let input_scale = OutletId::new(q.id, 1);
            match (
                shape_along_n,
                prod.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Mul>()),
                &prod.inputs[..],
            ) {
                (true, true, [p, r]) => {
                    let (kp, kr) = (
                        model.outlet_fact(*p)?.konst.clone(),
                        model.outlet_fact(*r)?.konst.clone(),
                    );
                    let (konst, other) = match (kp, kr) {
                        (Some(k), None) => (k, *r),
                        (None, Some(k)) => (k, *p),
                        _ => return Ok(None),
                    };
                    let values = konst.cast_to::<f32>()?;
                    let values = values.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
                    let ok = through_added_axes(model, other) == input_scale
                        && konst.datum_type() == f32::datum_type()
                        && (values.len() == 1 || values.len() == axes.n);
                    ok.then_some(values)
                }
                _ => None,
            }
        }
    };
    let Some(scales) = scales else {
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
    )?;
    Ok(Some((
        x,
        QuantProduct {
            weights: Arc::new(packed),
            input_shape: xs.into(),
            output_shape: out_shape.into(),
            n_axis: axes.n_out,
            m: axes.m,
            a: axes.a,
            c: axes.c,
            tile,
        },
        mul.id,
    )))
}

/// Puts a [`QuantProduct`] in place of each quantized linear layer in a decluttered model
/// (before tract's codegen), from its quantizer to its scaled output, with the constant it
/// adds next and an exact GELU after that folded in; returns how many.
pub fn quant_products(
    model: &mut TypedModel,
    tile: crate::qdense::QuantTile,
) -> TractResult<usize> {
    replace_nodes(model, |model, node| {
        let Some((input, mut op, scaled)) = match_quant(model, node, tile)? else {
            return Ok(None);
        };
        let tail = Epilogue::after(model, scaled, &op.output_shape, (op.n_axis, op.weights.n))?;
        let weights = Arc::get_mut(&mut op.weights).expect("not shared yet");
        if let Some(bias) = &tail.bias {
            weights.add_bias(bias);
        }
        weights.gelu = tail.gelu;
        Ok(Some(Replacement {
            input,
            ops: vec![Box::new(op)],
            replaced: tail.last,
        }))
    })
}

/// One image's multi-head self-attention on [`crate::dense::attention`]: in place of tract's
/// split of the fused `qkv` product into heads (a reshape, two moves and three gathers, each a
/// copy), its two batched products and its softmax. Input `[1, tokens, 3·heads·dim]`, output
/// `[tokens, heads, dim]` (or `[1, tokens, heads, dim]`), as the graph it replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfAttention {
    tokens: usize,
    heads: usize,
    dim: usize,
    /// The output is `[1, tokens, heads, dim]` (the same values).
    leading_one: bool,
    /// The scale of the queries, as its bits.
    scale_bits: u32,
    tile: crate::dense::Tile,
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
            "{} tokens, {} heads × {}, scale {}",
            self.tokens,
            self.heads,
            self.dim,
            f32::from_bits(self.scale_bits)
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
        {
            let mut o = out.try_as_plain_ram_mut()?;
            let scale = f32::from_bits(self.scale_bits);
            let (x, y) = (ram.as_slice::<f32>()?, o.as_slice_mut::<f32>()?);
            crate::dense::attention(x, t, h, d, scale, y, self.tile)?;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for SelfAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        expect_f32(inputs, "SelfAttention")?;
        Ok(tvec!(f32::fact(&*self.output_shape())))
    }
    as_op!();
}

/// Where each axis of a two-input `EinSum` lies (first input, second input, output), sorted.
fn einsum_signature(node: &TypedNode) -> Option<Vec<[Option<usize>; 3]>> {
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

/// Finds tract's decluttered form of a ViT's attention, ending at the product of the
/// attention weights and the values (`node`): `qkv` reshaped to `[1, T, 3, H, D]`, moved to
/// `[3, 1, H, T, D]`, the queries (gathered, times a scalar), keys and values gathered, the
/// scores' product, the softmax over the keys, the product with the values, `[T, H, D]`.
/// Returns `qkv`'s outlet and the op to put in place of `node`.
fn match_attention(
    model: &TypedModel,
    node: &TypedNode,
    tile: crate::dense::Tile,
) -> Option<(OutletId, SelfAttention)> {
    use tract_onnx::tract_core::ops::array::Gather;
    use tract_onnx::tract_core::ops::change_axes::AxisOp;
    use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};
    let s = |x: [Option<usize>; 3]| x;
    // bmk,abkn->mbn and abmk,abnk->bmn, as (first, second, output) positions.
    let mut weighted = vec![
        s([None, Some(0), None]),
        s([None, Some(3), Some(2)]),
        s([Some(0), Some(1), Some(1)]),
        s([Some(1), None, Some(0)]),
        s([Some(2), Some(2), None]),
    ];
    let mut scores = vec![
        s([None, Some(2), Some(2)]),
        s([Some(0), Some(0), None]),
        s([Some(1), Some(1), Some(0)]),
        s([Some(2), None, Some(1)]),
        s([Some(3), Some(3), None]),
    ];
    // bmk,abkn->ambn: the same, keeping the unit axis `a` (tract writes it so when the
    // product after it is quantized).
    let mut weighted_4d = vec![
        s([None, Some(0), Some(0)]),
        s([None, Some(3), Some(3)]),
        s([Some(0), Some(1), Some(2)]),
        s([Some(1), None, Some(1)]),
        s([Some(2), Some(2), None]),
    ];
    weighted.sort();
    weighted_4d.sort();
    scores.sort();
    let signature = einsum_signature(node)?;
    if signature != weighted && signature != weighted_4d {
        return None;
    }
    let softmax = model.node(node.inputs[0].node);
    let sm = softmax.op_as::<Softmax>()?;
    if *sm.axes != [2] || sm.kind != SoftmaxKind::Softmax || sm.quant_output_dt.is_some() {
        return None;
    }
    let qk = model.node(softmax.inputs[0].node);
    if einsum_signature(qk)? != scores {
        return None;
    }
    // The queries times a scalar; the gathers of queries, keys and values from one tensor.
    let mul = model.node(qk.inputs[0].node);
    if !mul.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Mul>()) {
        return None;
    }
    let scale = const_scalar(model, mul)?;
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
    let op = SelfAttention {
        tokens,
        heads,
        dim,
        leading_one,
        scale_bits: scale.to_bits(),
        tile,
    };
    Some((qkv, op))
}

/// Puts a [`SelfAttention`] in place of each ViT attention in a decluttered model (before
/// tract's codegen); returns how many.
pub fn fuse_attention(model: &mut TypedModel, tile: crate::dense::Tile) -> TractResult<usize> {
    replace_nodes(model, |model, node| {
        Ok(
            match_attention(model, node, tile).map(|(input, op)| Replacement {
                input,
                ops: vec![Box::new(op)],
                replaced: node.id,
            }),
        )
    })
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

/// `xs` quantised to uint8 (shape `shape`): `scaled(x)` rounded half to even, plus the zero
/// point, saturated.
fn quantize_u8(
    xs: &[f32],
    shape: &[usize],
    zero_point: u8,
    scaled: impl Fn(f32) -> f32,
) -> TractResult<Tensor> {
    let mut y = Tensor::zero::<u8>(shape)?;
    {
        let mut out = y.try_as_plain_ram_mut()?;
        crate::qdense::quantize_into(xs, out.as_slice_mut::<u8>()?, zero_point, scaled);
    }
    Ok(y)
}

/// ONNX `DynamicQuantizeLinear` to uint8, as tract computes it (the range widened to hold
/// zero, `x / scale` rounded half to even), written so the compiler vectorises it: tract's own
/// takes the range and rounds element by element.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct DynamicQuantU8;

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
        let (scale, zp) = crate::qdense::dynamic_range(xs);
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
        assert_eq!(
            Rewrites::parse(Some("no-products")).unwrap(),
            Rewrites::NoProducts
        );
        let err = Rewrites::parse(Some("some")).unwrap_err().to_string();
        assert!(err.contains(Rewrites::ENV) && err.contains("none"), "{err}");
    }

    /// A ViT block without its norms and residuals, as `mae-export` writes it: attention (`qkv`
    /// with its bias, heads split by a reshape, a transpose and gathers, queries scaled,
    /// softmax over the keys, heads joined, `proj` with its bias), then the MLP (`fc1`, exact
    /// GELU written with `Erf`, `fc2`), on `[1, tokens, heads · dim]`.
    fn attention_block(tokens: i64, heads: i64, dim: i64) -> Vec<u8> {
        use pb::tensor_proto::DataType;
        let d = heads * dim;
        let i64s = |name: &str, v: &[i64]| pb::TensorProto {
            name: name.into(),
            dims: if v.len() == 1 && name.starts_with("idx") {
                vec![]
            } else {
                vec![v.len() as i64]
            },
            data_type: DataType::Int64 as i32,
            int64_data: v.to_vec(),
            ..Default::default()
        };
        let graph = pb::GraphProto {
            name: "attention".into(),
            node: vec![
                node("MatMul", &["x", "qkv_w"], "qkv_mm", vec![]),
                node("Add", &["qkv_mm", "qkv_b"], "qkv", vec![]),
                node("Reshape", &["qkv", "split"], "qkv5", vec![]),
                node(
                    "Transpose",
                    &["qkv5"],
                    "qkvt",
                    vec![crate::testgraph::ints("perm", &[2, 0, 3, 1, 4])],
                ),
                node("Gather", &["qkvt", "idx0"], "q0", vec![int("axis", 0)]),
                node("Gather", &["qkvt", "idx1"], "k", vec![int("axis", 0)]),
                node("Gather", &["qkvt", "idx2"], "v", vec![int("axis", 0)]),
                node("Mul", &["q0", "scale"], "q", vec![]),
                node(
                    "Transpose",
                    &["k"],
                    "kt",
                    vec![crate::testgraph::ints("perm", &[0, 1, 3, 2])],
                ),
                node("MatMul", &["q", "kt"], "scores", vec![]),
                node("Softmax", &["scores"], "weights", vec![int("axis", -1)]),
                node("MatMul", &["weights", "v"], "o", vec![]),
                node(
                    "Transpose",
                    &["o"],
                    "ot",
                    vec![crate::testgraph::ints("perm", &[0, 2, 1, 3])],
                ),
                node("Reshape", &["ot", "join"], "joined", vec![]),
                node("MatMul", &["joined", "proj_w"], "proj", vec![]),
                node("Add", &["proj", "proj_b"], "attended", vec![]),
                node("MatMul", &["attended", "fc1_w"], "fc1_mm", vec![]),
                node("Add", &["fc1_mm", "fc1_b"], "fc1", vec![]),
                node("Div", &["fc1", "sqrt2"], "g1", vec![]),
                node("Erf", &["g1"], "g2", vec![]),
                node("Add", &["g2", "one"], "g3", vec![]),
                node("Mul", &["fc1", "g3"], "g4", vec![]),
                node("Mul", &["g4", "half"], "act", vec![]),
                node("MatMul", &["act", "fc2_w"], "fc2_mm", vec![]),
                node("Add", &["fc2_mm", "fc2_b"], "y", vec![]),
            ],
            initializer: vec![
                crate::testgraph::init("qkv_w", &[d, 3 * d], 21),
                crate::testgraph::init("qkv_b", &[3 * d], 22),
                crate::testgraph::init("proj_w", &[d, d], 23),
                crate::testgraph::init("proj_b", &[d], 24),
                crate::testgraph::init("fc1_w", &[d, 4 * d], 25),
                crate::testgraph::init("fc1_b", &[4 * d], 26),
                crate::testgraph::init("fc2_w", &[4 * d, d], 27),
                crate::testgraph::init("fc2_b", &[d], 28),
                float_init("sqrt2", &[], vec![std::f32::consts::SQRT_2]),
                float_init("one", &[], vec![1.0]),
                float_init("half", &[], vec![0.5]),
                float_init("scale", &[], vec![(dim as f32).powf(-0.5)]),
                i64s("split", &[0, 0, 3, heads, dim]),
                i64s("join", &[0, 0, d]),
                i64s("idx0", &[0]),
                i64s("idx1", &[1]),
                i64s("idx2", &[2]),
            ],
            input: vec![value("x", &[Some(1), Some(tokens), Some(d)])],
            output: vec![value("y", &[Some(1), Some(tokens), Some(d)])],
            ..Default::default()
        };
        model_bytes(graph, 17)
    }

    /// The block with `tile`: its attention fused, its four linear layers on the packed kernel
    /// (GELU folded into `fc1`), outputs as tract's own plan gives them.
    fn check_attention_and_products(tile: crate::dense::Tile) {
        let (tokens, heads, dim) = (13, 3, 8);
        let bytes = attention_block(tokens, heads, dim);
        let model = typed(&bytes);
        let mut ours = model.clone().into_decluttered().unwrap();
        assert_eq!(fuse_attention(&mut ours, tile).unwrap(), 1, "{ours}");
        assert_eq!(dense_products(&mut ours, tile).unwrap(), 4, "{ours}");
        ours.optimize().unwrap();
        assert_eq!(count::<SelfAttention>(&ours), 1);
        assert_eq!(count::<DenseProduct>(&ours), 4);
        let gelus = ours.nodes().iter().filter(|n| is_gelu_exact(n)).count();
        let folded = ours
            .nodes()
            .iter()
            .filter_map(|n| n.op_as::<DenseProduct>())
            .filter(|d| d.weights.gelu)
            .count();
        assert_eq!((gelus, folded), (0, 1), "{ours}");
        let (theirs, _) = optimize(model, Rewrites::None).unwrap();
        let n = (tokens * heads * dim) as usize;
        let x: Tensor = tract_ndarray::Array3::from_shape_vec(
            (1, tokens as usize, (heads * dim) as usize),
            floats(31, n).iter().map(|v| v * 2.0).collect(),
        )
        .unwrap()
        .into();
        let (a, b) = (run(ours, &x), run(theirs, &x));
        // Four products of sums in another order, through a softmax and a GELU.
        assert_close(&format!("{tile:?}"), &a, &b, 1e-4);
        assert!(a.iter().any(|v| v.abs() > 0.1), "outputs near zero");
    }

    #[test]
    fn attention_and_linear_products_keep_the_outputs_on_the_portable_tile() {
        check_attention_and_products(crate::dense::Tile::Portable);
    }

    #[test]
    #[cfg_attr(not(host_avx512), ignore = "needs a CPU with AVX-512F")]
    fn attention_and_linear_products_keep_the_outputs_on_the_avx512_tile() {
        check_attention_and_products(crate::dense::Tile::Avx512);
        // And `mae-run`'s default rewrites choose them on this CPU.
        let (ours, done) = optimize(typed(&attention_block(13, 3, 8)), Rewrites::All).unwrap();
        assert_eq!((done.attentions, done.dense_products), (1, 4), "{done:?}");
        assert!(done.describe(Rewrites::All).contains("1 attentions fused"));
        let (_, without) =
            optimize(typed(&attention_block(13, 3, 8)), Rewrites::NoProducts).unwrap();
        assert_eq!(
            (without.attentions, without.dense_products),
            (0, 0),
            "{without:?}"
        );
        assert_eq!(count::<SelfAttention>(&ours), 1);
    }

    /// A convolution on `[2, 3, 8, 12]` with a `[5, 3, 4, 4]` kernel at `strides` (and its bias).
    fn patch_embedding(strides: [i64; 2]) -> Vec<u8> {
        let (oh, ow) = ((8 - 4) / strides[0] + 1, (12 - 4) / strides[1] + 1);
        let graph = pb::GraphProto {
            name: "patches".into(),
            node: vec![node(
                "Conv",
                &["x", "w", "b"],
                "y",
                vec![
                    crate::testgraph::ints("kernel_shape", &[4, 4]),
                    crate::testgraph::ints("strides", &strides),
                ],
            )],
            initializer: vec![init("w", &[5, 3, 4, 4], 41), init("b", &[5], 42)],
            input: vec![value("x", &[Some(2), Some(3), Some(8), Some(12)])],
            output: vec![value("y", &[Some(2), Some(5), Some(oh), Some(ow)])],
            ..Default::default()
        };
        model_bytes(graph, 17)
    }

    /// The patch embedding on the packed kernel with `tile` gives tract's own outputs; a
    /// convolution whose patches overlap is left to tract.
    fn check_patch_products(tile: crate::dense::Tile) {
        let model = typed(&patch_embedding([4, 4]));
        let mut ours = model.clone().into_decluttered().unwrap();
        assert_eq!(patch_products(&mut ours, tile).unwrap(), 1, "{ours}");
        ours.optimize().unwrap();
        assert_eq!(count::<PatchProduct>(&ours), 1, "{ours}");
        let (theirs, _) = optimize(model, Rewrites::None).unwrap();
        let x: Tensor = tract_ndarray::Array4::from_shape_vec((2, 3, 8, 12), floats(43, 576))
            .unwrap()
            .into();
        let (a, b) = (run(ours, &x), run(theirs, &x));
        // 48 products summed in another order.
        assert_close(&format!("{tile:?}"), &a, &b, 1e-5);
        assert_eq!(a.len(), 2 * 5 * 2 * 3);
        assert!(a.iter().any(|v| v.abs() > 0.5), "outputs near zero");
        // The second image is its own: not the first's outputs again.
        assert_ne!(a[..30], a[30..]);
        let mut overlapping = typed(&patch_embedding([2, 2])).into_decluttered().unwrap();
        assert_eq!(patch_products(&mut overlapping, tile).unwrap(), 0);
    }

    #[test]
    fn patch_embeddings_keep_the_outputs_on_the_portable_tile() {
        check_patch_products(crate::dense::Tile::Portable);
    }

    #[test]
    #[cfg_attr(not(host_avx512), ignore = "needs a CPU with AVX-512F")]
    fn patch_embeddings_keep_the_outputs_on_the_avx512_tile() {
        check_patch_products(crate::dense::Tile::Avx512);
        let (ours, done) = optimize(typed(&patch_embedding([4, 4])), Rewrites::All).unwrap();
        assert_eq!((done.dense_products, count::<PatchProduct>(&ours)), (1, 1));
    }

    #[test]
    fn products_of_symbolic_shapes_are_left_to_tract() {
        let bytes = attention_block(13, 3, 8);
        let mut model = tract_onnx::onnx().model_for_read(&mut &bytes[..]).unwrap();
        let b = model.sym("batch");
        let shape: TVec<TDim> = tvec![b.into(), 13.into(), 24.into()];
        model
            .set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape))
            .unwrap();
        let mut model = model.into_typed().unwrap().into_decluttered().unwrap();
        let tile = crate::dense::Tile::Portable;
        assert_eq!(fuse_attention(&mut model, tile).unwrap(), 0);
        assert_eq!(dense_products(&mut model, tile).unwrap(), 0);
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

    /// `model` optimised with the rewrites that keep tract's int8 products (and what they
    /// did), and without any.
    fn both_ways(model: TypedModel) -> (TypedModel, Rewritten, TypedModel) {
        let (ours, done) = optimize(model.clone(), Rewrites::NoProducts).unwrap();
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

    /// `static_int8`'s file through [`parse`]'s rewrite (tract's int8 products kept), and
    /// tract's own reading of it.
    fn integer_and_own(bytes: &[u8]) -> (usize, TypedModel, Rewritten, TypedModel) {
        use prost::Message;
        let mut proto = pb::ModelProto::decode(bytes).unwrap();
        let integer = qdq_to_integer(proto.graph.as_mut().unwrap());
        let model = tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .unwrap()
            .into_typed()
            .unwrap();
        let (ours, done) = optimize(model, Rewrites::NoProducts).unwrap();
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
    /// The exact GELU as `mae-export` writes it, from `x` to `y`.
    fn gelu_nodes(x: &str, y: &str) -> Vec<pb::NodeProto> {
        let g = |i: usize| format!("{y}.gelu{i}");
        vec![
            node("Div", &[x, "sqrt2"], &g(1), vec![]),
            node("Erf", &[&g(1)], &g(2), vec![]),
            node("Add", &[&g(2), "one"], &g(3), vec![]),
            node("Mul", &[x, &g(3)], &g(4), vec![]),
            node("Mul", &[&g(4), "half"], y, vec![]),
        ]
    }

    fn gelu_constants() -> Vec<pb::TensorProto> {
        vec![
            float_init("sqrt2", &[], vec![std::f32::consts::SQRT_2]),
            float_init("one", &[], vec![1.0]),
            float_init("half", &[], vec![0.5]),
        ]
    }

    /// `dynamic_int8`'s layer, then a bias and the exact GELU.
    fn dynamic_int8_gelu(k: i64, n: i64) -> Vec<u8> {
        use prost::Message;
        let mut proto = pb::ModelProto::decode(&dynamic_int8(k, n)[..]).unwrap();
        let graph = proto.graph.as_mut().unwrap();
        let last = graph.node.last_mut().unwrap();
        last.output = vec!["lin".into()];
        last.name = "lin".into();
        graph.node.push(node("Add", &["lin", "b"], "fc", vec![]));
        graph.node.extend(gelu_nodes("fc", "y"));
        graph.initializer.push(init("b", &[n], 41));
        graph.initializer.extend(gelu_constants());
        let mut bytes = vec![];
        proto.encode(&mut bytes).unwrap();
        bytes
    }

    /// Inputs for a `[1, rows, k]` layer: a range that does not hold zero on one side, values
    /// exactly on the grid's half steps, and all zeros.
    fn int8_inputs(rows: usize, k: usize) -> Vec<Tensor> {
        [
            floats(3, rows * k)
                .iter()
                .map(|v| v * 2.0 + 0.5)
                .collect::<Vec<f32>>(),
            (0..rows * k).map(|i| (i % 256) as f32 * 0.5).collect(),
            vec![0.0; rows * k],
        ]
        .into_iter()
        .map(|x| {
            tract_ndarray::Array3::from_shape_vec((1, rows, k), x)
                .unwrap()
                .into()
        })
        .collect()
    }

    /// `model` with its quantized layers on [`QuantProduct`] (`tile`), as many as `expected`.
    fn with_quant_products(
        model: TypedModel,
        tile: crate::qdense::QuantTile,
        expected: usize,
    ) -> TypedModel {
        let mut ours = model.into_decluttered().unwrap();
        assert_eq!(quant_products(&mut ours, tile).unwrap(), expected, "{ours}");
        ours.optimize().unwrap();
        assert_eq!(count::<QuantProduct>(&ours), expected, "{ours}");
        ours
    }

    /// Dynamic and static int8 layers on `tile`: tract's numbers, bit for bit (the integer
    /// sums are exact, then scaled as tract scales them), and with a bias and GELU folded in,
    /// tract's within its GELU's rounding.
    fn check_quant_products(tile: crate::qdense::QuantTile) {
        let (k, n) = (70, 45);
        let model = typed(&dynamic_int8(k, n));
        let ours = with_quant_products(model.clone(), tile, 1);
        let (theirs, _) = optimize(model, Rewrites::None).unwrap();
        for (case, x) in int8_inputs(5, k as usize).iter().enumerate() {
            let (a, b) = (run(ours.clone(), x), run(theirs.clone(), x));
            assert_eq!(a, b, "{tile:?} dynamic, case {case}: not tract's numbers");
        }
        let model = typed(&dynamic_int8_gelu(k, n));
        let ours = with_quant_products(model.clone(), tile, 1);
        let folded = ours
            .nodes()
            .iter()
            .filter_map(|n| n.op_as::<QuantProduct>())
            .all(|q| q.weights.gelu);
        assert!(folded && !ours.nodes().iter().any(is_gelu_exact), "{ours}");
        let (theirs, _) = optimize(model, Rewrites::None).unwrap();
        for (case, x) in int8_inputs(5, k as usize).iter().enumerate() {
            let (a, b) = (run(ours.clone(), x), run(theirs.clone(), x));
            assert_close(&format!("{tile:?} GELU, case {case}"), &a, &b, 1e-5);
            assert!(a.iter().any(|v| v.abs() > 0.1), "outputs near zero");
        }
        // Static: the file's QDQ product made integer, then on the packed kernel.
        use prost::Message;
        let (k, n) = (256, 96);
        let mut proto = pb::ModelProto::decode(&static_int8(k, n)[..]).unwrap();
        assert_eq!(qdq_to_integer(proto.graph.as_mut().unwrap()), 1);
        let integer = tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .unwrap()
            .into_typed()
            .unwrap();
        let ours = with_quant_products(integer.clone(), tile, 1);
        let (theirs, _) = optimize(integer, Rewrites::NoProducts).unwrap();
        let x: Tensor = tract_ndarray::Array3::from_shape_vec(
            (1, 4, k as usize),
            floats(5, 4 * k as usize).iter().map(|v| v * 3.0).collect(),
        )
        .unwrap()
        .into();
        let (a, b) = (run(ours, &x), run(theirs, &x));
        assert_eq!(a, b, "{tile:?} static: not tract's numbers");
        assert!(a.iter().any(|v| v.abs() > 0.1), "outputs near zero");
    }

    #[test]
    fn quantized_layers_give_tracts_numbers_on_the_portable_tile() {
        check_quant_products(crate::qdense::QuantTile::Portable);
    }

    #[test]
    #[cfg_attr(not(host_vnni), ignore = "needs a CPU with AVX-512 VNNI")]
    fn quantized_layers_give_tracts_numbers_on_the_vnni_tile() {
        check_quant_products(crate::qdense::QuantTile::Vnni);
        // And `mae-run`'s default rewrites choose them on this CPU; `no-products` does not.
        let (ours, done) = optimize(typed(&dynamic_int8_gelu(70, 45)), Rewrites::All).unwrap();
        assert_eq!(done.quant_products, 1, "{done:?}");
        assert!(done
            .describe(Rewrites::All)
            .contains("1 int8 products on mae-run's packed kernel"));
        assert_eq!(count::<QuantProduct>(&ours), 1);
        let (_, without) =
            optimize(typed(&dynamic_int8_gelu(70, 45)), Rewrites::NoProducts).unwrap();
        assert_eq!(without.quant_products, 0, "{without:?}");
    }

    #[test]
    fn quantized_products_of_other_forms_are_left_to_tract() {
        use prost::Message;
        let tile = crate::qdense::QuantTile::Portable;
        // A weight zero point other than 0.
        let mut proto = pb::ModelProto::decode(&dynamic_int8(16, 8)[..]).unwrap();
        let graph = proto.graph.as_mut().unwrap();
        let wz = graph
            .initializer
            .iter_mut()
            .find(|t| t.name == "wz")
            .unwrap();
        wz.int32_data[0] = 3;
        let mut bytes = vec![];
        proto.encode(&mut bytes).unwrap();
        with_quant_products(typed(&bytes), tile, 0);
        // A symbolic batch.
        let bytes = dynamic_int8(16, 8);
        let mut model = tract_onnx::onnx().model_for_read(&mut &bytes[..]).unwrap();
        let b = model.sym("batch");
        let shape: TVec<TDim> = tvec![b.into(), 5.into(), 16.into()];
        model
            .set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape))
            .unwrap();
        with_quant_products(model.into_typed().unwrap(), tile, 0);
        // Float products.
        with_quant_products(typed(&attention_block(5, 2, 4)), tile, 0);
    }

    /// `attention_block` with its four linear layers quantized dynamically, as `mae-export
    /// --int8` writes them (`DynamicQuantizeLinear`, `MatMulInteger`, cast, times the scales,
    /// plus the float bias).
    fn int8_attention_block(tokens: i64, heads: i64, dim: i64) -> Vec<u8> {
        use prost::Message;
        let mut proto = pb::ModelProto::decode(&attention_block(tokens, heads, dim)[..]).unwrap();
        let graph = proto.graph.as_mut().unwrap();
        let mut nodes = vec![];
        let mut weights = vec![];
        for n in std::mem::take(&mut graph.node) {
            let w = n.input.get(1).cloned().unwrap_or_default();
            if n.op_type != "MatMul" || !w.ends_with("_w") {
                nodes.push(n);
                continue;
            }
            let t = graph.initializer.iter().find(|t| t.name == w).unwrap();
            let (dims, values) = (t.dims.clone(), t.float_data.clone());
            weights.push(w.clone());
            let p = |s: &str| format!("{w}.{s}");
            let mut quantize = node("DynamicQuantizeLinear", &[&n.input[0]], &p("xq"), vec![]);
            quantize.output = vec![p("xq"), p("xs"), p("xz")];
            let to = vec![int("to", DataType::Float as i64)];
            nodes.extend([
                quantize,
                node(
                    "MatMulInteger",
                    &[&p("xq"), &p("q"), &p("xz"), &p("z")],
                    &p("acc"),
                    vec![],
                ),
                node("Cast", &[&p("acc")], &p("accf"), to),
                node("Mul", &[&p("xs"), &p("s")], &p("scale"), vec![]),
                node("Mul", &[&p("accf"), &p("scale")], &n.output[0], vec![]),
            ]);
            let peak = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let q: Vec<i32> = values
                .iter()
                .map(|v| (v / peak * 127.0).round() as i32)
                .collect();
            graph.initializer.extend([
                int_init(&p("q"), &dims, DataType::Int8, q),
                float_init(&p("s"), &[], vec![peak / 127.0]),
                int_init(&p("z"), &[], DataType::Int8, vec![0]),
            ]);
        }
        graph.node = nodes;
        graph.initializer.retain(|t| !weights.contains(&t.name));
        let mut bytes = vec![];
        proto.encode(&mut bytes).unwrap();
        bytes
    }

    #[test]
    fn int8_blocks_fuse_attention_and_run_their_layers_on_the_packed_kernel() {
        let (tokens, heads, dim) = (13, 3, 8);
        let model = typed(&int8_attention_block(tokens, heads, dim));
        let tile = crate::qdense::QuantTile::Portable;
        let mut ours = model.clone().into_decluttered().unwrap();
        assert_eq!(
            fuse_attention(&mut ours, crate::dense::Tile::Portable).unwrap(),
            1
        );
        assert_eq!(quant_products(&mut ours, tile).unwrap(), 4, "{ours}");
        ours.optimize().unwrap();
        assert_eq!(count::<SelfAttention>(&ours), 1);
        assert_eq!(count::<QuantProduct>(&ours), 4);
        assert!(!ours.nodes().iter().any(is_gelu_exact), "{ours}");
        let (theirs, _) = optimize(model, Rewrites::None).unwrap();
        let n = (tokens * heads * dim) as usize;
        let x: Tensor = tract_ndarray::Array3::from_shape_vec(
            (1, tokens as usize, (heads * dim) as usize),
            floats(31, n).iter().map(|v| v * 2.0).collect(),
        )
        .unwrap()
        .into();
        let (a, b) = (run(ours, &x), run(theirs, &x));
        // The attention sums in another order, which may move a value of the next
        // quantization by one step: within a step of the weights' scale of the output's range.
        let peak = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(peak > 0.1, "outputs near zero");
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            assert!(
                (p - q).abs() <= 1e-3 * peak,
                "[{i}]: {p} vs {q} (peak {peak})"
            );
        }
    }
}
