//! AVX-512 VNNI: the int8 tile, `MR × 2` accumulators of 16 lanes, each instruction adding
//! four products of a uint8 activation and an int8 weight per lane.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use crate::kernels::shape::{Acc, MR, NR};

/// Proof that this CPU has AVX-512F and AVX-512 VNNI: only [`Vnni::detect`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Vnni(());

impl Vnni {
    /// The token, where this CPU has AVX-512F and AVX-512 VNNI.
    pub fn detect() -> Option<Self> {
        (std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vnni"))
        .then_some(Self(()))
    }

    /// One tile of integer sums of `a` (`quads · MR · 4` values) by `w` (`quads · NR · 4`),
    /// leaving `acc` scaled as `i8.rs`'s `Scaling::apply` scales them, `(sum − offset[j]) ·
    /// scale[j] + bias[j]` (the same operations, unfused, so the same values).
    pub fn tile(self, a: &[u8], w: &[i8], quads: usize, scaling: Scaling, acc: &mut Acc) {
        assert!(
            a.len() >= quads * MR * 4 && w.len() >= quads * NR * 4,
            "int8 tile: short panels"
        );
        // SAFETY: the token proves the instructions; the panels' lengths were just checked.
        unsafe { tile(a, w, quads, scaling, acc) }
    }
}

/// A panel's `(offset, scale, bias)` per column.
pub type Scaling<'a> = (&'a [i32; NR], &'a [f32; NR], &'a [f32; NR]);

/// # Safety
/// The CPU must have AVX-512F and AVX-512 VNNI; `a` must hold `quads · MR · 4` values and `w`
/// `quads · NR · 4`.
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn tile(a: &[u8], w: &[i8], quads: usize, scaling: Scaling, acc: &mut Acc) {
    let (offset, scale, bias) = scaling;
    let (ap, wp) = (a.as_ptr(), w.as_ptr());
    let mut lo = [_mm512_setzero_si512(); MR];
    let mut hi = [_mm512_setzero_si512(); MR];
    for g in 0..quads {
        // SAFETY (every load here): within `a` and `w`, as the caller guarantees.
        let w0 = unsafe { _mm512_loadu_si512(wp.add(g * NR * 4) as *const __m512i) };
        let w1 = unsafe { _mm512_loadu_si512(wp.add(g * NR * 4 + 64) as *const __m512i) };
        let ar = unsafe { ap.add(g * MR * 4) };
        for r in 0..MR {
            let x = _mm512_set1_epi32(unsafe { (ar.add(r * 4) as *const i32).read_unaligned() });
            lo[r] = _mm512_dpbusd_epi32(lo[r], x, w0);
            hi[r] = _mm512_dpbusd_epi32(hi[r], x, w1);
        }
    }
    // SAFETY (the loads and stores below): each array holds NR = 32 values.
    let at = |v: &[i32; NR], h: usize| unsafe {
        _mm512_loadu_si512(v.as_ptr().add(h) as *const __m512i)
    };
    let atf = |v: &[f32; NR], h: usize| unsafe { _mm512_loadu_ps(v.as_ptr().add(h)) };
    let (o0, o1) = (at(offset, 0), at(offset, 16));
    let (s0, s1) = (atf(scale, 0), atf(scale, 16));
    let (b0, b1) = (atf(bias, 0), atf(bias, 16));
    for r in 0..MR {
        let f0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(lo[r], o0));
        let f1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(hi[r], o1));
        let y0 = _mm512_add_ps(_mm512_mul_ps(f0, s0), b0);
        let y1 = _mm512_add_ps(_mm512_mul_ps(f1, s1), b1);
        unsafe {
            _mm512_storeu_ps(acc[r].as_mut_ptr(), y0);
            _mm512_storeu_ps(acc[r].as_mut_ptr().add(16), y1);
        }
    }
}
