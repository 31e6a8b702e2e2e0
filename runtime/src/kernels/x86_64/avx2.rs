//! AVX2 with FMA (256-bit vectors, 16 registers): the float32 tile, the int8 tile on 16-bit
//! pairs, and the vectorised bodies of the other kernels compiled for AVX2.
//!
//! An `MR × NR` tile (12 × 32) needs 48 of these registers, so each tile runs as four blocks of
//! 6 rows × 16 columns: 12 accumulators, two weight vectors and one broadcast value, the shape of
//! the classic AVX2 kernels. Each block's sums run in the portable tile's order, so the values
//! are the same.
//!
//! **Int8 without saturation.** `vpmaddubsw` multiplies uint8 by int8 and adds each pair of
//! products into a *saturating* 16-bit lane: a pair of 255 · 127 already overflows it
//! (64,770 > 32,767), and real layers have such pairs, so its sums would differ from tract's and
//! ONNX Runtime's exact ones. This tile does not use it. The weights are widened to int16 once,
//! at load, the activations when they are packed, and `vpmaddwd` multiplies pairs of int16 and
//! adds each pair of products into a 32-bit lane, where no pair can overflow
//! (2 · 255 · 128 < 2³¹): the sums are exact, as on the VNNI tiles. The weights take twice the
//! memory of int8 (the same as float16) on this path only.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use crate::kernels::shape::{Acc, Body, MR, NR};

/// Proof that this CPU has AVX2 and FMA: only [`Avx2::detect`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Avx2(());

/// Rows of one block of a tile.
const ROWS: usize = 6;
/// Columns of one block (two vectors of eight).
const COLS: usize = 16;
const _: () = assert!(MR == 2 * ROWS && NR == 2 * COLS);

/// A panel's `(offset, scale, bias)` per column.
pub type Scaling<'a> = (&'a [i32; NR], &'a [f32; NR], &'a [f32; NR]);

impl Avx2 {
    /// The token, where this CPU has AVX2 and FMA.
    pub fn detect() -> Option<Self> {
        (std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
            .then_some(Self(()))
    }

    /// `acc[r][j] = bias[j] + Σ_kk a[kk][r] · w[kk][j]`, in order of kk: `a` holds `k · MR`
    /// values, `w` `k · NR`.
    pub fn f32_tile(self, a: &[f32], w: &[f32], k: usize, bias: &[f32; NR], acc: &mut Acc) {
        assert!(a.len() >= k * MR && w.len() >= k * NR, "tile: short panels");
        // SAFETY: the token proves AVX2 and FMA; the panels' lengths were just checked.
        unsafe { f32_tile(a, w, k, bias, acc) }
    }

    /// One tile of integer sums of `a` (`pairs · MR · 2` values) by `w` (`pairs · NR · 2`),
    /// both int16 in pairs of consecutive rows of the product, leaving `acc` scaled as `i8.rs`'s
    /// `Scaling::apply` scales them.
    pub fn i16_tile(self, a: &[i16], w: &[i16], pairs: usize, scaling: Scaling, acc: &mut Acc) {
        assert!(
            a.len() >= pairs * MR * 2 && w.len() >= pairs * NR * 2,
            "int16 tile: short panels"
        );
        // SAFETY: the token proves AVX2; the panels' lengths were just checked.
        unsafe { i16_tile(a, w, pairs, scaling, acc) }
    }

    /// Runs `body` compiled for AVX2 and FMA: the compiler vectorises its loops on 256-bit
    /// registers, with the same operations (so the same values) as on any other CPU.
    pub fn run<B: Body>(self, body: B) -> B::Out {
        // SAFETY: the token proves AVX2 and FMA.
        unsafe { run(body) }
    }
}

/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn run<B: Body>(body: B) -> B::Out {
    body.run()
}

/// # Safety
/// The CPU must have AVX2 and FMA; `a` must hold `k · MR` values and `w` `k · NR`.
#[target_feature(enable = "avx2,fma")]
unsafe fn f32_tile(a: &[f32], w: &[f32], k: usize, bias: &[f32; NR], acc: &mut Acc) {
    debug_assert!(a.len() >= k * MR && w.len() >= k * NR);
    for c0 in [0, COLS] {
        for r0 in [0, ROWS] {
            // SAFETY: as this function's.
            unsafe { f32_block(a.as_ptr(), w.as_ptr(), k, bias, (r0, c0), acc) }
        }
    }
}

/// Rows `r0..r0 + 6`, columns `c0..c0 + 16` of [`f32_tile`].
///
/// # Safety
/// As [`f32_tile`]'s, with `r0 + 6 ≤ MR` and `c0 + 16 ≤ NR`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn f32_block(
    ap: *const f32,
    wp: *const f32,
    k: usize,
    bias: &[f32; NR],
    (r0, c0): (usize, usize),
    acc: &mut Acc,
) {
    // SAFETY (every load below): within `bias`, `a` and `w`, as the caller guarantees.
    let b0 = unsafe { _mm256_loadu_ps(bias.as_ptr().add(c0)) };
    let b1 = unsafe { _mm256_loadu_ps(bias.as_ptr().add(c0 + 8)) };
    let mut lo = [b0; ROWS];
    let mut hi = [b1; ROWS];
    for kk in 0..k {
        let w0 = unsafe { _mm256_loadu_ps(wp.add(kk * NR + c0)) };
        let w1 = unsafe { _mm256_loadu_ps(wp.add(kk * NR + c0 + 8)) };
        let ar = unsafe { ap.add(kk * MR + r0) };
        for r in 0..ROWS {
            let x = _mm256_set1_ps(unsafe { *ar.add(r) });
            lo[r] = _mm256_fmadd_ps(x, w0, lo[r]);
            hi[r] = _mm256_fmadd_ps(x, w1, hi[r]);
        }
    }
    for r in 0..ROWS {
        let row = acc[r0 + r].as_mut_ptr();
        // SAFETY: each row of `acc` holds NR = 32 values, and c0 + 16 ≤ NR.
        unsafe {
            _mm256_storeu_ps(row.add(c0), lo[r]);
            _mm256_storeu_ps(row.add(c0 + 8), hi[r]);
        }
    }
}

