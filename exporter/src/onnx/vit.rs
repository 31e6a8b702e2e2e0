//! One emitter per block of the Vision Transformer (Dosovitskiy et al. 2020, arXiv:2010.11929)
//! as facebookresearch/mae's `models_vit.VisionTransformer` computes it, which is timm's:
//! patch embedding, class token and position embedding, pre-norm blocks of multi-head
//! self-attention and an exact-erf GELU MLP, then a global-pool + `fc_norm` or class-token +
//! `norm` head.
//!
//! Initializers keep the upstream parameter names and shapes (a linear layer is
//! `MatMul(xs, Transpose(weight)) + bias`, the transpose being folded by every runtime at load),
//! so the graph reads like the PyTorch module tree.

use std::collections::BTreeMap;

use mae_models::checkpoint::{StateDict, Task};
use mae_models::preprocess::PreprocessSpec;
use mae_models::VitConfig;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::GraphProto;

use super::builder::{attr, BuildError, Dim, GraphBuilder};
use super::explain::{self, Explain, Taps};
use super::quant;
use super::tensor::from_tensor_data;

/// Numeric precision of the exported graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// float32 weights and compute.
    Fp32,
    /// float16 weights and compute; float32 inputs and outputs.
    Fp16,
    /// float32, with the linear layers' weights in int8 and their inputs quantised dynamically.
    Int8,
}

/// What the graph outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// `logits` and `probabilities` (softmax, or sigmoid for multi-label).
    Logits(Task),
    /// `features`: the pooled embedding the head would see.
    Features,
}

/// Everything that shapes the graph besides the architecture and the weights.
#[derive(Debug, Clone)]
pub struct GraphOptions {
    pub opset: i64,
    pub precision: Precision,
    pub output: Output,
    /// Take `image` uint8 `[batch, H, W, 3]` and normalise inside the graph.
    pub preprocessing: Option<PreprocessSpec>,
    /// With [`Precision::Int8`]: the calibrated `(min, max)` of each linear layer's input, by
    /// layer (`blocks.0.attn.qkv`), for static quantisation; `None` quantises dynamically.
    pub activation_ranges: Option<BTreeMap<String, (f32, f32)>>,
    /// Also output each linear layer's input, under its own value name (for calibration).
    pub tap_linear_inputs: bool,
    /// Explanation outputs after the others (none: the plain graph).
    pub explain: Explain,
}

/// A built graph, with the linear layers' inputs.
#[derive(Debug)]
pub struct Built {
    pub graph: GraphProto,
    /// `(layer, value)`: each linear layer's prefix and the name of its input value, in graph
    /// order; graph outputs too when [`GraphOptions::tap_linear_inputs`].
    pub linear_inputs: Vec<(String, String)>,
}

/// Name of the symbolic batch dimension.
pub const BATCH: &str = "batch";
/// Input names.
pub const PIXEL_VALUES: &str = "pixel_values";
pub const IMAGE: &str = "image";
/// Output names.
pub const LOGITS: &str = "logits";
pub const PROBABILITIES: &str = "probabilities";
pub const FEATURES: &str = "features";

/// Builds the graph of `cfg` with the weights of `tensors` (upstream names).
pub fn build(
    cfg: &VitConfig,
    tensors: &StateDict,
    opts: &GraphOptions,
) -> Result<GraphProto, BuildError> {
    build_traced(cfg, tensors, opts).map(|b| b.graph)
}

