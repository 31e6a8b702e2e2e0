//! A ViT's patch embedding (a convolution whose stride is its kernel), which tract runs through
//! an im2col and its own kernel, as one product of each image's patches on
//! [`crate::kernels::f32`].

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use crate::accel::graph::{self, Replacement};
use crate::kernels::f32::{F32Tile, PackedWeights};
use crate::kernels::Strides;

/// A float32 convolution whose stride is its kernel (no padding, dilation or groups, NCHW), as
/// one product of each image's patches, `[patches, c·kh·kw]`, and the kernel's
/// `[c·kh·kw, out]`, with the bias folded in. Shapes are concrete.
#[derive(Debug, Clone)]
pub struct PatchProduct {
    weights: Arc<PackedWeights>,
    /// `[batch, channels, height, width]`.
    input_shape: TVec<usize>,
    /// `[batch, out, height / kh, width / kw]`.
    output_shape: TVec<usize>,
    /// `(kh, kw)`.
    kernel: (usize, usize),
    tile: F32Tile,
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
                    crate::kernels::f32::product(
                        a,
                        patches,
                        Strides { row: k, col: 1 },
                        &self.weights,
                        y,
                        Strides {
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
        graph::expect_f32(inputs, "PatchProduct")?;
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }
    as_op!();
}

/// The [`PatchProduct`] for `node` when it is a patch embedding's convolution of a concrete
/// float32 input with constant weights and bias; its input.
fn match_patch_product(
    model: &TypedModel,
    node: &TypedNode,
    tile: F32Tile,
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
    let Some(bias) = graph::along_n(bias, 1, (0, n))? else {
        return Ok(None);
    };
    let mut packed = PackedWeights::new(k, n, |kk, j| wv[j * k + kk]);
    packed.end.add_bias(&bias);
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
pub fn patch_products(model: &mut TypedModel, tile: F32Tile) -> TractResult<usize> {
    graph::replace_nodes(model, |model, node| {
        Ok(match_patch_product(model, node, tile)?
            .map(|(input, op)| Replacement::one(input, op, node.id)))
    })
}
