//! Int8 matrix products against constant weights packed once at load, for the quantized linear
//! layers of a ViT in tract plans (see `tract_rewrite::quant_products`): the float32
//! activations are quantized to uint8 (by their own range, as ONNX `DynamicQuantizeLinear`
//! does, or by a calibrated one), multiplied by int8 weights with 32-bit sums, and the sums
//! are scaled back to float32 per column, with the bias and an exact GELU folded into the
//! store.
//!
//! The numbers are those of tract's own plan for the same graph: the same quantized values,
//! exact integer sums (in any order), then `(sum as f32) · scale[j] + bias[j]`.
//!
//! The weights are packed in panels of [`NR`] columns by groups of four rows,
//! `[n / NR][k / 4][NR][4]`, the activations in panels of [`MR`] rows, `[m / MR][k / 4][MR][4]`:
//! one AVX-512 VNNI instruction multiplies four uint8 values of a row by four int8 weights of
//! each of 16 columns and adds the four products to the column's sum. Work splits over the
//! weight panels on the pool of tract's current executor. The portable tile gives the same
//! sums on any CPU.
#![allow(unsafe_code)]

use crate::dense::{
    check_extents, current_pool, for_each_panel, gelu_erf, output_tensor, store_tile, Out, Strides,
    MR, NR,
};
use rayon::prelude::*;

/// How the float32 activations become uint8.
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

/// A `k × n` int8 weight matrix in panels of [`NR`] columns and groups of four rows (the last
/// of each zero-padded), its column sums, each column's scale and bias (padded alike).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedI8 {
    pub k: usize,
    pub n: usize,
    /// Groups of four rows: `k / 4`, rounded up.
    quads: usize,
    panels: crate::dense::Aligned<i8>,
    col_sums: Vec<i32>,
    scales: Vec<f32>,
    bias: Vec<f32>,
    /// Exact (erf) GELU applied to the scaled sums, as the layer's activation.
    pub gelu: bool,
    pub quant: ActivationQuant,
}

impl PackedI8 {
    /// Packs the weights `at(kk, j)` for `kk < k`, `j < n`, with the columns' scales (`n`
    /// values, or one for all).
    pub fn new(
        k: usize,
        n: usize,
        at: impl Fn(usize, usize) -> i8,
        scales: &[f32],
        quant: ActivationQuant,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            scales.len() == n || scales.len() == 1,
            "int8 product: {} column scales for {n} columns",
            scales.len()
        );
        let count = n.div_ceil(NR);
        let quads = k.div_ceil(4);
        let mut panels = crate::dense::Aligned::zeroed(count * quads * NR * 4);
        let mut col_sums = vec![0i32; count * NR];
        let size = quads * NR * 4;
        for (p, panel) in panels.chunks_exact_mut(size.max(1)).enumerate() {
            let cols = (n - p * NR).min(NR);
            for kk in 0..k {
                for c in 0..cols {
                    let v = at(kk, p * NR + c);
                    panel[((kk / 4) * NR + c) * 4 + kk % 4] = v;
                    col_sums[p * NR + c] += v as i32;
                }
            }
        }
        let mut padded = vec![0f32; count * NR];
        for (j, s) in padded.iter_mut().take(n).enumerate() {
            *s = scales[if scales.len() == 1 { 0 } else { j }];
        }
        Ok(Self {
            k,
            n,
            quads,
            panels,
            col_sums,
            scales: padded,
            bias: vec![0f32; count * NR],
            gelu: false,
            quant,
        })
    }

    /// Adds `bias` (`n` values) to the columns.
    pub fn add_bias(&mut self, bias: &[f32]) {
        for (b, v) in self.bias.iter_mut().zip(bias) {
            *b += v;
        }
    }

    fn panel(&self, p: usize) -> &[i8] {
        let size = self.quads * NR * 4;
        &self.panels[p * size..(p + 1) * size]
    }
}

