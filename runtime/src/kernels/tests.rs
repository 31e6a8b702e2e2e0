//! The kernels' tests. Every check runs once per tile through [`f32_tiles!`] or [`i8_tiles!`]:
//! the portable tile everywhere, each instruction set's tile where this CPU has it (ignored,
//! with the reason, where it does not).
#![allow(clippy::unwrap_used)]

use super::attention::attention;
use super::driver::{Aligned, Strides, NR};
use super::f32::{product, F32Tile, PackedWeights};
use super::i8::{quant_product, I8Tile, PackedI8};
use super::layer_norm::layer_norm;
use super::quantize::{
    dynamic_range, quantize, quantize_into, range_portable, ActivationQuant, Scaled,
};
#[cfg(target_arch = "x86_64")]
use super::quantize::{fold_max, fold_min};
use super::select::{Choice, Path};
use super::vector::Vector;

/// Runs each named check on every float32 tile.
macro_rules! f32_tiles {
    ($($check:ident),* $(,)?) => {$(
        mod $check {
            #[test]
            fn portable() {
                super::$check(super::F32Tile::Portable);
            }
            #[test]
            #[cfg_attr(not(host_avx512), ignore = "needs a CPU with AVX-512F")]
            fn avx512() {
                super::$check(super::F32Tile::avx512().expect("AVX-512F"));
            }
            #[test]
            #[cfg_attr(not(host_avx2), ignore = "needs a CPU with AVX2 and FMA")]
            fn avx2() {
                super::$check(super::F32Tile::avx2().expect("AVX2 and FMA"));
            }
        }
    )*};
}

/// Runs each named check on every int8 tile.
macro_rules! i8_tiles {
    ($($check:ident),* $(,)?) => {$(
        mod $check {
            #[test]
            fn portable() {
                super::$check(super::I8Tile::Portable);
            }
            #[test]
            #[cfg_attr(not(host_vnni), ignore = "needs a CPU with AVX-512 VNNI")]
            fn vnni() {
                super::$check(super::I8Tile::vnni().expect("AVX-512 VNNI"));
            }
            #[test]
            #[cfg_attr(not(host_avx_vnni), ignore = "needs a CPU with AVX-VNNI")]
            fn avx_vnni() {
                super::$check(super::I8Tile::avx_vnni().expect("AVX-VNNI"));
            }
            #[test]
            #[cfg_attr(not(host_avx2), ignore = "needs a CPU with AVX2 and FMA")]
            fn avx2() {
                super::$check(super::I8Tile::avx2().expect("AVX2 and FMA"));
            }
        }
    )*};
}

/// Runs each named check on every instruction set of the vectorised loops.
macro_rules! vectors {
    ($($check:ident),* $(,)?) => {$(
        mod $check {
            #[test]
            fn portable() {
                super::$check(super::Vector::Portable);
            }
            #[test]
            #[cfg(target_arch = "x86_64")]
            #[cfg_attr(not(host_avx512), ignore = "needs a CPU with AVX-512F")]
            fn avx512() {
                let cpu = crate::kernels::x86_64::avx512::Avx512::detect().expect("AVX-512F");
                super::$check(super::Vector::Avx512(cpu));
            }
            #[test]
            #[cfg(target_arch = "x86_64")]
            #[cfg_attr(not(host_avx2), ignore = "needs a CPU with AVX2 and FMA")]
            fn avx2() {
                let cpu = crate::kernels::x86_64::avx2::Avx2::detect().expect("AVX2 and FMA");
                super::$check(super::Vector::Avx2(cpu));
            }
        }
    )*};
}

f32_tiles!(
    products_match_a_direct_sum_and_the_portable_tile,
    products_over_threads_match_one_thread,
    attention_matches_a_direct_softmax,
);
i8_tiles!(
    int8_products_give_onnxs_numbers,
    int8_products_over_threads_match_one_thread,
);
vectors!(
    quantizers_give_the_portable_bytes_and_ranges,
    layer_norm_gives_the_portable_values,
    gelu_gives_the_portable_values,
);

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0
                - 1.0
        })
        .collect()
}