/// # Safety
/// The CPU must have AVX2; `a` must hold `pairs · MR · 2` values and `w` `pairs · NR · 2`.
#[target_feature(enable = "avx2")]
unsafe fn i16_tile(a: &[i16], w: &[i16], pairs: usize, scaling: Scaling, acc: &mut Acc) {
    for c0 in [0, COLS] {
        for r0 in [0, ROWS] {
            // SAFETY: as this function's.
            unsafe { i16_block(a.as_ptr(), w.as_ptr(), pairs, scaling, (r0, c0), acc) }
        }
    }
}

/// Rows `r0..r0 + 6`, columns `c0..c0 + 16` of [`i16_tile`].
///
/// # Safety
/// As [`i16_tile`]'s, with `r0 + 6 ≤ MR` and `c0 + 16 ≤ NR`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn i16_block(
    ap: *const i16,
    wp: *const i16,
    pairs: usize,
    scaling: Scaling,
    (r0, c0): (usize, usize),
    acc: &mut Acc,
) {
    let mut lo = [_mm256_setzero_si256(); ROWS];
    let mut hi = [_mm256_setzero_si256(); ROWS];
    for p in 0..pairs {
        // SAFETY (every load here): within `a` and `w`, as the caller guarantees.
        let w0 = unsafe { _mm256_loadu_si256(wp.add((p * NR + c0) * 2) as *const __m256i) };
        let w1 = unsafe { _mm256_loadu_si256(wp.add((p * NR + c0 + 8) * 2) as *const __m256i) };
        let ar = unsafe { ap.add((p * MR + r0) * 2) };
        for r in 0..ROWS {
            let x = _mm256_set1_epi32(unsafe { (ar.add(r * 2) as *const i32).read_unaligned() });
            lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(x, w0));
            hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(x, w1));
        }
    }
    // SAFETY: as this function's.
    unsafe { store_scaled(&lo, &hi, scaling, (r0, c0), acc) }
}

/// Scales the integer sums of a block into `acc`, as `i8.rs`'s `Scaling::apply` does:
/// `(sum − offset[j]) as f32 · scale[j] + bias[j]` (the same operations, unfused).
///
/// # Safety
/// The CPU must have AVX2; `r0 + 6 ≤ MR` and `c0 + 16 ≤ NR`.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn store_scaled(
    lo: &[__m256i; ROWS],
    hi: &[__m256i; ROWS],
    (offset, scale, bias): Scaling,
    (r0, c0): (usize, usize),
    acc: &mut Acc,
) {
    debug_assert!(r0 + ROWS <= MR && c0 + COLS <= NR);
    // SAFETY (the loads and stores below): each array holds NR = 32 values, c0 + 16 ≤ NR.
    let at = |v: &[i32; NR], h: usize| unsafe {
        _mm256_loadu_si256(v.as_ptr().add(c0 + h) as *const __m256i)
    };
    let atf = |v: &[f32; NR], h: usize| unsafe { _mm256_loadu_ps(v.as_ptr().add(c0 + h)) };
    let (o0, o1) = (at(offset, 0), at(offset, 8));
    let (s0, s1) = (atf(scale, 0), atf(scale, 8));
    let (b0, b1) = (atf(bias, 0), atf(bias, 8));
    for r in 0..ROWS {
        let f0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(lo[r], o0));
        let f1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(hi[r], o1));
        let y0 = _mm256_add_ps(_mm256_mul_ps(f0, s0), b0);
        let y1 = _mm256_add_ps(_mm256_mul_ps(f1, s1), b1);
        let row = acc[r0 + r].as_mut_ptr();
        unsafe {
            _mm256_storeu_ps(row.add(c0), y0);
            _mm256_storeu_ps(row.add(c0 + 8), y1);
        }
    }
}
