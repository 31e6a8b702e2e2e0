//! Where a tract plan spends its time: each operator kind's share of one forward pass, for
//! deciding what to optimise in an exported graph or a runtime build.
//!
//! usage: cargo run --release -p mae-runtime --example tract_profile -- MODEL.onnx
//!        [BATCH (1)] [THREADS (2)] [SIZE (224)] ; env BY_NODE=1 lists single nodes instead,
//!        CONCRETE=1 optimises the plan for BATCH itself instead of a symbolic batch
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
    if threads > 1 {
        tract_linalg::multithread::set_default_executor(
            tract_linalg::multithread::Executor::multithread(threads),
        );
    }
    // As the runtime loads models: symbolic batch (or, with CONCRETE, this batch), concrete
    // image size.
    let mut model = tract_onnx::onnx().model_for_path(&path)?;
    let b: TDim = if concrete {
        (batch as i64).into()
    } else {
        model.sym("batch").into()
    };
    let shape = tvec![b, 3.into(), (size as i64).into(), (size as i64).into()];
    model.set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape))?;
    let t = Instant::now();
    let plan = model.into_optimized()?.into_runnable()?;
    println!("optimised in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    let input: Tensor = tract_ndarray::Array4::<f32>::from_elem((batch, 3, size, size), 0.1).into();
    for _ in 0..2 {
        plan.run(tvec!(input.clone().into()))?;
    }
    let iters = 5;
    let mut spent: HashMap<String, (f64, usize)> = HashMap::new();
    let t = Instant::now();
    for _ in 0..iters {
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
    }
    let total = t.elapsed().as_secs_f64() / iters as f64;
    let mut rows: Vec<_> = spent.into_iter().collect();
    rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    println!(
        "{:.1} ms per pass (batch {batch}{}, {threads} threads)",
        total * 1e3,
        if concrete {
            ", planned for it"
        } else {
            ", symbolic"
        }
    );
    for (name, (s, n)) in rows.iter().take(40) {
        let ms = s / iters as f64 * 1e3;
        let share = ms / (total * 1e3) * 100.0;
        println!("{ms:>9.1} ms {share:>5.1}% {:>5}  {name}", n / iters);
    }
    Ok(())
}
