//! Float32 activations to uint8, as ONNX `DynamicQuantizeLinear` (the range of each input,
//! widened to hold zero) and `QuantizeLinear` (a calibrated scale) define it and tract computes
//! it: `x / scale` or `x · (1 / scale)` rounded half to even, plus the zero point, saturated.
//! The portable code here is written so that the compiler vectorises it, and runs compiled for
//! the path's instruction set ([`Vector`]); the explicit AVX-512 forms (`x86_64/avx512.rs`) give
//! the same bytes.

use crate::kernels::shape::Body;
use crate::kernels::vector::Vector;

/// How the float32 activations of an int8 product become uint8.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActivationQuant {
    /// ONNX `DynamicQuantizeLinear`: the range of each input, widened to hold zero; `x / scale`
    /// rounded half to even, plus the zero point. The columns' scales are then multiplied by
    /// each input's scale.
    Dynamic,
    /// A calibrated range: `x · inv_scale` rounded half to even, plus `zero_point`. The columns'
    /// scales are final.
    Static { inv_scale: f32, zero_point: u8 },
}

/// `v` clamped to `[lo, hi]` (both within ±2²²) and rounded to the nearest integer, ties to
/// even: adding 1.5 · 2²³ rounds the sum to an integer held in its low mantissa bits. Safe code
/// that the compiler vectorises, where `round_ties_even` is a call per element and a
/// saturating float-to-integer cast is not vectorised.
#[inline(always)]
pub fn round_clamped(v: f32, lo: f32, hi: f32) -> i32 {
    const ROUND: f32 = 12_582_912.0;
    (v.clamp(lo, hi) + ROUND).to_bits() as i32 - 0x4B40_0000
}

/// `xs` quantised to uint8 into `ys`: `scaled(x)` rounded half to even, plus the zero point,
/// saturated.
#[inline(always)]
pub fn quantize_into(xs: &[f32], ys: &mut [u8], zero_point: u8, scaled: impl Fn(f32) -> f32) {
    let z = zero_point as f32;
    let (lo, hi) = (-z - 1.0, 256.0 - z);
    for (y, x) in ys.iter_mut().zip(xs) {
        *y = (round_clamped(scaled(*x), lo, hi) + zero_point as i32).clamp(0, 255) as u8;
    }
}

/// `(scale, zero point)` of `xs`'s range widened to hold zero, as ONNX's
/// `DynamicQuantizeLinear` defines them (and tract computes them), on `vector`.
pub fn dynamic_range(xs: &[f32], vector: Vector) -> (f32, u8) {
    #[cfg(target_arch = "x86_64")]
    if let Vector::Avx512(cpu) = vector {
        let (lo, hi) = cpu.range_lanes(xs);
        let rest = xs.chunks_exact(16).remainder();
        return range_to_quant(fold_min(&lo, rest), fold_max(&hi, rest));
    }
    let (min, max) = vector.run(Range(xs));
    range_to_quant(min, max)
}

/// [`range_portable`], as a [`Body`].
struct Range<'a>(&'a [f32]);

impl Body for Range<'_> {
    type Out = (f32, f32);
    #[inline(always)]
    fn run(self) -> (f32, f32) {
        range_portable(self.0)
    }
}

/// [`quantize_into`] of `xs` into `ys`, scaled as `scaled` says, as a [`Body`].
pub(crate) struct Quantize<'a> {
    pub xs: &'a [f32],
    pub ys: &'a mut [u8],
    pub zero_point: u8,
    pub scaled: Scaled,
}

impl Body for Quantize<'_> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        let (xs, ys, zero) = (self.xs, self.ys, self.zero_point);
        match self.scaled {
            Scaled::Times(f) => quantize_into(xs, ys, zero, |v| v * f),
            Scaled::Over(d) => quantize_into(xs, ys, zero, |v| v / d),
        }
    }
}

/// The smallest and largest of `xs` and zero, on 16 lanes the compiler may vectorise.
#[inline(always)]
pub(crate) fn range_portable(xs: &[f32]) -> (f32, f32) {
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
    (fold_min(&lo, rest), fold_max(&hi, rest))
}

/// The smallest of `lanes`, `rest` and zero, in order.
pub(crate) fn fold_min(lanes: &[f32], rest: &[f32]) -> f32 {
    lanes
        .iter()
        .chain(rest)
        .fold(0f32, |a, &v| if v < a { v } else { a })
}

/// The largest of `lanes`, `rest` and zero, in order.
pub(crate) fn fold_max(lanes: &[f32], rest: &[f32]) -> f32 {
    lanes
        .iter()
        .chain(rest)
        .fold(0f32, |a, &v| if v > a { v } else { a })
}

/// `DynamicQuantizeLinear`'s scale and zero point for a range `[min, max]` that holds zero.
fn range_to_quant(min: f32, max: f32) -> (f32, u8) {
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

/// How a value is scaled before it is rounded: times the inverse of a calibrated scale (as
/// tract's `QuantizeLinear`), or divided by a dynamic one (as its `DynamicQuantizeLinear`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scaled {
    Times(f32),
    Over(f32),
}

/// How one product's input becomes uint8: its zero point, how each value is scaled (none:
/// every value is the zero point, for an input of all zeros), and the factor of the columns'
/// scales (the input's scale, for a dynamic quantization).
#[derive(Debug, Clone, Copy)]
pub struct Quantizer {
    pub zero: u8,
    scaled: Option<Scaled>,
    pub factor: f32,
    /// The instruction set it runs on.
    vector: Vector,
}

impl Quantizer {
    /// The quantizer of `a` (a dynamic quantization takes the range of all of it), on
    /// `vector`.
    pub fn of(a: &[f32], quant: ActivationQuant, vector: Vector) -> Self {
        let (zero, scaled, factor) = match quant {
            ActivationQuant::Static {
                inv_scale,
                zero_point,
            } => (zero_point, Some(Scaled::Times(inv_scale)), 1.0),
            ActivationQuant::Dynamic => {
                let (scale, zero) = dynamic_range(a, vector);
                // A range of zero (all zeros) leaves every value at the zero point.
                (zero, (scale > 0.0).then_some(Scaled::Over(scale)), scale)
            }
        };
        Self {
            zero,
            scaled,
            factor,
            vector,
        }
    }

    /// `xs` quantized into `ys` (as long).
    pub fn run(self, xs: &[f32], ys: &mut [u8]) {
        match self.scaled {
            Some(scaled) => quantize(xs, ys, self.zero, scaled, self.vector),
            None => ys.fill(self.zero),
        }
    }
}

/// `xs` quantized into `ys` (as long): `scaled(x)` rounded half to even, plus `zero_point`,
/// saturated, on `vector`.
pub fn quantize(xs: &[f32], ys: &mut [u8], zero_point: u8, scaled: Scaled, vector: Vector) {
    let n = xs.len().min(ys.len());
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if let Vector::Avx512(cpu) = vector {
        let factor = match scaled {
            Scaled::Times(f) => (f, false),
            Scaled::Over(d) => (d, true),
        };
        done = cpu.quantize(&xs[..n], &mut ys[..n], zero_point, factor);
    }
    let (xs, ys) = (&xs[done..n], &mut ys[done..n]);
    vector.run(Quantize {
        xs,
        ys,
        zero_point,
        scaled,
    });
}