/// Whether this CPU runs the AVX-512 VNNI tile.
pub fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which tile computes the integer sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantTile {
    /// AVX-512 VNNI intrinsics (only where [`vnni`] holds).
    Vnni,
    /// Plain Rust, on any CPU.
    Portable,
}

/// `v` clamped to `[lo, hi]` (both within ±2²²) and rounded to the nearest integer, ties to
/// even: adding 1.5 · 2²³ rounds the sum to an integer held in its low mantissa bits. Safe code
/// that the compiler vectorises, where `round_ties_even` is a call per element and a
/// saturating float-to-integer cast is not vectorised.
#[inline(always)]
pub(crate) fn round_clamped(v: f32, lo: f32, hi: f32) -> i32 {
    const ROUND: f32 = 12_582_912.0;
    (v.clamp(lo, hi) + ROUND).to_bits() as i32 - 0x4B40_0000
}

/// `xs` quantised to uint8 into `ys`: `scaled(x)` rounded half to even, plus the zero point,
/// saturated.
#[inline(always)]
pub(crate) fn quantize_into(
    xs: &[f32],
    ys: &mut [u8],
    zero_point: u8,
    scaled: impl Fn(f32) -> f32,
) {
    let z = zero_point as f32;
    let (lo, hi) = (-z - 1.0, 256.0 - z);
    for (y, x) in ys.iter_mut().zip(xs) {
        *y = (round_clamped(scaled(*x), lo, hi) + zero_point as i32).clamp(0, 255) as u8;
    }
}

/// `(scale, zero point)` of `xs`'s range widened to hold zero, as ONNX's
/// `DynamicQuantizeLinear` defines them (and tract computes them).
pub(crate) fn dynamic_range(xs: &[f32]) -> (f32, u8) {
    #[cfg(target_arch = "x86_64")]
    if crate::dense::avx512() {
        // SAFETY: AVX-512F was just checked.
        let (min, max) = unsafe { range_avx512(xs) };
        return range_to_quant(min, max);
    }
    let (min, max) = range_portable(xs);
    range_to_quant(min, max)
}

/// The smallest and largest of `xs` and zero, on 16 lanes the compiler may vectorise.
fn range_portable(xs: &[f32]) -> (f32, f32) {
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
    (min, max)
}

/// [`range_portable`] on 16 lanes of AVX-512F: the same comparisons, so the same values (a
/// NaN is passed over both ways).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn range_avx512(xs: &[f32]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let chunks = xs.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        // SAFETY: `c` holds 16 values.
        let v = unsafe { _mm512_loadu_ps(c.as_ptr()) };
        // `min(v, lo)` is `v < lo ? v : lo`, as the portable loop.
        lo = _mm512_min_ps(v, lo);
        hi = _mm512_max_ps(v, hi);
    }
    let (mut l, mut h) = ([0f32; 16], [0f32; 16]);
    // SAFETY: each array holds 16 values.
    unsafe {
        _mm512_storeu_ps(l.as_mut_ptr(), lo);
        _mm512_storeu_ps(h.as_mut_ptr(), hi);
    }
    let min = l
        .iter()
        .chain(rest)
        .fold(0f32, |a, &v| if v < a { v } else { a });
    let max = h
        .iter()
        .chain(rest)
        .fold(0f32, |a, &v| if v > a { v } else { a });
    (min, max)
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

/// How one product's input becomes uint8: its zero point, how each value is scaled (none:
/// every value is the zero point, for an input of all zeros), and the factor of the columns'
/// scales (the input's scale, for a dynamic quantization).
#[derive(Clone, Copy)]
struct Quantizer {
    zero: u8,
    scaled: Option<Scaled>,
    factor: f32,
    /// Quantize on AVX-512 (decided once per product).
    avx512: bool,
}