/// The sizes around the panels' edges.
const SIZES: [(usize, usize, usize); 5] = [
    (1, 1, 1),
    (5, 7, 3),
    (12, 16, 32),
    (13, 33, 65),
    (197, 24, 40),
];

/// `a` (`m × k`, token-major) in both layouts: token-major and feature-major.
fn both_layouts(a: &[f32], m: usize, k: usize) -> [(Strides, Vec<f32>); 2] {
    let feature_major = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
    [
        (Strides { row: k, col: 1 }, a.to_vec()),
        (Strides { row: 1, col: m }, feature_major),
    ]
}

/// The output layouts: row-major and column-major.
fn outputs(m: usize, n: usize) -> [Strides; 2] {
    [Strides { row: n, col: 1 }, Strides { row: 1, col: m }]
}

#[test]
fn aligned_buffers_start_on_a_cache_line_and_hold_zeros() {
    for len in [0, 1, 15, 16, 17, 100, 4099] {
        let mut f = Aligned::<f32>::zeroed(len);
        assert_eq!(f.len(), len);
        assert_eq!(f.as_ptr() as usize % 64, 0, "{len} floats");
        assert!(f.iter().all(|&v| v == 0.0));
        f.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32);
        let g = f.clone();
        assert_eq!(f, g);
        assert_eq!(g.as_ptr() as usize % 64, 0);
        let b = Aligned::<i8>::zeroed(len * 3);
        assert_eq!((b.len(), b.as_ptr() as usize % 64), (len * 3, 0));
    }
    let w = PackedWeights::new(100, 70, |kk, j| (kk * 70 + j) as f32);
    for p in 0..3 {
        assert_eq!(w.panel(p).as_ptr() as usize % 64, 0, "panel {p}");
        assert_eq!(w.panel(p)[NR + 1], (70 + p * NR + 1) as f32);
    }
}

/// Checks `tile` on the sizes around the panels' edges, in both layouts of the input and of
/// the output, against a direct sum in f64, and bit for bit against the portable tile (the
/// tiles sum in the same order).
fn products_match_a_direct_sum_and_the_portable_tile(tile: F32Tile) {
    for &(m, k, n) in &SIZES {
        let a = values(m * k, 1);
        let wv = values(k * n, 2);
        let bias = values(n, 3);
        let mut w = PackedWeights::new(k, n, |kk, j| wv[kk * n + j]);
        w.end.add_bias(&bias);
        for (a_strides, laid) in both_layouts(&a, m, k) {
            for c_strides in outputs(m, n) {
                let mut c = vec![f32::NAN; m * n];
                product(&laid, m, a_strides, &w, &mut c, c_strides, tile).unwrap();
                let mut portable = vec![f32::NAN; m * n];
                let p = F32Tile::Portable;
                product(&laid, m, a_strides, &w, &mut portable, c_strides, p).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let sum: f64 = (0..k)
                            .map(|kk| a[i * k + kk] as f64 * wv[kk * n + j] as f64)
                            .sum();
                        let want = bias[j] as f64 + sum;
                        let at = i * c_strides.row + j * c_strides.col;
                        let got = c[at] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{tile:?} {m}×{k}×{n}, a {a_strides:?}, c {c_strides:?}, \
                             ({i}, {j}): {got} against {want}"
                        );
                        assert_eq!(c[at].to_bits(), portable[at].to_bits(), "({i}, {j})");
                    }
                }
            }
        }
    }
}

/// Runs `f` with tract's executor set to a pool of `threads` threads.
fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    use tract_linalg::multithread::{multithread_tract_scope, Executor};
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let pool = std::sync::Arc::new(pool);
    multithread_tract_scope(Executor::MultiThread(pool.clone()), || pool.install(f))
}

