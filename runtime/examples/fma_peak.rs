//! The float32 multiply-add peak of one core: independent chains of fused multiply-adds on 16
//! lanes (AVX-512F, 16 chains) and on 8 (AVX2 with FMA, 12 chains: its 16 registers hold them
//! and the two factors), timed on this thread. The ceiling against which
//! `scripts/bench/matmul.sh`'s GFLOP/s read as a fraction. Then the same for the AVX2 int8
//! path's instruction pair, `vpmaddwd` (16 multiply-adds of int16 pairs into 8 lanes) and the
//! `vpaddd` that adds them to a sum, in GOP/s counted as GFLOP/s are (two per multiply-add).
//!
//! usage: cargo run --release -p mae-runtime --example fma_peak -- [MILLIONS OF ROUNDS (100)]
#![allow(unsafe_code)]

use std::time::Instant;

/// Chains run side by side, more than the multiply-add's latency times its ports: on
/// AVX-512F, and on AVX2.
const CHAINS_512: usize = 16;
const CHAINS_256: usize = 12;

fn main() {
    let rounds: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100)
        * 1_000_000;
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    println!("{model}, one thread, {rounds} rounds, best of 3");
    #[cfg(target_arch = "x86_64")]
    {
        let mut tried = false;
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was just checked.
            report("AVX-512F, 16 lanes", (16, CHAINS_512), rounds, || unsafe {
                chains_avx512(rounds)
            });
            tried = true;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: AVX2 and FMA were just checked.
            report("AVX2 + FMA, 8 lanes", (8, CHAINS_256), rounds, || unsafe {
                chains_avx2(rounds)
            });
            // SAFETY: as above.
            report(
                "AVX2 vpmaddwd + vpaddd, 16 int16 products",
                (16, CHAINS_256),
                rounds,
                || unsafe { chains_madd(rounds) },
            );
            tried = true;
        }
        if !tried {
            println!("this CPU has neither AVX-512F nor AVX2 with FMA");
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("x86-64 only");
}

/// Times `run` three times and prints its best rate.
fn report(what: &str, (lanes, chains): (u64, usize), rounds: u64, run: impl Fn() -> f32) {
    let mut best = f64::INFINITY;
    let mut sink = 0f32;
    for _ in 0..3 {
        let start = Instant::now();
        sink += run();
        best = best.min(start.elapsed().as_secs_f64());
    }
    let fmas = (rounds * chains as u64) as f64;
    println!(
        "{what}: {:.1} GFLOP/s, {:.2} multiply-add instructions per ns (checksum {sink:e})",
        fmas * lanes as f64 * 2.0 / best / 1e9,
        fmas / best / 1e9
    );
}

/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn chains_avx512(rounds: u64) -> f32 {
    use std::arch::x86_64::*;
    let (x, y) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(0.999_999_9));
    let mut acc: [__m512; CHAINS_512] = std::array::from_fn(|i| _mm512_set1_ps(i as f32));
    for _ in 0..rounds {
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, x, y);
        }
    }
    acc.iter().map(|a| _mm512_reduce_add_ps(*a)).sum()
}

/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chains_avx2(rounds: u64) -> f32 {
    use std::arch::x86_64::*;
    let (x, y) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(0.999_999_9));
    let mut acc: [__m256; CHAINS_256] = std::array::from_fn(|i| _mm256_set1_ps(i as f32));
    for _ in 0..rounds {
        for a in acc.iter_mut() {
            *a = _mm256_fmadd_ps(*a, x, y);
        }
    }
    let mut lanes = [0f32; 8];
    acc.iter()
        .map(|a| {
            _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
            lanes.iter().sum::<f32>()
        })
        .sum()
}

/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn chains_madd(rounds: u64) -> f32 {
    use std::arch::x86_64::*;
    let w = _mm256_set1_epi16(3);
    let mut acc: [__m256i; CHAINS_256] = std::array::from_fn(|i| _mm256_set1_epi32(i as i32));
    for _ in 0..rounds {
        // Each chain's product depends on its sum, so that neither leaves the loop.
        for a in acc.iter_mut() {
            *a = _mm256_add_epi32(*a, _mm256_madd_epi16(*a, w));
        }
    }
    let mut lanes = [0i32; 8];
    acc.iter()
        .map(|a| {
            _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, *a);
            lanes.iter().map(|&v| v as f32).sum::<f32>()
        })
        .sum()
}