impl Quantizer {
    /// The quantizer of `a` (a dynamic quantization takes the range of all of it).
    fn of(a: &[f32], quant: ActivationQuant) -> Self {
        match quant {
            ActivationQuant::Static {
                inv_scale,
                zero_point,
            } => Self {
                zero: zero_point,
                scaled: Some(Scaled::Times(inv_scale)),
                factor: 1.0,
                avx512: crate::dense::avx512(),
            },
            ActivationQuant::Dynamic => {
                let (scale, zero) = dynamic_range(a);
                Self {
                    zero,
                    // A range of zero (all zeros) leaves every value at the zero point.
                    scaled: (scale > 0.0).then_some(Scaled::Over(scale)),
                    factor: scale,
                    avx512: crate::dense::avx512(),
                }
            }
        }
    }

    /// `xs` quantized into `ys` (as long).
    fn run(self, xs: &[f32], ys: &mut [u8]) {
        let Some(scaled) = self.scaled else {
            ys.fill(self.zero);
            return;
        };
        #[cfg(target_arch = "x86_64")]
        if self.avx512 {
            // SAFETY: `of` checked AVX-512F.
            unsafe { quantize_avx512(xs, ys, self.zero, scaled) };
            return;
        }
        match scaled {
            Scaled::Times(f) => quantize_into(xs, ys, self.zero, |v| v * f),
            Scaled::Over(d) => quantize_into(xs, ys, self.zero, |v| v / d),
        }
    }
}

/// How a value is scaled before it is rounded: times the inverse of a calibrated scale (as
/// tract's `QuantizeLinear`), or divided by a dynamic one (as its `DynamicQuantizeLinear`).
#[derive(Clone, Copy)]
enum Scaled {
    Times(f32),
    Over(f32),
}

/// [`quantize_into`] on 16 lanes of AVX-512F: the same operations in the same order, so the
/// same bytes (a NaN clamps to NaN and saturates to 255 both ways).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_avx512(xs: &[f32], ys: &mut [u8], zero_point: u8, scaled: Scaled) {
    use std::arch::x86_64::*;
    const ROUND: f32 = 12_582_912.0;
    let z = zero_point as f32;
    let (lo, hi) = (_mm512_set1_ps(-z - 1.0), _mm512_set1_ps(256.0 - z));
    let (round, bias) = (_mm512_set1_ps(ROUND), _mm512_set1_epi32(0x4B40_0000));
    let (zp, top) = (_mm512_set1_epi32(zero_point as i32), _mm512_set1_epi32(255));
    let n = xs.len().min(ys.len());
    let whole = n / 16 * 16;
    let (x, y) = (xs.as_ptr(), ys.as_mut_ptr());
    for i in (0..whole).step_by(16) {
        // SAFETY: i + 16 ≤ n, within both slices.
        let v = unsafe { _mm512_loadu_ps(x.add(i)) };
        let v = match scaled {
            Scaled::Times(f) => _mm512_mul_ps(v, _mm512_set1_ps(f)),
            Scaled::Over(d) => _mm512_div_ps(v, _mm512_set1_ps(d)),
        };
        // `clamp`: a NaN stays NaN (max and min return their second operand then).
        let v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
        let q = _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(v, round)), bias);
        let q = _mm512_add_epi32(q, zp);
        let q = _mm512_min_epi32(_mm512_max_epi32(q, _mm512_setzero_si512()), top);
        // SAFETY: as the load.
        unsafe { _mm_storeu_si128(y.add(i) as *mut __m128i, _mm512_cvtepi32_epi8(q)) };
    }
    match scaled {
        Scaled::Times(f) => quantize_into(&xs[whole..n], &mut ys[whole..n], zero_point, |v| v * f),
        Scaled::Over(d) => quantize_into(&xs[whole..n], &mut ys[whole..n], zero_point, |v| v / d),
    }
}