/// A product split over 2 and 3 threads (its panels in groups, each group writing only its
/// columns of either output layout) gives one thread's values, bit for bit.
fn products_over_threads_match_one_thread(tile: F32Tile) {
    for &(m, k, n) in &[(197, 40, 300), (5, 7, 3), (1, 9, 70), (30, 16, 64)] {
        let a = values(m * k, 5);
        let wv = values(k * n, 6);
        let mut w = PackedWeights::new(k, n, |kk, j| wv[kk * n + j]);
        w.end.add_bias(&values(n, 7));
        w.end.gelu = true;
        for (a_strides, laid) in both_layouts(&a, m, k) {
            for cs in outputs(m, n) {
                let mut one = vec![f32::NAN; m * n];
                product(&laid, m, a_strides, &w, &mut one, cs, tile).unwrap();
                for threads in [2, 3] {
                    let mut many = vec![f32::NAN; m * n];
                    on_threads(threads, || {
                        product(&laid, m, a_strides, &w, &mut many, cs, tile).unwrap()
                    });
                    let (one, many): (Vec<u32>, Vec<u32>) = (
                        one.iter().map(|v| v.to_bits()).collect(),
                        many.iter().map(|v| v.to_bits()).collect(),
                    );
                    assert_eq!(
                        one, many,
                        "{tile:?} {m}×{k}×{n} on {threads} threads, c {cs:?}"
                    );
                }
            }
        }
    }
}

