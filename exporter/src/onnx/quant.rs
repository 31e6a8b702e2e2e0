//! int8 quantisation of linear layers, in the two patterns ONNX Runtime's quantisation tools
//! write and every ONNX runtime reads. The weights are int8 with one symmetric scale per output
//! channel in both.
//!
//! - **Dynamic** ([`linear_int8`], `quantize_dynamic`'s pattern): the activations are quantised
//!   to uint8 per call (`DynamicQuantizeLinear`), `MatMulInteger` accumulates in int32 and one
//!   multiply restores the float scale.
//! - **Static** ([`linear_qdq`], `quantize_static`'s QDQ pattern): the activations' uint8 scale
//!   and zero point were fixed beforehand from calibration images, and the graph says where
//!   values are quantised with `QuantizeLinear` → `DequantizeLinear` pairs around a float
//!   `MatMul`. Runtimes fuse the pattern into their integer kernels (ONNX Runtime: DQ → MatMul
//!   becomes `MatMulIntegerToFloat`); one that does not still computes the same values.
//!
//! The weights use 7 bits of the int8 range (±63, ONNX Runtime's `reduce_range`). uint8 × int8
//! is the product VNNI and AMX compute (ONNX Runtime's u8s8 kernels: on a Sapphire Rapids CPU,
//! ViT-B ran 4.9× faster than fp32 this way, against 1.15× with uint8 weights, which take the
//! u8u8 kernels); CPUs without VNNI multiply uint8 × int8 pairs into saturating int16 sums,
//! which 7-bit weights cannot overflow (255 · 63 · 2 < 2¹⁵).

use tract_onnx::pb::tensor_proto::DataType;

use super::builder::{attr, BuildError, GraphBuilder};
use super::tensor::{f32_tensor, i8_tensor, u8_tensor};

/// Largest quantised weight magnitude: 7 bits, so that no CPU's uint8 × int8 pair sums
/// saturate.
pub const QMAX: f32 = 63.0;

/// Symmetric per-row int8 quantisation of a `[rows, cols]` matrix: `w ≈ q · scale[row]`.
pub fn quantize_rows(w: &[f32], rows: usize, cols: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; rows * cols];
    let mut scales = vec![1f32; rows];
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = if amax > 0.0 { amax / QMAX } else { 1.0 };
        scales[r] = s;
        for (c, v) in row.iter().enumerate() {
            q[r * cols + c] = (v / s).round().clamp(-QMAX, QMAX) as i8;
        }
    }
    (q, scales)
}

/// The initializers of `w` (`[d_out, d_in]`, upstream layout) quantised per output channel:
/// int8 `{prefix}.weight_quantized`, transposed to `[d_in, d_out]`, its scales
/// `{prefix}.weight_scale` (`[d_out]`) and its zero points `{prefix}.weight_zero_point`, all 0
/// (one per column when `per_column_zero`, as a per-axis `DequantizeLinear` wants, else a
/// scalar).
fn int8_weight(
    g: &mut GraphBuilder,
    prefix: &str,
    w: &[f32],
    (d_in, d_out): (usize, usize),
    per_column_zero: bool,
) -> Result<(String, String, String), BuildError> {
    let (q, scales) = quantize_rows(w, d_out, d_in);
    let mut qt = vec![0i8; q.len()];
    for o in 0..d_out {
        for i in 0..d_in {
            qt[i * d_out + o] = q[o * d_in + i];
        }
    }
    let wq = g.initializer(i8_tensor(
        &format!("{prefix}.weight_quantized"),
        &[d_in, d_out],
        &qt,
    ))?;
    let ws = g.initializer(f32_tensor(
        &format!("{prefix}.weight_scale"),
        &[d_out],
        &scales,
        DataType::Float,
    ))?;
    let zero_dims: &[usize] = if per_column_zero { &[d_out] } else { &[] };
    let zeros = vec![0i8; if per_column_zero { d_out } else { 1 }];
    let wz = g.initializer(i8_tensor(
        &format!("{prefix}.weight_zero_point"),
        zero_dims,
        &zeros,
    ))?;
    Ok((wq, ws, wz))
}

