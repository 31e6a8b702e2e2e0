//! The rewrites' tests: each on a small generated ONNX graph, its outputs against tract's own
//! plan of the same graph.
#![allow(clippy::unwrap_used)]

use super::graph::is_gelu_exact;
use super::onnx::{dequantize_activations_as_float, qdq_to_integer};
use super::ops::attention::{fuse_attention, SelfAttention};
use super::ops::layer_norm::LayerNormCore;
use super::ops::patch::{patch_products, PatchProduct};
use super::ops::product::{dense_products, quant_products, DenseProduct, QuantProduct};
use super::ops::quantize::QuantU8;
use super::*;
use crate::kernels::f32::F32Tile;
use crate::kernels::i8::I8Tile;
use crate::kernels::vector::Vector;
use crate::testgraph::{float, float_init, floats, init, int, int_init, model_bytes, node, value};
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::nn::{Reduce, RmsNorm};

/// The kernels `MAE_KERNELS=auto` gives this CPU.
fn auto() -> crate::kernels::select::Choice {
    crate::kernels::select::Choice::new(crate::kernels::select::Path::Auto).unwrap()
}

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
        crate::kernels::layer_norm::layer_norm(&x, &mut y, (d, inner), 1e-6, Vector::Portable);
        let want = direct(&x, d, inner, 1e-6);
        for (i, (a, b)) in y.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 2e-5,
                "{outer}x{d}x{inner} [{i}]: {a} vs {b}"
            );
        }
    }
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
fn check_attention_and_products(tile: F32Tile) {
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
        .filter(|d| d.weights().end.gelu)
        .count();
    assert_eq!((gelus, folded), (0, 1), "{ours}");
    let (theirs, _) = optimize(model, Rewrites::None, auto()).unwrap();
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
    check_attention_and_products(F32Tile::Portable);
}

#[test]
#[cfg_attr(not(host_avx2), ignore = "needs a CPU with AVX2 and FMA")]
fn attention_and_linear_products_keep_the_outputs_on_the_avx2_tile() {
    check_attention_and_products(F32Tile::avx2().expect("AVX2 and FMA"));
}