/// Checks [`attention`] on `tile` against a direct softmax in f64, on sizes that cross the
/// query blocks, the key panels and the value panels with partial ones, on one thread and
/// (the same values) on two.
fn attention_matches_a_direct_softmax(tile: F32Tile) {
    for &(tokens, heads, dim) in &[(1, 1, 1), (13, 3, 8), (70, 2, 20), (33, 1, 12)] {
        let width = heads * dim;
        let qkv: Vec<f32> = values(tokens * 3 * width, 7)
            .iter()
            .map(|v| v * 3.0)
            .collect();
        let scale = 0.3f32;
        let mut out = vec![f32::NAN; tokens * width];
        attention(&qkv, tokens, heads, dim, scale, &mut out, None, tile).unwrap();
        // With the probabilities written out (on two threads): the same outputs.
        let mut threaded = vec![f32::NAN; tokens * width];
        let mut probs = vec![f32::NAN; heads * tokens * tokens];
        on_threads(2, || {
            let p = Some(&mut probs[..]);
            attention(&qkv, tokens, heads, dim, scale, &mut threaded, p, tile).unwrap()
        });
        assert_eq!(
            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            threaded.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let at = |t: usize, part: usize, h: usize, d: usize| {
            qkv[t * 3 * width + part * width + h * dim + d] as f64
        };
        for h in 0..heads {
            for i in 0..tokens {
                let s: Vec<f64> = (0..tokens)
                    .map(|j| {
                        (0..dim)
                            .map(|d| at(i, 0, h, d) * at(j, 1, h, d))
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (j, e) in e.iter().enumerate() {
                    let got = probs[(h * tokens + i) * tokens + j] as f64;
                    assert!(
                        (got - e / sum).abs() <= 1e-6,
                        "{tile:?} {tokens}×{heads}×{dim}, head {h}, query {i}, key {j}: \
                         probability {got} against {}",
                        e / sum
                    );
                }
                for d in 0..dim {
                    let want: f64 = (0..tokens).map(|j| e[j] / sum * at(j, 2, h, d)).sum();
                    let got = out[i * width + h * dim + d] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{tile:?} {tokens}×{heads}×{dim}, token {i}, head {h}, {d}: \
                         {got} against {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn short_slices_are_refused() {
    let w = PackedWeights::new(4, 3, |_, _| 1.0);
    let mut c = vec![0f32; 6];
    let (s, cs) = (Strides { row: 4, col: 1 }, Strides { row: 3, col: 1 });
    let p = F32Tile::Portable;
    let err = product(&[1.0; 7], 2, s, &w, &mut c, cs, p).unwrap_err();
    assert!(err.to_string().contains("input of 7 values"), "{err}");
    let err = product(&[1.0; 8], 2, s, &w, &mut c[..5], cs, p).unwrap_err();
    assert!(err.to_string().contains("output of 5 values"), "{err}");
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
/// quantizations, both layouts of the input and of the output, against [`direct`]: the same
/// numbers, bit for bit.
fn int8_products_give_onnxs_numbers(tile: I8Tile) {
    let statics = ActivationQuant::Static {
        inv_scale: 97.5,
        zero_point: 131,
    };
    for quant in [ActivationQuant::Dynamic, statics] {
        for &(m, k, n) in &SIZES {
            // Past the calibrated range on both sides, so that the static one saturates.
            let a: Vec<f32> = values(m * k, 1).iter().map(|v| v * 1.7 + 0.2).collect();
            let wv: Vec<i8> = values(k * n, 2).iter().map(|v| (v * 127.0) as i8).collect();
            let scales: Vec<f32> = values(n, 3).iter().map(|v| 0.01 + v.abs() * 0.02).collect();
            let bias = values(n, 4);
            let mut w = PackedI8::new(k, n, |kk, j| wv[kk * n + j], &scales, quant)
                .unwrap()
                .prepare(tile);
            w.end.add_bias(&bias);
            let want = direct(&a, (m, k, n), &wv, &scales, &bias, quant);
            for (a_strides, laid) in both_layouts(&a, m, k) {
                for c_strides in outputs(m, n) {
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
    // A longer product, with outputs well away from zero, against the portable tile.
    let (m, k, n) = (29, 301, 70);
    let a = values(m * k, 4);
    let wv: Vec<i8> = values(k * n, 5).iter().map(|v| (v * 128.0) as i8).collect();
    let dynamic = ActivationQuant::Dynamic;
    let w = PackedI8::new(k, n, |kk, j| wv[kk * n + j], &[0.5], dynamic).unwrap();
    let laid = w.clone().prepare(tile);
    let s = Strides { row: k, col: 1 };
    let cs = Strides { row: n, col: 1 };
    let mut x = vec![0f32; m * n];
    let mut y = vec![0f32; m * n];
    quant_product(&a, m, s, &laid, &mut x, cs, tile).unwrap();
    quant_product(&a, m, s, &w, &mut y, cs, I8Tile::Portable).unwrap();
    assert_eq!(x, y);
    assert!(x.iter().any(|v| v.abs() > 1.0), "outputs near zero");
}

/// An int8 product split over 2 and 3 threads gives one thread's values, bit for bit.
fn int8_products_over_threads_match_one_thread(tile: I8Tile) {
    let statics = ActivationQuant::Static {
        inv_scale: 40.0,
        zero_point: 120,
    };
    for quant in [ActivationQuant::Dynamic, statics] {
        for &(m, k, n) in &[(197, 41, 300), (5, 7, 3), (1, 9, 70)] {
            let a = values(m * k, 8);
            let wv: Vec<i8> = values(k * n, 9).iter().map(|v| (v * 127.0) as i8).collect();
            let mut w = PackedI8::new(k, n, |kk, j| wv[kk * n + j], &[0.02], quant)
                .unwrap()
                .prepare(tile);
            w.end.add_bias(&values(n, 10));
            w.end.gelu = true;
            for (a_strides, laid) in both_layouts(&a, m, k) {
                for cs in outputs(m, n) {
                    let mut one = vec![f32::NAN; m * n];
                    quant_product(&laid, m, a_strides, &w, &mut one, cs, tile).unwrap();
                    let mut many = vec![f32::NAN; m * n];
                    on_threads(2, || {
                        quant_product(&laid, m, a_strides, &w, &mut many, cs, tile).unwrap()
                    });
                    assert_eq!(
                        one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        many.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{tile:?} {quant:?} {m}×{k}×{n}, c {cs:?}"
                    );
                }
            }
        }
    }
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
    let cpu = super::x86_64::avx512::Avx512::detect().expect("AVX-512F");
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
                let factor = match scaled {
                    Scaled::Times(f) => (f, false),
                    Scaled::Over(d) => (d, true),
                };
                let done = cpu.quantize(xs, &mut got, zero, factor);
                assert_eq!(done, len / 16 * 16);
                assert_eq!(got[..done], want[..done], "{len} values, zero point {zero}");
            }
        }
        let finite: Vec<f32> = xs.iter().copied().filter(|x| x.is_finite()).collect();
        for xs in [xs, &finite[..]] {
            let (lo, hi) = cpu.range_lanes(xs);
            let rest = xs.chunks_exact(16).remainder();
            let (a, b) = (fold_min(&lo, rest), fold_max(&hi, rest));
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
    let dynamic = ActivationQuant::Dynamic;
    let mut w = PackedI8::new(k, n, |kk, j| (kk + j) as i8, &[0.1], dynamic).unwrap();
    w.end.add_bias(&[1.0, 2.0, 3.0, 4.0, 5.0]);
    let mut c = vec![f32::NAN; m * n];
    let (s, cs) = (Strides { row: k, col: 1 }, Strides { row: n, col: 1 });
    quant_product(&[0.0; 24], m, s, &w, &mut c, cs, I8Tile::Portable).unwrap();
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
    let t = I8Tile::Portable;
    let err = quant_product(&[1.0; 7], 2, s, &w, &mut c, cs, t).unwrap_err();
    assert!(err.to_string().contains("input of 7 values"), "{err}");
    let err = quant_product(&[1.0; 8], 2, s, &w, &mut c[..5], cs, t).unwrap_err();
    assert!(err.to_string().contains("output of 5 values"), "{err}");
}

#[test]
fn the_dynamic_range_holds_zero() {
    let p = Vector::Portable;
    assert_eq!(dynamic_range(&[], p), (0.0, 0));
    let (s, z) = dynamic_range(&[0.0, 2.0, -3.0, -2.5, 1.34, 0.5], p);
    assert!((s - 5.0 / 255.0).abs() < 1e-9 && z == 153, "{s} {z}");
    let (s, z) = dynamic_range(&[1.0, 2.1, 4.0], p);
    assert!((s - 4.0 / 255.0).abs() < 1e-9 && z == 0, "{s} {z}");
    // Past the 16-wide lanes: the minimum in the remainder.
    let mut v = vec![3.0f32; 37];
    v[36] = -1.0;
    let (s, z) = dynamic_range(&v, p);
    assert!((s - 4.0 / 255.0).abs() < 1e-9 && z == 64, "{s} {z}");
}

/// The quantizer and the dynamic range on `vector` give the portable loops' bytes and ranges,
/// on every awkward value and length.
fn quantizers_give_the_portable_bytes_and_ranges(vector: Vector) {
    let v = awkward_values();
    for len in [0, 1, 7, 15, 16, 17, 100, v.len()] {
        let xs = &v[v.len() - len..];
        for zero in [0u8, 1, 77, 128, 255] {
            for scaled in [Scaled::Times(0.37), Scaled::Over(3.1)] {
                let mut want = vec![0u8; len];
                match scaled {
                    Scaled::Times(f) => quantize_into(xs, &mut want, zero, |x| x * f),
                    Scaled::Over(d) => quantize_into(xs, &mut want, zero, |x| x / d),
                }
                let mut got = vec![0u8; len];
                quantize(xs, &mut got, zero, scaled, vector);
                assert_eq!(got, want, "{vector:?}: {len} values, zero point {zero}");
            }
        }
        let finite: Vec<f32> = xs.iter().copied().filter(|x| x.is_finite()).collect();
        let (s, z) = dynamic_range(&finite, vector);
        let (t, y) = dynamic_range(&finite, Vector::Portable);
        assert_eq!(
            (s.to_bits(), z),
            (t.to_bits(), y),
            "{vector:?}: {len} values"
        );
    }
}

/// LayerNorm on `vector` gives the portable loops' values, bit for bit, in both layouts.
fn layer_norm_gives_the_portable_values(vector: Vector) {
    for (outer, d, inner) in [(1, 768, 197), (2, 12, 7), (3, 16, 1), (2, 1, 5), (1, 37, 1)] {
        let x: Vec<f32> = values(outer * d * inner, 7)
            .iter()
            .map(|v| v * 3.0 + 0.5)
            .collect();
        let (mut got, mut want) = (vec![f32::NAN; x.len()], vec![f32::NAN; x.len()]);
        layer_norm(&x, &mut got, (d, inner), 1e-6, vector);
        layer_norm(&x, &mut want, (d, inner), 1e-6, Vector::Portable);
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{vector:?}: {outer}x{d}x{inner}"
        );
        assert!(got.iter().all(|v| v.is_finite()));
    }
}

/// GELU on `vector` gives the portable loops' values, bit for bit.
fn gelu_gives_the_portable_values(vector: Vector) {
    let erf = super::gelu::erf_if(true).unwrap().unwrap();
    let x: Vec<f32> = values(1000, 3).iter().map(|v| v * 6.0).collect();
    let (mut got, mut want) = (x.clone(), x.clone());
    super::gelu::apply(&mut got, &*erf, vector).unwrap();
    super::gelu::apply(&mut want, &*erf, Vector::Portable).unwrap();
    assert_eq!(got, want, "{vector:?}");
    // GELU(x) lies between min(x, 0) and max(x, 0).
    assert!(x
        .iter()
        .zip(&got)
        .all(|(x, g)| *g <= x.max(0.0) + 1e-6 && *g >= x.min(0.0) - 0.2));
}

#[test]
fn every_path_this_cpu_runs_is_chosen_by_name_and_auto_picks_the_first() {
    let available: Vec<Path> = Path::NAMED.into_iter().filter(|p| p.available()).collect();
    assert!(available.contains(&Path::Portable));
    for path in available.iter().copied() {
        let choice = Choice::new(path).unwrap();
        let k = choice.products.expect("products on a named path");
        assert_eq!(k.path, path);
        let text = choice.describe();
        assert!(
            text.contains(path.name()) && text.contains("forced"),
            "{text}"
        );
        if path == Path::Portable {
            assert_eq!(
                (k.f32, k.i8, k.vector),
                (F32Tile::Portable, I8Tile::Portable, Vector::Portable)
            );
        } else {
            assert_ne!(k.f32, F32Tile::Portable, "{path:?}");
            assert_ne!(k.i8, I8Tile::Portable, "{path:?}");
        }
    }
    let auto = Choice::new(Path::Auto).unwrap();
    match available.first() {
        Some(&Path::Portable) => assert!(auto.products.is_none(), "{}", auto.describe()),
        Some(&best) => assert_eq!(auto.products.unwrap().path, best),
        None => unreachable!(),
    }
    for path in Path::NAMED.into_iter().filter(|p| !p.available()) {
        let err = Choice::new(path).unwrap_err().to_string();
        assert!(
            err.contains("lacks") && err.contains(&path.needs()),
            "{err}"
        );
    }
}

#[test]
fn a_path_the_cpu_lacks_is_refused_with_what_it_lacks_and_what_it_has() {
    // A CPU with SSE4.2 alone (as if detected): every path but the portable one is refused.
    let has = |f: &str| f == "sse4.2";
    for path in [Path::Avx512, Path::AvxVnni, Path::Avx2] {
        let err = path.refusal(&has, &["sse4.2"]).expect("refused");
        assert!(
            err.contains(path.name()) && err.contains(&path.needs()) && err.contains("sse4.2"),
            "{err}"
        );
    }
    assert_eq!(Path::Portable.refusal(&has, &["sse4.2"]), None);
    assert_eq!(Path::Auto.refusal(&has, &["sse4.2"]), None);
    // AVX2 without AVX-VNNI: avx-vnni alone is refused.
    let has = |f: &str| ["avx2", "fma"].contains(&f);
    assert!(Path::AvxVnni.refusal(&has, &["avx2", "fma"]).is_some());
    assert_eq!(Path::Avx2.refusal(&has, &["avx2", "fma"]), None);
    let err = "avx1024".parse::<Path>().unwrap_err();
    assert!(
        err.contains("MAE_KERNELS") && err.contains("avx-vnni"),
        "{err}"
    );
    assert_eq!(" AVX2".parse::<Path>().unwrap(), Path::Avx2);
}
