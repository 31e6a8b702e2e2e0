//! AVX-512F: the float32 tile (`MR × 2` accumulators of 16 lanes), the column softmax's max and
//! sums for attention, and the range and rounding of the uint8 quantizer. Each gives the same
//! values as its portable form (the same operations in the same order).
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use crate::kernels::shape::{Acc, Body, MR, NR};

/// Proof that this CPU has AVX-512F: only [`Avx512::detect`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Avx512(());

impl Avx512 {
    /// The token, where this CPU has AVX-512F.
    pub fn detect() -> Option<Self> {
        std::arch::is_x86_feature_detected!("avx512f").then_some(Self(()))
    }

    /// `acc[r][j] = bias[j] + Σ_kk a[kk][r] · w[kk][j]`, in order of kk: `a` holds `k · MR`
    /// values, `w` `k · NR`.
    pub fn f32_tile(self, a: &[f32], w: &[f32], k: usize, bias: &[f32; NR], acc: &mut Acc) {
        assert!(a.len() >= k * MR && w.len() >= k * NR, "tile: short panels");
        // SAFETY: the token proves AVX-512F; the panels' lengths were just checked.
        unsafe { f32_tile(a, w, k, bias, acc) }
    }

    /// Runs `body` compiled for AVX-512F: the compiler vectorises its loops on these registers,
    /// with the same operations (so the same values) as on any other CPU.
    pub fn run<B: Body>(self, body: B) -> B::Out {
        // SAFETY: the token proves AVX-512F.
        unsafe { run(body) }
    }

    /// Each value of `scores` (`rows × NR`) less its column's largest.
    pub fn subtract_column_max(self, scores: &mut [f32]) {
        // SAFETY: the token proves AVX-512F.
        unsafe { subtract_column_max(scores) }
    }

    /// The sums of the columns of `scores` (`rows × NR`).
    pub fn column_sums(self, scores: &[f32]) -> [f32; NR] {
        // SAFETY: the token proves AVX-512F.
        unsafe { column_sums(scores) }
    }

    /// The smallest and the largest of each of 16 lanes of `xs`'s leading multiple of 16 and
    /// zero, as `quantize::range_portable`'s lanes hold them (a NaN is passed over both ways).
    pub fn range_lanes(self, xs: &[f32]) -> ([f32; 16], [f32; 16]) {
        // SAFETY: the token proves AVX-512F.
        unsafe { range(xs) }
    }

    /// Quantizes the leading multiple of 16 of `xs` into `ys` (as long) as
    /// `quantize::quantize_into` does, each value times `factor` (or divided by it, `divide`),
    /// rounded half to even, plus `zero_point`, saturated (a NaN clamps to NaN and saturates to
    /// 255 both ways); returns how many values it did.
    pub fn quantize(
        self,
        xs: &[f32],
        ys: &mut [u8],
        zero_point: u8,
        (factor, divide): (f32, bool),
    ) -> usize {
        // SAFETY: the token proves AVX-512F.
        unsafe { quantize(xs, ys, zero_point, factor, divide) }
    }
}

/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn run<B: Body>(body: B) -> B::Out {
    body.run()
}

/// # Safety
/// The CPU must have AVX-512F; `a` must hold `k · MR` values and `w` `k · NR`.
#[target_feature(enable = "avx512f")]
unsafe fn f32_tile(a: &[f32], w: &[f32], k: usize, bias: &[f32; NR], acc: &mut Acc) {
    debug_assert!(a.len() >= k * MR && w.len() >= k * NR);
    let (ap, wp) = (a.as_ptr(), w.as_ptr());
    // SAFETY (every load below): within `bias`, `a` and `w`, as the caller guarantees.
    let b0 = unsafe { _mm512_loadu_ps(bias.as_ptr()) };
    let b1 = unsafe { _mm512_loadu_ps(bias.as_ptr().add(16)) };
    let mut lo = [b0; MR];
    let mut hi = [b1; MR];
    for kk in 0..k {
        let w0 = unsafe { _mm512_loadu_ps(wp.add(kk * NR)) };
        let w1 = unsafe { _mm512_loadu_ps(wp.add(kk * NR + 16)) };
        let ar = unsafe { ap.add(kk * MR) };
        for r in 0..MR {
            let x = _mm512_set1_ps(unsafe { *ar.add(r) });
            lo[r] = _mm512_fmadd_ps(x, w0, lo[r]);
            hi[r] = _mm512_fmadd_ps(x, w1, hi[r]);
        }
    }
    for r in 0..MR {
        // SAFETY: each row of `acc` holds NR = 32 values.
        unsafe {
            _mm512_storeu_ps(acc[r].as_mut_ptr(), lo[r]);
            _mm512_storeu_ps(acc[r].as_mut_ptr().add(16), hi[r]);
        }
    }
}

/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn subtract_column_max(scores: &mut [f32]) {
    let (mut m0, mut m1) = (
        _mm512_set1_ps(f32::NEG_INFINITY),
        _mm512_set1_ps(f32::NEG_INFINITY),
    );
    for s in scores.chunks_exact(NR) {
        // SAFETY: each chunk holds NR = 32 values.
        unsafe {
            m0 = _mm512_max_ps(_mm512_loadu_ps(s.as_ptr()), m0);
            m1 = _mm512_max_ps(_mm512_loadu_ps(s.as_ptr().add(16)), m1);
        }
    }
    for s in scores.chunks_exact_mut(NR) {
        let p = s.as_mut_ptr();
        // SAFETY: as above.
        unsafe {
            _mm512_storeu_ps(p, _mm512_sub_ps(_mm512_loadu_ps(p), m0));
            _mm512_storeu_ps(p.add(16), _mm512_sub_ps(_mm512_loadu_ps(p.add(16)), m1));
        }
    }
}

/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn column_sums(scores: &[f32]) -> [f32; NR] {
    let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for s in scores.chunks_exact(NR) {
        // SAFETY: each chunk holds NR = 32 values.
        unsafe {
            s0 = _mm512_add_ps(_mm512_loadu_ps(s.as_ptr()), s0);
            s1 = _mm512_add_ps(_mm512_loadu_ps(s.as_ptr().add(16)), s1);
        }
    }
    let mut sum = [0f32; NR];
    // SAFETY: `sum` holds NR = 32 values.
    unsafe {
        _mm512_storeu_ps(sum.as_mut_ptr(), s0);
        _mm512_storeu_ps(sum.as_mut_ptr().add(16), s1);
    }
    sum
}

/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn range(xs: &[f32]) -> ([f32; 16], [f32; 16]) {
    let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for c in xs.chunks_exact(16) {
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
    (l, h)
}

/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn quantize(xs: &[f32], ys: &mut [u8], zero_point: u8, factor: f32, divide: bool) -> usize {
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
        let v = if divide {
            _mm512_div_ps(v, _mm512_set1_ps(factor))
        } else {
            _mm512_mul_ps(v, _mm512_set1_ps(factor))
        };
        // `clamp`: a NaN stays NaN (max and min return their second operand then).
        let v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
        let q = _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(v, round)), bias);
        let q = _mm512_add_epi32(q, zp);
        let q = _mm512_min_epi32(_mm512_max_epi32(q, _mm512_setzero_si512()), top);
        // SAFETY: as the load.
        unsafe { _mm_storeu_si128(y.add(i) as *mut __m128i, _mm512_cvtepi32_epi8(q)) };
    }
    whole
}