#[test]
#[cfg_attr(not(host_avx512), ignore = "needs a CPU with AVX-512F")]
fn attention_and_linear_products_keep_the_outputs_on_the_avx512_tile() {
    check_attention_and_products(F32Tile::avx512().expect("AVX-512F"));
    // And `mae-run`'s default rewrites choose them on this CPU.
    let block = || typed(&attention_block(13, 3, 8));
    let (ours, done) = optimize(block(), Rewrites::All, auto()).unwrap();
    assert_eq!((done.attentions, done.dense_products), (1, 4), "{done:?}");
    assert!(done.describe(Rewrites::All).contains("1 attentions fused"));
    let (_, without) = optimize(block(), Rewrites::NoProducts, auto()).unwrap();
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
fn check_patch_products(tile: F32Tile) {
    let model = typed(&patch_embedding([4, 4]));
    let mut ours = model.clone().into_decluttered().unwrap();
    assert_eq!(patch_products(&mut ours, tile).unwrap(), 1, "{ours}");
    ours.optimize().unwrap();
    assert_eq!(count::<PatchProduct>(&ours), 1, "{ours}");
    let (theirs, _) = optimize(model, Rewrites::None, auto()).unwrap();
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
    check_patch_products(F32Tile::Portable);
}

#[test]
#[cfg_attr(not(host_avx2), ignore = "needs a CPU with AVX2 and FMA")]
fn patch_embeddings_keep_the_outputs_on_the_avx2_tile() {
    check_patch_products(F32Tile::avx2().expect("AVX2 and FMA"));
}

#[test]
#[cfg_attr(not(host_avx512), ignore = "needs a CPU with AVX-512F")]
fn patch_embeddings_keep_the_outputs_on_the_avx512_tile() {
    check_patch_products(F32Tile::avx512().expect("AVX-512F"));
    let (ours, done) = optimize(typed(&patch_embedding([4, 4])), Rewrites::All, auto()).unwrap();
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
    let tile = F32Tile::Portable;
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
        let (ours, done) = optimize(model.clone(), Rewrites::All, auto()).unwrap();
        let (theirs, none) = optimize(model, Rewrites::None, auto()).unwrap();
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
    let (ours, done) = optimize(model.clone(), Rewrites::NoProducts, auto()).unwrap();
    let (theirs, _) = optimize(model, Rewrites::None, auto()).unwrap();
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
    let (ours, done) = optimize(model, Rewrites::NoProducts, auto()).unwrap();
    let (theirs, _) = optimize(typed(bytes), Rewrites::None, auto()).unwrap();
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
    let vectors = [Vector::Portable, auto().vector];
    for ((inv, zp), vector) in [(1.0f32, 128u8), (2.0, 0), (0.37, 255), (41.5, 3)]
        .into_iter()
        .flat_map(|q| vectors.map(|v| (q, v)))
    {
        let op = QuantU8 {
            inv_scale_bits: inv.to_bits(),
            zero_point: zp,
            vector,
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
            "1/scale {inv}, zero {zp}, {vector:?}"
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
    let (model, _) = optimize(model.into_typed().unwrap(), Rewrites::All, auto()).unwrap();
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
    edited(&dynamic_int8(k, n), |graph| {
        let last = graph.node.last_mut().unwrap();
        last.output = vec!["lin".into()];
        last.name = "lin".into();
        graph.node.push(node("Add", &["lin", "b"], "fc", vec![]));
        graph.node.extend(gelu_nodes("fc", "y"));
        graph.initializer.push(init("b", &[n], 41));
        graph.initializer.extend(gelu_constants());
    })
}

/// `dynamic_int8`'s layer of which only rows 1 to 4 are used, as the last block's products of
/// a ViT whose head averages the patch tokens: tract multiplies those rows of the quantized
/// input, quantized over all five.
fn dynamic_int8_later_rows(k: i64, n: i64) -> Vec<u8> {
    edited(&dynamic_int8(k, n), |graph| {
        let last = graph.node.last_mut().unwrap();
        last.output = vec!["all".into()];
        last.name = "all".into();
        graph.node.push(node(
            "Slice",
            &["all", "starts", "ends", "axes"],
            "y",
            vec![],
        ));
        let i64s = |name: &str, v: i64| pb::TensorProto {
            name: name.into(),
            dims: vec![1],
            data_type: DataType::Int64 as i32,
            int64_data: vec![v],
            ..Default::default()
        };
        graph
            .initializer
            .extend([i64s("starts", 1), i64s("ends", 5), i64s("axes", 1)]);
        graph.output = vec![value("y", &[Some(1), Some(4), Some(n)])];
    })
}

/// The ONNX file `bytes` with its graph changed by `edit`.
fn edited(bytes: &[u8], edit: impl FnOnce(&mut pb::GraphProto)) -> Vec<u8> {
    use prost::Message;
    let mut proto = pb::ModelProto::decode(bytes).unwrap();
    edit(proto.graph.as_mut().unwrap());
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
fn with_quant_products(model: TypedModel, tile: I8Tile, expected: usize) -> TypedModel {
    let mut ours = model.into_decluttered().unwrap();
    assert_eq!(quant_products(&mut ours, tile).unwrap(), expected, "{ours}");
    ours.optimize().unwrap();
    assert_eq!(count::<QuantProduct>(&ours), expected, "{ours}");
    ours
}

/// Dynamic and static int8 layers on `tile`: tract's numbers, bit for bit (the integer
/// sums are exact, then scaled as tract scales them), and with a bias and GELU folded in,
/// tract's within its GELU's rounding.
fn check_quant_products(tile: I8Tile) {
    let (k, n) = (70, 45);
    let model = typed(&dynamic_int8(k, n));
    let ours = with_quant_products(model.clone(), tile, 1);
    let (theirs, _) = optimize(model, Rewrites::None, auto()).unwrap();
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
        .all(|q| q.weights().end.gelu);
    assert!(folded && !ours.nodes().iter().any(is_gelu_exact), "{ours}");
    let (theirs, _) = optimize(model, Rewrites::None, auto()).unwrap();
    for (case, x) in int8_inputs(5, k as usize).iter().enumerate() {
        let (a, b) = (run(ours.clone(), x), run(theirs.clone(), x));
        assert_close(&format!("{tile:?} GELU, case {case}"), &a, &b, 1e-5);
        assert!(a.iter().any(|v| v.abs() > 0.1), "outputs near zero");
    }
    // Only later rows of the quantized input multiplied: quantized over all of it.
    let model = typed(&dynamic_int8_later_rows(k, n));
    let ours = with_quant_products(model.clone(), tile, 1);
    let info = ours
        .nodes()
        .iter()
        .filter(|n| n.op_as::<QuantProduct>().is_some())
        .flat_map(|n| n.op.info().unwrap())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        info.contains(&format!("rows from input value {k}")),
        "{info}"
    );
    let (theirs, _) = optimize(model, Rewrites::None, auto()).unwrap();
    for (case, x) in int8_inputs(5, k as usize).iter().enumerate() {
        let (a, b) = (run(ours.clone(), x), run(theirs.clone(), x));
        assert_eq!(a.len(), 4 * n as usize);
        assert_eq!(
            a, b,
            "{tile:?} later rows, case {case}: not tract's numbers"
        );
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
    let (theirs, _) = optimize(integer, Rewrites::NoProducts, auto()).unwrap();
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
    check_quant_products(I8Tile::Portable);
}

#[test]
#[cfg_attr(not(host_avx_vnni), ignore = "needs a CPU with AVX-VNNI")]
fn quantized_layers_give_tracts_numbers_on_the_avx_vnni_tile() {
    check_quant_products(I8Tile::avx_vnni().expect("AVX-VNNI"));
}

#[test]
#[cfg_attr(not(host_avx2), ignore = "needs a CPU with AVX2 and FMA")]
fn quantized_layers_give_tracts_numbers_on_the_avx2_tile() {
    check_quant_products(I8Tile::avx2().expect("AVX2 and FMA"));
}

#[test]
#[cfg_attr(not(host_vnni), ignore = "needs a CPU with AVX-512 VNNI")]
fn quantized_layers_give_tracts_numbers_on_the_vnni_tile() {
    check_quant_products(I8Tile::vnni().expect("AVX-512 VNNI"));
    // And `mae-run`'s default rewrites choose them on this CPU; `no-products` does not.
    let (ours, done) = optimize(typed(&dynamic_int8_gelu(70, 45)), Rewrites::All, auto()).unwrap();
    assert_eq!(done.quant_products, 1, "{done:?}");
    assert!(done
        .describe(Rewrites::All)
        .contains("1 int8 products on mae-run's packed kernel"));
    assert_eq!(count::<QuantProduct>(&ours), 1);
    let (_, without) = optimize(
        typed(&dynamic_int8_gelu(70, 45)),
        Rewrites::NoProducts,
        auto(),
    )
    .unwrap();
    assert_eq!(without.quant_products, 0, "{without:?}");
}

#[test]
fn quantized_products_of_other_forms_are_left_to_tract() {
    use prost::Message;
    let tile = I8Tile::Portable;
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
    let tile = I8Tile::Portable;
    let mut ours = model.clone().into_decluttered().unwrap();
    assert_eq!(fuse_attention(&mut ours, F32Tile::Portable).unwrap(), 1);
    assert_eq!(quant_products(&mut ours, tile).unwrap(), 4, "{ours}");
    ours.optimize().unwrap();
    assert_eq!(count::<SelfAttention>(&ours), 1);
    assert_eq!(count::<QuantProduct>(&ours), 4);
    assert!(!ours.nodes().iter().any(is_gelu_exact), "{ours}");
    let (theirs, _) = optimize(model, Rewrites::None, auto()).unwrap();
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
