//! What `mae-run` does to tract's graph when it loads a model, for forms tract runs slowly: parse
//! (with the protobuf rewrites of [`onnx`]), rewrite, optimise ([`optimize`]). The file on disk
//! stays standard ONNX; these change only tract's plan. Each keeps tract's numbers (bit for bit
//! where the tests say so) or the same sum in another order. `MAE_TRACT_REWRITES=none` turns
//! them off, for comparing.
//!
//! - **LayerNorm** ([`ops::layer_norm`]): tract expands it into a sum, a scale, a subtraction and
//!   an `RmsNorm`, on feature-major activations, element by element; one `LayerNormCore` takes
//!   their place.
//! - **Dynamic int8** (`DynamicQuantizeLinear` → `MatMulInteger`): tract sums every int8
//!   weight's columns again on each pass and quantizes element by element; [`fold`] makes the
//!   sums constants, [`ops::quantize`] vectorises the quantizer.
//! - **Static int8** (QDQ, `mae-export --calibration-data`): tract keeps the float products,
//!   dequantizing every weight on each pass; [`onnx::qdq_to_integer`] rewrites them, before
//!   tract reads the file, into the integer form above.
//! - **Dequantized activations** (files from other quantizers): tract gets attention's products
//!   wrong in a ViT quantized by ONNX Runtime; [`onnx::dequantize_activations_as_float`] writes
//!   the dequantization out as float arithmetic, which it gets right.
//! - **Float linear layers, patch embedding and attention** (CPUs with AVX2 and FMA or
//!   AVX-512F, plans of a concrete shape): [`ops::product`], [`ops::patch`] and [`ops::attention`]
//!   run them on `crate::kernels`' packed tiles of the path `MAE_KERNELS` chooses
//!   (`crate::kernels::select`). `MAE_TRACT_REWRITES=no-products` keeps tract's own.
//! - **Int8 linear layers** (the same CPUs): [`ops::product`] runs each from its quantizer to its
//!   scaled output on the path's int8 tiles (AVX-512 VNNI, AVX-VNNI or AVX2), with tract's
//!   numbers.

pub mod fold;
pub mod graph;
pub mod onnx;
pub mod ops;

#[cfg(test)]
mod tests;

use tract_onnx::prelude::*;

use crate::kernels::select::Choice;

/// Which rewrites the tract backend makes: all (the default), all but the products of the
/// linear layers (tract's own kernels then run them), or none, for comparing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrites {
    All,
    NoProducts,
    None,
}

impl Rewrites {
    /// The environment variable that chooses (read by `crate::engine::settings`).
    pub const ENV: &'static str = "MAE_TRACT_REWRITES";
}

/// What the rewrites changed in one plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rewritten {
    pub layer_norms: usize,
    pub folded_weights: usize,
    pub dynamic_quants: usize,
    pub quantizers: usize,
    /// Static QDQ products made integer products ([`onnx::qdq_to_integer`], before parsing).
    pub integer_products: usize,
    /// Float products with constant weights run on packed weights (biases folded in), and
    /// patch embeddings.
    pub dense_products: usize,
    /// Attentions run as one fused operator.
    pub attentions: usize,
    /// Quantized linear layers run on packed int8 weights (quantizer, scales and bias folded
    /// in).
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
/// static QDQ products made integer ([`onnx::qdq_to_integer`]); returns how many were.
pub fn parse(path: &std::path::Path, rewrites: Rewrites) -> TractResult<(InferenceModel, usize)> {
    // The shapes a file records for its inner values are hints, and may name the batch where
    // `mae-run` plans for one image (ONNX Runtime's quantizer writes them so): tract infers
    // them from the input instead.
    let reader = tract_onnx::onnx().with_ignore_value_info(true);
    if rewrites == Rewrites::None {
        return Ok((reader.model_for_path(path)?, 0));
    }
    let mut proto = reader.proto_model_for_path(path)?;
    let integer = proto.graph.as_mut().map_or(0, onnx::qdq_to_integer);
    if let Some(graph) = proto.graph.as_mut() {
        onnx::dequantize_activations_as_float(graph);
    }
    // As `model_for_path` does: external data is read relative to the file's folder.
    let dir = path.parent().and_then(|d| d.to_str());
    let parsed = reader.parse(&proto, dir)?;
    anyhow::ensure!(
        parsed.unresolved_inputs.is_empty(),
        "could not resolve inputs {:?}",
        parsed.unresolved_inputs
    );
    Ok((parsed.model, integer))
}

/// Makes the model tract runs from a typed model: `rewrites` before and after tract's own
/// optimisation, on the `kernels` chosen.
pub fn optimize(
    model: TypedModel,
    rewrites: Rewrites,
    kernels: Choice,
) -> TractResult<(TypedModel, Rewritten)> {
    let mut done = Rewritten::default();
    if rewrites == Rewrites::None {
        return Ok((model.into_optimized()?, done));
    }
    let mut model = model.into_decluttered()?;
    done.folded_weights = fold::fold_weight_dequantization(&mut model)?;
    // Folded weights may declutter further; otherwise the graph is decluttered already.
    if done.folded_weights > 0 {
        model.declutter()?;
    }
    if let (Rewrites::All, Some(k)) = (rewrites, kernels.products) {
        done.attentions = ops::attention::fuse_attention(&mut model, k.f32)?;
        done.dense_products = ops::product::dense_products(&mut model, k.f32)?;
        done.dense_products += ops::patch::patch_products(&mut model, k.f32)?;
        done.quant_products = ops::product::quant_products(&mut model, k.i8)?;
    }
    model.optimize()?;
    // Codegen makes more: the column sums of integer weights.
    done.folded_weights += fold::fold_weight_dequantization(&mut model)?;
    let vector = kernels.vector;
    done.layer_norms = ops::layer_norm::fuse_layer_norms(&mut model, vector)?;
    done.dynamic_quants = ops::quantize::fuse_dynamic_quant(&mut model, vector)?;
    done.quantizers = ops::quantize::fuse_quantize(&mut model, vector)?;
    Ok((model, done))
}