/// [`build`], also naming each linear layer's input.
pub fn build_traced(
    cfg: &VitConfig,
    tensors: &StateDict,
    opts: &GraphOptions,
) -> Result<Built, BuildError> {
    let float = match opts.precision {
        Precision::Fp16 => DataType::Float16,
        Precision::Fp32 | Precision::Int8 => DataType::Float,
    };
    let mut e = Emitter {
        g: GraphBuilder::new(opts.opset, float),
        w: tensors,
        precision: opts.precision,
        eps: cfg.layer_norm_eps as f32,
        ranges: opts.activation_ranges.as_ref(),
        tokens: cfg.num_tokens(),
        linear_inputs: Vec::new(),
        taps: Taps::default(),
    };
    let xs = match &opts.preprocessing {
        Some(spec) => e.preprocess(cfg, spec)?,
        None => {
            let dims = image_dims(cfg);
            e.g.input(PIXEL_VALUES, DataType::Float, &dims)?
        }
    };
    let xs = e.cast_to_compute(&xs)?;
    let xs = e.patch_embed(cfg, &xs)?; // [b, n, d]
    let mut xs = e.prepend_cls_token(cfg, &xs)?; // [b, t, d]
    for i in 0..cfg.depth {
        xs = e.block(cfg, &format!("blocks.{i}"), &xs)?;
    }
    let pooled = e.pool(cfg, &xs)?; // [b, d]
    match opts.output {
        Output::Features => {
            let out = e.output_f32(&pooled, FEATURES)?;
            let dims = [Dim::Param(BATCH), Dim::Fixed(cfg.embed_dim)];
            e.g.output(&out, DataType::Float, &dims)?;
        }
        Output::Logits(task) => {
            let c = cfg.num_classes;
            let logits = e.linear("head", &pooled, cfg.embed_dim, c)?;
            let logits = e.output_f32(&logits, LOGITS)?;
            let op = if task == Task::MultiLabel {
                "Sigmoid"
            } else {
                "Softmax"
            };
            let attrs = if op == "Softmax" {
                vec![attr::int("axis", -1)]
            } else {
                vec![]
            };
            e.g.node_to("head", op, &[&logits], attrs, PROBABILITIES)?;
            let dims = [Dim::Param(BATCH), Dim::Fixed(c)];
            e.g.output(LOGITS, DataType::Float, &dims)?;
            e.g.output(PROBABILITIES, DataType::Float, &dims)?;
        }
    }
    let linear_inputs: Vec<(String, String)> = e
        .linear_inputs
        .iter()
        .map(|(p, v, _)| (p.clone(), v.clone()))
        .collect();
    if opts.tap_linear_inputs {
        for (_, value, dims) in std::mem::take(&mut e.linear_inputs) {
            e.g.output(&value, DataType::Float, &dims)?;
        }
    }
    if opts.explain.any() {
        explain::emit(&mut e.g, cfg, tensors, &e.taps, opts.explain)?;
    }
    Ok(Built {
        graph: e.g.finish("vit"),
        linear_inputs,
    })
}

fn image_dims(cfg: &VitConfig) -> [Dim; 4] {
    let s = cfg.img_size;
    [
        Dim::Param(BATCH),
        Dim::Fixed(cfg.in_chans),
        Dim::Fixed(s),
        Dim::Fixed(s),
    ]
}

/// The builder plus what every emitter needs.
struct Emitter<'a> {
    g: GraphBuilder,
    w: &'a StateDict,
    precision: Precision,
    eps: f32,
    ranges: Option<&'a BTreeMap<String, (f32, f32)>>,
    tokens: usize,
    /// `(layer, input value, its dims)` of every linear layer so far.
    linear_inputs: Vec<(String, String, Vec<Dim>)>,
    /// The values the explanation outputs read.
    taps: Taps,
}