thread_local! {
    /// The quantized and packed activations of the last product on this thread, kept for the
    /// next.
    static SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<u8>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    /// One panel's quantized rows, on the thread that packs them.
    static ROWS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Packs rows `t·MR..` of the quantized `q` (`m × k` at strides `s`) into `panel`
/// (`[k / 4][MR][4]`); values past `k` are zero, rows past `m` keep what they held.
fn pack_panel(q: &[u8], m: usize, k: usize, s: Strides, t: usize, panel: &mut [u8]) {
    let rows = (m - t * MR).min(MR);
    let at = |kk: usize, r: usize| ((kk / 4) * MR + r) * 4 + kk % 4;
    if s.col == 1 {
        let quads = k.div_ceil(4);
        for r in 0..rows {
            let row = &q[(t * MR + r) * s.row..][..k];
            let whole = row.chunks_exact(4);
            let rest = whole.remainder();
            // Four bytes at a time, a panel's row of groups at `MR · 4` bytes apart.
            for (four, dst) in whole.zip(panel[r * 4..].chunks_mut(MR * 4)) {
                dst[..4].copy_from_slice(four);
            }
            if !rest.is_empty() {
                let dst = &mut panel[((quads - 1) * MR + r) * 4..][..4];
                dst.fill(0);
                dst[..rest.len()].copy_from_slice(rest);
            }
        }
    } else {
        for kk in 0..k {
            let base = t * MR * s.row + kk * s.col;
            for r in 0..rows {
                panel[at(kk, r)] = q[base + r * s.row];
            }
        }
        for kk in k..k.div_ceil(4) * 4 {
            for r in 0..rows {
                panel[at(kk, r)] = 0;
            }
        }
    }
}

/// `c = (quantized a) · w`, scaled per column, plus the bias, then GELU if `w.gelu`: `a` is
/// `m × w.k` laid out as `a_strides` says (a dynamic quantization takes the range of all of
/// `a`), `c` is `m × w.n` laid out as `c_strides` says. Every element of `c` is written. Fails
/// (instead of reading or writing out of bounds) when a slice is too short for its shape and
/// strides.
pub fn quant_product(
    a: &[f32],
    m: usize,
    a_strides: Strides,
    w: &PackedI8,
    c: &mut [f32],
    c_strides: Strides,
    tile: QuantTile,
) -> anyhow::Result<()> {
    let pool = current_pool();
    let pool = pool.as_deref();
    let (k, n) = (w.k, w.n);
    let extents = (m, k, n);
    if !check_extents(
        "int8 product",
        (a.len(), a_strides),
        (c.len(), c_strides),
        extents,
    )? {
        return Ok(());
    }
    anyhow::ensure!(
        tile == QuantTile::Portable || vnni(),
        "int8 product: this CPU has no AVX-512 VNNI"
    );
    let erf = gelu_erf(w.gelu)?;
    let quantizer = Quantizer::of(a, w.quant);
    let size = w.quads * MR * 4;
    let len = m.div_ceil(MR) * size;
    SCRATCH.with_borrow_mut(|(quantized, packed)| -> anyhow::Result<()> {
        if packed.len() < len {
            packed.resize(len, 0);
        }
        let packed = &mut packed[..len];
        if a_strides.col == 1 {
            // Rows contiguous: each panel quantizes its own rows, then packs them.
            let one = |(t, panel): (usize, &mut [u8])| {
                ROWS.with_borrow_mut(|rows| {
                    let count = (m - t * MR).min(MR);
                    if rows.len() < count * k {
                        rows.resize(count * k, 0);
                    }
                    for r in 0..count {
                        let x = &a[(t * MR + r) * a_strides.row..][..k];
                        quantizer.run(x, &mut rows[r * k..(r + 1) * k]);
                    }
                    let s = Strides { row: k, col: 1 };
                    pack_panel(&rows[..count * k], count, k, s, 0, panel);
                })
            };
            for_each_panel(packed, size, pool, one);
        } else {
            if quantized.len() < a.len() {
                quantized.resize(a.len(), 0);
            }
            quantizer.run(a, &mut quantized[..a.len()]);
            let q = &quantized[..a.len()];
            let one = |(t, p): (usize, &mut [u8])| pack_panel(q, m, k, a_strides, t, p);
            for_each_panel(packed, size, pool, one);
        }
        let packed = &*packed;
        let out = Out(c.as_mut_ptr());
        let panels = n.div_ceil(NR);
        let (zero, factor) = (quantizer.zero, quantizer.factor);
        let run = |p: usize| -> anyhow::Result<()> {
            let cols = (n - p * NR).min(NR);
            let wp = w.panel(p);
            let mut scale = [0f32; NR];
            let mut offset = [0i32; NR];
            for j in 0..NR {
                // As tract's graph: the weights' scale times the input's, then the sum times it.
                scale[j] = w.scales[p * NR + j] * factor;
                offset[j] = zero as i32 * w.col_sums[p * NR + j];
            }
            let bias: &[f32; NR] = w.bias[p * NR..(p + 1) * NR].try_into().expect("NR values");
            let scaling = Scaling {
                offset: &offset,
                scale: &scale,
                bias,
            };
            // Every value of both is written by each tile before it is read.
            let mut sums = [[0i32; NR]; MR];
            let mut acc = [[0f32; NR]; MR];
            for (t, ap) in packed.chunks_exact(size).enumerate() {
                let rows = (m - t * MR).min(MR);
                match tile {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: VNNI was checked above; the panels hold quads·MR·4 and
                    // quads·NR·4 values.
                    QuantTile::Vnni => unsafe { vnni_tile(ap, wp, w.quads, &scaling, &mut acc) },
                    _ => {
                        portable_tile(ap, wp, w.quads, &mut sums);
                        scaling.apply(&sums, &mut acc);
                    }
                }
                if let Some(erf) = &erf {
                    crate::dense::gelu(acc.as_flattened_mut(), &**erf)?;
                }
                // SAFETY: rows t·MR.. of m and columns p·NR.. of n lie within `c`, as checked;
                // no other thread writes this panel's columns.
                unsafe { store_tile(out, &acc, (t, p), (rows, cols), c_strides) };
            }
            Ok(())
        };
        match pool {
            Some(pool) if panels > 1 => {
                pool.install(|| (0..panels).into_par_iter().try_for_each(run))
            }
            _ => (0..panels).try_for_each(run),
        }
    })?;
    Ok(())
}

/// How one panel's integer sums become float32: `(sum − offset[j]) as f32 · scale[j] + bias[j]`.
struct Scaling<'a> {
    offset: &'a [i32; NR],
    scale: &'a [f32; NR],
    bias: &'a [f32; NR],
}

