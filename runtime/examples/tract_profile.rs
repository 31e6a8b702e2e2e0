//! Where a tract plan spends its time: each operator kind's share of one forward pass, for
//! deciding what to optimise in an exported graph or a runtime build.
//!
//! usage: cargo run --release -p mae-runtime --example tract_profile -- MODEL.onnx
//!        [BATCH (1)] [THREADS (2)] [SIZE (224)] ; env BY_NODE=1 lists single nodes instead,
//!        CONCRETE=1 optimises the plan for BATCH itself instead of a symbolic batch, TOP=N
//!        prints N rows (40), INSTALL=0 runs the passes on the main thread instead of on one of
//!        the pool's threads (as `mae-run` runs them)
use std::collections::HashMap;
use std::time::Instant;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::{eval, SimpleState};

fn arg(i: usize, default: usize) -> anyhow::Result<usize> {
    match std::env::args().nth(i) {
        Some(s) => s
            .parse()
            .map_err(|e| anyhow::anyhow!("argument {i} ({s}): {e}")),
        None => Ok(default),
    }
}

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).ok_or_else(|| {
        anyhow::anyhow!("usage: tract_profile MODEL.onnx [BATCH] [THREADS] [SIZE]")
    })?;
    let (batch, threads, size) = (arg(2, 1)?, arg(3, 2)?, arg(4, 224)?);
    let by_node = std::env::var_os("BY_NODE").is_some();
    let concrete = std::env::var_os("CONCRETE").is_some();
    // As mae-run runs a plan: inside the pool, on one of its threads (INSTALL=0: not).
    let install = threads > 1 && std::env::var("INSTALL").map_or(true, |v| v != "0");
    let pool = std::sync::Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?,
    );
    if threads > 1 {
        tract_linalg::multithread::set_default_executor(
            tract_linalg::multithread::Executor::MultiThread(pool.clone()),
        );
    }
    // As the runtime loads models: symbolic batch (or, with CONCRETE, this batch), concrete
    // image size.
    let settings = mae_runtime::engine::settings::TractSettings::from_env()?;
    let rewrites = settings.rewrites;
    let kernels = mae_runtime::kernels::select::Choice::new(settings.kernels)?;
    let (mut model, integer) = mae_runtime::accel::parse(std::path::Path::new(&path), rewrites)?;
    let b: TDim = if concrete {
        (batch as i64).into()
    } else {
        model.sym("batch").into()
    };
    let shape = tvec![b, 3.into(), (size as i64).into(), (size as i64).into()];
    model.set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape))?;
    let model = model.into_typed()?;
    // DECLUTTERED=pattern: the nodes of the decluttered graph (what the rewrites match) whose
    // names hold it, with their inputs.
    if let Ok(pat) = std::env::var("DECLUTTERED") {
        let decluttered = model.clone().into_decluttered()?;
        for node in decluttered.nodes().iter().filter(|n| n.name.contains(&pat)) {
            let inputs: Vec<String> = node
                .inputs
                .iter()
                .map(|i| format!("{}/{}", decluttered.node(i.node).name, i.slot))
                .collect();
            println!(
                "#{} {} {}: {:?} <- {inputs:?}",
                node.id,
                node.op().name(),
                node.name,
                decluttered.outlet_fact(node.id.into())?
            );
        }
    }
    let t = Instant::now();
    // With mae-run's load-time rewrites unless MAE_TRACT_REWRITES=none.
    let (optimized, mut done) = mae_runtime::accel::optimize(model, rewrites, kernels)?;
    done.integer_products = integer;
    println!("rewrites: {done:?}");
    if let Ok(pat) = std::env::var("FACTS") {
        for node in optimized.nodes().iter().filter(|n| n.name.contains(&pat)) {
            let facts = optimized.node_input_facts(node.id)?;
            println!(
                "{} {}: {:?} {:?}",
                node.op().name(),
                node.name,
                facts,
                node.op.info()?
            );
        }
    }
    let plan = optimized.into_runnable()?;
    println!("optimised in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    // Pixels as `mae-run bench` makes them: pseudo-random in [-2, 2).
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let input: Tensor = tract_ndarray::Array4::<f32>::from_shape_fn((batch, 3, size, size), |_| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    })
    .into();
    // CONST=v: every pixel v instead.
    let input = match std::env::var("CONST")
        .ok()
        .and_then(|v| v.parse::<f32>().ok())
    {
        Some(v) => tract_ndarray::Array4::<f32>::from_elem((batch, 3, size, size), v).into(),
        None => input,
    };
    let whole = |n: usize| -> anyhow::Result<f64> {
        let t = Instant::now();
        for _ in 0..n {
            if install {
                pool.install(|| plan.run(tvec!(input.clone().into())))?;
            } else {
                plan.run(tvec!(input.clone().into()))?;
            }
        }
        Ok(t.elapsed().as_secs_f64() * 1e3 / n as f64)
    };
    whole(2)?;
    let passes: usize = std::env::var("PASSES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    println!(
        "{:.1} ms per whole pass ({passes} passes{})",
        whole(passes)?,
        if install { ", inside the pool" } else { "" }
    );
    let iters = 5;
    let mut spent: HashMap<String, (f64, usize)> = HashMap::new();
    let t = Instant::now();
    let mut profile = || -> TractResult<()> {
        let mut state = SimpleState::new(&plan)?;
        state.run_plan_with_eval(tvec!(input.clone().into()), |ctx, st, node, inputs| {
            let t = Instant::now();
            let out = eval(ctx, st, node, inputs);
            let key = if by_node {
                format!("{} {}", node.op().name(), node.name)
            } else {
                node.op().name().to_string()
            };
            let e = spent.entry(key).or_default();
            e.0 += t.elapsed().as_secs_f64();
            e.1 += 1;
            out
        })?;
        Ok(())
    };
    for _ in 0..iters {
        if install {
            pool.install(&mut profile)?;
        } else {
            profile()?;
        }
    }
    let total = t.elapsed().as_secs_f64() / iters as f64;
    let mut rows: Vec<_> = spent.into_iter().collect();
    rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    println!(
        "{:.1} ms per pass (batch {batch}{}, {threads} threads{})",
        total * 1e3,
        if concrete {
            ", planned for it"
        } else {
            ", symbolic"
        },
        if install { ", inside the pool" } else { "" }
    );
    let top = std::env::var("TOP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    for (name, (s, n)) in rows.iter().take(top) {
        let ms = s / iters as f64 * 1e3;
        let share = ms / (total * 1e3) * 100.0;
        println!("{ms:>9.1} ms {share:>5.1}% {:>5}  {name}", n / iters);
    }
    Ok(())
}
