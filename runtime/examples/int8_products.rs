//! ViT-B/16's four products at batch 1 on `mae-run`'s kernels alone, float32 against int8 on
//! each path this CPU runs, one thread: the whole product as a plan runs it (packing,
//! quantizing the activations, the tiles, the scaling), in GFLOP/s (int8: two operations per
//! multiply-add, as for float32), for finding where the int8 paths lose to their peak.
//!
//! usage: cargo run --release -p mae-runtime --example int8_products -- [ITERATIONS (20)]
//!        [THREADS (1)]
use std::time::Instant;

use mae_runtime::kernels::f32::{product, F32Tile, PackedWeights};
use mae_runtime::kernels::i8::{quant_product, I8Tile, PackedI8};
use mae_runtime::kernels::quantize::ActivationQuant;
use mae_runtime::kernels::Strides;

const VIT_B: [(&str, usize, usize, usize); 4] = [
    ("qkv", 197, 768, 2304),
    ("proj", 197, 768, 768),
    ("fc1", 197, 768, 3072),
    ("fc2", 197, 3072, 768),
];

/// The best time of `iters` calls of `f`, in seconds.
fn best(iters: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> anyhow::Result<()> {
    let iters = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 20,
    };
    let threads: usize = match std::env::args().nth(2) {
        Some(s) => s.parse()?,
        None => 1,
    };
    if threads > 1 {
        // As mae-run runs products: on the pool of tract's executor, from one of its threads.
        let pool = std::sync::Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()?,
        );
        tract_linalg::multithread::set_default_executor(
            tract_linalg::multithread::Executor::MultiThread(pool.clone()),
        );
        return pool.install(|| run(iters, threads));
    }
    run(iters, threads)
}

fn run(iters: usize, threads: usize) -> anyhow::Result<()> {
    println!(
        "{} · {threads} thread(s)",
        mae_runtime::kernels::select::describe_cpu()
    );
    let mut f32_tiles = vec![];
    if let Some(t) = F32Tile::avx512() {
        f32_tiles.push(t);
    }
    if let Some(t) = F32Tile::avx2() {
        f32_tiles.push(t);
    }
    let i8_tiles: Vec<I8Tile> = [I8Tile::vnni(), I8Tile::avx_vnni(), I8Tile::avx2()]
        .into_iter()
        .flatten()
        .collect();
    println!("| product (m×k×n) | {} |", {
        let names: Vec<String> = f32_tiles
            .iter()
            .map(|t| format!("f32 {}", t.name()))
            .chain(i8_tiles.iter().map(|t| format!("int8 {}", t.name())))
            .collect();
        names.join(" | ")
    });
    for (name, m, k, n) in VIT_B {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919 % 211) as f32 - 90.0) / 37.0)
            .collect();
        let wf = |kk: usize, j: usize| (((kk * 131 + j * 31) % 97) as f32 - 48.0) / 97.0;
        let wi = |kk: usize, j: usize| (((kk * 131 + j * 31) % 255) as i32 - 127) as i8;
        let mut c = vec![0f32; m * n];
        let (sa, sc) = (Strides { row: k, col: 1 }, Strides { row: n, col: 1 });
        let flops = 2.0 * (m * k * n) as f64;
        let mut cells = Vec::new();
        for &tile in &f32_tiles {
            let w = PackedWeights::new(k, n, wf);
            let s = best(iters, || product(&a, m, sa, &w, &mut c, sc, tile))?;
            cells.push(format!("{:.1}", flops / s / 1e9));
        }
        for &tile in &i8_tiles {
            let w = PackedI8::new(k, n, wi, &[0.01], ActivationQuant::Dynamic)?.prepare(tile);
            let s = best(iters, || quant_product(&a, m, sa, &w, &mut c, sc, tile))?;
            cells.push(format!("{:.1}", flops / s / 1e9));
        }
        println!("| {name} {m}×{k}×{n} | {} |", cells.join(" | "));
    }
    Ok(())
}
