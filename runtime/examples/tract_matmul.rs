//! One matrix product, alone, through tract: the four products of a ViT-B/16 block at batch 1
//! (197 tokens) as a one-node model built in code (input `[m, k]` times a constant `[k, n]`),
//! optimised as tract optimises an ONNX MatMul. Prints the kernel tract picked for each and its
//! speed on 1 and 2 threads, for comparing with ONNX Runtime on the same shapes
//! (`scripts/bench/matmul.sh`) and for a report to tract's maintainers. Further rows
//! (`qkv_avx512`, `qkv_avx2`, ...) time the same model with `mae-run`'s load-time rewrite, on
//! its packed kernels of each path this CPU runs (`MAE_KERNELS`; the portable one only when
//! PORTABLE=1, as it is far slower).
//!
//! usage: cargo run --release -p mae-runtime --example tract_matmul -- [ITERATIONS (20)]
//!        env SHAPES="197x768x2304,..." (m×k×n) to choose the products, PATHS="avx2,..." to
//!        choose mae-run's paths, THREADS="1,2"
use std::time::Instant;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

use mae_runtime::kernels::select::{Choice, Path};

/// (name, m, k, n) of ViT-B/16's products at 224 px, batch 1.
const VIT_B: [(&str, usize, usize, usize); 4] = [
    ("qkv", 197, 768, 2304),
    ("proj", 197, 768, 768),
    ("fc1", 197, 768, 3072),
    ("fc2", 197, 3072, 768),
];

/// The one-node model of `m × k` times a constant `k × n`, optimised by tract alone, or (`ours`)
/// with `mae-run`'s load-time rewrites, which run it on the packed kernels of that path.
fn plan(
    m: usize,
    k: usize,
    n: usize,
    ours: Option<Path>,
) -> anyhow::Result<(Arc<TypedRunnableModel>, Vec<String>)> {
    let mut model = TypedModel::default();
    let a = model.add_source("a", f32::fact([m, k]))?;
    let w = Tensor::from_shape(
        &[k, n],
        &(0..k * n)
            .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
            .collect::<Vec<f32>>(),
    )?;
    let w = model.add_const("w", w)?;
    let axes = "mk,kn->mn".parse()?;
    let c = model.wire_node("matmul", EinSum::new(axes, f32::datum_type()), &[a, w])?;
    model.select_output_outlets(&c)?;
    let optimized = match ours {
        Some(path) => {
            let kernels = Choice::new(path)?;
            mae_runtime::accel::optimize(model, mae_runtime::accel::Rewrites::All, kernels)?.0
        }
        None => model.into_optimized()?,
    };
    let mut info = Vec::new();
    for node in optimized.nodes() {
        for line in node.op.info()? {
            if node.op.name() == "DenseProduct" {
                info.push(format!("mae-run DenseProduct with {line}"));
            } else if line.contains("Mult") || line.contains("mmm") || line.contains("kernel") {
                info.push(format!("{}: {line}", node.op.name()));
            }
        }
    }
    Ok((optimized.into_runnable()?, info))
}

fn time(plan: &Arc<TypedRunnableModel>, m: usize, k: usize, iters: usize) -> TractResult<f64> {
    let input: Tensor = Tensor::from_shape(&[m, k], &vec![0.5f32; m * k])?;
    for _ in 0..3 {
        plan.run(tvec!(input.clone().into()))?;
    }
    let mut best = f64::MAX;
    for _ in 0..iters {
        let t = Instant::now();
        plan.run(tvec!(input.clone().into()))?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> anyhow::Result<()> {
    let iters: usize = match std::env::args().nth(1) {
        Some(s) => s
            .parse()
            .map_err(|e| anyhow::anyhow!("ITERATIONS {s}: {e}"))?,
        None => 20,
    };
    let shapes: Vec<(String, usize, usize, usize)> = match std::env::var("SHAPES") {
        Ok(list) => list
            .split(',')
            .map(|s| {
                let d: Vec<usize> = s.split('x').filter_map(|v| v.parse().ok()).collect();
                match d[..] {
                    [m, k, n] => Ok((s.to_string(), m, k, n)),
                    _ => Err(anyhow::anyhow!("SHAPES: `{s}` is not MxKxN")),
                }
            })
            .collect::<anyhow::Result<_>>()?,
        Err(_) => VIT_B
            .iter()
            .map(|&(name, m, k, n)| (name.to_string(), m, k, n))
            .collect(),
    };
    let paths: Vec<Path> = match std::env::var("PATHS") {
        Ok(list) => list
            .split(',')
            .map(|p| p.parse::<Path>().map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<_>>()?,
        Err(_) => Path::NAMED
            .into_iter()
            .filter(|p| p.available())
            .filter(|p| *p != Path::Portable || std::env::var_os("PORTABLE").is_some())
            .collect(),
    };
    let threads: Vec<usize> = std::env::var("THREADS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .map(|t| t.parse().map_err(|e| anyhow::anyhow!("THREADS `{t}`: {e}")))
        .collect::<anyhow::Result<_>>()?;
    println!(
        "tract (the version in Cargo.lock) · best of {iters} runs · {}",
        mae_runtime::kernels::select::describe_cpu()
    );
    println!("| product | m×k×n | threads | ms | GFLOP/s | kernel |");
    println!("|---|---|---|---|---|---|");
    for threads in threads {
        let executor = if threads == 1 {
            tract_linalg::multithread::Executor::SingleThread
        } else {
            tract_linalg::multithread::Executor::multithread(threads)
        };
        let variants: Vec<Option<Path>> = std::iter::once(None)
            .chain(paths.iter().copied().map(Some))
            .collect();
        for ((name, m, k, n), ours) in shapes
            .iter()
            .flat_map(|s| variants.iter().map(move |v| (s, *v)))
        {
            let (plan, info) = plan(*m, *k, *n, ours)?;
            // mae-run's rows only where its rewrite applies.
            if ours.is_some() && !info.iter().any(|l| l.contains("DenseProduct")) {
                continue;
            }
            let name = match ours {
                Some(path) => format!("{name}_{}", path.name()),
                None => name.clone(),
            };
            let secs =
                tract_linalg::multithread::multithread_tract_scope(executor.clone(), || {
                    time(&plan, *m, *k, iters)
                })?;
            let gflops = 2.0 * (*m * *k * *n) as f64 / secs / 1e9;
            let kernel = info
                .iter()
                .find_map(|l| {
                    l.split("with ")
                        .nth(1)
                        .map(|s| s.chars().take(80).collect::<String>())
                })
                .unwrap_or_else(|| info.join(" / "));
            println!(
                "| {name} | {m}×{k}×{n} | {threads} | {:.2} | {gflops:.0} | {kernel} |",
                secs * 1e3
            );
        }
    }
    Ok(())
}