impl Scaling<'_> {
    fn apply(&self, sums: &[[i32; NR]; MR], acc: &mut [[f32; NR]; MR]) {
        for (row, s) in acc.iter_mut().zip(sums) {
            for j in 0..NR {
                row[j] = (s[j] - self.offset[j]) as f32 * self.scale[j] + self.bias[j];
            }
        }
    }
}

/// [`quant_product`] as a new tensor of `shape`, which holds the product's `m × w.n` values at
/// `c_strides` and nothing else.
pub fn quant_product_tensor(
    a: &[f32],
    m: usize,
    a_strides: Strides,
    w: &PackedI8,
    shape: &[usize],
    c_strides: Strides,
    tile: QuantTile,
) -> anyhow::Result<tract_onnx::prelude::Tensor> {
    // SAFETY: `quant_product` writes every one of the m·n values (it checks the strides
    // first and fails before writing anything).
    unsafe {
        output_tensor("int8 product", shape, m * w.n, |c| {
            quant_product(a, m, a_strides, w, c, c_strides, tile)
        })
    }
}

/// One tile of integer sums: `sums[r][j] = Σ_kk a[kk][r] · w[kk][j]`.
fn portable_tile(a: &[u8], w: &[i8], quads: usize, sums: &mut [[i32; NR]; MR]) {
    *sums = [[0; NR]; MR];
    for (av, wv) in a
        .chunks_exact(MR * 4)
        .zip(w.chunks_exact(NR * 4))
        .take(quads)
    {
        for (row, x) in sums.iter_mut().zip(av.chunks_exact(4)) {
            for (o, y) in row.iter_mut().zip(wv.chunks_exact(4)) {
                // Wrapping, as the VNNI instruction does (no sum of a real layer comes near).
                let four = (0..4).fold(0i32, |s, i| s.wrapping_add(x[i] as i32 * y[i] as i32));
                *o = o.wrapping_add(four);
            }
        }
    }
}

