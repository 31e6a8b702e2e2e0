//! Explanation outputs written into the graph, so that a heatmap costs a few small products at
//! run time and needs no autograd:
//!
//! - **attention rollout** (Abnar & Zuidema 2020, arXiv:2005.00928): each block's attention
//!   probabilities, heads fused by their mean, the identity added and rows renormalised, are
//!   multiplied through the blocks; the map is the row of the token that feeds the head (the
//!   class token, or the mean of the patch-token rows for a global-pool head), over the patches.
//!   Only that row is needed, so it is carried down from the last block as a vector times each
//!   block's matrix (`t²` per block instead of `t³`);
//! - **Grad-CAM** (Selvaraju et al. 2017, arXiv:1610.02391) on the last block's patch tokens of a
//!   global-pool head. The score of class `c` is `W_c · fc_norm(mean_i x_i) + b_c`; its gradient
//!   with respect to every patch token is the same vector, `(1/n) ∂y_c/∂m`, with the LayerNorm's
//!   backward in closed form: for `x̂ = (m - μ)/σ` and `g_c = W_c ⊙ γ`,
//!   `∂y_c/∂m = (g_c - mean(g_c) - x̂ · mean(g_c ⊙ x̂)) / σ`. Grad-CAM's channel weights (the
//!   gradient's mean over the grid) are that vector, and the map of class `c` is
//!   `ReLU(Σ_d w_{c,d} x_{i,d})` at each patch `i`, for every class at once.
//!
//! Both are computed in float32 whatever the graph's precision. A class-token head's score does
//! not depend on the patch tokens of the last block (only the class token reaches `norm` and the
//! head), so Grad-CAM there is zero everywhere; such models are refused it and offered rollout.

use mae_models::checkpoint::StateDict;
use mae_models::explain::GRADCAM_NEEDS_GLOBAL_POOL;
use mae_models::VitConfig;
use tract_onnx::pb::tensor_proto::DataType;

use super::builder::{attr, BuildError, Dim, GraphBuilder};

/// Output names.
pub const ROLLOUT: &str = "rollout";
pub const GRADCAM: &str = "gradcam";

/// Which explanation outputs to add.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Explain {
    pub rollout: bool,
    pub gradcam: bool,
}

impl Explain {
    /// Parses `rollout,gradcam` (either or both).
    pub fn parse(items: &[String]) -> Result<Self, String> {
        let mut e = Self::default();
        for item in items {
            match item.trim() {
                "rollout" => e.rollout = true,
                "gradcam" => e.gradcam = true,
                "occlusion" => {
                    return Err(
                        "occlusion is not a graph output: it runs the model once per \
                                window position; ask `mae-run predict --explain occlusion`, \
                                which works with any classifier"
                            .into(),
                    )
                }
                other => {
                    return Err(format!(
                        "unknown explanation '{other}' (expected rollout, gradcam)"
                    ))
                }
            }
        }
        Ok(e)
    }

    pub fn any(&self) -> bool {
        self.rollout || self.gradcam
    }