/// `xs · wᵀ` with `w` (`[d_out, d_in]`, upstream layout) quantised; float32 in and out.
///
/// The quantised weight is stored transposed, `[d_in, d_out]`, as `{prefix}.weight_quantized`
/// (int8, zero point `{prefix}.weight_zero_point` = 0), with `{prefix}.weight_scale`
/// (`[d_out]`).
pub fn linear_int8(
    g: &mut GraphBuilder,
    prefix: &str,
    xs: &str,
    w: &[f32],
    d_in: usize,
    d_out: usize,
) -> Result<String, BuildError> {
    let (wq, ws, wz) = int8_weight(g, prefix, w, (d_in, d_out), false)?;
    let parts = g.node_multi(prefix, "DynamicQuantizeLinear", &[xs], vec![], 3)?;
    let (xq, x_scale, x_zero) = (&parts[0], &parts[1], &parts[2]);
    let acc = g.node(prefix, "MatMulInteger", &[xq, &wq, x_zero, &wz], vec![])?; // int32
    let to = vec![attr::int("to", DataType::Float as i64)];
    let acc = g.node(prefix, "Cast", &[&acc], to)?;
    let scale = g.node(prefix, "Mul", &[x_scale, &ws], vec![])?; // [d_out]
    g.node(prefix, "Mul", &[&acc, &scale], vec![])
}

/// uint8 scale and zero point covering `[min, max]` (widened to include 0, so that zero is
/// exact), as ONNX Runtime's MinMax calibration sets them.
pub fn activation_params(min: f32, max: f32) -> (f32, u8) {
    let lo = min.min(0.0);
    let hi = max.max(0.0);
    let scale = if hi > lo && (hi - lo).is_finite() {
        (hi - lo) / 255.0
    } else {
        1.0
    };
    let zero = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zero)
}

/// `xs · wᵀ` with `w` (`[d_out, d_in]`) quantised statically: `xs` through
/// `QuantizeLinear`/`DequantizeLinear` with the uint8 parameters of its calibrated range
/// `(min, max)`, the weight as int8 `[d_in, d_out]` (`{prefix}.weight_quantized`) through a
/// per-column `DequantizeLinear` (`{prefix}.weight_scale`, zero points 0), then `MatMul`.
pub fn linear_qdq(
    g: &mut GraphBuilder,
    prefix: &str,
    xs: &str,
    w: &[f32],
    (d_in, d_out): (usize, usize),
    (min, max): (f32, f32),
) -> Result<String, BuildError> {
    let (wq, ws, wz) = int8_weight(g, prefix, w, (d_in, d_out), true)?;
    let (a_scale, a_zero) = activation_params(min, max);
    let xscale = g.initializer(f32_tensor(
        &format!("{prefix}.input_scale"),
        &[],
        &[a_scale],
        DataType::Float,
    ))?;
    let xzero = g.initializer(u8_tensor(
        &format!("{prefix}.input_zero_point"),
        &[],
        &[a_zero],
    ))?;
    let xq = g.node(prefix, "QuantizeLinear", &[xs, &xscale, &xzero], vec![])?;
    let xd = g.node(prefix, "DequantizeLinear", &[&xq, &xscale, &xzero], vec![])?;
    let axis = vec![attr::int("axis", 1)];
    let wd = g.node(prefix, "DequantizeLinear", &[&wq, &ws, &wz], axis)?;
    g.node(prefix, "MatMul", &[&xd, &wd], vec![])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_within_half_a_step() {
        let w = [0.5, -1.0, 0.25, 0.0, 0.0, 0.0, 3.0, 1.5, -0.75];
        let (q, s) = quantize_rows(&w, 3, 3);
        assert_eq!(q[1], -QMAX as i8);
        assert_eq!(s[1], 1.0, "an all-zero row keeps scale 1");
        assert_eq!(q[6], QMAX as i8);
        for r in 0..3 {
            for c in 0..3 {
                let back = q[r * 3 + c] as f32 * s[r];
                assert!((back - w[r * 3 + c]).abs() <= s[r] / 2.0 + 1e-7);
            }
        }
    }

    #[test]
    fn activation_ranges_keep_zero_exact() {
        let (s, z) = activation_params(-1.0, 3.0);
        assert!((s - 4.0 / 255.0).abs() < 1e-7);
        assert_eq!(z, 64);
        // A range on one side of zero is widened to include it.
        let (s, z) = activation_params(0.5, 2.55);
        assert!((s - 0.01).abs() < 1e-7);
        assert_eq!(z, 0);
        let (_, z) = activation_params(-2.0, -1.0);
        assert_eq!(z, 255);
        // Nothing to cover: a unit scale, not a division by zero.
        assert_eq!(activation_params(0.0, 0.0), (1.0, 0));
        assert_eq!(activation_params(f32::NEG_INFINITY, 1.0).0, 1.0);
    }
}
