//! AVX-VNNI (the 256-bit VNNI of Intel's Core 12th generation and later, and of AMD's Zen 5):
//! the int8 tile on the same packed panels as the AVX-512 VNNI one, each `vpdpbusd` adding four
//! products of a uint8 activation and an int8 weight per 32-bit lane, exactly (it wraps, never
//! saturates). The tile runs as four blocks of 6 rows × 16 columns, as the AVX2 tiles do.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use crate::kernels::shape::{Acc, MR, NR};
use crate::kernels::x86_64::avx2::{store_scaled, Scaling};

/// Proof that this CPU has AVX2 and AVX-VNNI: only [`AvxVnni::detect`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AvxVnni(());

const ROWS: usize = 6;
const COLS: usize = 16;

impl AvxVnni {
    /// The token, where this CPU has AVX2 and AVX-VNNI.
    pub fn detect() -> Option<Self> {
        (std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("avxvnni"))
        .then_some(Self(()))
    }

    /// One tile of integer sums of `a` (`quads · MR · 4` values) by `w` (`quads · NR · 4`),
    /// leaving `acc` scaled as `i8.rs`'s `Scaling::apply` scales them.
    pub fn tile(self, a: &[u8], w: &[i8], quads: usize, scaling: Scaling, acc: &mut Acc) {
        assert!(
            a.len() >= quads * MR * 4 && w.len() >= quads * NR * 4,
            "int8 tile: short panels"
        );
        // SAFETY: the token proves the instructions; the panels' lengths were just checked.
        unsafe { tile(a, w, quads, scaling, acc) }
    }
}

/// # Safety
/// The CPU must have AVX2 and AVX-VNNI; `a` must hold `quads · MR · 4` values and `w`
/// `quads · NR · 4`.
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn tile(a: &[u8], w: &[i8], quads: usize, scaling: Scaling, acc: &mut Acc) {
    for c0 in [0, COLS] {
        for r0 in [0, ROWS] {
            // SAFETY: as this function's.
            unsafe { block(a.as_ptr(), w.as_ptr(), quads, scaling, (r0, c0), acc) }
        }
    }
}

/// Rows `r0..r0 + 6`, columns `c0..c0 + 16` of [`tile`].
///
/// # Safety
/// As [`tile`]'s, with `r0 + 6 ≤ MR` and `c0 + 16 ≤ NR`.
#[target_feature(enable = "avx2,avxvnni")]
#[inline]
unsafe fn block(
    ap: *const u8,
    wp: *const i8,
    quads: usize,
    scaling: Scaling,
    (r0, c0): (usize, usize),
    acc: &mut Acc,
) {
    let mut lo = [_mm256_setzero_si256(); ROWS];
    let mut hi = [_mm256_setzero_si256(); ROWS];
    for g in 0..quads {
        // SAFETY (every load here): within `a` and `w`, as the caller guarantees.
        let w0 = unsafe { _mm256_loadu_si256(wp.add((g * NR + c0) * 4) as *const __m256i) };
        let w1 = unsafe { _mm256_loadu_si256(wp.add((g * NR + c0 + 8) * 4) as *const __m256i) };
        let ar = unsafe { ap.add((g * MR + r0) * 4) };
        for r in 0..ROWS {
            let x = _mm256_set1_epi32(unsafe { (ar.add(r * 4) as *const i32).read_unaligned() });
            lo[r] = _mm256_dpbusd_avx_epi32(lo[r], x, w0);
            hi[r] = _mm256_dpbusd_avx_epi32(hi[r], x, w1);
        }
    }
    // SAFETY: the CPU has AVX2 (this function's features); r0 and c0 as the caller's.
    unsafe { store_scaled(&lo, &hi, scaling, (r0, c0), acc) }
}