/// The same tile with AVX-512 VNNI: `MR × 2` accumulators of 16 lanes, each instruction adding
/// four products per lane; the sums leave scaled as [`Scaling::apply`] scales them (the same
/// operations, unfused, so the same values).
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512 VNNI; `a` must hold `quads · MR · 4` values and `w`
/// `quads · NR · 4`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn vnni_tile(
    a: &[u8],
    w: &[i8],
    quads: usize,
    scaling: &Scaling,
    acc: &mut [[f32; NR]; MR],
) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= quads * MR * 4 && w.len() >= quads * NR * 4);
    let (ap, wp) = (a.as_ptr(), w.as_ptr());
    let mut lo = [_mm512_setzero_si512(); MR];
    let mut hi = [_mm512_setzero_si512(); MR];
    for g in 0..quads {
        let w0 = _mm512_loadu_si512(wp.add(g * NR * 4) as *const __m512i);
        let w1 = _mm512_loadu_si512(wp.add(g * NR * 4 + 64) as *const __m512i);
        let ar = ap.add(g * MR * 4);
        for r in 0..MR {
            let x = _mm512_set1_epi32((ar.add(r * 4) as *const i32).read_unaligned());
            lo[r] = _mm512_dpbusd_epi32(lo[r], x, w0);
            hi[r] = _mm512_dpbusd_epi32(hi[r], x, w1);
        }
    }
    let at = |v: &[i32; NR], h: usize| _mm512_loadu_si512(v.as_ptr().add(h) as *const __m512i);
    let atf = |v: &[f32; NR], h: usize| _mm512_loadu_ps(v.as_ptr().add(h));
    let (o0, o1) = (at(scaling.offset, 0), at(scaling.offset, 16));
    let (s0, s1) = (atf(scaling.scale, 0), atf(scaling.scale, 16));
    let (b0, b1) = (atf(scaling.bias, 0), atf(scaling.bias, 16));
    for r in 0..MR {
        let f0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(lo[r], o0));
        let f1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(hi[r], o1));
        let y0 = _mm512_add_ps(_mm512_mul_ps(f0, s0), b0);
        let y1 = _mm512_add_ps(_mm512_mul_ps(f1, s1), b1);
        _mm512_storeu_ps(acc[r].as_mut_ptr(), y0);
        _mm512_storeu_ps(acc[r].as_mut_ptr().add(16), y1);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32
                    / 1000.0
                    - 1.0
            })
            .collect()
    }

    /// ONNX's uint8 quantization, written out: `(x / scale)` or `x · inv`, rounded half to
    /// even, plus the zero point, saturated.
    fn onnx_u8(v: f32, zero: u8) -> u8 {
        (v.round_ties_even() + zero as f32).clamp(0.0, 255.0) as u8
    }

    /// The product as ONNX's operators define it, step by step: the activations quantized, the
    /// integer product less the zero point's share, cast, times the weights' scale (times the
    /// input's), plus the bias.
    fn direct(
        a: &[f32],
        (m, k, n): (usize, usize, usize),
        w: &[i8],
        scales: &[f32],
        bias: &[f32],
        quant: ActivationQuant,
    ) -> Vec<f32> {
        let (q, zero, factor): (Vec<u8>, u8, f32) = match quant {
            ActivationQuant::Static {
                inv_scale,
                zero_point,
            } => (
                a.iter()
                    .map(|x| onnx_u8(x * inv_scale, zero_point))
                    .collect(),
                zero_point,
                1.0,
            ),
            ActivationQuant::Dynamic => {
                let lo = a.iter().fold(0f32, |l, &x| l.min(x));
                let hi = a.iter().fold(0f32, |h, &x| h.max(x));
                let scale = (hi - lo) / 255.0;
                if scale == 0.0 {
                    (vec![0; a.len()], 0, 0.0)
                } else {
                    let zero = (-lo / scale).round_ties_even().clamp(0.0, 255.0) as u8;
                    let q = a.iter().map(|x| onnx_u8(x / scale, zero)).collect();
                    (q, zero, scale)
                }
            }
        };
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let sum: i64 = (0..k)
                    .map(|kk| (q[i * k + kk] as i64 - zero as i64) * w[kk * n + j] as i64)
                    .sum();
                c[i * n + j] = sum as i32 as f32 * (scales[j] * factor) + bias[j];
            }
        }
        c
    }

    /// Checks `tile` on sizes around the panels' edges (and `k` not a multiple of four), both
    /// quantizations, both layouts of the input and of the output, against [`direct`]: the
    /// same numbers, bit for bit.
    fn check_against_onnx(tile: QuantTile) {
        let statics = ActivationQuant::Static {
            inv_scale: 97.5,
            zero_point: 131,
        };
        for quant in [ActivationQuant::Dynamic, statics] {
            for &(m, k, n) in &[
                (1, 1, 1),
                (5, 7, 3),
                (12, 16, 32),
                (13, 33, 65),
                (197, 24, 40),
            ] {
                // Past the calibrated range on both sides, so that the static one saturates.
                let a: Vec<f32> = values(m * k, 1).iter().map(|v| v * 1.7 + 0.2).collect();
                let wv: Vec<i8> = values(k * n, 2).iter().map(|v| (v * 127.0) as i8).collect();
                let scales: Vec<f32> = values(n, 3).iter().map(|v| 0.01 + v.abs() * 0.02).collect();
                let bias = values(n, 4);
                let mut w = PackedI8::new(k, n, |kk, j| wv[kk * n + j], &scales, quant).unwrap();
                w.add_bias(&bias);
                let want = direct(&a, (m, k, n), &wv, &scales, &bias, quant);
                let token_major = (Strides { row: k, col: 1 }, a.clone());
                let feature_major = (
                    Strides { row: 1, col: m },
                    (0..k * m)
                        .map(|x| a[(x % m) * k + x / m])
                        .collect::<Vec<f32>>(),
                );
                for (a_strides, laid) in [token_major, feature_major] {
                    for c_strides in [Strides { row: n, col: 1 }, Strides { row: 1, col: m }] {
                        let mut c = vec![f32::NAN; m * n];
                        quant_product(&laid, m, a_strides, &w, &mut c, c_strides, tile).unwrap();
                        for i in 0..m {
                            for j in 0..n {
                                let got = c[i * c_strides.row + j * c_strides.col];
                                assert_eq!(
                                    got.to_bits(),
                                    want[i * n + j].to_bits(),
                                    "{tile:?} {quant:?} {m}×{k}×{n}, a {a_strides:?}, \
                                     c {c_strides:?}, ({i}, {j}): {got} against {}",
                                    want[i * n + j]
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_portable_tile_gives_onnxs_numbers_in_every_layout() {
        check_against_onnx(QuantTile::Portable);
    }

    #[test]
    #[cfg_attr(not(host_vnni), ignore = "needs a CPU with AVX-512 VNNI")]
    fn the_vnni_tile_gives_onnxs_numbers_and_the_portable_tiles() {
        check_against_onnx(QuantTile::Vnni);
        let (m, k, n) = (29, 301, 70);
        let a = values(m * k, 4);
        let wv: Vec<i8> = values(k * n, 5).iter().map(|v| (v * 128.0) as i8).collect();
        let w = PackedI8::new(
            k,
            n,
            |kk, j| wv[kk * n + j],
            &[0.5],
            ActivationQuant::Dynamic,
        )
        .unwrap();
        let s = Strides { row: k, col: 1 };
        let cs = Strides { row: n, col: 1 };
        let mut x = vec![0f32; m * n];
        let mut y = vec![0f32; m * n];
        quant_product(&a, m, s, &w, &mut x, cs, QuantTile::Vnni).unwrap();
        quant_product(&a, m, s, &w, &mut y, cs, QuantTile::Portable).unwrap();
        assert_eq!(x, y);
        assert!(x.iter().any(|v| v.abs() > 1.0), "outputs near zero");
    }

    /// Values around every edge of the quantizers: ties, the clamps, zeros of both signs,
    /// infinities and NaN.
    fn awkward_values() -> Vec<f32> {
        let mut v = values(1000, 9);
        v.iter_mut().for_each(|x| *x *= 300.0);
        for i in -600..600 {
            v.push(i as f32 * 0.5);
        }
        v.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e30,
            -1e30,
        ]);
        v.extend([f32::MIN_POSITIVE, 127.5, 128.5, -128.5, 255.5, 256.0, -1.0]);
        v
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    #[cfg_attr(not(host_avx512), ignore = "needs a CPU with AVX-512F")]
    fn the_avx512_quantizers_give_the_portable_bytes_and_ranges() {
        let v = awkward_values();
        for len in [0, 1, 15, 16, 17, 100, v.len()] {
            let xs = &v[v.len() - len..];
            for zero in [0u8, 1, 77, 128, 255] {
                for scaled in [
                    Scaled::Times(1.0),
                    Scaled::Times(0.37),
                    Scaled::Over(0.5),
                    Scaled::Over(3.1),
                ] {
                    let mut want = vec![0u8; len];
                    match scaled {
                        Scaled::Times(f) => quantize_into(xs, &mut want, zero, |x| x * f),
                        Scaled::Over(d) => quantize_into(xs, &mut want, zero, |x| x / d),
                    }
                    let mut got = vec![0u8; len];
                    unsafe { quantize_avx512(xs, &mut got, zero, scaled) };
                    assert_eq!(got, want, "{len} values, zero point {zero}");
                }
            }
            let finite: Vec<f32> = xs.iter().copied().filter(|x| x.is_finite()).collect();
            for xs in [xs, &finite[..]] {
                let (a, b) = unsafe { range_avx512(xs) };
                let (c, d) = range_portable(xs);
                assert_eq!((a.to_bits(), b.to_bits()), (c.to_bits(), d.to_bits()));
            }
        }
        let (lo, hi) = range_portable(&[3.0, -2.0, 7.5, 0.5]);
        assert_eq!((lo, hi), (-2.0, 7.5));
    }

    #[test]
    fn a_dynamic_input_of_zeros_gives_the_bias() {
        let (m, k, n) = (3, 8, 5);
        let mut w = PackedI8::new(
            k,
            n,
            |kk, j| (kk + j) as i8,
            &[0.1],
            ActivationQuant::Dynamic,
        )
        .unwrap();
        w.add_bias(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        let mut c = vec![f32::NAN; m * n];
        let (s, cs) = (Strides { row: k, col: 1 }, Strides { row: n, col: 1 });
        quant_product(&[0.0; 24], m, s, &w, &mut c, cs, QuantTile::Portable).unwrap();
        assert_eq!(&c[10..], &[1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn short_slices_and_wrong_scales_are_refused() {
        let q = ActivationQuant::Dynamic;
        let err = PackedI8::new(4, 3, |_, _| 1, &[1.0, 2.0], q).unwrap_err();
        assert!(err.to_string().contains("2 column scales for 3"), "{err}");
        let w = PackedI8::new(4, 3, |_, _| 1, &[1.0], q).unwrap();
        let (s, cs) = (Strides { row: 4, col: 1 }, Strides { row: 3, col: 1 });
        let mut c = vec![0f32; 6];
        let t = QuantTile::Portable;
        let err = quant_product(&[1.0; 7], 2, s, &w, &mut c, cs, t).unwrap_err();
        assert!(err.to_string().contains("input of 7 values"), "{err}");
        let err = quant_product(&[1.0; 8], 2, s, &w, &mut c[..5], cs, t).unwrap_err();
        assert!(err.to_string().contains("output of 5 values"), "{err}");
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
}