    /// Refuses what this model cannot give, saying why.
    pub fn check(&self, cfg: &VitConfig, has_head: bool) -> Result<(), String> {
        if self.gradcam && !cfg.global_pool {
            return Err(format!(
                "{GRADCAM_NEEDS_GLOBAL_POOL} Export `--explain rollout` instead (attention \
                 rollout from the class token), or use `mae-run predict --explain occlusion`"
            ));
        }
        if self.gradcam && !has_head {
            return Err(
                "gradcam needs a classification head; a --features export has none \
                 (rollout works without one)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Each output's name and values per image, in graph order.
    pub fn outputs(&self, cfg: &VitConfig) -> Vec<(&'static str, usize)> {
        let cells = (cfg.img_size / cfg.patch_size).pow(2);
        let mut v = Vec::new();
        if self.rollout {
            v.push((ROLLOUT, cells));
        }
        if self.gradcam {
            v.push((GRADCAM, cfg.num_classes * cells));
        }
        v
    }

    /// `mae.explain`: each output with its shape and what it holds, as JSON.
    pub fn metadata(&self, cfg: &VitConfig) -> String {
        let g = cfg.img_size / cfg.patch_size;
        let mut v = serde_json::Map::new();
        if self.rollout {
            let row = if cfg.global_pool {
                "mean of the patch-token rows"
            } else {
                "class token row"
            };
            v.insert(
                ROLLOUT.into(),
                serde_json::json!({
                    "output": ROLLOUT,
                    "shape": ["batch", g, g],
                    "method": "attention rollout (Abnar & Zuidema 2020): heads fused by mean, \
                               identity added, rows renormalised, multiplied through the blocks",
                    "row": row,
                    "blocks": cfg.depth,
                }),
            );
        }
        if self.gradcam {
            v.insert(
                GRADCAM.into(),
                serde_json::json!({
                    "output": GRADCAM,
                    "shape": ["batch", cfg.num_classes, g, g],
                    "method": "Grad-CAM of each class's logit on the last block's patch \
                               tokens, gradient in closed form, ReLU applied, not normalised",
                    "layer": format!("blocks.{}", cfg.depth.saturating_sub(1)),
                    "per": "class",
                }),
            );
        }
        serde_json::Value::Object(v).to_string()
    }
}

/// What the explanation emitters read from the main graph.
#[derive(Debug, Default)]
pub struct Taps {
    /// Each block's attention probabilities `[b, heads, t, t]`, in block order.
    pub attention: Vec<String>,
    /// The last block's patch tokens `[b, n, d]` and their mean `[b, d]` (global pool only).
    pub pooled: Option<(String, String)>,
}

/// Adds the outputs of `explain`.
pub fn emit(
    g: &mut GraphBuilder,
    cfg: &VitConfig,
    w: &StateDict,
    taps: &Taps,
    explain: Explain,
) -> Result<(), BuildError> {
    let grid = cfg.img_size / cfg.patch_size;
    if explain.rollout {
        let out = rollout(g, cfg, &taps.attention)?;
        let dims = [Dim::Param("batch"), Dim::Fixed(grid), Dim::Fixed(grid)];
        g.output(&out, DataType::Float, &dims)?;
    }
    if explain.gradcam {
        let Some((patches, pooled)) = &taps.pooled else {
            return Err(BuildError::Weight {
                node: GRADCAM.into(),
                reason: "the model has no global-pool head".into(),
            });
        };
        let out = gradcam(g, cfg, w, patches, pooled)?;
        let dims = [
            Dim::Param("batch"),
            Dim::Fixed(cfg.num_classes),
            Dim::Fixed(grid),
            Dim::Fixed(grid),
        ];
        g.output(&out, DataType::Float, &dims)?;
    }
    Ok(())
}

/// Casts a value of the compute type to float32 (a no-op in a float32 graph).
fn to_f32(g: &mut GraphBuilder, scope: &str, xs: &str) -> Result<String, BuildError> {
    if g.float() == DataType::Float {
        return Ok(xs.to_string());
    }
    let to = vec![attr::int("to", DataType::Float as i64)];
    g.node(scope, "Cast", &[xs], to)
}

fn f32_const(
    g: &mut GraphBuilder,
    scope: &str,
    dims: &[usize],
    v: &[f32],
) -> Result<String, BuildError> {
    g.const_float_as(scope, dims, v, DataType::Float)
}

fn unsqueeze(g: &mut GraphBuilder, scope: &str, xs: &str, axis: i64) -> Result<String, BuildError> {
    let axes = g.const_i64(scope, &[axis])?;
    g.node(scope, "Unsqueeze", &[xs, &axes], vec![])
}

/// `ReduceSum` / `ReduceMean` over one axis, keeping it; `ReduceMean`'s axes became an input
/// at opset 18 (`ReduceSum`'s at 13, the lowest opset written).
fn reduce(
    g: &mut GraphBuilder,
    scope: &str,
    op: &str,
    xs: &str,
    axis: i64,
    keep: bool,
) -> Result<String, BuildError> {
    let keepdims = attr::int("keepdims", keep as i64);
    if op == "ReduceSum" || g.opset() >= 18 {
        let axes = g.const_i64(scope, &[axis])?;
        g.node(scope, op, &[xs, &axes], vec![keepdims])
    } else {
        g.node(
            scope,
            op,
            &[xs],
            vec![attr::ints("axes", &[axis]), keepdims],
        )
    }
}

/// The rollout map `[b, g, g]` from each block's attention probabilities.
fn rollout(g: &mut GraphBuilder, cfg: &VitConfig, probs: &[String]) -> Result<String, BuildError> {
    let scope = ROLLOUT;
    let t = cfg.num_tokens();
    if probs.len() != cfg.depth || probs.is_empty() {
        return Err(BuildError::Weight {
            node: scope.into(),
            reason: format!("{} attention maps for {} blocks", probs.len(), cfg.depth),
        });
    }
    let mut identity = vec![0f32; t * t];
    for i in 0..t {
        identity[i * t + i] = 1.0;
    }
    let eye = f32_const(g, scope, &[t, t], &identity)?;
    // Â_l = (mean_h A_l + I), rows renormalised: [b, t, t].
    let mut fused = Vec::with_capacity(probs.len());
    for p in probs {
        let p = to_f32(g, scope, p)?;
        let a = reduce(g, scope, "ReduceMean", &p, 1, false)?; // [b, t, t]
        let a = g.node(scope, "Add", &[&a, &eye], vec![])?;
        let rows = reduce(g, scope, "ReduceSum", &a, -1, true)?; // [b, t, 1]
        fused.push(g.node(scope, "Div", &[&a, &rows], vec![])?);
    }
    // The row of R = Â_L ⋯ Â_1 that feeds the head: v·Â_L, then times each block below.
    let last = fused.last().map_or("", String::as_str).to_string();
    let mut r = if cfg.global_pool {
        let start = g.const_i64(scope, &[1])?;
        let end = g.const_i64(scope, &[t as i64])?;
        let axes = g.const_i64(scope, &[1])?;
        let rows = g.node(scope, "Slice", &[&last, &start, &end, &axes], vec![])?; // [b, n, t]
        reduce(g, scope, "ReduceMean", &rows, 1, true)? // [b, 1, t]
    } else {
        let start = g.const_i64(scope, &[0])?;
        let end = g.const_i64(scope, &[1])?;
        let axes = g.const_i64(scope, &[1])?;
        g.node(scope, "Slice", &[&last, &start, &end, &axes], vec![])? // [b, 1, t]
    };
    for a in fused.iter().rev().skip(1) {
        r = g.node(scope, "MatMul", &[&r, a], vec![])?; // [b, 1, t]
    }
    let start = g.const_i64(scope, &[1])?;
    let end = g.const_i64(scope, &[t as i64])?;
    let axes = g.const_i64(scope, &[2])?;
    let r = g.node(scope, "Slice", &[&r, &start, &end, &axes], vec![])?; // [b, 1, n]
    let grid = (cfg.img_size / cfg.patch_size) as i64;
    let shape = g.const_i64(scope, &[-1, grid, grid])?;
    g.node_to(scope, "Reshape", &[&r, &shape], vec![], ROLLOUT)
}

/// The Grad-CAM maps `[b, classes, g, g]` of every class from the last block's patch tokens
/// `[b, n, d]` and their mean `[b, d]`.
fn gradcam(
    g: &mut GraphBuilder,
    cfg: &VitConfig,
    w: &StateDict,
    patches: &str,
    pooled: &str,
) -> Result<String, BuildError> {
    let scope = GRADCAM;
    let (d, c) = (cfg.embed_dim, cfg.num_classes);
    let n = cfg.num_tokens() - 1;
    let tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>, BuildError> {
        let t = w.get(name).ok_or_else(|| BuildError::Weight {
            node: scope.into(),
            reason: format!("the checkpoint has no tensor '{name}'"),
        })?;
        if t.shape != shape {
            return Err(BuildError::Weight {
                node: scope.into(),
                reason: format!(
                    "tensor '{name}' has shape {:?}, expected {shape:?}",
                    t.shape
                ),
            });
        }
        Ok(t.to_f32_vec())
    };
    let head = tensor("head.weight", &[c, d])?;
    let gamma = tensor("fc_norm.weight", &[d])?;
    // g_c = W_c ⊙ γ, centred: g_c - mean(g_c); and gᵀ / d for mean(g_c ⊙ x̂).
    let mut centred = vec![0f32; c * d];
    let mut gt = vec![0f32; d * c];
    for k in 0..c {
        let row: Vec<f64> = (0..d)
            .map(|j| head[k * d + j] as f64 * gamma[j] as f64)
            .collect();
        let mean = row.iter().sum::<f64>() / d as f64;
        for j in 0..d {
            centred[k * d + j] = (row[j] - mean) as f32;
            gt[j * c + k] = (row[j] / d as f64) as f32;
        }
    }
    let centred = f32_const(g, scope, &[1, c, d], &centred)?;
    let gt = f32_const(g, scope, &[d, c], &gt)?;
    let eps = f32_const(g, scope, &[], &[cfg.layer_norm_eps as f32])?;
    let inv_n = f32_const(g, scope, &[], &[1.0 / n as f32])?;

    let m = to_f32(g, scope, pooled)?; // [b, d]
    let xs = to_f32(g, scope, patches)?; // [b, n, d]
    let mu = reduce(g, scope, "ReduceMean", &m, -1, true)?; // [b, 1]
    let dev = g.node(scope, "Sub", &[&m, &mu], vec![])?;
    let sq = g.node(scope, "Mul", &[&dev, &dev], vec![])?;
    let var = reduce(g, scope, "ReduceMean", &sq, -1, true)?;
    let var = g.node(scope, "Add", &[&var, &eps], vec![])?;
    let std = g.node(scope, "Sqrt", &[&var], vec![])?;
    let inv = g.node(scope, "Reciprocal", &[&std], vec![])?; // [b, 1]
    let xhat = g.node(scope, "Mul", &[&dev, &inv], vec![])?; // [b, d]
    let s = g.node(scope, "MatMul", &[&xhat, &gt], vec![])?; // [b, c]: mean(g_c ⊙ x̂)
    let s = unsqueeze(g, scope, &s, 2)?; // [b, c, 1]
    let xhat = unsqueeze(g, scope, &xhat, 1)?; // [b, 1, d]
    let proj = g.node(scope, "Mul", &[&xhat, &s], vec![])?; // [b, c, d]
    let grad = g.node(scope, "Sub", &[&centred, &proj], vec![])?;
    let inv = unsqueeze(g, scope, &inv, 2)?; // [b, 1, 1]
    let grad = g.node(scope, "Mul", &[&grad, &inv], vec![])?; // ∂y/∂m, [b, c, d]
    let grad = g.node(scope, "Mul", &[&grad, &inv_n], vec![])?; // Grad-CAM's weights
    let perm = vec![attr::ints("perm", &[0, 2, 1])];
    let xt = g.node(scope, "Transpose", &[&xs], perm)?; // [b, d, n]
    let cam = g.node(scope, "MatMul", &[&grad, &xt], vec![])?; // [b, c, n]
    let cam = g.node(scope, "Relu", &[&cam], vec![])?;
    let grid = (cfg.img_size / cfg.patch_size) as i64;
    let shape = g.const_i64(scope, &[0, c as i64, grid, grid])?;
    g.node_to(scope, "Reshape", &[&cam, &shape], vec![], GRADCAM)
}