impl Emitter<'_> {
    /// Adds checkpoint tensor `name` as an initializer, checking its shape.
    fn param(&mut self, name: &str, shape: &[usize]) -> Result<String, BuildError> {
        let t = self.tensor(name, shape)?;
        let proto = from_tensor_data(name, t, self.g.float());
        self.g.initializer(proto)
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<&mae_models::TensorData, BuildError> {
        let node = name.rsplit_once('.').map_or(name, |(m, _)| m).to_string();
        let t = self.w.get(name).ok_or_else(|| BuildError::Weight {
            node: node.clone(),
            reason: format!("the checkpoint has no tensor '{name}'"),
        })?;
        if t.shape != shape {
            return Err(BuildError::Weight {
                node,
                reason: format!(
                    "tensor '{name}' has shape {:?}, expected {shape:?}",
                    t.shape
                ),
            });
        }
        if !t.dtype.is_float() {
            return Err(BuildError::Weight {
                node,
                reason: format!("tensor '{name}' is {}, not floating point", t.dtype),
            });
        }
        Ok(t)
    }

    /// Casts a float32 graph input to the compute type.
    fn cast_to_compute(&mut self, xs: &str) -> Result<String, BuildError> {
        if self.g.float() == DataType::Float {
            return Ok(xs.to_string());
        }
        let to = self.g.float() as i64;
        self.g
            .node("input", "Cast", &[xs], vec![attr::int("to", to)])
    }

    /// Names a result as graph output `name`, as float32.
    fn output_f32(&mut self, xs: &str, name: &str) -> Result<String, BuildError> {
        if self.g.float() == DataType::Float {
            return self.g.node_to(name, "Identity", &[xs], vec![], name);
        }
        let to = vec![attr::int("to", DataType::Float as i64)];
        self.g.node_to(name, "Cast", &[xs], to, name)
    }

    /// `image` uint8 `[b, h, w, 3]` → normalised float32 `[b, 3, h, w]`, as torchvision's
    /// `ToTensor` then `Normalize(mean, std)`.
    fn preprocess(&mut self, cfg: &VitConfig, spec: &PreprocessSpec) -> Result<String, BuildError> {
        let s = cfg.img_size;
        let dims = [
            Dim::Param(BATCH),
            Dim::Fixed(s),
            Dim::Fixed(s),
            Dim::Fixed(cfg.in_chans),
        ];
        let image = self.g.input(IMAGE, DataType::Uint8, &dims)?;
        let scope = "preprocess";
        let to = vec![attr::int("to", DataType::Float as i64)];
        let xs = self.g.node(scope, "Cast", &[&image], to)?;
        let perm = vec![attr::ints("perm", &[0, 3, 1, 2])];
        let xs = self.g.node(scope, "Transpose", &[&xs], perm)?; // [b, c, h, w]
        let c255 = self.const_f32(scope, &[], &[255.0])?;
        let xs = self.g.node(scope, "Div", &[&xs, &c255], vec![])?;
        let mean = self.const_f32(scope, &[1, 3, 1, 1], &spec.mean)?;
        let std = self.const_f32(scope, &[1, 3, 1, 1], &spec.std)?;
        let xs = self.g.node(scope, "Sub", &[&xs, &mean], vec![])?;
        self.g.node(scope, "Div", &[&xs, &std], vec![])
    }

    /// A float32 constant whatever the compute type (preprocessing, primitive LayerNorm in fp16).
    fn const_f32(&mut self, scope: &str, dims: &[usize], v: &[f32]) -> Result<String, BuildError> {
        self.g.const_float_as(scope, dims, v, DataType::Float)
    }

    /// `patch_embed`: a stride-`p` convolution, then the patch grid flattened into tokens.
    fn patch_embed(&mut self, cfg: &VitConfig, xs: &str) -> Result<String, BuildError> {
        let (p, c, d) = (cfg.patch_size, cfg.in_chans, cfg.embed_dim);
        let scope = "patch_embed.proj";
        let w = self.param("patch_embed.proj.weight", &[d, c, p, p])?;
        let b = self.param("patch_embed.proj.bias", &[d])?;
        let k = [p as i64, p as i64];
        let attrs = vec![attr::ints("kernel_shape", &k), attr::ints("strides", &k)];
        let xs = self.g.node(scope, "Conv", &[xs, &w, &b], attrs)?; // [b, d, g, g]
        let shape = self.g.const_i64("patch_embed", &[0, d as i64, -1])?;
        let xs = self
            .g
            .node("patch_embed", "Reshape", &[&xs, &shape], vec![])?; // [b, d, n]
        let perm = vec![attr::ints("perm", &[0, 2, 1])];
        self.g.node("patch_embed", "Transpose", &[&xs], perm) // [b, n, d]
    }

    /// Prepends `cls_token` (broadcast over the batch) and adds `pos_embed`.
    fn prepend_cls_token(&mut self, cfg: &VitConfig, xs: &str) -> Result<String, BuildError> {
        let (d, t) = (cfg.embed_dim, cfg.num_tokens());
        let cls = self.param("cls_token", &[1, 1, d])?;
        let pos = self.param("pos_embed", &[1, t, d])?;
        let scope = "cls_token";
        let shape = self.g.node(scope, "Shape", &[xs], vec![])?;
        let zero = self.g.const_i64(scope, &[0])?;
        let one = self.g.const_i64(scope, &[1])?;
        let b = self
            .g
            .node(scope, "Slice", &[&shape, &zero, &one], vec![])?; // [1]
        let rest = self.g.const_i64(scope, &[1, d as i64])?;
        let axis0 = vec![attr::int("axis", 0)];
        let target = self.g.node(scope, "Concat", &[&b, &rest], axis0)?; // [b, 1, d]
        let cls = self.g.node(scope, "Expand", &[&cls, &target], vec![])?;
        let axis1 = vec![attr::int("axis", 1)];
        let xs = self.g.node(scope, "Concat", &[&cls, xs], axis1)?; // [b, t, d]
        self.g.node("pos_embed", "Add", &[&xs, &pos], vec![])
    }

    /// One pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.
    fn block(&mut self, cfg: &VitConfig, prefix: &str, xs: &str) -> Result<String, BuildError> {
        let d = cfg.embed_dim;
        let h = self.layer_norm(&format!("{prefix}.norm1"), xs, d)?;
        let h = self.attention(cfg, &format!("{prefix}.attn"), &h)?;
        let xs = self.g.node(prefix, "Add", &[xs, &h], vec![])?;
        let h = self.layer_norm(&format!("{prefix}.norm2"), &xs, d)?;
        let h = self.mlp(cfg, &format!("{prefix}.mlp"), &h)?;
        self.g.node(prefix, "Add", &[&xs, &h], vec![])
    }

    /// Multi-head self-attention: `softmax(q kᵀ / √dₕ) v` per head, then `proj`.
    fn attention(&mut self, cfg: &VitConfig, prefix: &str, xs: &str) -> Result<String, BuildError> {
        let (d, nh) = (cfg.embed_dim, cfg.num_heads);
        let dh = d / nh;
        let qkv = if cfg.qkv_bias {
            self.linear(&format!("{prefix}.qkv"), xs, d, 3 * d)?
        } else {
            self.linear_no_bias(&format!("{prefix}.qkv"), xs, d, 3 * d)?
        }; // [b, t, 3d]
        let shape = self.g.const_i64(prefix, &[0, 0, 3, nh as i64, dh as i64])?;
        let qkv = self.g.node(prefix, "Reshape", &[&qkv, &shape], vec![])?; // [b, t, 3, h, dh]
        let perm = vec![attr::ints("perm", &[2, 0, 3, 1, 4])];
        let qkv = self.g.node(prefix, "Transpose", &[&qkv], perm)?; // [3, b, h, t, dh]
        let mut qkv_parts = Vec::with_capacity(3);
        for i in 0..3 {
            let idx = self.g.scalar_i64(prefix, i)?;
            let axis = vec![attr::int("axis", 0)];
            qkv_parts.push(self.g.node(prefix, "Gather", &[&qkv, &idx], axis)?);
            // [b, h, t, dh]
        }
        let scale = self.g.const_float(prefix, &[], &[(dh as f32).powf(-0.5)])?;
        let q = self
            .g
            .node(prefix, "Mul", &[&qkv_parts[0], &scale], vec![])?;
        let perm = vec![attr::ints("perm", &[0, 1, 3, 2])];
        let kt = self.g.node(prefix, "Transpose", &[&qkv_parts[1]], perm)?; // [b, h, dh, t]
        let scores = self.g.node(prefix, "MatMul", &[&q, &kt], vec![])?; // [b, h, t, t]
        let axis = vec![attr::int("axis", -1)];
        let weights = self.g.node(prefix, "Softmax", &[&scores], axis)?;
        self.taps.attention.push(weights.clone());
        let xs = self
            .g
            .node(prefix, "MatMul", &[&weights, &qkv_parts[2]], vec![])?; // [b, h, t, dh]
        let perm = vec![attr::ints("perm", &[0, 2, 1, 3])];
        let xs = self.g.node(prefix, "Transpose", &[&xs], perm)?; // [b, t, h, dh]
        let shape = self.g.const_i64(prefix, &[0, 0, d as i64])?;
        let xs = self.g.node(prefix, "Reshape", &[&xs, &shape], vec![])?; // [b, t, d]
        self.linear(&format!("{prefix}.proj"), &xs, d, d)
    }

    /// `fc1`, exact-erf GELU (`nn.GELU()`), `fc2`.
    fn mlp(&mut self, cfg: &VitConfig, prefix: &str, xs: &str) -> Result<String, BuildError> {
        let (d, hidden) = (cfg.embed_dim, cfg.mlp_hidden());
        let xs = self.linear(&format!("{prefix}.fc1"), xs, d, hidden)?;
        let xs = self.gelu(&format!("{prefix}.act"), &xs)?;
        self.linear(&format!("{prefix}.fc2"), &xs, hidden, d)
    }

    /// `x · ½ · (1 + erf(x / √2))`, written with `Erf` so that every opset and runtime runs it.
    fn gelu(&mut self, scope: &str, xs: &str) -> Result<String, BuildError> {
        let sqrt2 = self
            .g
            .const_float(scope, &[], &[std::f32::consts::SQRT_2])?;
        let one = self.g.const_float(scope, &[], &[1.0])?;
        let half = self.g.const_float(scope, &[], &[0.5])?;
        let h = self.g.node(scope, "Div", &[xs, &sqrt2], vec![])?;
        let h = self.g.node(scope, "Erf", &[&h], vec![])?;
        let h = self.g.node(scope, "Add", &[&h, &one], vec![])?;
        let h = self.g.node(scope, "Mul", &[xs, &h], vec![])?;
        self.g.node(scope, "Mul", &[&h, &half], vec![])
    }

    /// `nn.Linear`: `xs · weightᵀ + bias`, over the last axis of any rank.
    fn linear(
        &mut self,
        prefix: &str,
        xs: &str,
        d_in: usize,
        d_out: usize,
    ) -> Result<String, BuildError> {
        let h = self.linear_no_bias(prefix, xs, d_in, d_out)?;
        let b = self.param(&format!("{prefix}.bias"), &[d_out])?;
        self.g.node(prefix, "Add", &[&h, &b], vec![])
    }

    fn linear_no_bias(
        &mut self,
        prefix: &str,
        xs: &str,
        d_in: usize,
        d_out: usize,
    ) -> Result<String, BuildError> {
        // The head sees the pooled `[b, d]`; every other linear layer `[b, tokens, d]`.
        let dims = if prefix == "head" {
            vec![Dim::Param(BATCH), Dim::Fixed(d_in)]
        } else {
            vec![Dim::Param(BATCH), Dim::Fixed(self.tokens), Dim::Fixed(d_in)]
        };
        self.linear_inputs
            .push((prefix.to_string(), xs.to_string(), dims));
        let name = format!("{prefix}.weight");
        if self.precision == Precision::Int8 {
            let t = self.tensor(&name, &[d_out, d_in])?;
            let values = t.to_f32_vec();
            let Some(ranges) = self.ranges else {
                return quant::linear_int8(&mut self.g, prefix, xs, &values, d_in, d_out);
            };
            let range = ranges
                .get(prefix)
                .copied()
                .ok_or_else(|| BuildError::Weight {
                    node: prefix.to_string(),
                    reason: "no calibrated range for its input".to_string(),
                })?;
            return quant::linear_qdq(&mut self.g, prefix, xs, &values, (d_in, d_out), range);
        }
        let w = self.param(&name, &[d_out, d_in])?;
        let perm = vec![attr::ints("perm", &[1, 0])];
        let wt = self.g.node(prefix, "Transpose", &[&w], perm)?; // [d_in, d_out]
        self.g.node(prefix, "MatMul", &[xs, &wt], vec![])
    }

    /// `nn.LayerNorm(d, eps)` over the last axis: the `LayerNormalization` op from opset 17,
    /// primitive ops below it (computed in float32 even in a float16 graph, where squares of
    /// large activations would overflow).
    fn layer_norm(&mut self, prefix: &str, xs: &str, d: usize) -> Result<String, BuildError> {
        let w = self.param(&format!("{prefix}.weight"), &[d])?;
        let b = self.param(&format!("{prefix}.bias"), &[d])?;
        if self.g.opset() >= 17 {
            let attrs = vec![attr::int("axis", -1), attr::float("epsilon", self.eps)];
            return self
                .g
                .node(prefix, "LayerNormalization", &[xs, &w, &b], attrs);
        }
        let fp16 = self.g.float() == DataType::Float16;
        let xs = if fp16 {
            let to = vec![attr::int("to", DataType::Float as i64)];
            self.g.node(prefix, "Cast", &[xs], to)?
        } else {
            xs.to_string()
        };
        let mean = self.reduce_mean(prefix, &xs, -1, true)?;
        let dev = self.g.node(prefix, "Sub", &[&xs, &mean], vec![])?;
        let sq = self.g.node(prefix, "Mul", &[&dev, &dev], vec![])?;
        let var = self.reduce_mean(prefix, &sq, -1, true)?;
        let eps = self.const_f32(prefix, &[], &[self.eps])?;
        let var = self.g.node(prefix, "Add", &[&var, &eps], vec![])?;
        let std = self.g.node(prefix, "Sqrt", &[&var], vec![])?;
        let normed = self.g.node(prefix, "Div", &[&dev, &std], vec![])?;
        let normed = if fp16 {
            let to = vec![attr::int("to", DataType::Float16 as i64)];
            self.g.node(prefix, "Cast", &[&normed], to)?
        } else {
            normed
        };
        let scaled = self.g.node(prefix, "Mul", &[&normed, &w], vec![])?;
        self.g.node(prefix, "Add", &[&scaled, &b], vec![])
    }

    /// `ReduceMean` over one axis; its axes became an input at opset 18.
    fn reduce_mean(
        &mut self,
        scope: &str,
        xs: &str,
        axis: i64,
        keepdims: bool,
    ) -> Result<String, BuildError> {
        let keep = attr::int("keepdims", keepdims as i64);
        if self.g.opset() >= 18 {
            let axes = self.g.const_i64(scope, &[axis])?;
            self.g.node(scope, "ReduceMean", &[xs, &axes], vec![keep])
        } else {
            let axes = attr::ints("axes", &[axis]);
            self.g.node(scope, "ReduceMean", &[xs], vec![axes, keep])
        }
    }

    /// The head's input: the mean of the patch tokens through `fc_norm` (global pool), or the
    /// class token through `norm`.
    fn pool(&mut self, cfg: &VitConfig, xs: &str) -> Result<String, BuildError> {
        let (d, t) = (cfg.embed_dim, cfg.num_tokens());
        if cfg.global_pool {
            let scope = "global_pool";
            let start = self.g.const_i64(scope, &[1])?;
            let end = self.g.const_i64(scope, &[t as i64])?;
            let axes = self.g.const_i64(scope, &[1])?;
            let patches = self
                .g
                .node(scope, "Slice", &[xs, &start, &end, &axes], vec![])?; // [b, n, d]
            let pooled = self.reduce_mean(scope, &patches, 1, false)?; // [b, d]
            self.taps.pooled = Some((patches, pooled.clone()));
            self.layer_norm("fc_norm", &pooled, d)
        } else {
            let idx = self.g.scalar_i64("cls_pool", 0)?;
            let axis = vec![attr::int("axis", 1)];
            let cls = self.g.node("cls_pool", "Gather", &[xs, &idx], axis)?; // [b, d]
                                                                             // LayerNorm acts per token, so normalising the class token alone equals upstream's
                                                                             // `norm(x)[:, 0]`.
            self.layer_norm("norm", &cls, d)
        }
    }
}
